"""The bot's mint client against a real nutshell mint: DLEQ, lost swaps, change splits."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from bot.llm.emulator import Emulator
from mint_client.crypto import change_friendly_split, derive_secret, select_exact, split_amount
from mint_client.tokens import DLEQ, encode_token, parse_token
from tests.bot_harness import ask, bot, bot_config
from tests.support.mint import MintProcess
from tests.support.mint_proxy import MintProxy
from tests.support.user_wallet import UserWallet


@given(st.integers(0, 10**7))
def test_change_friendly_split_pays_any_change_exactly(amount: int) -> None:
    parts = change_friendly_split(amount)
    assert sum(parts) == amount
    assert all(p & (p - 1) == 0 for p in parts)  # powers of two: valid denominations
    for change in {
        c for c in (0, 1, amount // 3, amount // 2, amount - 1, amount) if 0 <= c <= amount
    }:
        chosen = select_exact(parts, change)
        assert chosen is not None
        assert sum(parts[i] for i in chosen) == change
        assert len(set(chosen)) == len(chosen)


def test_split_amount_is_binary() -> None:
    assert split_amount(13) == [1, 4, 8]
    assert split_amount(0) == []


def test_nut13_hmac_derivation_is_deterministic() -> None:
    seed = bytes(range(64))
    a = derive_secret(seed, "01" + "ab" * 32, 7)
    assert a == derive_secret(seed, "01" + "ab" * 32, 7)
    assert a != derive_secret(seed, "01" + "ab" * 32, 8)
    assert len(a[0]) == 64 and len(a[1]) == 32
    legacy = derive_secret(seed, "009a1f293253e41e", 0)
    assert legacy != a and len(legacy[1]) == 32


@pytest.fixture
def emulator_url(emulator: tuple[Emulator, str]) -> str:
    """These tests run against the emulator at its default pace, not the instant one."""
    return emulator[1]


async def test_a_forged_dleq_is_refused_and_the_token_kept(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(500)
    token = await user.send_token(200, version=4, include_dleq=True)
    t = parse_token(token)
    p0 = t.proofs[0]
    assert p0.dleq is not None
    bad = dataclasses.replace(p0, dleq=DLEQ(e=p0.dleq.s, s=p0.dleq.e, r=p0.dleq.r))
    forged = encode_token(dataclasses.replace(t, proofs=(bad, *t.proofs[1:])))
    async with bot(bot_config(tmp_path / "bot", [mint.url], emulator_url)) as daemon:
        status, _, body = await ask(daemon.http_url or "", "hi", forged)
    assert status == 400
    assert body["error"]["code"] == "invalid_dleq"
    assert await user.token_state(token) == "unspent"


async def test_a_swap_whose_answer_is_lost_is_restored(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    """The mint does the swap but its answer never reaches the bot: NUT-07 + NUT-09."""
    lost: list[int] = []

    async def lose_first_swap(
        request: web.Request, status: int, payload: bytes
    ) -> web.Response | None:
        if request.path == "/v1/swap" and not lost:
            lost.append(status)  # the mint answered; the bot never hears it
            return web.Response(status=504, text="gateway timeout")
        return None

    proxy = MintProxy(mint.url, after=lose_first_swap)
    await proxy.start()
    proxy_url = proxy.url
    try:
        user = await UserWallet.create(mint.url, tmp_path / "user")
        await user.fund(500)
        token = parse_token(await user.send_token(300, version=4))
        via_proxy = encode_token(dataclasses.replace(token, mint=proxy_url))
        cfg = bot_config(tmp_path / "bot", [proxy_url], emulator_url)
        async with bot(cfg) as daemon:
            status, _, body = await ask(daemon.http_url or "", "hello", via_proxy)
            assert lost == [200]
            assert status == 200, body
            payment = body["payment"]
            assert payment["charged_sat"] + payment["change_sat"] + payment["fee_sat"] == 300
            change = parse_token(payment["change"])
            receiver = await UserWallet.create(mint.url, tmp_path / "u2")
            assert (
                await receiver.receive(encode_token(dataclasses.replace(change, mint=mint.url)))
                == payment["change_sat"]
            )
            assert sum((await daemon.wallet.balance_sat()).values()) == payment["charged_sat"]
    finally:
        await proxy.stop()


#: what nutshell answers when its database lock times out under load (it did nothing)
MINT_LOCKED = {
    "detail": "failed to acquire database lock on proofs_pending after 5s and 1 trials (1)",
    "code": 0,
}


@contextlib.asynccontextmanager
async def busy_mint_proxy(mint_url: str, busy_swaps: int) -> AsyncIterator[tuple[str, list[str]]]:
    """A proxy to the real mint whose first ``busy_swaps`` swaps get the lock error."""
    seen: list[str] = []

    async def busy(request: web.Request, body: bytes) -> web.Response | None:
        if request.path != "/v1/swap":
            return None
        if seen.count("busy") < busy_swaps:
            seen.append("busy")
            return web.json_response(MINT_LOCKED, status=400)
        seen.append("forwarded")
        return None

    async with MintProxy(mint_url, before=busy) as proxy:
        yield proxy.url, seen


async def test_a_busy_mint_is_asked_again_with_the_same_outputs(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    async with busy_mint_proxy(mint.url, busy_swaps=2) as (proxy_url, seen):
        user = await UserWallet.create(mint.url, tmp_path / "user")
        await user.fund(500)
        token = await user.send_token(300, version=4)
        via_proxy = encode_token(dataclasses.replace(parse_token(token), mint=proxy_url))
        async with bot(bot_config(tmp_path / "bot", [proxy_url], emulator_url)) as daemon:
            status, _, body = await ask(daemon.http_url or "", "hello", via_proxy)
        assert status == 200, body
        assert seen == ["busy", "busy", "forwarded"]
        assert await user.token_state(token) == "spent"


async def test_a_mint_that_stays_busy_leaves_the_token_untouched(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    async with busy_mint_proxy(mint.url, busy_swaps=100) as (proxy_url, seen):
        user = await UserWallet.create(mint.url, tmp_path / "user")
        await user.fund(500)
        token = await user.send_token(300, version=4)
        via_proxy = encode_token(dataclasses.replace(parse_token(token), mint=proxy_url))
        async with bot(bot_config(tmp_path / "bot", [proxy_url], emulator_url)) as daemon:
            status, _, body = await ask(daemon.http_url or "", "hello", via_proxy)
            assert status == 503, body
            assert body["error"]["code"] == "mint_busy"
            assert body["error"]["token_untouched"] is True
            assert sum((await daemon.wallet.balance_sat()).values()) == 0
        assert seen == ["busy"] * 5
        assert await user.token_state(token) == "unspent"
