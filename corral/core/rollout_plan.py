"""The rollout planner: given a rollout and its devices as they are now, what happens next.

Pure: :func:`plan` takes the rollout's state, every device's state, the clock and (when the
rollout has a health gate) a :class:`HealthVerdict`, and returns a :class:`Decision` — the
devices' new states, the devices to tell, the rollout's new status and the events to announce.
The server's engine persists the decision in one transaction and only then tells the devices
(ADR 0015), so a restart in between tells them again (at-least-once; the device ignores a
``deploy`` it already has) and never tells a device twice for the same attempt.

A device's states (``DeviceState.state``)::

    pending ─(its wave runs, start delay)─► scheduled ─(due, pacing allows)─► active
    pending ──────────────(no start delay, pacing allows)───────────────────► active
    active ─(succeeded)─► succeeded          (updated: the health gate compares these)
    active ─(failed, rolled back or timed out; tries left)─► retry ─(backoff over)─► active
    active ─(the same, no tries left)─► failed
    succeeded ─(revert)─► reverting ─► reverted | revert_failed
    pending, scheduled, retry ─(the device left the selector or was decommissioned)─► skipped

One step, in order: (1) observe what finished or timed out; (2) the install gate on the current
wave; (3) the health gate; (4) advance the wave when all its devices are done; (5) tell more
devices, in wave order, within the pacing. A paused rollout observes but tells no one; an
aborted or completed one only observes.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from corral.core.rollout_spec import HealthGate, RolloutSpec, in_windows

RolloutStatus = Literal["running", "paused", "completed", "aborted"]
DeviceStateName = Literal["pending", "scheduled", "active", "succeeded", "retry", "failed", "skipped",
                          "reverting", "reverted", "revert_failed"]

#: a device whose part is over (it counts for the wave being done)
DONE: frozenset[str] = frozenset({"succeeded", "failed", "skipped", "reverting", "reverted", "revert_failed"})
#: deployment statuses (AWS IoT Jobs' words) that end an attempt
FINAL_DEPLOY: frozenset[str] = frozenset({"succeeded", "failed", "rolled-back"})
ACTIVE_STATUSES: frozenset[RolloutStatus] = frozenset({"running", "paused"})


@dataclass(frozen=True)
class DeviceState:
    device_id: str
    wave: int
    state: DeviceStateName = "pending"
    #: attempts started (the current one when active)
    attempt: int = 0
    #: scheduled: when it starts; retry: not before
    not_before: float | None = None
    #: when the current attempt was told
    started_at: float | None = None
    finished_at: float | None = None
    #: the status the device reports for its current attempt (or its revert), None before
    deploy_status: str | None = None
    #: why it failed (the device's reason, or the planner's: timed out)
    reason: str = ""
    #: the value of the pacing's per_tag tag, and the device's time zone attribute
    tag_value: str | None = None
    timezone: str | None = None
    #: still a device of this rollout (matches the selector, accepted)
    eligible: bool = True


@dataclass(frozen=True)
class RolloutState:
    status: RolloutStatus
    current_wave: int
    #: the cumulative device count at the end of each wave
    sizes: tuple[int, ...]
    reason: str = ""
    #: (finished, failed) per wave when the operator last resumed: the install gate counts what
    #: came after (resuming accepts the failures seen so far)
    acknowledged: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    #: the last baseline median the health gate saw (used once no device is left un-updated)
    baseline: float | None = None


@dataclass(frozen=True)
class HealthVerdict:
    """The health gate's comparison (:func:`health_verdict`)."""

    regression: bool
    updated: float | None
    baseline: float | None
    n_updated: int
    n_baseline: int
    reason: str = ""


@dataclass(frozen=True)
class Event:
    """A webhook event: ``rollout.<kind>`` (started, wave_advanced, paused, resumed, completed,
    aborted, reverting) with its data."""

    kind: str
    data: Mapping[str, object]


@dataclass(frozen=True)
class Decision:
    rollout: RolloutState
    #: devices whose state changed (to persist), by id
    changed: Mapping[str, DeviceState]
    #: (device id, attempt) to tell, after the decision is persisted
    notify: tuple[tuple[str, int], ...] = ()
    #: devices to roll back to their previous version (auto-revert), after the decision is persisted
    revert: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()


def start_delay(seed: int, device_id: str, spread: float) -> float:
    """A device's start delay in [0, spread): from the seed and its id, so a restarted server
    draws the same one."""
    if spread <= 0:
        return 0.0
    h = hashlib.blake2b(f"{seed}:{device_id}".encode(), digest_size=8).digest()
    return spread * int.from_bytes(h, "big") / 2**64


def retry_delay(backoff: float, attempt: int) -> float:
    """Before try ``attempt + 1``: ``backoff * 2**(attempt - 1)``, at most a day."""
    return float(min(backoff * 2 ** min(max(attempt - 1, 0), 30), 86400.0))


def wave_of(position: int, sizes: Sequence[int]) -> int:
    """The wave of the device at ``position`` (0-based) in the rollout's order."""
    for i, size in enumerate(sizes):
        if position < size:
            return i
    return len(sizes) - 1


# --- (1) observe --------------------------------------------------------------------------------


def observe(d: DeviceState, now: float, spec: RolloutSpec) -> DeviceState:
    """A device's state after what its last report says, and the clock (pure; no pacing)."""
    if d.state == "active":
        timed_out = d.deploy_status not in FINAL_DEPLOY and d.started_at is not None \
            and now - d.started_at > spec.pacing.device_timeout
        if d.deploy_status == "succeeded":
            return replace(d, state="succeeded", finished_at=now, reason="")
        if d.deploy_status in ("failed", "rolled-back") or timed_out:
            reason = d.reason or (d.deploy_status or "")
            if timed_out:
                reason = f"timed out after {spec.pacing.device_timeout:g}s"
            if d.attempt <= spec.pacing.retries:
                return replace(d, state="retry", finished_at=now, reason=reason,
                               not_before=now + retry_delay(spec.pacing.retry_backoff, d.attempt))
            return replace(d, state="failed", finished_at=now, reason=reason)
    if d.state == "reverting" and d.deploy_status in FINAL_DEPLOY:
        return replace(d, state="reverted" if d.deploy_status == "succeeded" else "revert_failed",
                       finished_at=now, reason=d.reason if d.deploy_status != "succeeded" else "")
    if d.state in ("pending", "scheduled", "retry") and not d.eligible:
        return replace(d, state="skipped", finished_at=now, reason="no longer selected")
    return d


# --- (2) the install gate -----------------------------------------------------------------------


def wave_counts(devices: Sequence[DeviceState], wave: int) -> tuple[int, int]:
    """(finished, failed) among the devices of ``wave``: a device counts as failed only once it
    has no tries left."""
    finished = failed = 0
    for d in devices:
        if d.wave == wave and d.state in ("succeeded", "failed"):
            finished += 1
            failed += d.state == "failed"
    return finished, failed


def install_gate_trips(spec: RolloutSpec, r: RolloutState, devices: Sequence[DeviceState]) -> str | None:
    """The reason the install gate stops the rollout now, or None."""
    gate = spec.install_gate
    if gate is None:
        return None
    finished, failed = wave_counts(devices, r.current_wave)
    ack_finished, ack_failed = r.acknowledged.get(r.current_wave, (0, 0))
    finished, failed = finished - ack_finished, failed - ack_failed
    if finished < gate.min_sample or failed <= gate.max_failure_rate * finished:
        return None
    return (f"install gate: {failed} of {finished} finished devices in wave {r.current_wave + 1} failed "
            f"({100 * failed / finished:.0f}% > {100 * gate.max_failure_rate:g}%)")


# --- (3) the health gate ------------------------------------------------------------------------


def health_verdict(gate: HealthGate, updated: Mapping[str, float], baseline: Mapping[str, float],
                   last_baseline: float | None = None) -> HealthVerdict:
    """Compare the per-device means of updated devices with those of devices not updated yet.

    The statistic is the median of the per-device means (one noisy or broken device moves a
    median less than a mean); with fewer than ``min_devices`` on either side there is no verdict
    (no regression), except that once too few devices are left un-updated the last baseline seen
    stands in for them."""
    n_u, n_b = len(updated), len(baseline)
    base = statistics.median(baseline.values()) if n_b >= gate.min_devices else last_baseline
    if n_u < gate.min_devices or base is None:
        return HealthVerdict(False, None, base, n_u, n_b, "not enough devices to compare yet")
    new = statistics.median(updated.values())
    if gate.higher_is_worse:
        limit = base + abs(base) * gate.tolerance + gate.absolute
        worse = new > limit
    else:
        limit = base - abs(base) * gate.tolerance - gate.absolute
        worse = new < limit
    reason = (f"health gate: {gate.metric} on {n_u} updated devices {new:.4g} vs {base:.4g} on "
              f"{n_b if n_b >= gate.min_devices else 'earlier'} not updated "
              f"({'above' if gate.higher_is_worse else 'below'} the limit {limit:.4g})") if worse else ""
    return HealthVerdict(worse, new, base, n_u, n_b, reason)


# --- (5) admission ------------------------------------------------------------------------------


@dataclass
class _Budget:
    """What pacing still allows in this step."""

    concurrent: int | None
    this_minute: int | None
    per_tag: Counter[str | None]
    per_tag_max: int | None

    def allows(self, d: DeviceState) -> bool:
        if self.concurrent is not None and self.concurrent <= 0:
            return False
        if self.this_minute is not None and self.this_minute <= 0:
            return False
        return self.per_tag_max is None or self.per_tag[d.tag_value] < self.per_tag_max

    def take(self, d: DeviceState) -> None:
        if self.concurrent is not None:
            self.concurrent -= 1
        if self.this_minute is not None:
            self.this_minute -= 1
        self.per_tag[d.tag_value] += 1

    @property
    def spent(self) -> bool:
        return (self.concurrent is not None and self.concurrent <= 0) or \
            (self.this_minute is not None and self.this_minute <= 0)


def _budget(spec: RolloutSpec, devices: Sequence[DeviceState], now: float) -> _Budget:
    p = spec.pacing
    active = [d for d in devices if d.state == "active"]
    started_lately = sum(1 for d in devices if d.started_at is not None and now - d.started_at < 60.0)
    return _Budget(
        concurrent=None if p.max_concurrent is None else p.max_concurrent - len(active),
        this_minute=None if p.max_per_minute is None else p.max_per_minute - started_lately,
        per_tag=Counter(d.tag_value for d in active) if p.per_tag is not None else Counter(),
        per_tag_max=p.per_tag_max)


def _admit(spec: RolloutSpec, r: RolloutState, devices: list[DeviceState], now: float,
           changed: dict[str, DeviceState]) -> list[tuple[str, int]]:
    notify: list[tuple[str, int]] = []
    budget = _budget(spec, devices, now)
    p = spec.pacing
    for i, d in enumerate(devices):
        if budget.spent:
            break
        if d.wave > r.current_wave:
            continue
        if d.state == "pending" and p.start_delay > 0:
            d = replace(d, state="scheduled", not_before=now + start_delay(spec.seed, d.device_id, p.start_delay))
            devices[i] = changed[d.device_id] = d
        if d.state not in ("pending", "scheduled", "retry"):
            continue
        if d.not_before is not None and d.not_before > now:
            continue
        if not budget.allows(d) or not in_windows(p.windows, now, d.timezone):
            continue
        budget.take(d)
        d = replace(d, state="active", attempt=d.attempt + 1, started_at=now, finished_at=None,
                    deploy_status=None, not_before=None, reason="")
        devices[i] = changed[d.device_id] = d
        notify.append((d.device_id, d.attempt))
    return notify


# --- the step -----------------------------------------------------------------------------------


def _wave_done(spec: RolloutSpec, r: RolloutState, devices: Sequence[DeviceState], now: float) -> bool:
    last_finish = 0.0
    for d in devices:
        if d.wave <= r.current_wave:
            if d.state not in DONE:
                return False
            last_finish = max(last_finish, d.finished_at or 0.0)
    return now - last_finish >= spec.pacing.wave_wait


def _stop(r: RolloutState, status: RolloutStatus, reason: str, events: list[Event]) -> RolloutState:
    events.append(Event(status, {"reason": reason, "wave": r.current_wave + 1}))
    return replace(r, status=status, reason=reason)


def plan(spec: RolloutSpec, rollout: RolloutState, devices: Sequence[DeviceState], now: float,
         health: HealthVerdict | None = None) -> Decision:
    """One step of the rollout (see the module docstring). ``devices`` in rollout order."""
    r = rollout
    events: list[Event] = []
    changed: dict[str, DeviceState] = {}
    current: list[DeviceState] = []
    for d in devices:  # (1)
        seen = observe(d, now, spec)
        if seen != d:
            changed[d.device_id] = seen
        current.append(seen)
    if r.status not in ACTIVE_STATUSES:
        return Decision(r, changed, events=tuple(events))

    revert: tuple[str, ...] = ()
    if r.status == "running":
        why = install_gate_trips(spec, r, current)  # (2)
        if why is not None:
            assert spec.install_gate is not None
            r = _stop(r, "aborted" if spec.install_gate.action == "abort" else "paused", why, events)
        elif health is not None and health.regression:  # (3)
            assert spec.health_gate is not None
            r = _stop(r, "paused", health.reason, events)
            if spec.health_gate.auto_revert:
                revert = revert_updated(current, now, changed)
                events.append(Event("reverting", {"devices": len(revert), "reason": health.reason}))
    if health is not None and health.n_baseline >= (spec.health_gate.min_devices if spec.health_gate else 1) \
            and health.baseline is not None:
        r = replace(r, baseline=health.baseline)
    if r.status != "running":
        return Decision(r, changed, revert=revert, events=tuple(events))

    while _wave_done(spec, r, current, now):  # (4)
        if r.current_wave + 1 >= len(r.sizes):
            if not spec.include_new:
                r = replace(r, status="completed", reason="")
                done = Counter(d.state for d in current)
                events.append(Event("completed", {"succeeded": done["succeeded"], "failed": done["failed"],
                                                  "skipped": done["skipped"]}))
            break
        r = replace(r, current_wave=r.current_wave + 1)
        events.append(Event("wave_advanced", {"wave": r.current_wave + 1, "of": len(r.sizes)}))
    if r.status != "running":
        return Decision(r, changed, events=tuple(events))
    notify = _admit(spec, r, current, now, changed)  # (5)
    return Decision(r, changed, notify=tuple(notify), events=tuple(events))


def revert_updated(devices: list[DeviceState], now: float, changed: dict[str, DeviceState]) -> tuple[str, ...]:
    """Every updated device goes back to its previous version: ``reverting`` (in ``devices`` and
    ``changed``); returns their ids."""
    out = []
    for i, d in enumerate(devices):
        if d.state == "succeeded":
            devices[i] = changed[d.device_id] = replace(d, state="reverting", deploy_status=None, started_at=now,
                                                        finished_at=None, reason="")
            out.append(d.device_id)
    return tuple(out)


def pause(r: RolloutState, reason: str = "paused by an operator") -> RolloutState:
    return replace(r, status="paused", reason=reason) if r.status == "running" else r


def resume(r: RolloutState, devices: Sequence[DeviceState]) -> RolloutState:
    """Running again; the install gate accepts the failures seen so far in the current wave."""
    if r.status != "paused":
        return r
    ack = dict(r.acknowledged)
    ack[r.current_wave] = wave_counts(devices, r.current_wave)
    return replace(r, status="running", reason="", acknowledged=ack)


def abort(r: RolloutState, reason: str = "aborted by an operator") -> RolloutState:
    return replace(r, status="aborted", reason=reason) if r.status in ACTIVE_STATUSES else r
