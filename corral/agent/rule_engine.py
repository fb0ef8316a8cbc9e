"""The rules engine behind :class:`corral.agent.rules.AgentRules`: check, install, evaluate.

Kept out of :mod:`corral.agent.rules` because it imports the expression language
(:mod:`corral.core.expr`) and :mod:`corral.core.rules`, about 1.5 MB of resident memory that
most devices -- with no rules -- never need (ADR 0007). ``AgentRules`` imports this module the
first time it has a non-empty rule set to install.
"""

from __future__ import annotations

import logging

import msgspec

from corral import protocol as p
from corral.agent.config import RulesConfig
from corral.agent.platform.base import Platform
from corral.core import expr
from corral.core.rules import (
    AllowlistState,
    ThresholdState,
    action_event,
    allowlist_refusal,
    plan_allowlist,
    step_threshold,
    threshold_condition,
    validate_rule,
)
from corral.errors import CorralError

log = logging.getLogger("corral.agent.rules")


def _key(spec: p.RuleSpec) -> bytes:
    return msgspec.json.encode(spec)


class RuleEngine:
    """The rules of one rule set in force, with their state; see :mod:`corral.agent.rules`."""

    def __init__(self, platform: Platform, config: RulesConfig, tag: str = "") -> None:
        self.platform = platform
        self.config = config
        self._tag = tag
        self.thresholds: list[tuple[p.RuleSpec, expr.Condition, ThresholdState]] = []
        self.allowlists: list[tuple[p.RuleSpec, AllowlistState]] = []
        self.refused: dict[str, str] = {}
        #: actions taken (tests and the sim summary read it)
        self.actions = 0

    def install(self, rules: p.Rules) -> None:
        # a rule that did not change keeps its state (a pending hold time, what was reported)
        old_t = {_key(spec): state for spec, _, state in self.thresholds}
        old_a = {_key(spec): state for spec, state in self.allowlists}
        thresholds, allowlists, refused = [], [], {}
        for spec in rules.rules[:1000]:
            reason = self.refusal(spec)
            if reason is not None:
                refused[spec.id] = reason
                log.warning("device %s: refusing rule %r: %s", self._tag, spec.name, reason)
                continue
            if spec.kind == "threshold":
                thresholds.append((spec, threshold_condition(spec), old_t.get(_key(spec), ThresholdState())))
            else:
                allowlists.append((spec, old_a.get(_key(spec), AllowlistState())))
        self.thresholds, self.allowlists, self.refused = thresholds, allowlists, refused

    def refusal(self, spec: p.RuleSpec) -> str | None:
        if not self.config.enabled:
            return "rules are disabled in this agent's config"
        reason = validate_rule(spec)
        if reason is not None:
            return reason
        if spec.kind == "threshold":
            try:
                threshold_condition(spec)
            except CorralError as e:
                return e.detail
            return None
        if spec.mode == "enforce":
            if not self.config.enforce:
                return "enforce mode is disabled in this agent's config ([rules] enforce = false)"
            self_exe, pid1_exe, _ = self.platform.protected()
            return allowlist_refusal(spec, self_exe, pid1_exe)
        return None

    def evaluate(self, metrics: dict[str, float], now_ms: int) -> list[p.Event]:
        events: list[p.Event] = []
        for i, (spec, cond, state) in enumerate(self.thresholds):
            new, evs = step_threshold(spec, cond, state, metrics, now_ms)
            self.thresholds[i] = (spec, cond, new)
            for e in evs:
                log.info("device %s: %s", self._tag, e.message)
            events += evs
        if self.allowlists:
            events += self._enforce_allowlists(now_ms)
        return events

    def _enforce_allowlists(self, now_ms: int) -> list[p.Event]:
        try:
            processes = self.platform.processes()
            _, _, protected = self.platform.protected()
        except Exception as e:
            log.warning("device %s: cannot list processes: %s", self._tag, e)
            return []
        events = []
        for i, (spec, state) in enumerate(self.allowlists):
            new, actions = plan_allowlist(spec, processes, protected, state)
            self.allowlists[i] = (spec, new)
            for action in actions:
                outcome = "reported"
                if action.kind == "kill":
                    try:
                        outcome = "killed" if self.platform.kill(action.pid, action.create_time) else "gone"
                    except Exception as e:
                        outcome = f"kill failed: {e}"
                self.actions += 1
                log.warning("device %s: allow list %r: %s %s (pid %d): %s", self._tag, spec.name, action.kind,
                            action.exe, action.pid, outcome)
                events.append(action_event(spec, action, outcome, now_ms))
        return events
