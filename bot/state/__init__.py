"""The shared state: replay claims, rate limits, the daily token budget, usage statistics.

``open_state`` picks Redis when a URL is configured (several processes share it), and
otherwise the embedded SQLite state of a single process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bot.state.base import Reservation, State, StateUnavailable, TakeResult, UsageEvent
from bot.state.embedded import EmbeddedState
from bot.state.redis import RedisState

__all__ = [
    "EmbeddedState",
    "RedisState",
    "Reservation",
    "State",
    "StateUnavailable",
    "TakeResult",
    "UsageEvent",
    "open_state",
]


def open_state(
    redis_url: str | None, embedded_path: Path | None, clock: Callable[[], float] = time.time
) -> State:
    """Redis at ``redis_url`` if given, else SQLite at ``embedded_path`` (None: memory)."""
    if redis_url:
        return RedisState(redis_url, clock=clock)
    return EmbeddedState(embedded_path, clock=clock)
