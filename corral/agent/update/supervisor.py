"""The app supervisor: runs each installed app's ``[run] command`` from its active slot.

Layout of one app under the agent's apps directory (``AppInstaller`` writes it)::

    <apps_dir>/<name>/slots/a/        an extracted bundle (corral-app.toml at its root)
    <apps_dir>/<name>/slots/b/
    <apps_dir>/<name>/current         symlink -> slots/a: the active slot (replaced by rename)
    <apps_dir>/<name>/run.json        the supervised process: pid, start time, slot
    <apps_dir>/<name>/logs/<slot>.log its stdout and stderr

:meth:`Supervisor.start_all` is what the agent calls when it starts: every app whose active slot
has a ``[run]`` section runs (a process recorded in ``run.json`` that still runs, from the active
slot, is adopted rather than started twice: the agent may have restarted without its apps). The
update flow's resume depends on this: after a crash in ``restarting`` the new slot's process is
running again before the health check starts.

A process runs in a session of its own, with its slot as working directory and ``CORRAL_APP_NAME``,
``CORRAL_APP_VERSION``, ``CORRAL_APP_SLOT`` in its environment. :meth:`Supervisor.stop` sends
SIGTERM to its process group, then SIGKILL after ``stop_timeout``. ``run.json`` carries the
process's start time, so a PID reused by another process is never signalled.

Not done yet: restarting an app whose process exits on its own (a respawn policy with backoff),
and rotating its log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from corral.agent.update.installers import InstallError, active_slot, kill_group
from corral.agent.update.manifest import AppManifest, read_manifest
from corral.fileio import atomic_write

log = logging.getLogger("corral.agent.update.supervisor")

RUN_FILE = "run.json"
CREATE_TIME_TOLERANCE = 1.0  # seconds


@dataclass(frozen=True)
class Running:
    pid: int
    slot: str
    create_time: float


def app_dirs(apps_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in apps_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


class Supervisor:
    def __init__(self, apps_dir: Path, *, stop_timeout: float = 10.0) -> None:
        self.apps_dir = apps_dir
        self.stop_timeout = stop_timeout
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._exit_codes: dict[str, int] = {}

    def _dir(self, name: str) -> Path:
        return self.apps_dir / name

    def running(self, name: str) -> Running | None:
        """The app's process if it runs (a zombie child is reaped and does not count)."""
        child = self._children.get(name)
        if child is not None and child.poll() is not None:
            self._exit_codes[name] = child.returncode
            del self._children[name]
        try:
            data = json.loads((self._dir(name) / RUN_FILE).read_bytes())
            recorded = Running(int(data["pid"]), str(data["slot"]), float(data["create_time"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        try:
            proc = psutil.Process(recorded.pid)
            alive = (abs(proc.create_time() - recorded.create_time) <= CREATE_TIME_TOLERANCE
                     and proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            alive = False
        return recorded if alive else None

    def exit_code(self, name: str) -> int | None:
        """The exit code of the app's process if it was started by this supervisor and ended."""
        self.running(name)
        return self._exit_codes.get(name)

    def start(self, name: str) -> Running | None:
        """Run the active slot's ``[run] command`` unless it runs already (idempotent). None for
        an app without ``[run]`` or without an active slot."""
        app_dir = self._dir(name)
        slot = active_slot(app_dir)
        if slot is None:
            return None
        current = self.running(name)
        if current is not None:
            if current.slot == slot:
                return current
            self.stop(name)  # a process of the other slot (a crash between switch and restart)
        slot_dir = app_dir / "slots" / slot
        manifest = read_manifest(slot_dir)
        if manifest.run is None:
            return None
        return self._spawn(name, slot, slot_dir, manifest)

    def _spawn(self, name: str, slot: str, slot_dir: Path, manifest: AppManifest) -> Running:
        assert manifest.run is not None
        argv = shlex.split(manifest.run.command)
        logs = self._dir(name) / "logs"
        logs.mkdir(exist_ok=True)
        env = {**os.environ, "CORRAL_APP_NAME": name, "CORRAL_APP_VERSION": manifest.version,
               "CORRAL_APP_SLOT": slot}
        with (logs / f"{slot}.log").open("ab") as out:
            try:
                proc = subprocess.Popen(argv, cwd=slot_dir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                raise InstallError(f"app {name}: cannot run {manifest.run.command!r}: {e.strerror or e}") from None
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = 0.0  # it exited at once: running() will say so
        running = Running(proc.pid, slot, create_time)
        self._children[name] = proc
        self._exit_codes.pop(name, None)
        atomic_write(self._dir(name) / RUN_FILE,
                     json.dumps({"pid": proc.pid, "slot": slot, "create_time": create_time}).encode())
        log.info("app %s %s: started %r from slot %s (pid %d)", name, manifest.version,
                 manifest.run.command, slot, proc.pid)
        return running

    def stop(self, name: str) -> None:
        """SIGTERM to the app's process group, SIGKILL after ``stop_timeout`` (idempotent)."""
        current = self.running(name)
        if current is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(current.pid, signal.SIGTERM)
            if not self._wait(name, current.pid, self.stop_timeout):
                log.warning("app %s: pid %d did not stop on SIGTERM in %ss: SIGKILL", name, current.pid,
                            self.stop_timeout)
                kill_group(current.pid)
                self._wait(name, current.pid, self.stop_timeout)
        child = self._children.pop(name, None)
        if child is not None and child.poll() is None:
            kill_group(child.pid)
            child.wait()
        (self._dir(name) / RUN_FILE).unlink(missing_ok=True)

    def _wait(self, name: str, pid: int, timeout: float) -> bool:
        child = self._children.get(name)
        try:
            if child is not None and child.pid == pid:
                child.wait(timeout)
            else:
                psutil.Process(pid).wait(timeout)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
            return False
        except psutil.NoSuchProcess:
            pass
        return True

    def restart(self, name: str) -> Running | None:
        self.stop(name)
        return self.start(name)

    def start_all(self) -> dict[str, Running | None]:
        """Start (or adopt) every app's active slot's process; an app that cannot start is logged
        and does not keep the others from starting."""
        started: dict[str, Running | None] = {}
        for app_dir in app_dirs(self.apps_dir):
            try:
                started[app_dir.name] = self.start(app_dir.name)
            except (InstallError, OSError) as e:
                log.error("app %s: not started: %s", app_dir.name, getattr(e, "detail", e))
        return started

    def stop_all(self) -> None:
        for app_dir in app_dirs(self.apps_dir):
            self.stop(app_dir.name)


def installed_apps(apps_dir: Path) -> dict[str, str]:
    """``{name: version}`` of each app's active slot, for the inventory."""
    out: dict[str, str] = {}
    for app_dir in app_dirs(apps_dir):
        slot = active_slot(app_dir)
        if slot is not None:
            with contextlib.suppress(InstallError, OSError):
                out[app_dir.name] = read_manifest(app_dir / "slots" / slot).version
    return out
