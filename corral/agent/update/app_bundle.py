"""The app bundle installer: A/B slot directories, an atomic switch, a supervised process.

One installer per deployment of one app (``name``: the deployment's artifact name, which the
bundle's manifest must carry). The flow's actions (see :mod:`.installers`):

- ``check``: read the whole bundle without writing (:func:`~.bundle.scan_bundle`): every member
  allowed, the manifest valid and of this app, and its extracted size fits the free space (less
  ``reserve``). A refusal here changes nothing at all.
- ``install(artifact, slot)``: refuse the active slot; remove the inactive one; extract into it,
  streaming, checking the space budget before each member and turning ENOSPC into
  :class:`DiskFull`. Any failure removes the partial slot; the active one is never touched.
  A finished install leaves a marker (``.corral-installed``) beside the slot's files.
- ``switch(slot)``: ``current`` is replaced by a symlink to ``slots/<slot>`` with one
  ``rename(2)``: a reader (or a crash) sees the old target or the new, never neither.
- ``restart(slot)``: the supervisor stops the old process (SIGTERM, then SIGKILL) and starts the
  active slot's ``[run] command``.
- ``health(slot, deadline)``: the process still runs (an app with ``[run]``), then ``[health]``
  ``command`` and/or ``http`` pass, tried until the deadline. No ``[health]``: running is healthy.
- ``commit()``: nothing to write: ``current`` already is the new slot, and the agent starts the
  active slot on every start. Idempotent by being a no-op.
- ``rollback(slot)``: ``current`` back to ``slot`` (the previous one) and its process restarted
  unless it already runs from there; with no previous slot (the first install of this app), the
  new version's process is stopped and ``current`` removed.
- ``cleanup()``: an inactive slot without the marker (an install that crashed) is removed. The
  slot of a version that was rolled back stays until the next install replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from corral.agent.update import health as checks
from corral.agent.update.bundle import extract_bundle, scan_bundle
from corral.agent.update.installers import (
    CURRENT,
    SLOTS,
    ArtifactRefused,
    Checked,
    FreeSpace,
    HealthResult,
    InstallError,
    SpaceBudget,
    active_slot,
    free_space,
    point_current,
    remove_tree,
)
from corral.agent.update.manifest import AppManifest, read_manifest
from corral.agent.update.supervisor import Supervisor

INSTALLED_MARKER = ".corral-installed"


@dataclass(frozen=True)
class AppConfig:
    apps_dir: Path
    #: bytes kept free on the apps file system: an install that would eat into them is refused
    reserve: int = 16 * 1024 * 1024
    max_entries: int = 100_000
    health_interval: float = 0.5
    free: FreeSpace = field(default=free_space)


class AppInstaller:
    def __init__(self, config: AppConfig, name: str, supervisor: Supervisor, *, app_dir: Path | None = None,
                 require_run: bool = False) -> None:
        self.config = config
        self.name = name
        self.supervisor = supervisor
        self.app_dir = app_dir if app_dir is not None else config.apps_dir / name
        self.require_run = require_run  # the agent's own bundle: [run] starts the agent

    def slot_dir(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise InstallError(f"unknown slot {slot!r}")
        return self.app_dir / "slots" / slot

    def active(self) -> str | None:
        return active_slot(self.app_dir)

    def version(self, slot: str) -> str | None:
        """The version a slot holds, None if it holds none (or an unfinished install)."""
        d = self.slot_dir(slot)
        if not (d / INSTALLED_MARKER).exists():
            return None
        try:
            return read_manifest(d).version
        except (InstallError, OSError):
            return None

    def _of_this_app(self, manifest: AppManifest) -> None:
        if manifest.name != self.name:
            raise ArtifactRefused(f"bundle is for app {manifest.name!r}, not {self.name!r}")
        if self.require_run and manifest.run is None:
            raise ArtifactRefused(f"the {self.name} bundle has no [run] command")

    def check(self, artifact: Path) -> Checked:
        info = scan_bundle(artifact, self.config.max_entries)
        self._of_this_app(info.manifest)
        self.app_dir.mkdir(parents=True, exist_ok=True)
        SpaceBudget(self.app_dir, self.config.free, self.config.reserve).take(info.size, f"app {self.name}")
        health = info.manifest.health
        return Checked(info.manifest.version, health.timeout if health else None, info.size)

    def install(self, artifact: Path, slot: str | None) -> None:
        if slot is None:
            raise InstallError("an app bundle installs into a slot")
        if slot == self.active():
            raise InstallError(f"slot {slot} of app {self.name} is the active one")
        dest = self.slot_dir(slot)
        remove_tree(dest)
        dest.mkdir(parents=True)
        try:
            budget = SpaceBudget(dest, self.config.free, self.config.reserve)
            manifest = extract_bundle(artifact, dest, budget, self.config.max_entries)
            self._of_this_app(manifest)
            (dest / INSTALLED_MARKER).write_bytes(manifest.version.encode())
        except BaseException:
            remove_tree(dest)
            raise

    def switch(self, slot: str | None) -> None:
        if slot is None or self.version(slot) is None:
            raise InstallError(f"app {self.name}: slot {slot} holds no installed version")
        point_current(self.app_dir, slot)

    def restart(self, slot: str | None) -> None:
        if self.active() != slot:
            raise InstallError(f"app {self.name}: slot {slot} is not the active one")
        self.supervisor.restart(self.name)

    def health(self, slot: str | None, deadline: float) -> HealthResult:
        if slot is None or self.active() != slot:
            return HealthResult(False, f"slot {slot} is not the active one")
        manifest = read_manifest(self.slot_dir(slot))
        if manifest.run is not None:
            running = self.supervisor.running(self.name)
            if running is None or running.slot != slot:
                code = self.supervisor.exit_code(self.name)
                return HealthResult(False, f"{manifest.run.command!r} is not running"
                                    + (f" (exited with {code})" if code is not None else ""))
        spec = manifest.health
        if spec is None:
            return HealthResult(True)
        if spec.command is not None:
            result = checks.command_check(spec.command, self.slot_dir(slot), deadline,
                                          self.app_dir / "logs" / f"{slot}.health.log",
                                          interval=self.config.health_interval)
            if not result.healthy:
                return result
        if spec.http is not None:
            return checks.http_check(spec.http, deadline, interval=self.config.health_interval)
        return HealthResult(True)

    def commit(self) -> None:
        """Nothing to do: the switch is already permanent (see the module docstring)."""

    def rollback(self, slot: str | None) -> None:
        if slot is None:  # the first install of this app: nothing to go back to
            self.supervisor.stop(self.name)
            (self.app_dir / CURRENT).unlink(missing_ok=True)
            return
        self.switch(slot)
        running = self.supervisor.running(self.name)
        if running is None or running.slot != slot:
            self.supervisor.restart(self.name)

    def cleanup(self) -> None:
        active = self.active()
        for slot in SLOTS:
            d = self.slot_dir(slot)
            if slot != active and d.exists() and not (d / INSTALLED_MARKER).exists():
                remove_tree(d)

    def running_slot(self) -> str | None:
        running = self.supervisor.running(self.name)
        if running is not None:
            return running.slot
        slot = self.active()
        if slot is not None and read_manifest(self.slot_dir(slot)).run is None:
            return slot  # nothing to run: the active slot is what "runs"
        return None
