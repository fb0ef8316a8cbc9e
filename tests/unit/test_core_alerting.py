"""Server-side alert instances: the exact state path, the helpers, and a stateful property
(firing only after a run of true spanning for_s; resolved only after firing)."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from corral.core.alerting import (
    TRANSITIONS,
    InstanceState,
    Notification,
    Observation,
    as_observation,
    event_rate_observation,
    offline_observation,
    severity_at_least,
    step,
)
from corral.protocol import SEVERITIES

# (now, observation, value, expected state, since, fired_at, notification kind or None)
ALERT_PATH: list[tuple[float, Observation, float | None, str, float | None, float | None, str | None]] = [
    (0, "unknown", None, "inactive", None, None, None),  # no data is not an alert
    (10, "false", 20.0, "inactive", None, None, None),
    (20, "true", 95.0, "pending", 20, None, None),  # start the 60 s hold
    (50, "unknown", None, "pending", 20, None, None),  # a gap keeps the clock
    (79, "true", 96.0, "pending", 20, None, None),  # 59 s < 60 s
    (80, "true", 97.0, "firing", 80, 80, "firing"),
    (90, "unknown", None, "firing", 80, 80, None),  # no data never resolves
    (95, "true", 98.0, "firing", 80, 80, None),
    (100, "false", 10.0, "inactive", 100, 80, "resolved"),
    (110, "true", 95.0, "pending", 110, 80, None),
    (120, "false", 10.0, "inactive", 120, 80, None),  # a false during the hold restarts it
    (130, "true", 95.0, "pending", 130, 80, None),
    (200, "unknown", None, "pending", 130, 80, None),  # hold time passed, but unknown never fires
    (210, "true", 99.0, "firing", 210, 210, "firing"),
]


def test_alert_path() -> None:
    instance = InstanceState()
    for now, observation, value, want_state, want_since, want_fired_at, want_kind in ALERT_PATH:
        instance, note = step(instance, observation, now, 60.0, value=value)
        assert (instance.state, instance.since, instance.fired_at) == (want_state, want_since, want_fired_at), now
        assert (note.kind if note else None) == want_kind, now
    assert instance.value == 99.0


def test_notifications_carry_times_and_values() -> None:
    instance, note = step(InstanceState(), "true", 100.0, 0.0, value=95.0)  # for 0: at once
    assert instance == InstanceState("firing", 100.0, 100.0, 95.0)
    assert note == Notification("firing", 100.0, 100.0, 95.0)
    instance, note = step(instance, "unknown", 130.0, 0.0)
    assert note is None and instance.value == 95.0  # an evaluation without a value keeps the last
    instance, note = step(instance, "false", 160.0, 0.0, value=12.0)
    assert instance == InstanceState("inactive", 160.0, 100.0, 12.0)
    assert note == Notification("resolved", 160.0, 100.0, 12.0)


def test_bad_arguments() -> None:
    for for_s in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            step(InstanceState(), "true", 0.0, for_s)
    with pytest.raises(ValueError):
        step(InstanceState(), "maybe", 0.0, 0.0)  # type: ignore[arg-type]


def test_transition_table_is_complete_and_notifies_only_on_edges() -> None:
    states = ("inactive", "pending", "firing")
    steps = ("false", "unknown", "true", "true_held")
    assert set(TRANSITIONS) == {(s, o) for s in states for o in steps}
    for (state, kind), (next_state, notify) in TRANSITIONS.items():
        if kind == "unknown":
            assert (next_state, notify) == (state, None)
        assert (notify == "firing") == (state != "firing" and next_state == "firing")
        assert (notify == "resolved") == (state == "firing" and next_state != "firing")


@pytest.mark.parametrize(
    ("last_seen", "online", "now", "threshold_s", "expected"),
    [
        (1000.0, True, 5000.0, 300.0, "false"),  # online: never an offline alert
        (None, True, 5000.0, 300.0, "false"),
        (None, False, 5000.0, 300.0, "unknown"),  # never connected: not "gone offline"
        (4800.0, False, 5000.0, 300.0, "false"),  # offline 200 s < 300 s
        (4700.0, False, 5000.0, 300.0, "true"),  # exactly the threshold
        (1000.0, False, 5000.0, 300.0, "true"),
        (6000.0, False, 5000.0, 300.0, "false"),  # seen "in the future": clock skew, just seen
        (5000.0, False, 5000.0, 0.0, "true"),
    ],
)
def test_offline_observation(
    last_seen: float | None, online: bool, now: float, threshold_s: float, expected: str
) -> None:
    assert offline_observation(last_seen, online, now, threshold_s) == expected


@pytest.mark.parametrize(("count", "threshold", "expected"), [(0, 1, "false"), (1, 1, "true"), (9, 10, "false"),
                                                              (10, 10, "true"), (11, 10, "true")])
def test_event_rate_observation(count: int, threshold: int, expected: str) -> None:
    assert event_rate_observation(count, threshold) == expected


def test_event_rate_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        event_rate_observation(1, 0)
    with pytest.raises(ValueError):
        event_rate_observation(-1, 5)


def test_as_observation() -> None:
    assert as_observation(True) == "true"
    assert as_observation(False) == "false"
    assert as_observation(None) == "unknown"
    with pytest.raises(TypeError):
        as_observation(1.0)


def test_severity_at_least() -> None:
    for i, sev in enumerate(SEVERITIES):
        for j, minimum in enumerate(SEVERITIES):
            assert severity_at_least(sev, minimum) is (i >= j)
    assert severity_at_least("critical", "warning") and not severity_at_least("info", "warning")
    with pytest.raises(ValueError):
        severity_at_least("fatal", "info")
    with pytest.raises(ValueError):
        severity_at_least("info", "severe")


class AlertMachine(RuleBasedStateMachine):
    """Drive one instance with arbitrary observations and time steps; hold it to the spec.

    The model: a *run* starts at a ``true`` seen while not firing and with no run going, and
    ends at a ``false``; ``unknown`` neither starts nor ends one. The instance must fire exactly
    on a ``true`` that comes ``for_s`` or more after its run started, and resolve exactly on the
    first ``false`` after firing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.instance = InstanceState()
        self.now = 1_000.0
        self.for_s = 0.0
        self.run_start: float | None = None
        self.firing = False
        self.notes: list[str] = []

    @initialize(for_s=st.sampled_from([0.0, 1.0, 30.0, 300.0]))
    def hold(self, for_s: float) -> None:
        self.for_s = for_s

    @rule(observation=st.sampled_from(["true", "false", "unknown"]), dt=st.floats(0.0, 120.0))
    def observe(self, observation: Observation, dt: float) -> None:
        self.now += dt
        if observation == "true" and self.run_start is None and not self.firing:
            self.run_start = self.now
        self.instance, note = step(self.instance, observation, self.now, self.for_s)
        should_fire = (
            observation == "true" and not self.firing
            and self.run_start is not None and self.now - self.run_start >= self.for_s
        )
        should_resolve = observation == "false" and self.firing
        assert (note is not None and note.kind == "firing") == should_fire
        assert (note is not None and note.kind == "resolved") == should_resolve
        if note is not None:
            self.notes.append(note.kind)
            assert note.at == self.now
        if observation == "false":
            self.run_start = None
        self.firing = (self.firing or should_fire) and not should_resolve

    @invariant()
    def state_matches_the_model(self) -> None:
        expected = "firing" if self.firing else "pending" if self.run_start is not None else "inactive"
        assert self.instance.state == expected
        if self.instance.state == "pending":
            assert self.instance.since == self.run_start

    @invariant()
    def notifications_alternate_starting_with_firing(self) -> None:
        assert all(kind == ("firing" if i % 2 == 0 else "resolved") for i, kind in enumerate(self.notes))


TestAlertMachine = AlertMachine.TestCase
TestAlertMachine.settings = settings(max_examples=150, stateful_step_count=40)
