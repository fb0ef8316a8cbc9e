"""Remote access end to end (issue 6): a real server, a real `corral agent`, the CLI and raw
WebSocket clients. A terminal, a forward and a copy work and are audited and recorded; tokens are
single-use and bound to their user; viewers and operators without the permission are refused; the
device refuses what its config does not allow; a device that goes away and an admin who ends a
session are told to the operator clearly."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from corral.core.remote import read_asciicast
from tests.conftest import AgentProc, ServerProc, corral_cmd, free_port, start_agent, start_server, wait_until

Device = tuple[AgentProc, str, Path]


@pytest.fixture
def device(server: ServerProc, tmp_path: Path, agents: list[AgentProc]) -> Iterator[Device]:
    files = tmp_path / "files"
    files.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'[telemetry]\nenabled = false\n[remote]\ndirs = ["{files}"]\nidle_timeout = 60\n')
    agent = start_agent(server, tmp_path / "agent", server.create_enrollment_token(), "--config", str(config))
    agents.append(agent)
    dev = agent.wait_device_id()
    wait_until(lambda: server.api("GET", f"/devices/{dev}").json().get("online"), what="the agent online")
    yield agent, dev, files


def open_ws(s: ServerProc, dev: str, kind: str, params: dict[str, Any], token: str | None = None) -> Any:
    r = s.api("POST", f"/devices/{dev}/sessions", token=token, json={"kind": kind, "params": params})
    assert r.status_code == 201, r.text
    doc = r.json()
    url = s.url.replace("http", "ws", 1) + doc["ws_path"] + "?token=" + doc["token"]
    return doc, url


def ws_connect(s: ServerProc, url: str, token: str | None = None) -> Any:
    return connect(url, additional_headers={"Authorization": f"Bearer {token or s.admin_token}"}, open_timeout=10)


def read_until(ws: Any, marker: bytes, limit: int = 1 << 20) -> bytes:
    got = b""
    while marker not in got and len(got) < limit:
        message = ws.recv(timeout=15)
        if isinstance(message, bytes):
            got += message
    return got


class EchoServer:
    """A TCP echo server on the device's loopback (the forward's target)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def audit_actions(s: ServerProc) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = s.api("GET", "/audit", params={"limit": 200}).json()["items"]
    return items


def test_a_terminal_a_forward_and_a_copy_from_the_cli_are_audited_and_recorded(
        server: ServerProc, device: Device, tmp_path: Path) -> None:
    s = server
    _, dev, files = device
    # the terminal: what it prints comes back, and its exit status is ours
    r = s.cli("terminal", dev, input="echo hi-from-$((6*7))\nexit 3\n")
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "hi-from-42" in r.stdout

    # a forward: several connections at once through one local port
    echo = EchoServer()
    local = free_port()
    env = {**os.environ, "CORRAL_SERVER": s.url, "CORRAL_TOKEN": s.admin_token,
           "XDG_CONFIG_HOME": str(tmp_path / "cli")}
    fwd = subprocess.Popen(corral_cmd("forward", dev, f"{local}:localhost:{echo.port}"), env=env,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert fwd.stderr is not None
        assert "forwarding" in fwd.stderr.readline()
        payloads = [os.urandom(100_000) for _ in range(5)]
        results: list[bytes] = [b""] * 5

        def roundtrip(i: int) -> None:
            with socket.create_connection(("127.0.0.1", local), timeout=20) as c:
                c.sendall(payloads[i])
                c.shutdown(socket.SHUT_WR)
                while data := c.recv(65536):
                    results[i] += data

        threads = [threading.Thread(target=roundtrip, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == payloads
    finally:
        fwd.send_signal(signal.SIGINT)
        fwd.wait(timeout=15)
        if fwd.stderr is not None:
            fwd.stderr.close()

    # a copy each way, checked by sha256
    data = os.urandom(300_000)
    (tmp_path / "up.bin").write_bytes(data)
    r = s.cli("cp", str(tmp_path / "up.bin"), f"{dev}:{files}/up.bin", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == hashlib.sha256(data).hexdigest()
    assert (files / "up.bin").read_bytes() == data
    r = s.cli("cp", f"{dev}:{files}/up.bin", str(tmp_path / "down.bin"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "down.bin").read_bytes() == data
    # outside the allowed directories: refused by the device, nothing written, one line on stderr
    r = s.cli("cp", str(tmp_path / "up.bin"), f"{dev}:{files}/../escape.bin")
    assert r.returncode == 1 and "outside" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (files.parent / "escape.bin").exists()

    # the audit log says who did what, and how many bytes went each way
    events = audit_actions(s)
    kinds = [e["action"] for e in events]
    for action in ("session.terminal", "session.forward", "session.upload", "session.download", "session.close"):
        assert action in kinds, kinds
    closes = [e["detail"] for e in events if e["action"] == "session.close"]
    assert any(c["kind"] == "upload" and c["bytes_to_device"] >= len(data) for c in closes), closes
    assert sum(1 for c in closes if c["kind"] == "forward") == 5

    # the terminal session was recorded, and plays back what was shown
    r = s.cli("session", "list", "--json")
    assert r.returncode == 0, r.stderr
    terminal = next(x for x in json.loads(r.stdout) if x["kind"] == "terminal")
    assert terminal["status"] == "closed" and terminal["recording"]
    r = s.cli("session", "recording", terminal["id"], "-o", str(tmp_path / "t.cast"))
    assert r.returncode == 0, r.stderr
    header, cast_events = read_asciicast((tmp_path / "t.cast").read_text().splitlines())
    assert header["width"] > 0 and "hi-from-42" in "".join(str(e[2]) for e in cast_events if e[1] == "o")


def test_tokens_are_single_use_and_bound_to_their_user_and_roles_are_checked(server: ServerProc,
                                                                           device: Device) -> None:
    s = server
    _, dev, _ = device
    doc, url = open_ws(s, dev, "terminal", {"cols": 100, "rows": 30})
    # another user with the permission cannot use the admin's token
    olga = s.make_user("olga", "operator")
    assert s.api("PATCH", "/users/olga", json={"remote_access": True}).status_code == 200
    with ws_connect(s, url, olga) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    # no credentials with the token: refused, and the audit says why
    with connect(url, open_timeout=10) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    # the right user: a shell
    with ws_connect(s, url) as ws:
        ws.send(b"stty size; exit 0\n")
        assert b"30 100" in read_until(ws, b"30 100")
    # replayed: refused, nothing relayed
    with ws_connect(s, url) as ws, pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    refusals = [e["detail"]["reason"] for e in audit_actions(s) if e["action"] == "session.refused"]
    assert "the token was issued to another user" in refusals and "the token was already used" in refusals
    assert any(r.startswith("the socket's credentials were refused: ") for r in refusals), refusals
    # who may open sessions at all
    viewer = s.make_user("vera", "viewer")
    r = s.api("POST", f"/devices/{dev}/sessions", token=viewer, json={"kind": "terminal"})
    assert r.status_code == 403
    otto = s.make_user("otto", "operator")  # no remote-access permission
    r = s.api("POST", f"/devices/{dev}/sessions", token=otto, json={"kind": "terminal"})
    assert r.status_code == 403 and "remote-access permission" in r.text
    r = s.api("POST", f"/devices/{dev}/sessions", token=olga, json={"kind": "terminal"})
    assert r.status_code == 201
    # bad requests
    for body, status in [({"kind": "shell"}, 400), ({"kind": "forward", "params": {"host": "x"}}, 400),
                         ({"kind": "upload", "params": {"path": "/x", "size": 1, "sha256": "no"}}, 400)]:
        assert s.api("POST", f"/devices/{dev}/sessions", json=body).status_code == status, body
    assert s.api("POST", f"/devices/{'0' * 32}/sessions", json={"kind": "terminal"}).status_code == 404
    assert doc["id"]


def test_the_device_refuses_what_it_does_not_allow_and_endings_are_told_clearly(
        server: ServerProc, device: Device, agents: list[AgentProc]) -> None:
    s = server
    agent, dev, _ = device
    # a forward to a host the device does not allow: refused on the device, 0 bytes relayed
    _, url = open_ws(s, dev, "forward", {"host": "10.255.255.1", "port": 80})
    with ws_connect(s, url) as ws:
        doc = json.loads(ws.recv(timeout=15))
    assert doc["type"] == "error" and "not an allowed forward target" in doc["message"], doc
    # an oversized message ends the session (1009) instead of being buffered
    _, url = open_ws(s, dev, "terminal", {})
    with ws_connect(s, url) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.send(b"x" * (300 * 1024))
        while True:
            ws.recv(timeout=15)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    # an admin ends a live session: the operator is told
    doc2, url = open_ws(s, dev, "terminal", {})
    with ws_connect(s, url) as ws:
        ws.send(b"echo ready\n")
        read_until(ws, b"ready")
        r = s.cli("session", "end", doc2["id"])
        assert r.returncode == 0, r.stderr
        messages = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.append(ws.recv(timeout=15))
    assert {"type": "error", "message": "ended by an administrator"} in \
        [json.loads(m) for m in messages if isinstance(m, str)]
    # the device goes away in the middle of a session: the operator gets a clear message
    _, url = open_ws(s, dev, "terminal", {})
    with ws_connect(s, url) as ws:
        ws.send(b"echo ready\n")
        read_until(ws, b"ready")
        agent.stop(signal.SIGKILL)
        messages = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.append(ws.recv(timeout=30))
    errors = [json.loads(m)["message"] for m in messages if isinstance(m, str)]
    assert errors == ["the device closed the session"], messages
    # an offline device: no session
    wait_until(lambda: not s.api("GET", f"/devices/{dev}").json().get("online"), what="the device offline")
    r = s.api("POST", f"/devices/{dev}/sessions", json={"kind": "terminal"})
    assert r.status_code == 409 and "offline" in r.text
    assert agents


def test_an_expired_token_is_refused_and_audited(tmp_path: Path, agents: list[AgentProc]) -> None:
    s = start_server(tmp_path / "s", extra=["--session-token-ttl", "0.5"])
    try:
        agent = start_agent(s, tmp_path / "agent", s.create_enrollment_token(), "--config", str(_plain(tmp_path)))
        agents.append(agent)
        dev = agent.wait_device_id()
        wait_until(lambda: s.api("GET", f"/devices/{dev}").json().get("online"), what="the agent online")
        doc, url = open_ws(s, dev, "terminal", {})
        time.sleep(1.0)  # past the token's half second
        with ws_connect(s, url) as ws, pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        refused = [e["detail"] for e in audit_actions(s) if e["action"] == "session.refused"]
        assert refused == [{"session": doc["id"], "reason": "the token expired"}]
        session = s.api("GET", "/sessions").json()[0]
        assert (session["status"], session["bytes_to_device"], session["bytes_from_device"]) == ("pending", 0, 0)
    finally:
        s.stop()


def _plain(tmp: Path) -> Path:
    config = tmp / "plain.toml"
    config.write_text("[telemetry]\nenabled = false\n")
    return config
