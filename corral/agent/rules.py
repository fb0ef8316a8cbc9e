"""On-device rules, agent side: accept, persist and evaluate what the server pushes (DESIGN §6).

The server sends the complete rule set for this device (``rules`` message) on connect and when
it changes. :class:`AgentRules` checks each rule (:func:`corral.core.rules.validate_rule`, this
agent's ``[rules]`` config, and that an enforce allow-list would not kill the agent or PID 1),
keeps the accepted ones, writes the set to ``<state_dir>/rules.json`` (so it survives restarts
and keeps working offline) and answers ``rules_ack`` with the version and what it refused.

Rules arrive only over the authenticated server session -- never from the local metrics socket
or any other local input -- and expressions are parsed by :mod:`corral.core.expr` (no eval).

Every collection interval the pump calls :meth:`AgentRules.evaluate`: threshold rules step their
state machine over the fresh metrics; allow-list rules look at the process list and report or
kill what is not allowed (after re-checking that the pid still names the same process), and
every action becomes an event. Rule state is kept in memory: after a restart a condition must
hold for its duration again before it fires.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec

from corral import protocol as p
from corral.agent.config import RulesConfig
from corral.agent.identity import atomic_write
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

RULES_FILE = "rules.json"


def _key(spec: p.RuleSpec) -> bytes:
    return msgspec.json.encode(spec)


class AgentRules:
    def __init__(self, platform: Platform, config: RulesConfig, state_dir: Path | None = None, tag: str = "") -> None:
        self.platform = platform
        self.config = config
        self.path = state_dir / RULES_FILE if state_dir is not None else None
        self._tag = tag
        self.version: str | None = None
        self.thresholds: list[tuple[p.RuleSpec, expr.Condition, ThresholdState]] = []
        self.allowlists: list[tuple[p.RuleSpec, AllowlistState]] = []
        self.refused: dict[str, str] = {}
        #: actions taken (tests and the sim summary read it)
        self.actions = 0

    # --- accepting rules ----------------------------------------------------------------------

    def load(self) -> None:
        """The rule set from the last session, so rules apply from the first interval, offline too."""
        if self.path is None or not self.path.exists():
            return
        try:
            rules = msgspec.json.decode(self.path.read_bytes(), type=p.Rules)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("device %s: ignoring %s: %s", self._tag, self.path, e)
            return
        self._install(rules)

    async def apply(self, rules: p.Rules) -> p.RulesAck:
        if rules.version != self.version:
            try:
                self._install(rules)
            except Exception as e:  # a rule set must never take the connection down
                log.exception("device %s: cannot install rule set %s", self._tag, rules.version)
                return p.RulesAck(version=rules.version, refused={r.id: f"agent error: {e}" for r in rules.rules})
            if self.path is not None:
                try:
                    atomic_write(self.path, msgspec.json.encode(rules))
                except OSError as e:  # keep enforcing in memory; say so
                    log.warning("device %s: cannot save rules: %s", self._tag, e)
            log.info("device %s: rule set %s: %d active, %d refused", self._tag, rules.version,
                     len(self.thresholds) + len(self.allowlists), len(self.refused))
        return p.RulesAck(version=rules.version, refused=dict(self.refused))

    def _install(self, rules: p.Rules) -> None:
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
        self.version, self.thresholds, self.allowlists, self.refused = rules.version, thresholds, allowlists, refused

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

    # --- evaluating -----------------------------------------------------------------------------

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
