"""Asking and paying over Nostr DMs, end to end: a person's client (another key) DMs the
bot through real relays (nostr-sdk's LocalRelay and the independent nostr-relay), pays
with a token from a real mint, and gets the answer and the change as DMs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from nostr_sdk import Filter, Keys, Kind, ReqTarget

from bot.config import Config
from bot.daemon import Daemon
from bot.dm import payload_json
from mint_client.requests import PaymentPayload, decode_payment_request
from mint_client.tokens import encode_token, parse_token
from tests.bot_harness import bot, bot_config
from tests.support.mint import MintProcess
from tests.support.nostr_user import DMTimeoutError, NostrUser, ReceivedDM, make_forged_gift_wrap
from tests.support.relays import LocalRelay, LocalRelayFactory, NostrRelayProcess
from tests.support.user_wallet import UserWallet

pytestmark = pytest.mark.asyncio(loop_scope="session")

RECEIPT = re.compile(r"charged (\d+) sat, mint fee (\d+) sat, change (\d+) sat")


def nostr_config(
    tmp: Path, mint: MintProcess, emulator_url: str, relays: list[str], keys: Keys, **kw: Any
) -> Config:
    nostr = {
        "enabled": True,
        "nsec": keys.secret_key().to_bech32(),
        "relays": relays,
        "retry_interval_s": 0.5,
        "reconnect_s": 0.5,
        **kw.pop("nostr", {}),
    }
    return bot_config(tmp, [mint.url], emulator_url, nostr=nostr, **kw)


@contextlib.asynccontextmanager
async def nostr_bot(cfg: Config) -> AsyncIterator[Daemon]:
    async with bot(cfg) as daemon:
        assert daemon.nostr is not None
        yield daemon


async def answer_and_change(user: NostrUser, timeout_s: float = 20) -> tuple[str, str]:
    """Collect the bot's answer (with its receipt) and its change DM, in any order."""
    answer: str | None = None
    change: str | None = None
    parts: list[ReceivedDM] = []

    def done(dm: ReceivedDM) -> bool:
        nonlocal answer, change
        if dm.text.startswith("cashuB"):
            change = dm.text
        elif RECEIPT.search(dm.text) or dm.text.startswith("Sorry"):
            answer = dm.text
        parts.append(dm)
        return answer is not None and change is not None

    await user.dms_until(done, timeout_s)
    assert answer is not None and change is not None
    return answer, change


def accounted(answer: str, change: str, paid: int) -> tuple[int, int, int]:
    m = RECEIPT.search(answer)
    assert m, answer
    charged, fee, change_sat = (int(x) for x in m.groups())
    assert charged + fee + change_sat == paid
    assert parse_token(change).amount == change_sat
    return charged, fee, change_sat


@pytest.mark.parametrize("relay_kind", ["local", "independent"])
async def test_nip17_dm_with_a_cashub_token_gets_answer_and_change(
    relay_kind: str,
    local_relay: LocalRelay,
    independent_relay: NostrRelayProcess,
    mint: MintProcess,
    emulator_url: str,
    tmp_path: Path,
) -> None:
    relay = local_relay.url if relay_kind == "local" else independent_relay.url
    bot_keys = Keys.generate()
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(1000)
    token = await wallet.send_token(300, version=4)
    cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [relay], bot_keys)
    async with nostr_bot(cfg) as daemon, await NostrUser.create([relay]) as alice:
        sent = await alice.send_nip17(
            bot_keys.public_key().to_hex(), f"Why is the sky blue?\n{token}"
        )
        answer, change = await answer_and_change(alice)
        assert all(dm.scheme == "nip17" for dm in alice.received)
        # the answer and the change reply to the question: clients thread them
        assert all(("e", sent.event_id) in dm.tags for dm in alice.received), alice.received
        charged, _, change_sat = accounted(answer, change, 300)
        assert await wallet.token_state(token) == "spent"
        receiver = await UserWallet.create(mint.url, tmp_path / "r")
        assert await receiver.receive(change) == change_sat
        assert sum((await daemon.wallet.balance_sat()).values()) == charged


async def test_nip04_with_cashua_and_a_nut18_payload(
    local_relay: LocalRelay, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    bot_keys = Keys.generate()
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(1000)
    cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [local_relay.url], bot_keys)
    bot_hex = bot_keys.public_key().to_hex()
    async with nostr_bot(cfg), await NostrUser.create([local_relay.url]) as alice:
        # NIP-04 with an old cashuA token: answered over NIP-04
        token_a = await wallet.send_token(200, version=3)
        sent = await alice.send_nip04(bot_hex, f"{token_a} what is ecash?")
        answer, change = await answer_and_change(alice)
        assert {dm.scheme for dm in alice.received} == {"nip04"}
        assert all(("e", sent.event_id) in dm.tags for dm in alice.received), alice.received
        accounted(answer, change, 200)
        assert await wallet.token_state(token_a) == "spent"

        # NIP-17 with a NUT-18 payment payload, as a wallet paying our request sends it
        token_b = parse_token(await wallet.send_token(250, version=4))
        payload = PaymentPayload(
            id=None, memo="what is a mint?", mint=token_b.mint, unit="sat", proofs=token_b.proofs
        )
        await alice.send_nip17(bot_hex, payload_json(payload))
        answer, change = await answer_and_change(alice)
        accounted(answer, change, 250)
        assert await wallet.token_state(encode_token(token_b)) == "spent"


async def test_unpaid_question_then_paying_the_request_by_payload(
    local_relay: LocalRelay, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    bot_keys = Keys.generate()
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(2000)
    # no Lightning invoice: the test mint's FakeWallet would pay it by itself (test_lightning)
    cfg = nostr_config(
        tmp_path / "bot",
        mint,
        emulator_url,
        [local_relay.url],
        bot_keys,
        lightning={"invoices": False},
    )
    async with nostr_bot(cfg), await NostrUser.create([local_relay.url]) as alice:
        await alice.send_nip17(bot_keys.public_key().to_hex(), "how do lightning payments work?")
        reply = await alice.next_dm(20)
        assert "gemini-2.5-flash" in reply.text  # the price list
        assert mint.url in reply.text  # the accepted mints
        creq = next(w for w in reply.text.split() if w.startswith("creqA"))
        request = decode_payment_request(creq)
        assert request.amount and request.unit == "sat" and list(request.mints) == [mint.url]
        nostr = [t for t in request.transports if t.type == "nostr"]
        assert nostr and ("n", "17") in nostr[0].tags
        # the wallet pays the request exactly, with the request id and no memo
        token = parse_token(await wallet.send_token(request.amount, version=4))
        payload = PaymentPayload(
            id=request.id, memo=None, mint=token.mint, unit="sat", proofs=token.proofs
        )
        await alice.send_nip17(bot_keys.public_key().to_hex(), payload_json(payload))
        answer, change = await answer_and_change(alice)
        assert "lightning" in answer.lower()
        accounted(answer, change, request.amount)


async def test_same_dm_on_two_relays_is_answered_once_even_after_restart(
    local_relay_factory: LocalRelayFactory,
    mint: MintProcess,
    emulator_url: str,
    tmp_path: Path,
) -> None:
    r1 = await local_relay_factory()
    r2 = await local_relay_factory()
    relays = [r1.url, r2.url]
    bot_keys = Keys.generate()
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(1000)
    token = await wallet.send_token(300, version=4)
    cfg = nostr_config(tmp_path / "bot", mint, emulator_url, relays, bot_keys)
    async with await NostrUser.create(relays) as alice:
        async with nostr_bot(cfg) as daemon:
            await alice.send_nip17(bot_keys.public_key().to_hex(), f"once please {token}")
            answer, change = await answer_and_change(alice)
            charged, _, _ = accounted(answer, change, 300)
            with pytest.raises(DMTimeoutError):
                extra = await alice.next_dm(3)
                pytest.fail(f"answered twice: {extra.text[:80]}")
            held = sum((await daemon.wallet.balance_sat()).values())
            assert held == charged
        # a restarted bot sees the (backdated) wrap again, and must not answer it again
        async with nostr_bot(cfg) as daemon:
            with pytest.raises(DMTimeoutError):
                extra = await alice.next_dm(4)
                pytest.fail(f"answered again after restart: {extra.text[:80]}")
            assert sum((await daemon.wallet.balance_sat()).values()) == charged


async def test_refusals_over_dm(
    local_relay: LocalRelay, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    bot_keys = Keys.generate()
    bot_hex = bot_keys.public_key().to_hex()
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(2000)
    models = {"gemini-2.5-flash": {"input_msat_per_1k": 1000, "output_msat_per_1k": 100_000}}
    cfg = nostr_config(
        tmp_path / "bot",
        mint,
        emulator_url,
        [local_relay.url],
        bot_keys,
        models=models,
        nostr={"max_message_chars": 500},
    )
    async with nostr_bot(cfg) as daemon, await NostrUser.create([local_relay.url]) as alice:
        # untrusted mint: the token is refused untouched
        real = await wallet.send_token(100)
        evil = encode_token(dataclasses.replace(parse_token(real), mint="http://127.0.0.1:1"))
        await alice.send_nip17(bot_hex, f"hi {evil}")
        reply = await alice.next_dm(15)
        assert "not accepted" in reply.text and "not spent" in reply.text
        assert await wallet.token_state(real) == "unspent"

        # too little: says how much is needed; the token stays spendable
        small = await wallet.send_token(1)
        await alice.send_nip17(bot_hex, f"explain everything {small}")
        reply = await alice.next_dm(15)
        assert "too little" in reply.text and "creqA" in reply.text
        assert re.search(r"at least \d+ sat", reply.text)
        assert await wallet.token_state(small) == "unspent"

        # oversize question
        big = await wallet.send_token(100)
        await alice.send_nip17(bot_hex, "x" * 600 + " " + big)
        reply = await alice.next_dm(15)
        assert "limit is 500" in reply.text
        assert await wallet.token_state(big) == "unspent"

        # spent token
        spent = await wallet.send_token(100)
        other = await UserWallet.create(mint.url, tmp_path / "other")
        await other.receive(spent)
        await alice.send_nip17(bot_hex, f"hi {spent}")
        reply = await alice.next_dm(15)
        assert "spent" in reply.text

        # a forged seal (signed by Mallory, claiming to be Alice): dropped, never answered
        mallory = Keys.generate()
        forged_token = await wallet.send_token(100)
        wrap = make_forged_gift_wrap(
            mallory,
            alice.keys.public_key(),
            bot_keys.public_key(),
            f"pay from alice {forged_token}",
        )
        await alice.publish_raw(wrap)
        with pytest.raises(DMTimeoutError):
            await alice.next_dm(3)
        assert await wallet.token_state(forged_token) == "unspent"
        assert sum((await daemon.wallet.balance_sat()).values()) == 0


async def test_bot_reconnects_after_relay_restart_and_answers(
    local_relay_factory: LocalRelayFactory,
    mint: MintProcess,
    emulator_url: str,
    tmp_path: Path,
) -> None:
    relay = await local_relay_factory(persistent=True)
    bot_keys = Keys.generate()
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(1000)
    cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [relay.url], bot_keys)
    async with nostr_bot(cfg), await NostrUser.create([relay.url]) as alice:
        await alice.send_nip17(bot_keys.public_key().to_hex(), "/help")
        assert "Accepted mints" in (await alice.next_dm(15)).text
        await relay.stop()
        await asyncio.sleep(1)
        await relay.restart()
        await alice.wait_connected()
        token = await wallet.send_token(200)
        await alice.send_nip17(bot_keys.public_key().to_hex(), f"back again? {token}")
        answer, change = await answer_and_change(alice, timeout_s=30)
        accounted(answer, change, 200)


async def test_works_with_a_relay_that_requires_auth(
    local_relay_factory: LocalRelayFactory, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    """NIP-42: the relay serves DMs only to their authenticated receiver."""
    relay = await local_relay_factory(auth="both", auth_dm=True)
    bot_keys = Keys.generate()
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(500)
    token = await wallet.send_token(200)
    cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [relay.url], bot_keys)
    async with nostr_bot(cfg), await NostrUser.create([relay.url]) as alice:
        await alice.send_nip17(bot_keys.public_key().to_hex(), f"behind auth? {token}")
        answer, change = await answer_and_change(alice, timeout_s=30)
        accounted(answer, change, 200)


async def test_a_long_answer_comes_in_numbered_parts(
    local_relay: LocalRelay, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    """LocalRelay refuses events over 64 KiB: a ~50 KB answer must be split to arrive."""
    bot_keys = Keys.generate()
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(500)
    token = await wallet.send_token(300)
    cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [local_relay.url], bot_keys)
    async with nostr_bot(cfg), await NostrUser.create([local_relay.url]) as alice:
        await alice.send_nip17(
            bot_keys.public_key().to_hex(), f"a long one [emulator:words=12000] {token}"
        )
        parts: dict[str, str] = {}
        change: list[str] = []
        total = [0]

        def done(dm: ReceivedDM) -> bool:
            m = re.match(r"\((\d+)/(\d+)\) ", dm.text)
            if m:
                parts[m.group(1)] = dm.text[m.end() :]
                total[0] = int(m.group(2))
            elif dm.text.startswith("cashuB"):
                change.append(dm.text)
            return bool(change) and len(parts) == total[0] > 0

        await alice.dms_until(done, 40)
        assert len(parts) >= 2
        answer = "".join(parts[str(i)] for i in range(1, len(parts) + 1))
        assert len(answer.encode()) > 40_000
        accounted(answer, change[0], 300)


@pytest.mark.parametrize("locked", [True, False])
async def test_the_lock_key_is_published_as_a_nip61_kind_10019(
    locked: bool, local_relay: LocalRelay, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    """A wallet finds the bot's mints and P2PK key on its relays, signed by its Nostr key."""
    bot_keys = Keys.generate()
    cfg = nostr_config(
        tmp_path / "bot",
        mint,
        emulator_url,
        [local_relay.url],
        bot_keys,
        locked={"enabled": locked},
    )
    async with nostr_bot(cfg) as daemon, await NostrUser.create([local_relay.url]) as alice:
        events = await alice.client.fetch_events(
            ReqTarget.auto([Filter().kind(Kind(10019)).author(bot_keys.public_key())]),
            timeout=timedelta(seconds=3),
        )
        lock_key = daemon.pipeline.lock_pubkey
    if not locked:
        assert lock_key is None and events == []
        return
    assert lock_key is not None
    [event] = events
    assert event.verify()
    assert event.author().to_hex() == bot_keys.public_key().to_hex()
    assert event.content() == ""
    tags = [tag.to_vec() for tag in event.tags()]
    assert tags == [
        ["relay", local_relay.url],
        ["mint", mint.url, "sat"],
        ["pubkey", lock_key],
    ]
    # NIP-61: the lock key must not be the Nostr key
    assert re.fullmatch(r"0[23][0-9a-f]{64}", lock_key)
    assert lock_key[2:] != bot_keys.public_key().to_hex()


async def test_a_dm_paid_with_a_token_locked_to_the_bot_is_answered_with_no_mint_call(
    local_relay: LocalRelay, mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    bot_keys = Keys.generate()
    wallet = await UserWallet.create(mint.url, tmp_path / "wallet")
    await wallet.fund(1500)
    cfg = nostr_config(tmp_path / "bot", mint, emulator_url, [local_relay.url], bot_keys)
    async with nostr_bot(cfg) as daemon, await NostrUser.create([local_relay.url]) as alice:
        key = daemon.pipeline.lock_pubkey
        assert key is not None
        await daemon.wallet.receive(parse_token(await wallet.send_token(800)))
        token = await wallet.send_locked(300, key)
        await alice.send_nip17(bot_keys.public_key().to_hex(), f"Why is the sky blue?\n{token}")
        answer, change = await answer_and_change(alice)
        _, _, change_sat = accounted(answer, change, 300)
        # taken offline: the mint has not seen the locked proofs; the change is stock
        assert await wallet.token_state(token) == "unspent"
        assert daemon.pipeline.metrics.locked_payments.labels("accepted")._value.get() == 1
        receiver = await UserWallet.create(mint.url, tmp_path / "r")
        assert await receiver.receive(change) == change_sat
        assert (await daemon.wallet.store.balances("locked")) == {mint.url: 300}
