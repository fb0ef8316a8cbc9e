"""Deployments: an artifact to a list of devices, each device's status (AWS IoT Jobs' words).

``POST /api/v1/deployments`` ``{artifact: "NAME@VERSION", devices: [ID, ...]}`` (operator,
audited) checks everything before creating anything; ``GET /api/v1/deployments`` and
``GET /api/v1/deployments/{id}`` (viewer) list them and show the per-device statuses.
"""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from corral.server.api.deps import Ctx, Operator, Paging, Viewer, encode_cursor, rid
from corral.server.api.tuf import device_urls
from corral.server.api.views import iso
from corral.server.store.models import Artifact, Deployment, DeploymentDevice
from corral.server.updates import deployments

router = APIRouter(tags=["deployments"])


class DeploymentIn(BaseModel):
    artifact: str = Field(description="NAME@VERSION", min_length=3, max_length=140)
    devices: list[str] = Field(description="device ids", max_length=deployments.MAX_DEVICES)
    health_timeout: float | None = Field(default=None, gt=0, le=86400,
                                         description="seconds; overrides the artifact's [health] timeout")


class DeviceStatusOut(BaseModel):
    device_id: str
    status: str = Field(description="queued, in-progress, succeeded, failed or rolled-back")
    step: str = Field(description="the device's update step (downloading, installing, ...)")
    reason: str
    seq: int
    running_version: str = Field(description="the artifact name's version running on the device")
    download: str = Field(description="how the artifact arrived: delta, full, or empty before the download ended")
    updated_at: str | None


class DeploymentOut(BaseModel):
    id: str
    artifact: str = Field(description="NAME@VERSION")
    kind: str
    status: str = Field(description="queued, in-progress, succeeded (all) or failed (some did not)")
    counts: dict[str, int] = Field(description="devices per status")
    created_at: str | None
    created_by: str
    updated_at: str | None
    devices: list[DeviceStatusOut] | None = Field(default=None, description="per device (show only)")


class DeploymentPage(BaseModel):
    items: list[DeploymentOut]
    next_cursor: str | None = None


class Created(BaseModel):
    id: str


def view(d: Deployment, a: Artifact, counts: dict[str, int],
         rows: list[DeploymentDevice] | None = None) -> DeploymentOut:
    return DeploymentOut(
        id=d.id, artifact=f"{a.name}@{a.version}", kind=a.kind,
        status=deployments.summarise_counts(counts) if counts else d.status, counts=counts,
        created_at=iso(d.created_at), created_by=d.created_by, updated_at=iso(d.updated_at),
        devices=None if rows is None else [
            DeviceStatusOut(device_id=r.device_id, status=r.status, step=r.step, reason=r.reason, seq=r.seq,
                            running_version=r.running_version, download=r.download,
                            updated_at=iso(r.updated_at)) for r in rows])


@router.post("/deployments", response_model=Created, status_code=201,
             summary="Deploy an artifact to devices (told now if online, else when they connect)")
async def create_deployment(body: DeploymentIn, ctx: Ctx, who: Operator, request: Request,
                            background: BackgroundTasks) -> Created:
    metadata_url, target_base_url = device_urls(request)
    dep_id = await deployments.create(
        ctx, who, deployments.Request(body.artifact, body.devices, metadata_url, target_base_url,
                                      body.health_timeout), rid(request))
    background.add_task(deployments.deliver, ctx, dep_id)  # deltas first, then the devices are told
    return Created(id=dep_id)


@router.get("/deployments", response_model=DeploymentPage, summary="List deployments, newest first")
async def list_deployments(ctx: Ctx, _: Viewer, paging: Paging) -> DeploymentPage:
    stmt = (select(Deployment, Artifact).join(Artifact, Artifact.id == Deployment.artifact_id)
            .order_by(Deployment.created_at.desc(), Deployment.id.desc()))
    if paging.cursor:
        at, last = paging.cursor[:2]
        stmt = stmt.where((Deployment.created_at < at) | ((Deployment.created_at == at) & (Deployment.id < str(last))))
    async with ctx.reader() as db:
        rows = list((await db.execute(stmt.limit(paging.limit + 1))).all())
        more = len(rows) > paging.limit
        rows = rows[: paging.limit]
        counts = await deployments.counts(db, [d.id for d, _a in rows])
    items = [view(d, a, counts[d.id]) for d, a in rows]
    last_dep = rows[-1][0] if rows else None
    return DeploymentPage(items=items, next_cursor=encode_cursor([last_dep.created_at, last_dep.id])
                          if more and last_dep is not None else None)


@router.get("/deployments/{dep_id}", response_model=DeploymentOut, summary="A deployment, with each device's status")
async def show_deployment(dep_id: str, ctx: Ctx, _: Viewer) -> DeploymentOut:
    async with ctx.reader() as db:
        d, a = await deployments.load(db, dep_id)
        rows = await deployments.device_rows(db, dep_id)
        counts = await deployments.counts(db, [dep_id])
    return view(d, a, counts[dep_id], rows)
