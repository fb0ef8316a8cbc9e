"""Shared fixtures: real servers on loopback, real PostgreSQL, the real CLI and agent processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from tests.integration.webhook_receiver import Receiver

PG_ADMIN_URL = os.environ.get("CORRAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def corral_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral", *args]


def wait_until(pred: Any, timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns a truthy value (correctness waits, not timing assertions)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last value: {last!r})")


# --- PostgreSQL ------------------------------------------------------------------------------


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _pg_available() -> bool:
    return port_open(5432)


def make_pg_database() -> str:
    """A fresh, empty database on the local PostgreSQL; returns its URL."""
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL at 127.0.0.1:5432 does not answer, and CI is set: these tests must run")
        pytest.skip("PostgreSQL at 127.0.0.1:5432 does not answer (set CI to make this a failure)")
    import asyncpg

    name = f"corral_t_{secrets.token_hex(5)}"

    async def create() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[1]

    async def drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = make_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


# --- a real server process -------------------------------------------------------------------


@dataclass
class ServerProc:
    url: str
    data_dir: Path
    db_url: str
    admin_token: str
    admin_password: str
    proc: subprocess.Popen[bytes]
    log: Path
    extra_args: list[str] = field(default_factory=list)

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url + "/api/v1", timeout=30,
                            headers={"Authorization": f"Bearer {token or self.admin_token}"})

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        with self.client(token) as c:
            return c.request(method, path, **kw)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/device/v1/connect"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.proc = _spawn_server(self.data_dir, self.url, self.db_url, self.log, self.extra_args)

    def cli(self, *args: str, token: str | None = None, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        e = {**os.environ, "CORRAL_SERVER": self.url, "CORRAL_TOKEN": token or self.admin_token,
             "XDG_CONFIG_HOME": str(self.data_dir / "cli-config"), "COLUMNS": "200", **(env or {})}
        return subprocess.run(corral_cmd(*args), capture_output=True, text=True, input=input, env=e, timeout=60)

    def make_user(self, name: str, role: str) -> str:
        """Create a user with ``role``; returns an API token of theirs."""
        r = self.api("POST", "/users", json={"name": name, "role": role, "password": "correct horse battery"})
        assert r.status_code == 201, r.text
        r = self.api("POST", "/auth/login", json={"user": name, "password": "correct horse battery"}, token="-")
        assert r.status_code == 200, r.text
        return str(r.json()["token"])

    def create_enrollment_token(self, **body: Any) -> str:
        r = self.api("POST", "/enrollment-tokens", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


def _spawn_server(data_dir: Path, url: str, db_url: str, log: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    port = url.rsplit(":", 1)[1]
    args = ["server", "--data-dir", str(data_dir), "--bind", f"127.0.0.1:{port}", *extra]
    if db_url:
        args += ["--db", db_url]
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(corral_cmd(*args), stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "CORRAL_LOG_LEVEL": "WARNING"})
    out.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not become healthy:\n{log.read_text()[-3000:]}")


def start_server(tmp: Path, db_url: str = "", heartbeat: float = 1.0, extra: list[str] | None = None) -> ServerProc:
    import json

    data_dir = tmp / "server"
    args = ["server", "init", "--data-dir", str(data_dir), "--json"]
    if db_url:
        args += ["--db", db_url]
    init = subprocess.run(corral_cmd(*args), capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    creds = json.loads(init.stdout)
    url = f"http://127.0.0.1:{free_port()}"
    extra_args = ["--heartbeat-interval", str(heartbeat), *(extra or [])]
    log = tmp / "server.log"
    proc = _spawn_server(data_dir, url, db_url, log, extra_args)
    return ServerProc(url=url, data_dir=data_dir, db_url=db_url, admin_token=creds["api_token"],
                      admin_password=creds["admin_password"], proc=proc, log=log, extra_args=extra_args)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProc]:
    s = start_server(tmp_path)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """One server for a module whose tests tolerate each other's data (they compare snapshots)."""
    s = start_server(tmp_path_factory.mktemp("shared"))
    try:
        yield s
    finally:
        s.stop()


def server_on(engine: str, tmp_path: Path, extra: list[str] | None = None,
              heartbeat: float = 1.0) -> Iterator[ServerProc]:
    """A server on ``engine`` ("sqlite" or "postgresql", a database of its own), for fixtures."""
    db_url = make_pg_database() if engine == "postgresql" else ""
    s = start_server(tmp_path, db_url=db_url, heartbeat=heartbeat, extra=extra)
    try:
        yield s
    finally:
        s.stop()
        if db_url:
            drop_pg_database(db_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database on each engine, for in-process store tests."""
    from corral.server.store import migrate

    url = make_pg_database() if request.param == "postgresql" else f"sqlite:///{tmp_path / 'store.db'}"
    try:
        migrate.upgrade(url)
        yield url
    finally:
        if request.param == "postgresql":
            drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProc]:
    """The same server on each database engine."""
    yield from server_on(request.param, tmp_path)


# --- real agent processes -------------------------------------------------------------------


@dataclass
class AgentProc:
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def device_id(self) -> str:
        from corral.agent.identity import Identity

        return Identity.load_or_create(self.state_dir).device_id

    def wait_device_id(self) -> str:
        """The id once the agent has written its key (reading earlier would create a key)."""
        return str(wait_until(lambda: (self.state_dir / "device.key").exists() and self.device_id(),
                              what="the agent's key"))


def start_agent(server: ServerProc, state_dir: Path, token: str | None = None, *extra: str,
                env: dict[str, str] | None = None) -> AgentProc:
    """``env``: variables set in the agent's environment over the test's own."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    args = ["agent", "--server", server.url, "--state-dir", str(state_dir), *extra]
    if token:
        args += ["--enroll-token", token]
    log = state_dir.parent / f"{state_dir.name}.log"
    out = open(log, "ab")  # noqa: SIM115
    proc = subprocess.Popen(corral_cmd(*args), stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **env} if env else None)
    out.close()
    return AgentProc(state_dir=state_dir, proc=proc, log=log)


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop(signal.SIGKILL)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1 in the test process (tests/integration/webhook_receiver.py)."""
    from tests.integration.webhook_receiver import Receiver

    r = Receiver().start()
    try:
        yield r
    finally:
        r.stop()
