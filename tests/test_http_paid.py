"""Paid answers over HTTP, end to end: a real nutshell mint, the real google-genai SDK
against the Gemini emulator, and an independent user wallet (nutshell's own).

Each test reads like a user session: fund a wallet, pay, ask, check the answer, the
change and where every sat went.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from bot.daemon import Daemon
from bot.llm.emulator import Emulator
from mint_client.requests import decode_payment_request
from mint_client.tokens import encode_token, parse_token
from tests.bot_harness import ask, bot, bot_config
from tests.support.mint import MintProcess
from tests.support.ports import free_port
from tests.support.user_wallet import UserWallet

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def user(mint: MintProcess, tmp_path: Path) -> UserWallet:
    w = await UserWallet.create(mint.url, tmp_path / "user")
    await w.fund(5000)
    return w


@pytest_asyncio.fixture(loop_scope="session")
async def running_bot(
    mint: MintProcess, emulator: tuple[Emulator, str], tmp_path: Path
) -> AsyncIterator[Daemon]:
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator[1])
    async with bot(cfg) as daemon:
        yield daemon


def _accounted(payment: dict[str, Any], paid: int) -> None:
    assert payment["paid_sat"] == paid
    assert payment["charged_sat"] + payment["change_sat"] + payment["fee_sat"] == paid
    assert (
        payment["charged_sat"] * 1000 <= payment["cost_msat"] < (payment["charged_sat"] + 1) * 1000
    )


async def _receive(mint_url: str, tmp: Path, token: str) -> int:
    w = await UserWallet.create(mint_url, tmp)
    return await w.receive(token)


# -- acceptance 1: a cashuB token buys an answer, change + cost + fees = paid ---------


async def test_cashub_500_buys_an_answer_with_exact_change(
    running_bot: Daemon, user: UserWallet, mint: MintProcess, tmp_path: Path
) -> None:
    token = await user.send_token(500, version=4)
    assert token.startswith("cashuB")
    status, headers, body = await ask(running_bot.http_url or "", "Why is the sky blue?", token)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    payment = body["payment"]
    _accounted(payment, 500)
    assert payment["change_sat"] > 0
    assert headers["X-Cashu"] == payment["change"]
    change = parse_token(payment["change"])
    assert change.amount == payment["change_sat"]
    assert all(p.dleq is not None for p in change.proofs)
    assert body["usage"]["completion_tokens"] > 0
    # the user's proofs are spent; the change redeems at the mint
    assert await user.token_state(token) == "spent"
    assert await _receive(mint.url, tmp_path / "u2", payment["change"]) == payment["change_sat"]
    # the bot kept exactly what it charged
    assert sum((await running_bot.wallet.balance_sat()).values()) == payment["charged_sat"]


# -- acceptance 2: cashuA, streamed, and a mint with input fees ----------------------


async def test_cashua_streamed_at_a_fee_charging_mint(
    fee_mint: MintProcess, emulator: tuple[Emulator, str], tmp_path: Path
) -> None:
    user = await UserWallet.create(fee_mint.url, tmp_path / "user")
    await user.fund(2000)
    token = await user.send_token(300, version=3)
    assert token.startswith("cashuA")
    cfg = bot_config(tmp_path / "bot", [fee_mint.url], emulator[1])
    async with bot(cfg) as daemon:
        status, _, events = await ask(
            daemon.http_url or "", "Tell me about ecash [emulator:words=120]", token, stream=True
        )
        assert status == 200
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert len(chunks) > 3 and text
        final = chunks[-1]
        payment = final["payment"]
        _accounted(payment, 300)
        assert payment["fee_sat"] >= 1  # 100 ppk per input proof
        assert final["usage"]["completion_tokens"] > 0
        assert await user.token_state(token) == "spent"
        got = await _receive(fee_mint.url, tmp_path / "u2", payment["change"])
        # receiving costs the receiver the mint's input fee on the change proofs
        n = len(parse_token(payment["change"]).proofs)
        assert got == payment["change_sat"] - (-(-n * 100 // 1000))
        assert sum((await daemon.wallet.balance_sat()).values()) == payment["charged_sat"]


# -- acceptance 3: the payment caps the output ---------------------------------------


async def test_payment_caps_max_output_tokens(
    mint: MintProcess, emulator: tuple[Emulator, str], user: UserWallet, tmp_path: Path
) -> None:
    emu, url = emulator
    # 10 msat per output token: 20 sat (= 20_000 msat) buys at most 2000 output tokens,
    # minus the input; ask for a long answer so the cap binds
    models = {
        "gemini-pricey": {
            "input_msat_per_1k": 1000,
            "output_msat_per_1k": 10_000,
            "thinking_budget": 100_000,
        }
    }
    cfg = bot_config(
        tmp_path / "bot", [mint.url], url, models=models, default_model="gemini-pricey"
    )
    token = await user.send_token(20, version=4)
    question = "Write a long essay [emulator:words=5000]"
    async with bot(cfg) as daemon:
        before = len(emu.requests)
        status, _, body = await ask(daemon.http_url or "", question, token)
        assert status == 200, body
        sent = [r for r in emu.requests[before:] if r.model == "gemini-pricey"]
        assert len(sent) == 1
        cap = sent[0].body["generationConfig"]["maxOutputTokens"]
        est_in = -(-len(question.encode()) // 3) + 4
        n_affordable = (20_000 - est_in * 1000 // 1000) * 1000 // 10_000
        assert 0 < cap <= n_affordable
        # thinking is output too: its budget stays within the cap
        assert sent[0].thinking_budget is not None and sent[0].thinking_budget <= cap
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] <= cap
        payment = body["payment"]
        _accounted(payment, 20)
        assert payment["charged_sat"] <= 20


# -- acceptance 4: refused without cost ----------------------------------------------


async def test_no_token_gets_402_with_a_payment_request(
    running_bot: Daemon, mint: MintProcess
) -> None:
    status, headers, body = await ask(running_bot.http_url or "", "hello", None)
    assert status == 402
    creq = headers["X-Cashu"]
    assert creq.startswith("creqA")
    req = decode_payment_request(creq)
    assert req.amount == body["error"]["amount_sat"] > 0
    assert req.unit == "sat"
    assert list(req.mints) == [mint.url]
    assert "sat" in body["error"]["message"]


async def test_too_little_gets_402_and_the_token_stays_spendable(
    mint: MintProcess, emulator: tuple[Emulator, str], user: UserWallet, tmp_path: Path
) -> None:
    # 100 msat per output token: 1 sat buys 10 tokens, less than the 32 a payment must buy
    models = {"gemini-pricey": {"input_msat_per_1k": 1000, "output_msat_per_1k": 100_000}}
    cfg = bot_config(
        tmp_path / "bot", [mint.url], emulator[1], models=models, default_model="gemini-pricey"
    )
    token = await user.send_token(1, version=4)
    async with bot(cfg) as daemon:
        status, headers, body = await ask(daemon.http_url or "", "a question", token)
    assert status == 402, body
    assert body["error"]["code"] == "underpaid"
    assert body["error"]["amount_sat"] > 1
    assert decode_payment_request(headers["X-Cashu"]).amount == body["error"]["amount_sat"]
    assert await user.token_state(token) == "unspent"


async def test_spent_token_is_refused(running_bot: Daemon, user: UserWallet) -> None:
    token = await user.send_token(200, version=4)
    status, _, _ = await ask(running_bot.http_url or "", "first", token)
    assert status == 200
    status, _, body = await ask(running_bot.http_url or "", "second", token)
    assert status == 400
    assert body["error"]["code"] == "token_spent"
    assert "spent" in body["error"]["message"]


async def test_untrusted_mint_is_never_contacted(running_bot: Daemon, user: UserWallet) -> None:
    connections: list[int] = []

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(1)
        w.close()

    port = free_port()
    server = await asyncio.start_server(on_connect, "127.0.0.1", port)
    try:
        real = await user.send_token(200, version=4)
        evil = dataclasses.replace(parse_token(real), mint=f"http://127.0.0.1:{port}")
        status, _, body = await ask(running_bot.http_url or "", "hi", encode_token(evil))
        assert status == 400
        assert body["error"]["code"] == "untrusted_mint"
        assert body["error"]["token_untouched"] is True
        await asyncio.sleep(0.2)
        assert connections == []
        assert await user.token_state(real) == "unspent"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "garbage",
    ["cashuBnotbase64!!", "cashuAeyJ0b2tlbiI6IFtdfQ", "hello", "cashuB" + "A" * 400],
)
async def test_garbage_tokens_are_refused(running_bot: Daemon, garbage: str) -> None:
    status, _, body = await ask(running_bot.http_url or "", "hi", garbage)
    assert status == 400
    assert body["error"]["token_untouched"] is True


async def test_a_100kb_header_is_refused(running_bot: Daemon, user: UserWallet) -> None:
    token = await user.send_token(100, version=4)
    status, _, _ = await ask(running_bot.http_url or "", "hi", token + "A" * 100_000)
    assert status in (400, 413)
    assert await user.token_state(token) == "unspent"


async def test_unknown_model_costs_nothing(running_bot: Daemon, user: UserWallet) -> None:
    token = await user.send_token(100, version=4)
    status, _, body = await ask(running_bot.http_url or "", "hi", token, model="gpt-4o")
    assert status == 400
    assert "gemini-2.5-flash" in body["error"]["message"]
    assert await user.token_state(token) == "unspent"


# -- acceptance 5: upstream failures refund everything but the mint fee ---------------


@pytest.mark.parametrize(
    ("directive", "stream"),
    [
        ("[emulator:error=500]", False),
        ("[emulator:error=429]", False),
        ("[emulator:error=500]", True),
        ("[emulator:drop-after=2] [emulator:words=200]", True),
        ("[emulator:delay-ms=4000]", False),
        ("[emulator:block]", False),
    ],
)
async def test_upstream_failure_refunds(
    mint: MintProcess,
    emulator: tuple[Emulator, str],
    user: UserWallet,
    tmp_path: Path,
    directive: str,
    stream: bool,
) -> None:
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator[1], gemini={"timeout_s": 2})
    token = await user.send_token(200, version=4)
    async with bot(cfg) as daemon:
        status, headers, body = await ask(
            daemon.http_url or "", f"question {directive}", token, stream=stream
        )
        if stream:
            assert status == 200
            final = body[-2]
            assert "error" in final
            payment = final["payment"]
        else:
            assert status == 502, body
            payment = body["payment"]
            assert headers["X-Cashu"] == payment["change"]
        assert payment["refunded"] is True
        assert payment["charged_sat"] == 0
        assert payment["change_sat"] == 200 - payment["fee_sat"]
        assert await user.token_state(token) == "spent"
        assert await _receive(mint.url, tmp_path / "u2", payment["change"]) == payment["change_sat"]
        assert sum((await daemon.wallet.balance_sat()).values()) == 0


# -- acceptance 6: 50 concurrent paid requests ---------------------------------------


async def test_50_concurrent_paid_requests(
    mint: MintProcess, emulator: tuple[Emulator, str], tmp_path: Path
) -> None:
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(50 * 100)
    tokens = await user.send_tokens(100, 50)
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator[1])
    async with bot(cfg) as daemon:
        url = daemon.http_url or ""
        results = await asyncio.gather(
            *[
                ask(
                    url,
                    f"question {i}" + (" [emulator:error=500]" if i % 10 == 0 else ""),
                    t,
                    stream=i % 2 == 1,
                )
                for i, t in enumerate(tokens)
            ]
        )
        charged = 0
        change_ys: list[str] = []
        for status, _, body in results:
            payment = (body[-2] if isinstance(body, list) else body)["payment"]
            assert status in (200, 502)
            _accounted(payment, 100)
            charged += payment["charged_sat"]
            if payment["change"]:
                change_ys += [p.Y() for p in parse_token(payment["change"]).proofs]
        assert len(change_ys) == len(set(change_ys)), "a proof was handed out twice"
        held = {sp.proof.Y() for sp in await daemon.wallet.store.all_proofs() if sp.state == "held"}
        assert not held & set(change_ys)
        assert sum((await daemon.wallet.balance_sat()).values()) == charged
        for t in tokens:
            assert await user.token_state(t) == "spent"


# -- the official OpenAI client works unchanged with the header -----------------------


async def test_openai_client_with_x_cashu_header(
    running_bot: Daemon, user: UserWallet, mint: MintProcess, tmp_path: Path
) -> None:
    from openai import AsyncOpenAI

    token = await user.send_token(300, version=4)
    client = AsyncOpenAI(
        base_url=f"{running_bot.http_url}/v1",
        api_key="unused",
        default_headers={"X-Cashu": token},
    )
    raw = await client.chat.completions.with_raw_response.create(
        model="gemini-2.5-flash", messages=[{"role": "user", "content": "Why is the sky blue?"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    change = raw.headers.get("X-Cashu")
    assert change and change.startswith("cashuB")
    extra: Any = completion.model_extra
    assert extra["payment"]["change"] == change
    assert await _receive(mint.url, tmp_path / "u2", change) == extra["payment"]["change_sat"]

    token2 = await user.send_token(300, version=4)
    client2 = AsyncOpenAI(
        base_url=f"{running_bot.http_url}/v1",
        api_key="unused",
        default_headers={"X-Cashu": token2},
    )
    stream = await client2.chat.completions.create(
        model="gemini-2.5-flash",
        messages=[{"role": "user", "content": "Stream please"}],
        stream=True,
    )
    parts = []
    last: Any = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        last = chunk
    assert "".join(parts)
    assert last.model_extra["payment"]["change"].startswith("cashuB")


async def test_models_and_health(running_bot: Daemon, mint: MintProcess) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{running_bot.http_url}/v1/models") as r:
            assert r.status == 200
            models = await r.json()
        async with s.get(f"{running_bot.http_url}/health") as r:
            assert (await r.json())["status"] == "ok"
    ids = {m["id"]: m for m in models["data"]}
    assert ids["gemini-2.5-flash"]["pricing"]["output_per_1k_tokens"] == 2500
    assert models["payment"]["mints"] == [mint.url]
    assert models["payment"]["unit"] == "sat"
    assert models["object"] == "list" and all(m["object"] == "model" for m in models["data"])
    # where a wallet finds the key to lock its token to (NUT-11)
    lock_key = models["payment"]["p2pk_pubkey"]
    assert re.fullmatch(r"0[23][0-9a-f]{64}", lock_key)
    assert lock_key == running_bot.pipeline.lock_pubkey
    assert models["payment"]["p2pk_min_lock_s"] == running_bot.cfg.locked.min_lock_s


async def test_models_name_no_lock_key_when_locked_tokens_are_off(
    mint: MintProcess, emulator: tuple[Emulator, str], tmp_path: Path
) -> None:
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator[1], locked={"enabled": False})
    async with (
        bot(cfg) as daemon,
        aiohttp.ClientSession() as s,
        s.get(f"{daemon.http_url}/v1/models") as r,
    ):
        payment = (await r.json())["payment"]
    assert payment["p2pk_pubkey"] is None and payment["p2pk_min_lock_s"] is None
    assert payment["mints"] == [mint.url]
