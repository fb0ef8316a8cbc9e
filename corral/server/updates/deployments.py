"""Deployments: an artifact to a list of devices, with each device's status (issue 4).

A deployment is created in one transaction after every check passed (the artifact exists, every
device exists, is accepted and is compatible with the artifact's hardware list), so a refused
request creates nothing. The hub sends each device a ``deploy`` message while its status is not
final, on every connect (at-least-once, DESIGN §3); the device's ``deployment_status`` reports
are kept only when their ``seq`` is newer and the change of status is one AWS IoT Jobs allows
(:func:`accept_report`), so a duplicate or a late report never moves a status back.

Deltas (ADR 0014): before the devices are told, :func:`build_deltas` builds a delta from each
version the deployment's devices run (their inventory's ``software["KIND.NAME"]``), and each
device's ``deploy`` message offers the one from its version (:func:`offer`). The device uses it
only if it holds that version's file; otherwise, or when anything about the delta fails, it
downloads the full artifact, so a delta can save bytes but never fail a deployment.

The pure bookkeeping (:func:`accept_report`, :func:`summarise`, :func:`running_version`) is what
the rollout engine builds on; it is unit-tested without a database.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral import protocol as p
from corral.errors import CorralError, InvalidInput, NotFound
from corral.server import webhooks
from corral.server.auth import Principal
from corral.server.context import ServerContext
from corral.server.store.models import Artifact, Deployment, DeploymentDevice, Device
from corral.server.updates import artifacts, deltas

log = logging.getLogger(__name__)

#: devices in one direct deployment (a fleet goes through rollouts)
MAX_DEVICES = 1000
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "rolled-back"})
#: the webhook event of a device reaching a final status; ``data.status`` says which
DEVICE_FINISHED_EVENT = "deployment.device_finished"


def accept_report(current: str, current_seq: int, status: str, seq: int) -> bool:
    """Whether a device's report (``status`` at ``seq``) replaces what is stored.

    Stale or repeated reports (``seq`` not above the stored one) are ignored, and so is a change
    AWS IoT Jobs does not allow (a final status never changes). From ``queued`` a report may
    jump past ``in-progress``: the agent re-sends only its latest report, so the in-progress
    ones before a final one can be lost on the way."""
    if seq <= current_seq or status not in p.DEPLOYMENT_STATUS_NEXT:
        return False
    allowed = set(p.DEPLOYMENT_STATUS_NEXT[current])  # type: ignore[index]
    if current == "queued":
        allowed |= p.DEPLOYMENT_STATUS_NEXT["in-progress"]
    return status in allowed


def summarise(statuses: Iterable[str]) -> str:
    """A deployment's status from its devices': queued until one starts, in-progress until all
    are final, then succeeded when all succeeded, else failed."""
    seen = list(statuses)
    if not seen or all(s == "queued" for s in seen):
        return "queued"
    if any(s not in FINAL for s in seen):
        return "in-progress"
    return "succeeded" if all(s == "succeeded" for s in seen) else "failed"


def running_version(inventory: Mapping[str, Any] | None, kind: str, name: str) -> str:
    """The version of artifact ``name`` a device's inventory says it runs ("" when it says
    none): its ``software`` entry ``KIND.NAME`` (``app.demo``), as the agent reports it."""
    software = (inventory or {}).get("software")
    version = software.get(f"{kind}.{name}") if isinstance(software, Mapping) else None
    return version if isinstance(version, str) else ""


def wire_id(dep_id: str, attempt: int) -> str:
    """The deployment id a device sees: ``ID`` for the first attempt, ``ID.N`` for attempt N (a
    rollout's retry must look new to the device, which answers an id it finished with the
    outcome it holds)."""
    return dep_id if attempt <= 1 else f"{dep_id}.{attempt}"


def parse_wire_id(wire: str) -> tuple[str, int]:
    """``(deployment id, attempt)`` of a device's report."""
    dep_id, sep, n = wire.partition(".")
    if sep and n.isdigit() and int(n) >= 2:
        return dep_id, int(n)
    return wire, 1


def summarise_counts(by_status: dict[str, int]) -> str:
    """:func:`summarise` from the number of devices per status."""
    return summarise(s for s, n in by_status.items() if n)  # it reads which statuses occur, not how often


def split_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise InvalidInput(f"artifact must be NAME@VERSION, not {ref!r}")
    return name, version


@dataclass(frozen=True)
class Request:
    artifact: str
    devices: list[str]
    metadata_url: str
    target_base_url: str
    health_timeout: float | None = None


def _check_devices(a: Artifact, ids: list[str], found: dict[str, Device]) -> None:
    for d in ids:
        dev = found.get(d)
        if dev is None:
            raise InvalidInput(f"no device {d!r}")
        if dev.status != "accepted":
            raise InvalidInput(f"device {d} is {dev.status}; deployments go to accepted devices only")
        model = (dev.inventory or {}).get("model")
        if a.hardware and model and model not in a.hardware:
            raise InvalidInput(f"{a.name}@{a.version} is for {', '.join(a.hardware)}; device {d} is a {model}")


async def create(ctx: ServerContext, who: Principal, req: Request, request_id: str) -> str:
    """Check everything, then create the deployment and its devices' rows (queued) in one
    transaction; returns its id. The caller tells the online devices (:func:`publish`)."""
    name, version = split_ref(req.artifact)
    ids = list(dict.fromkeys(req.devices))
    if not ids:
        raise InvalidInput("devices needs at least one device id")
    if len(ids) > MAX_DEVICES:
        raise InvalidInput(f"at most {MAX_DEVICES} devices per deployment (use a rollout for more)")
    dep_id = secrets.token_hex(8)
    now = time.time()
    async with ctx.writer() as db:
        a = await artifacts.find(db, name, version)
        if a is None:
            raise InvalidInput(f"no artifact {name}@{version}")
        found = {d.id: d for d in (await db.scalars(select(Device).where(Device.id.in_(ids)))).all()}
        _check_devices(a, ids, found)
        db.add(Deployment(id=dep_id, artifact_id=a.id, status="queued", metadata_url=req.metadata_url,
                          target_base_url=req.target_base_url, health_timeout=req.health_timeout,
                          created_at=now, created_by=who.name, updated_at=now))
        await db.flush()
        db.add_all([DeploymentDevice(deployment_id=dep_id, device_id=d, status="queued", step="", reason="", seq=0,
                                     running_version="", updated_at=now) for d in ids])
        await ctx.audit(db, who, "deployment.create", dep_id,
                        {"artifact": f"{name}@{version}", "devices": ids}, request_id)
    return dep_id


def message(dep: Deployment, a: Artifact, delta: p.DeltaOffer | None = None, attempt: int = 1) -> p.Deploy:
    return p.Deploy(deployment_id=wire_id(dep.id, attempt), name=a.name, version=a.version, kind=a.kind,  # type: ignore[arg-type]
                    target_name=a.target_path, metadata_url=dep.metadata_url,
                    target_base_url=dep.target_base_url, sha256=a.sha256, size=a.size,
                    health_timeout=dep.health_timeout, delta=delta)


async def build_deltas(ctx: ServerContext, dep_id: str, devices: Select[Any] | None = None) -> list[deltas.DeltaTarget]:
    """Build (or find) the delta to the deployment's artifact from each version its devices (or
    ``devices``, a query of device ids: a rollout's) run and the server holds. One that cannot be
    built is logged and skipped: those devices get the full artifact."""
    ids = devices if devices is not None else \
        select(DeploymentDevice.device_id).where(DeploymentDevice.deployment_id == dep_id)
    async with ctx.reader() as db:
        _dep, a = await load(db, dep_id)
        inventories = (await db.scalars(select(Device.inventory).where(Device.id.in_(ids)))).all()
        bases = {running_version(inv, a.kind, a.name) for inv in inventories} - {"", a.version}
        stored = [v for v in sorted(bases) if await artifacts.find(db, a.name, v) is not None]
    built = []
    for base in stored:
        try:
            d = await deltas.build(ctx, a.name, a.version, base,
                                   max_ratio=ctx.config.updates.delta_max_ratio)
        except (CorralError, OSError) as e:
            log.warning("no delta to %s@%s from %s: %s", a.name, a.version, base, e)
            continue
        if d is not None:
            built.append(d)
    return built


async def offer(db: AsyncSession, a: Artifact, base_version: str) -> p.DeltaOffer | None:
    """The delta a device running ``base_version`` is offered for ``a``, if one is published
    and rebuilds exactly ``a``'s bytes."""
    if not base_version or base_version == a.version:
        return None
    d = await deltas.find(db, a.name, a.version, base_version)
    if d is None or d.target_sha256 != a.sha256 or d.target_length != a.size:
        return None
    return p.DeltaOffer(target_name=d.target_path, base_version=base_version, base_sha256=d.base_sha256)


async def pending_for(db: AsyncSession, device_id: str) -> list[p.Deploy]:
    """The deployments a device has not finished, oldest first: sent again on every connect."""
    rows = (await db.execute(
        select(Deployment, Artifact, Device.inventory, DeploymentDevice.attempt)
        .join(DeploymentDevice, DeploymentDevice.deployment_id == Deployment.id)
        .join(Artifact, Artifact.id == Deployment.artifact_id)
        .join(Device, Device.id == DeploymentDevice.device_id)
        .where(DeploymentDevice.device_id == device_id, DeploymentDevice.status.in_(["queued", "in-progress"]))
        .order_by(Deployment.created_at))).all()
    return [message(d, a, await offer(db, a, running_version(inv, a.kind, a.name)), attempt)
            for d, a, inv, attempt in rows]


async def load(db: AsyncSession, dep_id: str) -> tuple[Deployment, Artifact]:
    row = (await db.execute(select(Deployment, Artifact).join(Artifact, Artifact.id == Deployment.artifact_id)
                            .where(Deployment.id == dep_id))).first()
    if row is None:
        raise NotFound(f"no deployment {dep_id!r}")
    return row[0], row[1]


async def record_report(db: AsyncSession, device_id: str, report: p.DeploymentReport, now: float) -> bool:
    """Store a device's report if it is newer and allowed (:func:`accept_report`); updates the
    deployment's summary and queues the webhook event of a final status. True if stored."""
    dep_id, attempt = parse_wire_id(report.deployment_id)
    row = await db.get(DeploymentDevice, (dep_id[:32], device_id))
    if row is None or row.attempt != attempt or not accept_report(row.status, row.seq, report.status, report.seq):
        return False  # unknown, an earlier attempt's, stale or not allowed
    row.status = report.status
    row.seq = report.seq
    row.step = report.step[:32]
    row.reason = report.reason[:2000]
    row.running_version = report.running_version[:64]
    if report.download:
        row.download = report.download
    row.updated_at = now
    await db.flush()
    dep = await db.get(Deployment, dep_id)
    assert dep is not None
    # Only "started" is kept on the row: the summary (succeeded, failed) is computed from the
    # devices' statuses when read (:func:`summarise_counts`). Counting here made every final
    # report read every row of the deployment: quadratic in a rollout's size (bench/rollout).
    if dep.status == "queued":
        dep.status = "in-progress"
    dep.updated_at = now
    if report.status in FINAL:
        await webhooks.enqueue(db, DEVICE_FINISHED_EVENT, {
            "deployment": dep.id, "device": device_id, "status": report.status, "reason": row.reason,
            "running_version": row.running_version, "attempt": row.attempt}, now)
    return True


async def referencing(db: AsyncSession, artifact_id: int) -> list[str]:
    return list((await db.scalars(select(Deployment.id).where(Deployment.artifact_id == artifact_id)
                                  .order_by(Deployment.created_at))).all())


async def device_rows(db: AsyncSession, dep_id: str) -> list[DeploymentDevice]:
    return list((await db.scalars(select(DeploymentDevice).where(DeploymentDevice.deployment_id == dep_id)
                                  .order_by(DeploymentDevice.device_id))).all())


async def counts(db: AsyncSession, dep_ids: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {d: {} for d in dep_ids}
    if dep_ids:
        rows = await db.execute(select(DeploymentDevice.deployment_id, DeploymentDevice.status, func.count())
                                .where(DeploymentDevice.deployment_id.in_(dep_ids))
                                .group_by(DeploymentDevice.deployment_id, DeploymentDevice.status))
        for dep_id, status, n in rows.all():
            out[dep_id][status] = int(n)
    return out


async def deliver(ctx: ServerContext, dep_id: str) -> None:
    """After a deployment is created: build its deltas (``Updates.build_deltas``), then tell its
    online devices. Run after the response (building takes seconds for a large image); if the
    server stops meanwhile, the devices are told when they reconnect (:func:`pending_for`)."""
    try:
        if ctx.config.updates.build_deltas:
            await build_deltas(ctx, dep_id)
        await publish(ctx, dep_id)
    except Exception:
        log.exception("deployment %s: devices not told now; they are when they reconnect", dep_id)


async def publish(ctx: ServerContext, dep_id: str, device_ids: Iterable[str] | None = None) -> None:
    """Tell the devices' hubs (all of the deployment's devices, or ``device_ids``): whichever
    replica holds a device's session sends ``deploy``."""
    async with ctx.reader() as db:
        dep, a = await load(db, dep_id)
        stmt = (select(Device.id, Device.inventory, DeploymentDevice.attempt)
                .join(DeploymentDevice, DeploymentDevice.device_id == Device.id)
                .where(DeploymentDevice.deployment_id == dep_id))
        if device_ids is not None:
            stmt = stmt.where(DeploymentDevice.device_id.in_(list(device_ids)))
        devices = (await db.execute(stmt)).all()
        offers: dict[str, p.DeltaOffer | None] = {}  # per version the devices run
        for device_id, inventory, attempt in devices:
            base = running_version(inventory, a.kind, a.name)
            if base not in offers:
                offers[base] = await offer(db, a, base)
            payload = msgspec.json.encode(message(dep, a, offers[base], attempt))
            await ctx.bus.publish(f"device.{device_id}.deploy", payload)
