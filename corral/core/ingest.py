"""Checking a telemetry batch before it is stored: pure (but for a memo of metric names seen),
so every rule is a table-driven test.

A device is trusted to say what it measured, not to be well-formed: a buggy or hostile agent
can send NaN, a clock far in the future, a name built to confuse a query, or a million points.
:func:`clean_batch` keeps what is plausible and counts the rest with one reason (the first),
which goes back to the device in the ack and into the receipt. Rejected data is never retried:
sending it again would not make it valid.

Rules, in order, per point:
    * the metric name must pass :func:`corral.protocol.valid_metric_name`;
    * ``ts`` and ``values`` of a series must have the same length (else the series is rejected);
    * the value must be finite (NaN and ±inf are rejected, not clamped: a clamped value would be
      a fabricated measurement);
    * the timestamp must lie in ``[now - max_age, now + max_future]`` (a device clock a little
      ahead is tolerated; data older than raw retention would be deleted at once anyway);
    * a series may repeat a timestamp: the first value wins (the store keeps one point per
      series and millisecond).
Events: valid severity (the decoder already enforces it), a short source, a bounded message
(truncated, not rejected: the text is informational) and bounded attributes, same time window.
A batch with more points or events than the limits is rejected whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import repeat

from corral.protocol import Event, Telemetry, valid_metric_name


@dataclass(frozen=True)
class IngestLimits:
    max_points: int = 20_000  # per batch (a frame is at most 1 MiB anyway)
    max_events: int = 1_000  # per batch
    max_future_ms: int = 5 * 60_000  # device clocks may run this far ahead
    max_age_ms: int = 7 * 86_400_000  # older points are refused (raw retention)
    max_message_chars: int = 1024
    max_source_chars: int = 32
    max_attrs: int = 32
    max_attr_chars: int = 256


@dataclass
class CleanBatch:
    #: (metric name, ts ms, value), in the batch's order
    points: list[tuple[str, int, float]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    rejected: int = 0
    reason: str = ""
    min_ts: int | None = None
    max_ts: int | None = None

    def reject(self, n: int, reason: str) -> None:
        self.rejected += n
        if not self.reason:
            self.reason = reason


#: names seen before and whether they were valid: devices repeat the same few hundred names
_NAMES: dict[str, bool] = {}
_NAMES_MAX = 100_000


def _name_ok(name: str) -> bool:
    ok = _NAMES.get(name)
    if ok is None:
        ok = valid_metric_name(name)
        if len(_NAMES) >= _NAMES_MAX:  # hostile devices inventing names cannot grow it unbounded
            _NAMES.clear()
        _NAMES[name] = ok
    return ok


class BatchRefused(ValueError):
    """The batch as a whole is unacceptable (too many points or events)."""


def clean_batch(batch: Telemetry, now_ms: int, limits: IngestLimits) -> CleanBatch:
    total = sum(len(s.values) for s in batch.series)
    if total > limits.max_points:
        raise BatchRefused(f"batch has {total} points; at most {limits.max_points} are accepted")
    if len(batch.events) > limits.max_events:
        raise BatchRefused(f"batch has {len(batch.events)} events; at most {limits.max_events} are accepted")
    lo, hi = now_ms - limits.max_age_ms, now_ms + limits.max_future_ms
    out = CleanBatch()
    points = out.points
    isfinite = math.isfinite
    for s in batch.series:
        name, tss, vs = s.name, s.ts, s.values
        if not _name_ok(name):
            out.reject(max(len(tss), len(vs)), f"invalid metric name {name[:64]!r}")
            continue
        if len(tss) != len(vs):
            out.reject(max(len(tss), len(vs)), f"{name}: ts and values differ in length")
            continue
        if len(tss) == 1:  # the common case: one collection, one point per metric
            t, v = tss[0], vs[0]
            if lo <= t <= hi and isfinite(v):
                points.append((name, t, float(v)))
                continue
        elif tss and lo <= min(tss) and max(tss) <= hi and all(map(isfinite, vs)) and len(set(tss)) == len(tss):
            points.extend(zip(repeat(name), tss, map(float, vs)))  # a clean series, checked as a whole
            continue
        seen: set[int] = set()
        for ts, v in zip(tss, vs, strict=True):
            if not isfinite(v):
                out.reject(1, f"{name}: value {v} is not finite")
            elif ts < lo or ts > hi:
                out.reject(1, f"{name}: timestamp {ts} is outside the accepted window")
            elif ts in seen:
                out.reject(1, f"{name}: timestamp {ts} repeats in the batch")
            else:
                seen.add(ts)
                points.append((name, ts, float(v)))
    if points:
        stamps = [t for _, t, _ in points]
        out.min_ts, out.max_ts = min(stamps), max(stamps)
    for e in batch.events:
        if e.ts < lo or e.ts > hi:
            out.reject(1, f"event timestamp {e.ts} is outside the accepted window")
            continue
        if not e.source or len(e.source) > limits.max_source_chars or not e.source.replace("_", "").isalnum():
            out.reject(1, f"event source {e.source[:40]!r} is not a short word")
            continue
        attrs = {str(k)[:64]: (v[: limits.max_attr_chars] if isinstance(v, str) else v)
                 for k, v in list(e.attrs.items())[: limits.max_attrs]
                 if not (isinstance(v, float) and not math.isfinite(v))}
        out.events.append(Event(ts=e.ts, severity=e.severity, source=e.source,
                                message=e.message[: limits.max_message_chars], attrs=attrs))
    return out
