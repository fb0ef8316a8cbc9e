"""The device hub: one WebSocket session per connected device (DESIGN §1-§3).

Connect flow: accept (subprotocol ``corral.v1``) → send a one-time nonce → the device answers
``hello`` signed with its key → admission decision (``core.admission``) applied in one write
transaction → ``welcome``. Then the session relays heartbeats, inventory and command traffic.

Presence: a session marks its device online (with this replica's id) at welcome and offline at
close. Heartbeats only touch memory; live sessions' ``last_seen`` is written in one batch every
``presence_flush`` seconds. A session silent for ``heartbeat_grace_intervals`` heartbeat
intervals is closed, so a device whose network vanished goes offline within two intervals.

Cross-replica: commands, admission changes and forced closes arrive on the bus
(``device.<id>.command|status|close|rules``, ``rules.changed``); whichever replica holds the
session acts.

Telemetry: each ``telemetry`` batch is checked (``core.ingest``), stored with other devices'
batches (``telemetry_writer``) and only then acked, so the device deletes it from its spool after it is
durable here; a batch seen before is acked as a duplicate. On-device rules go down on connect
and whenever they (or the device's tags and groups) change (``rules_store``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from corral import protocol as p
from corral.core.admission import Action, decide
from corral.core.ingest import BatchRefused, clean_batch
from corral.server import registry, rules_store, webhooks
from corral.server.context import ServerContext
from corral.server.store.models import Device, DeviceCommand, Group
from corral.server.tsdb import Incoming, SeriesLimitExceeded
from corral.server.updates import deployments

log = logging.getLogger(__name__)

#: devices per presence UPDATE: small enough that other writes never wait long behind one
PRESENCE_CHUNK = 200


def _update(model: Any) -> Any:
    """An UPDATE that skips the ORM's in-session synchronisation: the hub never reads the rows it
    updates back from the same session, and the evaluation costs real CPU in a connect storm."""
    return update(model).execution_options(synchronize_session=False)


def _load_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> None:
    """Give memory freed after a connect storm back to the OS (glibc keeps it otherwise), so the
    server's RSS tracks its live sessions rather than its busiest minute."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class QueuedCommand(msgspec.Struct):
    """Payload of ``device.<id>.command`` on the bus."""

    id: str
    name: str
    args: dict[str, Any] = {}


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(eq=False)
class DeviceSession:
    device_id: str
    ws: WebSocket
    session_id: str
    status: str
    binary: bool = True
    last_rx: float = field(default_factory=time.monotonic)
    closing: bool = False
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: the spool drop counter last stored for this device (None: not yet this session)
    dropped: int | None = None
    rules_version: str | None = None  # the rule set last sent down this session


class Hub:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.codec = p.Codec()
        self.sessions: dict[str, DeviceSession] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._last_flush = 0.0
        self._ruleset: rules_store.RuleSet | None = None
        self._handshaking = 0
        self.busy_total = 0
        self.connects_total = 0
        self.refused_total = 0

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        bus = self.ctx.bus
        await bus.subscribe("device.*.command", self._on_command_queued)
        await bus.subscribe("device.*.close", self._on_close_request)
        await bus.subscribe("device.*.status", self._on_status_change)
        await bus.subscribe("command.*.done", self._on_command_done)
        await bus.subscribe(rules_store.RULES_CHANGED, self._on_rules_changed)
        await bus.subscribe("device.*.rules", self._on_device_rules)
        await bus.subscribe("device.*.deploy", self._on_deploy)
        await bus.subscribe("device.*.session", self._on_session)
        # Sessions this replica held before a restart are gone: mark their devices offline.
        async with self.ctx.writer() as db:
            await db.execute(
                _update(Device).where(Device.online.is_(True), Device.replica == self.ctx.config.replica_id)
                .values(online=False, replica=None)
            )
            if not self.ctx.config.bus_url:  # alone: nobody else holds sessions
                await db.execute(_update(Device).where(Device.online.is_(True)).values(online=False, replica=None))
        self._tasks = [asyncio.create_task(self._presence_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # each close marks its device offline through the group committer, which the app
        # drains after the hub stops
        await asyncio.gather(*(self._close_ws(s, p.CloseCode.SERVER_SHUTDOWN, "server shutting down")
                               for s in list(self.sessions.values())), return_exceptions=True)

    # --- the WebSocket endpoint -------------------------------------------------------------

    async def handle(self, ws: WebSocket) -> None:
        offered = ws.scope.get("subprotocols") or []
        if p.PROTOCOL not in offered:
            await ws.close(code=p.CloseCode.MALFORMED, reason=f"subprotocol {p.PROTOCOL} required")
            return
        if self._handshaking >= self.ctx.config.limits.max_concurrent_handshakes:
            # A reconnect storm: refuse the excess at once (cheap) rather than queue it past the
            # devices' handshake timeout. The agent backs off with jitter and comes back.
            self.busy_total += 1
            await ws.accept(subprotocol=p.PROTOCOL)
            await ws.close(code=p.CloseCode.RATE_LIMITED, reason="server busy, retry later")
            return
        await ws.accept(subprotocol=p.PROTOCOL)
        # The handshake headers are not needed again, but the scope lives as long as the session.
        ws.scope["headers"] = ()
        session: DeviceSession | None = None
        try:
            self._handshaking += 1
            try:
                session = await self._handshake(ws)
            finally:
                self._handshaking -= 1
            await self._serve(session)
        except _Close as c:
            self.refused_total += session is None
            await self._close_raw(ws, c.code, c.reason)
        except WebSocketDisconnect:
            pass
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            await self._close_raw(ws, p.CloseCode.MALFORMED, f"malformed frame: {str(e)[:80]}")
        except Exception:
            log.exception("device session failed")
            await self._close_raw(ws, 1011, "internal error")
        finally:
            if session is not None:
                await self._end(session)

    async def _recv(self, ws: WebSocket, timeout: float | None = None) -> bytes | str:
        msg = await asyncio.wait_for(ws.receive(), timeout) if timeout else await ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        data = msg.get("bytes")
        if data is not None:
            return data  # type: ignore[no-any-return]
        return msg.get("text") or ""

    async def _handshake(self, ws: WebSocket) -> DeviceSession:
        cfg = self.ctx.config
        nonce = secrets.token_bytes(p.NONCE_BYTES)
        await ws.send_bytes(self.codec.encode(p.Challenge(nonce=nonce, server_time=time.time())))
        try:
            frame = await self._recv(ws, cfg.timeouts.hello)
        except TimeoutError:
            raise _Close(p.CloseCode.TIMEOUT, "no hello in time") from None
        binary = not isinstance(frame, str)
        _, hello = self.codec.expect(frame, p.Hello)
        if len(hello.public_key) != 32 or p.device_id_for(hello.public_key) != hello.device_id:
            raise _Close(p.CloseCode.AUTH_FAILED, "device id does not match the public key")
        try:
            Ed25519PublicKey.from_public_bytes(hello.public_key).verify(
                hello.signature, p.hello_signing_payload(nonce, hello.device_id, hello.public_key)
            )
        except (InvalidSignature, ValueError):
            raise _Close(p.CloseCode.AUTH_FAILED, "signature does not verify") from None

        status = await self._admit(hello)
        session = DeviceSession(hello.device_id, ws, secrets.token_hex(8), status, binary)
        old = self.sessions.get(session.device_id)
        self.sessions[session.device_id] = session
        if old is not None:
            await self._close_ws(old, p.CloseCode.REPLACED, "replaced by a newer connection")
        self.connects_total += 1
        try:
            await self._send(session, p.Welcome(device_id=session.device_id, status=status,  # type: ignore[arg-type]
                                                heartbeat_interval=cfg.timeouts.heartbeat_interval,
                                                session_id=session.session_id))
            if status == "accepted":
                await self._deliver_queued(session)
                await self._push_rules([session])
                await self._deliver_deployments(session)
        except BaseException:
            await self._end(session)  # registered and marked online: undo both
            raise
        return session

    async def _admit(self, hello: p.Hello) -> str:
        """Apply the admission decision (group-committed with other sessions' writes)."""
        return await self.ctx.commits.write(lambda db: self._admit_tx(db, hello))

    async def _admit_tx(self, db: AsyncSession, hello: p.Hello) -> str:
        """The admission decision and its writes; raises before writing anything on refusal."""
        cfg = self.ctx.config
        dev = await db.get(Device, hello.device_id)
        if dev is not None and dev.public_key != hello.public_key:
            raise _Close(p.CloseCode.AUTH_FAILED, "device id is registered with another key")
        verdict, token = await registry.check_enrollment_token(db, hello.enroll_token)
        decision = decide(dev.status if dev else None, verdict, cfg.allow_pending)
        if decision.action is Action.REFUSE:
            raise _Close(p.CloseCode.REFUSED, decision.reason)
        if decision.action is Action.AUTH_FAILED:
            raise _Close(p.CloseCode.AUTH_FAILED, decision.reason)
        if decision.consumes_token:
            assert token is not None
            if not await registry.consume_enrollment_token(db, token):
                if dev is None:
                    raise _Close(p.CloseCode.AUTH_FAILED, "enrollment token has no uses left")
                decision = decide(dev.status, "used_up", cfg.allow_pending)
        now = time.time()
        actor = f"device:{hello.device_id}"
        if dev is None:
            dev = Device(id=hello.device_id, public_key=hello.public_key, status="pending",
                         created_at=now, updated_at=now, inventory={})
            db.add(dev)
            await db.flush()
        if decision.consumes_token and token is not None:
            dev.status = "accepted"
            dev.admitted_at = now
            dev.enrollment_token_id = token.id
            await registry.set_tags(db, dev.id, dict(token.tags or {}))
            for g in token.groups or []:
                if await db.get(Group, g) is not None:
                    await registry.add_members(db, g, [dev.id])
            await self.ctx.audit(db, actor, "device.enroll", dev.id,
                                 {"token": token.id, "tags": token.tags, "groups": token.groups})
        elif decision.action is Action.CREATE_PENDING:
            await self.ctx.audit(db, actor, "device.pending", dev.id, {})
        dev.online = True
        dev.replica = cfg.replica_id
        dev.last_seen = now
        dev.updated_at = now
        return dev.status

    async def _serve(self, s: DeviceSession) -> None:
        while True:
            frame = await self._recv(s.ws)
            s.last_rx = time.monotonic()
            env, body = self.codec.decode(frame)
            if isinstance(body, p.Heartbeat):
                await self._send(s, p.HeartbeatAck(seq=body.seq, server_time=time.time()))
            elif isinstance(body, p.Inventory):
                await self._store_inventory(s, frame, body)
            elif isinstance(body, p.CommandAck):
                await self._command_update(s, env.id, "acknowledged", None)
            elif isinstance(body, p.CommandResult):
                await self._command_update(s, env.id, "succeeded" if body.ok else "failed", body)
            elif isinstance(body, p.Telemetry):
                await self._ingest(s, body)
            elif isinstance(body, p.RulesAck):
                await self._rules_ack(s, body)
            elif isinstance(body, p.DeploymentReport):
                await self._deployment_report(s, body)
            elif isinstance(body, p.SessionRefused):  # to whichever replica waits for it
                await self.ctx.bus.publish(f"session.{body.session_id[:32]}.refused", body.reason[:500].encode())
            else:
                raise _Close(p.CloseCode.MALFORMED, f"unexpected message {env.type!r}")

    async def _store_inventory(self, s: DeviceSession, frame: bytes | str, inv: p.Inventory) -> None:
        if len(frame) > self.ctx.config.limits.max_inventory_bytes:
            raise _Close(p.CloseCode.TOO_BIG, "inventory too large")
        doc: dict[str, Any] = {str(k)[:64]: v for k, v in inv.attributes.items()}
        for k, v in msgspec.structs.asdict(inv).items():
            if k != "attributes" and v not in ("", None, [], {}):
                doc[k] = v
        now = time.time()
        stmt = _update(Device).where(Device.id == s.device_id).values(inventory=doc, inventory_at=now, last_seen=now)
        await self.ctx.commits.execute(stmt)

    async def _end(self, s: DeviceSession) -> None:
        if self.sessions.get(s.device_id) is not s:
            return  # replaced by a newer session, which owns presence now
        del self.sessions[s.device_id]
        stmt = (_update(Device).where(Device.id == s.device_id, Device.replica == self.ctx.config.replica_id)
                .values(online=False, replica=None, last_seen=time.time()))
        self.ctx.commits.execute_later(stmt, "marking a device offline")

    # --- telemetry ----------------------------------------------------------------------------

    async def _ingest(self, s: DeviceSession, batch: p.Telemetry) -> None:
        """Store a batch, then ack it: the agent deletes it from its spool only after the ack,
        and a batch seen before is acked as a duplicate without being stored again."""
        if s.status != "accepted":
            return  # not stored and not acked: the device keeps it until it is accepted
        ctx = self.ctx
        now = time.time()
        try:
            clean = clean_batch(batch, int(now * 1000), ctx.config.monitoring.ingest)
        except BatchRefused as e:
            n = sum(len(x.values) for x in batch.series) + len(batch.events)
            await self._send(s, p.TelemetryAck(seq=batch.seq, rejected=n, reason=str(e)))
            return
        dropped = batch.dropped if batch.dropped != s.dropped else None
        actions = [e for e in clean.events if e.source == "allowlist"]
        try:
            stored = await ctx.telemetry.write(Incoming(s.device_id, batch.seq, clean, dropped, now), actions)
        except SeriesLimitExceeded as e:
            await self._send(s, p.TelemetryAck(seq=batch.seq, rejected=len(clean.points), reason=str(e)))
            return
        s.dropped = batch.dropped
        ts = ctx.tsdb
        ts.batches_total += 1
        if stored:
            ts.points_total += len(clean.points)
            ts.rejected_total += clean.rejected
        else:
            ts.duplicates_total += 1
        await self._send(s, p.TelemetryAck(seq=batch.seq, duplicate=not stored, rejected=clean.rejected,
                                           reason=clean.reason))

    async def _push_rules(self, sessions: list[DeviceSession]) -> None:
        """Send each session its rule set, unless it already has that version."""
        if self._ruleset is None:
            async with self.ctx.reader() as db:
                self._ruleset = await rules_store.load(db)
        ruleset = self._ruleset
        views: dict[str, Any] = {}
        if ruleset.needs_view:
            async with self.ctx.reader() as db:
                views = await rules_store.device_views(db, [s.device_id for s in sessions])
        for s in sessions:
            rules = ruleset.for_device(views.get(s.device_id))
            if rules.version != s.rules_version and s.status == "accepted" and not s.closing:
                s.rules_version = rules.version
                with contextlib.suppress(Exception):
                    await self._send(s, rules)

    async def _on_rules_changed(self, subject: str, data: bytes) -> None:
        self._ruleset = None
        live = [s for s in self.sessions.values() if s.status == "accepted"]
        for i in range(0, len(live), 500):
            await self._push_rules(live[i:i + 500])

    async def _on_device_rules(self, subject: str, data: bytes) -> None:
        """A device's tags or groups changed: its rule set may have too."""
        s = self.sessions.get(subject.split(".")[1])
        if s is not None and s.status == "accepted":
            await self._push_rules([s])

    async def _rules_ack(self, s: DeviceSession, ack: p.RulesAck) -> None:
        refused = {str(k)[:64]: str(v)[:500] for k, v in list(ack.refused.items())[:1000]}
        await self.ctx.commits.write(lambda db: rules_store.record_ack(db, s.device_id, ack.version[:64], refused))

    # --- deployments (issue 4) -------------------------------------------------------------------

    async def _deliver_deployments(self, s: DeviceSession) -> None:
        """Every deployment this device has not finished, again on every connect: the agent
        ignores one it already holds a record of, and re-sends that record's status."""
        async with self.ctx.reader() as db:
            pending = await deployments.pending_for(db, s.device_id)
        for msg in pending:
            await self._send(s, msg)

    async def _deployment_report(self, s: DeviceSession, report: p.DeploymentReport) -> None:
        """Store the report if it is newer (by seq) and allowed, then ack it either way: a
        stale or repeated report is acked so the agent stops re-sending it."""
        if s.status != "accepted":
            return
        now = time.time()
        stored = await self.ctx.commits.write(
            lambda db: deployments.record_report(db, s.device_id, report, now))
        if stored and report.status in deployments.FINAL:
            webhooks.notify(self.ctx)
            if self.ctx.rollouts is not None:  # a rollout's gates and waves may move now
                self.ctx.rollouts.kick()
        await self._send(s, p.DeploymentAck(deployment_id=report.deployment_id, seq=report.seq))

    # --- sending and closing ----------------------------------------------------------------

    async def _send(self, s: DeviceSession, body: msgspec.Struct, id: str | None = None) -> None:
        data = self.codec.encode(body, id=id, binary=s.binary)
        async with s.send_lock:
            if isinstance(data, bytes) and s.binary:
                await s.ws.send_bytes(data)
            else:
                await s.ws.send_text(data.decode())

    async def _close_raw(self, ws: WebSocket, code: int, reason: str) -> None:
        if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(code=code, reason=reason[:120])

    async def _close_ws(self, s: DeviceSession, code: int, reason: str) -> None:
        if s.closing:
            return
        s.closing = True
        await self._close_raw(s.ws, code, reason)
        # Do not wait for the peer's close frame (a vanished device never sends one): the
        # device is offline from the moment we close.
        await self._end(s)

    # --- commands -----------------------------------------------------------------------------

    async def _deliver_queued(self, s: DeviceSession) -> None:
        async with self.ctx.reader() as db:
            cmds = (await db.scalars(
                select(DeviceCommand).where(DeviceCommand.device_id == s.device_id,
                                            DeviceCommand.status.in_(["queued", "sent"]),
                                            DeviceCommand.expires_at > time.time())
                .order_by(DeviceCommand.created_at))).all()
        for c in cmds:
            await self._send_command(s, c.id, c.name, c.args or {})

    async def _send_command(self, s: DeviceSession, cmd_id: str, name: str, args: dict[str, Any]) -> None:
        await self._send(s, p.Command(name=name, args=args), id=cmd_id)
        stmt = (_update(DeviceCommand).where(DeviceCommand.id == cmd_id, DeviceCommand.status == "queued")
                .values(status="sent", updated_at=time.time()))
        self.ctx.commits.execute_later(stmt, "marking a command sent")

    async def _command_update(self, s: DeviceSession, command_id: str | None, status: str,
                              result: p.CommandResult | None) -> None:
        if not command_id:
            raise _Close(p.CloseCode.MALFORMED, "command reply without id")
        values: dict[str, Any] = {"status": status, "updated_at": time.time()}
        if result is not None:
            values["result"] = result.result if isinstance(result.result, dict) else {"value": result.result}
            values["error"] = (result.error or "")[:2000] or None
        allowed = ["queued", "sent"] if status == "acknowledged" else ["queued", "sent", "acknowledged"]
        stmt = _update(DeviceCommand).where(
            DeviceCommand.id == command_id, DeviceCommand.device_id == s.device_id,
            DeviceCommand.status.in_(allowed)).values(**values)
        if result is None:  # an acknowledgement: a progress hint, not worth waiting for
            self.ctx.commits.execute_later(stmt, "recording a command ack")
            return
        res = await self.ctx.commits.execute(stmt)
        if res.rowcount:
            await self.ctx.bus.publish(f"command.{command_id}.done", status.encode())

    def watch_command(self, command_id: str) -> asyncio.Future[None]:
        """A future resolved when the command finishes; register it before the command can."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(command_id, []).append(fut)
        return fut

    async def await_command(self, command_id: str, fut: asyncio.Future[None], timeout: float) -> None:
        """Wait (bounded) on a watch; returns silently on timeout."""
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout)
        finally:
            waiters = self._waiters.get(command_id, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._waiters.pop(command_id, None)

    async def wait_command(self, command_id: str, timeout: float) -> None:
        """Wait (bounded) until an existing command finishes; returns silently on timeout."""
        fut = self.watch_command(command_id)
        async with self.ctx.reader() as db:  # it may have finished before we registered
            st = await db.scalar(select(DeviceCommand.status).where(DeviceCommand.id == command_id))
        if st not in ("queued", "sent", "acknowledged"):
            fut.set_result(None)
        await self.await_command(command_id, fut, timeout)

    # --- bus handlers -------------------------------------------------------------------------

    async def _on_command_queued(self, subject: str, data: bytes) -> None:
        """The bus message carries the command itself, so sending needs no database read."""
        s = self.sessions.get(subject.split(".")[1])
        if s is None or s.status != "accepted":
            return
        cmd = msgspec.json.decode(data, type=QueuedCommand)
        with contextlib.suppress(Exception):
            await self._send_command(s, cmd.id, cmd.name, cmd.args)

    async def _on_close_request(self, subject: str, data: bytes) -> None:
        s = self.sessions.get(subject.split(".")[1])
        if s is not None:
            code = int(data or b"1000")
            await self._close_ws(s, code, "closed by the server")

    async def _on_status_change(self, subject: str, data: bytes) -> None:
        s = self.sessions.get(subject.split(".")[1])
        if s is None:
            return
        status = data.decode()
        if status in ("rejected", "decommissioned"):
            await self._close_ws(s, p.CloseCode.REFUSED, f"device is {status}")
        elif status == "accepted" and s.status != "accepted":
            s.status = "accepted"
            with contextlib.suppress(Exception):
                await self._send(s, p.Status(status="accepted"))
                await self._deliver_queued(s)
                await self._push_rules([s])
                await self._deliver_deployments(s)

    async def _on_deploy(self, subject: str, data: bytes) -> None:
        s = self.sessions.get(subject.split(".")[1])
        if s is None or s.status != "accepted":
            return  # told when it connects (or is accepted)
        with contextlib.suppress(Exception):
            await self._send(s, msgspec.json.decode(data, type=p.Deploy))

    async def _on_session(self, subject: str, data: bytes) -> None:
        """A remote-access session for a device whose connection this replica holds."""
        s = self.sessions.get(subject.split(".")[1])
        if s is None or s.status != "accepted":
            return  # the operator's side times out and says so
        with contextlib.suppress(Exception):
            await self._send(s, msgspec.json.decode(data, type=p.SessionOpen))

    async def _on_command_done(self, subject: str, data: bytes) -> None:
        for fut in self._waiters.get(subject.split(".")[1], []):
            if not fut.done():
                fut.set_result(None)

    # --- presence ---------------------------------------------------------------------------

    async def _presence_loop(self) -> None:
        t = self.ctx.config.timeouts
        # silent sessions are looked for twice per heartbeat interval; last_seen is written at
        # most every presence_flush seconds
        period = t.heartbeat_interval / 2
        while True:
            await asyncio.sleep(period)
            try:
                await self._presence_tick()
            except Exception:
                log.exception("presence tick failed")

    async def _presence_tick(self) -> None:
        t = self.ctx.config.timeouts
        deadline = time.monotonic() - t.heartbeat_interval * t.heartbeat_grace_intervals
        live: list[str] = []
        for s in list(self.sessions.values()):
            if s.last_rx < deadline:
                await self._close_ws(s, p.CloseCode.TIMEOUT, "no heartbeat")
            else:
                live.append(s.device_id)
        if time.monotonic() - self._last_flush < t.presence_flush:
            return
        self._last_flush = time.monotonic()
        release_free_memory()  # blocks for milliseconds: only as often as the presence flush
        now = time.time()
        replica = self.ctx.config.replica_id
        # One small write per chunk, each its own group-commit op: command and enrollment writes
        # interleave with them instead of waiting behind one long presence transaction.
        for i in range(0, len(live), PRESENCE_CHUNK):
            # also re-asserts online: a replaced session's late close may have marked it offline
            stmt = (_update(Device).where(Device.id.in_(live[i:i + PRESENCE_CHUNK]))
                    .values(last_seen=now, online=True, replica=replica))
            # one chunk at a time: queued all at once they would share one long transaction
            await self.ctx.commits.execute(stmt)
        # devices a vanished replica left "online": stale beyond any flush period
        stale = now - (t.heartbeat_interval * t.heartbeat_grace_intervals + t.presence_flush * 2)
        sweep = (_update(Device).where(Device.online.is_(True), Device.last_seen < stale)
                 .values(online=False, replica=None))
        await self.ctx.commits.execute(sweep)
