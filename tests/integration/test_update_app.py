"""The app bundle installer with real files and real processes: install v1 and run it; v2 into
the other slot, switch, its process restarted from v2, health-checked, committed; rollback to v1;
bad bundles and a full disk refused with the running version untouched; the health checks."""

from __future__ import annotations

import http.server
import os
import shlex
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent.update.app_bundle import AppConfig, AppInstaller
from corral.agent.update.health import command_check, http_check
from corral.agent.update.installers import ArtifactRefused, DiskFull, InstallError
from corral.agent.update.supervisor import Supervisor, installed_apps
from tests.bundles import app, bundle, file, manifest, symlink
from tests.conftest import free_port

SERVER = """\
import http.server, os, signal, sys
VERSION = open("VERSION").read().strip()
if len(sys.argv) > 2 and sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{VERSION} {os.environ['CORRAL_APP_SLOT']} {os.getpid()}".encode()
        self.send_response(200 if self.path != "/health" or VERSION != "bad" else 500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def make_app(path: Path, version: str, port: int, *, health: str = "", run_extra: str = "",
             payload: bytes = b"") -> Path:
    """The demo app; ``payload`` (a data file) goes first in the archive, so that versions with
    the same payload share the start of their compressed bytes, as a delta needs."""
    command = f"{shlex.quote(sys.executable)} server.py {port} {run_extra}".strip()
    extra = f'[run]\ncommand = "{command}"\n'
    extra += health or f'[health]\nhttp = "http://127.0.0.1:{port}/health"\ntimeout = "20s"\n'
    files = [file("corral-app.toml", manifest("demo", version, extra)), file("server.py", SERVER),
             file("VERSION", version), file("check.sh", "#!/bin/sh\nexit 0\n", 0o755)]
    return bundle(path, [file("payload.bin", payload), *files] if payload else files)


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return str(r.read().decode())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[AppInstaller, Supervisor, int, Path]]:
    apps = tmp_path / "apps"
    supervisor = Supervisor(apps, stop_timeout=5.0)
    installer = AppInstaller(AppConfig(apps, reserve=0, health_interval=0.05), "demo", supervisor)
    try:
        yield installer, supervisor, free_port(), tmp_path
    finally:
        supervisor.stop_all()


def deadline(seconds: float = 20.0) -> float:
    return time.time() + seconds


def test_install_switch_restart_health_commit_then_rollback(env: tuple[AppInstaller, Supervisor, int, Path]) -> None:
    installer, _, port, tmp = env
    v1 = make_app(tmp / "v1.tar.zst", "1.0.0", port)
    assert installer.check(v1).version == "1.0.0"
    assert installer.check(v1).health_timeout == 20.0
    installer.install(v1, "a")
    installer.switch("a")
    installer.restart("a")
    assert installer.health("a", deadline()).healthy
    installer.commit()
    first = get(port).split()
    assert first[:2] == ["1.0.0", "a"]
    assert installed_apps(installer.config.apps_dir) == {"demo": "1.0.0"}

    v2 = make_app(tmp / "v2.tar.gz", "2.0.0", port)
    with pytest.raises(InstallError, match="active one"):
        installer.install(v2, "a")
    installer.install(v2, "b")
    assert get(port).split() == first  # installing touches nothing that runs
    installer.switch("b")
    installer.switch("b")  # idempotent
    installer.restart("b")
    assert installer.health("b", deadline()).healthy
    second = get(port).split()
    assert second[:2] == ["2.0.0", "b"] and second[2] != first[2]
    assert installer.running_slot() == "b"
    installer.commit()
    installer.commit()

    installer.rollback("a")
    installer.rollback("a")  # idempotent: already active and running, not restarted again
    assert installer.health("a", deadline()).healthy
    third = get(port).split()
    assert third[:2] == ["1.0.0", "a"]
    installer.rollback("a")
    assert get(port).split() == third
    assert installed_apps(installer.config.apps_dir) == {"demo": "1.0.0"}


def test_agent_start_starts_the_active_slot_and_adopts_a_running_one(
        env: tuple[AppInstaller, Supervisor, int, Path]) -> None:
    installer, supervisor, port, tmp = env
    installer.install(make_app(tmp / "v1.tar.zst", "1.0.0", port), "a")
    installer.switch("a")
    started = supervisor.start_all()["demo"]
    assert started is not None
    assert installer.health("a", deadline()).healthy
    # a new agent process (a new Supervisor) finds the app running: adopted, not started twice
    again = Supervisor(installer.config.apps_dir).start_all()["demo"]
    assert again == started
    # the crash between switch and restart: the other slot's process is replaced
    installer.install(make_app(tmp / "v2.tar.zst", "2.0.0", port), "b")
    installer.switch("b")
    now = supervisor.start_all()["demo"]
    assert now is not None and now.slot == "b"
    assert installer.health("b", deadline()).healthy
    assert get(port).split()[:2] == ["2.0.0", "b"]


def test_a_process_that_ignores_sigterm_is_killed(env: tuple[AppInstaller, Supervisor, int, Path]) -> None:
    installer, _, port, tmp = env
    installer.supervisor.stop_timeout = 0.5
    installer.install(make_app(tmp / "v1.tar.zst", "1.0.0", port, run_extra="ignore-term"), "a")
    installer.switch("a")
    installer.restart("a")
    assert installer.health("a", deadline()).healthy
    pid = int(get(port).split()[2])
    installer.supervisor.stop("demo")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_unhealthy_new_version_then_rollback_restores_the_old_process(
        env: tuple[AppInstaller, Supervisor, int, Path]) -> None:
    installer, _, port, tmp = env
    installer.install(make_app(tmp / "v1.tar.zst", "1.0.0", port), "a")
    installer.switch("a")
    installer.restart("a")
    assert installer.health("a", deadline()).healthy
    installer.install(make_app(tmp / "bad.tar.zst", "bad", port), "b")
    installer.switch("b")
    installer.restart("b")
    result = installer.health("b", deadline(1.5))
    assert not result.healthy
    assert "HTTP 500" in result.reason and result.reason.startswith("timed out")
    installer.rollback("a")
    assert installer.health("a", deadline()).healthy
    assert get(port).split()[:2] == ["1.0.0", "a"]


def test_a_process_that_exits_is_unhealthy_with_its_exit_code(env: tuple[AppInstaller, Supervisor, int, Path]) -> None:
    installer, _, _, tmp = env
    extra = f'[run]\ncommand = "{shlex.quote(sys.executable)} -c \'raise SystemExit(3)\'"\n'
    installer.install(app(tmp / "x.tar.zst", "demo", "1", extra), "a")
    installer.switch("a")
    installer.restart("a")
    give_up = deadline()
    while installer.supervisor.exit_code("demo") is None and time.time() < give_up:
        time.sleep(0.02)
    result = installer.health("a", deadline())
    assert not result.healthy
    assert result.reason.endswith("is not running (exited with 3)")


def test_first_install_rolled_back_leaves_no_app(env: tuple[AppInstaller, Supervisor, int, Path]) -> None:
    installer, supervisor, port, tmp = env
    installer.install(make_app(tmp / "v1.tar.zst", "1.0.0", port), "a")
    installer.switch("a")
    installer.restart("a")
    installer.rollback(None)
    installer.rollback(None)
    assert supervisor.running("demo") is None
    assert installed_apps(installer.config.apps_dir) == {}


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            out[str(p.relative_to(root))] = ("link" if p.is_symlink() else "f", p.lstat().st_size if p.is_file() else 0)
    return out


BAD = {
    "traversal": [file("corral-app.toml", manifest()), file("../../evil", "x")],
    "absolute": [file("corral-app.toml", manifest()), file("/tmp/evil", "x")],
    "symlink escape": [file("corral-app.toml", manifest()), symlink("etc", "../../../etc")],
    "no manifest": [file("x", "1")],
    "malformed manifest": [file("corral-app.toml", b"name = 'demo'\nversion = 1\n")],
    "wrong name": [file("corral-app.toml", manifest(name="other"))],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bundles_are_refused_and_nothing_changes(env: tuple[AppInstaller, Supervisor, int, Path],
                                                     case: str) -> None:
    installer, supervisor, port, tmp = env
    installer.install(make_app(tmp / "v1.tar.zst", "1.0.0", port), "a")
    installer.switch("a")
    installer.restart("a")
    assert installer.health("a", deadline()).healthy
    running = supervisor.running("demo")
    before = snapshot(tmp)
    bad = bundle(tmp / "bad.tar.zst", BAD[case])
    with pytest.raises(ArtifactRefused):
        installer.check(bad)
    with pytest.raises(ArtifactRefused):
        installer.install(bad, "b")
    after = snapshot(tmp)
    after.pop("bad.tar.zst")
    assert after == before
    assert supervisor.running("demo") == running
    assert not (tmp.parent / "evil").exists()


def test_disk_full_is_a_clean_abort(env: tuple[AppInstaller, Supervisor, int, Path]) -> None:
    """"Disk full" through the free-space seam: check refuses a bundle larger than the space left;
    an install that runs out midway stops, and the inactive slot is removed."""
    installer, supervisor, port, tmp = env
    installer.install(make_app(tmp / "v1.tar.zst", "1.0.0", port), "a")
    installer.switch("a")
    big = app(tmp / "big.tar.zst", "demo", "2", files=[file(f"f{i}", os.urandom(400_000)) for i in range(5)])
    small_disk = AppInstaller(AppConfig(installer.config.apps_dir, reserve=0, free=lambda p: 1_000_000),
                              "demo", supervisor)
    with pytest.raises(DiskFull, match="not enough space"):
        small_disk.check(big)
    with pytest.raises(DiskFull):
        small_disk.install(big, "b")
    assert not small_disk.slot_dir("b").exists()
    assert small_disk.active() == "a" and small_disk.version("a") == "1.0.0"


class Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
        self.send_response(self.status if self.path != "/missing" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_http_check(health_server: int) -> None:
    assert http_check(f"http://127.0.0.1:{health_server}/health", deadline(5)).healthy
    missing = http_check(f"http://127.0.0.1:{health_server}/missing", deadline(0.3), interval=0.05)
    assert not missing.healthy and "HTTP 404" in missing.reason
    slow = http_check(f"http://127.0.0.1:{health_server}/slow", deadline(0.5))
    assert not slow.healthy and slow.reason.startswith("timed out")
    closed = http_check(f"http://127.0.0.1:{free_port()}/", deadline(0.3), interval=0.05)
    assert not closed.healthy and "refused" in closed.reason.lower()


def test_command_check(tmp_path: Path) -> None:
    log = tmp_path / "log"
    assert command_check("true", tmp_path, deadline(5), log).healthy
    failing = command_check("sh -c 'echo broken >&2; exit 4'", tmp_path, deadline(0.3), log, interval=0.05)
    assert not failing.healthy and "exited with 4: broken" in failing.reason
    hanging = command_check("sleep 30", tmp_path, deadline(0.5), log)
    assert not hanging.healthy and "did not finish" in hanging.reason
    (tmp_path / "flag").write_text("")
    assert command_check("test -e flag", tmp_path, deadline(5), log).healthy  # cwd is the slot
