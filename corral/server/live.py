"""Live views for the web console: server-sent events carrying a page's state as it changes.

A page names what it shows (a function that reads it from the database and returns a JSON-able
value); :func:`sse` reads it every ``interval`` seconds and sends it only when it changed, so an
idle page costs one small query per interval and no bytes. One mechanism for every live page
(the dashboard, a rollout's progress, a device's presence): the browser's ``EventSource``
reconnects by itself, and each event carries the whole state, so a reconnect loses nothing.
Each stream ends after ``max_seconds`` (the browser reconnects), so that a forgotten tab does
not hold a response open for days.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

Snapshot = Callable[[], Awaitable[Any]]

#: the browser waits this long before reconnecting a stream that ended (``retry:``, ms)
RETRY_MS = 2000


def event(data: Any, name: str = "state") -> bytes:
    """One server-sent event: ``data`` as JSON on one line."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()


async def changes(snapshot: Snapshot, interval: float, max_seconds: float,
                  disconnected: Callable[[], Awaitable[bool]],
                  allowed: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[bytes]:
    """The events of one stream: the state at once, then each time it differs from the last sent,
    and a comment every 15 s so that proxies keep the connection. The stream ends as soon as
    ``allowed`` says no (the viewer logged out, lost the role): its reconnect then meets the login."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    last: Any = object()
    deadline = time.monotonic() + max_seconds
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and not await disconnected():
        if allowed is not None and not await allowed():
            return
        state = await snapshot()
        if state != last:
            last = state
            quiet_since = time.monotonic()
            yield event(state)
        elif time.monotonic() - quiet_since > 15:
            quiet_since = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(interval)


def sse(request: Request, snapshot: Snapshot, interval: float = 1.0, max_seconds: float = 300.0,
        allowed: Callable[[], Awaitable[bool]] | None = None) -> StreamingResponse:
    """A ``text/event-stream`` response of ``snapshot``'s changes (see :func:`changes`)."""
    return StreamingResponse(changes(snapshot, interval, max_seconds, request.is_disconnected, allowed),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
