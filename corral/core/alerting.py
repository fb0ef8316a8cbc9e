"""Server-side alert instances: one state machine per (alert, device or group), one table.

An alert (threshold over a metric expression, absence/offline, event rate) is evaluated on a
schedule for every device or group in its scope. Each evaluation reduces to an observation,
``true`` (the alert's condition holds), ``false`` or ``unknown`` (no data, the expression's
value is unknown), and :func:`step` moves that instance's :class:`InstanceState` and says
whether to notify (webhooks): ``firing`` once when the condition has held for ``for_s``,
``resolved`` once when it stops holding. The helpers turn the raw facts into observations:
:func:`as_observation` for an expression result (``corral.core.expr.evaluate``),
:func:`offline_observation` and :func:`event_rate_observation` for the other alert kinds.

The machine (``true_held`` is a ``true`` that comes at least ``for_s`` after the pending
state began, or any ``true`` when ``for_s`` is 0)::

    state     observation  next      notify     why
    --------  -----------  --------  ---------  ----------------------------------------------
    inactive  false        inactive  -
    inactive  unknown      inactive  -          no data is not a problem by itself
    inactive  true         pending   -          start the hold clock
    inactive  true_held    firing    firing     for_s == 0: fires on the first true
    pending   false        inactive  -          one false restarts the hold from scratch
    pending   unknown      pending   -          keeps the clock running, but cannot fire
    pending   true         pending   -
    pending   true_held    firing    firing
    firing    false        inactive  resolved
    firing    unknown      firing    -          stays firing: only evidence resolves an alert
    firing    true         firing    -          (a data gap must not send resolved + firing)
    firing    true_held    firing    -

So a ``firing`` notification needs a run of ``true`` observations (``unknown`` may sit in
between, ``false`` may not) that spans at least ``for_s`` and ends with a ``true``, and a
``resolved`` notification always follows a ``firing`` one. Time is passed in (``now``, epoch
seconds); nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from corral import protocol

__all__ = [
    "TRANSITIONS",
    "AlertState",
    "InstanceState",
    "Notification",
    "Observation",
    "Step",
    "as_observation",
    "event_rate_observation",
    "offline_observation",
    "severity_at_least",
    "step",
]

AlertState: TypeAlias = Literal["inactive", "pending", "firing"]
Observation: TypeAlias = Literal["true", "false", "unknown"]
#: An observation as the table sees it: ``true`` split by whether the hold time has passed.
Step: TypeAlias = Literal["false", "unknown", "true", "true_held"]
_Notify: TypeAlias = Literal["firing", "resolved"] | None

#: (state, step) -> (next state, notification). See the module docstring for the why.
TRANSITIONS: Final[Mapping[tuple[AlertState, Step], tuple[AlertState, _Notify]]] = {
    # state        step            next         notify
    ("inactive",   "false"):      ("inactive", None),
    ("inactive",   "unknown"):    ("inactive", None),
    ("inactive",   "true"):       ("pending",  None),
    ("inactive",   "true_held"):  ("firing",   "firing"),
    ("pending",    "false"):      ("inactive", None),
    ("pending",    "unknown"):    ("pending",  None),
    ("pending",    "true"):       ("pending",  None),
    ("pending",    "true_held"):  ("firing",   "firing"),
    ("firing",     "false"):      ("inactive", "resolved"),
    ("firing",     "unknown"):    ("firing",   None),
    ("firing",     "true"):       ("firing",   None),
    ("firing",     "true_held"):  ("firing",   None),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class InstanceState:
    """One alert instance.

    ``since``: when it entered ``state`` (for ``pending``, when the condition began to hold;
    None while it has never left ``inactive``). ``fired_at``: when it last began firing, kept
    after it resolves (None if it never fired). ``value``: the last value observed (an
    evaluation without a value does not erase it).
    """

    state: AlertState = "inactive"
    since: float | None = None
    fired_at: float | None = None
    value: float | None = None


@dataclass(frozen=True, slots=True)
class Notification:
    """Send this: ``firing`` (``fired_at == at``) or ``resolved`` (``fired_at``: when it began)."""

    kind: Literal["firing", "resolved"]
    at: float
    fired_at: float
    value: float | None = None


def step(
    instance: InstanceState,
    observation: Observation,
    now: float,
    for_s: float,
    *,
    value: float | None = None,
) -> tuple[InstanceState, Notification | None]:
    """Take one transition for an evaluation at ``now`` that observed ``observation``.

    ``for_s`` is the alert's hold time (0: fire on the first ``true``); ``value`` is what the
    evaluation saw, if anything (kept in the state and put in notifications).
    """
    if not (math.isfinite(for_s) and for_s >= 0.0):
        raise ValueError(f"for_s must be a finite number >= 0, not {for_s!r}")
    kind: Step
    if observation == "true":
        started = instance.since if instance.state == "pending" and instance.since is not None else now
        kind = "true_held" if now - started >= for_s else "true"
    elif observation in ("false", "unknown"):
        kind = observation
    else:
        raise ValueError(f"unknown observation {observation!r} (true, false or unknown)")
    next_state, notify = TRANSITIONS[(instance.state, kind)]
    since = instance.since if next_state == instance.state else now
    fired_at = now if notify == "firing" else instance.fired_at
    last = instance.value if value is None else value
    state = InstanceState(next_state, since, fired_at, last)
    if notify is None:
        return state, None
    assert fired_at is not None  # a resolved notification only leaves a firing state
    return state, Notification(notify, now, fired_at, last)


def as_observation(result: float | bool | None) -> Observation:
    """An expression result (``expr.evaluate`` of a condition) as an observation.

    Raises ``TypeError`` for a number: only a condition can be observed.
    """
    if result is None:
        return "unknown"
    if not isinstance(result, bool):
        raise TypeError(f"an alert observes a condition (true/false), not the number {result!r}")
    return "true" if result else "false"


def offline_observation(last_seen: float | None, online: bool, now: float, threshold_s: float) -> Observation:
    """The offline alert: ``true`` when the device has been offline for ``threshold_s`` or more.

    A device that never connected (``last_seen`` None while offline) is ``unknown``: it has not
    gone offline, it was never online (pre-provisioned, not yet installed). A ``last_seen`` in
    the future (clock skew between server nodes) counts as just seen.
    """
    if online:
        return "false"
    if last_seen is None:
        return "unknown"
    return "true" if now - last_seen >= threshold_s else "false"


def event_rate_observation(count: int, threshold: int) -> Observation:
    """The event-rate alert: ``true`` when ``count`` events in the window reach ``threshold``."""
    if threshold < 1:
        raise ValueError(f"an event-rate threshold must be at least 1, not {threshold}")
    if count < 0:
        raise ValueError(f"an event count cannot be negative, not {count}")
    return "true" if count >= threshold else "false"


_RANK: Final[Mapping[str, int]] = {name: rank for rank, name in enumerate(protocol.SEVERITIES)}


def severity_at_least(sev: str, minimum: str) -> bool:
    """Whether ``sev`` is ``minimum`` or more severe, in ``protocol.SEVERITIES`` order."""
    for name in (sev, minimum):
        if name not in _RANK:
            raise ValueError(f"unknown severity {name!r} (one of {', '.join(protocol.SEVERITIES)})")
    return _RANK[sev] >= _RANK[minimum]
