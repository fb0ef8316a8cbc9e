"""The update flow's table (core/update_flow.py): exact paths and statuses, resume after a crash in
every state against a model device, invalid events, corrupt records, and a Hypothesis stateful
exploration of random events and crashes."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as tally
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from corral.core.update_flow import (
    AFTER_SWITCH,
    FINAL_STATES,
    KIND_POLICIES,
    REFINED_EVENTS,
    TRANSITIONS,
    Action,
    ActionKind,
    Artifact,
    ArtifactKind,
    CorruptRecord,
    Event,
    EventKind,
    InvalidTransition,
    State,
    Status,
    UpdateLimits,
    UpdateRecord,
    decode,
    encode,
    new_record,
    resume,
    step,
)
from corral.errors import Conflict, InvalidInput
from corral.protocol import DEPLOYMENT_STATUS_NEXT

E, S, A = EventKind, State, ActionKind
LIMITS = UpdateLimits(download_attempts=3, commit_attempts=2, rollback_attempts=2, max_boot_attempts=3,
                      health_timeout=30.0)
CRASH = "crash"  # in a script: the agent dies and starts again (resume)
HAPPY = [E.START, E.DOWNLOADED, E.VERIFIED, E.INSTALLED, E.SWITCHED, E.RESTARTED, E.HEALTHY, E.COMMITTED]


def record_for(kind: ArtifactKind = "app") -> UpdateRecord:
    in_place = KIND_POLICIES[kind].in_place
    return new_record("dep-1", Artifact("demo", "2.0", kind), target_slot=None if in_place else "b",
                      previous_slot=None if in_place else "a", previous_version="1.0", limits=LIMITS)


@dataclass
class Run:
    record: UpdateRecord
    path: list[str] = field(default_factory=list)  # states entered, in order
    statuses: list[tuple[str, str, str]] = field(default_factory=list)  # (status, step, reason) reported
    actions: list[tuple[Action, ...]] = field(default_factory=list)
    now: float = 1000.0

    def feed(self, *script: EventKind | str, reason: str = "boom") -> Run:
        for item in script:
            self.now += 1
            if item == CRASH:
                record, actions = resume(self.record, self.now, LIMITS)
            else:
                event = Event(EventKind(item), self.now, reason if item.endswith(("failed", "unhealthy")) else "")
                record, actions = step(self.record, event, LIMITS)
            assert decode(encode(record)) == record
            self.record = record
            self.path.append(record.state.value)
            self.statuses.append((record.status.status, record.status.step, record.status.reason))
            self.actions.append(actions)
        return self


def run(kind: ArtifactKind, *script: EventKind | str) -> Run:
    return Run(record_for(kind)).feed(*script)


def progress(*steps: str) -> list[tuple[str, str, str]]:
    return [("in-progress", s, "") for s in steps]


# --- table-driven: exact paths and statuses ------------------------------------------------------

def test_happy_path_app() -> None:
    r = run("app", *HAPPY)
    assert r.path == ["downloading", "verifying", "installing", "switching", "restarting", "health_checking",
                      "committing", "committed"]
    assert r.statuses == [*progress(*r.path[:-1]), ("succeeded", "committed", "")]
    kinds = [[a.kind for a in acts] for acts in r.actions]
    assert kinds == [[A.DOWNLOAD], [A.VERIFY], [A.INSTALL], [A.SWITCH], [A.RESTART], [A.START_HEALTH_CHECK],
                     [A.COMMIT], [A.CLEANUP]]
    assert r.actions[2][0].slot == r.actions[3][0].slot == "b"
    assert r.actions[4][0].restart == "process"
    assert r.actions[5][0].deadline == 1006.0 + LIMITS.health_timeout  # restarted at 1006
    assert r.record.seq == 8 and r.record.boot_count == 1 and r.record.reason == ""


def test_happy_path_rootfs_reboots_and_the_start_after_the_reboot_is_the_restart() -> None:
    r = run("rootfs", *HAPPY[:5])
    assert r.actions[-1] == (Action(A.RESTART, slot="b", restart="reboot"),)
    r.feed(CRASH, E.HEALTHY, E.COMMITTED)  # the reboot: the agent starts and finds "restarting"
    assert r.path == ["downloading", "verifying", "installing", "switching", "restarting", "health_checking",
                      "committing", "committed"]
    assert r.statuses[-1] == ("succeeded", "committed", "")
    assert r.record.boot_count == 1


@pytest.mark.parametrize(("kind", "restart"), [("app", "process"), ("rootfs", "reboot"), ("agent", "agent"),
                                                ("script", "none")])
def test_every_kind_takes_the_same_path_and_differs_in_data(kind: ArtifactKind, restart: str) -> None:
    r = run(kind, *HAPPY)
    assert r.path == run("app", *HAPPY).path
    assert r.actions[4][0].restart == restart


def test_download_failures_are_retried_then_the_deployment_fails_with_nothing_installed() -> None:
    r = run("app", E.START, E.DOWNLOAD_FAILED, E.DOWNLOAD_FAILED, E.DOWNLOAD_FAILED)
    assert r.path == ["downloading", "downloading", "downloading", "failed"]
    assert r.statuses == [
        ("in-progress", "downloading", ""),
        ("in-progress", "downloading", "download failed: boom (attempt 2)"),
        ("in-progress", "downloading", "download failed: boom (attempt 3)"),
        ("failed", "failed", "download failed: boom"),
    ]
    assert [a.attempt for acts in r.actions[:3] for a in acts] == [1, 2, 3]
    assert r.actions[-1] == (Action(A.CLEANUP),)


def test_a_download_that_succeeds_on_a_retry_goes_on() -> None:
    r = run("app", E.START, E.DOWNLOAD_FAILED, E.DOWNLOADED, E.VERIFIED)
    assert r.path == ["downloading", "downloading", "verifying", "installing"]
    assert r.statuses[-1] == ("in-progress", "installing", "")


@pytest.mark.parametrize(("kind", "script", "path", "reason"), [
    # verification: nothing was installed
    ("app", [*HAPPY[:2], E.VERIFY_FAILED], ["downloading", "verifying", "failed"], "verification failed: boom"),
    # an A/B install writes only the inactive slot: the running one was never touched
    ("rootfs", [*HAPPY[:3], E.INSTALL_FAILED], ["downloading", "verifying", "installing", "failed"],
     "install failed: boom"),
])
def test_a_failure_before_the_switch_is_failed_not_rolled_back(kind: ArtifactKind, script: list[EventKind],
                                                               path: list[str], reason: str) -> None:
    r = run(kind, *script)
    assert r.path == path
    assert r.statuses[-1] == ("failed", "failed", reason)
    assert r.actions[-1] == (Action(A.CLEANUP),)


def test_install_failure_of_an_in_place_kind_is_rolled_back_by_its_hook() -> None:
    r = run("script", E.START, E.DOWNLOADED, E.VERIFIED, E.INSTALL_FAILED, E.ROLLED_BACK)
    assert r.path == ["downloading", "verifying", "installing", "rolling_back", "rolled_back"]
    assert r.statuses[-2:] == [("in-progress", "rolling_back", "install failed: boom"),
                               ("rolled-back", "rolled_back", "install failed: boom")]
    assert r.actions[3] == (Action(A.ROLLBACK, slot=None, restart="none"),)


def test_unhealthy_after_the_switch_rolls_back() -> None:
    r = run("app", *HAPPY[:6], E.UNHEALTHY, E.ROLLED_BACK)
    assert r.path[-3:] == ["health_checking", "rolling_back", "rolled_back"]
    assert r.statuses[-2:] == [("in-progress", "rolling_back", "unhealthy: boom"),
                               ("rolled-back", "rolled_back", "unhealthy: boom")]
    assert r.actions[-2] == (Action(A.ROLLBACK, slot="a", restart="process"),)
    assert r.actions[-1] == (Action(A.CLEANUP),)


def test_health_timeout_rolls_back_and_a_late_healthy_is_a_timeout() -> None:
    r = run("app", *HAPPY[:6], E.HEALTH_TIMEOUT, E.ROLLED_BACK)
    assert r.statuses[-1] == ("rolled-back", "rolled_back", "health check timed out")
    late = run("app", *HAPPY[:6])
    deadline = late.record.health_deadline
    assert deadline is not None
    record, actions = step(late.record, Event(E.HEALTHY, deadline + 0.5), LIMITS)
    assert record.state is S.ROLLING_BACK and actions[0].kind is A.ROLLBACK
    assert record.reason == "health check timed out"
    on_time, _ = step(late.record, Event(E.HEALTHY, deadline), LIMITS)
    assert on_time.state is S.COMMITTING


def test_crash_loop_rolls_back_when_the_boot_counter_is_spent() -> None:
    r = run("rootfs", *HAPPY[:5], CRASH, CRASH, CRASH, CRASH, E.ROLLED_BACK)
    assert r.path[4:] == ["restarting", "health_checking", "health_checking", "health_checking", "rolling_back",
                          "rolled_back"]
    assert r.statuses[-1] == ("rolled-back", "rolled_back", "crash loop: the agent restarted")
    assert r.record.boot_count == LIMITS.max_boot_attempts
    assert [a.deadline for acts in r.actions[5:8] for a in acts] == [1006 + 30.0, 1007 + 30.0, 1008 + 30.0]


def test_a_failed_rollback_is_reported_as_failed_and_says_so() -> None:
    r = run("app", *HAPPY[:6], E.UNHEALTHY, E.ROLLBACK_FAILED, E.ROLLBACK_FAILED)
    assert r.path[-3:] == ["rolling_back", "rolling_back", "rollback_failed"]
    assert r.statuses[-2:] == [("in-progress", "rolling_back", "unhealthy: boom"),
                               ("failed", "rollback_failed", "unhealthy: boom; rollback failed: boom")]
    assert r.actions[-1] == ()  # nothing is cleaned up: keep everything for a person
    with pytest.raises(InvalidTransition):
        step(r.record, Event(E.ROLLED_BACK, r.now), LIMITS)


def test_commit_failures_are_retried_then_rolled_back() -> None:
    r = run("app", *HAPPY[:7], E.COMMIT_FAILED, E.COMMIT_FAILED, E.ROLLED_BACK)
    assert r.path[-4:] == ["committing", "committing", "rolling_back", "rolled_back"]
    assert r.statuses[-3][2] == "commit failed: boom (attempt 2)"
    assert r.statuses[-1] == ("rolled-back", "rolled_back", "commit failed: boom")


@pytest.mark.parametrize("event", [E.SWITCH_FAILED, E.RESTART_FAILED])
def test_switch_and_restart_failures_roll_back(event: EventKind) -> None:
    script = HAPPY[:4] if event is E.SWITCH_FAILED else HAPPY[:5]
    r = run("app", *script, event, E.ROLLED_BACK)
    assert r.path[-2:] == ["rolling_back", "rolled_back"]
    assert r.statuses[-1][0] == "rolled-back"


def test_cancel_before_install_fails_cleanly_and_is_refused_after() -> None:
    r = run("app", E.CANCEL)
    assert r.statuses == [("failed", "failed", "cancelled")]  # queued -> failed
    r = run("app", E.START, E.CANCEL)
    assert r.statuses[-1] == ("failed", "failed", "cancelled") and r.actions[-1] == (Action(A.CLEANUP),)
    r = run("app", *HAPPY[:3])
    with pytest.raises(InvalidTransition, match="event cancel is not allowed in state installing"):
        step(r.record, Event(E.CANCEL, r.now), LIMITS)


# --- resume after a crash, in every non-final state ----------------------------------------------


@dataclass
class Device:
    """A model of the device the I/O layer drives: what is in each slot, which is active, what runs.

    It performs actions the way the I/O layer must (idempotent, atomic switch, rollback that makes
    the previous slot active and running) and answers with the event that follows; ``None`` when
    the action restarts the agent itself (a reboot, the agent handing over to its new version).
    """

    kind: ArtifactKind
    new_is_healthy: bool = True
    slots: dict[str, str] = field(default_factory=lambda: {"a": "1.0", "b": "0.9"})
    active: str = "a"
    running: str = "1.0"
    committed: str = "a"

    def perform(self, action: Action) -> EventKind | None:
        in_place = KIND_POLICIES[self.kind].in_place
        if action.kind is A.INSTALL:
            if in_place:
                self.running = "2.0"
            else:
                self.slots[action.slot or ""] = "2.0"
            return E.INSTALLED
        if action.kind is A.SWITCH:
            if not in_place:
                self.active = action.slot or ""
            return E.SWITCHED
        if action.kind is A.RESTART:
            if not in_place:
                self.running = self.slots[self.active]
            return None if action.restart in ("reboot", "agent") else E.RESTARTED
        if action.kind is A.START_HEALTH_CHECK:
            return E.HEALTHY if self.running == "2.0" and self.new_is_healthy else E.UNHEALTHY
        if action.kind is A.COMMIT:
            self.committed = self.active
            return E.COMMITTED
        if action.kind is A.ROLLBACK:
            if in_place:
                self.running = "1.0"
                return E.ROLLED_BACK
            self.active = action.slot or ""
            if self.running != self.slots[self.active] and action.restart in ("reboot", "agent"):
                self.running = self.slots[self.active]
                return None  # rebooting into the old slot: the next start finishes the rollback
            self.running = self.slots[self.active]
            return E.ROLLED_BACK
        follows = {A.DOWNLOAD: E.DOWNLOADED, A.VERIFY: E.VERIFIED}
        return follows.get(action.kind)  # cleanup: nothing follows

    def crash_during(self, action: Action) -> None:
        """The agent dies halfway through ``action``: a half-written slot, a half-run hook, or the
        reboot (the agent handing over to its new version) it asked for."""
        if action.kind is A.INSTALL:
            if KIND_POLICIES[self.kind].in_place:
                self.running = "1.9-partial"
            else:
                self.slots[action.slot or ""] = "2.0-partial"
        if action.kind is A.RESTART and action.restart in ("reboot", "agent"):
            self.running = self.slots[self.active]

    def agent_started(self) -> None:
        """What the agent does on start before resuming: supervise the active slot's process."""
        if KIND_POLICIES[self.kind].restart == "process":
            self.running = self.slots[self.active]


def drive(record: UpdateRecord, device: Device, *, crash_in: State | None = None, midway: bool = False,
          now: float = 0.0) -> tuple[UpdateRecord, list[str]]:
    """Run the flow against ``device`` to a final state; the agent crashes once on entering ``crash_in``
    (before its actions, or ``midway`` through the first). Returns the final record and the path."""
    record, actions = step(record, Event(E.START, now), LIMITS)
    path, crashed = [record.state.value], False
    for _ in range(100):
        now += 1
        if record.state is crash_in and not crashed:
            crashed = True
            if midway and actions:
                device.crash_during(actions[0])
            device.agent_started()
            record, actions = resume(decode(encode(record)), now, LIMITS, restarted=device.running == "2.0")
            path.append(f"crash>{record.state.value}")
            continue
        follow = None
        restarted = False
        for action in actions:
            result = device.perform(action)
            if result is None and action.kind in (A.RESTART, A.ROLLBACK):
                restarted = True
            follow = result or follow
        if record.final:
            return record, path
        if restarted:
            device.agent_started()
            record, actions = resume(decode(encode(record)), now, LIMITS, restarted=device.running == "2.0")
        else:
            assert follow is not None, (record.state, actions)
            record, actions = step(record, Event(follow, now), LIMITS)
        path.append(record.state.value)
    raise AssertionError(f"no final state: {path}")


def assert_old_or_new(record: UpdateRecord, device: Device) -> None:
    """Never a mix: committed means the new version is active, running and committed; rolled back or
    failed means the old one is active and running."""
    if record.state is S.COMMITTED:
        assert device.running == "2.0"
        if not KIND_POLICIES[device.kind].in_place:
            assert device.active == device.committed == record.target_slot
    else:
        assert record.state in (S.ROLLED_BACK, S.FAILED), record.state
        assert device.running == "1.0"
        assert device.active == device.committed == "a"


NON_FINAL = [s for s in State if s not in FINAL_STATES and s is not S.IDLE and s is not S.ROLLING_BACK]


@pytest.mark.parametrize("kind", ["app", "rootfs", "agent", "script"])
@pytest.mark.parametrize("state", NON_FINAL)
@pytest.mark.parametrize("midway", [False, True], ids=["before", "midway"])
def test_a_crash_in_any_state_ends_on_the_new_version_or_the_old_one(kind: ArtifactKind, state: State,
                                                                     midway: bool) -> None:
    device = Device(kind)
    record, path = drive(record_for(kind), device, crash_in=state, midway=midway)
    assert_old_or_new(record, device)
    assert any(p.startswith("crash>") for p in path)
    if kind == "script" and state is S.INSTALLING:
        assert record.state is S.ROLLED_BACK, path  # a half-run install hook is undone, not redone
        assert record.reason == "install failed: the agent restarted"
    else:
        assert record.state is S.COMMITTED, path


@pytest.mark.parametrize("kind", ["app", "rootfs", "agent", "script"])
@pytest.mark.parametrize("state", [S.HEALTH_CHECKING, S.ROLLING_BACK])
def test_a_crash_while_an_unhealthy_version_is_rolled_back_still_ends_on_the_old_one(kind: ArtifactKind,
                                                                                    state: State) -> None:
    device = Device(kind, new_is_healthy=False)
    record, path = drive(record_for(kind), device, crash_in=state)
    assert record.state is S.ROLLED_BACK, path
    assert_old_or_new(record, device)


# What resume() does in each non-final state: the next state and the actions (kinds), for an app.
RESUME_ROWS = [
    (S.IDLE, S.DOWNLOADING, [A.DOWNLOAD]),
    (S.DOWNLOADING, S.DOWNLOADING, [A.DOWNLOAD]),
    (S.VERIFYING, S.VERIFYING, [A.VERIFY]),
    (S.INSTALLING, S.INSTALLING, [A.INSTALL]),
    (S.SWITCHING, S.SWITCHING, [A.SWITCH]),
    (S.RESTARTING, S.HEALTH_CHECKING, [A.START_HEALTH_CHECK]),
    (S.HEALTH_CHECKING, S.HEALTH_CHECKING, [A.START_HEALTH_CHECK]),
    (S.COMMITTING, S.COMMITTING, [A.COMMIT]),
    (S.ROLLING_BACK, S.ROLLING_BACK, [A.ROLLBACK]),
]
TO_STATE: dict[State, list[EventKind | str]] = {
    S.IDLE: [], S.DOWNLOADING: HAPPY[:1], S.VERIFYING: HAPPY[:2], S.INSTALLING: HAPPY[:3], S.SWITCHING: HAPPY[:4],
    S.RESTARTING: HAPPY[:5], S.HEALTH_CHECKING: HAPPY[:6], S.COMMITTING: HAPPY[:7],
    S.ROLLING_BACK: [*HAPPY[:6], E.UNHEALTHY],
}


def test_every_non_final_state_has_a_resume_row() -> None:
    assert {s for s in State if s not in FINAL_STATES} == {row[0] for row in RESUME_ROWS}
    assert all((s, E.RESUMED) in TRANSITIONS for s, _, _ in RESUME_ROWS)


@pytest.mark.parametrize(("state", "after", "actions"), RESUME_ROWS)
def test_resume_row(state: State, after: State, actions: list[ActionKind]) -> None:
    r = run("app", *TO_STATE[state])
    assert r.record.state is state
    record, acts = resume(r.record, r.now + 1, LIMITS)
    assert record.state is after
    assert [a.kind for a in acts] == actions
    assert record.status.status == "in-progress"
    if after is state and state not in (S.HEALTH_CHECKING, S.ROLLING_BACK):
        assert acts[0].attempt == 2  # a crash counts as an attempt of the interrupted step
        assert record.status.reason == "interrupted: the agent restarted (attempt 2)"


@pytest.mark.parametrize("kind", ["rootfs", "agent"])
def test_a_start_that_is_not_the_restart_restarts_again_then_gives_up(kind: ArtifactKind) -> None:
    """The agent died before the reboot (hand-over): the old version runs, so that start is not the
    restart. Restart again, as one more attempt; when they are spent, roll back."""
    r = run(kind, *HAPPY[:5])
    record, actions = resume(r.record, r.now + 1, LIMITS, restarted=False)
    assert record.state is S.RESTARTING and record.boot_count == 0
    assert actions == (Action(A.RESTART, attempt=2, slot="b", restart=KIND_POLICIES[kind].restart),)
    assert record.status == Status("in-progress", "restarting", "not restarted: the agent restarted (attempt 2)")
    record, _ = resume(record, r.now + 2, LIMITS, restarted=False)
    record, actions = resume(record, r.now + 3, LIMITS, restarted=False)  # restart_attempts = 3
    assert record.state is S.ROLLING_BACK and actions[0].kind is A.ROLLBACK
    assert record.reason == "restart kept failing: the agent restarted"
    # in any other state the flag changes nothing
    other = run(kind, *HAPPY[:6]).record
    assert resume(other, 5000.0, LIMITS, restarted=False) == resume(other, 5000.0, LIMITS)


def test_a_crash_loop_before_the_switch_gives_up_cleanly() -> None:
    r = run("app", *HAPPY[:3], CRASH, CRASH)  # install_attempts = 2 by default
    assert r.path[-2:] == ["installing", "failed"]
    assert r.statuses[-1] == ("failed", "failed", "install kept crashing: the agent restarted")


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
def test_resume_of_a_final_record_does_nothing_but_report_again(state: State) -> None:
    scripts = {S.COMMITTED: HAPPY, S.ROLLED_BACK: [*HAPPY[:6], E.UNHEALTHY, E.ROLLED_BACK],
               S.FAILED: [E.START, E.DOWNLOADED, E.VERIFY_FAILED],
               S.ROLLBACK_FAILED: [*HAPPY[:6], E.UNHEALTHY, E.ROLLBACK_FAILED, E.ROLLBACK_FAILED]}
    r = run("app", *scripts[state])
    assert r.record.state is state
    assert resume(r.record, r.now, LIMITS) == (r.record, ())


# --- invalid events, corrupt records -------------------------------------------------------------


def test_an_event_not_allowed_in_the_state_raises_and_changes_nothing() -> None:
    record = run("app", E.START).record
    with pytest.raises(InvalidTransition) as info:
        step(record, Event(E.HEALTHY, 5.0), LIMITS)
    assert isinstance(info.value, Conflict) and info.value.code == "invalid_transition"
    assert info.value.state is S.DOWNLOADING and info.value.event is E.HEALTHY
    assert str(info.value) == "update flow: event healthy is not allowed in state downloading"
    assert record.state is S.DOWNLOADING and record.seq == 1


@pytest.mark.parametrize("event", sorted(REFINED_EVENTS))
def test_refined_events_cannot_be_sent(event: EventKind) -> None:
    with pytest.raises(InvalidTransition):
        step(run("app", *HAPPY[:6]).record, Event(event, 0.0), LIMITS)


def test_every_final_state_refuses_every_event() -> None:
    r = run("app", *HAPPY)
    for kind in EventKind:
        with pytest.raises(InvalidTransition):
            step(r.record, Event(kind, r.now), LIMITS)


GOOD = encode(run("rootfs", *HAPPY[:6]).record)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "update record does not decode: Input data was truncated"),
    (b"\x00garbage", "update record does not decode: JSON is malformed"),
    (GOOD[:-10], "update record does not decode: Input data was truncated"),
    (GOOD.replace(b'"health_checking"', b'"dancing"'), "Invalid enum value 'dancing' - at `$.state`"),
    (GOOD.replace(b'"version":1', b'"version":2'), "at `$.version`"),
    (GOOD.replace(b'"boot_count":1', b'"boot_count":-1'), "Expected `int` >= 0 - at `$.boot_count`"),
    (GOOD.replace(b'"kind":"rootfs"', b'"kind":"firmware"'), "at `$.artifact.kind`"),
    (GOOD.replace(b'"target_slot":"b"', b'"target_slot":"a"'), "target slot 'a' is the running one"),
    (GOOD.replace(b'"status":"in-progress"', b'"status":"succeeded"'),
     "state health_checking cannot report 'succeeded'"),
    (GOOD.replace(b'"deployment_id":"dep-1",', b""), "missing required field `deployment_id`"),
    (GOOD.replace(b'"target_slot":"b"', b'"target_slot":null'), "rootfs updates need a target slot"),
])
def test_a_corrupt_record_fails_decode_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(CorruptRecord, match=r"^update record does not decode: ") as info:
        decode(data)
    assert message.removeprefix("update record does not decode: ") in str(info.value)
    assert isinstance(info.value, InvalidInput) and info.value.code == "corrupt_update_record"


def test_a_record_ignores_fields_an_older_agent_does_not_know() -> None:
    newer = GOOD.replace(b'"deployment_id"', b'"from_the_future":[1,2],"deployment_id"')
    assert decode(newer) == decode(GOOD)


def test_limits_and_new_records_are_checked() -> None:
    with pytest.raises(InvalidInput, match="max_boot_attempts must be positive"):
        UpdateLimits(max_boot_attempts=0)
    with pytest.raises(InvalidInput, match="app updates need a target slot"):
        new_record("d", Artifact("x", "1", "app"), target_slot=None, previous_slot="a", previous_version="0")
    with pytest.raises(InvalidInput, match="script updates have no target slot"):
        new_record("d", Artifact("x", "1", "script"), target_slot="b", previous_slot="a", previous_version="0")
    r = new_record("d", Artifact("x", "1", "app"), target_slot="b", previous_slot="a", previous_version=None,
                   health_timeout=7.5)
    assert r.health_timeout == 7.5 and r.status.status == "queued"


# --- the table itself ------------------------------------------------------------------------------


def test_the_table_never_leaves_the_rollback_path_for_commit() -> None:
    """Once rolling back, the only ways on are rolled back or a failed rollback; committing is
    entered only from a healthy health check."""
    for (state, event), t in TRANSITIONS.items():
        if state is S.ROLLING_BACK:
            assert t.next in (S.ROLLING_BACK, S.ROLLED_BACK, S.ROLLBACK_FAILED)
        if t.next is S.COMMITTING and state is not S.COMMITTING:
            assert (state, event) == (S.HEALTH_CHECKING, E.HEALTHY)
        if t.next is S.COMMITTED:
            assert state is S.COMMITTING
        if t.next is S.FAILED:  # failed = nothing the device runs was changed
            assert state not in AFTER_SWITCH
        assert state not in FINAL_STATES


# --- Hypothesis: random events and crashes -------------------------------------------------------

SENDABLE = [k for k in EventKind if k not in REFINED_EVENTS]


class FlowMachine(RuleBasedStateMachine):
    """Any event (allowed or not), crashes and clock jumps, on any kind: the table's invariants."""

    record: UpdateRecord

    @initialize(kind=st.sampled_from(sorted(KIND_POLICIES)))
    def start(self, kind: ArtifactKind) -> None:
        self.record = record_for(kind)
        self.now = 0.0
        self.statuses = [self.record.status.status]
        self.states = [self.record.state]
        self.healthy_seen = False

    def _apply(self, record: UpdateRecord, event: EventKind) -> None:
        old = self.record
        assert record.seq == old.seq + 1
        assert record.status.status in DEPLOYMENT_STATUS_NEXT[old.status.status]
        if record.state is S.COMMITTING and old.state is S.HEALTH_CHECKING:
            assert event is E.HEALTHY and old.health_deadline is not None and self.now <= old.health_deadline
            self.healthy_seen = True
        if record.state is S.COMMITTED:
            assert self.healthy_seen and old.state is S.COMMITTING
        if S.ROLLING_BACK in self.states:
            assert record.state in (S.ROLLING_BACK, S.ROLLED_BACK, S.ROLLBACK_FAILED)
        if record.state is S.FAILED:
            assert not set(self.states) & AFTER_SWITCH
        if record.state in (S.ROLLED_BACK, S.FAILED, S.ROLLBACK_FAILED):
            assert record.reason and record.status.reason == record.reason
        self.record = record
        self.statuses.append(record.status.status)
        self.states.append(record.state)

    @rule(event=st.sampled_from(SENDABLE), dt=st.floats(0, 60), reason=st.text(max_size=8))
    def send(self, event: EventKind, dt: float, reason: str) -> None:
        self.now += dt
        before = self.record
        try:
            record, _ = step(before, Event(event, self.now, reason), LIMITS)
        except InvalidTransition as e:
            assert self.record is before and e.event is event
            assert before.final or (before.state, event) not in TRANSITIONS
            return
        assert not before.final
        self._apply(record, event)

    @precondition(lambda self: not self.record.final)
    @rule(data=st.data(), dt=st.floats(0, 60))
    def advance(self, data: st.DataObject, dt: float) -> None:
        """An event the state has a row for: the walks reach the deep states, not only refusals."""
        allowed = sorted(e for (s, e) in TRANSITIONS if s is self.record.state and e not in REFINED_EVENTS)
        forward = [e for e in (*HAPPY, E.ROLLED_BACK) if e in allowed]  # weighted: the walk gets somewhere
        event = data.draw(st.sampled_from(forward * 12 + allowed))
        self.now += dt
        record, _ = step(self.record, Event(event, self.now, "why"), LIMITS)
        self._apply(record, event)

    @precondition(lambda self: not self.record.final)
    @rule(jump=st.floats(-1e6, 1e6), restarted=st.booleans())
    def crash(self, jump: float, restarted: bool) -> None:
        self.now += jump  # a device without an RTC may come back at any time
        record, actions = resume(decode(encode(self.record)), self.now, LIMITS, restarted=restarted)
        assert actions, "every non-final state has something to do on resume"
        self._apply(record, E.RESUMED)

    @precondition(lambda self: self.record.final)
    @rule()
    def final_is_final(self) -> None:
        tally(f"reached {self.record.state}")
        assert resume(self.record, self.now, LIMITS) == (self.record, ())
        for event in SENDABLE:
            with pytest.raises(InvalidTransition):
                step(self.record, Event(event, self.now), LIMITS)

    @invariant()
    def round_trips(self) -> None:
        assert decode(encode(self.record)) == self.record
        if self.record.state in AFTER_SWITCH or self.record.boot_count:
            assert set(self.states) & (AFTER_SWITCH | {S.ROLLING_BACK, *FINAL_STATES})
        assert self.record.boot_count <= LIMITS.max_boot_attempts


TestFlowMachine = FlowMachine.TestCase
TestFlowMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(KIND_POLICIES)), healthy=st.booleans(),
       crash_in=st.sampled_from([None, *NON_FINAL, S.ROLLING_BACK]), midway=st.booleans())
def test_against_the_model_device_it_is_always_the_old_version_or_the_new_one(
        kind: ArtifactKind, healthy: bool, crash_in: State | None, midway: bool) -> None:
    device = Device(kind, new_is_healthy=healthy)
    record, path = drive(record_for(kind), device, crash_in=crash_in, midway=midway)
    assert_old_or_new(record, device)
    unlucky = kind == "script" and crash_in is S.INSTALLING
    assert (record.state is S.COMMITTED) == (healthy and not unlucky), path


def test_status_struct_is_the_wire_shape() -> None:
    r = run("app", E.START)
    assert msgspec.json.encode(r.record.status) == b'{"status":"in-progress","step":"downloading","reason":""}'
