"""On-device rules: create, list, show (with per-device status), enable/disable, delete.

Changing a rule publishes ``rules.changed``; every replica pushes the new rule sets down its
live sessions (``Hub._on_rules_changed``). Rules that kill processes (``allowlist`` in
``enforce`` mode) need an admin; everything else an operator. Every change is audited.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from corral import protocol as p
from corral.core.expr import parse_condition
from corral.core.rules import validate_rule
from corral.errors import Conflict, Forbidden, InvalidInput, NotFound
from corral.selectors import parse
from corral.server import rules_store
from corral.server.api.deps import Ctx, Operator, Paging, Viewer, encode_cursor, rid
from corral.server.api.views import iso
from corral.server.auth import Principal
from corral.server.rules_store import RULES_CHANGED
from corral.server.store.models import DeviceRule, DeviceRuleStatus

router = APIRouter(tags=["rules"])


class RuleIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["threshold", "allowlist"]
    selector: str = Field(default="", description="devices that get the rule; empty: all")
    expr: str = Field(default="", max_length=1000, description="threshold: e.g. 'cpu.percent > 90 for 5m'")
    severity: Literal["debug", "info", "warning", "error", "critical"] = "warning"
    mode: Literal["report", "enforce"] = "report"
    allow: list[str] = Field(default_factory=list, max_length=1000, description="allowlist: executable globs")
    scope: list[str] = Field(default_factory=list, max_length=1000,
                             description="allowlist: only executables matching these globs are watched (empty: all)")
    enabled: bool = True


class RulePatch(BaseModel):
    enabled: bool | None = None


class RuleOut(BaseModel):
    id: str
    name: str
    kind: str
    selector: str
    expr: str
    for_s: float
    severity: str
    mode: str
    allow: list[str]
    scope: list[str]
    enabled: bool
    created_at: str | None
    created_by: str
    devices_acked: int | None = Field(default=None, description="devices whose last ack includes this rule")
    refused_by: dict[str, str] | None = Field(default=None, description="device id -> reason (first 100)")


class RulePage(BaseModel):
    items: list[RuleOut]
    next_cursor: str | None = None


def rule_view(r: DeviceRule) -> RuleOut:
    return RuleOut(id=r.id, name=r.name, kind=r.kind, selector=r.selector, expr=r.expr, for_s=r.for_s,
                   severity=r.severity, mode=r.mode, allow=list(r.allow or []),
                   scope=list(r.scope or []), enabled=r.enabled,
                   created_at=iso(r.created_at), created_by=r.created_by)


def _split_for(expr: str) -> tuple[str, float]:
    """``... for 5m`` -> (expr, 300). The parser understands ``for`` too; the seconds are
    stored beside the text so the device need not re-derive them."""
    return expr.strip(), parse_condition(expr).for_s


async def _get(db: Any, ref: str) -> DeviceRule:
    r = await db.get(DeviceRule, ref)
    if r is None:
        r = await db.scalar(select(DeviceRule).where(DeviceRule.name == ref))
    if r is None:
        raise NotFound(f"no rule {ref!r}")
    return r  # type: ignore[no-any-return]


def _need_admin_for(who: Principal, mode: str, kind: str) -> None:
    if kind == "allowlist" and mode == "enforce" and who.role != "admin":
        raise Forbidden("rules that kill processes (allowlist in enforce mode) need an admin")


@router.post("/rules", response_model=RuleOut, status_code=201, summary="Create an on-device rule")
async def create_rule(body: RuleIn, ctx: Ctx, who: Operator, request: Request) -> RuleOut:
    _need_admin_for(who, body.mode, body.kind)
    if body.selector:
        if len(body.selector) > ctx.config.limits.max_selector_len:
            raise InvalidInput("selector is too long")
        parse(body.selector)
    for_s = 0.0
    expr = ""
    if body.kind == "threshold":
        if not body.expr.strip():
            raise InvalidInput("a threshold rule needs expr, e.g. 'cpu.percent > 90 for 5m'")
        expr, for_s = _split_for(body.expr)
    elif body.expr:
        raise InvalidInput("expr is for threshold rules; an allowlist rule takes allow")
    if body.scope and body.kind != "allowlist":
        raise InvalidInput("scope is for allowlist rules")
    rule_id = secrets.token_hex(6)
    spec = p.RuleSpec(id=rule_id, name=body.name, kind=body.kind, expr=expr,
                      severity=body.severity, mode=body.mode, allow=body.allow, scope=body.scope)
    reason = validate_rule(spec)
    if reason is not None:
        raise InvalidInput(reason)
    now = time.time()
    async with ctx.writer() as db:
        if await db.scalar(select(DeviceRule.id).where(DeviceRule.name == body.name)) is not None:
            raise Conflict(f"rule {body.name!r} already exists")
        r = DeviceRule(id=rule_id, name=body.name, kind=body.kind, selector=body.selector.strip(), expr=expr,
                       for_s=for_s, severity=body.severity, mode=body.mode, allow=body.allow, scope=body.scope,
                       enabled=body.enabled,
                       created_at=now, updated_at=now, created_by=who.name)
        db.add(r)
        await ctx.audit(db, who, "rule.create", body.name,
                        {"id": rule_id, "kind": body.kind, "mode": body.mode, "selector": body.selector,
                         "expr": expr, "allow": body.allow, "scope": body.scope}, rid(request))
    await ctx.bus.publish(RULES_CHANGED, rule_id.encode())
    return rule_view(r)


@router.get("/rules", response_model=RulePage, summary="List on-device rules")
async def list_rules(ctx: Ctx, _: Viewer, paging: Paging) -> RulePage:
    stmt = select(DeviceRule).order_by(DeviceRule.name)
    if paging.cursor:
        stmt = stmt.where(DeviceRule.name > str(paging.cursor[0]))
    async with ctx.reader() as db:
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    return RulePage(items=[rule_view(r) for r in rows], next_cursor=encode_cursor([rows[-1].name]) if more else None)


@router.get("/rules/{ref}", response_model=RuleOut, summary="Show a rule and where it runs")
async def show_rule(ref: str, ctx: Ctx, _: Viewer,
                    refused_limit: Annotated[int, Query(ge=0, le=1000)] = 100) -> RuleOut:
    async with ctx.reader() as db:
        r = await _get(db, ref)
        out = rule_view(r)
        # which rule-set versions contain this rule: compute from the current rule set
        ruleset = await rules_store.load(db)
        statuses = (await db.execute(select(DeviceRuleStatus.device_id, DeviceRuleStatus.version,
                                            DeviceRuleStatus.refused))).all()
        views = await rules_store.device_views(db, [d for d, _, _ in statuses]) if ruleset.needs_view else {}
    versions_with_rule: dict[str, bool] = {}
    acked = 0
    refused: dict[str, str] = {}
    for dev, version, ref_map in statuses:
        if ref_map and r.id in ref_map and len(refused) < refused_limit:
            refused[dev] = str(ref_map[r.id])
        rules = ruleset.for_device(views.get(dev))
        if version == rules.version:
            has = versions_with_rule.setdefault(version, any(x.id == r.id for x in rules.rules))
            if has and not (ref_map and r.id in ref_map):
                acked += 1
    out.devices_acked = acked
    out.refused_by = refused
    return out


@router.patch("/rules/{ref}", response_model=RuleOut, summary="Enable or disable a rule")
async def patch_rule(ref: str, body: RulePatch, ctx: Ctx, who: Operator, request: Request) -> RuleOut:
    async with ctx.writer() as db:
        r = await _get(db, ref)
        _need_admin_for(who, r.mode, r.kind)
        if body.enabled is not None and body.enabled != r.enabled:
            r.enabled = body.enabled
            r.updated_at = time.time()
            await ctx.audit(db, who, "rule.enable" if body.enabled else "rule.disable", r.name, {"id": r.id},
                            rid(request))
        out = rule_view(r)
    await ctx.bus.publish(RULES_CHANGED, out.id.encode())
    return out


@router.delete("/rules/{ref}", status_code=204, summary="Delete a rule (devices drop it)")
async def delete_rule(ref: str, ctx: Ctx, who: Operator, request: Request) -> Response:
    async with ctx.writer() as db:
        r = await _get(db, ref)
        _need_admin_for(who, r.mode, r.kind)
        await db.delete(r)
        await ctx.audit(db, who, "rule.delete", r.name, {"id": r.id}, rid(request))
    await ctx.bus.publish(RULES_CHANGED, r.id.encode())
    return Response(status_code=204)

