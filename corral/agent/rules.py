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

Most devices have no rules, so the engine (:mod:`corral.agent.rule_engine`, which brings the
expression language) is imported only when a non-empty rule set arrives or is stored (ADR 0007):
an empty set is acknowledged and persisted without it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from corral import protocol as p
from corral.agent.config import RulesConfig
from corral.agent.platform.base import Platform
from corral.fileio import atomic_write

if TYPE_CHECKING:
    from corral.agent.rule_engine import RuleEngine
    from corral.core.expr import Condition
    from corral.core.rules import AllowlistState, ThresholdState

log = logging.getLogger("corral.agent.rules")

RULES_FILE = "rules.json"


class AgentRules:
    def __init__(self, platform: Platform, config: RulesConfig, state_dir: Path | None = None, tag: str = "") -> None:
        self.platform = platform
        self.config = config
        self.path = state_dir / RULES_FILE if state_dir is not None else None
        self._tag = tag
        self.version: str | None = None
        #: the rules in force; ``None`` until a non-empty rule set arrives
        self._engine: RuleEngine | None = None

    def _get_engine(self) -> RuleEngine:
        if self._engine is None:
            # imported here, not at the top: the expression language costs every device ~1.5 MB
            # of RSS, and most never get a rule (ADR 0007)
            from corral.agent.rule_engine import RuleEngine

            self._engine = RuleEngine(self.platform, self.config, self._tag)
        return self._engine

    @property
    def thresholds(self) -> list[tuple[p.RuleSpec, Condition, ThresholdState]]:
        return self._engine.thresholds if self._engine is not None else []

    @property
    def allowlists(self) -> list[tuple[p.RuleSpec, AllowlistState]]:
        return self._engine.allowlists if self._engine is not None else []

    @property
    def refused(self) -> dict[str, str]:
        return self._engine.refused if self._engine is not None else {}

    @property
    def actions(self) -> int:
        """Actions taken (tests and the sim summary read it)."""
        return self._engine.actions if self._engine is not None else 0

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
        if rules.rules or self._engine is not None:
            self._get_engine().install(rules)
        self.version = rules.version

    def refusal(self, spec: p.RuleSpec) -> str | None:
        """Why this agent would refuse ``spec`` (``None``: it would apply it)."""
        return self._get_engine().refusal(spec)

    # --- evaluating -----------------------------------------------------------------------------

    def evaluate(self, metrics: dict[str, float], now_ms: int) -> list[p.Event]:
        return self._engine.evaluate(metrics, now_ms) if self._engine is not None else []
