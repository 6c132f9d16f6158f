"""What the daemon measures about itself, for ``GET /metrics`` and the dashboard.

One :class:`Metrics` per daemon, on a :class:`~prometheus_client.CollectorRegistry` of
its own (never the process-global one: several daemons in one test process must not
collide). Counters are fed from few places: the end of every paid request and every
refusal (:mod:`bot.pipeline`; the Nostr transport adds its per-sender limit), and each
mint call (the observer hook of :mod:`mint_client.protocol`). Gauges that mirror state
kept elsewhere (budget, wallet, relays) are set just before each scrape by
:meth:`Metrics.set_gauges`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from bot.state import UsageEvent
from mint_client.protocol import MintCall

__all__ = ["ALL_MODELS", "CONTENT_TYPE", "Metrics", "MintHealth", "RelaySource"]

log = logging.getLogger("ecashbot.metrics")

#: the Prometheus text format that :meth:`Metrics.exposition` writes
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: the ``model`` label of the budget limit over all models
ALL_MODELS = "all"

#: the Nostr transport's view of its relays: relay URL -> status (``connected``, ...)
RelaySource = Callable[[], Awaitable[dict[str, str]]]

_REQUEST_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
_MINT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)


@dataclass(slots=True)
class MintHealth:
    """What this process knows about one mint, from the calls it made (no probing)."""

    calls: int = 0
    errors: int = 0
    #: the verdict of the last call: None before any call
    healthy: bool | None = None
    last_ok_at: float | None = None
    last_error_at: float | None = None
    last_error: str | None = None
    last_latency_s: float | None = None


class Metrics:
    """The daemon's counters, histograms and gauges, and what it knows of its mints."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._mints: dict[str, MintHealth] = {}
        #: set by the daemon once the Nostr transport runs
        self.relay_source: RelaySource | None = None
        r = self.registry
        paid = ["transport", "model"]
        self.paid_requests = Counter(
            "ecashbot_paid_requests",
            "Paid requests whose token was redeemed, by how they ended (answered|refunded)",
            [*paid, "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "ecashbot_paid_request_duration_seconds",
            "From redeeming the token to the change being ready",
            paid,
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "ecashbot_time_to_first_token_seconds",
            "From redeeming the token to the first text of the answer",
            paid,
            buckets=_TTFT_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter(
            "ecashbot_tokens",
            "LLM tokens of paid requests; kind=input|output|thinking (output includes thinking)",
            [*paid, "kind"],
            registry=r,
        )
        self.sats = Counter(
            "ecashbot_sats",
            "Sats of paid requests; kind=paid|fee|charged|change|refund",
            [*paid, "kind"],
            registry=r,
        )
        self.wasted_tokens = Counter(
            "ecashbot_wasted_upstream_tokens",
            "Model tokens spent on answers whose payment failed (fast path overlap)",
            ["transport", "model"],
            registry=r,
        )
        self.locked_payments = Counter(
            "ecashbot_locked_payments",
            "Payments locked to the bot (NUT-11): accepted with no mint call, or swapped "
            "because the stock of small proofs could not make their change",
            ["how"],
            registry=r,
        )
        self.sweeps = Counter(
            "ecashbot_locked_sweeps",
            "Batch swaps of accepted locked proofs, by outcome (done|failed)",
            ["outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "ecashbot_refused_requests",
            "Requests refused before any money moved, by error code "
            "(rate_limited, payment_required, underpaid, ...)",
            ["transport", "reason"],
            registry=r,
        )
        self.mint_seconds = Histogram(
            "ecashbot_mint_call_duration_seconds",
            "Calls to mints, by operation",
            ["mint", "op"],
            buckets=_MINT_BUCKETS_S,
            registry=r,
        )
        self.mint_errors = Counter(
            "ecashbot_mint_call_errors",
            "Mint calls that failed, by error code",
            ["mint", "op", "code"],
            registry=r,
        )
        self.mint_up = Gauge(
            "ecashbot_mint_up",
            "1 when the last call found the mint working, 0 when not (absent before any call)",
            ["mint"],
            registry=r,
        )
        self.mint_last_ok = Gauge(
            "ecashbot_mint_last_success_timestamp_seconds",
            "When a call to the mint last succeeded (epoch seconds)",
            ["mint"],
            registry=r,
        )
        self.relay_connected = Gauge(
            "ecashbot_relay_connected",
            "1 while the Nostr relay is connected",
            ["relay"],
            registry=r,
        )
        self.wallet_sat = Gauge(
            "ecashbot_wallet_held_sat",
            "Sats the bot holds (earned), by mint",
            ["mint"],
            registry=r,
        )
        self.budget_left = Gauge(
            "ecashbot_budget_left_tokens",
            'LLM tokens left in today\'s budget: model="all" for the limit over all models, '
            "else a model's own limit (absent where there is no limit)",
            ["model"],
            registry=r,
        )

    # -- fed by the pipeline ------------------------------------------------------------

    def paid(
        self, event: UsageEvent, *, paid_sat: int, latency_s: float, ttft_s: float | None
    ) -> None:
        """Count one paid request, as the statistics count it (same event)."""
        labels = (event.transport, event.model)
        outcome = "refunded" if event.refunded else "answered"
        self.paid_requests.labels(*labels, outcome).inc()
        self.request_seconds.labels(*labels).observe(latency_s)
        if ttft_s is not None:
            self.ttft_seconds.labels(*labels).observe(ttft_s)
        for kind, tokens in (
            ("input", event.input_tokens),
            ("output", event.output_tokens),
            ("thinking", event.thinking_tokens),
        ):
            self.tokens.labels(*labels, kind).inc(tokens)
        for kind, sat in (
            ("paid", paid_sat),
            ("fee", event.fee_sat),
            ("charged", event.charged_sat),
            ("change", event.change_sat),
            ("refund", event.refund_sat),
        ):
            self.sats.labels(*labels, kind).inc(sat)

    def wasted(self, transport: str, model: str, tokens: int) -> None:
        """Count model tokens spent on an answer whose payment then failed (overlap)."""
        self.wasted_tokens.labels(transport, model).inc(tokens)

    def locked_payment(self, how: str) -> None:
        """Count a locked payment: ``accepted`` with no mint call, or ``swapped``."""
        self.locked_payments.labels(how).inc()

    def sweep(self, outcome: str) -> None:
        """Count one batch swap of locked proofs (``done`` or ``failed``)."""
        self.sweeps.labels(outcome).inc()

    def refused(self, transport: str, reason: str) -> None:
        """Count a request refused before money moved (``reason``: the error's code)."""
        self.refusals.labels(transport, reason).inc()

    # -- fed by the mint client ---------------------------------------------------------

    def mint_call(self, call: MintCall) -> None:
        """The :data:`mint_client.protocol.MintObserver` of the daemon's mint registry."""
        self.mint_seconds.labels(call.mint, call.op).observe(call.duration_s)
        health = self._mints.setdefault(call.mint, MintHealth())
        health.calls += 1
        health.last_latency_s = call.duration_s
        health.healthy = call.healthy
        now = self._clock()
        if call.error is None:
            health.last_ok_at = now
            self.mint_last_ok.labels(call.mint).set(now)
        else:
            health.errors += 1
            health.last_error_at = now
            health.last_error = call.error_code
            self.mint_errors.labels(call.mint, call.op, call.error_code or "unexpected").inc()
        self.mint_up.labels(call.mint).set(1 if call.healthy else 0)

    def mint_health(self, mint: str) -> MintHealth:
        """What the calls so far say about ``mint`` (a normalized URL)."""
        return self._mints.get(mint, MintHealth())

    # -- read when scraped --------------------------------------------------------------

    async def relays(self) -> dict[str, str] | None:
        """Each relay's status as the Nostr transport sees it; None when Nostr is off."""
        if self.relay_source is None:
            return None
        try:
            return await self.relay_source()
        except Exception:  # the SDK could not say: show nothing rather than fail the page
            log.warning("relay status unavailable", exc_info=True)
            return {}

    def set_gauges(
        self,
        *,
        held_sat: Mapping[str, int],
        budget_left: int | None,
        model_budget_left: Mapping[str, int | None],
        relays: Mapping[str, str] | None,
    ) -> None:
        """Mirror the wallet, budget and relays into the gauges (before a scrape)."""
        self.wallet_sat.clear()
        for mint, sat in held_sat.items():
            self.wallet_sat.labels(mint).set(sat)
        self.budget_left.clear()
        if budget_left is not None:
            self.budget_left.labels(ALL_MODELS).set(budget_left)
        for model, left in model_budget_left.items():
            if left is not None:
                self.budget_left.labels(model).set(left)
        self.relay_connected.clear()
        for relay, status in (relays or {}).items():
            self.relay_connected.labels(relay).set(1 if status == "connected" else 0)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
