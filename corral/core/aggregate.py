"""Planning and finishing a metrics query: pure, so the arithmetic is tested without a database.

A query asks for one metric, aggregated (``avg``, ``min``, ``max``, ``sum``, ``count``, ``p95``)
per time bucket of ``step`` over a set of devices, optionally split by a key (a tag value or the
device). The store has three resolutions -- raw points, 1-minute and 1-hour rollups -- and the
rollups are complete only up to their watermarks, so :func:`plan_segments` splits the time
range: the coarsest source the step allows up to its watermark, finer sources after it. The
segments' partial aggregates (count, sum, min, max) merge exactly; ``p95`` is exact over raw
points and, from rollups, the 95th percentile of the per-device bucket averages (documented in
docs/monitoring.md: a percentile cannot be rebuilt from a rollup, and for "how bad are the
worst devices" the per-device average is what one wants anyway).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from corral.errors import InvalidInput

Agg = Literal["avg", "min", "max", "sum", "count", "p95"]
AGGS: Final = ("avg", "min", "max", "sum", "count", "p95")
Source = Literal["raw", "1m", "1h"]

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
MIN_STEP_MS: Final = 1_000
MAX_BUCKETS: Final = 2_000
#: steps a query picks by itself, smallest first (ms)
NICE_STEPS: Final = (10_000, 30_000, 60_000, 300_000, 900_000, 1_800_000, 3_600_000, 10_800_000,
                     21_600_000, 43_200_000, 86_400_000)


def pick_step(span_ms: int, step_ms: int | None, target_buckets: int = 60) -> int:
    """The bucket width: the caller's (checked), or a nice one giving about ``target_buckets``."""
    if step_ms is not None:
        if step_ms < MIN_STEP_MS:
            raise InvalidInput(f"step must be at least {MIN_STEP_MS // 1000} s")
        if span_ms // step_ms > MAX_BUCKETS:
            raise InvalidInput(f"step is too small for the range: at most {MAX_BUCKETS} buckets")
        return step_ms
    for s in NICE_STEPS:
        if span_ms / s <= target_buckets:
            return s
    return NICE_STEPS[-1]


def source_for(step_ms: int) -> Source:
    """The coarsest resolution whose buckets divide the step."""
    if step_ms % HOUR_MS == 0:
        return "1h"
    if step_ms % MINUTE_MS == 0:
        return "1m"
    return "raw"


def plan_segments(start_ms: int, end_ms: int, step_ms: int, complete_1m: int,
                  complete_1h: int) -> list[tuple[Source, int, int]]:
    """Split ``[start, end)`` into (source, lo, hi) pieces, coarse first. Boundaries fall on
    bucket edges of the coarser source, so no bucket of the result mixes two sources' halves
    except through exact merging."""
    src = source_for(step_ms)
    out: list[tuple[Source, int, int]] = []
    lo = start_ms
    if src == "1h":
        hi = min(end_ms, max(lo, complete_1h))
        if hi > lo:
            out.append(("1h", lo, hi))
            lo = hi
        src = "1m"
    if src == "1m":
        hi = min(end_ms, max(lo, complete_1m))
        if hi > lo:
            out.append(("1m", lo, hi))
            lo = hi
    if end_ms > lo:
        out.append(("raw", lo, end_ms))
    return out


@dataclass
class Acc:
    """Partial aggregate of one bucket; merges exactly."""

    count: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def merge(self, count: int, total: float, lo: float, hi: float) -> None:
        self.count += int(count)
        self.sum += float(total)
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))

    def value(self, agg: Agg) -> float | None:
        if self.count == 0:
            return None
        if agg == "avg":
            return self.sum / self.count
        if agg == "min":
            return self.min
        if agg == "max":
            return self.max
        if agg == "sum":
            return self.sum
        if agg == "count":
            return float(self.count)
        raise ValueError(f"{agg} is not computed from partial aggregates")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    i = math.floor(pos)
    frac = pos - i
    if i + 1 >= len(xs):
        return xs[-1]
    return xs[i] + (xs[i + 1] - xs[i]) * frac


def align_start(start_ms: int, step_ms: int) -> int:
    return (start_ms // step_ms) * step_ms
