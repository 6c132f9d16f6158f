"""NIP-61 nutzaps to the bot: taken in as tips, marked redeemed, never taken twice.

The bot advertises its P2PK lock key (kind 10019), so a Nostr client may nutzap it:
kind 9321, proofs locked to that key. Against a real nutshell mint (behind a recording
proxy), nostr-sdk's LocalRelay and the daemon; the nutzapper's wallet is nutshell's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import web
from nostr_sdk import (
    Event,
    EventBuilder,
    Filter,
    Keys,
    Kind,
    ReqTarget,
    Tag,
    nip44_decrypt,
)

from bot.daemon import Daemon
from bot.nutzap import parse_nutzap
from mint_client.errors import MalformedToken
from mint_client.store import PaymentRecord
from mint_client.tokens import parse_token
from tests.bot_harness import ask
from tests.support.mint import MintProcess
from tests.support.mint_proxy import MintProxy
from tests.support.nostr_user import NostrUser
from tests.support.ports import free_port
from tests.support.relays import LocalRelay
from tests.support.user_wallet import UserWallet, decode_token
from tests.test_locked import MintLog, audit_ok, via
from tests.test_nostr_dm import nostr_bot, nostr_config

in_session_loop = pytest.mark.asyncio(loop_scope="session")


def proofs_json(token: str) -> list[str]:
    """A token's proofs as a nutzap carries them: one NUT-00 JSON object each, DLEQ kept."""
    t = decode_token(token)
    return [json.dumps(p.to_dict(include_dleq=p.dleq is not None)) for p in t.proofs]


def nutzap_event(
    keys: Keys, to: str, mint_url: str, proofs: Sequence[str], comment: str = "thanks!"
) -> Event:
    tags = [["proof", p] for p in proofs] + [["u", mint_url], ["unit", "sat"], ["p", to]]
    return EventBuilder(Kind(9321), comment).tags([Tag.parse(t) for t in tags]).finalize(keys)


ALL_STATUSES = ("redeeming", "redeemed", "settled", "refunded", "failed")


async def journalled(daemon: Daemon, event: Event) -> list[PaymentRecord]:
    """Every journal entry of the bot's attempts to take in the nutzap ``event``."""
    prefix = f"nutzap-{event.id().to_hex()}-"
    recs = await daemon.wallet.store.payments_in(*ALL_STATUSES)
    return [r for r in recs if r.id.startswith(prefix)]


async def taken(daemon: Daemon, event: Event, timeout_s: float = 20) -> PaymentRecord:
    """The tip the bot booked for ``event``, once settled (there is one, at most)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        settled = [r for r in await journalled(daemon, event) if r.status == "settled"]
        assert len(settled) <= 1, settled
        if settled:
            return settled[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"nutzap {event.id().to_hex()[:12]} was not taken in")


async def log_lines(
    caplog: pytest.LogCaptureFixture, *needles: str, timeout_s: float = 20
) -> list[str]:
    """The captured log messages naming any of ``needles``, once each needle is named."""
    found: list[str] = []
    for _ in range(int(timeout_s * 10)):
        found = [
            m for m in (r.getMessage() for r in caplog.records) if any(n in m for n in needles)
        ]
        if all(any(n in m for m in found) for n in needles):
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"not logged: {needles}; got {[r.getMessage() for r in caplog.records]}")


def test_a_nutzap_names_the_bot_one_mint_and_proofs() -> None:
    proof = json.dumps(
        {"id": "00ad268c4d1f5826", "amount": 2, "secret": "s", "C": "02" + "ab" * 32}
    )
    me = "cd" * 32
    good = [["proof", proof], ["u", "http://mint.test"], ["p", me]]
    nz = parse_nutzap("e" * 64, "f" * 64, "hi", good, recipient=me)
    assert nz.token.amount == 2 and nz.token.unit == "sat" and nz.comment == "hi"
    for tags in (
        [["proof", proof], ["u", "http://mint.test"], ["p", "00" * 32]],  # to someone else
        [["proof", proof], ["p", me]],  # no mint
        [["proof", proof], ["u", "http://a.test"], ["u", "http://b.test"], ["p", me]],
        [["u", "http://mint.test"], ["p", me]],  # no proofs
        [["proof", "{not json"], ["u", "http://mint.test"], ["p", me]],
        [["proof", proof]] * 65 + [["u", "http://mint.test"], ["p", me]],
    ):
        with pytest.raises(MalformedToken):
            parse_nutzap("e" * 64, "f" * 64, "", tags, recipient=me)


@in_session_loop
async def test_a_nutzap_is_taken_in_marked_redeemed_and_never_taken_twice(
    local_relay: LocalRelay, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    bot_keys = Keys.generate()
    alice_wallet = await UserWallet.create(mint.url, tmp_path / "alice")
    await alice_wallet.fund(1000)
    log = MintLog()
    async with MintProxy(mint.url, before=log.before) as proxy:
        relay = local_relay.url
        cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [relay], bot_keys)
        cfg = cfg.model_copy(update={"mints": [proxy.url]})
        async with nostr_bot(cfg) as daemon, await NostrUser.create([relay]) as alice:
            key = daemon.pipeline.lock_pubkey
            assert key is not None
            token = await alice_wallet.send_locked(120, key, version=3)
            zap = nutzap_event(
                alice.keys, bot_keys.public_key().to_hex(), proxy.url, proofs_json(token)
            )
            await alice.publish_raw(zap)
            rec = await taken(daemon, zap)
            # kept whole (a fee-free mint): income, no change, and the books balance
            assert (rec.paid_sat, rec.fee_sat, rec.charged_sat, rec.change_sat) == (120, 0, 120, 0)
            assert rec.transport == "nutzap"
            assert await alice_wallet.token_state(token) == "spent"
            await audit_ok(daemon)

            # the NIP-61 receipt: a kind 7376 marking the nutzap redeemed, for its sender
            receipts: list[Event] = []
            for _ in range(50):
                receipts = await alice.client.fetch_events(
                    ReqTarget.auto([Filter().kind(Kind(7376)).author(bot_keys.public_key())]),
                    timeout=timedelta(seconds=2),
                )
                if receipts:
                    break
                await asyncio.sleep(0.1)
            [receipt] = receipts
            tags = [t.to_vec() for t in receipt.tags()]
            assert ["e", zap.id().to_hex(), "", "redeemed"] in tags
            assert ["p", alice.pubkey] in tags
            private = nip44_decrypt(bot_keys.secret_key(), bot_keys.public_key(), receipt.content())
            assert json.loads(private) == [["direction", "in"], ["amount", "120"], ["unit", "sat"]]

            # the same proofs again: in a new nutzap event, and as a locked payment (which
            # the bot would take with no mint call): both refused, nothing booked twice
            again = nutzap_event(
                alice.keys, bot_keys.public_key().to_hex(), proxy.url, proofs_json(token), "again"
            )
            await alice.publish_raw(again)
            status, _, body = await ask(daemon.http_url or "", "a question", via(token, proxy.url))
            assert status == 400 and body["error"]["code"] == "token_spent", body
            await asyncio.sleep(2)
            assert await journalled(daemon, again) == []
            assert (await daemon.wallet.store.balances("locked")) == {}
            await audit_ok(daemon)


@in_session_loop
async def test_nutzaps_the_bot_cannot_take_stay_with_their_sender(
    local_relay: LocalRelay,
    mint: MintProcess,
    emulator_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bot_keys = Keys.generate()
    alice_wallet = await UserWallet.create(mint.url, tmp_path / "alice")
    bob_wallet = await UserWallet.create(mint.url, tmp_path / "bob")
    await alice_wallet.fund(1000)
    # an untrusted "mint" that counts every request: the bot must never call it
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    untrusted = f"http://127.0.0.1:{port}"
    caplog.set_level(logging.WARNING, logger="ecashbot.nostr")
    try:
        relay = local_relay.url
        cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [relay], bot_keys)
        async with nostr_bot(cfg) as daemon, await NostrUser.create([relay]) as alice:
            key = daemon.pipeline.lock_pubkey
            assert key is not None
            me = bot_keys.public_key().to_hex()
            to_bob = await alice_wallet.send_locked(50, await bob_wallet.lock_pubkey(), version=3)
            to_bot = await alice_wallet.send_locked(60, key, version=3)
            zaps = {
                "another key": nutzap_event(alice.keys, me, mint.url, proofs_json(to_bob)),
                "untrusted mint": nutzap_event(alice.keys, me, untrusted, proofs_json(to_bot)),
                "malformed": nutzap_event(alice.keys, me, mint.url, ["{broken"]),
            }
            for zap in zaps.values():
                await alice.publish_raw(zap)
            await log_lines(caplog, *(z.id().to_hex()[:12] for z in zaps.values()))
            for zap in zaps.values():
                assert await journalled(daemon, zap) == []
            await audit_ok(daemon)
    finally:
        await runner.cleanup()
    assert hits == []
    # each stays spendable by its owner: Bob his, Alice hers (by paying it to the bot
    # as it should have been sent: from the trusted mint)
    assert await bob_wallet.receive(to_bob) == 50
    assert await alice_wallet.token_state(to_bot) == "unspent"


@in_session_loop
async def test_a_nutzap_cut_short_by_a_crash_goes_back_to_its_sender_by_dm(
    local_relay: LocalRelay, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    """A crash between the swap and the books: recovery refunds the nutzap by NIP-17 DM."""
    bot_keys = Keys.generate()
    alice_wallet = await UserWallet.create(mint.url, tmp_path / "alice")
    await alice_wallet.fund(500)
    relay = local_relay.url
    cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [relay], bot_keys)
    async with nostr_bot(cfg) as daemon, await NostrUser.create([relay]) as alice:
        key = daemon.pipeline.lock_pubkey
        assert key is not None and daemon.nostr is not None
        token = await alice_wallet.send_locked(80, key, version=3)
        incoming = await daemon.wallet.inspect(parse_token(token))
        # what take_tip does up to the crash: the swap journalled and done, no settle
        await daemon.wallet.redeem(incoming, "nutzap-crashed", "nutzap", f"nip17:{alice.pubkey}")
        [rec] = await daemon.pipeline.recover(min_age_s=0)
        assert rec.id == "nutzap-crashed" and rec.status == "refunded"
        await daemon.nostr.deliver_recovered(rec)
        got: list[str] = []

        def done(dm: object) -> bool:
            got.append(getattr(dm, "text", ""))
            return any(t.startswith("cashu") for t in got) and len(got) >= 2

        await alice.dms_until(done, 20)
        assert any("your nutzap was interrupted" in t and "80 sat" in t for t in got), got
        [change] = [t for t in got if t.startswith("cashu")]
        assert await alice_wallet.receive(change) == 80
        await audit_ok(daemon)


@in_session_loop
async def test_nutzaps_count_against_their_senders_rate_limit(
    local_relay: LocalRelay,
    mint: MintProcess,
    emulator_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood of nutzaps can't become a flood of mint calls: one sender, one bucket."""
    bot_keys = Keys.generate()
    alice_wallet = await UserWallet.create(mint.url, tmp_path / "alice")
    await alice_wallet.fund(500)
    caplog.set_level(logging.WARNING, logger="ecashbot.nostr")
    relay = local_relay.url
    cfg = nostr_config(
        tmp_path / "bot",
        mint,
        emulator_url,
        [relay],
        bot_keys,
        rate_limit={"requests_capacity": 1, "requests_per_s": 0.001},
    )
    async with nostr_bot(cfg) as daemon, await NostrUser.create([relay]) as alice:
        key = daemon.pipeline.lock_pubkey
        assert key is not None
        me = bot_keys.public_key().to_hex()
        tokens = [await alice_wallet.send_locked(30, key, version=3) for _ in range(2)]
        first = nutzap_event(alice.keys, me, mint.url, proofs_json(tokens[0]))
        await alice.publish_raw(first)
        await taken(daemon, first)
        second = nutzap_event(alice.keys, me, mint.url, proofs_json(tokens[1]))
        await alice.publish_raw(second)
        [line] = await log_lines(caplog, second.id().to_hex()[:12], timeout_s=10)
        assert "too many requests" in line
        assert await journalled(daemon, second) == []
        # not refused for good: its claims are released for a later look back
        assert await daemon.pipeline.state.claim(f"nostr:{second.id().to_hex()}", 60)
        await audit_ok(daemon)
    assert await alice_wallet.token_state(tokens[0]) == "spent"
    assert await alice_wallet.token_state(tokens[1]) == "unspent"


@in_session_loop
async def test_a_nutzap_the_mint_could_not_take_is_taken_after_a_restart(
    local_relay: LocalRelay,
    mint: MintProcess,
    emulator_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mint down while a nutzap comes in: not refused for good; the restarted bot's
    look-back takes it in (once)."""
    bot_keys = Keys.generate()
    alice_wallet = await UserWallet.create(mint.url, tmp_path / "alice")
    await alice_wallet.fund(500)
    caplog.set_level(logging.WARNING, logger="ecashbot.nostr")
    mint_down = True

    async def swaps_fail(request: web.Request, body: bytes) -> web.StreamResponse | None:
        if mint_down and request.path == "/v1/swap":
            return web.json_response({"detail": "down for a moment"}, status=503)
        return None

    relay = local_relay.url
    async with MintProxy(mint.url, before=swaps_fail) as proxy:
        cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [relay], bot_keys)
        cfg = cfg.model_copy(update={"mints": [proxy.url]})
        async with nostr_bot(cfg) as daemon, await NostrUser.create([relay]) as alice:
            key = daemon.pipeline.lock_pubkey
            assert key is not None
            token = await alice_wallet.send_locked(70, key, version=3)
            me = bot_keys.public_key().to_hex()
            zap = nutzap_event(alice.keys, me, proxy.url, proofs_json(token))
            await alice.publish_raw(zap)
            await log_lines(caplog, f"nutzap {zap.id().to_hex()[:12]} not taken", timeout_s=30)
        assert await alice_wallet.token_state(token) == "unspent"
        mint_down = False
        async with nostr_bot(cfg) as daemon:
            rec = await taken(daemon, zap)
            assert (rec.paid_sat, rec.charged_sat, rec.change_sat) == (70, 70, 0)
            statuses = sorted(r.status for r in await journalled(daemon, zap))
            assert statuses == ["failed", "settled"], statuses
            await audit_ok(daemon)
    assert await alice_wallet.token_state(token) == "spent"
