"""The update flow on a device: one transition table, persisted before every side effect (DESIGN §4).

Pure: no I/O, no clock. The I/O layer (``corral.agent.update``) owns an :class:`UpdateRecord`
on disk and runs this loop::

    record, actions = step(record, event, limits)   # or resume(record, now, limits) at start
    persist(record)                                 # atomically, fsync'd: *before* any effect
    report(record.status, record.seq)               # at-least-once; the server orders by seq
    for action in actions: perform(action)          # each ends in the next event

so a crash or power cut at any point leaves a record that says what was under way, and the
row ``(state, RESUMED)`` of the same table says how to go on. Every artifact kind (app bundle,
rootfs image, script/update module, the agent itself) goes through the same table; what differs
per kind is data (:data:`KIND_POLICIES`): how the new version is started, and whether its install
touches the running system.

The happy path, and where failures lead (``*`` = a retry or a resume loops on the state)::

    idle ─start─► downloading* ─downloaded─► verifying* ─verified─► installing* ─installed─►
      │                │                        │                      │
      │ cancel         │ gave_up, cancel        │ verify_failed,       │ install_failed (A/B),
      ▼                ▼                        ▼ gave_up, cancel      ▼ gave_up
    ┌──────────────────────── failed (final: nothing the device runs was changed) ────────────┐

    ─► switching* ─switched─► restarting* ─restarted, resumed─► health_checking* ─healthy─► committing*
          │                      │                                   │                         │     │
          │ switch_failed,       │ restart_failed,                   │ unhealthy,              │     │ committed
          │ gave_up              │ gave_up,                          │ health_timeout,         │     ▼
          │                      │ boot_count_exceeded               │ boot_count_exceeded     │   committed (final:
          ▼                      ▼                                   ▼                gave_up  ▼   the new version,
    ┌──────────────────────────────── rolling_back* ────────────────────────────────────────┐    made permanent)
        │ rolled_back                                   │ gave_up
        ▼                                               ▼
    rolled_back (final: the previous version          rollback_failed (final, reported as failed:
    is active and runs again)                         the device needs a person)

An in-place kind (script) goes from installing to rolling_back instead: its install hook may
already have changed the system, so its rollback hook has to undo it.

Resume after a crash, per state (the ``RESUMED`` rows). A resume counts as an attempt of the step
it interrupted, so a crash loop there ends in ``gave_up``; on trial it counts a boot instead:

- idle: nothing was done: start downloading.
- downloading: download again; the partial file is kept and resumed with Range (the final TUF
  length and hash check makes that safe).
- verifying: verification only reads: verify again.
- installing: an A/B kind installs again from the start (the inactive slot is scratch); an
  in-place kind is rolled back (a half-run install hook cannot be resumed).
- switching: the switch is idempotent ("make slot X active"): switch again.
- restarting: the start that finds the record *is* the restart (a rootfs reboot, the agent
  restarted under its watchdog); for an app the agent's supervisor starts the active slot's
  process on start. Count a boot and start the health check. But when the I/O layer says the new
  version is not what runs (``resume(..., restarted=False)``: the agent died before the reboot or
  hand-over), restart again, as one more attempt.
- health_checking: another start of the new version while on trial: count a boot and open a new
  health window (the wall clock may have jumped across a reboot, so an old deadline means
  nothing); the boot counter bounds the windows: past ``max_boot_attempts`` it rolls back.
- committing: commit is idempotent: finish it.
- rolling_back: rollback is idempotent ("make the previous slot active and running"): finish it.
  A start is not held against it (a rootfs or agent rollback restarts by design, and the previous
  version is the one known to work): only failures the rollback reports count toward giving up.
- final states: nothing to do but report ``record.status`` again (the report may not have left)
  and, once the server has it, delete the record.

Statuses follow AWS IoT Jobs (:data:`corral.protocol.DeploymentStatus`): ``queued`` for a
record that has not started, ``in-progress`` with the step (the state's name) and, on a retry, why,
then one of ``succeeded``, ``failed`` (with the reason) or ``rolled-back`` (with the reason that
caused it). A failed rollback is reported as ``failed`` whose reason says the rollback failed and
the device needs attention: never as ``rolled-back``.

A few events are *refined* before the table is read, by the record's counters and the kind
(:func:`_refine`, the only conditions outside the table): a retryable failure or a resume with
the step's attempts spent becomes ``gave_up``; a resume on trial with the boot counter spent
becomes ``boot_count_exceeded``; ``healthy`` after the health deadline becomes ``health_timeout``;
an in-place kind's failed or interrupted install becomes ``install_failed_in_place``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Literal

import msgspec

from corral.errors import Conflict, InvalidInput
from corral.protocol import DeploymentStatus


class State(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    SWITCHING = "switching"
    RESTARTING = "restarting"
    HEALTH_CHECKING = "health_checking"
    COMMITTING = "committing"
    ROLLING_BACK = "rolling_back"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    ROLLBACK_FAILED = "rollback_failed"


FINAL_STATES = frozenset({State.COMMITTED, State.ROLLED_BACK, State.FAILED, State.ROLLBACK_FAILED})
#: From here on the device may run (or boot into) the new version: a failure rolls back.
AFTER_SWITCH = frozenset({State.SWITCHING, State.RESTARTING, State.HEALTH_CHECKING, State.COMMITTING})


class EventKind(StrEnum):
    START = "start"
    CANCEL = "cancel"
    DOWNLOADED = "downloaded"
    DOWNLOAD_FAILED = "download_failed"
    VERIFIED = "verified"
    VERIFY_FAILED = "verify_failed"
    INSTALLED = "installed"
    INSTALL_FAILED = "install_failed"
    SWITCHED = "switched"
    SWITCH_FAILED = "switch_failed"
    RESTARTED = "restarted"
    RESTART_FAILED = "restart_failed"
    NOT_RESTARTED = "not_restarted"  # from resume(): the agent started, but not into the new version
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    HEALTH_TIMEOUT = "health_timeout"
    COMMITTED = "committed"
    COMMIT_FAILED = "commit_failed"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    RESUMED = "resumed"
    # Only ever produced by _refine, never sent by the I/O layer:
    GAVE_UP = "gave_up"
    BOOT_COUNT_EXCEEDED = "boot_count_exceeded"
    INSTALL_FAILED_IN_PLACE = "install_failed_in_place"


#: The reason :func:`resume` gives: what a status says of a step that a crash interrupted.
RESUMED_REASON = "the agent restarted"
REFINED_EVENTS = frozenset({EventKind.GAVE_UP, EventKind.BOOT_COUNT_EXCEEDED, EventKind.INSTALL_FAILED_IN_PLACE})


@dataclass(frozen=True)
class Event:
    """What happened, when (``at``: the I/O layer's wall clock, seconds), and why (failures)."""

    kind: EventKind
    at: float
    reason: str = ""


# --- kinds and limits ---------------------------------------------------------------------------

ArtifactKind = Literal["app", "rootfs", "script", "agent"]
#: How the new (or, on rollback, the old) version is started after the switch.
RestartMode = Literal["process", "reboot", "agent", "none"]


@dataclass(frozen=True)
class KindPolicy:
    restart: RestartMode
    in_place: bool  # the install changes the running system: no inactive slot to throw away


KIND_POLICIES: Mapping[ArtifactKind, KindPolicy] = MappingProxyType({
    "app": KindPolicy(restart="process", in_place=False),  # supervised process of the new slot
    "rootfs": KindPolicy(restart="reboot", in_place=False),  # bootloader tries the new partition
    "agent": KindPolicy(restart="agent", in_place=False),  # new agent under a watchdog
    "script": KindPolicy(restart="none", in_place=True),  # update module's hooks act in place
})


@dataclass(frozen=True)
class UpdateLimits:
    """How often each step may be tried (the first attempt included; a resume counts), how many
    starts of the new version a trial may take, and how long a health check may take."""

    download_attempts: int = 5
    verify_attempts: int = 3
    install_attempts: int = 2
    switch_attempts: int = 3
    restart_attempts: int = 3
    commit_attempts: int = 5
    rollback_attempts: int = 5
    max_boot_attempts: int = 3
    health_timeout: float = 300.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise InvalidInput(f"update limit {name} must be positive, not {value!r}")

    def attempts(self, state: State) -> int | None:
        """The attempt budget of a state, or None for a state that is never retried."""
        budget = {
            State.DOWNLOADING: self.download_attempts,
            State.VERIFYING: self.verify_attempts,
            State.INSTALLING: self.install_attempts,
            State.SWITCHING: self.switch_attempts,
            State.RESTARTING: self.restart_attempts,
            State.COMMITTING: self.commit_attempts,
            State.ROLLING_BACK: self.rollback_attempts,
        }
        return budget.get(state)


DEFAULT_LIMITS = UpdateLimits()


# --- actions: what the I/O layer does after persisting ---------------------------------------


class ActionKind(StrEnum):
    DOWNLOAD = "download"
    VERIFY = "verify"
    INSTALL = "install"
    SWITCH = "switch"
    RESTART = "restart"
    START_HEALTH_CHECK = "start_health_check"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    CLEANUP = "cleanup"


@dataclass(frozen=True)
class Action:
    """One side effect. ``attempt`` is 1 for the first try of the step; ``slot`` is the slot to
    install into or make active (None for an in-place kind); ``restart`` how to start what the
    slot holds; ``deadline`` when a health check must have answered (wall clock, seconds)."""

    kind: ActionKind
    attempt: int = 1
    slot: str | None = None
    restart: RestartMode = "none"
    deadline: float | None = None


# --- the persisted record ----------------------------------------------------------------------

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class Artifact(msgspec.Struct, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    version: Annotated[str, msgspec.Meta(min_length=1)]
    kind: ArtifactKind


class Status(msgspec.Struct, frozen=True):
    """What the device reports: the AWS-style status, the step it is at, and why."""

    status: DeploymentStatus
    step: str
    reason: str = ""


class UpdateRecord(msgspec.Struct, frozen=True):
    """One deployment on one device, as persisted. ``seq`` grows by one per step.

    Decoding checks types, ranges and that the fields agree with each other (status and state,
    slots and kind, ...). It ignores fields it does not know: an older agent that the self-update
    watchdog restores must still read what the newer one wrote, to roll back and report.
    ``version`` changes only for a change an older reader could not survive; another is refused.
    """

    deployment_id: Annotated[str, msgspec.Meta(min_length=1)]
    artifact: Artifact
    target_slot: str | None  # None: in-place kind
    previous_slot: str | None
    previous_version: str | None  # None: nothing of this name was installed before
    health_timeout: Annotated[float, msgspec.Meta(gt=0)]
    state: State = State.IDLE
    status: Status = Status("queued", State.IDLE.value)
    seq: NonNegative = 0
    attempts: dict[State, NonNegative] = {}
    boot_count: NonNegative = 0
    health_deadline: float | None = None
    reason: str = ""  # why the deployment left the happy path ("" while it has not)
    version: Literal[1] = 1

    def __post_init__(self) -> None:
        policy = KIND_POLICIES[self.artifact.kind]
        if policy.in_place != (self.target_slot is None):
            raise ValueError(f"{self.artifact.kind} updates {'have no' if policy.in_place else 'need a'} target slot")
        if self.target_slot is not None and self.target_slot == self.previous_slot:
            raise ValueError(f"target slot {self.target_slot!r} is the running one")
        if self.status.status != _status_of(self.state):
            raise ValueError(f"state {self.state} cannot report {self.status.status!r}")
        if self.state is State.HEALTH_CHECKING and self.health_deadline is None:
            raise ValueError("health_checking without a health deadline")
        if self.boot_count and self.state in _BEFORE_SWITCH:
            raise ValueError(f"a boot counted in state {self.state}, before the switch")
        if self.state in (State.FAILED, State.ROLLED_BACK, State.ROLLBACK_FAILED) and not self.reason:
            raise ValueError(f"state {self.state} without a reason")

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def policy(self) -> KindPolicy:
        return KIND_POLICIES[self.artifact.kind]


_BEFORE_SWITCH = frozenset({State.IDLE, State.DOWNLOADING, State.VERIFYING, State.INSTALLING, State.FAILED})


def _status_of(state: State) -> DeploymentStatus:
    final: dict[State, DeploymentStatus] = {
        State.IDLE: "queued",
        State.COMMITTED: "succeeded",
        State.ROLLED_BACK: "rolled-back",
        State.FAILED: "failed",
        State.ROLLBACK_FAILED: "failed",
    }
    return final.get(state, "in-progress")


def new_record(
    deployment_id: str,
    artifact: Artifact,
    *,
    target_slot: str | None,
    previous_slot: str | None,
    previous_version: str | None,
    health_timeout: float | None = None,
    limits: UpdateLimits = DEFAULT_LIMITS,
) -> UpdateRecord:
    """A deployment accepted by the device, not started (state idle, status queued).
    ``health_timeout`` is the artifact's own (``[health] timeout``), else the limits'."""
    try:
        return UpdateRecord(
            deployment_id, artifact, target_slot, previous_slot, previous_version,
            health_timeout if health_timeout is not None else limits.health_timeout,
        )
    except ValueError as e:
        raise InvalidInput(f"update record for deployment {deployment_id!r}: {e}") from None


class CorruptRecord(InvalidInput):
    """A persisted update record that does not decode or is not consistent."""

    code = "corrupt_update_record"


class InvalidTransition(Conflict):
    """An event the table has no row for in the record's state (a bug in the caller, or a
    command such as cancel that comes too late): the record is unchanged."""

    code = "invalid_transition"

    def __init__(self, state: State, event: EventKind) -> None:
        super().__init__(f"update flow: event {event} is not allowed in state {state}")
        self.state = state
        self.event = event


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(UpdateRecord)


def encode(record: UpdateRecord) -> bytes:
    return _ENCODER.encode(record)


def decode(data: bytes) -> UpdateRecord:
    """The record in ``data``; :class:`CorruptRecord` names what is wrong with a bad one."""
    try:
        return _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CorruptRecord(f"update record does not decode: {e}") from None


# --- the table -----------------------------------------------------------------------------------

S, E, A = State, EventKind, ActionKind


@dataclass(frozen=True)
class Transition:
    """The next state, the actions to perform once it is persisted, and (for a failure or a
    retry) the words that say why in the reported reason."""

    next: State
    actions: tuple[ActionKind, ...] = ()
    why: str = ""
    counted: bool = True  # a loop on the same state is one more attempt of its step




def _t(next_state: State, *rest: str, counted: bool = True) -> Transition:
    """A row: the next state, then the reason words (a plain str, if any), then the actions."""
    why = rest[0] if rest and not isinstance(rest[0], ActionKind) else ""
    return Transition(next_state, tuple(ActionKind(a) for a in rest if isinstance(a, ActionKind)), why, counted)


# fmt: off
_BY_STATE: dict[State, dict[EventKind, Transition]] = {
    # accepted, not started
    S.IDLE: {
        E.START:                   _t(S.DOWNLOADING, A.DOWNLOAD),
        E.RESUMED:                 _t(S.DOWNLOADING, A.DOWNLOAD),                            # nothing done yet: start
        E.CANCEL:                  _t(S.FAILED, "cancelled"),                                # nothing to undo
    },
    # fetching the artifact (TUF-verified bytes into the download dir)
    S.DOWNLOADING: {
        E.DOWNLOADED:              _t(S.VERIFYING, A.VERIFY),
        E.DOWNLOAD_FAILED:         _t(S.DOWNLOADING, "download failed", A.DOWNLOAD),         # transient: retry, Range
        E.RESUMED:                 _t(S.DOWNLOADING, "interrupted", A.DOWNLOAD),             # partial file kept: Range
        E.GAVE_UP:                 _t(S.FAILED, "download failed", A.CLEANUP),               # nothing installed
        E.CANCEL:                  _t(S.FAILED, "cancelled", A.CLEANUP),
    },
    # checking the download against its TUF target and this device (kind, compatibility, space)
    S.VERIFYING: {
        E.VERIFIED:                _t(S.INSTALLING, A.INSTALL),
        E.VERIFY_FAILED:           _t(S.FAILED, "verification failed", A.CLEANUP),           # wrong bytes: no retry
        E.RESUMED:                 _t(S.VERIFYING, "interrupted", A.VERIFY),                 # only reads: redo
        E.GAVE_UP:                 _t(S.FAILED, "verification kept crashing", A.CLEANUP),
        E.CANCEL:                  _t(S.FAILED, "cancelled", A.CLEANUP),
    },
    # writing the inactive slot (A/B), or running the install hook (in place)
    S.INSTALLING: {
        E.INSTALLED:               _t(S.SWITCHING, A.SWITCH),
        E.INSTALL_FAILED:          _t(S.FAILED, "install failed", A.CLEANUP),                # A/B: running slot is safe
        E.INSTALL_FAILED_IN_PLACE: _t(S.ROLLING_BACK, "install failed", A.ROLLBACK),         # the hook changed things
        E.RESUMED:                 _t(S.INSTALLING, "interrupted", A.INSTALL),               # inactive slot is scratch
        E.GAVE_UP:                 _t(S.FAILED, "install kept crashing", A.CLEANUP),         # A/B only: see _refine
    },
    # making the new slot the active one (symlink rename, bootloader variable: atomic)
    S.SWITCHING: {
        E.SWITCHED:                _t(S.RESTARTING, A.RESTART),
        E.SWITCH_FAILED:           _t(S.ROLLING_BACK, "switch failed", A.ROLLBACK),          # it may have landed
        E.RESUMED:                 _t(S.SWITCHING, "interrupted", A.SWITCH),                 # idempotent: redo
        E.GAVE_UP:                 _t(S.ROLLING_BACK, "switch kept crashing", A.ROLLBACK),
    },
    # starting the new version: process restart, reboot, or the agent under its watchdog
    S.RESTARTING: {
        E.RESTARTED:               _t(S.HEALTH_CHECKING, A.START_HEALTH_CHECK),              # first start of the new
        E.RESUMED:                 _t(S.HEALTH_CHECKING, A.START_HEALTH_CHECK),              # this start is the restart
        E.NOT_RESTARTED:           _t(S.RESTARTING, "not restarted", A.RESTART),             # died before it: again
        E.GAVE_UP:                 _t(S.ROLLING_BACK, "restart kept failing", A.ROLLBACK),
        E.RESTART_FAILED:          _t(S.ROLLING_BACK, "restart failed", A.ROLLBACK),
        E.BOOT_COUNT_EXCEEDED:     _t(S.ROLLING_BACK, "crash loop", A.ROLLBACK),
    },
    # on trial: command, HTTP probe, reconnection, and "the target version runs"
    S.HEALTH_CHECKING: {
        E.HEALTHY:                 _t(S.COMMITTING, A.COMMIT),                               # within the deadline
        E.UNHEALTHY:               _t(S.ROLLING_BACK, "unhealthy", A.ROLLBACK),
        E.HEALTH_TIMEOUT:          _t(S.ROLLING_BACK, "health check timed out", A.ROLLBACK),
        E.RESUMED:                 _t(S.HEALTH_CHECKING, A.START_HEALTH_CHECK),              # another start: new window
        E.BOOT_COUNT_EXCEEDED:     _t(S.ROLLING_BACK, "crash loop", A.ROLLBACK),             # boot counter spent
    },
    # making the new version permanent (bootloader: stop trying; watchdog: disarm)
    S.COMMITTING: {
        E.COMMITTED:               _t(S.COMMITTED, A.CLEANUP),                               # drop the download
        E.COMMIT_FAILED:           _t(S.COMMITTING, "commit failed", A.COMMIT),              # idempotent: retry
        E.RESUMED:                 _t(S.COMMITTING, "interrupted", A.COMMIT),                # idempotent: finish
        E.GAVE_UP:                 _t(S.ROLLING_BACK, "commit failed", A.ROLLBACK),          # not permanent: go back
    },
    # making the previous slot active and running again
    S.ROLLING_BACK: {
        E.ROLLED_BACK:             _t(S.ROLLED_BACK, A.CLEANUP),
        E.ROLLBACK_FAILED:         _t(S.ROLLING_BACK, "rollback failed", A.ROLLBACK),        # idempotent: retry
        E.RESUMED:                 _t(S.ROLLING_BACK, "interrupted", A.ROLLBACK, counted=False),  # reboots by design
        E.GAVE_UP:                 _t(S.ROLLBACK_FAILED, "rollback failed"),                 # keep all for a person
    },
}
# fmt: on
TRANSITIONS: Mapping[tuple[State, EventKind], Transition] = MappingProxyType(
    {(state, event): t for state, row in _BY_STATE.items() for event, t in row.items()}
)

#: Failures that are retried on the same state while attempts remain.
RETRYABLE = frozenset({E.DOWNLOAD_FAILED, E.NOT_RESTARTED, E.COMMIT_FAILED, E.ROLLBACK_FAILED})


def _refine(record: UpdateRecord, event: Event, limits: UpdateLimits) -> EventKind:
    """The event the table is read with: the only conditions of the flow outside the table."""
    kind, state = event.kind, record.state
    if kind in REFINED_EVENTS:
        raise InvalidTransition(state, kind)  # the I/O layer never sends these itself
    if kind is E.HEALTHY and state is S.HEALTH_CHECKING:
        assert record.health_deadline is not None  # checked by UpdateRecord
        return E.HEALTH_TIMEOUT if event.at > record.health_deadline else kind
    if state is S.INSTALLING and record.policy.in_place and kind in (E.INSTALL_FAILED, E.RESUMED):
        return E.INSTALL_FAILED_IN_PLACE
    if kind is E.RESUMED and state in (S.RESTARTING, S.HEALTH_CHECKING):
        return E.BOOT_COUNT_EXCEEDED if record.boot_count >= limits.max_boot_attempts else kind
    budget = limits.attempts(state)
    row = TRANSITIONS.get((state, kind))
    counts = kind in RETRYABLE or (kind is E.RESUMED and row is not None and row.counted)
    if budget is not None and counts and record.attempts.get(state, 1) >= budget:
        return E.GAVE_UP
    return kind


def step(
    record: UpdateRecord, event: Event, limits: UpdateLimits = DEFAULT_LIMITS
) -> tuple[UpdateRecord, tuple[Action, ...]]:
    """The record after ``event`` and the actions to perform once it is persisted.

    Raises :class:`InvalidTransition` (the record unchanged) for an event the table has no row
    for in the record's state, final states included.
    """
    kind = _refine(record, event, limits)
    transition = TRANSITIONS.get((record.state, kind))
    if transition is None:
        raise InvalidTransition(record.state, event.kind)
    nxt = transition.next
    attempts = dict(record.attempts)
    attempts[nxt] = attempts.get(nxt, 0) + transition.counted if nxt is record.state else 1
    boot_count, deadline = record.boot_count, record.health_deadline
    if nxt is S.HEALTH_CHECKING:  # every way into health_checking is one more start of the new version
        boot_count += 1
        deadline = event.at + record.health_timeout
    why = f"{transition.why}: {event.reason}" if transition.why and event.reason else transition.why
    reason = record.reason
    if why and nxt is not record.state and nxt in (S.FAILED, S.ROLLING_BACK, S.ROLLBACK_FAILED):
        reason = f"{reason}; {why}" if reason else why
    if nxt in (S.ROLLING_BACK, *FINAL_STATES):
        status_reason = reason
    else:
        status_reason = f"{why} (attempt {attempts[nxt]})" if why else ""
    new = msgspec.structs.replace(
        record, state=nxt, status=Status(_status_of(nxt), nxt.value, status_reason), seq=record.seq + 1,
        attempts=attempts, boot_count=boot_count, health_deadline=deadline, reason=reason,
    )
    return new, tuple(_action(a, new) for a in transition.actions)


def _action(kind: ActionKind, record: UpdateRecord) -> Action:
    attempt = record.attempts.get(record.state, 1)
    if kind in (A.INSTALL, A.SWITCH):
        return Action(kind, attempt, slot=record.target_slot)
    if kind is A.RESTART:
        return Action(kind, attempt, slot=record.target_slot, restart=record.policy.restart)
    if kind is A.ROLLBACK:
        return Action(kind, attempt, slot=record.previous_slot, restart=record.policy.restart)
    if kind is A.START_HEALTH_CHECK:
        return Action(kind, attempt, slot=record.target_slot, deadline=record.health_deadline)
    return Action(kind, attempt)


def resume(
    record: UpdateRecord, now: float, limits: UpdateLimits = DEFAULT_LIMITS, *, restarted: bool = True
) -> tuple[UpdateRecord, tuple[Action, ...]]:
    """What to do when the agent starts and finds ``record`` on disk: the ``RESUMED`` row of its
    state. A final record is returned as it is, with no action: report its status again.

    ``restarted`` matters in ``restarting`` only: whether the version now running is the one the
    restart was to start (the booted slot, the running agent's version). False means the agent
    died before the reboot or hand-over: restart again, not a health check of the old version."""
    if record.final:
        return record, ()
    if record.state is S.RESTARTING and not restarted:
        return step(record, Event(E.NOT_RESTARTED, now, RESUMED_REASON), limits)
    return step(record, Event(E.RESUMED, now, RESUMED_REASON), limits)
