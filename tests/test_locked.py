"""Tokens locked to the bot (NUT-11 P2PK + NUT-12 DLEQ): answered with no mint call.

Against a real nutshell mint (behind a recording proxy: its request log), the real
google-genai SDK and the emulator. The payer's wallet is nutshell's own (UserWallet),
which makes the locks; the bot's signature on them is checked by the mint at the sweep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from bot.audit import _audit
from bot.daemon import Daemon, sweep_once
from bot.llm.emulator import Emulator
from mint_client.tokens import Token, encode_token, parse_token
from tests.bot_harness import ask, bot, bot_config
from tests.support.mint import MintProcess
from tests.support.mint_proxy import MintProxy
from tests.support.user_wallet import UserWallet

pytestmark = pytest.mark.asyncio(loop_scope="session")


class MintLog:
    """The mint's request log, as seen by a proxy in front of it."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.swap_bodies: list[dict[str, object]] = []

    async def before(self, request: web.Request, body: bytes) -> web.StreamResponse | None:
        self.paths.append(request.path)
        if request.path == "/v1/swap":
            self.swap_bodies.append(json.loads(body))
        return None

    def since(self, n: int) -> list[str]:
        return self.paths[n:]


@pytest_asyncio.fixture(loop_scope="session")
async def fee_proxy(fee_mint: MintProcess) -> AsyncIterator[tuple[MintProxy, MintLog]]:
    log = MintLog()
    async with MintProxy(fee_mint.url, before=log.before) as proxy:
        yield proxy, log


def via(token: str, mint_url: str) -> str:
    """The same proofs, naming ``mint_url`` (the proxy for the bot, the mint for the user)."""
    return encode_token(dataclasses.replace(parse_token(token), mint=mint_url))


def input_fee(token: str, ppk: int) -> int:
    return -(-len(parse_token(token).proofs) * ppk // 1000)


def payment_of(body: object) -> dict[str, object]:
    assert isinstance(body, dict)
    payment = body["payment"]
    assert isinstance(payment, dict)
    return payment


async def funded_bot_stock(daemon: Daemon, user: UserWallet, amount: int) -> None:
    """The operator funds the stock the bot makes locked payments' change from."""
    token = await user.send_token(amount)
    await daemon.wallet.receive(parse_token(via(token, daemon.cfg.mints[0])))


async def audit_ok(daemon: Daemon) -> None:
    report = await _audit(daemon.wallet.store, daemon.wallet.mints)
    assert report.ok, report.table()


async def test_a_locked_token_is_answered_with_no_mint_call_and_its_replay_is_refused(
    fee_mint: MintProcess,
    fee_proxy: tuple[MintProxy, MintLog],
    emulator: tuple[Emulator, str],
    tmp_path: Path,
) -> None:
    proxy, mint_log = fee_proxy
    user = await UserWallet.create(fee_mint.url, tmp_path / "user")
    await user.fund(3000)
    cfg = bot_config(tmp_path / "bot", [proxy.url], emulator[1])
    async with bot(cfg) as daemon:
        url = daemon.http_url or ""
        key = daemon.pipeline.lock_pubkey
        assert key is not None and key.startswith("02")
        await funded_bot_stock(daemon, user, 1000)
        stock_before = sum((await daemon.wallet.balance_sat()).values())
        mine = await user.send_locked(300, key)
        locked = via(mine, proxy.url)
        assert await user.token_state(mine) == "unspent"

        seen = len(mint_log.paths)
        status, headers, body = await ask(url, "why is the sky blue?", locked)
        assert status == 200, body
        # the mint never heard of this payment: no swap, no state check, nothing
        assert mint_log.since(seen) == []
        payment = payment_of(body)
        change = headers.get("X-Cashu")
        assert change and change.startswith("cashuB")
        assert payment["paid_sat"] == 300
        assert payment["paid_sat"] == (
            payment["charged_sat"] + payment["change_sat"] + payment["fee_sat"]
        )
        assert payment["fee_sat"] == 1  # 3 proofs at 100 ppk, paid when the bot sweeps

        # a replay, and a re-mix of the same proofs into another token, are refused
        status, _, body = await ask(url, "again", locked)
        assert status == 400 and body["error"]["code"] == "token_spent", body
        proofs = parse_token(locked).proofs
        assert len(proofs) > 1
        part = encode_token(Token(mint=proxy.url, unit="sat", proofs=proofs[:1]))
        status, _, body = await ask(url, "again", part)
        assert status == 400 and body["error"]["code"] in ("token_spent", "underpaid"), body
        assert "/v1/swap" not in mint_log.since(seen)

        # the change is real ecash, from the bot's stock
        got = await user.receive(via(change, fee_mint.url))
        assert got == payment["change_sat"] - input_fee(change, 100)
        # still nothing at the mint: the locked proofs wait for the sweep
        assert await user.token_state(mine) == "unspent"
        assert (await daemon.wallet.store.balances("locked")) == {proxy.url: 300}
        await audit_ok(daemon)

        # the sweep swaps them with the bot's signature, in one batch
        n = len(mint_log.paths)
        await sweep_once(daemon)
        assert mint_log.since(n).count("/v1/swap") == 1
        witness = mint_log.swap_bodies[-1]["inputs"]
        assert isinstance(witness, list) and all("witness" in p for p in witness)
        assert await user.token_state(mine) == "spent"
        assert (await daemon.wallet.store.balances("locked")) == {}
        # the stock got back what the payment brought, less its fee, and kept the charge
        stock_after = sum((await daemon.wallet.balance_sat()).values())
        assert stock_after == stock_before - payment["change_sat"] + 300 - 1
        await audit_ok(daemon)
        metrics = daemon.pipeline.metrics
        assert metrics.locked_payments.labels("accepted")._value.get() == 1


async def test_locked_tokens_the_bot_cannot_take_are_refused_and_stay_with_their_owner(
    mint: MintProcess, emulator: tuple[Emulator, str], tmp_path: Path
) -> None:
    alice = await UserWallet.create(mint.url, tmp_path / "alice")
    bob = await UserWallet.create(mint.url, tmp_path / "bob")
    await alice.fund(2000)
    log = MintLog()
    async with MintProxy(mint.url, before=log.before) as proxy:
        cfg = bot_config(tmp_path / "bot", [proxy.url], emulator[1])
        async with bot(cfg) as daemon:
            url = daemon.http_url or ""
            key = daemon.pipeline.lock_pubkey
            assert key is not None
            await funded_bot_stock(daemon, alice, 600)
            made = {
                "another key": await alice.send_locked(200, await bob.lock_pubkey()),
                "refund too soon": await alice.send_locked(
                    200, key, locktime_s=3, refund_pubkeys=[await alice.lock_pubkey()]
                ),
                "no DLEQ (refundable)": await alice.send_locked(
                    200,
                    key,
                    include_dleq=False,
                    locktime_s=7200,
                    refund_pubkeys=[await alice.lock_pubkey()],
                ),
                "multisig": await alice.send_locked(
                    200, key, n_sigs=2, extra_pubkeys=[await bob.lock_pubkey()]
                ),
            }
            for why, token in made.items():
                seen = len(log.paths)
                status, _, body = await ask(url, "a question", via(token, proxy.url))
                assert status == 400, (why, body)
                assert body["error"]["code"] == "locked_token", (why, body)
                assert "/v1/swap" not in log.since(seen), why
                assert await alice.token_state(token) == "unspent", why
            assert (await daemon.wallet.store.balances("locked")) == {}
            await audit_ok(daemon)
    # and each owner can still spend theirs: Bob his, Alice hers by her refund key
    assert await bob.receive(made["another key"]) == 200
    await asyncio.sleep(3.5)
    assert await alice.receive(made["refund too soon"]) == 200


async def test_a_locked_token_is_swapped_when_the_stock_cannot_make_its_change(
    mint: MintProcess, emulator: tuple[Emulator, str], tmp_path: Path
) -> None:
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(1000)
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator[1])
    async with bot(cfg) as daemon:
        key = daemon.pipeline.lock_pubkey
        assert key is not None
        locked = await user.send_locked(300, key)
        status, headers, body = await ask(daemon.http_url or "", "hello", locked)
        assert status == 200, body
        # swapped at once (the bot signed it), change made from its own outputs
        assert await user.token_state(locked) == "spent"
        assert daemon.pipeline.metrics.locked_payments.labels("swapped")._value.get() == 1
        change = headers["X-Cashu"]
        assert await user.receive(change) == payment_of(body)["change_sat"]
        # locked to the bot without DLEQ and with no refund path: refusing it would
        # strand the money (nobody else can spend it), so the mint checks it in a swap
        await funded_bot_stock(daemon, user, 400)
        bare = await user.send_locked(200, key, include_dleq=False)
        status, headers, body = await ask(daemon.http_url or "", "hello", bare)
        assert status == 200, body
        assert await user.token_state(bare) == "spent"
        assert await user.receive(headers["X-Cashu"]) == payment_of(body)["change_sat"]
        assert daemon.pipeline.metrics.locked_payments.labels("accepted")._value.get() == 0
        await audit_ok(daemon)


async def test_an_interrupted_locked_payment_is_refunded_from_the_stock(
    mint: MintProcess, emulator: tuple[Emulator, str], tmp_path: Path
) -> None:
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(1500)
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator[1])
    async with bot(cfg) as daemon:
        wallet = daemon.wallet
        key = daemon.pipeline.lock_pubkey
        assert key is not None
        await funded_bot_stock(daemon, user, 700)
        incoming = await wallet.inspect(parse_token(await user.send_locked(250, key)))
        assert incoming.locked
        # taken, then the process "dies" before the answer: recovery refunds it
        assert await wallet.accept_locked(incoming, "interrupted", "http")
        report = await wallet.recover(busy=set(), min_age_s=0)
        assert [r.id for r in report.refunded] == ["interrupted"]
        rec = await wallet.store.payment("interrupted")
        assert rec is not None and rec.status == "refunded" and rec.change_token
        assert rec.change_sat == 250 and rec.charged_sat == 0
        assert await user.receive(rec.change_token) == 250
        await audit_ok(daemon)
        await sweep_once(daemon)
        await audit_ok(daemon)
        assert (await wallet.store.balances("locked")) == {}


async def test_the_operator_funds_the_stock_with_wallet_receive(
    mint: MintProcess, emulator: tuple[Emulator, str], tmp_path: Path
) -> None:
    from tests.test_lightning import cli

    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(1500)
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator[1])
    cfg.wallet.path.mkdir(parents=True)
    code, out, err = await cli(cfg, "receive", await user.send_token(500))
    assert code == 0, err
    assert "received 500 sat" in out and "500 sat held" in out
    code, _, err = await cli(cfg, "receive", "cashuBnotatoken")
    assert code == 1 and "ecashbot wallet receive:" in err
    async with bot(cfg) as daemon:
        # the funding is stock: a locked payment is taken with no mint call at once
        key = daemon.pipeline.lock_pubkey
        assert key is not None
        status, _, body = await ask(daemon.http_url or "", "hi", await user.send_locked(200, key))
        assert status == 200, body
        assert daemon.pipeline.metrics.locked_payments.labels("accepted")._value.get() == 1
        report = await _audit(daemon.wallet.store, daemon.wallet.mints)
        assert report.ok and report.kept_sat == 500 + payment_of(body)["charged_sat"]
