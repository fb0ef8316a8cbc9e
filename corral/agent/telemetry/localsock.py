"""Custom application metrics and events, pushed over a local UNIX socket (DESIGN §6).

Any program on the device can report its own numbers and happenings to the agent, statsd-style,
one message per line (``\\n``, UTF-8, at most 4096 bytes without the newline)::

    queue_depth:7|g                 gauge: the last value of the interval is reported
    jobs_done:1|c                   counter: the values of the interval are summed
    event:warning|disk almost full  an event; severity one of debug info warning error critical

From a shell: ``echo "queue_depth:7|g" | nc -U /run/corral-agent/app.sock`` (or socat). A client
may keep its connection open and write many lines; many clients may write at once. The agent
never answers.

Metric names are stored under ``app.`` — ``queue_depth`` becomes ``app.queue_depth`` — so an
application can never overwrite a system metric such as ``cpu.percent`` that rules and rollout
health gates rely on (``cpu.percent:0|g`` is ``app.cpu.percent``). The full name must be a valid
metric name (:func:`corral.protocol.valid_metric_name`: dot-separated segments of letters, digits
and ``_``, at most 128 characters). Values are decimal numbers (``7``, ``-0.5``, ``1e6``); a sign
is part of the value, not statsd's relative gauge. ``event`` is reserved: ``event:...`` lines are
events. Event messages are at most 1024 characters, without control characters; events carry
source ``app`` and the time the agent received them.

Every interval the agent calls :meth:`AppMetrics.drain`, which returns the interval's metrics —
one value per name: a gauge's last value, a counter's sum — and its events, and starts a new
interval. A name that saw nothing in an interval reports nothing (a counter does not report 0).

Bad input never crashes the agent or disturbs other clients: an invalid line, a NaN or infinite
value, an unknown type (statsd's ``ms``, ``s``, sample rates and tags are not supported), a line
over 4096 bytes, more than ``max_names`` distinct names or ``max_events`` events in one interval —
each is dropped and counted in :attr:`AppMetrics.rejected`, and logged at most once a minute with
the last reason.

Parsing (:func:`parse_line`) is pure; :class:`AppMetrics` aggregates; :func:`serve_local_socket`
is the asyncio server around them. The socket file is mode 0660: put it in a directory owned by
the agent's group to decide who may write to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from corral import protocol

log = logging.getLogger("corral.agent.telemetry.localsock")

PREFIX = "app."
MAX_LINE_BYTES = 4096
MAX_MESSAGE_CHARS = 1024
SOCKET_MODE = 0o660
READ_CHUNK = 65536
_READ_LIMIT = MAX_LINE_BYTES + 1  # room for the "\r" of a CRLF line; parse_line checks exactly
LOG_EVERY = 60.0  # seconds between two "rejected lines" log messages

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Gauge:
    name: str  # with the app. prefix
    value: float


@dataclass(frozen=True, slots=True)
class Counter:
    name: str  # with the app. prefix
    value: float


@dataclass(frozen=True, slots=True)
class AppEvent:
    severity: protocol.Severity
    message: str


def parse_line(line: bytes) -> Gauge | Counter | AppEvent:
    """One message, without or with its line ending. Raises ValueError saying what is wrong."""
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if text.startswith("event:"):
        return _parse_event(text[len("event:") :])
    name, sep, rest = text.partition(":")
    if not sep:
        raise ValueError("expected NAME:VALUE|TYPE or event:SEVERITY|MESSAGE")
    value_text, sep, kind = rest.partition("|")
    if not sep:
        raise ValueError("missing |TYPE")
    full = PREFIX + name.strip()
    if not protocol.valid_metric_name(full):
        raise ValueError(f"invalid metric name {name[:64]!r}")
    value_text = value_text.strip()
    if not _NUMBER.fullmatch(value_text):
        raise ValueError(f"value {value_text[:32]!r} is not a number")
    value = float(value_text)
    if not math.isfinite(value):
        raise ValueError("value out of range")
    kind = kind.strip()
    if kind == "g":
        return Gauge(full, value)
    if kind == "c":
        return Counter(full, value)
    raise ValueError(f"unknown type {kind[:16]!r} (g or c)")


def _parse_event(rest: str) -> AppEvent:
    severity, sep, message = rest.partition("|")
    severity = severity.strip()
    if not sep:
        raise ValueError("expected event:SEVERITY|MESSAGE")
    if severity not in protocol.SEVERITIES:
        raise ValueError(f"unknown severity {severity[:16]!r} ({', '.join(protocol.SEVERITIES)})")
    message = message.strip()
    if not message:
        raise ValueError("empty event message")
    if len(message) > MAX_MESSAGE_CHARS:
        raise ValueError(f"event message longer than {MAX_MESSAGE_CHARS} characters")
    if _CONTROL.search(message):
        raise ValueError("control characters in event message")
    return AppEvent(cast(protocol.Severity, severity), message)


class AppMetrics:
    """The current interval's app metrics and events. Use from one thread (the event loop)."""

    def __init__(
        self,
        max_names: int = 1000,
        max_events: int = 100,
        *,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_names = max_names
        self.max_events = max_events
        #: lines taken into an interval since start
        self.accepted = 0
        #: lines dropped since start (invalid, over a bound, over-long, too many clients)
        self.rejected = 0
        self.last_reason = ""
        self._wall = wall_clock
        self._mono = monotonic
        self._gauges: dict[str, float] = {}
        self._counters: dict[str, float] = {}
        self._events: list[protocol.Event] = []
        self._logged_at: float | None = None
        self._rejected_logged = 0

    def record_line(self, line: bytes) -> None:
        if not line.strip():
            return  # a blank line is nothing, not an error
        try:
            item = parse_line(line)
        except ValueError as exc:
            self.reject(str(exc))
            return
        self.record(item)

    def record(self, item: Gauge | Counter | AppEvent) -> None:
        if isinstance(item, AppEvent):
            if len(self._events) >= self.max_events:
                self.reject(f"more than {self.max_events} events in one interval")
                return
            ts = int(self._wall() * 1000)
            self._events.append(protocol.Event(ts=ts, severity=item.severity, source="app", message=item.message))
            self.accepted += 1
            return
        mine, other = (self._gauges, self._counters) if isinstance(item, Gauge) else (self._counters, self._gauges)
        if item.name in other:
            self.reject(f"{item.name} is used as both a gauge and a counter")
            return
        if item.name not in mine and len(self._gauges) + len(self._counters) >= self.max_names:
            self.reject(f"more than {self.max_names} metric names in one interval")
            return
        if isinstance(item, Gauge):
            mine[item.name] = item.value
        else:
            total = mine.get(item.name, 0.0) + item.value
            if not math.isfinite(total):
                self.reject(f"{item.name}: counter overflow")
                return
            mine[item.name] = total
        self.accepted += 1

    def reject(self, reason: str) -> None:
        """Count a dropped line; log (at most once every minute) how many and the last reason."""
        self.rejected += 1
        self.last_reason = reason
        now = self._mono()
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            n = self.rejected - self._rejected_logged
            log.warning("app metrics: rejected %d line(s) since the last report; last: %s", n, reason)
            self._logged_at = now
            self._rejected_logged = self.rejected

    def drain(self, now_ms: int) -> tuple[list[tuple[str, float]], list[protocol.Event]]:
        """The interval's ``(name, value)`` pairs (stamp them ``now_ms``) and events; starts a new
        interval. An event is never stamped later than ``now_ms`` (the clock may have stepped)."""
        values = [*self._gauges.items(), *self._counters.items()]
        events = self._events
        for i, ev in enumerate(events):
            if ev.ts > now_ms:
                events[i] = protocol.Event(ts=now_ms, severity=ev.severity, source=ev.source, message=ev.message)
        self._gauges, self._counters, self._events = {}, {}, []
        return values, events


# --- the socket -------------------------------------------------------------------------------


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)  # a live server with a full backlog would otherwise block the start
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # nobody listens: a stale file
        except OSError:
            return True  # cannot tell (a timeout, no permission): do not take it over
    return True


def _bind(path: Path) -> socket.socket:
    """A listening-ready socket at ``path`` that is 0660 from the moment it is reachable."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket; not replacing it")
        if _socket_in_use(path):
            raise OSError(f"{path} is in use by another process (another agent?)")
        # else: stale, left by an agent that died; the rename below replaces it
    # Bind under a temporary name, set the mode, then rename into place: the socket never
    # exists at ``path`` with whatever permissions the umask would have given it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, SOCKET_MODE)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return sock


async def serve_local_socket(path: Path, sink: AppMetrics, max_clients: int = 64) -> asyncio.AbstractServer:
    """Listen on the UNIX socket ``path`` and feed every line clients write into ``sink``.

    A stale socket file (left by an agent that died) is replaced; a live one, or a file that is
    not a socket, raises OSError. Close the returned server to stop; the socket file stays until
    the next start replaces it.
    """
    clients = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal clients
        if clients >= max_clients:
            sink.reject(f"more than {max_clients} clients at once")
            writer.close()
            return
        clients += 1
        try:
            await _read_lines(reader, sink)
        except (ConnectionError, OSError):
            pass  # a client that went away mid-line
        finally:
            clients -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    path = Path(path)
    sock = _bind(path)
    try:
        return await asyncio.start_unix_server(handle, sock=sock)
    except BaseException:
        sock.close()
        raise


async def _read_lines(reader: asyncio.StreamReader, sink: AppMetrics) -> None:
    """Split the byte stream into lines with a bounded buffer.

    A line that grows past the limit is counted once and then skipped up to its newline, so no
    tail of it is ever mistaken for a line of its own.
    """
    buf = bytearray()
    discarding = False
    while chunk := await reader.read(READ_CHUNK):
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            if discarding:
                discarding = False
            elif len(buf) + nl - start > _READ_LIMIT:
                sink.reject(f"line longer than {MAX_LINE_BYTES} bytes")
            else:
                buf += chunk[start:nl]
                sink.record_line(bytes(buf))
            buf.clear()
            start = nl + 1
        if not discarding and start < len(chunk):
            buf += chunk[start:]
            if len(buf) > _READ_LIMIT:
                sink.reject(f"line longer than {MAX_LINE_BYTES} bytes")
                buf.clear()
                discarding = True
    if buf and not discarding:
        sink.record_line(bytes(buf))  # the last line may come without its newline
