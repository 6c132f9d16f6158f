"""Failpoints: named moments where a fault-injection test makes the process crash.

Off unless ``ECASHBOT_FAILPOINTS`` is set, e.g. ``after_redeem=0.05,after_answer=0.05``:
then, each time the code passes a named point, the process SIGKILLs itself with that
probability — a crash exactly between two steps of a payment, with nothing flushed and
no clean-up, which is what the crash-safety test needs and an outside ``kill`` can only
hit by chance. A deployment never sets it; unset, :func:`hit` costs one dict lookup.

The points: ``after_redeem`` (the token is ours, no answer yet), ``after_answer`` (the
answer is made, no change yet), ``after_settle`` (the change is issued, not delivered).
"""

from __future__ import annotations

import os
import random
import signal

__all__ = ["POINTS", "hit", "parse"]

POINTS = frozenset({"after_redeem", "after_answer", "after_settle"})
ENV = "ECASHBOT_FAILPOINTS"


def parse(spec: str) -> dict[str, float]:
    """``"name=p,name=p"`` → {name: p}; unknown names and bad numbers raise ValueError."""
    points: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown failpoint {name!r} (known: {sorted(POINTS)})")
        p = float(value or "1")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{ENV}: {name} probability {p} is not within [0, 1]")
        points[name] = p
    return points


_ACTIVE = parse(os.environ.get(ENV, ""))
_RNG = random.Random()


def hit(name: str) -> None:
    """Crash here (SIGKILL to ourselves) with the probability configured for ``name``."""
    p = _ACTIVE.get(name)
    if p and _RNG.random() < p:
        os.write(2, f"failpoint {name}: SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
