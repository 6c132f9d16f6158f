"""Shared state seen from outside: rate limits, the daily budget, Redis outages and the
statistics, through the HTTP API of a bot on a real redis-server and a real mint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.bot_harness import ask, bot, bot_config
from tests.support.mint import MintProcess
from tests.support.redis_server import RedisServer
from tests.support.user_wallet import UserWallet

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_100_concurrent_requests_against_a_bucket_of_10(
    mint: MintProcess, emulator_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    cfg = bot_config(
        tmp_path / "bot",
        [mint.url],
        emulator_url,
        redis={"url": redis_server.url},
        rate_limit={"requests_capacity": 10, "requests_per_s": 0.001},
    )
    async with bot(cfg) as daemon:
        results = await asyncio.gather(
            *[ask(daemon.http_url or "", "hi", None) for _ in range(100)]
        )
    statuses = [status for status, _, _ in results]
    assert statuses.count(402) == 10  # let through (to the payment request)
    assert statuses.count(429) == 90
    limited = next(h for s, h, _ in results if s == 429)
    assert int(limited["Retry-After"]) >= 1


async def test_rate_limited_payer_keeps_the_token(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(500)
    cfg = bot_config(
        tmp_path / "bot",
        [mint.url],
        emulator_url,
        rate_limit={"requests_capacity": 1, "requests_per_s": 0.001},
    )
    async with bot(cfg) as daemon:
        first = await user.send_token(100)
        second = await user.send_token(100)
        status, _, _ = await ask(daemon.http_url or "", "one", first)
        assert status == 200
        status, headers, body = await ask(daemon.http_url or "", "two", second)
        assert status == 429 and "Retry-After" in headers
        assert body["error"]["token_untouched"] is True
        assert await user.token_state(second) == "unspent"


async def test_daily_budget_is_never_exceeded_by_50_concurrent_requests(
    mint: MintProcess, emulator_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(50 * 64)
    tokens = await user.send_tokens(64, 50)
    # each request reserves its input estimate + its cap of 100 output tokens
    daily = 2_000
    cfg = bot_config(
        tmp_path / "bot",
        [mint.url],
        emulator_url,
        redis={"url": redis_server.url},
        budget={"daily_tokens": daily, "safety_buffer": 100},
    )
    async with bot(cfg) as daemon:
        results = await asyncio.gather(
            *[ask(daemon.http_url or "", f"q{i}", t, max_tokens=100) for i, t in enumerate(tokens)]
        )
        answered = [(t, b) for t, (s, _, b) in zip(tokens, results, strict=True) if s == 200]
        refused = [(t, b) for t, (s, _, b) in zip(tokens, results, strict=True) if s == 503]
        assert len(answered) + len(refused) == 50
        assert answered and refused
        used = sum(b["usage"]["total_tokens"] for _, b in answered)
        assert used <= daily - 100
        left = await daemon.state.budget_left("gemini-2.5-flash")
        assert left["used"] == used
        for t, b in refused:
            assert "budget" in b["error"]["message"]
            assert await user.token_state(t) == "unspent"


async def test_redis_down_stops_paid_work_before_redeeming_and_resumes(
    mint: MintProcess, emulator_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(1000)
    cfg = bot_config(tmp_path / "bot", [mint.url], emulator_url, redis={"url": redis_server.url})
    async with bot(cfg) as daemon:
        url = daemon.http_url or ""
        ok = await user.send_token(100)
        assert (await ask(url, "before", ok))[0] == 200
        await redis_server.kill()
        during = [await user.send_token(100) for _ in range(3)]
        for t in during:
            status, _, body = await ask(url, "while redis is down", t)
            assert status == 503, body
            assert body["error"]["token_untouched"] is True
            assert await user.token_state(t) == "unspent"
        await redis_server.restart()
        status, _, body = await ask(url, "after", during[0])
        assert status == 200, body
        assert await user.token_state(during[0]) == "spent"


async def test_statistics_match_a_scripted_run(
    mint: MintProcess, emulator_url: str, tmp_path: Path
) -> None:
    user = await UserWallet.create(mint.url, tmp_path / "user")
    await user.fund(2000)
    # prices high enough that every answer costs whole sats
    models = {
        "gemini-2.5-flash": {"input_msat_per_1k": 20_000, "output_msat_per_1k": 100_000},
        "gemini-2.5-flash-lite": {
            "input_msat_per_1k": 10_000,
            "output_msat_per_1k": 50_000,
            "request_msat": 1_500,
        },
    }
    cfg = bot_config(
        tmp_path / "bot", [mint.url], emulator_url, operator={"token": "s3cret"}, models=models
    )
    payments: list[dict[str, Any]] = []
    usages: list[dict[str, Any]] = []
    async with bot(cfg) as daemon:
        url = daemon.http_url or ""
        script = [
            ("one [emulator:words=50]", None, False),
            ("two [emulator:words=80]", "gemini-2.5-flash-lite", True),
            ("three [emulator:error=500]", None, False),
            ("four [emulator:words=10]", None, True),
        ]
        for question, model, stream in script:
            status, _, body = await ask(
                url, question, await user.send_token(150), model=model, stream=stream
            )
            assert status in (200, 502)
            final = body[-2] if stream else body
            payments.append(final["payment"])
            if not final["payment"]["refunded"]:
                usages.append(final["usage"])
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/v1/stats") as r:
                assert r.status == 401
            async with s.get(f"{url}/v1/stats", headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
                stats = await r.json()
    today = stats["today"]
    assert today["requests"] == 4
    assert today["charged_sat"] == sum(p["charged_sat"] for p in payments)
    assert today["change_sat"] == sum(p["change_sat"] for p in payments if not p["refunded"])
    assert today["refunds"] == 1
    assert today["refund_sat"] == sum(p["change_sat"] for p in payments if p["refunded"])
    assert today["fee_sat"] == sum(p["fee_sat"] for p in payments)
    assert today["input_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert today["output_tokens"] == sum(u["completion_tokens"] for u in usages)
    assert stats["lifetime"]["requests"] == 4
    assert stats["by_model"]["gemini-2.5-flash-lite"]["today"]["requests"] == 1
    assert stats["by_transport"]["http"]["today"]["requests"] == 4
    assert sum(h["requests"] for h in stats["hourly"]) == 4
    assert today["charged_sat"] > 0
    assert stats["wallet"]["held_sat"] == {mint.url: today["charged_sat"]}
