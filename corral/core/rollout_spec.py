"""What a rollout is asked to do: its waves, gates and pacing, parsed and checked (DESIGN §5).

Pure data and parsing, no I/O: the planner (:mod:`corral.core.rollout_plan`) reads these, the
API builds them from a request, and each bad value is an :class:`InvalidInput` naming it.

- **Waves** are cumulative: ``1%,10%,50%,100%`` or counts ``5,50,all``; each is the share of the
  rollout's devices updated once that wave is done. Non-decreasing; the last must be ``100%``
  or ``all`` (a rollout ends with every device it selected). :func:`wave_sizes` turns them into
  device counts for a fleet of N: percentages round up, so a non-empty wave never rounds to 0.
- **Maintenance windows** are ``[DAYS ]HH:MM-HH:MM`` in the device's own time zone: ``02:00-05:00``
  every day, ``Mon-Fri 22:00-04:00`` (crossing midnight: the window belongs to the day it
  starts on), ``Sat,Sun 00:00-24:00``.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from corral.errors import InvalidInput

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_WAVES = 20


@dataclass(frozen=True)
class Wave:
    """One wave's cumulative size: a share of the devices (``percent``) or a count (``count``;
    ``None`` for both: all of them)."""

    percent: float | None = None
    count: int | None = None

    def size(self, total: int) -> int:
        if self.count is not None:
            return min(self.count, total)
        if self.percent is not None:
            return min(total, math.ceil(total * self.percent / 100 - 1e-9))
        return total

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        if self.percent is not None:
            return f"{self.percent:g}%"
        return "all"


def parse_waves(text: str) -> tuple[Wave, ...]:
    parts = [p.strip().lower() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise InvalidInput(f"waves must be a comma-separated list such as 1%,10%,50%,100% or 5,50,all; got {text!r}")
    if len(parts) > MAX_WAVES:
        raise InvalidInput(f"at most {MAX_WAVES} waves")
    waves = []
    for p in parts:
        try:
            if p == "all":
                waves.append(Wave())
            elif p.endswith("%"):
                value = float(p[:-1])
                if not 0 < value <= 100:
                    raise ValueError
                waves.append(Wave(percent=None if value == 100 else value))
            else:
                n = int(p)
                if n < 1:
                    raise ValueError
                waves.append(Wave(count=n))
        except ValueError:
            raise InvalidInput(f"wave {p!r} must be a percentage in (0, 100], a count >= 1, or 'all'") from None
    if waves[-1] != Wave():
        raise InvalidInput("the last wave must be 100% or all: a rollout ends with every device it selected")
    for a, b in itertools.pairwise(waves):
        same_kind = (a.percent is None) == (b.percent is None) and (a.count is None) == (b.count is None)
        if same_kind and ((a.percent or 0) > (b.percent or 0) or (a.count or 0) > (b.count or 0)):
            raise InvalidInput(f"waves are cumulative and must not shrink: {a} then {b}")
    return tuple(waves)


def wave_sizes(waves: Sequence[Wave], total: int) -> tuple[int, ...]:
    """The cumulative device count at the end of each wave, for ``total`` devices (non-decreasing
    even when counts and percentages are mixed)."""
    sizes, at_least = [], 0
    for w in waves:
        at_least = max(at_least, w.size(total))
        sizes.append(at_least)
    return tuple(sizes)


@dataclass(frozen=True)
class Window:
    """A maintenance window: minutes of the local day ``[start, end)`` on ``days`` (0 = Monday);
    ``end <= start`` crosses midnight."""

    days: frozenset[int]
    start: int
    end: int

    def __str__(self) -> str:
        days = "" if len(self.days) == 7 else ",".join(DAYS[d].capitalize() for d in sorted(self.days)) + " "
        return f"{days}{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"

    def contains(self, local: _dt.datetime) -> bool:
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # crossing midnight: the evening part on a listed day, the morning part the day after
        return (day in self.days and minute >= self.start) or ((day - 1) % 7 in self.days and minute < self.end)


_WINDOW = re.compile(r"^(?:(?P<days>[a-z,\-]+)\s+)?(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})$")


def _minutes(hhmm: str, what: str, allow_24: bool) -> int:
    h, m = (int(x) for x in hhmm.split(":"))
    if m > 59 or h > 24 or (h == 24 and (m or not allow_24)):
        raise InvalidInput(f"maintenance window {what} {hhmm!r} is not a time of day")
    return h * 60 + m


def _days(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        ends = part.split("-")
        try:
            idx = [DAYS.index(e[:3]) for e in ends if e]
        except ValueError:
            raise InvalidInput(f"maintenance window days {text!r}: use Mon..Sun, ranges (Mon-Fri) or lists") from None
        if len(idx) == 1 and len(ends) == 1:
            out.add(idx[0])
        elif len(idx) == 2:
            a, b = idx
            out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
        else:
            raise InvalidInput(f"maintenance window days {text!r}: use Mon..Sun, ranges (Mon-Fri) or lists")
    return frozenset(out)


def parse_window(text: str) -> Window:
    m = _WINDOW.match(text.strip().lower())
    if m is None:
        raise InvalidInput(f"maintenance window {text!r} must look like 02:00-05:00 or Mon-Fri 22:00-04:00")
    days = _days(m.group("days")) if m.group("days") else frozenset(range(7))
    start = _minutes(m.group("start"), "start", allow_24=False)
    end = _minutes(m.group("end"), "end", allow_24=True)
    if start == end:
        raise InvalidInput(f"maintenance window {text!r} is empty")
    return Window(days, start, end)


def in_windows(windows: Sequence[Window], now: float, timezone: str | None) -> bool:
    """Whether ``now`` is inside one of ``windows`` in ``timezone`` (IANA name; None or unknown:
    UTC). No windows: always."""
    if not windows:
        return True
    try:
        tz: _dt.tzinfo = ZoneInfo(timezone) if timezone else _dt.UTC
    except (ZoneInfoNotFoundError, ValueError):
        tz = _dt.UTC
    local = _dt.datetime.fromtimestamp(now, tz)
    return any(w.contains(local) for w in windows)


def check_timezone(name: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)") from None


@dataclass(frozen=True)
class InstallGate:
    """Stop when more than ``max_failure_rate`` of a wave's finished devices failed, once at least
    ``min_sample`` have finished."""

    max_failure_rate: float = 0.2
    min_sample: int = 5
    action: Literal["pause", "abort"] = "pause"

    def __post_init__(self) -> None:
        if not 0 <= self.max_failure_rate < 1:
            raise InvalidInput("install gate max_failure_rate must be in [0, 1)")
        if self.min_sample < 1:
            raise InvalidInput("install gate min_sample must be at least 1")
        if self.action not in ("pause", "abort"):
            raise InvalidInput("install gate action must be pause or abort")


@dataclass(frozen=True)
class HealthGate:
    """Compare ``metric`` on updated devices with devices not updated yet (ADR 0015): the median
    of each device's mean over ``window`` seconds (for an updated device, only since its update).
    A regression is the updated median worse than the baseline median by more than ``tolerance``
    (relative) plus ``absolute``; it pauses the rollout, and reverts with ``auto_revert``."""

    metric: str
    window: float = 300.0
    tolerance: float = 0.2
    absolute: float = 0.0
    higher_is_worse: bool = True
    min_devices: int = 3
    auto_revert: bool = False

    def __post_init__(self) -> None:
        if not self.metric or len(self.metric) > 200:
            raise InvalidInput("health gate metric must be a metric name")
        if not 0 < self.window <= 7 * 86400:
            raise InvalidInput("health gate window must be between 0 and 7 days")
        if self.tolerance < 0 or self.absolute < 0:
            raise InvalidInput("health gate tolerances must not be negative")
        if self.min_devices < 1:
            raise InvalidInput("health gate min_devices must be at least 1")


@dataclass(frozen=True)
class Pacing:
    """How fast devices are told, and when. ``None``: no limit."""

    max_per_minute: int | None = None
    max_concurrent: int | None = None
    #: at most ``per_tag_max`` devices in progress per value of tag ``per_tag`` (a site's uplink)
    per_tag: str | None = None
    per_tag_max: int | None = None
    #: each device starts after a random delay in [0, start_delay) once its wave begins
    start_delay: float = 0.0
    windows: tuple[Window, ...] = ()
    #: a failed device is tried again this many times, after retry_backoff * 2**(n-1) seconds
    retries: int = 0
    retry_backoff: float = 60.0
    #: a device told this long ago and not finished counts as failed (timed out)
    device_timeout: float = 3600.0
    #: a wave is done this long after its last device finished (the health gate's look at it)
    wave_wait: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_per_minute", "max_concurrent", "per_tag_max"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInput(f"pacing {name} must be at least 1")
        if (self.per_tag is None) != (self.per_tag_max is None):
            raise InvalidInput("pacing per_tag and per_tag_max go together")
        if self.start_delay < 0 or self.retry_backoff <= 0 or self.device_timeout <= 0 or self.wave_wait < 0:
            raise InvalidInput("pacing start_delay and wave_wait must be >= 0, retry_backoff and device_timeout > 0")
        if not 0 <= self.retries <= 10:
            raise InvalidInput("pacing retries must be between 0 and 10")


@dataclass(frozen=True)
class RolloutSpec:
    waves: tuple[Wave, ...]
    install_gate: InstallGate | None = field(default_factory=InstallGate)
    health_gate: HealthGate | None = None
    pacing: Pacing = field(default_factory=Pacing)
    #: the random order of devices (and their start delays) is drawn from this: reproducible
    seed: int = 0
    #: a selector whose devices go first (the canary wave by tag instead of at random)
    canary: str | None = None
    #: devices that match the selector later join the last wave
    include_new: bool = False
