"""The state contract, run against both implementations.

Every test gets a ``backend``: the embedded SQLite state (one file) or the Redis state
(a redis-server of the tests' own, one key prefix per test), with a fake clock shared by
every State it opens, so tests can cross midnight as two processes would.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import astuple, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from bot.state import (
    EmbeddedState,
    RedisState,
    Reservation,
    State,
    StateUnavailable,
    UsageEvent,
    open_state,
)
from tests.support.redis_server import RedisServer

COUNTERS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "thinking_tokens",
    "charged_sat",
    "change_sat",
    "fee_sat",
    "refunds",
    "refund_sat",
    "failed_payments",
    "wasted_tokens",
)
ZERO = dict.fromkeys(COUNTERS, 0)


def at(when: str) -> float:
    """Epoch seconds of a UTC time like ``2025-02-28T23:10``."""
    return datetime.fromisoformat(when + "+00:00").timestamp()


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, when: str) -> None:
        self.now = at(when)

    def __call__(self) -> float:
        return self.now

    def set(self, when: str) -> None:
        self.now = at(when)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    """Opens States on one store (a SQLite file, or a Redis prefix) with one fake clock."""

    kind: str
    clock: FakeClock
    path: Path
    redis_url: str
    prefix: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:8]}:")
    opened: list[State] = field(default_factory=list)

    def open(self) -> State:
        """Another State on the same store, as another process (or a restart) would be."""
        state: State
        if self.kind == "redis":
            state = RedisState(self.redis_url, prefix=self.prefix, clock=self.clock)
        else:
            state = EmbeddedState(self.path, clock=self.clock)
        self.opened.append(state)
        return state

    def peers(self) -> list[State]:
        """Two States on the same store, as two processes (or connections) would be."""
        return [self.open(), self.open()]

    async def sleep(self, seconds: float) -> None:
        """Let time pass: on the fake clock, and for real where Redis keeps the time."""
        self.clock.advance(seconds)
        if self.kind == "redis":
            await asyncio.sleep(seconds)

    async def stats_day_stored(self, day: str) -> bool:
        """Whether the store still holds a day's counters (looks under the contract)."""
        if self.kind == "redis":
            client = redis.asyncio.Redis.from_url(self.redis_url)
            try:
                return bool(await client.exists(f"{self.prefix}stats:day:{day}"))
            finally:
                await client.aclose()
        with sqlite3.connect(self.path) as db:
            row = db.execute(
                "SELECT count(*) FROM hashes WHERE hash=?", (f"stats:day:{day}",)
            ).fetchone()
            return bool(row[0])


@pytest.fixture(scope="module")
async def redis_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    """A redis-server for this module; tests keep apart by key prefix."""
    async with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["embedded", "redis"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[Backend]:
    """Each contract test runs on both implementations."""
    backend = Backend(
        kind=request.param,
        clock=FakeClock("2025-02-28T12:00"),
        path=tmp_path / "wallet" / "state.sqlite3",
        redis_url=redis_server.url,
    )
    try:
        yield backend
    finally:
        for state in backend.opened:
            await state.close()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own, to kill and restart."""
    async with RedisServer(tmp_path / "own-redis") as server:
        yield server


def usage(
    transport: str,
    model: str,
    *,
    inp: int = 0,
    out: int = 0,
    think: int = 0,
    charged: int = 0,
    change: int = 0,
    fee: int = 0,
    refund: int = 0,
) -> UsageEvent:
    return UsageEvent(
        transport=transport,
        model=model,
        input_tokens=inp,
        output_tokens=out,
        thinking_tokens=think,
        charged_sat=charged,
        change_sat=change,
        fee_sat=fee,
        refunded=refund > 0,
        refund_sat=refund,
    )


def totals(*events: UsageEvent) -> dict[str, int]:
    """What the statistics should say about these events."""
    sums = dict(ZERO)
    for e in events:
        for name, value in zip(
            COUNTERS,
            (
                0 if e.failed_payment else 1,
                *astuple(e)[2:8],
                int(e.refunded),
                e.refund_sat,
                int(e.failed_payment),
                e.wasted_tokens,
            ),
            strict=True,
        ):
            sums[name] += value
    return sums


# -- 1. replay claims ----------------------------------------------------------------------


async def test_the_first_claimer_wins(backend: Backend) -> None:
    state = backend.open()
    assert await state.claim("nostr:e1", 60)
    assert not await state.claim("nostr:e1", 60)
    assert await state.claim("token:e1", 60)  # another namespace, another key


async def test_200_concurrent_claims_of_one_key_have_one_winner(backend: Backend) -> None:
    peers = backend.peers()
    results = await asyncio.gather(
        *(peers[i % len(peers)].claim("token:ab", 60) for i in range(200))
    )
    assert results.count(True) == 1


async def test_a_claim_expires_after_its_ttl(backend: Backend) -> None:
    state = backend.open()
    assert await state.claim("nostr:e2", 1)
    assert not await state.claim("nostr:e2", 1)
    await backend.sleep(1.1)
    assert await state.claim("nostr:e2", 1)


async def test_an_extended_claim_outlives_its_first_ttl(backend: Backend) -> None:
    state = backend.open()
    assert await state.claim("token:slow", 1)
    await state.extend("token:slow", 60)
    await backend.sleep(1.1)
    assert not await state.claim("token:slow", 1)
    await state.extend("token:lapsed", 60)  # a lapsed or unknown claim is taken anew
    assert not await state.claim("token:lapsed", 1)


async def test_a_released_claim_can_be_claimed_again(backend: Backend) -> None:
    state = backend.open()
    assert await state.claim("token:refused", 60)
    await state.release("token:refused")
    assert await state.claim("token:refused", 60)
    await state.release("token:never-claimed")  # harmless


async def test_a_set_of_keys_is_claimed_all_or_nothing(backend: Backend) -> None:
    state = backend.open()
    assert await state.claim_all(["y:a", "y:b", "y:c"], 60)
    # any overlap with a held claim takes nothing: "y:d" stays free
    assert not await state.claim_all(["y:d", "y:b"], 60)
    assert await state.claim("y:d", 60)
    assert not await state.claim("y:a", 60)
    assert await state.claim_all([], 60)


async def test_concurrent_overlapping_claims_of_key_sets_have_one_winner(
    backend: Backend,
) -> None:
    peers = backend.peers()
    # 50 re-mixes of the same proofs: each set shares "y:shared" with every other
    results = await asyncio.gather(
        *(peers[i % len(peers)].claim_all([f"y:own{i}", "y:shared"], 60) for i in range(50))
    )
    assert results.count(True) == 1
    winner = results.index(True)
    assert not await peers[0].claim(f"y:own{winner}", 60)
    loser = (winner + 1) % 50
    assert await peers[0].claim(f"y:own{loser}", 60)  # a loser took nothing


async def test_key_sets_are_extended_and_released_together(backend: Backend) -> None:
    state = backend.open()
    assert await state.claim_all(["y:e", "y:f"], 1)
    await state.extend_all(["y:e", "y:f"], 60)
    await backend.sleep(1.1)
    assert not await state.claim_all(["y:e"], 1)
    assert not await state.claim_all(["y:f"], 1)
    await state.release_all(["y:e", "y:f"])
    assert await state.claim_all(["y:e", "y:f"], 60)


async def test_claims_survive_reopening(backend: Backend) -> None:
    state = backend.open()
    assert await state.claim("nostr:gift-wrap", 2 * 86400)
    await state.close()
    reopened = backend.open()
    assert not await reopened.claim("nostr:gift-wrap", 2 * 86400)


# -- 2. token buckets ----------------------------------------------------------------------


async def test_100_concurrent_takes_from_a_bucket_of_10_allow_10(backend: Backend) -> None:
    peers = backend.peers()
    take = [
        functools.partial(s.take, "payer:p1:requests", capacity=10, refill_per_s=1e-6)
        for s in peers
    ]
    results = await asyncio.gather(*(take[i % len(take)]() for i in range(100)))
    assert sum(r.allowed for r in results) == 10
    refused = [r for r in results if not r.allowed]
    assert all(r.remaining == 0 and r.retry_after_s > 1e5 for r in refused)


async def test_a_bucket_refills_with_time(backend: Backend) -> None:
    state = backend.open()
    take = functools.partial(state.take, "payer:p2:requests", capacity=10, refill_per_s=2.0)
    remaining = [(await take()).remaining for _ in range(10)]
    assert remaining == list(range(9, -1, -1))
    refused = await take()
    assert not refused.allowed and refused.remaining == 0
    assert refused.retry_after_s == pytest.approx(0.5)
    backend.clock.advance(0.5)
    again = await take()
    assert again.allowed and again.remaining == 0 and again.retry_after_s == 0
    backend.clock.advance(3600)  # refills up to the capacity, not beyond
    assert (await take()).remaining == 9


async def test_a_token_bucket_takes_amounts_and_a_refusal_takes_nothing(backend: Backend) -> None:
    state = backend.open()
    take = functools.partial(state.take, "payer:p3:tokens", capacity=1000, refill_per_s=10.0)
    first = await take(amount=700)
    assert first.allowed and first.remaining == 300
    too_much = await take(amount=400)
    assert not too_much.allowed and too_much.remaining == 300
    assert too_much.retry_after_s == pytest.approx(10.0)  # 100 missing at 10 per second
    rest = await take(amount=300)
    assert rest.allowed and rest.remaining == 0
    never = await take(amount=1001)
    assert not never.allowed and never.retry_after_s == math.inf


# -- 3. daily budget -----------------------------------------------------------------------


async def test_50_concurrent_reservations_stay_within_limit_minus_buffer(backend: Backend) -> None:
    peers = backend.peers()
    results = await asyncio.gather(
        *(
            peers[i % len(peers)].reserve_budget(
                "gemini-2.5-flash", 100, daily_limit=2000, model_limit=None, safety_buffer=500
            )
            for i in range(50)
        )
    )
    assert sum(r is not None for r in results) == 15
    left = await peers[0].budget_left("gemini-2.5-flash")
    assert left["used"] == 1500 and left["model_used"] == 1500
    assert left["left"] == 0 and left["daily_limit"] == 2000 and left["safety_buffer"] == 500


async def test_settling_replaces_a_reservation_by_the_real_use(backend: Backend) -> None:
    state = backend.open()
    reserve = functools.partial(
        state.reserve_budget, daily_limit=10_000, model_limit=None, safety_buffer=0
    )
    res = await reserve("gemini-2.5-flash", 1000)
    assert res == Reservation(date="2025-02-28", model="gemini-2.5-flash", tokens=1000)
    await state.settle_budget(res, 300)
    more = await reserve("gemini-2.5-flash", 500)
    assert more is not None
    await state.settle_budget(more, 800)  # an answer may use more than reserved
    left = await state.budget_left("gemini-2.5-flash")
    assert (left["used"], left["model_used"], left["left"]) == (1100, 1100, 8900)


async def test_a_model_limit_caps_that_model_only(backend: Backend) -> None:
    state = backend.open()

    async def reserve(model: str, tokens: int, model_limit: int | None) -> bool:
        res = await state.reserve_budget(
            model, tokens, daily_limit=100_000, model_limit=model_limit, safety_buffer=50
        )
        return res is not None

    assert await reserve("gemini-2.5-pro", 400, 500)
    assert not await reserve("gemini-2.5-pro", 51, 500)  # 451 > 500 - 50
    assert await reserve("gemini-2.5-pro", 50, 500)
    assert await reserve("gemini-2.5-flash", 5000, None)
    pro = await state.budget_left("gemini-2.5-pro")
    assert (pro["model_used"], pro["model_limit"], pro["model_left"]) == (450, 500, 0)
    assert pro["used"] == 5450
    flash = await state.budget_left("gemini-2.5-flash")
    assert flash["model_limit"] is None and flash["model_left"] is None


async def test_two_processes_crossing_midnight_archive_the_day_once(backend: Backend) -> None:
    backend.clock.set("2025-02-28T23:59")
    a, b = backend.open(), backend.open()
    reserve = {
        s: functools.partial(
            s.reserve_budget, daily_limit=10_000, model_limit=None, safety_buffer=0
        )
        for s in (a, b)
    }
    ra = await reserve[a]("gemini-2.5-flash", 300)
    rb = await reserve[b]("gemini-2.5-pro", 200)
    assert ra is not None and rb is not None
    await a.settle_budget(ra, 250)
    left = await a.budget_left("gemini-2.5-flash")
    assert left["used"] == 450

    backend.clock.set("2025-03-01T00:00:01")
    # Both processes see the new day at once, each with several requests in flight.
    await asyncio.gather(
        *(s.budget_left("gemini-2.5-flash") for s in (a, b) * 5),
        *(reserve[s]("gemini-2.5-flash", 10) for s in (a, b) * 5),
        *(s.stats() for s in (a, b) * 2),
    )
    # b's answer started yesterday and ends today: it settles into yesterday.
    await b.settle_budget(rb, 120)

    for state in (a, b):
        budget = (await state.stats())["budget"]
        assert budget["daily"] == [
            {
                "date": "2025-02-28",
                "tokens": 370,
                "by_model": {"gemini-2.5-flash": 250, "gemini-2.5-pro": 120},
            }
        ]
        assert budget["today"] == {
            "date": "2025-03-01",
            "tokens": 100,
            "by_model": {"gemini-2.5-flash": 100},
        }
        assert (await state.budget_left("gemini-2.5-flash"))["used"] == 100


# -- 4. statistics -------------------------------------------------------------------------


async def test_stats_add_up_across_hours_days_models_and_transports(backend: Backend) -> None:
    flash, pro = "gemini-2.5-flash", "gemini-2.5-pro"
    state = backend.open()
    backend.clock.set("2025-02-28T23:10")
    empty = await state.stats()
    assert empty["peak_day"] is None and empty["lifetime"] == ZERO
    assert empty["by_model"] == {} and empty["budget"]["daily"] == []

    e1 = usage("http", flash, inp=100, out=200, think=50, charged=5, change=90, fee=1)
    e2 = usage("nostr", pro, inp=1000, fee=2, refund=98)
    await state.record(e1)
    await state.record(e2)
    backend.clock.set("2025-03-01T00:20")
    e3 = usage("http", pro, inp=300, out=400, think=100, charged=20, change=10)
    await state.record(e3)
    backend.clock.set("2025-03-01T01:05")
    e4 = usage("nostr", flash, inp=10, out=20, charged=1, change=3, fee=1)
    e5 = usage("http", flash, inp=40, out=80, think=10, charged=2, change=7, fee=1)
    await asyncio.gather(state.record(e4), state.record(e5))
    backend.clock.set("2025-03-01T01:30")

    stats = await state.stats()
    json.dumps(stats)  # JSON-ready
    assert stats["generated_at"] == at("2025-03-01T01:30")
    assert stats["lifetime"] == {
        "requests": 5,
        "input_tokens": 1450,
        "output_tokens": 700,
        "thinking_tokens": 160,
        "charged_sat": 28,
        "change_sat": 110,
        "fee_sat": 5,
        "refunds": 1,
        "refund_sat": 98,
        "failed_payments": 0,
        "wasted_tokens": 0,
    }
    assert stats["today"] == {"date": "2025-03-01", **totals(e3, e4, e5)}
    assert stats["month"] == {"month": "2025-03", **totals(e3, e4, e5)}
    assert stats["peak_day"] == {"date": "2025-03-01", **totals(e3, e4, e5)}

    hours = [f"2025-03-01T{h:02d}" for h in range(24)]
    assert stats["hourly"] == [
        {"hour": hours[0], **totals(e3)},
        {"hour": hours[1], **totals(e4, e5)},
        *({"hour": h, **ZERO} for h in hours[2:]),
    ]
    daily = stats["daily"]
    assert len(daily) == 30
    assert daily[0]["date"] == "2025-01-31"
    assert daily[-2:] == [
        {"date": "2025-02-28", **totals(e1, e2)},
        {"date": "2025-03-01", **totals(e3, e4, e5)},
    ]
    assert all(d == {"date": d["date"], **ZERO} for d in daily[:-2])

    assert stats["by_model"] == {
        flash: {"today": totals(e4, e5), "month": totals(e4, e5), "lifetime": totals(e1, e4, e5)},
        pro: {"today": totals(e3), "month": totals(e3), "lifetime": totals(e2, e3)},
    }
    assert stats["by_transport"] == {
        "http": {"today": totals(e3, e5), "month": totals(e3, e5), "lifetime": totals(e1, e3, e5)},
        "nostr": {"today": totals(e4), "month": totals(e4), "lifetime": totals(e2, e4)},
    }
    assert await backend.open().stats() == stats  # another process sees the same


async def test_daily_history_keeps_30_days(backend: Backend) -> None:
    state = backend.open()
    backend.clock.set("2025-01-01T12:00")
    big = usage("http", "gemini-2.5-pro", charged=50)
    await state.record(big)
    res = await state.reserve_budget(
        "gemini-2.5-pro", 10, daily_limit=1000, model_limit=None, safety_buffer=0
    )
    assert res is not None
    small = usage("nostr", "gemini-2.5-flash", charged=1)
    backend.clock.set("2025-01-02T12:00")
    await state.record(small)
    assert (await state.stats())["budget"]["daily"][0]["date"] == "2025-01-01"

    backend.clock.set("2025-01-30T12:00")  # the 30th day: 2025-01-01 is still kept
    await state.record(small)
    stats = await state.stats()
    assert stats["daily"][0] == {"date": "2025-01-01", **totals(big)}
    assert await backend.stats_day_stored("2025-01-01")

    backend.clock.set("2025-01-31T00:00")
    await state.record(small)
    stats = await state.stats()
    assert stats["daily"][0] == {"date": "2025-01-02", **totals(small)}
    assert not await backend.stats_day_stored("2025-01-01")
    assert await backend.stats_day_stored("2025-01-02")
    assert stats["budget"]["daily"] == []
    # The lifetime totals and the peak day outlive the daily history.
    assert stats["peak_day"] == {"date": "2025-01-01", **totals(big)}
    assert stats["lifetime"] == totals(big, small, small, small)


# -- 5. Redis going away and coming back ---------------------------------------------------


def every_operation(state: State) -> list[Callable[[], Awaitable[Any]]]:
    res = Reservation(date="2025-02-28", model="gemini-2.5-flash", tokens=10)
    return [
        state.ping,
        lambda: state.claim("token:down", 60),
        lambda: state.release("token:down"),
        lambda: state.take("payer:down", capacity=10, refill_per_s=1.0),
        lambda: state.reserve_budget(
            "gemini-2.5-flash", 10, daily_limit=1000, model_limit=None, safety_buffer=0
        ),
        lambda: state.settle_budget(res, 5),
        lambda: state.budget_left("gemini-2.5-flash"),
        lambda: state.record(usage("http", "gemini-2.5-flash", charged=1)),
        state.stats,
    ]


async def test_a_dead_redis_is_unavailable_at_once_and_then_comes_back(
    own_redis: RedisServer,
) -> None:
    state = RedisState(own_redis.url)
    try:
        for op in every_operation(state):
            await op()
        await own_redis.kill()
        started = time.monotonic()
        for op in every_operation(state):
            with pytest.raises(StateUnavailable):
                await op()
        assert time.monotonic() - started < 2.0

        await own_redis.restart()
        for op in every_operation(state):  # the same object, no reconnect call
            await op()
        assert (await state.stats())["lifetime"]["requests"] == 1  # the data went with it
    finally:
        await state.close()


async def test_a_hung_redis_times_out_as_unavailable(own_redis: RedisServer) -> None:
    state = RedisState(own_redis.url, timeout_s=0.3)
    try:
        await state.ping()
        own_redis.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await state.claim("token:hung", 60)
            with pytest.raises(StateUnavailable):
                await state.ping()
            assert time.monotonic() - started < 2.0
        finally:
            own_redis.resume()
        await state.ping()
        # (the timed-out claim may still run when the server wakes: use another key)
        assert await state.claim("token:after", 60)
    finally:
        await state.close()


async def test_open_state_picks_redis_when_a_url_is_given(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    embedded = open_state(None, tmp_path / "state.sqlite3")
    shared = open_state(redis_server.url, tmp_path / "unused.sqlite3")
    try:
        assert isinstance(embedded, EmbeddedState) and isinstance(shared, RedisState)
        await embedded.ping()
        await shared.ping()
    finally:
        await embedded.close()
        await shared.close()
