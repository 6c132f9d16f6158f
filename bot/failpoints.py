"""Failpoints: named moments where a fault-injection test makes the process crash.

Off unless ``ECASHBOT_FAILPOINTS`` is set, e.g. ``after_redeem=0.05,after_answer=every:40``:
then, each time the code passes a named point, the process SIGKILLs itself — with that
probability, or (``every:N``) on every N-th pass. A crash lands exactly between two steps
of a payment, with nothing flushed and no clean-up, which is what the crash-safety test
needs and an outside ``kill`` can only hit by chance. A deployment never sets it; unset,
:func:`hit` costs one dict lookup.

``every:N`` counts passes per process, or, when ``ECASHBOT_FAILPOINTS_COUNTS`` names a
directory, across restarts (one byte appended to ``<dir>/<point>`` per pass): a test that
restarts the crashed process then gets its crashes for certain, not by luck.

The points: ``after_redeem`` (the token is ours, no answer yet), ``after_answer`` (the
answer is made, no change yet), ``after_settle`` (the change is issued, not delivered).
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass

__all__ = ["POINTS", "Rule", "hit", "parse"]

POINTS = frozenset({"after_redeem", "after_answer", "after_settle"})
ENV = "ECASHBOT_FAILPOINTS"
COUNTS_ENV = "ECASHBOT_FAILPOINTS_COUNTS"


@dataclass(frozen=True, slots=True)
class Rule:
    """Crash with probability ``p`` at each pass, or on every ``every``-th pass."""

    p: float = 0.0
    every: int = 0


def parse(spec: str) -> dict[str, Rule]:
    """``"name=p,name=every:N"`` → {name: Rule}; unknown names, bad numbers raise ValueError."""
    points: dict[str, Rule] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown failpoint {name!r} (known: {sorted(POINTS)})")
        if value.startswith("every:"):
            n = int(value.removeprefix("every:"))
            if n < 1:
                raise ValueError(f"{ENV}: {name} every:{n} is not a positive count")
            points[name] = Rule(every=n)
            continue
        p = float(value or "1")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{ENV}: {name} probability {p} is not within [0, 1]")
        points[name] = Rule(p=p)
    return points


_ACTIVE = parse(os.environ.get(ENV, ""))
_COUNTS_DIR = os.environ.get(COUNTS_ENV)
_RNG = random.Random()
_passes: dict[str, int] = {}


def _count_pass(name: str) -> int:
    """This pass's number at ``name``: per process, or across restarts in the counts dir."""
    if _COUNTS_DIR is None:
        _passes[name] = _passes.get(name, 0) + 1
        return _passes[name]
    fd = os.open(os.path.join(_COUNTS_DIR, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b".")
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def hit(name: str) -> None:
    """Crash here (SIGKILL to ourselves) if the rule configured for ``name`` says so."""
    rule = _ACTIVE.get(name)
    if rule is None:
        return
    if rule.every:
        fire = _count_pass(name) % rule.every == 0
    else:
        fire = rule.p > 0 and _RNG.random() < rule.p
    if fire:
        os.write(2, f"failpoint {name}: SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
