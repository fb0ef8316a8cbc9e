"""The webhook retry schedule (corral.core.retry): pure, no clocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.core.retry import MAX_ATTEMPTS, next_attempt_delay, total_retry_window


def test_the_schedule_grows_then_levels_off_then_gives_up() -> None:
    delays = [next_attempt_delay(a) for a in range(1, MAX_ATTEMPTS + 1)]
    assert delays[:7] == [5, 30, 120, 600, 1800, 3600, 7200]
    assert delays[6:-1] == [7200] * (MAX_ATTEMPTS - 7)
    assert delays[-1] is None  # the last attempt failed: give up
    assert next_attempt_delay(MAX_ATTEMPTS + 100) is None


def test_the_whole_schedule_spans_about_a_day() -> None:
    assert 22 * 3600 <= total_retry_window() <= 24 * 3600


@given(scale=st.floats(1e-6, 100), attempt=st.integers(1, MAX_ATTEMPTS - 1))
def test_scale_multiplies_every_delay(scale: float, attempt: int) -> None:
    base = next_attempt_delay(attempt)
    scaled = next_attempt_delay(attempt, scale)
    assert base is not None and scaled is not None
    assert scaled == pytest.approx(base * scale)
    assert next_attempt_delay(MAX_ATTEMPTS, scale) is None  # the number of attempts does not scale


def test_a_scaled_schedule_runs_in_seconds() -> None:
    assert total_retry_window(0.0001) < 10


@given(attempt=st.integers(1, MAX_ATTEMPTS - 2))
def test_delays_never_shrink(attempt: int) -> None:
    a, b = next_attempt_delay(attempt), next_attempt_delay(attempt + 1)
    assert a is not None and b is not None and a <= b


@pytest.mark.parametrize(("attempt", "scale"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -2.0)])
def test_nonsense_is_refused(attempt: int, scale: float) -> None:
    with pytest.raises(ValueError):
        next_attempt_delay(attempt, scale)
