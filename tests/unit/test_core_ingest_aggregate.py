"""Telemetry checks (core.ingest) and query planning/merging (core.aggregate): pure, table-driven."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral import protocol as p
from corral.core.aggregate import (
    HOUR_MS,
    MINUTE_MS,
    Acc,
    align_start,
    percentile,
    pick_step,
    plan_segments,
    source_for,
)
from corral.core.ingest import BatchRefused, IngestLimits, clean_batch
from corral.errors import InvalidInput

NOW = 1_800_000_000_000
LIMITS = IngestLimits()


def batch(*series: tuple[str, list[int], list[float]], events: list[p.Event] | None = None) -> p.Telemetry:
    return p.Telemetry(seq=1, series=[p.MetricSeries(n, ts, vs) for n, ts, vs in series], events=events or [])


@pytest.mark.parametrize("name,ts,value,reason", [
    ("cpu.percent", NOW, math.nan, "not finite"),
    ("cpu.percent", NOW, math.inf, "not finite"),
    ("cpu.percent", NOW, -math.inf, "not finite"),
    ("cpu.percent", NOW + LIMITS.max_future_ms + 1, 1.0, "outside"),
    ("cpu.percent", NOW - LIMITS.max_age_ms - 1, 1.0, "outside"),
    ("../etc/passwd", NOW, 1.0, "invalid metric name"),
    ("cpu percent", NOW, 1.0, "invalid metric name"),
    ("a-b", NOW, 1.0, "invalid metric name"),
    ("x" * 129, NOW, 1.0, "invalid metric name"),
    ("", NOW, 1.0, "invalid metric name"),
])
def test_bad_points_are_rejected_with_a_reason(name: str, ts: int, value: float, reason: str) -> None:
    out = clean_batch(batch((name, [ts], [value]), ("ok.metric", [NOW], [2.0])), NOW, LIMITS)
    assert out.rejected == 1 and reason in out.reason
    assert out.points == [("ok.metric", NOW, 2.0)]


def test_edges_of_the_time_window_are_accepted() -> None:
    ts = [NOW - LIMITS.max_age_ms, NOW + LIMITS.max_future_ms]
    out = clean_batch(batch(("m", ts, [1.0, 2.0])), NOW, LIMITS)
    assert out.rejected == 0 and (out.min_ts, out.max_ts) == (ts[0], ts[1])


def test_repeated_timestamp_keeps_the_first_and_mismatched_lengths_reject_the_series() -> None:
    out = clean_batch(batch(("m", [NOW, NOW], [1.0, 2.0]), ("n", [NOW], [1.0, 2.0])), NOW, LIMITS)
    assert out.points == [("m", NOW, 1.0)]
    assert out.rejected == 3 and "repeats" in out.reason


def test_oversized_batches_are_refused_whole() -> None:
    small = IngestLimits(max_points=3, max_events=1)
    with pytest.raises(BatchRefused, match="at most 3"):
        clean_batch(batch(("m", [1, 2, 3, 4], [1.0] * 4)), NOW, small)
    ev = p.Event(ts=NOW, severity="info", source="app", message="x")
    with pytest.raises(BatchRefused, match="events"):
        clean_batch(batch(events=[ev, ev]), NOW, small)


def test_events_are_bounded_not_rejected_for_long_text() -> None:
    ev = p.Event(ts=NOW, severity="error", source="app", message="m" * 5000,
                 attrs={f"k{i}": "v" * 1000 for i in range(100)} | {"nan": math.nan})
    bad_source = p.Event(ts=NOW, severity="error", source="a b", message="x")
    out = clean_batch(batch(events=[ev, bad_source]), NOW, LIMITS)
    [kept] = out.events
    assert len(kept.message) == LIMITS.max_message_chars
    assert len(kept.attrs) <= LIMITS.max_attrs
    assert all(len(str(v)) <= LIMITS.max_attr_chars for v in kept.attrs.values())
    assert "nan" not in kept.attrs
    assert out.rejected == 1 and "source" in out.reason


@pytest.mark.parametrize("step,source", [(10_000, "raw"), (MINUTE_MS, "1m"), (5 * MINUTE_MS, "1m"),
                                         (HOUR_MS, "1h"), (6 * HOUR_MS, "1h"), (90_000, "raw")])
def test_source_for_step(step: int, source: str) -> None:
    assert source_for(step) == source


def test_pick_step() -> None:
    assert pick_step(HOUR_MS, None) == MINUTE_MS
    assert pick_step(10 * MINUTE_MS, None) == 10_000
    assert pick_step(7 * 24 * HOUR_MS, None) == 3 * HOUR_MS
    assert pick_step(HOUR_MS, 30_000) == 30_000
    with pytest.raises(InvalidInput, match="at least"):
        pick_step(HOUR_MS, 10)
    with pytest.raises(InvalidInput, match="buckets"):
        pick_step(30 * 24 * HOUR_MS, 1000)


def test_plan_segments_uses_coarse_sources_up_to_their_watermarks() -> None:
    c1h, c1m = 10 * HOUR_MS, 10 * HOUR_MS + 30 * MINUTE_MS
    assert plan_segments(0, 11 * HOUR_MS, HOUR_MS, c1m, c1h) == [
        ("1h", 0, c1h), ("1m", c1h, c1m), ("raw", c1m, 11 * HOUR_MS)]
    assert plan_segments(0, 11 * HOUR_MS, MINUTE_MS, c1m, c1h) == [("1m", 0, c1m), ("raw", c1m, 11 * HOUR_MS)]
    assert plan_segments(0, 11 * HOUR_MS, 10_000, c1m, c1h) == [("raw", 0, 11 * HOUR_MS)]
    # nothing rolled up yet: all raw
    assert plan_segments(0, HOUR_MS, MINUTE_MS, 0, 0) == [("raw", 0, HOUR_MS)]
    # a range entirely before the watermarks needs no raw segment
    assert plan_segments(0, HOUR_MS, HOUR_MS, c1m, c1h) == [("1h", 0, HOUR_MS)]


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60), st.integers(1, 59))
def test_partial_aggregates_merge_exactly(values: list[float], cut: int) -> None:
    cut = min(cut, len(values))
    whole, a, b = Acc(), Acc(), Acc()
    whole.merge(len(values), math.fsum(values), min(values), max(values))
    left, right = values[:cut], values[cut:]
    a.merge(len(left), math.fsum(left), min(left), max(left))
    if right:
        a.merge(len(right), math.fsum(right), min(right), max(right))
    b.merge(len(values), math.fsum(values), min(values), max(values))
    for agg in ("min", "max", "count"):
        assert a.value(agg) == whole.value(agg) == b.value(agg)  # type: ignore[arg-type]
    assert a.value("avg") == pytest.approx(whole.value("avg"), rel=1e-9, abs=1e-6)


def test_percentile_and_empty_bucket() -> None:
    assert percentile([], 0.95) is None
    assert percentile([5.0], 0.95) == 5.0
    assert percentile(list(map(float, range(1, 101))), 0.95) == pytest.approx(95.05)
    assert Acc().value("avg") is None
    assert align_start(125_000, MINUTE_MS) == 120_000
