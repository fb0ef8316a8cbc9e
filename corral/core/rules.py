"""On-device rules: validation, the threshold state machine and the process allow-list planner.

The server pushes a complete rule set (``protocol.Rules``); the agent checks every rule with
:func:`validate_rule` and, for allow-list rules, :func:`allowlist_refusal` (with the real
executable paths of itself and PID 1), reports what it refused in ``rules_ack`` and never
applies a refused rule. Then, every collection interval, for each rule:

* ``threshold``: :func:`step_threshold` evaluates the condition over the metrics just
  collected and moves the rule's :class:`ThresholdState`; the events it returns go into the
  next telemetry batch (rules work offline: the spool carries the events until reconnect).
* ``allowlist``: :func:`plan_allowlist` looks at the process list and returns the
  :class:`Action` s to take; the agent performs them (a kill is the agent's I/O, not ours) and
  reports each with :func:`action_event`.

Everything here is pure: the caller passes the time, the metrics, the processes and the state,
and keeps the state returned (one state per rule; a fresh one when the rule set changes).

Threshold rules
    ``expr`` is a condition in the expression language (``corral.core.expr``) with no
    functions: the agent has the latest value of each metric, not a history. The hold time is
    either ``for 5m`` in the expression or ``for_s`` in the spec (not both). The machine::

        state    observation   next     emits     why
        -------  ------------  -------  --------  --------------------------------------------
        ok       false         ok       -
        ok       unknown       ok       -         no evidence either way
        ok       true          pending  -         start the hold clock
        ok       true_held     firing   severity  for_s == 0: fires on the first true
        pending  false         ok       -         one false restarts the hold from scratch
        pending  unknown       pending  -         keeps the clock running, but cannot fire
        pending  true          pending  -
        pending  true_held     firing   severity  true now, and true since >= for_s ago
        firing   false         ok       info      resolved
        firing   unknown       firing   -         only a false resolves (no flapping on a gap)
        firing   true          firing   -
        firing   true_held     firing   -

    The evaluation gives true, false or unknown (a metric missing this interval, a division by
    zero ...); a true is ``true_held`` when the hold time has passed since the pending state
    began (always, with ``for_s == 0``). So an unknown keeps the current state, and a pending
    rule whose hold time has passed still waits for a real true: a collector that misses
    a sample does not restart a long hold, and nothing fires on missing data.
    ``now_ms`` is epoch milliseconds (events carry it); if the clock steps back while pending,
    the hold simply takes that much longer.

Allow-list rules
    A process is allowed when its executable path matches one of the ``allow`` globs
    (``corral.selectors.glob_match``: ``*`` is any run of characters, ``/`` included, ``?``
    one character; the whole path must match). Processes with no executable path (kernel
    threads, processes we may not inspect) and protected pids (the agent, its parent chain and
    PID 1, passed in by the agent; PID 0 and 1 are never acted on regardless) are skipped.
    Each offending process, identified by ``(pid, create_time)`` so a reused pid is a new
    process, gets exactly one action: ``report`` in report mode, ``kill`` in enforce mode. A
    kill that fails is reported by the agent with its outcome and not retried every interval
    (it would fail the same way and flood the event stream).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol, TypeAlias

from corral import protocol
from corral.core import expr
from corral.core.glob import glob_match
from corral.errors import ExpressionError, InvalidInput

__all__ = [
    "MAX_ALLOW_PATTERNS",
    "MAX_FOR_S",
    "MAX_PATTERN_LENGTH",
    "MAX_RULE_ID_LENGTH",
    "MAX_RULE_NAME_LENGTH",
    "THRESHOLD_TRANSITIONS",
    "Action",
    "AllowlistState",
    "ProcessInfoLike",
    "ThresholdEmit",
    "ThresholdObservation",
    "ThresholdState",
    "ThresholdStatus",
    "action_event",
    "allowlist_refusal",
    "plan_allowlist",
    "step_threshold",
    "threshold_condition",
    "validate_rule",
]

#: The longest hold time a threshold rule may ask for (7 days).
MAX_FOR_S: Final = 7 * 86400.0
MAX_ALLOW_PATTERNS: Final = 256
#: Linux PATH_MAX: no executable path is longer, so no useful pattern is either.
MAX_PATTERN_LENGTH: Final = 4096
MAX_RULE_ID_LENGTH: Final = 128
MAX_RULE_NAME_LENGTH: Final = 200

_MODES: Final = ("report", "enforce")
# Linux appends this to /proc/PID/exe when the file was replaced or removed (a package upgrade
# while the program runs). The program is still the one that was allowed: match the path.
_DELETED_SUFFIX: Final = " (deleted)"


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_rule(spec: protocol.RuleSpec) -> str | None:
    """Why ``spec`` cannot be applied (one line, for ``rules_ack.refused`` or an API 400), or None."""
    if not spec.id or len(spec.id) > MAX_RULE_ID_LENGTH:
        return f"rule id must be 1 to {MAX_RULE_ID_LENGTH} characters"
    if not spec.name or len(spec.name) > MAX_RULE_NAME_LENGTH:
        return f"rule name must be 1 to {MAX_RULE_NAME_LENGTH} characters"
    if spec.severity not in protocol.SEVERITIES:
        return f"unknown severity {spec.severity!r} (one of {', '.join(protocol.SEVERITIES)})"
    if spec.mode not in _MODES:
        return f"unknown mode {spec.mode!r} (report or enforce)"
    if not (math.isfinite(spec.for_s) and 0.0 <= spec.for_s <= MAX_FOR_S):
        return f"for_s must be between 0 and {MAX_FOR_S:g} seconds (7 days), not {spec.for_s!r}"
    if spec.kind == "threshold":
        if spec.allow:
            return "allow is only used by allowlist rules"
        try:
            threshold_condition(spec)
        except ExpressionError as err:
            return f"invalid expr: {err.detail}"
        except InvalidInput as err:
            return err.detail
        return None
    if spec.kind == "allowlist":
        return _allowlist_problem(spec)
    return f"unknown rule kind {spec.kind!r} (threshold or allowlist)"


def _allowlist_problem(spec: protocol.RuleSpec) -> str | None:
    if spec.expr or spec.for_s:
        return "expr and for_s are only used by threshold rules"
    if not spec.allow:
        return "an allowlist rule needs at least one allow pattern"
    if len(spec.allow) > MAX_ALLOW_PATTERNS or len(spec.scope) > MAX_ALLOW_PATTERNS:
        return f"at most {MAX_ALLOW_PATTERNS} allow patterns (and as many scope patterns)"
    patterns = [(f"allow[{i}]", x) for i, x in enumerate(spec.allow)]
    patterns += [(f"scope[{i}]", x) for i, x in enumerate(spec.scope)]
    for where, pattern in patterns:
        if not pattern.startswith("/"):
            return f"{where} must be an absolute path glob (starting with /), not {pattern!r}"
        if len(pattern) > MAX_PATTERN_LENGTH:
            return f"{where} is longer than {MAX_PATTERN_LENGTH} characters"
        if any(ch < " " or ch == "\x7f" for ch in pattern):
            return f"{where} contains a control character"
    return None


def threshold_condition(spec: protocol.RuleSpec) -> expr.Condition:
    """Parse a threshold rule's ``expr`` (no functions); ``for_s`` is the effective hold time.

    Raises ``ExpressionError`` for a bad expression and ``InvalidInput`` when the hold time is
    given twice or is out of bounds. :func:`validate_rule` reports the same as a reason.
    """
    condition = expr.parse_condition(spec.expr)
    if condition.for_s and spec.for_s:
        raise InvalidInput("give the hold time once: 'for' in expr or for_s, not both")
    if condition.for_s > MAX_FOR_S:
        raise InvalidInput(f"the hold time must be at most {MAX_FOR_S:g} seconds (7 days)")
    if not condition.for_s and spec.for_s:
        condition = expr.Condition(condition.node, spec.for_s, condition.text)
    return condition


def allowlist_refusal(spec: protocol.RuleSpec, self_exe: str, pid1_exe: str | None) -> str | None:
    """Why the agent must refuse ``spec`` on this device, or None.

    An ``enforce`` allow-list that does not allow the agent's own executable (``self_exe``,
    ``/proc/self/exe``: for a Python agent, the interpreter) or PID 1's would, in spirit,
    kill the agent or init; protected pids stop that in practice, but a rule that contradicts
    the device is a mistake to report, not to half-apply. ``pid1_exe`` is None when PID 1
    cannot be inspected (no privileges, some containers): then only the agent is checked.
    With a ``scope``, only an executable the rule watches is checked. Report-mode rules and
    threshold rules are never refused here.
    """
    if spec.kind != "allowlist" or spec.mode != "enforce":
        return None
    if not self_exe:
        return "cannot tell the agent's own executable, so enforce mode could kill the agent"
    if _in_scope(spec, self_exe) and not _allowed(spec.allow, self_exe):
        return f"enforce would kill the agent itself: its executable {self_exe} matches no allow pattern"
    if pid1_exe and _in_scope(spec, pid1_exe) and not _allowed(spec.allow, pid1_exe):
        return f"enforce would kill PID 1: its executable {pid1_exe} matches no allow pattern"
    return None


def _in_scope(spec: protocol.RuleSpec, exe: str) -> bool:
    """An allow-list watches the processes whose executable matches ``scope`` (all when empty)."""
    return not spec.scope or _allowed(spec.scope, exe)


def _allowed(patterns: Sequence[str], exe: str) -> bool:
    if exe.endswith(_DELETED_SUFFIX):
        exe = exe[: -len(_DELETED_SUFFIX)]
    return any(glob_match(pattern, exe) for pattern in patterns)


# --------------------------------------------------------------------------------------------
# Threshold rules: one transition table
# --------------------------------------------------------------------------------------------

ThresholdStatus: TypeAlias = Literal["ok", "pending", "firing"]
ThresholdObservation: TypeAlias = Literal["false", "unknown", "true", "true_held"]
ThresholdEmit: TypeAlias = Literal["fire", "resolve"] | None

#: (state, observation) -> (next state, what to emit). See the module docstring for the why.
THRESHOLD_TRANSITIONS: Final[Mapping[tuple[ThresholdStatus, ThresholdObservation],
                                     tuple[ThresholdStatus, ThresholdEmit]]] = {
    # state       observation      next       emit
    ("ok",        "false"):       ("ok",      None),
    ("ok",        "unknown"):     ("ok",      None),
    ("ok",        "true"):        ("pending", None),
    ("ok",        "true_held"):   ("firing",  "fire"),
    ("pending",   "false"):       ("ok",      None),
    ("pending",   "unknown"):     ("pending", None),
    ("pending",   "true"):        ("pending", None),
    ("pending",   "true_held"):   ("firing",  "fire"),
    ("firing",    "false"):       ("ok",      "resolve"),
    ("firing",    "unknown"):     ("firing",  None),
    ("firing",    "true"):        ("firing",  None),
    ("firing",    "true_held"):   ("firing",  None),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ThresholdState:
    """Where one threshold rule is. ``since_ms``: when it entered ``state`` (None: never left ok)."""

    state: ThresholdStatus = "ok"
    since_ms: int | None = None


def step_threshold(
    rule: protocol.RuleSpec,
    condition: expr.Condition,
    state: ThresholdState,
    metrics: Mapping[str, float],
    now_ms: int,
) -> tuple[ThresholdState, list[protocol.Event]]:
    """Evaluate ``condition`` over ``metrics`` at ``now_ms`` and take one transition.

    ``condition`` comes from :func:`threshold_condition` (its ``for_s`` wins; ``rule.for_s``
    is used when it has none). Returns the next state and the events to send: one of the
    rule's severity when it starts firing, one ``info`` when it resolves.
    """
    result = expr.evaluate(condition.node, expr.metrics_lookup(metrics))
    hold_s = condition.for_s or rule.for_s
    observation: ThresholdObservation
    if result is None or not isinstance(result, bool):
        observation = "unknown"
    elif not result:
        observation = "false"
    else:
        started = state.since_ms if state.state == "pending" and state.since_ms is not None else now_ms
        observation = "true_held" if now_ms - started >= hold_s * 1000.0 else "true"
    next_state, emit = THRESHOLD_TRANSITIONS[(state.state, observation)]
    since = state.since_ms if next_state == state.state else now_ms
    events = [] if emit is None else [_threshold_event(rule, condition, metrics, now_ms, emit, hold_s)]
    return ThresholdState(next_state, since), events


def _threshold_event(
    rule: protocol.RuleSpec,
    condition: expr.Condition,
    metrics: Mapping[str, float],
    now_ms: int,
    emit: Literal["fire", "resolve"],
    hold_s: float,
) -> protocol.Event:
    names = sorted(expr.metrics_used(condition.node))
    shown = ", ".join(f"{name}={_show(metrics.get(name))}" for name in names)
    verb = "is firing" if emit == "fire" else "resolved"
    attrs: dict[str, str | int | float | bool] = {
        "rule_id": rule.id,
        "rule": rule.name,
        "state": "firing" if emit == "fire" else "resolved",
        "expr": condition.text,
        "for_s": hold_s,
    }
    for name in names:
        value = metrics.get(name)
        if value is not None and math.isfinite(value):
            attrs[f"value.{name}"] = float(value)
    message = f"rule {rule.name!r} {verb}: {condition.text}" + (f" ({shown})" if shown else "")
    severity = rule.severity if emit == "fire" else "info"
    return protocol.Event(ts=now_ms, severity=severity, source="rule", message=message, attrs=attrs)


def _show(value: float | None) -> str:
    if value is None:
        return "missing"
    return f"{value:.6g}"


# --------------------------------------------------------------------------------------------
# Allow-list rules
# --------------------------------------------------------------------------------------------


class ProcessInfoLike(Protocol):
    """What the planner needs to know about a process (``agent.platform.base.ProcessInfo``)."""

    @property
    def pid(self) -> int: ...
    @property
    def exe(self) -> str: ...  # "" when unknown: kernel threads, processes we may not inspect
    @property
    def name(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def create_time(self) -> float: ...  # with pid, identifies a process across pid reuse


#: A process as the planner remembers it: pid reuse gives a new create_time, so a new key.
_ProcessKey: TypeAlias = tuple[int, float]


@dataclass(frozen=True, slots=True)
class AllowlistState:
    """What one allow-list rule has already acted on.

    ``handled``: the ``(pid, create_time)`` of processes that got their action; ``rule``: the
    id, mode and patterns it was for (a changed rule starts over, so switching report →
    enforce kills what was only reported before).
    """

    handled: frozenset[_ProcessKey] = frozenset()
    rule: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Action:
    """Report or kill one process. ``create_time`` lets the agent check, right before a kill,
    that ``pid`` still names the same process."""

    kind: Literal["report", "kill"]
    pid: int
    exe: str
    name: str
    username: str
    create_time: float = 0.0


def plan_allowlist(
    spec: protocol.RuleSpec,
    processes: Sequence[ProcessInfoLike],
    protected_pids: frozenset[int],
    state: AllowlistState,
) -> tuple[AllowlistState, list[Action]]:
    """The actions for this interval (by pid) and the next state, pruned to live processes."""
    rule_key = (spec.id, spec.mode, *spec.allow, "|", *spec.scope)
    handled = state.handled if state.rule == rule_key else frozenset()
    kind: Literal["report", "kill"] = "kill" if spec.mode == "enforce" else "report"
    alive: set[_ProcessKey] = set()
    actions: list[Action] = []
    for proc in processes:
        key = (proc.pid, proc.create_time)
        alive.add(key)
        if not proc.exe or proc.pid <= 1 or proc.pid in protected_pids or key in handled:
            continue
        if _allowed(spec.allow, proc.exe) or not _in_scope(spec, proc.exe):
            continue
        actions.append(Action(kind, proc.pid, proc.exe, proc.name, proc.username, proc.create_time))
    actions.sort(key=lambda action: action.pid)
    done = (handled & alive) | {(a.pid, a.create_time) for a in actions}
    return AllowlistState(frozenset(done), rule_key), actions


def action_event(spec: protocol.RuleSpec, action: Action, outcome: str, now_ms: int) -> protocol.Event:
    """The event the agent sends after acting: ``outcome`` says what happened, e.g.
    ``reported``, ``killed`` or ``kill failed: permission denied``."""
    who = f"{action.exe} ({action.name}, pid {action.pid}, user {action.username or '?'})"
    if action.kind == "kill":
        message = f"process {who} is not on allow list {spec.name!r}: {outcome}"
    else:
        message = f"process {who} is not on allow list {spec.name!r}"
    return protocol.Event(
        ts=now_ms,
        severity="error" if action.kind == "kill" else "warning",
        source="allowlist",
        message=message,
        attrs={
            "rule_id": spec.id,
            "rule": spec.name,
            "action": action.kind,
            "outcome": outcome,
            "pid": action.pid,
            "exe": action.exe,
            "name": action.name,
            "user": action.username,
        },
    )
