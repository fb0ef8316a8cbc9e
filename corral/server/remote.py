"""Remote-access sessions: who may open them, their single-use tokens, the relay, the recording
and the audit trail (issue 6, ADR 0016).

A session goes::

    POST /api/v1/devices/ID/sessions   →  pending: a token for the operator (single-use, 60 s,
                                          bound to this device and this user)
    operator WS /api/v1/sessions/SID/ws (token + the same user's credentials)
                                       →  connecting: the device is sent ``session_open`` with a
                                          token of its own and the relay URL of this replica
    device WS /device/v1/sessions/SID  (its token) → open: bytes relayed both ways
    either side closes, or an admin ends it → closed / ended (bytes counted, audited)

The bytes are relayed by the relay worker, a child process (:mod:`corral.server.relay_worker`):
once a socket's token is checked here, its connection is handed over before the WebSocket
handshake (:mod:`corral.server.handover`), so that busy sessions never slow the event loop that
serves devices' telemetry and the API. This process keeps each session's record, decides, audits,
and hears from the worker how the session ended. Where a connection cannot be handed over (the
device web-UI proxy's in-process end, another ASGI server), the session is relayed here instead.

A token that is replayed, expired, for another device or presented by another user is refused
before anything is relayed, and the refusal is audited. Either relay reads a side only while the
other side's socket takes what it is given, so a slow side slows the fast one instead of filling
memory. Terminal output is recorded in asciicast v2 under ``DATA_DIR/recordings/SID.cast``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import select, update
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from corral import protocol as p
from corral.core.remote import Asciicast
from corral.errors import Conflict, Forbidden, InvalidInput, NotFound
from corral.server import handover
from corral.server.auth import Principal
from corral.server.context import ServerContext
from corral.server.relay_link import RelayLink
from corral.server.relay_worker import MAX_FRAME
from corral.server.store.models import Device, RemoteSession

log = logging.getLogger(__name__)

KINDS = ("terminal", "forward", "upload", "download")
DEVICE_RELAY_PATH = "/device/v1/sessions/"
#: the subprotocol of a device's end of a session
SESSION_SUBPROTOCOL = "corral.session.v1"
CLOSE_REFUSED = 4403
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_BIG = 1009


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def recordings_dir(ctx: ServerContext) -> Path:
    return ctx.config.data_dir / "recordings"


def _check_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The session's parameters, checked for shape (the device checks them for what it allows)."""
    def number(key: str, lo: int, hi: int, default: int | None = None) -> int:
        v = params.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise InvalidInput(f"{kind} {key} must be a whole number in {lo}..{hi}")
        return v

    def text(key: str, limit: int = 4096) -> str:
        v = params.get(key)
        if not isinstance(v, str) or not v or len(v) > limit or "\x00" in v:
            raise InvalidInput(f"{kind} needs {key} (a non-empty string)")
        return v

    if kind == "terminal":
        return {"cols": number("cols", 1, 1000, 80), "rows": number("rows", 1, 1000, 24)}
    if kind == "forward":
        return {"host": text("host", 255), "port": number("port", 1, 65535)}
    if kind == "upload":
        sha = text("sha256", 64).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise InvalidInput("upload sha256 must be 64 hex digits")
        return {"path": text("path"), "size": number("size", 0, 1 << 40), "sha256": sha,
                "mode": number("mode", 0, 0o7777, 0o644)}
    if kind == "download":
        return {"path": text("path")}
    raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")


async def create(ctx: ServerContext, who: Principal, device_id: str, kind: str, params: dict[str, Any],
                 request_id: str) -> tuple[RemoteSession, str]:
    """A pending session and the operator's token for it (shown once)."""
    if not who.may_access_devices:
        raise Forbidden(f"{who.name} does not have the remote-access permission")
    checked = _check_params(kind, params)
    token = "rst_" + secrets.token_urlsafe(32)
    now = time.time()
    async with ctx.writer() as db:
        device = await db.get(Device, device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        if device.status != "accepted":
            raise Conflict(f"device {device_id} is {device.status}")
        if not device.online:
            raise Conflict(f"device {device_id} is offline")
        s = RemoteSession(id=secrets.token_hex(8), device_id=device_id, user_id=who.user_id, user_name=who.name,
                          kind=kind, params=checked, token_hash=digest(token),
                          expires_at=now + ctx.config.timeouts.session_token_ttl,
                          status="pending", reason="", replica=ctx.config.replica_id, created_at=now,
                          bytes_to_device=0, bytes_from_device=0)
        db.add(s)
        await ctx.audit(db, who, f"session.{kind}", device_id, {"session": s.id, **_audit_params(kind, checked)},
                        request_id)
    return s, token


def _audit_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "sha256"} if kind != "terminal" else {}


# --- the relay ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Live:
    """What the server keeps of a session the relay worker carries (to record how it ended)."""

    id: str
    device_id: str
    user_name: str
    kind: str
    created_at: float


@dataclass
class _Pending:
    device: asyncio.Future[WebSocket | None]  # None: the device's end went to the relay worker
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: the session is relayed by the worker (its operator's connection was handed over)
    in_worker: bool = False


class Relay:
    """This replica's sessions: those waiting for their device, and those open (to end them)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.pending: dict[str, _Pending] = {}
        self.live: dict[str, asyncio.Task[None]] = {}
        #: sessions an admin ended (their cancellation is not the server stopping)
        self.ending: set[str] = set()
        #: sessions in the relay worker, until it reports them closed
        self.in_worker: dict[str, _Live] = {}
        self.worker = RelayLink(self._on_worker_report, self._on_worker_lost, ctx.config.remote.relay_nice)

    async def start(self) -> None:
        await self.worker.start()
        await self.ctx.bus.subscribe("session.*.refused", self._on_refused)
        await self.ctx.bus.subscribe("session.*.end", self._on_end)

    async def stop(self) -> None:
        await self.worker.stop("the server is stopping")
        await self._on_worker_lost("the server is stopping")  # any the worker did not report

    async def _on_worker_report(self, doc: dict[str, Any]) -> None:
        if doc.get("op") != "closed":
            return
        s = self.in_worker.pop(str(doc.get("sid")), None)
        if s is None:
            return
        waiting = self.pending.get(s.id)
        if waiting is not None and not waiting.device.done():  # it ended before its device came
            waiting.device.set_exception(_Gone())
        # a terminal's recording is kept even when the worker died before saying so
        cast = f"{s.id}.cast"
        recorded = bool(doc.get("recorded")) or (s.kind == "terminal" and (recordings_dir(self.ctx) / cast).exists())
        await self._finish(s, str(doc.get("status", "closed")), str(doc.get("reason", "")),
                           int(doc.get("to_device", 0)), int(doc.get("from_device", 0)), cast if recorded else None)

    async def _on_worker_lost(self, reason: str = "the relay worker stopped unexpectedly") -> None:
        for sid in list(self.in_worker):
            await self._on_worker_report({"op": "closed", "sid": sid, "status": "closed", "reason": reason})

    async def _on_refused(self, subject: str, data: bytes) -> None:
        waiting = self.pending.get(subject.split(".")[1])
        if waiting is not None and not waiting.device.done():
            waiting.device.set_exception(_Refused(data.decode("utf-8", "replace")))

    async def _on_end(self, subject: str, data: bytes) -> None:
        session_id = subject.split(".")[1]
        if session_id in self.in_worker:
            with contextlib.suppress(ConnectionError, OSError):
                await self.worker.send({"op": "end", "sid": session_id, "status": "ended",
                                        "reason": "ended by an administrator"})
            return
        task = self.live.get(session_id)
        if task is not None:
            self.ending.add(session_id)
            task.cancel()

    # --- the operator's side ---

    async def operator(self, ws: WebSocket, session_id: str, token: str, who: Principal | None,
                       unauthenticated: str = "no credentials") -> None:
        """The operator's WebSocket: check the token, open the session on the device, and relay
        until either side ends: in the relay worker when the connection can be handed over (not
        accepted yet), else here (accepted here if the caller has not)."""
        s = await self._claim(session_id, token, who, unauthenticated)
        in_worker = handover.detachable(ws)
        if s is None or not in_worker:
            if getattr(ws, "application_state", None) == WebSocketState.CONNECTING:
                await ws.accept()
            if s is None:
                await ws.close(CLOSE_UNAUTHORIZED, "session refused")
                return
        waiting = _Pending(asyncio.get_running_loop().create_future(), in_worker=in_worker)
        self.pending[s.id] = waiting
        try:
            try:
                device_ws = await self._ask_device(ws, s, waiting)
            except Exception:
                if in_worker:  # the worker holds the operator's end: it must not wait for a device forever
                    await self._fail(ws, s, "closed", "the server could not open the session")
                raise
            if device_ws is None:  # over, or both ends are in the worker: this call is done
                return
            task = asyncio.current_task()
            assert task is not None
            self.live[s.id] = task
            try:
                await self._relay(ws, device_ws, s)
            finally:
                self.live.pop(s.id, None)
        finally:
            self.pending.pop(s.id, None)
            waiting.done.set()

    async def _ask_device(self, ws: WebSocket, s: RemoteSession, waiting: _Pending) -> WebSocket | None:
        """Send the device ``session_open`` and wait for its end: its WebSocket when this process
        relays, None when the worker does or when the session is over (failed, told, finished)."""
        ctx = self.ctx
        if waiting.in_worker:
            recording = None
            if s.kind == "terminal":
                folder = recordings_dir(ctx)
                folder.mkdir(parents=True, exist_ok=True)
                recording = str(folder / f"{s.id}.cast")
            self.in_worker[s.id] = _Live(s.id, s.device_id, s.user_name, s.kind, s.created_at)
            await self._to_worker(s.id, "operator", ws, kind=s.kind, recording=recording,
                                  cols=int(s.params.get("cols", 80)), rows=int(s.params.get("rows", 24)),
                                  title=f"{s.user_name} on {s.device_id}")
        device_token = "rdt_" + secrets.token_urlsafe(32)
        async with ctx.writer() as db:
            await db.execute(update(RemoteSession).where(RemoteSession.id == s.id)
                             .values(device_token_hash=digest(device_token)))
        relay_url = ctx.config.public_url.replace("http", "ws", 1) + DEVICE_RELAY_PATH + s.id
        msg = p.SessionOpen(session_id=s.id, kind=s.kind, relay_url=relay_url,  # type: ignore[arg-type]
                            token=device_token, user=s.user_name, params=s.params)
        await ctx.bus.publish(f"device.{s.device_id}.session", msgspec.json.encode(msg))
        try:
            device_ws = await asyncio.wait_for(asyncio.shield(waiting.device),
                                               ctx.config.timeouts.session_device_connect)
        except _Gone:  # the worker ended it (the operator left, an admin ended it) and reported it
            return None
        except _Refused as e:
            await self._fail(ws, s, "refused", f"the device refused: {e}")
            return None
        except TimeoutError:
            await self._fail(ws, s, "refused", "the device did not connect its end of the session in time")
            return None
        if device_ws is None:
            await self._opened(s)
        return device_ws

    async def _to_worker(self, session_id: str, side: str, ws: WebSocket, **extra: Any) -> None:
        """Hand ``ws``'s connection (not accepted) to the relay worker, with the request it is to
        answer (and, for the operator's side, what it needs to know of the session)."""
        doc = {"op": "adopt", "sid": session_id, "side": side, "request": handover.request_head(ws),
               "subprotocols": [SESSION_SUBPROTOCOL] if side == "device" else [], **extra}
        await self.worker.send(doc, handover.detach(ws))

    async def _opened(self, s: RemoteSession) -> None:
        async with self.ctx.writer() as db:
            await db.execute(update(RemoteSession).where(RemoteSession.id == s.id)
                             .values(status="open", opened_at=time.time()))

    async def _claim(self, session_id: str, token: str, who: Principal | None,
                     unauthenticated: str) -> RemoteSession | None:
        """Use the operator's token, once: refused (and audited) when it is unknown, used, expired,
        or presented by someone else than the user it was issued to."""
        ctx = self.ctx
        now = time.time()
        async with ctx.writer() as db:
            s = await db.get(RemoteSession, session_id[:32])
            why = ""
            if s is None or not hmac.compare_digest(s.token_hash, digest(token)):
                why = "unknown session or wrong token"
            elif s.status != "pending":
                why = "the token was already used"
            elif s.expires_at < now:
                why = "the token expired"
            elif who is None:  # why the socket's credentials were refused
                why = unauthenticated or "no credentials"
            elif who.user_id != s.user_id:
                why = "the token was issued to another user"
            elif not who.may_access_devices:
                why = f"{who.name} does not have the remote-access permission"
            if why:
                await ctx.audit(db, who.name if who else "anonymous", "session.refused",
                                s.device_id if s else "", {"session": session_id[:32], "reason": why})
                log.warning("session %s refused: %s", session_id[:32], why)
                return None
            assert s is not None
            result = await db.execute(update(RemoteSession).where(RemoteSession.id == s.id,
                                                                  RemoteSession.status == "pending")
                                      .values(status="connecting", replica=ctx.config.replica_id))
            if result.rowcount != 1:  # type: ignore[attr-defined]  # a concurrent use of the same token
                return None
        return s

    async def _fail(self, ws: WebSocket, s: RemoteSession, status: str, reason: str) -> None:
        if s.id in self.in_worker:  # the worker tells the operator, then reports the session closed
            with contextlib.suppress(ConnectionError, OSError):
                await self.worker.send({"op": "fail", "sid": s.id, "status": status, "reason": reason,
                                        "code": CLOSE_REFUSED})
            return
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps({"type": "error", "message": reason}))
            await ws.close(CLOSE_REFUSED, reason[:120])
        await self._finish(s, status, reason, 0, 0, None)

    async def _finish(self, s: RemoteSession | _Live, status: str, reason: str, to_device: int, from_device: int,
                      recording: str | None) -> None:
        ctx = self.ctx
        now = time.time()
        async with ctx.writer() as db:
            await db.execute(update(RemoteSession).where(RemoteSession.id == s.id).values(
                status=status, reason=reason[:2000], closed_at=now, bytes_to_device=to_device,
                bytes_from_device=from_device, recording=recording))
            await ctx.audit(db, f"user:{s.user_name}", "session.close", s.device_id,
                            {"session": s.id, "kind": s.kind, "status": status, "reason": reason[:200],
                             "bytes_to_device": to_device, "bytes_from_device": from_device,
                             "seconds": round(now - s.created_at, 3)})

    async def _relay(self, op: WebSocket, dev: WebSocket, s: RemoteSession) -> None:
        """Relay in this process (an operator's end that could not be handed over)."""
        ctx = self.ctx
        now = time.time()
        await self._opened(s)
        cast: Asciicast | None = None
        recording = None
        out = None
        if s.kind == "terminal":
            folder = recordings_dir(ctx)
            folder.mkdir(parents=True, exist_ok=True)
            recording = f"{s.id}.cast"
            out = (folder / recording).open("w", encoding="utf-8")
            cast = Asciicast(out, int(s.params.get("cols", 80)), int(s.params.get("rows", 24)), now,
                             title=f"{s.user_name} on {s.device_id}")
            cast.header()
        counts = {"to": 0, "from": 0}
        status, reason = "closed", ""
        stopping = False

        async def pump(src: WebSocket, dst: WebSocket, key: str) -> str:
            while True:
                message = await src.receive()
                if message["type"] == "websocket.disconnect":
                    return "the device closed the session" if key == "from" else "the operator closed the session"
                data = message.get("bytes")
                text = message.get("text")
                size = len(data) if data is not None else len((text or "").encode())
                if size > MAX_FRAME:
                    raise _TooBig(f"a message of {size} bytes (the limit is {MAX_FRAME})")
                counts[key] += size
                if data is not None:
                    await dst.send_bytes(data)
                    if cast is not None and key == "from":
                        cast.output(time.time(), data)
                elif text is not None:
                    await dst.send_text(text)
                    if cast is not None and key == "to":
                        _record_control(cast, text)

        tasks = [asyncio.create_task(pump(op, dev, "to")), asyncio.create_task(pump(dev, op, "from"))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop()
            exc = first.exception()
            if isinstance(exc, _TooBig):
                status, reason = "closed", str(exc)
                for w in (op, dev):
                    with contextlib.suppress(Exception):
                        await w.close(CLOSE_TOO_BIG, "message too big")
            elif exc is not None and not isinstance(exc, (WebSocketDisconnect, RuntimeError)):
                reason = f"relay error: {exc}"
            else:
                reason = first.result() if exc is None else "disconnected"
                if first is tasks[1]:  # the device went away: the operator is told, clearly
                    with contextlib.suppress(Exception):
                        await op.send_text(json.dumps({"type": "error", "message": reason}))
        except asyncio.CancelledError:
            if s.id in self.ending:
                status, reason = "ended", "ended by an administrator"
            else:  # the server is stopping: say so, then let the cancellation through
                reason, stopping = "the server is stopping", True
            with contextlib.suppress(Exception):
                await op.send_text(json.dumps({"type": "error", "message": reason}))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (op, dev):
                with contextlib.suppress(Exception):
                    await w.close()
            if out is not None:
                out.close()
            self.ending.discard(s.id)
            await asyncio.shield(self._finish(s, status, reason, counts["to"], counts["from"], recording))
        if stopping:
            raise asyncio.CancelledError

    # --- the device's side ---

    async def device(self, ws: WebSocket, session_id: str) -> None:
        """The device's WebSocket for ``session_id`` (not accepted yet): its token must be the
        one sent in ``session_open``; then it is handed to the waiting operator."""
        token = ws.headers.get("authorization", "").removeprefix("Bearer ").strip()
        waiting = self.pending.get(session_id)
        ok = waiting is not None and bool(token) and await self._device_token_ok(session_id, token)
        if not ok or waiting is None or waiting.device.done():
            await ws.close(CLOSE_UNAUTHORIZED)
            return
        if waiting.in_worker:
            if session_id not in self.in_worker or not handover.detachable(ws):
                await ws.close(CLOSE_UNAUTHORIZED)
                return
            await self._to_worker(session_id, "device", ws)
            waiting.device.set_result(None)
            return
        offered = ws.scope.get("subprotocols") or []
        await ws.accept(subprotocol=SESSION_SUBPROTOCOL if SESSION_SUBPROTOCOL in offered else None)
        waiting.device.set_result(ws)
        await waiting.done.wait()  # the operator's side relays; this keeps the socket's ASGI call alive

    async def _device_token_ok(self, session_id: str, token: str) -> bool:
        """Whether ``token`` is the device's token of ``session_id``, which is connecting. (Its
        own call: the session's row is not kept alive by the device's socket, which lives as
        long as the session.)"""
        async with self.ctx.reader() as db:
            s = await db.get(RemoteSession, session_id)
        return s is not None and s.status == "connecting" and s.device_token_hash is not None \
            and hmac.compare_digest(s.device_token_hash, digest(token))


def _record_control(cast: Asciicast, text: str) -> None:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        doc = json.loads(text)
        if doc.get("type") == "resize":
            cast.resize(time.time(), int(doc["cols"]), int(doc["rows"]))


class _Refused(Exception):
    pass


class _Gone(Exception):
    """The relay worker ended the session (and reported it) before its device came."""


class _TooBig(Exception):
    pass


async def end(ctx: ServerContext, who: Principal, session_id: str, request_id: str) -> RemoteSession:
    """An admin ends a live session, wherever it is relayed."""
    async with ctx.reader() as db:
        s = await db.get(RemoteSession, session_id)
    if s is None:
        raise NotFound(f"no session {session_id!r}")
    if s.status not in ("pending", "connecting", "open"):
        raise Conflict(f"session {session_id} is {s.status}")
    async with ctx.writer() as db:
        if s.status == "pending":  # its token was never used: it cannot be any more
            await db.execute(update(RemoteSession).where(RemoteSession.id == s.id)
                             .values(status="ended", reason="ended by an administrator", closed_at=time.time()))
        await ctx.audit(db, who, "session.end", s.device_id, {"session": s.id}, request_id)
    await ctx.bus.publish(f"session.{s.id}.end", b"")
    return s


async def recent(ctx: ServerContext, live_only: bool, limit: int) -> list[RemoteSession]:
    stmt = select(RemoteSession).order_by(RemoteSession.created_at.desc()).limit(limit)
    if live_only:
        stmt = stmt.where(RemoteSession.status.in_(["pending", "connecting", "open"]))
    async with ctx.reader() as db:
        return list((await db.scalars(stmt)).all())
