"""The rollout planner, table-driven and without a network: waves, the install gate at exactly the
right count, the health gate, pacing (concurrency, per minute, per tag, start delay, maintenance
windows), retries with backoff, timeouts, pause/resume/abort, and a random walk that checks the
invariants a restart-safe engine relies on."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core import rollout_plan as rp
from corral.core.rollout_plan import DeviceState, RolloutState
from corral.core.rollout_spec import (
    HealthGate,
    InstallGate,
    Pacing,
    RolloutSpec,
    Wave,
    in_windows,
    parse_waves,
    parse_window,
    wave_sizes,
)
from corral.errors import InvalidInput

T0 = 1_800_000_000.0  # a Friday, 08:00 UTC (2027-01-15)


# --- waves ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "total", "sizes"), [
    ("1%,10%,50%,100%", 1000, (10, 100, 500, 1000)),
    ("1%,10%,50%,100%", 20, (1, 2, 10, 20)),  # rounded up: a non-empty wave is never empty
    ("1%,10%,50%,100%", 0, (0, 0, 0, 0)),
    ("5,50,all", 20, (5, 20, 20)),  # counts are capped at the fleet
    ("5,10%,all", 20, (5, 5, 20)),  # mixed: never shrinks
    ("all", 3, (3,)),
])
def test_waves_are_cumulative_device_counts(text: str, total: int, sizes: tuple[int, ...]) -> None:
    assert wave_sizes(parse_waves(text), total) == sizes


@pytest.mark.parametrize(("text", "why"), [
    ("", "comma-separated"),
    ("10%,,100%", "comma-separated"),
    ("10%,50%", "last wave must be 100% or all"),
    ("0%,100%", "percentage in (0, 100]"),
    ("150%", "percentage in (0, 100]"),
    ("-3,all", "count >= 1"),
    ("x,all", "count >= 1"),
    ("50%,10%,100%", "must not shrink"),
    ("50,10,all", "must not shrink"),
    (",".join(["all"] * 21), "at most 20"),
])
def test_bad_waves_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        parse_waves(text)


def test_100_percent_is_all() -> None:
    assert parse_waves("100%") == parse_waves("all") == (Wave(),)


# --- maintenance windows -------------------------------------------------------------------------


def at(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


@pytest.mark.parametrize(("window", "when", "tz", "inside"), [
    ("02:00-05:00", "2027-01-15T02:30:00+00:00", None, True),
    ("02:00-05:00", "2027-01-15T05:00:00+00:00", None, False),  # the end is excluded
    ("02:00-05:00", "2027-01-15T01:30:00+00:00", "Europe/Berlin", True),  # 02:30 in Berlin (UTC+1)
    ("02:00-05:00", "2027-01-15T02:30:00+00:00", "Europe/Berlin", True),  # 03:30
    ("02:00-05:00", "2027-01-15T04:30:00+00:00", "Europe/Berlin", False),  # 05:30
    ("02:00-05:00", "2027-01-15T02:30:00+00:00", "Not/AZone", True),  # unknown zone: UTC
    ("Mon-Fri 22:00-04:00", "2027-01-15T23:00:00+00:00", None, True),  # Friday night
    ("Mon-Fri 22:00-04:00", "2027-01-16T03:00:00+00:00", None, True),  # Saturday morning: Friday's window
    ("Mon-Fri 22:00-04:00", "2027-01-16T23:00:00+00:00", None, False),  # Saturday night
    ("Mon-Fri 22:00-04:00", "2027-01-18T03:00:00+00:00", None, False),  # Monday morning: Sunday's
    ("Sat,Sun 00:00-24:00", "2027-01-17T12:00:00+00:00", None, True),
    ("Sat,Sun 00:00-24:00", "2027-01-15T12:00:00+00:00", None, False),
    ("Fri-Mon 10:00-11:00", "2027-01-17T10:30:00+00:00", None, True),  # a range through the weekend
])
def test_maintenance_windows_are_in_the_device_time_zone(window: str, when: str, tz: str | None,
                                                         inside: bool) -> None:
    assert in_windows([parse_window(window)], at(when), tz) is inside


@pytest.mark.parametrize("text", ["", "2-5", "02:00-02:00", "25:00-03:00", "02:60-03:00", "Mon-Funday 02:00-03:00",
                                  "Mon- 02:00-03:00", "24:00-02:00"])
def test_bad_windows_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_window(text)


def test_no_windows_means_any_time() -> None:
    assert in_windows([], T0, None)


# --- helpers ---------------------------------------------------------------------------------------


def fleet(n: int, sizes: tuple[int, ...], **kw: object) -> list[DeviceState]:
    return [DeviceState(f"d{i:03d}", rp.wave_of(i, sizes), **kw) for i in range(n)]  # type: ignore[arg-type]


def running(sizes: tuple[int, ...]) -> RolloutState:
    return RolloutState("running", 0, sizes)


def apply(devices: list[DeviceState], decision: rp.Decision) -> list[DeviceState]:
    return [decision.changed.get(d.device_id, d) for d in devices]


def report(devices: list[DeviceState], status: str, ids: set[str] | None = None,
           reason: str = "") -> list[DeviceState]:
    """The devices told (``active``) report ``status`` (only ``ids``, when given)."""
    return [replace(d, deploy_status=status, reason=reason)
            if d.state in ("active", "reverting") and (ids is None or d.device_id in ids) else d for d in devices]


def told(decision: rp.Decision) -> list[str]:
    return [device for device, _ in decision.notify]


# --- observe -------------------------------------------------------------------------------------


SPEC_RETRY = RolloutSpec(parse_waves("all"), pacing=Pacing(retries=2, retry_backoff=10, device_timeout=100))


@pytest.mark.parametrize(("before", "after"), [
    (DeviceState("d", 0, "active", 1, started_at=T0, deploy_status="in-progress"), "active"),
    (DeviceState("d", 0, "active", 1, started_at=T0, deploy_status="succeeded"), "succeeded"),
    (DeviceState("d", 0, "active", 1, started_at=T0, deploy_status="failed"), "retry"),
    (DeviceState("d", 0, "active", 2, started_at=T0, deploy_status="rolled-back"), "retry"),
    (DeviceState("d", 0, "active", 3, started_at=T0, deploy_status="failed"), "failed"),  # 1 + 2 retries
    (DeviceState("d", 0, "active", 3, started_at=T0 - 101, deploy_status="in-progress"), "failed"),  # timed out
    (DeviceState("d", 0, "active", 1, started_at=T0 - 101), "retry"),  # never answered: timed out, retried
    (DeviceState("d", 0, "pending", eligible=False), "skipped"),
    (DeviceState("d", 0, "retry", 1, eligible=False), "skipped"),
    (DeviceState("d", 0, "active", 1, started_at=T0, eligible=False), "active"),  # told: it finishes
    (DeviceState("d", 0, "succeeded", 1, eligible=False), "succeeded"),
    (DeviceState("d", 0, "reverting", 1, deploy_status="succeeded"), "reverted"),
    (DeviceState("d", 0, "reverting", 1, deploy_status="failed"), "revert_failed"),
])
def test_observe(before: DeviceState, after: str) -> None:
    assert rp.observe(before, T0, SPEC_RETRY).state == after


def test_a_retry_waits_its_backoff_doubling_each_time() -> None:
    d = DeviceState("d", 0, "active", 1, started_at=T0, deploy_status="failed", reason="hash mismatch")
    first = rp.observe(d, T0, SPEC_RETRY)
    assert (first.state, first.not_before, first.reason) == ("retry", T0 + 10, "hash mismatch")
    second = rp.observe(replace(first, state="active", attempt=2, deploy_status="failed"), T0, SPEC_RETRY)
    assert second.not_before == T0 + 20
    timed = rp.observe(DeviceState("d", 0, "active", 1, started_at=T0 - 101), T0, SPEC_RETRY)
    assert timed.reason == "timed out after 100s"


# --- waves end to end --------------------------------------------------------------------------------


def test_waves_advance_when_every_device_of_the_wave_is_done() -> None:
    spec = RolloutSpec(parse_waves("10%,50%,100%"), install_gate=None)
    sizes = wave_sizes(spec.waves, 20)  # (2, 10, 20)
    devices, r = fleet(20, sizes), running(sizes)
    d = rp.plan(spec, r, devices, T0)
    assert told(d) == ["d000", "d001"] and d.events == ()
    devices, r = apply(devices, d), d.rollout
    d = rp.plan(spec, r, report(devices, "in-progress"), T0 + 1)
    assert d.notify == () and d.rollout.current_wave == 0  # nothing more until the wave is done
    devices = report(apply(devices, d), "succeeded", {"d000"})
    d = rp.plan(spec, r, devices, T0 + 2)
    assert d.notify == () and d.rollout.current_wave == 0
    devices = report(apply(devices, d), "failed", {"d001"})  # a failure still ends the device's part
    d = rp.plan(spec, r, devices, T0 + 3)
    assert d.rollout.current_wave == 1 and [e.kind for e in d.events] == ["wave_advanced"]
    assert d.events[0].data == {"wave": 2, "of": 3}
    assert told(d) == [f"d{i:03d}" for i in range(2, 10)]
    devices, r = apply(devices, d), d.rollout
    d = rp.plan(spec, r, report(devices, "succeeded"), T0 + 4)
    assert d.rollout.current_wave == 2 and told(d) == [f"d{i:03d}" for i in range(10, 20)]
    devices, r = apply(report(devices, "succeeded"), d), d.rollout
    d = rp.plan(spec, r, report(devices, "succeeded"), T0 + 5)
    assert d.rollout.status == "completed"
    assert [(e.kind, dict(e.data)) for e in d.events] == [("completed", {"succeeded": 19, "failed": 1, "skipped": 0})]


def test_a_wave_waits_wave_wait_after_its_last_device() -> None:
    spec = RolloutSpec(parse_waves("1,all"), install_gate=None, pacing=Pacing(wave_wait=30))
    sizes = wave_sizes(spec.waves, 3)
    devices = apply(fleet(3, sizes), d := rp.plan(spec, running(sizes), fleet(3, sizes), T0))
    d = rp.plan(spec, d.rollout, report(devices, "succeeded"), T0 + 5)
    devices = apply(devices, d)
    assert d.rollout.current_wave == 0
    assert rp.plan(spec, d.rollout, devices, T0 + 34).rollout.current_wave == 0
    assert rp.plan(spec, d.rollout, devices, T0 + 35).rollout.current_wave == 1


def test_with_include_new_the_rollout_keeps_following_after_its_last_wave() -> None:
    spec = RolloutSpec(parse_waves("all"), install_gate=None, include_new=True)
    devices = [DeviceState("a", 0, "succeeded", 1, finished_at=T0)]
    d = rp.plan(spec, running((1,)), devices, T0 + 1)
    assert d.rollout.status == "running" and d.notify == ()
    d = rp.plan(spec, d.rollout, [*devices, DeviceState("late", 0)], T0 + 2)  # a device joined
    assert told(d) == ["late"]


# --- the install gate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("gate", "outcomes", "trips_at"), [
    # 20 % with a sample of 5: two failures among the first five finished is 40 %: pause at the fifth
    (InstallGate(0.2, 5), "FSFSS", 5),
    (InstallGate(0.2, 5), "FFSSSSSS", 5),
    (InstallGate(0.2, 5), "SSSSFSSSSS", None),  # 1 of 5 = 20 %: not more than the threshold
    (InstallGate(0.2, 5), "SSSSFSSSSF", None),  # 2 of 10
    (InstallGate(0.2, 5), "SSSSFSSSFF", 9),  # 2 of 9 = 22 %
    (InstallGate(0.0, 1), "SSF", 3),  # no failure tolerated
    (InstallGate(0.5, 3), "FF", None),  # the sample is not reached
    (InstallGate(0.5, 3), "FFS", 3),
])
def test_the_install_gate_trips_at_exactly_the_right_count(gate: InstallGate, outcomes: str,
                                                          trips_at: int | None) -> None:
    spec = RolloutSpec(parse_waves("all"), install_gate=gate)
    n = len(outcomes) + 2  # two devices never finish: the wave is not done
    devices = [DeviceState(f"d{i:02d}", 0, "active", 1, started_at=T0, deploy_status="in-progress") for i in range(n)]
    r = running((n,))
    tripped = None
    for k, outcome in enumerate(outcomes, start=1):
        devices[k - 1] = replace(devices[k - 1], deploy_status="succeeded" if outcome == "S" else "failed")
        d = rp.plan(spec, r, devices, T0 + k)
        devices, r = apply(devices, d), d.rollout
        if r.status != "running":
            tripped = k
            assert [e.kind for e in d.events] == ["paused"]
            assert "install gate" in r.reason and "wave 1" in r.reason
            break
    assert tripped == trips_at


def test_the_install_gate_can_abort_and_an_aborted_rollout_tells_no_one_more() -> None:
    spec = RolloutSpec(parse_waves("all"), install_gate=InstallGate(0.0, 1, "abort"))
    devices = [DeviceState("a", 0, "active", 1, started_at=T0, deploy_status="failed"), DeviceState("b", 0)]
    d = rp.plan(spec, running((2,)), devices, T0)
    assert d.rollout.status == "aborted" and d.notify == () and [e.kind for e in d.events] == ["aborted"]
    later = rp.plan(spec, d.rollout, apply(devices, d), T0 + 60)
    assert later.notify == () and later.rollout.status == "aborted"


def test_resume_accepts_the_failures_seen_so_far() -> None:
    spec = RolloutSpec(parse_waves("all"), install_gate=InstallGate(0.2, 2))
    devices = [DeviceState(f"d{i}", 0, "active", 1, started_at=T0, deploy_status="failed" if i < 2 else "in-progress")
               for i in range(6)] + [DeviceState("p", 0)]
    d = rp.plan(spec, running((7,)), devices, T0)
    devices, r = apply(devices, d), d.rollout
    assert r.status == "paused"
    assert rp.plan(spec, r, devices, T0 + 1).notify == ()  # paused: no one more
    r = rp.resume(r, devices)
    assert r.status == "running" and r.acknowledged == {0: (2, 2)}
    d = rp.plan(spec, r, devices, T0 + 2)
    assert d.rollout.status == "running" and told(d) == ["p"]
    devices = report(apply(devices, d), "succeeded", {"d2", "d3"})  # 2 new successes: 0 of 2 failed
    d = rp.plan(spec, d.rollout, devices, T0 + 3)
    assert d.rollout.status == "running"


# --- the health gate ---------------------------------------------------------------------------------------


GATE = HealthGate("app.crashes", tolerance=0.2, absolute=0.5, min_devices=3)


@pytest.mark.parametrize(("updated", "baseline", "last", "regression", "why"), [
    ([1, 1, 1], [1, 1, 1], None, False, ""),
    ([2, 2, 2], [1, 1, 1], None, True, "health gate: app.crashes on 3 updated devices 2 vs 1"),
    ([1.6, 1.7, 1.7], [1, 1, 1], None, False, ""),  # limit 1 + 0.2 + 0.5 = 1.7: not above
    ([1.8, 1.8, 1.8], [1, 1, 1], None, True, "limit 1.7"),
    ([9, 1, 1], [1, 1, 1], None, False, ""),  # one broken device does not move the median
    ([2, 2], [1, 1, 1], None, False, ""),  # too few updated to say
    ([2, 2, 2], [1], None, False, ""),  # too few baseline devices, and no earlier baseline
    ([2, 2, 2], [1], 1.0, True, "vs 1 on earlier not updated"),  # the last baseline stands in
])
def test_health_verdict(updated: list[float], baseline: list[float], last: float | None, regression: bool,
                        why: str) -> None:
    v = rp.health_verdict(GATE, {f"u{i}": x for i, x in enumerate(updated)},
                          {f"b{i}": x for i, x in enumerate(baseline)}, last)
    assert v.regression is regression
    assert why in v.reason
    assert v.reason.startswith("health gate") is regression


def test_lower_is_worse() -> None:
    gate = HealthGate("app.throughput", tolerance=0.1, higher_is_worse=False, min_devices=1)
    assert rp.health_verdict(gate, {"u": 85.0}, {"b": 100.0}).regression
    assert not rp.health_verdict(gate, {"u": 95.0}, {"b": 100.0}).regression


def test_a_regression_pauses_and_with_auto_revert_rolls_the_updated_devices_back() -> None:
    spec = RolloutSpec(parse_waves("2,all"), install_gate=None,
                       health_gate=replace(GATE, auto_revert=True))
    devices = [DeviceState("a", 0, "succeeded", 1, finished_at=T0), DeviceState("b", 0, "active", 1, started_at=T0),
               DeviceState("c", 1)]
    bad = rp.HealthVerdict(True, 3.0, 1.0, 3, 5, "health gate: worse")
    d = rp.plan(spec, running((2, 3)), devices, T0 + 1, bad)
    assert d.rollout.status == "paused" and d.rollout.reason == "health gate: worse"
    assert d.revert == ("a",) and d.changed["a"].state == "reverting" and d.notify == ()
    assert [e.kind for e in d.events] == ["paused", "reverting"]
    assert d.rollout.baseline == 1.0
    devices = report(apply(devices, d), "succeeded", {"a"})
    after = rp.plan(spec, d.rollout, devices, T0 + 2)
    assert after.changed["a"].state == "reverted"
    # without auto-revert: paused only
    spec = replace(spec, health_gate=GATE)
    d = rp.plan(spec, running((2, 3)), [DeviceState("a", 0, "succeeded", 1, finished_at=T0)], T0, bad)
    assert d.rollout.status == "paused" and d.revert == ()


# --- pacing -------------------------------------------------------------------------------------------------


def test_max_concurrent_and_max_per_minute() -> None:
    spec = RolloutSpec(parse_waves("all"), install_gate=None, pacing=Pacing(max_concurrent=3, max_per_minute=5))
    devices, r = fleet(10, (10,)), running((10,))
    d = rp.plan(spec, r, devices, T0)
    assert told(d) == ["d000", "d001", "d002"]  # three at a time
    devices = apply(devices, d)
    devices = report(devices, "succeeded", {"d000", "d001", "d002"})
    d = rp.plan(spec, r, devices, T0 + 1)
    assert told(d) == ["d003", "d004"]  # five in the last minute
    devices = report(apply(devices, d), "succeeded")
    assert told(rp.plan(spec, r, devices, T0 + 59)) == []
    assert told(rp.plan(spec, r, devices, T0 + 60.5)) == ["d005", "d006", "d007"]


def test_a_cap_per_tag_value() -> None:
    spec = RolloutSpec(parse_waves("all"), install_gate=None, pacing=Pacing(per_tag="site", per_tag_max=1))
    sites = ["berlin", "berlin", "paris", "berlin", None, None]
    devices = [DeviceState(f"d{i}", 0, tag_value=s) for i, s in enumerate(sites)]
    d = rp.plan(spec, running((6,)), devices, T0)
    assert told(d) == ["d0", "d2", "d4"]  # one per site; devices without the tag share one cap


def test_a_random_start_delay_schedules_each_device_reproducibly() -> None:
    spec = RolloutSpec(parse_waves("all"), install_gate=None, pacing=Pacing(start_delay=60), seed=7)
    devices = fleet(5, (5,))
    d = rp.plan(spec, running((5,)), devices, T0)
    delays = {k: v.not_before - T0 for k, v in d.changed.items()}  # type: ignore[operator]
    assert d.notify == () and all(v.state == "scheduled" for v in d.changed.values())
    assert all(0 <= x < 60 for x in delays.values()) and len(set(delays.values())) == 5
    # the same after a restart: drawn from the seed and the device id
    assert {k: v.not_before for k, v in d.changed.items()} == {k: T0 + rp.start_delay(7, k, 60) for k in delays}
    devices = apply(devices, d)
    first = min(delays, key=lambda k: delays[k])
    assert told(rp.plan(spec, d.rollout, devices, T0 + delays[first])) == [first]
    assert len(rp.plan(spec, d.rollout, devices, T0 + 60).notify) == 5


def test_maintenance_windows_hold_devices_until_their_local_window() -> None:
    window = parse_window("02:00-05:00")
    spec = RolloutSpec(parse_waves("all"), install_gate=None, pacing=Pacing(windows=(window,)))
    devices = [DeviceState("berlin", 0, timezone="Europe/Berlin"), DeviceState("tokyo", 0, timezone="Asia/Tokyo"),
               DeviceState("utc", 0)]
    now = at("2027-01-15T01:30:00+00:00")  # Berlin 02:30, Tokyo 10:30, UTC 01:30
    assert told(rp.plan(spec, running((3,)), devices, now)) == ["berlin"]
    now = at("2027-01-14T17:30:00+00:00")  # Tokyo 02:30
    assert told(rp.plan(spec, running((3,)), devices, now)) == ["tokyo"]


def test_a_failed_device_is_retried_after_its_backoff_then_given_up() -> None:
    spec = RolloutSpec(parse_waves("all"), install_gate=None, pacing=Pacing(retries=1, retry_backoff=30))
    devices, r = [DeviceState("a", 0)], running((1,))
    d = rp.plan(spec, r, devices, T0)
    assert d.notify == (("a", 1),)
    devices = report(apply(devices, d), "failed", reason="disk full")
    d = rp.plan(spec, r, devices, T0 + 1)
    devices = apply(devices, d)
    assert devices[0].state == "retry" and d.notify == ()
    assert rp.plan(spec, r, devices, T0 + 30).notify == ()
    d = rp.plan(spec, r, devices, T0 + 31)
    assert d.notify == (("a", 2),)  # the second attempt
    devices = report(apply(devices, d), "failed")
    d = rp.plan(spec, r, devices, T0 + 32)
    assert d.changed["a"].state == "failed" and d.rollout.status == "completed"


def test_pause_and_abort_by_an_operator() -> None:
    r = running((1,))
    assert rp.pause(r).status == "paused" and rp.abort(rp.pause(r)).status == "aborted"
    assert rp.resume(rp.abort(r), []).status == "aborted"  # an aborted rollout stays so
    completed = replace(r, status="completed")
    assert rp.pause(completed) == completed and rp.abort(completed) == completed


# --- a random walk: the invariants the engine relies on -------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(0, 40), retries=st.integers(0, 2),
       concurrent=st.one_of(st.none(), st.integers(1, 5)), fail=st.floats(0, 0.5))
def test_random_walk_invariants(seed: int, n: int, retries: int, concurrent: int | None, fail: float) -> None:
    rng = random.Random(seed)
    spec = RolloutSpec(parse_waves("10%,50%,all"), install_gate=InstallGate(0.6, 4),
                       pacing=Pacing(max_concurrent=concurrent, retries=retries, retry_backoff=5, device_timeout=50))
    sizes = wave_sizes(spec.waves, n)
    devices, r = fleet(n, sizes), running(sizes)
    told_attempts: set[tuple[str, int]] = set()
    now = T0
    for _ in range(400):
        d = rp.plan(spec, r, devices, now)
        for device, attempt in d.notify:
            assert (device, attempt) not in told_attempts  # never told twice for one attempt
            told_attempts.add((device, attempt))
            assert attempt <= retries + 1
        devices, r = apply(devices, d), d.rollout
        active = [x for x in devices if x.state == "active"]
        assert concurrent is None or len(active) <= concurrent
        assert all(x.wave <= r.current_wave for x in active)
        if r.status != "running":
            break
        # the devices report, at random
        outcome = ["in-progress", "failed" if rng.random() < fail else "succeeded"]
        devices = [replace(x, deploy_status=rng.choice(outcome)) if x.state == "active" and rng.random() < 0.5 else x
                   for x in devices]
        now += rng.uniform(0.5, 10)
    assert r.status in ("completed", "paused", "aborted")
    if r.status == "completed":
        assert all(x.state in ("succeeded", "failed") for x in devices)


def test_the_order_is_seeded_and_puts_the_canary_devices_first() -> None:
    from corral.server.updates.rollouts import order_devices

    ids = [f"d{i:02d}" for i in range(20)]
    a, b = order_devices(ids, 7, set()), order_devices(reversed(ids), 7, set())
    assert a == b and sorted(a) == ids and a != ids  # the same order whatever the input order: reproducible
    assert order_devices(ids, 8, set()) != a  # another seed, another order
    canary = {"d05", "d17"}
    first = order_devices(ids, 7, canary)
    assert set(first[:2]) == canary and first[2:] == [d for d in a if d not in canary]
