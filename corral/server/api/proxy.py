"""A device's local web UI through the server (ADR 0018): ``/devices/{id}/proxy/{port}/{path}``,
any method and WebSocket, outside ``/api/v1`` (it serves the device's pages, not the API).

Open it with the console's login (a page of the console links to it; the browser is sent on to
the page's capability URL, ``/devices/{id}/proxy/{port}/~CAP/``) or with an API token
(``Authorization: Bearer``, served directly). The device's port is reached as ``localhost:PORT``
on the device, through a ``forward`` session (the agent's ``[remote] allow`` decides).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import Response

from corral.server import proxy

router = APIRouter(tags=["remote access"])

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@router.api_route("/devices/{device_id}/proxy/{port}/{path:path}", methods=METHODS, include_in_schema=False)
async def proxy_http(request: Request, device_id: str, port: str, path: str) -> Response:
    return await proxy.http(request, device_id, port, path)


@router.websocket("/devices/{device_id}/proxy/{port}/{path:path}")
async def proxy_ws(ws: WebSocket, device_id: str, port: str, path: str) -> None:
    await proxy.websocket(ws, device_id, port, path)
