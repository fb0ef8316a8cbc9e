"""``corral terminal``, ``corral forward``, ``corral cp`` and ``corral session list|end|recording``
(DESIGN §8, ADR 0016).

Each opens a session (``POST /api/v1/devices/ID/sessions``: a single-use token) and runs it over
a WebSocket to the server, which relays it to the device. Binary messages are the stream's bytes,
text messages JSON controls (``resize``, ``exit``, ``error``, ``eof``, ``file``, ``done``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from corral.cli import config as cli_config
from corral.cli.common import JsonOpt, ServerOpt, TokenOpt, client
from corral.cli.output import emit_json, table
from corral.core.remote import parse_forward
from corral.errors import CorralError, InvalidInput

CHUNK = 32 * 1024
MAX_MESSAGE = 1 << 20


class SessionError(CorralError):
    """The session could not run, or ended with an error the device or server reported."""


def _ws_url(server: str, path: str, token: str) -> str:
    base = server.replace("https://", "wss://", 1) if server.startswith("https://") else \
        server.replace("http://", "ws://", 1)
    return f"{base}{path}?token={token}"


def open_session(server: str | None, token: str | None, device: str, kind: str,
                 params: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(the WebSocket URL with its single-use token, the headers to present)."""
    cfg = cli_config.resolve(server, token)
    doc = client(server, token).post(f"/devices/{device}/sessions", {"kind": kind, "params": params})
    return _ws_url(cfg.server.rstrip("/"), doc["ws_path"], doc["token"]), {"Authorization": f"Bearer {cfg.token}"}


def _connect(url: str, headers: dict[str, str]) -> Any:
    from websockets.asyncio.client import connect

    # no permessage-deflate: a forward carries mostly compressed or encrypted bytes, and deflate
    # cut a tunnel from ~380 to ~34 MB/s (bench/relay) for nothing
    return connect(url, additional_headers=headers, max_size=MAX_MESSAGE, open_timeout=20,
                   ping_interval=20, ping_timeout=20, compression=None)


def _control(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _error(doc: dict[str, Any]) -> SessionError:
    return SessionError(str(doc.get("message") or "the session failed"))


# --- terminal ---------------------------------------------------------------------------------


async def _terminal(url: str, headers: dict[str, str]) -> int:
    import termios
    import tty

    loop = asyncio.get_running_loop()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if interactive else None
    code = 255
    async with _connect(url, headers) as ws:
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)
        reading = True

        def readable() -> None:
            nonlocal reading
            data = os.read(stdin, CHUNK)
            inbox.put_nowait(data or None)  # never full: reading stops when it is
            if inbox.full() or not data:
                loop.remove_reader(stdin)  # backpressure: the keys are read again once sent
                reading = False

        async def keys() -> None:
            nonlocal reading
            while True:
                data = await inbox.get()
                if data is None:
                    await ws.send(json.dumps({"type": "eof"}))
                    return
                await ws.send(data)
                if not reading:
                    loop.add_reader(stdin, readable)
                    reading = True

        resizes: set[asyncio.Task[None]] = set()

        def resized() -> None:
            size = os.get_terminal_size(stdout)
            t = asyncio.ensure_future(ws.send(json.dumps({"type": "resize", "cols": size.columns, "rows": size.lines})))
            resizes.add(t)
            t.add_done_callback(resizes.discard)

        try:
            if saved is not None:
                tty.setraw(stdin)
                loop.add_signal_handler(signal.SIGWINCH, resized)
            loop.add_reader(stdin, readable)
            sender = asyncio.create_task(keys())
            async for message in ws:
                if isinstance(message, bytes):
                    os.write(stdout, message)
                    continue
                doc = _control(message)
                if doc.get("type") == "exit":
                    code = int(doc.get("code", 0))
                    break
                if doc.get("type") == "error":
                    raise _error(doc)
            else:
                raise SessionError("the session ended without an exit status")
            sender.cancel()
        finally:
            with contextlib.suppress(ValueError):
                loop.remove_reader(stdin)
            if saved is not None:
                loop.remove_signal_handler(signal.SIGWINCH)
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    return code


def terminal(
    device: Annotated[str, typer.Argument(help="device id")],
    server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """A shell on the device, like ssh: raw mode, window size, its exit status as ours."""
    cols, rows = (os.get_terminal_size() if sys.stdout.isatty() else os.terminal_size((80, 24)))
    url, headers = open_session(server, token, device, "terminal", {"cols": cols, "rows": rows})
    raise typer.Exit(asyncio.run(_terminal(url, headers)))


# --- forward ------------------------------------------------------------------------------------


async def _pump_tcp(server: str | None, token: str | None, device: str, host: str, port: int,
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        url, headers = await asyncio.to_thread(open_session, server, token, device, "forward",
                                               {"host": host, "port": port})
        async with _connect(url, headers) as ws:
            async def up() -> None:
                while data := await reader.read(CHUNK):
                    await ws.send(data)
                await ws.send(json.dumps({"type": "eof"}))

            async def down() -> None:
                async for message in ws:
                    if isinstance(message, bytes):
                        writer.write(message)
                        await writer.drain()
                    else:
                        doc = _control(message)
                        if doc.get("type") == "eof":
                            if writer.can_write_eof():
                                writer.write_eof()
                        elif doc.get("type") == "error":
                            print(f"error: forward to {host}:{port}: {doc.get('message')}", file=sys.stderr)
                            return

            tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
            await tasks[1]
            tasks[0].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    except (CorralError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    finally:
        writer.close()


async def _forward(server: str | None, token: str | None, device: str, spec: str) -> None:
    f = parse_forward(spec)
    listener = await asyncio.start_server(
        lambda r, w: _pump_tcp(server, token, device, f.host, f.remote_port, r, w), f.bind, f.local_port)
    print(f"forwarding {f.bind}:{f.local_port} → {device} {f.host}:{f.remote_port} (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    async with listener:
        await listener.serve_forever()


def forward(
    device: Annotated[str, typer.Argument(help="device id")],
    spec: Annotated[str, typer.Argument(help="[BIND:]LPORT:HOST:RPORT, e.g. 8080:localhost:80")],
    server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Forward a local TCP port to HOST:RPORT as seen from the device (each connection its own session)."""
    parse_forward(spec)  # a bad spec is an error before anything is opened
    client(server, token)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_forward(server, token, device, spec))


# --- cp ---------------------------------------------------------------------------------------------


def _split_remote(arg: str) -> tuple[str, str] | None:
    device, sep, path = arg.partition(":")
    if sep and device and path.startswith("/") and "/" not in device:
        return device, path
    return None


def _progress(what: str) -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn(what), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console,
                    transient=True, disable=not console.is_terminal)


async def _upload(url: str, headers: dict[str, str], local: Path, size: int) -> dict[str, Any]:
    async with _connect(url, headers) as ws:
        with _progress(f"{local.name} →") as bar, local.open("rb") as f:
            task = bar.add_task("", total=size)
            while chunk := f.read(CHUNK):
                await ws.send(chunk)
                bar.advance(task, len(chunk))
        await ws.send(json.dumps({"type": "eof"}))
        async for message in ws:
            doc = _control(message) if isinstance(message, str) else {}
            if doc.get("type") == "done":
                return doc
            if doc.get("type") == "error":
                raise _error(doc)
    raise SessionError("the device closed the session before confirming the copy")


async def _download(url: str, headers: dict[str, str], local: Path) -> dict[str, Any]:
    tmp = local.with_name(f".{local.name}.corral-part")
    digest = hashlib.sha256()
    size, got = None, 0
    try:
        async with _connect(url, headers) as ws:
            with _progress(f"→ {local.name}") as bar, tmp.open("wb") as out:
                task = bar.add_task("", total=None)
                async for message in ws:
                    if isinstance(message, bytes):
                        out.write(message)
                        digest.update(message)
                        got += len(message)
                        bar.advance(task, len(message))
                        if size is not None and got > size:
                            raise SessionError(f"the device sent more than the {size} bytes it announced")
                        continue
                    doc = _control(message)
                    if doc.get("type") == "file":
                        size = int(doc["size"])
                        bar.update(task, total=size)
                    elif doc.get("type") == "eof":
                        if got != size or doc.get("sha256") != digest.hexdigest():
                            raise SessionError("the copy does not match what the device sent (size or sha256)")
                        out.flush()
                        os.fsync(out.fileno())
                        break
                    elif doc.get("type") == "error":
                        raise _error(doc)
                else:
                    raise SessionError("the device closed the session before the end of the file")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return {"bytes": got, "sha256": digest.hexdigest()}


def cp(
    src: Annotated[str, typer.Argument(help="a local path, or DEVICE:/absolute/path")],
    dst: Annotated[str, typer.Argument(help="a local path, or DEVICE:/absolute/path")],
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Copy a file to or from a device (checked by sha256; written atomically on both sides)."""
    remote_src, remote_dst = _split_remote(src), _split_remote(dst)
    if (remote_src is None) == (remote_dst is None):
        raise InvalidInput("one of SRC and DST must be DEVICE:/absolute/path, the other a local path")
    if remote_dst is not None:
        local = Path(src)
        if not local.is_file():
            raise InvalidInput(f"{src}: not a file")
        digest = hashlib.sha256()
        with local.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        size = local.stat().st_size
        device, path = remote_dst
        url, headers = open_session(server, token, device, "upload", {"path": path, "size": size,
                                                                       "sha256": digest.hexdigest(),
                                                                       "mode": local.stat().st_mode & 0o777})
        doc = asyncio.run(_upload(url, headers, local, size))
    else:
        assert remote_src is not None
        device, path = remote_src
        local = Path(dst)
        if local.is_dir():
            local = local / Path(path).name
        url, headers = open_session(server, token, device, "download", {"path": path})
        doc = asyncio.run(_download(url, headers, local))
    if json_out:
        emit_json(doc)
    else:
        print(f"{doc.get('bytes')} bytes, sha256 {doc.get('sha256')}")


# --- session list / end / recording -------------------------------------------------------------

session_app = typer.Typer(help="Remote-access sessions: the audit trail, live ones, recordings.", no_args_is_help=True)

SESSION_COLUMNS: list[tuple[str, Any]] = [
    ("ID", lambda s: s["id"]),
    ("DEVICE", lambda s: s["device_id"]),
    ("USER", lambda s: s["user"]),
    ("KIND", lambda s: s["kind"]),
    ("STATUS", lambda s: s["status"]),
    ("STARTED", lambda s: s["created_at"]),
    ("TO DEVICE", lambda s: s["bytes_to_device"]),
    ("FROM DEVICE", lambda s: s["bytes_from_device"]),
    ("REASON", lambda s: s["reason"]),
]


@session_app.command("list")
def session_list(live: Annotated[bool, typer.Option("--live", help="only sessions not ended")] = False,
                 limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
                 json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Remote-access sessions, newest first (admin)."""
    items = client(server, token).get("/sessions", live=str(live).lower(), limit=limit)
    if json_out:
        emit_json(items)
    else:
        table(items, SESSION_COLUMNS)


@session_app.command("end")
def session_end(session_id: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """End a live session (admin)."""
    doc = client(server, token).post(f"/sessions/{session_id}/end", {})
    print(f"session {doc['id']} ended")


@session_app.command("recording")
def session_recording(session_id: str,
                      out: Annotated[Path, typer.Option("--out", "-o", help="where to write the .cast file")],
                      server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Save a terminal session's recording (asciicast v2: play it with `asciinema play`)."""
    data = client(server, token).get_bytes(f"/sessions/{session_id}/recording")
    out.write_bytes(data)
    print(f"{out}: {len(data)} bytes")
