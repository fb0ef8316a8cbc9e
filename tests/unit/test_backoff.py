"""Full-jitter exponential backoff (corral.core.backoff): pure, seeded, no clocks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.backoff import Backoff, BackoffPolicy


def test_windows_double_up_to_the_cap() -> None:
    p = BackoffPolicy(base=1.0, cap=60.0)
    assert [p.window(a) for a in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert p.window(10_000) == 60.0  # no overflow however long a device stays offline


def test_each_delay_is_drawn_from_the_current_window() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b  # the top of the window: makes the window observable

    b = Backoff(BackoffPolicy(base=0.5, cap=10.0), rng=Top())
    assert [b.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


@given(
    base=st.floats(0.001, 100),
    factor=st.floats(1, 1000),
    seed=st.integers(0, 2**32),
    attempts=st.integers(1, 200),
)
def test_delays_stay_within_zero_and_the_cap(base: float, factor: float, seed: int, attempts: int) -> None:
    policy = BackoffPolicy(base=base, cap=base * factor)
    b = Backoff(policy, rng=random.Random(seed))
    for i in range(attempts):
        d = b.next_delay()
        assert 0.0 <= d <= policy.window(i) <= policy.cap


def test_a_long_session_resets_the_window() -> None:
    b = Backoff(BackoffPolicy(base=1, cap=100, reset_after=30), rng=random.Random(1))
    for _ in range(5):
        b.next_delay()
    assert b.attempt == 5
    b.connected(now=1000.0)
    b.disconnected(now=1031.0)
    assert b.attempt == 0


def test_a_short_session_keeps_the_window_growing() -> None:
    """A server that accepts and drops at once must not keep the fleet on the shortest window."""
    b = Backoff(BackoffPolicy(base=1, cap=100, reset_after=30), rng=random.Random(1))
    for _ in range(3):
        b.next_delay()
    b.connected(now=1000.0)
    b.disconnected(now=1002.0)
    assert b.attempt == 3
    b.disconnected(now=5000.0)  # without a new connected(): nothing to reset on
    assert b.attempt == 3


@pytest.mark.parametrize("kwargs", [{"base": 0}, {"base": -1}, {"base": 5, "cap": 1}, {"reset_after": -1}])
def test_invalid_policy(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)


def _spread(delays: list[float], window: float, buckets: int = 20) -> list[int]:
    counts = [0] * buckets
    for d in delays:
        counts[min(int(d / window * buckets), buckets - 1)] += 1
    return counts


@pytest.mark.parametrize("attempt", [0, 3])
def test_a_thousand_agents_spread_their_reconnects_over_the_window(attempt: int) -> None:
    """A restarted server sees 1,000 agents' reconnects spread evenly, not in one wave.

    Each agent has its own generator (seeded: the test is deterministic); after a long session
    each is on the first window. The delays must cover the whole window uniformly: no bucket
    of the window holds much more than its share (chi-square, df=19, p=0.001 bound 43.8), and
    with full jitter the earliest and the latest reconnects are nearly a whole window apart.
    """
    policy = BackoffPolicy(base=2.0, cap=300.0, reset_after=60.0)
    agents = [Backoff(policy, rng=random.Random(1000 + i)) for i in range(1000)]
    for b in agents:
        b.connected(now=0.0)
        b.disconnected(now=3600.0)
        for _ in range(attempt):  # failed attempts while the server was still down
            b.next_delay()
    delays = [b.next_delay() for b in agents]
    window = policy.window(attempt)

    assert all(0.0 <= d <= window for d in delays)
    counts = _spread(delays, window)
    expected = len(delays) / len(counts)
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 43.8, counts
    assert max(counts) < 2 * expected, counts  # no clump
    assert min(delays) < 0.02 * window and max(delays) > 0.98 * window
    assert len(set(delays)) == len(delays)  # no two agents in lockstep


def test_a_shared_generator_also_spreads_agents() -> None:
    """The simulator shares one generator between its agents: still no clumping."""
    rng = random.Random(7)
    policy = BackoffPolicy(base=1.0, cap=60.0)
    delays = [Backoff(policy, rng=rng).next_delay() for _ in range(1000)]
    counts = _spread(delays, policy.window(0))
    assert max(counts) < 100 and min(counts) > 0, counts
