"""Human durations: ``30s``, ``5m``, ``24h``, ``7d``, ``1h30m``, or plain seconds."""

from __future__ import annotations

import datetime as _dt
import re

from corral.errors import InvalidInput

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    s = text.strip().lower()
    if not s:
        raise InvalidInput("empty duration")
    try:
        value = float(s)
    except ValueError:
        pos, total = 0, 0.0
        for m in _PART.finditer(s):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise InvalidInput(f"not a duration: {text!r} (examples: 30s, 15m, 24h, 7d, 1h30m)") from None
        value = total
    if value <= 0 or value != value or value == float("inf"):
        raise InvalidInput(f"duration must be positive: {text!r}")
    return value


def parse_time(text: str, now: float) -> float:
    """A point in time: a duration ago (``1h``), an ISO 8601 timestamp (UTC unless it says
    otherwise), or epoch seconds (``@1700000000``). Returns epoch seconds."""
    s = text.strip()
    if s.startswith("@"):
        try:
            return float(s[1:])
        except ValueError:
            raise InvalidInput(f"not an epoch time: {text!r}") from None
    if s.lower() == "now":
        return now
    try:
        return now - parse_duration(s)
    except InvalidInput:
        pass
    try:
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"not a time: {text!r} (a duration ago like 1h, an ISO 8601 time, or @EPOCH)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t.timestamp()
