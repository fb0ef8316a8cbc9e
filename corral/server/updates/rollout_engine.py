"""The rollout engine: each open rollout is stepped by the pure planner, the decision persisted,
and only then the devices told (ADR 0015).

One step of a rollout is one write transaction with the rollout's row locked (``FOR UPDATE`` on
PostgreSQL; SQLite has one writer), so replicas that run the engine side by side never step
the same rollout at once. In it: the devices' states are read with their deployment reports,
the planner decides, the changed states, the new deployment rows (queued, with the attempt
number) and the webhook events are written. After the commit the told devices get their
``deploy`` through the bus. A server killed between the two has persisted the decision; the
devices are told when they reconnect (``deployments.pending_for``), so nobody is forgotten, and
nobody is told twice for the same attempt because the planner admits only ``pending``,
``scheduled`` and ``retry`` devices.

The engine steps every open rollout each ``interval`` and at once when :meth:`kick` is called
(the hub does on every report of a rollout's device), at most every ``min_gap``: a threshold
crossing pauses the rollout within about ``min_gap`` of the report that crossed it.

The health gate's input (:func:`corral.server.metrics_query.device_means` on the updated and
the not-yet-updated devices) is read outside the write transaction, every ``health_every``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from corral.core import rollout_plan as plan
from corral.core.rollout_spec import RolloutSpec
from corral.server import metrics_query, webhooks
from corral.server.context import ServerContext
from corral.server.store.models import Artifact, Deployment, DeploymentDevice, Device, DeviceTag, Rollout, RolloutDevice
from corral.server.updates import deployments, rollouts

log = logging.getLogger(__name__)

OPEN_DEVICE_STATES = ("active", "reverting")


@dataclass
class Stepped:
    """What a step did (for the engine's callers and tests)."""

    decision: plan.Decision
    told: int
    reverts: list[str]


class RolloutEngine:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.config = ctx.config.rollouts
        self._kicked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._preparing: set[str] = set()
        self._health: dict[str, tuple[float, plan.HealthVerdict | None]] = {}
        #: devices told since start (the benchmark's count)
        self.told = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="corral-rollouts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def kick(self) -> None:
        """Step the open rollouts now (a report came in, an operator acted)."""
        self._kicked.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kicked.wait(), timeout=self.config.interval)
            self._kicked.clear()
            try:
                await self.step_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rollout engine step failed")
            await asyncio.sleep(self.config.min_gap)

    async def step_all(self, now: float | None = None) -> dict[str, Stepped]:
        async with self.ctx.reader() as db:
            rows = (await db.execute(select(Rollout.id, Rollout.prepared).where(Rollout.settled.is_(False))
                                     .order_by(Rollout.created_at))).all()
        out = {}
        for rollout_id, prepared in rows:
            if not prepared:
                self._prepare_soon(rollout_id)
                continue
            try:
                stepped = await self.step(rollout_id, now)
            except Exception:
                log.exception("rollout %s: step failed", rollout_id)
                continue
            if stepped is not None:
                out[rollout_id] = stepped
        return out

    def _prepare_soon(self, rollout_id: str) -> None:
        if rollout_id in self._preparing:
            return
        self._preparing.add(rollout_id)

        async def go() -> None:
            try:
                await rollouts.prepare(self.ctx, rollout_id)
            except Exception:
                log.exception("rollout %s: preparing failed (tried again on the next step)", rollout_id)
            finally:
                self._preparing.discard(rollout_id)
            self.kick()

        asyncio.get_running_loop().create_task(go())

    # --- one step ---------------------------------------------------------------------------------

    async def step(self, rollout_id: str, now: float | None = None) -> Stepped | None:
        now = time.time() if now is None else now
        health = await self._health_verdict(rollout_id, now)
        ctx = self.ctx
        async with ctx.writer() as db:
            r = await rollouts.locked(db, rollout_id)
            if not r.prepared or r.settled:
                return None
            spec = rollouts.spec_from_doc(r.spec)
            state = rollouts.state_of(r)
            dep = await db.get(Deployment, r.deployment_id)
            assert dep is not None
            art = await db.get(Artifact, dep.artifact_id)
            assert art is not None
            if spec.include_new and state.status == "running":
                await self._add_new_devices(db, r, art, now)
            devices = await self._devices(db, r, spec, state)
            decision = plan.plan(spec, state, devices, now, health)
            await self._apply(db, r, dep, art, decision, now)
            reverts = await rollouts.start_reverts(db, r, decision.revert, now) if decision.revert else []
            for e in decision.events:
                await webhooks.enqueue(db, rollouts.EVENT_PREFIX + e.kind,
                                       {"rollout": r.id, "artifact": f"{art.name}@{art.version}", **e.data}, now)
            if decision.rollout.status not in plan.ACTIVE_STATUSES:
                left = [d for d in devices if decision.changed.get(d.device_id, d).state in OPEN_DEVICE_STATES]
                r.settled = not left and not reverts
        if decision.notify:
            await deployments.publish(ctx, r.deployment_id, [d for d, _ in decision.notify])
            self.told += len(decision.notify)
        for dep_id in reverts:
            await deployments.publish(ctx, dep_id)
        if decision.events:
            webhooks.notify(ctx)
        return Stepped(decision, len(decision.notify), reverts)

    async def _devices(self, db: AsyncSession, r: Rollout, spec: RolloutSpec,
                       state: plan.RolloutState) -> list[plan.DeviceState]:
        dd, rv = aliased(DeploymentDevice), aliased(DeploymentDevice)
        tag, tz = aliased(DeviceTag), aliased(DeviceTag)
        per_tag = spec.pacing.per_tag or ""
        windows = bool(spec.pacing.windows)
        # columns, not RolloutDevice entities: the step only reads them (entities took 3× as long at 10,000)
        cols: list[Any] = [RolloutDevice.device_id, RolloutDevice.wave, RolloutDevice.state, RolloutDevice.attempt,
                           RolloutDevice.not_before, RolloutDevice.started_at, RolloutDevice.finished_at,
                           RolloutDevice.reason, dd.status, dd.reason, dd.attempt, rv.status, rv.reason, tag.value,
                           tz.value]
        stmt = (select(*cols, Device.inventory if windows else Device.id)
                .join(Device, Device.id == RolloutDevice.device_id)
                .outerjoin(dd, and_(dd.deployment_id == r.deployment_id, dd.device_id == RolloutDevice.device_id))
                .outerjoin(rv, and_(rv.deployment_id == RolloutDevice.revert_deployment_id,
                                    rv.device_id == RolloutDevice.device_id))
                .outerjoin(tag, and_(tag.device_id == RolloutDevice.device_id, tag.key == per_tag))
                .outerjoin(tz, and_(tz.device_id == RolloutDevice.device_id, tz.key == rollouts.TIMEZONE_TAG))
                .where(RolloutDevice.rollout_id == r.id).order_by(RolloutDevice.position))
        rows: list[Any] = list((await db.execute(stmt)).all())
        eligible = await rollouts.waiting_still_selected(db, r) \
            if any(row[2] in rollouts.WAITING for row in rows) else set()
        out = []
        for (device_id, wave, rd_state, rd_attempt, not_before, started_at, finished_at, rd_reason,
             status, reason, attempt, rv_status, rv_reason, tag_value, tz_value, extra) in rows:
            if rd_state == "reverting":
                status, reason = rv_status, rv_reason or ""
            elif attempt is not None and attempt != rd_attempt:
                status, reason = None, ""  # the row is an earlier attempt's
            zone = tz_value or (rollouts.device_timezone({}, extra) if windows else None)
            out.append(plan.DeviceState(
                device_id, wave, rd_state, rd_attempt, not_before, started_at, finished_at,
                status, reason or rd_reason, tag_value, zone,
                eligible=rd_state not in rollouts.WAITING or device_id in eligible))
        return out

    async def _add_new_devices(self, db: AsyncSession, r: Rollout, art: Artifact, now: float) -> None:
        """Devices the selector matches now and the rollout has not seen: into the last wave."""
        known = set((await db.scalars(select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == r.id))).all())
        fresh = [(d, inv) for d, inv in await rollouts.matching_devices(db, r.selector) if d not in known]
        if not fresh:
            return
        last = await db.scalar(select(RolloutDevice.position).where(RolloutDevice.rollout_id == r.id)
                               .order_by(RolloutDevice.position.desc()).limit(1))
        position = (last if last is not None else -1) + 1
        for d, inv in sorted(fresh):
            why = rollouts.skip_reason(art, inv)
            db.add(RolloutDevice(rollout_id=r.id, device_id=d, position=position, wave=len(r.sizes) - 1,
                                 state="skipped" if why else "pending", attempt=0, reason=why,
                                 previous_version="", finished_at=now if why else None))
            position += 1
        await db.flush()

    async def _apply(self, db: AsyncSession, r: Rollout, dep: Deployment, art: Artifact,
                     decision: plan.Decision, now: float) -> None:
        rows = [{"rollout_id": r.id, "device_id": d.device_id, "state": d.state, "attempt": d.attempt,
                 "not_before": d.not_before, "started_at": d.started_at, "finished_at": d.finished_at,
                 "reason": d.reason[:2000]} for d in decision.changed.values()]
        told = dict(decision.notify)
        if told:
            inventories: dict[str, Any] = {d: inv for d, inv in (await db.execute(
                select(Device.id, Device.inventory).where(Device.id.in_(list(told))))).all()}
            previous = {d: deployments.running_version(inventories.get(d), art.kind, art.name) for d in told}
            for row in rows:
                if row["device_id"] in told and row["attempt"] == 1:  # what a revert goes back to
                    row["previous_version"] = previous[row["device_id"]]
        for chunk in range(0, len(rows), 2000):
            await db.execute(update(RolloutDevice), rows[chunk:chunk + 2000])
        if told:
            await rollouts.queue_devices(db, dep.id, told, now)
            if dep.status == "queued":
                dep.status, dep.updated_at = "in-progress", now
        rollouts.store_state(r, decision.rollout, now)

    async def _health_verdict(self, rollout_id: str, now: float) -> plan.HealthVerdict | None:
        cached = self._health.get(rollout_id)
        if cached is not None and now - cached[0] < self.config.health_every:
            return cached[1]
        verdict = await self._read_health(rollout_id, now)
        self._health[rollout_id] = (now, verdict)
        return verdict

    async def _read_health(self, rollout_id: str, now: float) -> plan.HealthVerdict | None:
        async with self.ctx.reader() as db:
            r = await rollouts.get(db, rollout_id)
            if r.status != "running" or not r.prepared:
                return None
            gate = rollouts.spec_from_doc(r.spec).health_gate
            if gate is None:
                return None
            rows = (await db.execute(select(RolloutDevice.device_id, RolloutDevice.state, RolloutDevice.finished_at)
                                     .where(RolloutDevice.rollout_id == rollout_id))).all()
            updated = {d: int((at or now) * 1000) for d, state, at in rows if state == "succeeded"}
            baseline = {d for d, state, _ in rows if state in ("pending", "scheduled", "retry")}
            if len(updated) < gate.min_devices:
                return None
            scope = Device.id.in_(select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout_id))
            hi = int(now * 1000)
            lo = hi - int(gate.window * 1000)
            means = await metrics_query.device_means(db, self.ctx.tsdb, gate.metric, scope, lo, hi, updated,
                                                     self.config.health_step_ms)
        return plan.health_verdict(gate, {d: v for d, v in means.items() if d in updated},
                                   {d: v for d, v in means.items() if d in baseline}, r.baseline)
