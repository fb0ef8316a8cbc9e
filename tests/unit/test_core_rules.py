"""On-device rules: validation, refusal of self-destructive rules, the threshold machine's exact
path, and allow-list plans (protected pids, kernel threads, report once, pruning)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core import rules as r
from corral.core.expr import parse_condition
from corral.errors import ExpressionError, InvalidInput
from corral.protocol import Event, RuleSpec


def threshold(expr: str, for_s: float = 0.0, severity: str = "warning", **kw: object) -> RuleSpec:
    return RuleSpec(id="r1", name="cpu hot", kind="threshold", expr=expr, for_s=for_s,
                    severity=severity, **kw)  # type: ignore[arg-type]


def allowlist(*allow: str, mode: str = "report", **kw: object) -> RuleSpec:
    return RuleSpec(id="a1", name="prod", kind="allowlist", mode=mode, allow=list(allow), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

VALID: list[RuleSpec] = [
    threshold("cpu.percent > 90"),
    threshold("cpu.percent > 90 for 5m"),
    threshold("cpu.percent > 90", for_s=300),
    threshold("temp.cpu >= 80 and not app.ok == 1", for_s=7 * 86400, severity="critical"),
    allowlist("/usr/bin/*"),
    allowlist("/usr/*", "/opt/app/bin/server", "/usr/lib/python3.?/*", mode="enforce"),
]


@pytest.mark.parametrize("spec", VALID)
def test_valid_rules(spec: RuleSpec) -> None:
    assert r.validate_rule(spec) is None


INVALID: list[tuple[RuleSpec, str]] = [
    (threshold("avg(cpu.percent) > 90"), "invalid expr: column 1: aggregate avg() is not allowed here"),
    (threshold("cpu.percent"), "invalid expr: column 1: a condition must be true or false"),
    (threshold(""), "invalid expr: column 1: empty expression"),
    (threshold("cpu.percent > 90 for 5m", for_s=60), "give the hold time once"),
    (threshold("cpu.percent > 90 for 8d"), "the hold time must be at most 604800 seconds"),
    (threshold("cpu.percent > 90", for_s=-1), "for_s must be between 0 and 604800 seconds"),
    (threshold("cpu.percent > 90", for_s=7 * 86400 + 1), "for_s must be between 0 and 604800"),
    (threshold("cpu.percent > 90", for_s=float("nan")), "for_s must be between"),
    (threshold("cpu.percent > 90", for_s=float("inf")), "for_s must be between"),
    (threshold("cpu.percent > 90", allow=["/bin/*"]), "allow is only used by allowlist rules"),
    (threshold("cpu.percent > 90", severity="fatal"), "unknown severity 'fatal'"),
    (threshold("cpu.percent > 90", mode="destroy"), "unknown mode 'destroy'"),
    (RuleSpec(id="", name="n", kind="threshold", expr="x > 1"), "rule id must be 1 to 128 characters"),
    (RuleSpec(id="x" * 129, name="n", kind="threshold", expr="x > 1"), "rule id must be"),
    (RuleSpec(id="i", name="", kind="threshold", expr="x > 1"), "rule name must be 1 to 200 characters"),
    (RuleSpec(id="i", name="n", kind="script", expr="x > 1"), "unknown rule kind 'script'"),  # type: ignore[arg-type]
    (allowlist(), "needs at least one allow pattern"),
    (allowlist("*"), "allow[0] must be an absolute path glob (starting with /), not '*'"),
    (allowlist("/usr/*", "bin/sh"), "allow[1] must be an absolute path glob"),
    (allowlist("/usr/\n*"), "allow[0] contains a control character"),
    (allowlist("/" + "a" * 4096), "allow[0] is longer than 4096 characters"),
    (allowlist(*(f"/bin/{i}" for i in range(257))), "at most 256 allow patterns"),
    (allowlist("/usr/*", expr="x > 1"), "expr and for_s are only used by threshold rules"),
    (allowlist("/usr/*", for_s=5), "expr and for_s are only used by threshold rules"),
]


@pytest.mark.parametrize(("spec", "reason"), INVALID)
def test_invalid_rules(spec: RuleSpec, reason: str) -> None:
    problem = r.validate_rule(spec)
    assert problem is not None and reason in problem, problem


def test_threshold_condition_merges_the_hold_time() -> None:
    assert r.threshold_condition(threshold("x > 1 for 5m")).for_s == 300.0
    assert r.threshold_condition(threshold("x > 1", for_s=30)).for_s == 30.0
    assert r.threshold_condition(threshold("x > 1")).for_s == 0.0
    with pytest.raises(ExpressionError):
        r.threshold_condition(threshold("x >"))
    with pytest.raises(InvalidInput):
        r.threshold_condition(threshold("x > 1 for 1m", for_s=60))


# --------------------------------------------------------------------------------------------
# Refusal: an enforce rule must not be able to kill the agent or init
# --------------------------------------------------------------------------------------------

AGENT = "/usr/bin/python3.11"
INIT = "/usr/lib/systemd/systemd"

REFUSAL_CASES: list[tuple[RuleSpec, str, str | None, str | None]] = [
    # (rule, self_exe, pid1_exe, a piece of the reason or None when accepted)
    (allowlist("/usr/*", mode="enforce"), AGENT, INIT, None),
    (allowlist("/usr/bin/python3*", "/usr/lib/systemd/*", mode="enforce"), AGENT, INIT, None),
    (allowlist("/opt/app/*", mode="enforce"), AGENT, INIT, "would kill the agent itself: its executable "
     "/usr/bin/python3.11 matches no allow pattern"),
    (allowlist("/usr/bin/*", mode="enforce"), AGENT, INIT, "would kill PID 1: its executable "
     "/usr/lib/systemd/systemd matches no allow pattern"),
    (allowlist("/usr/bin/*", mode="enforce"), AGENT, "/sbin/init", "would kill PID 1"),
    # PID 1 not inspectable: only the agent is checked (PID 1 is protected anyway).
    (allowlist("/usr/bin/*", mode="enforce"), AGENT, None, None),
    (allowlist("/usr/bin/*", mode="enforce"), "", INIT, "cannot tell the agent's own executable"),
    # A replaced binary still counts as its path.
    (allowlist("/usr/bin/python3.11", "/usr/lib/*", mode="enforce"), AGENT + " (deleted)", INIT, None),
    # Report mode never kills anything; threshold rules are not allow-lists.
    (allowlist("/opt/app/*"), AGENT, INIT, None),
    (threshold("x > 1"), AGENT, INIT, None),
]


@pytest.mark.parametrize(("spec", "self_exe", "pid1_exe", "reason"), REFUSAL_CASES)
def test_allowlist_refusal(spec: RuleSpec, self_exe: str, pid1_exe: str | None, reason: str | None) -> None:
    refusal = r.allowlist_refusal(spec, self_exe, pid1_exe)
    if reason is None:
        assert refusal is None
    else:
        assert refusal is not None and reason in refusal, refusal


# --------------------------------------------------------------------------------------------
# Threshold machine: the exact path
# --------------------------------------------------------------------------------------------

# One row per collection interval: (now_ms, cpu.percent or None for a missing sample,
# expected state, expected since_ms, expected event severities).
THRESHOLD_PATH: list[tuple[int, float | None, str, int | None, list[str]]] = [
    (0, 50.0, "ok", None, []),
    (5_000, 95.0, "pending", 5_000, []),  # true: start the 10 s hold
    (10_000, None, "pending", 5_000, []),  # unknown: keep the clock
    (15_000, 95.0, "firing", 15_000, ["warning"]),  # true, 10 s after the pending began
    (20_000, None, "firing", 15_000, []),  # a gap does not resolve
    (25_000, 99.0, "firing", 15_000, []),
    (30_000, 80.0, "ok", 30_000, ["info"]),  # resolved
    (35_000, 95.0, "pending", 35_000, []),
    (40_000, 80.0, "ok", 40_000, []),  # a false during the hold restarts it from scratch
    (45_000, 95.0, "pending", 45_000, []),
    (50_000, 95.0, "pending", 45_000, []),  # 5 s < 10 s
    (60_000, None, "pending", 45_000, []),  # hold time passed, but unknown never fires
    (65_000, None, "pending", 45_000, []),
    (70_000, 91.0, "firing", 70_000, ["warning"]),  # the next real true does
    (75_000, 90.0, "ok", 75_000, ["info"]),  # 90 > 90 is false
]


def test_threshold_path() -> None:
    spec = threshold("cpu.percent > 90 for 10s")
    condition = r.threshold_condition(spec)
    state = r.ThresholdState()
    for now_ms, cpu, want_state, want_since, want_severities in THRESHOLD_PATH:
        metrics = {} if cpu is None else {"cpu.percent": cpu}
        state, events = r.step_threshold(spec, condition, state, metrics, now_ms)
        assert (state.state, state.since_ms) == (want_state, want_since), now_ms
        assert [e.severity for e in events] == want_severities, now_ms
        assert all(e.ts == now_ms and e.source == "rule" for e in events)


def test_threshold_without_hold_fires_on_the_first_true() -> None:
    spec = threshold("cpu.percent > 90", severity="critical")
    condition = r.threshold_condition(spec)
    state, events = r.step_threshold(spec, condition, r.ThresholdState(), {"cpu.percent": 95.0}, 1_000)
    assert state == r.ThresholdState("firing", 1_000)
    assert [e.severity for e in events] == ["critical"]


def test_threshold_hold_from_the_spec() -> None:
    spec = threshold("cpu.percent > 90", for_s=10)
    # A condition parsed without the spec's for_s still gets it (the rule's for_s applies).
    condition = parse_condition(spec.expr)
    state = r.ThresholdState()
    observed = []
    for now_ms in (0, 5_000, 9_999, 10_000):
        state, events = r.step_threshold(spec, condition, state, {"cpu.percent": 95.0}, now_ms)
        observed.append((state.state, len(events)))
    assert observed == [("pending", 0), ("pending", 0), ("pending", 0), ("firing", 1)]


def test_threshold_events_name_the_rule_the_expression_and_the_values() -> None:
    spec = threshold("cpu.percent > 90 and temp.cpu > 70 or gone > 1", severity="error")
    condition = r.threshold_condition(spec)
    metrics = {"cpu.percent": 93.25, "temp.cpu": 71.0}
    state, fired = r.step_threshold(spec, condition, r.ThresholdState(), metrics, 1_700_000_000_000)
    assert fired == [
        Event(
            ts=1_700_000_000_000,
            severity="error",
            source="rule",
            message="rule 'cpu hot' is firing: cpu.percent > 90 and temp.cpu > 70 or gone > 1 "
            "(cpu.percent=93.25, gone=missing, temp.cpu=71)",
            attrs={
                "rule_id": "r1",
                "rule": "cpu hot",
                "state": "firing",
                "expr": "cpu.percent > 90 and temp.cpu > 70 or gone > 1",
                "for_s": 0.0,
                "value.cpu.percent": 93.25,
                "value.temp.cpu": 71.0,
            },
        )
    ]
    _, resolved = r.step_threshold(spec, condition, state, {"cpu.percent": 10.0, "gone": 0.0}, 1_700_000_005_000)
    assert len(resolved) == 1
    assert resolved[0].severity == "info"
    assert resolved[0].message.startswith("rule 'cpu hot' resolved: cpu.percent > 90")
    assert resolved[0].attrs["state"] == "resolved"
    assert resolved[0].attrs["value.gone"] == 0.0
    assert "value.temp.cpu" not in resolved[0].attrs


def test_threshold_table_is_complete() -> None:
    states = ("ok", "pending", "firing")
    observations = ("false", "unknown", "true", "true_held")
    assert set(r.THRESHOLD_TRANSITIONS) == {(s, o) for s in states for o in observations}
    # Only firing and resolving emit; "unknown" never changes the state.
    for (state, observation), (next_state, emit) in r.THRESHOLD_TRANSITIONS.items():
        if observation == "unknown":
            assert (next_state, emit) == (state, None)
        assert (emit == "fire") == (next_state == "firing" and state != "firing")
        assert (emit == "resolve") == (state == "firing" and next_state != "firing")


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(0, 20_000), st.sampled_from([None, 50.0, 95.0])), max_size=30),
    st.sampled_from([0.0, 5.0, 30.0]),
)
def test_threshold_fires_exactly_after_a_held_true_and_resolves_only_after_firing(
    steps: list[tuple[int, float | None]], for_s: float
) -> None:
    # The model: a run starts at a true (95) while ok and ends at a false (50); a missing
    # sample neither starts nor ends one. Fire exactly on a true for_s after the run started.
    spec = threshold("cpu.percent > 90", for_s=for_s)
    condition = r.threshold_condition(spec)
    state, now, run_start, firing = r.ThresholdState(), 0, None, False
    kinds: list[str] = []
    for delta, cpu in steps:
        now += delta
        if cpu == 95.0 and run_start is None and not firing:
            run_start = now
        state, events = r.step_threshold(spec, condition, state, {} if cpu is None else {"cpu.percent": cpu}, now)
        should_fire = cpu == 95.0 and not firing and run_start is not None and now - run_start >= for_s * 1000
        should_resolve = cpu == 50.0 and firing
        assert [e.attrs["state"] for e in events] == (["firing"] if should_fire else ["resolved"] if should_resolve
                                                      else [])
        kinds += [str(e.attrs["state"]) for e in events]
        if cpu == 50.0:
            run_start = None
        firing = (firing or should_fire) and not should_resolve
        assert state.state == ("firing" if firing else "pending" if run_start is not None else "ok")
        if state.state == "pending":
            assert state.since_ms == run_start
    assert kinds == ["firing", "resolved"] * (len(kinds) // 2) + ["firing"] * (len(kinds) % 2)


# --------------------------------------------------------------------------------------------
# Allow-list plans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    exe: str
    name: str = "p"
    username: str = "root"
    create_time: float = 1000.0


PROCESSES = [
    Proc(1, "/sbin/init", "init"),
    Proc(2, "", "kthreadd"),  # a kernel thread: no executable
    Proc(50, "/usr/bin/python3.11", "corral", "corral"),  # the agent
    Proc(40, "/usr/bin/bash", "bash"),  # the agent's parent
    Proc(300, "/usr/sbin/sshd", "sshd"),
    Proc(400, "/tmp/miner", "miner", "bob", 2000.0),
    Proc(401, "/home/bob/nc", "nc", "bob", 2001.0),
    Proc(402, "/usr/lib/app (deleted)", "app"),  # upgraded while running: still /usr/lib/app
    Proc(403, "", "zombie", "bob"),  # unreadable
]
PROTECTED = frozenset({1, 40, 50})


def test_report_mode_reports_each_offender_once() -> None:
    spec = allowlist("/usr/*")
    state, actions = r.plan_allowlist(spec, PROCESSES, PROTECTED, r.AllowlistState())
    assert actions == [
        r.Action("report", 400, "/tmp/miner", "miner", "bob", 2000.0),
        r.Action("report", 401, "/home/bob/nc", "nc", "bob", 2001.0),
    ]
    assert state.handled == frozenset({(400, 2000.0), (401, 2001.0)})
    # The next interval: the same processes are not reported again.
    state, actions = r.plan_allowlist(spec, PROCESSES, PROTECTED, state)
    assert actions == []
    # 401 exits; its pid is reused by a new offender, which is a new process.
    later = [p for p in PROCESSES if p.pid != 401] + [Proc(401, "/tmp/other", "other", "eve", 3000.0)]
    state, actions = r.plan_allowlist(spec, later, PROTECTED, state)
    assert actions == [r.Action("report", 401, "/tmp/other", "other", "eve", 3000.0)]
    assert state.handled == frozenset({(400, 2000.0), (401, 3000.0)})  # pruned: (401, 2001.0) is gone


def test_enforce_mode_kills_but_never_protected_pids_or_kernel_threads() -> None:
    spec = allowlist("/sbin/*", mode="enforce")  # matches neither the agent nor its parent
    state, actions = r.plan_allowlist(spec, PROCESSES, PROTECTED, r.AllowlistState())
    assert [(a.kind, a.pid) for a in actions] == [("kill", 300), ("kill", 400), ("kill", 401), ("kill", 402)]
    # After the kills the processes are gone: the state forgets them.
    survivors = [p for p in PROCESSES if p.pid not in (300, 400, 401, 402)]
    state, actions = r.plan_allowlist(spec, survivors, PROTECTED, state)
    assert actions == [] and state.handled == frozenset()


def test_pid_1_and_0_are_never_acted_on_even_unprotected() -> None:
    procs = [Proc(0, "/swapper"), Proc(1, "/sbin/init"), Proc(7, "/bad")]
    _, actions = r.plan_allowlist(allowlist("/ok", mode="enforce"), procs, frozenset(), r.AllowlistState())
    assert [a.pid for a in actions] == [7]


def test_a_failed_kill_is_not_retried_every_interval() -> None:
    spec = allowlist("/usr/*", mode="enforce")
    procs = [Proc(400, "/tmp/miner", create_time=5.0)]
    state, actions = r.plan_allowlist(spec, procs, PROTECTED, r.AllowlistState())
    assert len(actions) == 1
    state, actions = r.plan_allowlist(spec, procs, PROTECTED, state)  # the kill failed: it is still there
    assert actions == []


def test_a_changed_rule_starts_over() -> None:
    procs = [Proc(400, "/tmp/miner", create_time=5.0)]
    state, actions = r.plan_allowlist(allowlist("/usr/*"), procs, PROTECTED, r.AllowlistState())
    assert [a.kind for a in actions] == ["report"]
    # Switched to enforce: what was only reported is now killed.
    state, actions = r.plan_allowlist(allowlist("/usr/*", mode="enforce"), procs, PROTECTED, state)
    assert [a.kind for a in actions] == ["kill"]
    # Allowed by a new pattern: nothing to do.
    state, actions = r.plan_allowlist(allowlist("/usr/*", "/tmp/*", mode="enforce"), procs, PROTECTED, state)
    assert actions == [] and state.handled == frozenset()


@pytest.mark.parametrize(
    ("pattern", "exe", "allowed"),
    [
        ("/usr/*", "/usr/bin/deep/tool", True),  # * crosses /
        ("/usr/bin/?s", "/usr/bin/ls", True),
        ("/usr/bin/?s", "/usr/bin/lss", False),
        ("/usr/bin", "/usr/bin/ls", False),  # the whole path must match
        ("/usr/bin/ls", "/usr/bin/ls (deleted)", True),
        ("/USR/*", "/usr/bin/ls", False),  # case-sensitive
    ],
)
def test_allow_patterns(pattern: str, exe: str, allowed: bool) -> None:
    _, actions = r.plan_allowlist(allowlist(pattern), [Proc(9, exe)], frozenset(), r.AllowlistState())
    assert (actions == []) is allowed


def test_action_events() -> None:
    spec = allowlist("/usr/*", mode="enforce")
    kill = r.Action("kill", 400, "/tmp/miner", "miner", "bob", 2000.0)
    event = r.action_event(spec, kill, "killed", 1_700_000_000_000)
    assert event == Event(
        ts=1_700_000_000_000,
        severity="error",
        source="allowlist",
        message="process /tmp/miner (miner, pid 400, user bob) is not on allow list 'prod': killed",
        attrs={"rule_id": "a1", "rule": "prod", "action": "kill", "outcome": "killed", "pid": 400,
               "exe": "/tmp/miner", "name": "miner", "user": "bob"},
    )
    report = r.Action("report", 401, "/home/bob/nc", "nc", "", 1.0)
    event = r.action_event(allowlist("/usr/*"), report, "reported", 5)
    assert event.severity == "warning" and event.source == "allowlist"
    assert event.message == "process /home/bob/nc (nc, pid 401, user ?) is not on allow list 'prod'"
    assert event.attrs["action"] == "report" and event.attrs["user"] == ""
