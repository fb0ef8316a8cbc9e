"""Rollouts: an artifact to the devices a selector matches, in waves, behind gates (ADR 0015).

This module is the rollout's persistence and its operator actions; the decisions are the pure
planner's (:mod:`corral.core.rollout_plan`) and the loop that applies them is
:mod:`.rollout_engine`. A rollout owns one deployment (:mod:`.deployments`): a device becomes one
of its devices when the planner tells it, so every per-device status, report, ack and webhook
is the deployment's, and a rollout adds only what the planner needs (``rollout_devices``: wave,
attempt, schedule, the version to go back to).

Creation checks everything and writes everything in one transaction: the artifact, the spec
(:func:`spec_from_doc`, each bad value an :class:`InvalidInput` naming it), the devices the
selector matches now (accepted ones), in a seeded random order with the canary selector's
devices first; a device the artifact is not for (hardware) or that already runs the version is
recorded as ``skipped`` with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from corral.core import rollout_plan as plan
from corral.core.rollout_spec import (
    HealthGate,
    InstallGate,
    Pacing,
    RolloutSpec,
    parse_waves,
    parse_window,
    wave_sizes,
)
from corral.errors import Conflict, InvalidInput, NotFound
from corral.selectors import parse as parse_selector
from corral.server import webhooks
from corral.server.auth import Principal
from corral.server.context import ServerContext
from corral.server.store.models import Artifact, Deployment, DeploymentDevice, Device, Rollout, RolloutDevice
from corral.server.store.selector_sql import to_sql
from corral.server.updates import artifacts, deployments

log = logging.getLogger(__name__)

#: the devices one rollout may hold
MAX_DEVICES = 200_000
EVENT_PREFIX = "rollout."
TIMEZONE_TAG = "timezone"


# --- the spec, as stored and as requested -------------------------------------------------------------


def _build(cls: type[Any], doc: Mapping[str, Any] | None, what: str) -> Any:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise InvalidInput(f"{what} must be an object")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise InvalidInput(f"{what}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return cls(**doc)
    except TypeError as e:
        raise InvalidInput(f"{what}: {e}") from None


def spec_from_doc(doc: Mapping[str, Any]) -> RolloutSpec:
    """The :class:`RolloutSpec` of a stored (or requested) spec document."""
    pacing_doc = dict(doc.get("pacing") or {})
    windows = tuple(parse_window(w) for w in pacing_doc.pop("windows", None) or [])
    pacing = _build(Pacing, pacing_doc, "pacing")
    if windows:
        pacing = dataclasses.replace(pacing, windows=windows)
    install = doc.get("install_gate", {})
    canary = doc.get("canary")
    if canary is not None:
        parse_selector(canary)  # a syntax error is the request's
    return RolloutSpec(
        waves=parse_waves(str(doc.get("waves", "all"))),
        install_gate=_build(InstallGate, install, "install_gate") if install is not None else None,
        health_gate=_build(HealthGate, doc.get("health_gate"), "health_gate"),
        pacing=pacing, seed=int(doc.get("seed", 0)), canary=canary, include_new=bool(doc.get("include_new", False)))


def spec_doc(spec: RolloutSpec, waves_text: str) -> dict[str, Any]:
    """What is stored (and shown): the spec with its defaults filled in."""
    pacing = dataclasses.asdict(spec.pacing)
    pacing["windows"] = [str(w) for w in spec.pacing.windows]
    return {"waves": waves_text, "seed": spec.seed, "canary": spec.canary, "include_new": spec.include_new,
            "install_gate": dataclasses.asdict(spec.install_gate) if spec.install_gate else None,
            "health_gate": dataclasses.asdict(spec.health_gate) if spec.health_gate else None,
            "pacing": pacing}


def state_of(r: Rollout) -> plan.RolloutState:
    return plan.RolloutState(status=r.status, current_wave=r.current_wave,  # type: ignore[arg-type]
                             sizes=tuple(int(x) for x in r.sizes), reason=r.reason,
                             acknowledged={int(k): (int(v[0]), int(v[1])) for k, v in (r.acknowledged or {}).items()},
                             baseline=r.baseline)


def store_state(r: Rollout, s: plan.RolloutState, now: float) -> None:
    r.status, r.current_wave, r.reason, r.baseline = s.status, s.current_wave, s.reason, s.baseline
    r.acknowledged = {str(k): list(v) for k, v in s.acknowledged.items()}
    r.updated_at = now


def device_timezone(tags: Mapping[str, str], inventory: Mapping[str, Any] | None) -> str | None:
    """A device's time zone: its ``timezone`` tag, else its inventory attribute ``timezone``."""
    if tags.get(TIMEZONE_TAG):
        return tags[TIMEZONE_TAG]
    attrs = (inventory or {}).get("attributes")
    tz = attrs.get(TIMEZONE_TAG) if isinstance(attrs, Mapping) else None
    return tz if isinstance(tz, str) and tz else None


# --- creation ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    artifact: str
    selector: str
    spec: Mapping[str, Any]
    metadata_url: str
    target_base_url: str
    health_timeout: float | None = None


def order_devices(ids: Iterable[str], seed: int, first: set[str]) -> list[str]:
    """The rollout's order: a seeded shuffle (reproducible), the canary devices first."""
    ordered = sorted(ids)
    random.Random(seed).shuffle(ordered)
    return [d for d in ordered if d in first] + [d for d in ordered if d not in first]


def skip_reason(a: Artifact, inventory: Mapping[str, Any] | None) -> str:
    """Why a selected device is not part of the rollout ("" when it is)."""
    model = (inventory or {}).get("model")
    if a.hardware and model and model not in a.hardware:
        return f"{a.name}@{a.version} is for {', '.join(a.hardware)}; this device is a {model}"
    if deployments.running_version(inventory, a.kind, a.name) == a.version:
        return f"already runs {a.name}@{a.version}"
    return ""


#: a rollout device's states before it is told (it must still be selected to be told)
WAITING = ("pending", "scheduled", "retry")


async def matching_devices(db: AsyncSession, selector: str) -> list[tuple[str, dict[str, Any]]]:
    """(id, inventory) of the accepted devices ``selector`` matches."""
    stmt = select(Device.id, Device.inventory).where(Device.status == "accepted", to_sql(parse_selector(selector)))
    return [(d, inv or {}) for d, inv in (await db.execute(stmt)).all()]


async def waiting_still_selected(db: AsyncSession, r: Rollout) -> set[str]:
    """The ids of ``r``'s devices not told yet (:data:`WAITING`) that are accepted and match its
    selector now. Ids only, and the rollout's devices as a subquery: the engine asks at every
    step, for up to every device of the rollout."""
    waiting = select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == r.id,
                                                     RolloutDevice.state.in_(WAITING))
    stmt = select(Device.id).where(Device.status == "accepted", to_sql(parse_selector(r.selector)),
                                   Device.id.in_(waiting))
    return set((await db.scalars(stmt)).all())


async def create(ctx: ServerContext, who: Principal, req: Request, request_id: str) -> str:
    name, version = deployments.split_ref(req.artifact)
    spec = spec_from_doc(req.spec)
    parse_selector(req.selector)  # a syntax error is the request's, before anything is read
    now = time.time()
    rollout_id = secrets.token_hex(8)
    dep_id = secrets.token_hex(8)
    async with ctx.writer() as db:
        a = await artifacts.find(db, name, version)
        if a is None:
            raise InvalidInput(f"no artifact {name}@{version}")
        found = await matching_devices(db, req.selector)
        if not found:
            raise InvalidInput(f"the selector {req.selector!r} matches no accepted device")
        if len(found) > MAX_DEVICES:
            raise InvalidInput(f"the selector matches {len(found)} devices; a rollout takes at most {MAX_DEVICES}")
        canary = {d for d, _ in await matching_devices(db, spec.canary)} if spec.canary else set()
        skipped = {d: why for d, inv in found if (why := skip_reason(a, inv))}
        order = order_devices((d for d, _ in found), spec.seed, canary)
        in_play = [d for d in order if d not in skipped]
        sizes = wave_sizes(spec.waves, len(in_play))
        db.add(Deployment(id=dep_id, artifact_id=a.id, status="queued", metadata_url=req.metadata_url,
                          target_base_url=req.target_base_url, health_timeout=req.health_timeout,
                          created_at=now, created_by=who.name, updated_at=now))
        db.add(Rollout(id=rollout_id, deployment_id=dep_id, selector=req.selector,
                       spec=spec_doc(spec, str(req.spec.get("waves", "all"))), status="running", reason="",
                       current_wave=0, sizes=list(sizes), acknowledged={}, baseline=None, prepared=False, settled=False,
                       created_at=now, created_by=who.name, updated_at=now))
        await db.flush()
        rows = []
        for position, device_id in enumerate(in_play):
            rows.append({"rollout_id": rollout_id, "device_id": device_id, "position": position,
                         "wave": plan.wave_of(position, sizes), "state": "pending", "attempt": 0, "reason": "",
                         "previous_version": ""})
        for k, device_id in enumerate(d for d in order if d in skipped):
            rows.append({"rollout_id": rollout_id, "device_id": device_id, "position": len(in_play) + k,
                         "wave": len(sizes) - 1, "state": "skipped", "attempt": 0, "reason": skipped[device_id],
                         "previous_version": "", "finished_at": now})
        for chunk in range(0, len(rows), 5000):
            await db.execute(insert(RolloutDevice), rows[chunk:chunk + 5000])
        await ctx.audit(db, who, "rollout.create", rollout_id,
                        {"artifact": f"{name}@{version}", "selector": req.selector, "devices": len(in_play),
                         "skipped": len(skipped), "waves": list(sizes)}, request_id)
        await webhooks.enqueue(db, EVENT_PREFIX + "started", {
            "rollout": rollout_id, "artifact": f"{name}@{version}", "devices": len(in_play),
            "waves": list(sizes)}, now)
    webhooks.notify(ctx)
    return rollout_id


async def prepare(ctx: ServerContext, rollout_id: str) -> None:
    """Build the deltas from the versions the rollout's devices run, then hand it to the engine
    (``prepared``). Idempotent: a server that stopped before the end prepares it again."""
    async with ctx.reader() as db:
        r = await get(db, rollout_id)
    if ctx.config.updates.build_deltas:
        await deployments.build_deltas(ctx, r.deployment_id, select(RolloutDevice.device_id).where(
            RolloutDevice.rollout_id == rollout_id, RolloutDevice.state != "skipped"))
    async with ctx.writer() as db:
        await db.execute(update(Rollout).where(Rollout.id == rollout_id).values(prepared=True))


# --- reading ------------------------------------------------------------------------------------------------


async def get(db: AsyncSession, rollout_id: str) -> Rollout:
    r = await db.get(Rollout, rollout_id)
    if r is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    return r


async def wave_progress(db: AsyncSession, r: Rollout) -> list[dict[str, Any]]:
    """Per wave: its size and its devices per state."""
    rows = (await db.execute(select(RolloutDevice.wave, RolloutDevice.state, func.count())
                             .where(RolloutDevice.rollout_id == r.id)
                             .group_by(RolloutDevice.wave, RolloutDevice.state))).all()
    by_wave: dict[int, Counter[str]] = {}
    for wave, state, n in rows:
        by_wave.setdefault(int(wave), Counter())[state] += int(n)
    sizes = [int(x) for x in r.sizes]
    return [{"wave": i + 1, "size": sizes[i] - (sizes[i - 1] if i else 0),
             "states": dict(sorted(by_wave.get(i, Counter()).items()))} for i in range(len(sizes))]


# --- operator actions ---------------------------------------------------------------------------------------


async def locked(db: AsyncSession, rollout_id: str) -> Rollout:
    """The rollout's row, locked for the transaction (``FOR UPDATE`` on PostgreSQL; SQLite has one
    writer): an operator's action and the engine's step never interleave."""
    r = (await db.execute(select(Rollout).where(Rollout.id == rollout_id).with_for_update())).scalar_one_or_none()
    if r is None:
        raise NotFound(f"no rollout {rollout_id!r}")
    return r


async def _device_states(db: AsyncSession, rollout_id: str) -> list[plan.DeviceState]:
    rows = (await db.execute(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
                             .order_by(RolloutDevice.position))).scalars().all()
    return [plan.DeviceState(r.device_id, r.wave, r.state, r.attempt, r.not_before, r.started_at,  # type: ignore[arg-type]
                             r.finished_at, None, r.reason) for r in rows]


async def act(ctx: ServerContext, who: Principal, rollout_id: str, action: str, request_id: str,
              revert: bool = False) -> tuple[Rollout, list[str]]:
    """``pause``, ``resume`` or ``abort`` (with ``revert``: the updated devices go back to their
    previous version). Refused with :class:`Conflict` when the rollout's status does not allow it.
    Returns the rollout and the revert deployments to publish."""
    now = time.time()
    reverts: list[str] = []
    async with ctx.writer() as db:
        r = await locked(db, rollout_id)
        before = state_of(r)
        allowed = {"pause": ("running",), "resume": ("paused",), "abort": ("running", "paused")}[action]
        if before.status not in allowed and not (action == "abort" and revert and before.status == "completed"):
            raise Conflict(f"rollout {rollout_id} is {before.status}: it cannot be {action}d")
        if action == "pause":
            after = plan.pause(before)
        elif action == "resume":
            after = plan.resume(before, await _device_states(db, rollout_id))
        else:
            after = plan.abort(before) if before.status != "completed" else before
        store_state(r, after, now)
        if revert:
            devices = await _device_states(db, rollout_id)
            ids = plan.revert_updated(devices, now, {})
            reverts = await start_reverts(db, r, ids, now)
            r.settled = False  # the engine follows the reverts
        kind = {"pause": "paused", "resume": "resumed", "abort": "aborted"}[action]
        await ctx.audit(db, who, f"rollout.{action}", rollout_id, {"revert": revert} if action == "abort" else {},
                        request_id)
        await webhooks.enqueue(db, EVENT_PREFIX + kind, {"rollout": rollout_id, "reason": after.reason,
                                                         "wave": after.current_wave + 1, "by": who.name,
                                                         **({"revert": revert} if action == "abort" else {})}, now)
    webhooks.notify(ctx)
    return r, reverts


DevicePage = list[tuple[RolloutDevice, DeploymentDevice | None]]


async def devices_page(db: AsyncSession, rollout_id: str, after: int, limit: int) -> DevicePage:
    """The rollout's devices after ``position`` ``after``, with their deployment rows."""
    r = await get(db, rollout_id)
    rows = (await db.execute(
        select(RolloutDevice, DeploymentDevice)
        .outerjoin(DeploymentDevice, (DeploymentDevice.deployment_id == r.deployment_id)
                   & (DeploymentDevice.device_id == RolloutDevice.device_id))
        .where(RolloutDevice.rollout_id == rollout_id, RolloutDevice.position > after)
        .order_by(RolloutDevice.position).limit(limit))).all()
    return [(rd, dd) for rd, dd in rows]


# --- what the engine and the operator's abort write ---------------------------------------------


async def queue_devices(db: AsyncSession, dep_id: str, told: Mapping[str, int], now: float) -> None:
    """The deployment rows of the told devices: queued for their attempt (a retry resets the row)."""
    existing = set((await db.scalars(select(DeploymentDevice.device_id).where(
        DeploymentDevice.deployment_id == dep_id, DeploymentDevice.device_id.in_(list(told))))).all())
    fresh = [{"deployment_id": dep_id, "device_id": d, "status": "queued", "step": "", "reason": "", "seq": 0,
              "running_version": "", "download": "", "attempt": n, "updated_at": now}
             for d, n in told.items() if d not in existing]
    again = [{"deployment_id": dep_id, "device_id": d, "status": "queued", "step": "", "reason": "", "seq": 0,
              "download": "", "attempt": n, "updated_at": now} for d, n in told.items() if d in existing]
    for chunk in range(0, len(fresh), 2000):
        await db.execute(insert(DeploymentDevice), fresh[chunk:chunk + 2000])
    for chunk in range(0, len(again), 2000):
        await db.execute(update(DeploymentDevice), again[chunk:chunk + 2000])


async def start_reverts(db: AsyncSession, r: Rollout, device_ids: Iterable[str], now: float) -> list[str]:
    """Send ``device_ids`` (updated devices of ``r``) back to the version each ran before: one
    deployment per previous version, created here (in the caller's transaction); the devices are
    ``reverting`` with its id. A device whose previous version the server does not hold, or that
    ran none, is ``revert_failed`` with the reason. Returns the deployments to publish."""
    ids = list(device_ids)
    if not ids:
        return []
    dep = await db.get(Deployment, r.deployment_id)
    assert dep is not None
    art = await db.get(Artifact, dep.artifact_id)
    assert art is not None
    rows = (await db.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id,
                                                         RolloutDevice.device_id.in_(ids)))).all()
    by_version: dict[str, list[RolloutDevice]] = defaultdict(list)
    for row in rows:
        by_version[row.previous_version].append(row)
    created = []
    for version, group in sorted(by_version.items()):
        target = await artifacts.find(db, art.name, version) if version else None
        if target is None:
            why = (f"no artifact {art.name}@{version} on the server to go back to" if version
                   else f"it ran no version of {art.name} before")
            for row in group:
                row.state, row.reason, row.finished_at = "revert_failed", why, now
            continue
        revert_id = secrets.token_hex(8)
        db.add(Deployment(id=revert_id, artifact_id=target.id, status="queued", metadata_url=dep.metadata_url,
                          target_base_url=dep.target_base_url, health_timeout=dep.health_timeout, created_at=now,
                          created_by=f"rollout:{r.id}", updated_at=now))
        await db.flush()
        await queue_devices(db, revert_id, {row.device_id: 1 for row in group}, now)
        for row in group:
            row.state, row.revert_deployment_id, row.started_at, row.finished_at = "reverting", revert_id, now, None
        created.append(revert_id)
        log.warning("rollout %s: %d devices go back to %s@%s (deployment %s)", r.id, len(group), art.name,
                    version, revert_id)
    await db.flush()
    return created

