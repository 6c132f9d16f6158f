"""The fast path: the model starts while the swap runs, and nothing leaves before it clears.

Against a real nutshell mint and the real google-genai SDK talking to the emulator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from bot.llm.emulator import Emulator, start_emulator
from tests.bot_harness import ask, bot, bot_config
from tests.support.mint import MintProcess
from tests.support.user_wallet import UserWallet

pytestmark = pytest.mark.asyncio(loop_scope="session")

OPERATOR = "fast-path-operator-token"


@pytest_asyncio.fixture(loop_scope="session")
async def slow_emulator() -> AsyncIterator[tuple[str, Emulator]]:
    # the first token after 300 ms, then a long answer: the swap is done long before
    emu = Emulator(ttft_ms=300, chunk_delay_ms=20, words_per_chunk=4, default_words=400)
    running = await start_emulator(emu)
    try:
        yield running.url, emu
    finally:
        await running.stop()


async def stats(url: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{url}/v1/stats", headers={"Authorization": f"Bearer {OPERATOR}"}) as r,
    ):
        assert r.status == 200
        data: dict[str, object] = await r.json()
        return data


async def spent_token(mint: MintProcess, tmp_path: Path, amount: int) -> tuple[str, UserWallet]:
    """A token whose proofs its owner has already spent (swapped into another wallet)."""
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(amount * 2)
    token = await user.send_token(amount)
    other = await UserWallet.create(mint.url, tmp_path / "other")
    await other.receive(token)
    assert await user.token_state(token) == "spent"
    return token, user


async def wait_for(predicate: object, within_s: float) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


async def test_overlap_with_a_spent_token_cancels_the_model_and_charges_nothing(
    mint: MintProcess, slow_emulator: tuple[str, Emulator], tmp_path: Path
) -> None:
    url_emu, emu = slow_emulator
    token, _ = await spent_token(mint, tmp_path, 300)
    cfg = bot_config(
        tmp_path / "bot",
        [mint.url],
        url_emu,
        fast_path={"overlap": True},
        operator={"token": OPERATOR},
    )
    calls_before, cut_before = len(emu.requests), emu.streams_cut
    async with bot(cfg) as daemon:
        url = daemon.http_url or ""
        status, _, body = await ask(url, "tell me a long story", token, stream=True)
        assert status == 400, body
        assert body["error"]["code"] == "token_spent"
        # the model was asked at once, with the swap, and hung up on when it failed
        assert len(emu.requests) == calls_before + 1
        assert await wait_for(lambda: emu.streams_cut == cut_before + 1, 10)
        lifetime = (await stats(url))["lifetime"]
        assert isinstance(lifetime, dict)
        assert lifetime["charged_sat"] == 0 and lifetime["requests"] == 0
        assert lifetime["failed_payments"] == 1
        assert lifetime["wasted_tokens"] > 0
        assert sum((await daemon.wallet.balance_sat()).values()) == 0


async def test_without_overlap_a_spent_token_never_reaches_the_model(
    mint: MintProcess, slow_emulator: tuple[str, Emulator], tmp_path: Path
) -> None:
    url_emu, emu = slow_emulator
    token, _ = await spent_token(mint, tmp_path, 300)
    cfg = bot_config(tmp_path / "bot", [mint.url], url_emu, fast_path={"overlap": False})
    calls_before = len(emu.requests)
    async with bot(cfg) as daemon:
        status, _, body = await ask(daemon.http_url or "", "a story", token, stream=True)
    assert status == 400 and body["error"]["code"] == "token_spent"
    assert len(emu.requests) == calls_before


async def test_overlap_answers_in_full_once_the_swap_clears(
    mint: MintProcess, slow_emulator: tuple[str, Emulator], tmp_path: Path
) -> None:
    url_emu, _ = slow_emulator
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(2000)
    cfg = bot_config(
        tmp_path / "bot",
        [mint.url],
        url_emu,
        fast_path={"overlap": True},
        operator={"token": OPERATOR},
    )
    async with bot(cfg) as daemon:
        url = daemon.http_url or ""
        for stream in (True, False):
            token = await user.send_token(500)
            status, _, got = await ask(
                url, "why is the sky blue? [emulator:words=60]", token, stream=stream
            )
            assert status == 200, got
            if stream:
                text = "".join(
                    e["choices"][0]["delta"].get("content", "")
                    for e in got
                    if isinstance(e, dict) and e.get("choices")
                )
                payment = next(e["payment"] for e in got if isinstance(e, dict) and "payment" in e)
            else:
                text = got["choices"][0]["message"]["content"]
                payment = got["payment"]
            assert text.startswith("Emulated answer to: why is the sky blue?")
            assert len(text.split()) >= 50  # the whole answer, held and then released
            assert payment["charged_sat"] + payment["change_sat"] + payment["fee_sat"] == 500
            assert await user.token_state(token) == "spent"
        lifetime = (await stats(url))["lifetime"]
        assert isinstance(lifetime, dict)
        assert lifetime["requests"] == 2 and lifetime["failed_payments"] == 0
        assert lifetime["wasted_tokens"] == 0
