"""Taking a WebSocket's connection away from the ASGI server before its handshake, so that
another process can answer it (the relay worker, ADR 0016).

ASGI has no way to do this, so it is done here, in one place, against the ASGI server the
``corral server`` command runs: uvicorn with its ``websockets-sansio`` implementation
(``corral.server.main``). :class:`corral.server.app.DeviceSurface` puts that implementation's
connection object into the scope under :data:`CONN_KEY`; :func:`detach` duplicates the
connection's socket, tells uvicorn that the request is answered (it must never write to it
again) and drops uvicorn's copy of the descriptor. Under any other server :func:`detachable` is
False and sessions are relayed in the server's own process, as before.
"""

from __future__ import annotations

import os
import socket
from typing import Any

#: the scope key under which the ASGI server's connection object is passed down
CONN_KEY = "corral.connection"


def _conn(ws: Any) -> Any:
    scope = getattr(ws, "scope", None)
    if not isinstance(scope, dict):
        return None
    conn = scope.get(CONN_KEY)
    # uvicorn's WebSocketsSansIOProtocol: its transport, and whether it has answered the request
    if conn is None or getattr(conn, "transport", None) is None or not hasattr(conn, "handshake_complete"):
        return None
    return conn


def detachable(ws: Any) -> bool:
    """Whether ``ws`` is a WebSocket whose connection :func:`detach` can take (not answered yet)."""
    conn = _conn(ws)
    return (conn is not None and not conn.handshake_complete and not conn.transport.is_closing()
            and getattr(conn, "scheme", "") == "ws")  # TLS ended here would have to move along with it


def request_head(ws: Any) -> str:
    """The HTTP request of ``ws`` as it came (the new owner answers it), as a latin-1 string."""
    scope = ws.scope
    target = scope.get("raw_path") or scope.get("path", "/").encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    lines = [b"GET " + target + b" HTTP/1.1"] + [k + b": " + v for k, v in scope.get("headers", [])]
    return (b"\r\n".join(lines) + b"\r\n\r\n").decode("latin-1")


def detach(ws: Any) -> socket.socket:
    """The connection of ``ws`` (not accepted yet) as a socket of its own; the ASGI server lets
    go of it. Raises ``RuntimeError`` when it cannot (see :func:`detachable`)."""
    if not detachable(ws):
        raise RuntimeError("this WebSocket's connection cannot be handed over")
    conn = _conn(ws)
    transport = conn.transport
    transport.pause_reading()
    raw = transport.get_extra_info("socket")
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    # uvicorn must neither answer the handshake nor send a close: the request is someone else's
    conn.handshake_complete = True
    conn.close_sent = True
    transport.abort()  # closes uvicorn's descriptor only: the connection lives on in ``sock``
    return sock
