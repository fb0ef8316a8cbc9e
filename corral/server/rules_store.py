"""On-device rules, server side: which rules a device gets, and what it said about them.

A rule (``DeviceRule``) names the devices it goes to with a selector. A device receives its
complete rule set -- every enabled rule whose selector matches it -- as one ``rules`` message
with a version (a hash of the set), on connect and whenever the rules change; the device stores
it, evaluates it offline, and answers ``rules_ack`` with the version and the rules it refused
(e.g. an allow-list in enforce mode that would kill the agent itself or PID 1). The server keeps
the last ack per device (``DeviceRuleStatus``), so ``corral rule show`` tells how many devices
run a rule and which refused it.

Selectors are evaluated in Python against a ``DeviceView`` (tags, static groups, inventory):
rules are few and the view is needed anyway; when no rule has a selector, no query is made.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral import protocol as p
from corral.selectors import DeviceView, Node, evaluate, parse
from corral.server import registry
from corral.server.store.models import Device, DeviceRule, DeviceRuleStatus

#: bus subject telling every replica that the rule table changed
RULES_CHANGED = "rules.changed"


def rule_spec(r: DeviceRule) -> p.RuleSpec:
    # the hold time travels inside expr ("... for 5m"); the for_s column is for display
    return p.RuleSpec(id=r.id, name=r.name, kind=r.kind, expr=r.expr,  # type: ignore[arg-type]
                      severity=r.severity, mode=r.mode, allow=list(r.allow or []),  # type: ignore[arg-type]
                      scope=list(r.scope or []))


class RuleSet:
    """The enabled rules with their parsed selectors; rebuilt when the rule table changes."""

    def __init__(self, rules: Sequence[DeviceRule]) -> None:
        self.entries: list[tuple[p.RuleSpec, Node | None]] = [
            (rule_spec(r), parse(r.selector) if r.selector else None) for r in rules]
        self.needs_view = any(sel is not None for _, sel in self.entries)

    def for_device(self, view: DeviceView | None) -> p.Rules:
        chosen = [spec for spec, sel in self.entries
                  if sel is None or (view is not None and evaluate(sel, view))]
        chosen.sort(key=lambda r: r.id)
        digest = hashlib.sha256(msgspec.json.encode(chosen)).hexdigest()[:16]
        return p.Rules(version=digest, rules=chosen)


async def load(db: AsyncSession) -> RuleSet:
    rows = (await db.scalars(select(DeviceRule).where(DeviceRule.enabled.is_(True)))).all()
    return RuleSet(rows)


async def device_views(db: AsyncSession, device_ids: list[str]) -> dict[str, DeviceView]:
    devs = (await db.scalars(select(Device).where(Device.id.in_(device_ids)))).all()
    tags = await registry.device_tags(db, device_ids)
    groups = await registry.device_groups(db, device_ids)
    return {d.id: DeviceView(id=d.id, status=d.status, online=bool(d.online), tags=tags.get(d.id, {}),
                             attrs=d.inventory or {}, groups=frozenset(groups.get(d.id, [])))
            for d in devs}


async def record_ack(db: AsyncSession, device_id: str, version: str, refused: dict[str, str]) -> None:
    row = await db.get(DeviceRuleStatus, device_id)
    now = time.time()
    if row is None:
        db.add(DeviceRuleStatus(device_id=device_id, version=version, refused=refused, acked_at=now))
    elif (row.version, row.refused) != (version, refused):  # every reconnect acks: write changes only
        row.version, row.refused, row.acked_at = version, refused, now
