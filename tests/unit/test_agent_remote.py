"""Remote access on the agent (issue 6): terminals on a real PTY with /bin/sh, forwards to a real
TCP server on 127.0.0.1, file transfer in tmp_path, the [remote] config section, and the agent
leaving all of it out of its process until a session needs it (ADR 0007).

Each session runs over one end of an in-memory channel pair; the test plays the client on the
other end. Waits are bounded by a generous guard (a hang fails the test); the one timing check
(the event loop's responsiveness under terminal output) has a wide margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import psutil
import pytest

from corral.agent.config import RemoteConfig, config_from_dict
from corral.agent.remote.channel import ChannelClosed, MemoryChannel, RemoteError, memory_pair
from corral.agent.remote.files import run_download, run_upload
from corral.agent.remote.forward import Relayed, allowed_addresses, run_forward
from corral.agent.remote.terminal import SessionLimit, account_for, run_terminal
from corral.core.remote import TargetPolicy
from corral.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]
GUARD = 15.0  # seconds before a stuck test gives up (not a timing assertion)
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro, GUARD)

    return asyncio.run(guarded())


class Client:
    """The test's end of a session: collects stream data and control messages."""

    def __init__(self, ch: MemoryChannel) -> None:
        self.ch = ch
        self.data = bytearray()
        self.controls: list[dict[str, Any]] = []
        self._seen = 0

    async def _one(self) -> None:
        msg = await self.ch.recv()
        if isinstance(msg, bytes):
            self.data += msg
        else:
            self.controls.append(json.loads(msg))

    async def expect(self, pattern: bytes) -> re.Match[bytes]:
        """The next match of ``pattern`` in the output after the previous match."""
        while (m := re.compile(pattern).search(self.data, self._seen)) is None:
            await self._one()
        self._seen = m.end()
        return m

    async def control(self, kind: str) -> dict[str, Any]:
        """The first control message of ``kind`` (reading on until it comes)."""
        while True:
            for c in self.controls:
                if c["type"] == kind:
                    return c
            await self._one()

    async def drain(self) -> None:
        """Everything until the session closes the channel."""
        try:
            while True:
                await self._one()
        except ChannelClosed:
            pass

    async def send(self, data: bytes | str | dict[str, Any]) -> None:
        await self.ch.send(json.dumps(data) if isinstance(data, dict) else data)


def session(maxsize: int = 8) -> tuple[MemoryChannel, Client]:
    agent_end, client_end = memory_pair(maxsize)
    return agent_end, Client(client_end)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def eventually(pred: Callable[[], bool], what: str) -> None:
    for _ in range(int(GUARD / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- the channel ------------------------------------------------------------------------------


def test_the_memory_channel_is_bounded_and_delivers_what_was_sent_before_a_close() -> None:
    async def scenario() -> None:
        a, b = memory_pair(2)
        await a.send(b"1")
        await a.send("2")
        third = asyncio.create_task(a.send(b"3"))
        await asyncio.sleep(0.05)
        assert not third.done() and b.pending() == 2  # a full inbox makes send wait
        assert await b.recv() == b"1"
        await third
        await a.close(1008, "why")
        assert (await b.recv(), await b.recv()) == ("2", b"3")
        with pytest.raises(ChannelClosed):
            await b.recv()
        with pytest.raises(ChannelClosed):
            await b.send(b"x")
        with pytest.raises(ChannelClosed):
            await a.recv()
        assert b.peer_closed == (1008, "why")
        await a.close()  # idempotent: the first close stays
        assert b.peer_closed == (1008, "why")

    run(scenario())


# --- the [remote] config section --------------------------------------------------------------


def test_remote_config_defaults(tmp_path: Path) -> None:
    cfg = config_from_dict({"server": "https://s", "state_dir": str(tmp_path)})
    r = cfg.remote
    assert (r.terminal, r.forward, r.files) == (True, True, True)
    assert (r.shell, r.user, r.max_sessions, r.idle_timeout) == ("/bin/sh", None, 4, 900.0)
    assert r.dirs == (tmp_path / "files",)
    assert (r.max_file_bytes, r.chunk_bytes) == (64 * 1024 * 1024, 32 * 1024)
    assert r.allow is None  # TargetPolicy's default: the loopback only
    assert TargetPolicy().allows("127.0.0.1", 22) and not TargetPolicy().allows("10.0.0.1", 22)


def test_remote_config_from_toml_values() -> None:
    cfg = config_from_dict({"server": "https://s", "remote": {
        "terminal": False, "shell": "/bin/bash", "user": "pi", "max_sessions": 2, "idle_timeout": 60,
        "allow": ["localhost:8080", "10.0.0.0/8:*"], "dirs": ["/data", "/tmp/x"], "max_file_bytes": 1000,
        "chunk_bytes": 4096}})
    r = cfg.remote
    assert (r.terminal, r.shell, r.user, r.max_sessions, r.idle_timeout) == (False, "/bin/bash", "pi", 2, 60.0)
    assert r.allow == ("localhost:8080", "10.0.0.0/8:*")
    assert r.dirs == (Path("/data"), Path("/tmp/x"))


@pytest.mark.parametrize(("remote", "message"), [
    ({"shell": "bash"}, "remote.shell must be an absolute path"),
    ({"user": ""}, "remote.user must be a user name"),
    ({"max_sessions": 0}, "remote.max_sessions must be between 1 and 1000"),
    ({"idle_timeout": 0}, "remote.idle_timeout must be > 0"),
    ({"idle_timeout": float("inf")}, "remote.idle_timeout must be a finite number"),
    ({"allow": ["localhost"]}, "remote.allow: forward target 'localhost' must be HOST:PORT"),
    ({"allow": ["10.0.0.0/33:*"]}, "is not a network"),
    ({"dirs": ["relative/dir"]}, "remote.dirs must be absolute paths"),
    ({"max_file_bytes": -1}, "remote.max_file_bytes must be >= 0"),
    ({"chunk_bytes": 100}, "remote.chunk_bytes must be between 1024 and 262144"),
    ({"chunk_bytes": 262145}, "remote.chunk_bytes must be between 1024 and 262144"),
    ({"terminal": "yes"}, "Expected `bool`, got `str` - at `$.remote.terminal`"),
    ({"shel": "/bin/sh"}, "Object contains unknown field `shel` - at `$.remote`"),
])
def test_bad_remote_config_is_refused_with_the_key(remote: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        config_from_dict({"server": "https://s", "remote": remote})


# --- terminal ---------------------------------------------------------------------------------

SH = RemoteConfig(idle_timeout=60.0)


def terminal(ch: MemoryChannel, config: RemoteConfig = SH, limit: SessionLimit | None = None,
             **kw: Any) -> asyncio.Task[int]:
    return asyncio.create_task(run_terminal(ch, 80, 24, config, limit=limit or SessionLimit(4), kill_grace=0.5, **kw))


def test_a_shell_echoes_resizes_and_exits_with_its_code() -> None:
    async def scenario() -> None:
        ch, client = session()
        task = terminal(ch)
        await client.send(b"echo hi; stty size; echo TERM=$TERM; tty\n")
        await client.expect(rb"\bhi\r\n")
        assert (await client.expect(rb"(\d+) (\d+)\r\n")).groups() == (b"24", b"80")
        await client.expect(rb"TERM=xterm-256color\r\n")
        await client.expect(rb"/dev/pts/\d+\r\n")  # the PTY is the shell's terminal
        await client.send({"type": "resize", "cols": 132, "rows": 43})
        await client.send(b"stty size\n")
        assert (await client.expect(rb"\b(\d+) (\d+)\r\n")).groups() == (b"43", b"132")
        await client.send(b"printf 'last words\\n'; exit 3\n")
        assert await task == 3
        await client.drain()
        assert b"last words\r\n" in client.data  # the output still in the PTY comes before the exit
        assert client.controls == [{"type": "exit", "code": 3}]
        assert client.ch.peer_closed == (1000, "")

    run(scenario())


def test_the_shell_has_a_controlling_terminal_and_a_session_of_its_own() -> None:
    async def scenario() -> None:
        ch, client = session()
        task = terminal(ch)
        # a foreground job gets ^C from the terminal: only with a controlling terminal
        await client.send(b"echo pid=$$; sleep 30\n")
        pid = int((await client.expect(rb"pid=(\d+)\r\n")).group(1))
        await eventually(lambda: any(p.name() == "sleep" for p in psutil.Process(pid).children()), "sleep to run")
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid
        await client.send(b"\x03")
        await client.send(b"echo after=$?\n")
        await client.expect(rb"after=130\r\n")  # 128 + SIGINT
        await client.send(b"exit\n")
        assert await task == 0

    run(scenario())


def test_the_loop_stays_responsive_and_output_is_read_only_as_fast_as_it_is_sent() -> None:
    """PTY reads go through ``add_reader`` and never run ahead of ``send``: with a client that
    does not read, the agent holds at most the channel's few messages and the shell blocks; while
    several MB stream, the event loop keeps running other tasks."""

    async def scenario() -> None:
        ch, client = session(maxsize=4)
        task = terminal(ch)
        await client.send(b"echo pid=$$; yes 0123456789abcdef | head -c 4000000; echo; echo do''ne\n")
        await client.expect(rb"pid=\d+\r\n")
        await asyncio.sleep(0.3)  # the client does not read
        assert client.ch.pending() == 4  # four chunks wait; nothing more was read from the PTY
        lags: list[float] = []
        loop = asyncio.get_running_loop()

        async def ticker() -> None:
            while True:
                t = loop.time()
                await asyncio.sleep(0.005)
                lags.append(loop.time() - t - 0.005)

        tick = asyncio.create_task(ticker())
        received, tail = 0, b""
        while b"done\r\n" not in tail:
            data = await client.ch.recv()
            assert isinstance(data, bytes)
            received, tail = received + len(data), (tail + data)[-64:]
        tick.cancel()
        assert received > 4_000_000
        assert len(lags) > 10 and max(lags) < 0.25, max(lags)
        await client.send(b"exit\n")
        assert await task == 0

    run(scenario())


def test_closing_the_channel_kills_the_shell_and_its_foreground_job() -> None:
    async def scenario() -> None:
        ch, client = session()
        task = terminal(ch)
        await client.send(b"echo shell=$$; sh -c 'echo job=$$; exec sleep 1000'\n")
        shell = int((await client.expect(rb"shell=(\d+)\r\n")).group(1))
        job = int((await client.expect(rb"job=(\d+)\r\n")).group(1))
        await client.ch.close()
        assert await task == 128 + 1  # SIGHUP
        assert gone(shell)
        await eventually(lambda: gone(job), "the foreground job to be gone")

    run(scenario())


def test_a_shell_that_ignores_sighup_is_killed() -> None:
    async def scenario() -> None:
        ch, client = session()
        task = terminal(ch)
        await client.send(b"trap '' HUP; echo shell=$$\n")
        shell = int((await client.expect(rb"shell=(\d+)\r\n")).group(1))
        await client.ch.close()
        assert await task == 128 + 9  # SIGKILL after the grace time
        assert gone(shell)

    run(scenario())


def test_an_idle_terminal_is_closed() -> None:
    async def scenario() -> None:
        ch, client = session()
        task = terminal(ch, msgspec.structs.replace(SH, idle_timeout=0.4))
        await client.send(b"echo shell=$$\n")
        shell = int((await client.expect(rb"shell=(\d+)\r\n")).group(1))
        assert await task == 128 + 1
        await client.drain()
        idle = "the terminal was idle for 0.4 s (remote.idle_timeout)"
        assert client.controls == [{"type": "error", "message": idle}]
        assert client.ch.peer_closed is not None
        assert gone(shell)

    run(scenario())


def test_a_background_job_that_keeps_writing_does_not_hold_the_exit_back() -> None:
    async def scenario() -> None:
        ch, client = session()
        task = terminal(ch)
        await client.send(b"yes background & echo bg=$!\n")
        job = int((await client.expect(rb"bg=(\d+)\r\n")).group(1))
        try:
            await client.send(b"exit 5\n")
            reader = asyncio.create_task(client.drain())
            assert await task == 5  # after at most DRAIN_MAX of the job's output
            await reader
            assert client.controls == [{"type": "exit", "code": 5}]
            await eventually(lambda: gone(job), "the job to end once no one reads the terminal")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job, 9)

    run(scenario())


def test_a_client_that_stops_reading_does_not_keep_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("corral.agent.remote.channel.FINAL_SEND_TIMEOUT", 0.2)

    async def scenario() -> None:
        ch, client = session(maxsize=2)
        task = terminal(ch, msgspec.structs.replace(SH, idle_timeout=0.5))
        await client.send(b"yes\n")
        # the output waits on the client; no output and no input for idle_timeout: closed, without
        # waiting for the client to take the error message
        assert await task == 128 + 1
        assert client.ch.pending() == 2 and client.ch.peer_closed is not None

    run(scenario())


def test_a_shell_not_in_etc_shells_is_refused(tmp_path: Path) -> None:
    shells = tmp_path / "shells"
    shells.write_text("# /etc/shells\n/bin/bash\n")

    async def scenario(config: RemoteConfig) -> str:
        ch, client = session()
        with pytest.raises(RemoteError) as err:
            await terminal(ch, config, shells_file=shells)
        await client.drain()
        assert client.controls == [{"type": "error", "message": err.value.detail}]
        assert client.ch.peer_closed is not None and client.ch.peer_closed[0] == 1008
        return err.value.detail

    assert run(scenario(SH)) == f"the shell /bin/sh (remote.shell) is not listed in {shells}"
    text = tmp_path / "text"
    text.write_text("not a program")
    shells.write_text(f"/bin/sh\n{text}\n")
    notexec = msgspec.structs.replace(SH, shell=str(text))
    assert run(scenario(notexec)) == f"the shell {text} (remote.shell) is not an executable file"


def test_turned_off_too_many_and_bad_sizes_are_refused() -> None:
    async def refused(config: RemoteConfig, limit: SessionLimit, cols: int = 80) -> str:
        ch, client = session()
        with pytest.raises(RemoteError) as err:
            await run_terminal(ch, cols, 24, config, limit=limit)
        await client.drain()
        assert client.controls == [{"type": "error", "message": err.value.detail}]
        return err.value.detail

    async def scenario() -> None:
        off = msgspec.structs.replace(SH, terminal=False)
        assert "turned off" in await refused(off, SessionLimit(4))
        assert "window size" in await refused(SH, SessionLimit(4), cols=0)
        limit = SessionLimit(1)
        ch, client = session()
        first = terminal(ch, limit=limit)
        await client.send(b"echo u''p\n")
        await client.expect(rb"\bup\r\n")
        assert limit.active == 1
        assert await refused(SH, limit) == "this device has 1 terminals open already (remote.max_sessions)"
        await client.send(b"exit\n")
        assert await first == 0
        assert limit.active == 0
        ch, client = session()
        again = terminal(ch, limit=limit)  # a slot is free again
        await client.send(b"exit 7\n")
        assert await again == 7

    run(scenario())


def test_the_shell_user(monkeypatch: pytest.MonkeyPatch) -> None:
    assert account_for("no-such-user-here") == "remote.user: there is no user 'no-such-user-here' on this device"
    me = account_for(None)
    assert not isinstance(me, str) and not me.switch and me.uid == os.geteuid()
    if os.geteuid() != 0:
        assert "needs the agent to run as root" in str(account_for("root"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert account_for("root") == ("remote.user = 'root': starting a shell as another user needs the agent to run "
                                   "as root (it runs as uid 1000)")


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a shell as another user needs root")
def test_a_shell_runs_as_the_configured_user() -> None:
    async def scenario() -> None:
        ch, client = session()
        task = terminal(ch, msgspec.structs.replace(SH, user="nobody"))
        await client.send(b"echo id=$(id -u):$(id -g) user=$USER home=$HOME; stat -c owner=%u $(tty)\n")
        m = await client.expect(rb"id=(\d+):(\d+) user=(\w+) home=(\S+)\r\n")
        assert m.groups() == (b"65534", b"65534", b"nobody", b"/nonexistent")
        await client.expect(rb"owner=65534\r\n")  # the terminal is its user's
        await client.send(b"exit\n")
        assert await task == 0

    run(scenario())


def test_the_terminal_works_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> int:
        ch, client = session()
        task = terminal(ch)
        await client.send(b"echo on-uvloop; exit 4\n")
        await client.expect(rb"\bon-uvloop\r\n")
        return await asyncio.wait_for(task, GUARD)

    assert uvloop.run(scenario()) == 4


# --- forward ----------------------------------------------------------------------------------


class TcpServer:
    """A server on 127.0.0.1: echoes what it gets until EOF, then says how much it got and shuts
    its side down (so a half-close is needed to hear the count)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        total = 0
        while data := await reader.read(65536):
            total += len(data)
            writer.write(data)
            await writer.drain()
        writer.write(f"got {total}".encode())
        writer.write_eof()
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def test_forward_relays_both_ways_and_half_closes() -> None:
    async def scenario() -> None:
        server = TcpServer()
        async with server as port:
            ch, client = session()
            task = asyncio.create_task(run_forward(ch, "127.0.0.1", port, RemoteConfig()))
            await client.send(b"hello")
            await client.expect(b"hello")
            big = os.urandom(1_000_000)

            async def upload() -> None:
                for i in range(0, len(big), 40_000):
                    await client.send(big[i:i + 40_000])
                await client.send({"type": "eof"})

            up = asyncio.create_task(upload())
            await client.expect(b"got 1000005")  # the server saw EOF, and its answer still came back
            await up
            assert bytes(client.data[5:5 + len(big)]) == big
            assert await task == Relayed(1_000_005, 1_000_005 + len("got 1000005"))
            await client.drain()
            assert client.controls == [{"type": "eof"}]
            assert client.ch.peer_closed == (1000, "")
            assert server.accepted == 1

    run(scenario())


def test_forward_ends_when_the_client_goes_away() -> None:
    async def scenario() -> None:
        async with TcpServer() as port:
            ch, client = session()
            task = asyncio.create_task(run_forward(ch, "localhost", port, RemoteConfig()))
            await client.send(b"ping")
            await client.expect(b"ping")
            await client.ch.close()
            assert await task == Relayed(4, 4)

    run(scenario())


def test_a_target_that_resets_and_a_client_that_gives_up() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    async def scenario() -> None:
        server = await asyncio.start_server(reset, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            ch, client = session()
            task = asyncio.create_task(run_forward(ch, "127.0.0.1", port, RemoteConfig()))
            await client.send(b"x")
            assert (await client.control("error"))["message"] == (
                f"the connection to 127.0.0.1:{port} failed: Connection reset by peer")
            assert await task == Relayed(1, 0)
            assert client.ch.peer_closed is not None and client.ch.peer_closed[0] == 1011
        finally:
            server.close()
            await server.wait_closed()
        async with TcpServer() as port:
            ch, client = session()
            task = asyncio.create_task(run_forward(ch, "127.0.0.1", port, RemoteConfig()))
            await client.send(b"abc")
            await client.expect(b"abc")
            await client.send({"type": "error", "message": "the local client went away"})
            assert await task == Relayed(3, 3)
            await client.drain()
            assert client.controls == [] and client.ch.peer_closed == (1000, "")

    run(scenario())


def test_a_target_that_refuses_the_connection() -> None:
    async def scenario() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: connections are refused
            ch, client = session()
            with pytest.raises(RemoteError, match=f"cannot connect to 127.0.0.1:{port}: 127.0.0.1: Connection refused"):
                await run_forward(ch, "127.0.0.1", port, RemoteConfig())
        await client.drain()
        assert client.data == b""
        assert [c["type"] for c in client.controls] == ["error"]
        assert client.ch.peer_closed is not None and client.ch.peer_closed[0] == 1011

    run(scenario())


@pytest.mark.parametrize(("host", "allow"), [
    ("127.0.0.1", ("127.0.0.1:1",)),  # another port
    ("localhost", ("10.0.0.0/8:*",)),  # a name that resolves to addresses not allowed
    ("127.0.0.1", ("[::1]:*",)),
])
def test_a_target_not_allowed_is_refused_without_connecting(host: str, allow: tuple[str, ...]) -> None:
    async def scenario() -> None:
        server = TcpServer()
        async with server as port:
            ch, client = session()
            with pytest.raises(RemoteError, match=re.escape(f"{host}:{port} is not an allowed forward target")):
                await run_forward(ch, host, port, RemoteConfig(allow=allow))
            await asyncio.sleep(0.05)
            assert server.accepted == 0
        await client.drain()
        assert client.data == b"" and len(client.controls) == 1
        assert client.ch.peer_closed is not None and client.ch.peer_closed[0] == 1008

    run(scenario())


def test_forwarding_turned_off_is_refused() -> None:
    async def scenario() -> None:
        ch, _ = session()
        with pytest.raises(RemoteError, match="port forwarding is turned off"):
            await run_forward(ch, "127.0.0.1", 22, RemoteConfig(forward=False))

    run(scenario())


def test_a_name_is_allowed_by_itself_or_by_every_address_it_resolves_to() -> None:
    answers = {"mixed.example": ["127.0.0.1", "10.0.0.1"], "loop.example": ["127.0.0.2", "::1"],
               "printer.lan": ["192.168.1.9"]}

    async def fake_getaddrinfo(host: str, port: int, **kw: Any) -> list[Any]:
        if ":" in host or host[0].isdigit():
            return [(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, 6, "", (host, port))]
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host]]

    async def check(host: str, allow: tuple[str, ...] = TargetPolicy().allow) -> list[str] | str:
        asyncio.get_running_loop().getaddrinfo = fake_getaddrinfo  # type: ignore[method-assign]
        try:
            return [str(i[4][0]) for i in await allowed_addresses(host, 80, TargetPolicy(allow))]
        except OSError as e:
            return f"{type(e).__name__}: {e}"

    def checked(host: str, allow: tuple[str, ...] = TargetPolicy().allow) -> list[str] | str:
        return run(check(host, allow))

    assert checked("loop.example") == ["127.0.0.2", "::1"]  # every address is on the loopback
    assert checked("mixed.example").startswith("PermissionError: mixed.example:80 is not an allowed")
    assert checked("printer.lan", ("printer.lan:80",)) == ["192.168.1.9"]  # the name itself is allowed
    assert checked("printer.lan", ("printer.lan:81",)).startswith("PermissionError")
    assert checked("10.1.2.3").startswith("PermissionError")  # an address: not even resolved
    assert checked("nowhere.example", ("*.example:*", "nowhere.example:*")) == (
        "OSError: cannot resolve nowhere.example: Name or service not known")
    assert checked("[::1]") == ["::1"]


# --- file transfer ----------------------------------------------------------------------------


def files_config(tmp_path: Path, **kw: Any) -> RemoteConfig:
    allowed = tmp_path / "files"
    allowed.mkdir(exist_ok=True)
    return RemoteConfig(dirs=(allowed,), **{"chunk_bytes": 32 * 1024, **kw})


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


async def upload(client: Client, data: bytes, chunk: int = 40_000) -> None:
    for i in range(0, len(data), chunk):
        await client.send(data[i:i + chunk])


def test_an_upload_is_written_atomically_with_its_mode(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)
    target = tmp_path / "files" / "app.bin"
    target.write_bytes(b"the old version")
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()

    async def scenario() -> None:
        ch, client = session()
        task = asyncio.create_task(run_upload(ch, str(target), len(data), digest.upper(), 0o750, cfg))
        await upload(client, data[:200_000])
        await eventually(lambda: ch.pending() == 0, "the agent to take the first part")
        await asyncio.sleep(0.05)
        assert target.read_bytes() == b"the old version"  # mid-transfer: the old file, whole
        assert len(leftovers(target.parent)) == 1  # the new one goes to a temporary file beside it
        await upload(client, data[200_000:])
        done = await task
        assert (done.path, done.bytes, done.sha256) == (target, len(data), digest)
        await client.drain()
        assert client.controls == [{"type": "done", "bytes": len(data), "sha256": digest}]
        assert client.ch.peer_closed == (1000, "")

    run(scenario())
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert leftovers(target.parent) == []


def test_a_new_file_and_an_empty_one(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)

    async def scenario(path: Path, data: bytes) -> None:
        ch, client = session()
        task = asyncio.create_task(run_upload(ch, str(path), len(data), hashlib.sha256(data).hexdigest(), None, cfg))
        await upload(client, data)
        await task

    run(scenario(tmp_path / "files" / "new.txt", b"hello\n"))
    run(scenario(tmp_path / "files" / "empty", b""))
    assert (tmp_path / "files" / "new.txt").read_bytes() == b"hello\n"
    assert stat.S_IMODE((tmp_path / "files" / "new.txt").stat().st_mode) == 0o644
    assert (tmp_path / "files" / "empty").read_bytes() == b""


def test_the_default_directory_is_made_on_the_first_upload(tmp_path: Path) -> None:
    cfg = config_from_dict({"server": "https://s", "state_dir": str(tmp_path)}).remote

    async def scenario() -> None:
        ch, client = session()
        task = asyncio.create_task(run_upload(ch, str(tmp_path / "files" / "x"), 1, hashlib.sha256(b"x").hexdigest(),
                                              None, cfg))
        await client.send(b"x")
        await task

    run(scenario())
    assert (tmp_path / "files" / "x").read_bytes() == b"x"


def refused_upload(tmp_path: Path, path: str, data: bytes, *, sha256: str | None = None, size: int | None = None,
                   **cfg: Any) -> tuple[str, Client]:
    config = files_config(tmp_path, **cfg)

    async def scenario() -> tuple[str, Client]:
        ch, client = session()
        task = asyncio.create_task(run_upload(ch, path, len(data) if size is None else size,
                                              sha256 or hashlib.sha256(data).hexdigest(), None, config))
        with contextlib.suppress(ChannelClosed):  # a refused upload closes the channel: the client stops
            await upload(client, data, 1000)
            await client.send({"type": "eof"})
        with pytest.raises(RemoteError) as err:
            await task
        await client.drain()
        assert client.controls == [{"type": "error", "message": err.value.detail}]
        return err.value.detail, client

    return run(scenario())


def test_upload_refusals_write_nothing(tmp_path: Path) -> None:
    files = tmp_path / "files"
    outside = tmp_path / "outside"
    outside.mkdir()
    data = b"x" * 5000

    def refused(path: str, **kw: Any) -> str:
        detail = refused_upload(tmp_path, path, data, **kw)[0]
        assert sorted(p.name for p in files.iterdir()) == ["link"]
        assert list(outside.iterdir()) == []
        return detail

    (tmp_path / "files").mkdir()
    (files / "link").symlink_to(outside)
    assert refused(str(files / "a.bin"), sha256="0" * 64).startswith(
        f"{files / 'a.bin'}: the SHA-256 of the 5000 bytes received is ")
    assert refused(str(files / "a.bin"), max_file_bytes=4999) == (
        f"{files / 'a.bin'}: 5000 bytes is more than this device accepts (4999, remote.max_file_bytes)")
    assert "outside the directories this device allows" in refused(f"{files}/../outside/a.bin")
    assert "outside the directories this device allows" in refused(str(files / "link" / "a.bin"))  # a symlink out
    assert "outside the directories this device allows" in refused(str(outside / "a.bin"))
    assert refused("a.bin") == "'a.bin' is not an absolute path"
    assert refused(str(files), size=1) == f"{files} is a directory"
    assert refused(str(files / "nodir" / "a.bin")) == f"{files / 'nodir'}: no such directory"
    assert refused(str(files / "a.bin"), size=6000) == "the upload ended after 5000 of 6000 bytes"
    assert refused(str(files / "a.bin"), size=4500) == "the upload sent more than the 4500 bytes it announced"
    assert refused(str(files / "a.bin"), files=False) == (
        "file transfer is turned off on this device (remote.files = false)")
    assert "SHA-256" in refused(str(files / "a.bin"), sha256="abc")


def test_an_upload_refused_for_its_size_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    files = tmp_path / "files"

    async def scenario() -> None:
        cfg = files_config(tmp_path, max_file_bytes=1000)
        ch, client = session()
        task = asyncio.create_task(run_upload(ch, str(files / "big"), 2000, "0" * 64, None, cfg))
        assert (await client.control("error"))["message"].startswith(f"{files / 'big'}: 2000 bytes is more than")
        with pytest.raises(RemoteError):
            await task
        assert list(files.iterdir()) == []

    run(scenario())


def test_a_client_gone_mid_upload_leaves_nothing(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)
    target = tmp_path / "files" / "a.bin"

    async def scenario() -> None:
        ch, client = session()
        task = asyncio.create_task(run_upload(ch, str(target), 100_000, "0" * 64, None, cfg))
        await upload(client, b"y" * 50_000)
        await eventually(lambda: ch.pending() == 0, "the agent to take the data")
        await client.ch.close()
        with pytest.raises(ChannelClosed):
            await task

    run(scenario())
    assert list(target.parent.iterdir()) == []


def download(tmp_path: Path, path: str, **cfg: Any) -> tuple[Client, Any]:
    config = files_config(tmp_path, **cfg)

    async def scenario() -> tuple[Client, Any]:
        ch, client = session()
        result: Any = (await asyncio.gather(run_download(ch, path, config), client.drain(), return_exceptions=True))[0]
        return client, result

    return run(scenario())


def test_a_download_round_trip(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    digest = hashlib.sha256(data).hexdigest()
    target = tmp_path / "files" / "round.bin"
    cfg = files_config(tmp_path, chunk_bytes=16 * 1024)

    async def up() -> None:
        ch, client = session()
        task = asyncio.create_task(run_upload(ch, str(target), len(data), digest, 0o600, cfg))
        await upload(client, data)
        await task

    run(up())
    client, result = download(tmp_path, str(target), chunk_bytes=16 * 1024)
    assert bytes(client.data) == data
    assert client.controls == [{"type": "file", "size": len(data)}, {"type": "eof", "sha256": digest}]
    assert (result.bytes, result.sha256) == (len(data), digest)
    assert client.ch.peer_closed == (1000, "")


def test_download_refusals(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "big").write_bytes(b"z" * 2000)
    os.mkfifo(files / "fifo")
    (tmp_path / "secret").write_text("no")
    (files / "link").symlink_to(tmp_path / "secret")

    def refused(path: str, **kw: Any) -> str:
        client, result = download(tmp_path, path, **kw)
        assert isinstance(result, RemoteError), result
        assert client.data == b"" and client.controls == [{"type": "error", "message": result.detail}]
        return result.detail

    assert refused(str(files)) == f"{files} is a directory"
    assert refused(str(files / "fifo")) == f"{files / 'fifo'} is not a regular file"  # and no wait for a writer
    assert refused(str(files / "big"), max_file_bytes=1999) == (
        f"{files / 'big'}: 2000 bytes is more than this device accepts (1999, remote.max_file_bytes)")
    assert refused(str(files / "none")) == f"{files / 'none'}: No such file or directory"
    assert "outside the directories" in refused(str(files / "link"))
    assert "outside the directories" in refused(f"{files}/../secret")
    assert "outside the directories" in refused("/etc/passwd")
    assert refused(str(files / "big"), files=False).startswith("file transfer is turned off")


# --- the idle agent does not load any of it (ADR 0007) ----------------------------------------


def loaded_by(code: str) -> set[str]:
    return set(subprocess.run([sys.executable, "-c", f"import sys; {code}; print(' '.join(sorted(sys.modules)))"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())


def test_the_agent_process_does_not_import_remote_access() -> None:
    """What ``corral agent`` imports at start (as test_agent_main checks), with a config loaded:
    no module of remote access, not even the allow-list's (it brings ``json``)."""
    loaded = loaded_by("import corral.cli.entry, corral.agent.cli, corral.agent.main, corral.agent.platform.linux, "
                       "corral.agent.connection; from corral.agent.config import config_from_dict; "
                       "config_from_dict({'server': 'https://s'})")
    assert "corral.agent.main" in loaded
    unwanted = {m for m in loaded if m.startswith("corral.agent.remote")} | (
        loaded & {"corral.agent.sessions", "corral.core.remote", "pty", "tty", "termios", "grp"})
    assert unwanted == set()


def test_the_package_loads_a_session_module_when_its_name_is_used() -> None:
    names = {f"corral.agent.remote.{m}" for m in ("channel", "terminal", "forward", "files")}
    assert loaded_by("import corral.agent.remote") & names == set()
    assert loaded_by("from corral.agent.remote import run_upload") & names == {
        "corral.agent.remote.files", "corral.agent.remote.channel"}
    assert loaded_by("import corral.agent.remote as r; r.SessionLimit(1)") & names == {
        "corral.agent.remote.terminal", "corral.agent.remote.channel"}


def test_a_session_module_loads_only_what_it_needs() -> None:
    for module in ("terminal", "forward", "files"):
        loaded = loaded_by(f"import corral.agent.remote.{module}")
        others = {f"corral.agent.remote.{m}" for m in ("terminal", "forward", "files")} - {
            f"corral.agent.remote.{module}"}
        assert loaded & (others | {"tempfile", "shutil", "websockets", "pty"}) == set(), module

