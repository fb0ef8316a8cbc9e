"""Reconnect delays: exponential backoff with *full* jitter.

Every agent reconnects after a disconnect. If a thousand agents lose a restarted server at the
same instant and all retry after exactly 1 s, 2 s, 4 s ..., they arrive in synchronised waves
and the server is hit by the whole fleet at every wave. Full jitter (AWS architecture blog,
"Exponential Backoff And Jitter") draws each delay uniformly from the whole window::

    delay = uniform(0, min(cap, base * 2 ** attempt))

so the fleet's reconnects are spread evenly over the window, and the window doubles each time
an attempt fails, up to ``cap``. The attempt counter goes back to zero only after a connection
that *stayed up* for ``reset_after`` seconds: a server that accepts and immediately drops
connections must not keep the fleet on the shortest window.

Pure logic: the random source is injected (seeded in tests, shared by the simulator's agents)
and time is passed in by the caller; nothing here sleeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# 2**62 times any sane base is far beyond any cap; bounding the exponent keeps the arithmetic
# finite however long a device stays offline.
_MAX_EXPONENT = 62


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Limits of the backoff, in seconds."""

    base: float = 1.0
    cap: float = 300.0
    reset_after: float = 60.0

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ValueError(f"backoff base must be > 0, got {self.base}")
        if not self.cap >= self.base:
            raise ValueError(f"backoff cap must be >= base ({self.base}), got {self.cap}")
        if not self.reset_after >= 0:
            raise ValueError(f"backoff reset_after must be >= 0, got {self.reset_after}")

    def window(self, attempt: int) -> float:
        """The upper bound of the delay drawn for the given (0-based) attempt."""
        exponent = min(max(attempt, 0), _MAX_EXPONENT)
        return min(self.cap, self.base * float(2**exponent))


class Backoff:
    """The reconnect state of one agent.

    Usage: call :meth:`next_delay` before every reconnect attempt, :meth:`connected` when a
    session is established and :meth:`disconnected` when it ends.
    """

    __slots__ = ("_rng", "_up_since", "attempt", "policy")

    def __init__(self, policy: BackoffPolicy | None = None, rng: random.Random | None = None) -> None:
        self.policy = policy or BackoffPolicy()
        self._rng = rng if rng is not None else random.Random()
        self.attempt = 0
        self._up_since: float | None = None

    def next_delay(self) -> float:
        """Draw the delay before the next attempt and move to the next (wider) window."""
        window = self.policy.window(self.attempt)
        if self.attempt < _MAX_EXPONENT:
            self.attempt += 1
        return self._rng.uniform(0.0, window)

    def connected(self, now: float) -> None:
        """A session was established at monotonic time ``now``."""
        self._up_since = now

    def disconnected(self, now: float) -> None:
        """The session ended at ``now``; a long enough session resets the attempt counter."""
        if self._up_since is not None and now - self._up_since >= self.policy.reset_after:
            self.reset()
        self._up_since = None

    def reset(self) -> None:
        self.attempt = 0
