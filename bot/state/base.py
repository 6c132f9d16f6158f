"""The shared state's contract, its value types, and what both implementations share.

:class:`State` is what the pipeline and the transports see: replay claims, token
buckets, the daily LLM-token budget and usage statistics. ``RedisState`` shares it
between processes, ``EmbeddedState`` keeps it in one process (SQLite). Money is ``int``
sat; times come from an injectable ``clock`` (float epoch seconds); days are UTC.

Both implementations store counters as *hashes* (name → field → int) under the same
names, so the stats JSON is built once, here, by :func:`build_stats`. Hash fields are a
counter name (``charged_sat``), or ``m:<model>:<counter>`` / ``t:<transport>:<counter>``
for the breakdowns.

``stats()`` returns (all counts ``int``; ``<totals>`` is the object described below)::

    {
      "generated_at": 1740873600.0,             # the state's clock, epoch seconds
      "today":    {"date": "2025-03-01", <totals>},
      "month":    {"month": "2025-03", <totals>},     # this UTC month so far
      "peak_day": {"date": "2025-02-14", <totals>} | null,  # most sats charged, ever
      "lifetime": {<totals>},
      "hourly":   [{"hour": "2025-03-01T00", <totals>}, ...],  # today, 24 entries 00..23
      "daily":    [{"date": "2025-01-31", <totals>}, ...],     # 30 entries, oldest first,
                                                               # ending today
      "by_model":     {"<model>":     {"today": {<totals>}, "month": {<totals>},
                                       "lifetime": {<totals>}}},
      "by_transport": {"<transport>": {"today": ..., "month": ..., "lifetime": ...}},
      "budget": {
        "today": {"date": "2025-03-01", "tokens": 1234, "by_model": {"<model>": 1234}},
        "daily": [{"date": "2025-02-28", "tokens": 99000, "by_model": {...}}, ...]
      }                                          # archived past days, oldest first, <= 30
    }

    <totals> = "requests", "input_tokens", "output_tokens", "thinking_tokens",
               "charged_sat", "change_sat", "fee_sat", "refunds", "refund_sat",
               "failed_payments", "wasted_tokens" (model tokens spent on answers whose
               payment failed, with the fast path's overlap)

Days and hours without traffic are present with zeros in ``hourly`` and ``daily`` so a
dashboard can draw them as they are; ``by_model``/``by_transport`` list every model and
transport ever seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

__all__ = [
    "COUNTERS",
    "KEEP_DAYS",
    "Reservation",
    "State",
    "StateUnavailable",
    "TakeResult",
    "UsageEvent",
]

#: The counters kept for every hour, day, month and lifetime, overall and broken down.
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
#: Days of daily history kept (today included); older days are deleted.
KEEP_DAYS = 30
#: Hourly counters are kept this long.
KEEP_HOURS_S = 48 * 3600
#: A month's counters live this long after their last write (long past the month's end).
KEEP_MONTH_S = 62 * 86400
#: A budget day's totals are kept this long, so late settlements and archiving find them.
KEEP_BUDGET_DAY_S = (KEEP_DAYS + 1) * 86400
DAY_S = 86400


class StateUnavailable(Exception):
    """The state backend can't be reached; refuse the request before any money moves."""


@dataclass(frozen=True, slots=True)
class TakeResult:
    """What a token bucket said: allowed or not, what is left, when to come back."""

    allowed: bool
    #: whole tokens left in the bucket after this take (or without it, when refused)
    remaining: int
    #: 0.0 when allowed; seconds until ``amount`` would fit; ``math.inf`` if never
    retry_after_s: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """LLM tokens reserved against one UTC day's budget; settle it exactly once."""

    date: str  # the UTC day it was made, "YYYY-MM-DD"; settling goes to that day
    model: str
    tokens: int


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One answered (or refunded) request, as counted in the statistics."""

    transport: str
    model: str
    input_tokens: int
    output_tokens: int
    thinking_tokens: int
    charged_sat: int
    change_sat: int
    fee_sat: int
    refunded: bool
    refund_sat: int
    #: a payment that failed after the model was started (fast path): not a request
    failed_payment: bool = False
    #: model tokens spent on a failed payment's answer, which nobody paid for
    wasted_tokens: int = 0


class State(Protocol):
    """Replay claims, rate limits, the daily token budget and usage statistics."""

    async def claim(self, key: str, ttl_s: int) -> bool:
        """Claim ``key`` (e.g. ``nostr:<event id>``) for ``ttl_s``; True for the first only."""
        ...

    async def release(self, key: str) -> None:
        """Undo a claim, so the same key can be tried again (nothing was charged)."""
        ...

    async def extend(self, key: str, ttl_s: int) -> None:
        """Keep a held claim for ``ttl_s`` from now (re-taking it if it lapsed meanwhile)."""
        ...

    async def claim_all(self, keys: Sequence[str], ttl_s: int) -> bool:
        """Claim every key or none, atomically (e.g. the Ys of a locked token's proofs)."""
        ...

    async def extend_all(self, keys: Sequence[str], ttl_s: int) -> None:
        """:meth:`extend` for each key."""
        ...

    async def release_all(self, keys: Sequence[str]) -> None:
        """:meth:`release` for each key."""
        ...

    async def take(
        self, bucket: str, *, capacity: int, refill_per_s: float, amount: int = 1
    ) -> TakeResult:
        """Take ``amount`` from a token bucket, atomically; a refused take takes nothing."""
        ...

    async def reserve_budget(
        self,
        model: str,
        tokens: int,
        *,
        daily_limit: int,
        model_limit: int | None,
        safety_buffer: int,
    ) -> Reservation | None:
        """Reserve ``tokens`` against today's budget; None if a limit minus buffer is hit.

        Both the global ``daily_limit`` and the model's ``model_limit`` (if any) are
        checked with ``safety_buffer`` kept free, since answers may use more than reserved.
        """
        ...

    async def settle_budget(self, res: Reservation, used_tokens: int) -> None:
        """Replace a reservation by the real use, in the day the reservation was made."""
        ...

    async def budget_left(self, model: str) -> dict[str, Any]:
        """Today's budget use for ``model`` and overall, with the latest limits seen.

        Keys: ``date``, ``model``, ``used``, ``model_used``, ``daily_limit``,
        ``model_limit``, ``safety_buffer``, ``left``, ``model_left`` (limits and what
        is left are None until a reservation has told the state its limits).
        """
        ...

    async def record(self, event: UsageEvent) -> None:
        """Count one request in the hourly, daily, monthly and lifetime statistics."""
        ...

    async def stats(self) -> dict[str, Any]:
        """The statistics as JSON-ready data (shape in this module's docstring)."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StateUnavailable` if the backend is down."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


# -- shared by the implementations ----------------------------------------------------

_EPOCH = date(1970, 1, 1)


def day_ord(ts: float) -> int:
    """The UTC day of ``ts`` as days since 1970-01-01."""
    return math.floor(ts / DAY_S)


def date_of(ordinal: int) -> str:
    """``YYYY-MM-DD`` of a day ordinal."""
    return (_EPOCH + timedelta(days=ordinal)).isoformat()


def ord_of(day: str) -> int:
    """The day ordinal of ``YYYY-MM-DD``."""
    return (date.fromisoformat(day) - _EPOCH).days


def hour_of(ts: float) -> str:
    """``YYYY-MM-DDTHH`` (UTC) of ``ts``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H")


def month_of(ts: float) -> str:
    """``YYYY-MM`` (UTC) of ``ts``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def ttl_until(expires_at: float, now: float) -> int:
    """Whole seconds from ``now`` to ``expires_at``, at least 1 (a TTL of 0 is invalid)."""
    return max(1, math.ceil(expires_at - now))


def usage_fields(event: UsageEvent) -> dict[str, int]:
    """The hash increments for one event: totals and per-model/per-transport fields."""
    values = {
        "requests": 0 if event.failed_payment else 1,
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "thinking_tokens": event.thinking_tokens,
        "charged_sat": event.charged_sat,
        "change_sat": event.change_sat,
        "fee_sat": event.fee_sat,
        "refunds": int(event.refunded),
        "refund_sat": event.refund_sat,
        "failed_payments": int(event.failed_payment),
        "wasted_tokens": event.wasted_tokens,
    }
    if any(value < 0 for value in values.values()):
        raise ValueError(f"negative count in {event}")
    fields: dict[str, int] = {}
    for name, value in values.items():
        fields[name] = value
        fields[f"m:{event.model}:{name}"] = value
        fields[f"t:{event.transport}:{name}"] = value
    return fields


def _totals(raw: Mapping[str, int], prefix: str = "") -> dict[str, int]:
    return {name: int(raw.get(prefix + name, 0)) for name in COUNTERS}


def _dimension(raw: Mapping[str, int], kind: str) -> set[str]:
    """The models (kind ``m``) or transports (``t``) named in a hash's fields."""
    names = set()
    for field in raw:
        if field.startswith(kind + ":"):
            names.add(field[2:].rpartition(":")[0])
    return names


def _breakdown(
    kind: str, today: Mapping[str, int], month: Mapping[str, int], life: Mapping[str, int]
) -> dict[str, dict[str, dict[str, int]]]:
    return {
        name: {
            "today": _totals(today, f"{kind}:{name}:"),
            "month": _totals(month, f"{kind}:{name}:"),
            "lifetime": _totals(life, f"{kind}:{name}:"),
        }
        for name in sorted(_dimension(life, kind))
    }


def budget_entry(day: str, raw: Mapping[str, int]) -> dict[str, Any]:
    """One day's budget use from its hash (``tokens`` and ``m:<model>`` fields)."""
    return {
        "date": day,
        "tokens": int(raw.get("tokens", 0)),
        "by_model": {f[2:]: int(v) for f, v in sorted(raw.items()) if f.startswith("m:")},
    }


def budget_left_dict(
    day: str, model: str, used: int, model_used: int, limits: Mapping[str, int]
) -> dict[str, Any]:
    """The ``budget_left`` answer; ``limits`` holds ``daily_limit``, ``safety_buffer``,
    ``m:<model>`` (-1 for no model limit) as last given to ``reserve_budget``."""
    daily = limits.get("daily_limit")
    buffer = limits.get("safety_buffer")
    model_limit = limits.get(f"m:{model}")
    if model_limit is not None and model_limit < 0:
        model_limit = None
    left = None if daily is None else max(0, daily - (buffer or 0) - used)
    model_left = None if model_limit is None else max(0, model_limit - (buffer or 0) - model_used)
    return {
        "date": day,
        "model": model,
        "used": used,
        "model_used": model_used,
        "daily_limit": daily,
        "model_limit": model_limit,
        "safety_buffer": buffer,
        "left": left,
        "model_left": model_left,
    }


def build_stats(
    now: float,
    *,
    hours: Sequence[Mapping[str, int]],
    days: Sequence[Mapping[str, int]],
    month: Mapping[str, int],
    lifetime: Mapping[str, int],
    peak: Mapping[str, int],
    budget_today: Mapping[str, int],
    budget_days: Sequence[tuple[str, Mapping[str, int]]],
) -> dict[str, Any]:
    """The stats JSON from the raw hashes.

    ``hours`` are today's 24 hours (00..23), ``days`` the last :data:`KEEP_DAYS` days
    ending today, ``peak`` holds the peak day's totals and its ordinal in ``day``,
    ``budget_days`` the archived budget days, oldest first.
    """
    today_ord = day_ord(now)
    today = date_of(today_ord)
    first = today_ord - len(days) + 1
    return {
        "generated_at": now,
        "today": {"date": today, **_totals(days[-1])},
        "month": {"month": month_of(now), **_totals(month)},
        "peak_day": {"date": date_of(int(peak["day"])), **_totals(peak)} if peak else None,
        "lifetime": _totals(lifetime),
        "hourly": [{"hour": f"{today}T{h:02d}", **_totals(raw)} for h, raw in enumerate(hours)],
        "daily": [{"date": date_of(first + i), **_totals(raw)} for i, raw in enumerate(days)],
        "by_model": _breakdown("m", days[-1], month, lifetime),
        "by_transport": _breakdown("t", days[-1], month, lifetime),
        "budget": {
            "today": budget_entry(today, budget_today),
            "daily": [budget_entry(day, raw) for day, raw in budget_days],
        },
    }
