"""When to try a failed webhook delivery again, and when to give up.

A webhook receiver that is down for a deploy should get its notifications a few seconds later;
one that is down for a day should not be hammered meanwhile, and nobody wants an alert from last
week. So the delays grow quickly and then level off, and the whole schedule spans about a day::

    attempt  1  fails -> wait 5 s       attempt  5 fails -> wait 30 min
    attempt  2  fails -> wait 30 s      attempt  6 fails -> wait 1 h
    attempt  3  fails -> wait 2 min     attempt  7..17 fail -> wait 2 h each
    attempt  4  fails -> wait 10 min    attempt 18 fails -> give up (about 23.7 h after the first)

``scale`` multiplies every delay. It exists so tests (and staging setups) can run the whole
schedule in seconds; production leaves it at 1.

No jitter: unlike a fleet reconnecting to one server (``corral.core.backoff``), the deliveries to
one receiver failed at different moments, so their retries are already spread out.

Pure logic: no clocks, no I/O.
"""

from __future__ import annotations

#: Delays after the 1st, 2nd, ... failed attempt, in seconds.
FIRST_DELAYS: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
#: The delay after every later failed attempt.
STEADY_DELAY = 7200.0
#: Attempts in all (the first one included); after the last one fails the delivery is given up.
MAX_ATTEMPTS = 18


def next_attempt_delay(attempt: int, scale: float = 1.0) -> float | None:
    """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next one,
    or ``None`` when that was the last attempt and the delivery has failed for good."""
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if attempt >= MAX_ATTEMPTS:
        return None
    base = FIRST_DELAYS[attempt - 1] if attempt <= len(FIRST_DELAYS) else STEADY_DELAY
    return base * scale


def total_retry_window(scale: float = 1.0) -> float:
    """Seconds from the first attempt to the last one (if every attempt fails)."""
    total = 0.0
    attempt = 1
    while (delay := next_attempt_delay(attempt, scale)) is not None:
        total += delay
        attempt += 1
    return total
