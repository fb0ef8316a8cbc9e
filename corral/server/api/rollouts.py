"""Rollouts (ADR 0015): an artifact to the devices a selector matches, in waves, behind gates.

``POST /api/v1/rollouts`` (operator, audited) checks everything and creates the rollout; the
engine takes it from there. ``GET /api/v1/rollouts`` and ``GET /api/v1/rollouts/{id}`` (viewer)
show it with each wave's progress, ``GET /api/v1/rollouts/{id}/devices`` each device;
``POST /api/v1/rollouts/{id}/pause|resume|abort`` (operator, audited) act on it.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from fastapi import APIRouter, BackgroundTasks, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from corral.server.api.deps import Ctx, Operator, Paging, Viewer, encode_cursor, rid
from corral.server.api.tuf import device_urls
from corral.server.api.views import iso
from corral.server.context import ServerContext
from corral.server.store.models import Artifact, Deployment, Rollout
from corral.server.updates import deployments, rollouts

router = APIRouter(tags=["rollouts"])


class InstallGateIn(BaseModel):
    max_failure_rate: float = Field(default=0.2, ge=0, lt=1, description="stop above this share failed")
    min_sample: int = Field(default=5, ge=1, description="finished devices in the wave before the gate judges")
    action: Literal["pause", "abort"] = "pause"


class HealthGateIn(BaseModel):
    metric: str = Field(min_length=1, max_length=200, description="e.g. app.crashes or cpu.percent")
    window: float = Field(default=300.0, gt=0, le=7 * 86400, description="seconds of metrics compared")
    tolerance: float = Field(default=0.2, ge=0, description="relative: 0.2 = 20 % worse than the baseline")
    absolute: float = Field(default=0.0, ge=0, description="added to the tolerance, in the metric's unit")
    higher_is_worse: bool = True
    min_devices: int = Field(default=3, ge=1, description="devices needed on each side to compare")
    auto_revert: bool = Field(default=False, description="roll the updated devices back on a regression")


class PacingIn(BaseModel):
    max_per_minute: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    per_tag: str | None = Field(default=None, max_length=64, description="a tag key (per site...)")
    per_tag_max: int | None = Field(default=None, ge=1)
    start_delay: float = Field(default=0.0, ge=0, le=86400, description="random delay up to this")
    windows: list[str] = Field(default_factory=list, max_length=20,
                               description="maintenance windows in the device's time zone, e.g. 'Mon-Fri 02:00-05:00'")
    retries: int = Field(default=0, ge=0, le=10)
    retry_backoff: float = Field(default=60.0, gt=0, le=86400)
    device_timeout: float = Field(default=3600.0, gt=0, le=7 * 86400)
    wave_wait: float = Field(default=0.0, ge=0, le=7 * 86400, description="a done wave waits this")


class RolloutIn(BaseModel):
    artifact: str = Field(description="NAME@VERSION", min_length=3, max_length=140)
    selector: str = Field(min_length=1, max_length=4000, description="the devices (DESIGN §7)")
    waves: str = Field(default="1%,10%,50%,100%", max_length=400, description="cumulative: 1%,10%,50%,100% or 5,50,all")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="the random order's seed (default: drawn)")
    canary: str | None = Field(default=None, max_length=4000, description="a selector whose devices go first")
    include_new: bool = Field(default=False, description="devices that match later join the last wave")
    install_gate: InstallGateIn | None = Field(default_factory=lambda: InstallGateIn(),
                                               description="null: no install gate")
    health_gate: HealthGateIn | None = None
    pacing: PacingIn = Field(default_factory=lambda: PacingIn())
    health_timeout: float | None = Field(default=None, gt=0, le=86400, description="seconds; overrides the artifact's")


class WaveOut(BaseModel):
    wave: int
    size: int
    states: dict[str, int] = Field(description="devices per state: pending, active, succeeded, failed, ...")


class RolloutOut(BaseModel):
    id: str
    artifact: str
    selector: str
    status: str = Field(description="running, paused, completed or aborted")
    reason: str
    current_wave: int = Field(description="1-based")
    waves: list[WaveOut]
    devices: int
    deployment_id: str
    spec: dict[str, Any]
    created_at: str | None
    created_by: str
    updated_at: str | None


class RolloutPage(BaseModel):
    items: list[RolloutOut]
    next_cursor: str | None = None


class RolloutDeviceOut(BaseModel):
    device_id: str
    wave: int
    state: str
    attempt: int
    status: str | None = Field(description="the device's deployment status for its current attempt")
    step: str | None
    reason: str
    previous_version: str
    running_version: str | None


class RolloutDevicePage(BaseModel):
    items: list[RolloutDeviceOut]
    next_cursor: str | None = None


class Created(BaseModel):
    id: str


class AbortIn(BaseModel):
    revert: bool = Field(default=False, description="roll the updated devices back to their previous version")


async def _view(ctx: ServerContext, r: Rollout) -> RolloutOut:
    async with ctx.reader() as db:
        dep = await db.get(Deployment, r.deployment_id)
        a = await db.get(Artifact, dep.artifact_id) if dep is not None else None
        waves = await rollouts.wave_progress(db, r)
    return RolloutOut(id=r.id, artifact=f"{a.name}@{a.version}" if a else "", selector=r.selector, status=r.status,
                      reason=r.reason, current_wave=r.current_wave + 1, waves=[WaveOut(**w) for w in waves],
                      devices=sum(sum(w["states"].values()) for w in waves), deployment_id=r.deployment_id,
                      spec=r.spec, created_at=iso(r.created_at), created_by=r.created_by,
                      updated_at=iso(r.updated_at))


@router.post("/rollouts", response_model=Created, status_code=201,
             summary="Roll an artifact out to the devices a selector matches, in waves behind gates")
async def create_rollout(body: RolloutIn, ctx: Ctx, who: Operator, request: Request,
                         background: BackgroundTasks) -> Created:
    metadata_url, target_base_url = device_urls(request)
    spec = body.model_dump(include={"waves", "canary", "include_new", "install_gate", "health_gate", "pacing"})
    spec["seed"] = body.seed if body.seed is not None else secrets.randbelow(2**31)
    rollout_id = await rollouts.create(ctx, who, rollouts.Request(body.artifact, body.selector, spec, metadata_url,
                                                                  target_base_url, body.health_timeout), rid(request))
    background.add_task(_prepare, ctx, rollout_id)
    return Created(id=rollout_id)


async def _prepare(ctx: ServerContext, rollout_id: str) -> None:
    await rollouts.prepare(ctx, rollout_id)
    if ctx.rollouts is not None:
        ctx.rollouts.kick()


@router.get("/rollouts", response_model=RolloutPage, summary="List rollouts, newest first")
async def list_rollouts(ctx: Ctx, _: Viewer, paging: Paging) -> RolloutPage:
    stmt = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id.desc())
    if paging.cursor:
        at, last = paging.cursor[:2]
        stmt = stmt.where((Rollout.created_at < at) | ((Rollout.created_at == at) & (Rollout.id < str(last))))
    async with ctx.reader() as db:
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    items = [await _view(ctx, r) for r in rows]
    return RolloutPage(items=items, next_cursor=encode_cursor([rows[-1].created_at, rows[-1].id]) if more else None)


@router.get("/rollouts/{rollout_id}", response_model=RolloutOut, summary="A rollout and each wave's progress")
async def show_rollout(rollout_id: str, ctx: Ctx, _: Viewer) -> RolloutOut:
    async with ctx.reader() as db:
        r = await rollouts.get(db, rollout_id)
    return await _view(ctx, r)


@router.get("/rollouts/{rollout_id}/devices", response_model=RolloutDevicePage,
            summary="A rollout's devices in its order, with their state and deployment status")
async def rollout_devices(rollout_id: str, ctx: Ctx, _: Viewer, paging: Paging) -> RolloutDevicePage:
    after = int(paging.cursor[0]) if paging.cursor else -1
    async with ctx.reader() as db:
        rows = await rollouts.devices_page(db, rollout_id, after, paging.limit + 1)
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    items = [RolloutDeviceOut(device_id=rd.device_id, wave=rd.wave + 1, state=rd.state, attempt=rd.attempt,
                              status=dd.status if dd is not None and dd.attempt == rd.attempt else None,
                              step=dd.step if dd is not None else None, reason=rd.reason or (dd.reason if dd else ""),
                              previous_version=rd.previous_version,
                              running_version=dd.running_version if dd is not None else None) for rd, dd in rows]
    return RolloutDevicePage(items=items, next_cursor=encode_cursor([rows[-1][0].position]) if more else None)


async def _act(ctx: ServerContext, who: Any, rollout_id: str, action: str, request: Request,
               revert: bool = False) -> RolloutOut:
    r, reverts = await rollouts.act(ctx, who, rollout_id, action, rid(request), revert=revert)
    for dep_id in reverts:
        await deployments.publish(ctx, dep_id)
    if ctx.rollouts is not None:
        ctx.rollouts.kick()
    return await _view(ctx, r)


@router.post("/rollouts/{rollout_id}/pause", response_model=RolloutOut, summary="Pause: no more devices are told")
async def pause_rollout(rollout_id: str, ctx: Ctx, who: Operator, request: Request) -> RolloutOut:
    return await _act(ctx, who, rollout_id, "pause", request)


@router.post("/rollouts/{rollout_id}/resume", response_model=RolloutOut,
             summary="Resume (the install gate accepts the failures seen so far)")
async def resume_rollout(rollout_id: str, ctx: Ctx, who: Operator, request: Request) -> RolloutOut:
    return await _act(ctx, who, rollout_id, "resume", request)


@router.post("/rollouts/{rollout_id}/abort", response_model=RolloutOut,
             summary="Abort: no more devices are told; with revert, the updated ones go back")
async def abort_rollout(rollout_id: str, body: AbortIn, ctx: Ctx, who: Operator, request: Request) -> RolloutOut:
    return await _act(ctx, who, rollout_id, "abort", request, revert=body.revert)
