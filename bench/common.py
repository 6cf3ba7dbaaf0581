"""Shared pieces of the benchmarks: a result row, timing, peak memory, and the closing table."""
from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One benchmark figure beside its anchor measured in the same run."""
    area: str          # pipeline | loader | masking | trainer
    name: str          # what was measured
    value: float       # our figure
    unit: str          # e.g. "MB/s", "tokens/s", "bytes/token"
    anchor: str = ""   # what we compare against ("" when the figure stands alone)
    anchor_value: float | None = None
    target: str = ""   # the goal, in words, e.g. ">= 0.8x" or "<= 2.25"
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        if self.anchor_value in (None, 0):
            return None
        return self.value / self.anchor_value


def timed(fn, *, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its finished children) in MB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.3g}"


def table(rows: list[Row]) -> str:
    """The closing table: every figure, its anchor, and the ratio."""
    head = ("area", "measure", "ours", "unit", "anchor", "anchor fig.", "ratio", "target")
    body = [(r.area, r.name, fmt(r.value), r.unit, r.anchor or "-", fmt(r.anchor_value),
             "-" if r.ratio is None else f"{r.ratio:.2f}x", r.target or "-") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    out = [line(head), line("-" * w for w in widths)] + [line(b) for b in body]
    return "\n".join(out)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
