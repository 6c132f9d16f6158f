"""The daemon's metrics: mint calls timed through the mint client's observer hook (a real
mint, and a port where no mint answers), and one registry per daemon."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.metrics import Metrics
from mint_client.errors import MintUnavailable
from mint_client.protocol import MintCall, MintRegistry
from tests.support.mint import MintProcess
from tests.support.ports import free_port

ASYNC = pytest.mark.asyncio(loop_scope="session")


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@ASYNC
async def test_mint_calls_are_timed_and_failures_counted(mint: MintProcess) -> None:
    metrics = Metrics(clock=lambda: 1_700_000_000.0)
    calls: list[MintCall] = []

    def observe(call: MintCall) -> None:
        calls.append(call)
        metrics.mint_call(call)

    dead = f"http://127.0.0.1:{free_port()}"
    async with aiohttp.ClientSession() as session:
        registry = MintRegistry(session, [mint.url, dead], timeout_s=5, observer=observe)
        keysets = await registry.keysets(mint.url)
        await registry.keys(mint.url, keysets[0].id)
        with pytest.raises(MintUnavailable):
            await registry.keysets(dead)

    assert [(c.mint, c.op, c.healthy) for c in calls] == [
        (mint.url, "keysets", True),
        (mint.url, "keys", True),  # the keyset id is not part of the label
        (dead, "keysets", False),
    ]
    assert calls[2].error_code == "mint_unavailable"
    s = _samples(metrics)
    up = "ecashbot_mint_up"
    assert s[(up, (("mint", mint.url),))] == 1
    assert s[(up, (("mint", dead),))] == 0
    errors = (("code", "mint_unavailable"), ("mint", dead), ("op", "keysets"))
    assert s[("ecashbot_mint_call_errors_total", errors)] == 1
    count = (("mint", mint.url), ("op", "keys"))
    assert s[("ecashbot_mint_call_duration_seconds_count", count)] == 1
    assert s[("ecashbot_mint_last_success_timestamp_seconds", (("mint", mint.url),))] == 1.7e9
    health = metrics.mint_health(dead)
    assert (health.calls, health.errors, health.healthy) == (1, 1, False)
    assert metrics.mint_health("http://never-called").healthy is None


@ASYNC
async def test_an_observer_that_fails_does_not_fail_the_mint_call(mint: MintProcess) -> None:
    def broken(call: MintCall) -> None:
        raise RuntimeError("observer bug")

    async with aiohttp.ClientSession() as session:
        registry = MintRegistry(session, [mint.url], timeout_s=5, observer=broken)
        assert await registry.keysets(mint.url)


def test_each_daemon_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.refused("http", "rate_limited")
    a.refused("http", "rate_limited")
    b.refused("nostr", "rate_limited")
    key = ("ecashbot_refused_requests_total", (("reason", "rate_limited"), ("transport", "http")))
    assert _samples(a)[key] == 2
    assert key not in _samples(b)
