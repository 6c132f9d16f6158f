"""Medians, percentiles and the results table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    """One line of the results table."""

    metric: str
    unit: str
    samples: list[float]
    baseline: float | None  # what the ratio divides by (None: no ratio)
    target: str  # e.g. "ratio <= 1.05", "<= 10 ms"
    check: str  # "ratio<=", "ratio>=", "<=", ">=", "<", or "none"
    limit: float
    note: str = ""

    @property
    def median(self) -> float:
        """The median sample."""
        return median(self.samples)

    @property
    def p95(self) -> float:
        """The 95th percentile of the samples."""
        return pct(self.samples, 95)

    @property
    def ratio(self) -> float | None:
        """median ÷ baseline, or None without a baseline."""
        return None if not self.baseline else self.median / self.baseline

    @property
    def met(self) -> bool | None:
        """Whether the target is met; None for a row without a target."""
        if self.check == "none":
            return None
        value = self.ratio if self.check.startswith("ratio") else self.median
        if value is None or value != value:
            return False
        op = self.check.removeprefix("ratio")
        return {
            "<=": value <= self.limit,
            ">=": value >= self.limit,
            "<": value < self.limit,
        }[op]


def _num(x: float | None, unit: str = "") -> str:
    if x is None or x != x:
        return "—"
    text = f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{text} {unit}".strip()


def table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| metric | median | p95 | baseline | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p95 = _num(r.p95, r.unit) if len(r.samples) > 1 else "—"
        met = {True: "yes", False: "no", None: "—"}[r.met]
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(
            f"| {r.metric} | {_num(r.median, r.unit)} | {p95} | {_num(r.baseline, r.unit)} "
            f"| {ratio} | {r.target} | {met} |"
        )
    return "\n".join(lines)
