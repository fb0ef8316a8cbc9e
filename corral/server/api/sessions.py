"""Remote-access sessions (ADR 0016): terminal, port forward, file transfer.

``POST /api/v1/devices/{id}/sessions`` (an operator with the remote-access permission, or an
admin; audited) returns a single-use token, valid for a minute, for this device and this user;
the session runs over ``GET /api/v1/sessions/{sid}/ws?token=...`` (a WebSocket, with the same
user's credentials). Admins list sessions (``GET /api/v1/sessions``, ``?live=true``) and end live
ones (``POST /api/v1/sessions/{sid}/end``); a terminal's recording is
``GET /api/v1/sessions/{sid}/recording`` (asciicast v2).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from corral.errors import CorralError, Forbidden, NotFound
from corral.server import remote
from corral.server.api.deps import Admin, Ctx, Operator, principal_of, rid
from corral.server.api.views import iso
from corral.server.context import ServerContext
from corral.server.store.models import RemoteSession

router = APIRouter(tags=["remote access"])


class SessionIn(BaseModel):
    kind: Literal["terminal", "forward", "upload", "download"]
    params: dict[str, Any] = Field(default_factory=dict, description="terminal {cols, rows}; forward {host, "
                                   "port}; upload {path, size, sha256, mode}; download {path}")


class SessionCreated(BaseModel):
    id: str
    token: str = Field(description="single-use, for this device and this user, valid for a minute")
    ws_path: str = Field(description="connect a WebSocket here with ?token=")
    expires_at: str | None


class SessionOut(BaseModel):
    id: str
    device_id: str
    user: str
    kind: str
    params: dict[str, Any]
    status: str = Field(description="pending, connecting, open, closed, refused or ended")
    reason: str
    created_at: str | None
    opened_at: str | None
    closed_at: str | None
    bytes_to_device: int
    bytes_from_device: int
    recording: bool


def view(s: RemoteSession) -> SessionOut:
    return SessionOut(id=s.id, device_id=s.device_id, user=s.user_name, kind=s.kind, params=s.params, status=s.status,
                      reason=s.reason, created_at=iso(s.created_at), opened_at=iso(s.opened_at),
                      closed_at=iso(s.closed_at), bytes_to_device=s.bytes_to_device,
                      bytes_from_device=s.bytes_from_device, recording=bool(s.recording))


@router.post("/devices/{device_id}/sessions", response_model=SessionCreated, status_code=201,
             summary="Open a terminal, forward or file transfer on a device: a single-use token for its WebSocket")
async def create_session(device_id: str, body: SessionIn, ctx: Ctx, who: Operator, request: Request) -> SessionCreated:
    s, token = await remote.create(ctx, who, device_id, body.kind, body.params, rid(request))
    return SessionCreated(id=s.id, token=token, ws_path=f"/api/v1/sessions/{s.id}/ws", expires_at=iso(s.expires_at))


@router.websocket("/sessions/{session_id}/ws")
async def session_ws(ws: WebSocket, session_id: str, token: str = Query(default="", max_length=200)) -> None:
    ctx: ServerContext = ws.app.state.ctx
    who, why = None, ""
    try:
        who = await principal_of(ws, ctx)
    except CorralError as e:
        why = f"the socket's credentials were refused: {e}"  # refused by the relay, with this reason audited
    assert ctx.relay is not None  # it accepts the socket, or hands it over to the relay worker
    await ctx.relay.operator(ws, session_id, token, who, why)


@router.get("/sessions", response_model=list[SessionOut], summary="Remote-access sessions, newest first (admin)")
async def list_sessions(ctx: Ctx, _: Admin, live: bool = False,
                        limit: int = Query(default=100, ge=1, le=1000)) -> list[SessionOut]:
    return [view(s) for s in await remote.recent(ctx, live, limit)]


@router.post("/sessions/{session_id}/end", response_model=SessionOut, summary="End a live session (admin)")
async def end_session(session_id: str, ctx: Ctx, who: Admin, request: Request) -> SessionOut:
    return view(await remote.end(ctx, who, session_id, rid(request)))


@router.get("/sessions/{session_id}/recording", summary="A terminal session's recording (asciicast v2)",
            response_class=FileResponse)
async def recording(session_id: str, ctx: Ctx, who: Operator) -> FileResponse:
    async with ctx.reader() as db:
        s = await db.get(RemoteSession, session_id)
    if s is None or not s.recording:
        raise NotFound(f"no recording of session {session_id!r}")
    if who.role != "admin" and not (who.may_access_devices and who.user_id == s.user_id):
        raise Forbidden("recordings are for admins and the session's own user")
    return FileResponse(remote.recordings_dir(ctx) / s.recording, media_type="application/x-asciicast",
                        filename=f"{s.id}.cast")
