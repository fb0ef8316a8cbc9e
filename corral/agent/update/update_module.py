"""The update-module installer (the ``script`` kind): a user executable whose hooks do the work,
in place, in the manner of Mender's update modules. The protocol is documented for module
authors in ``docs/update-modules.md``; in short:

- The module is ``<modules_dir>/<type>`` (``/usr/share/corral/modules/<type>`` on a device) when
  the deployment names a module type, else the artifact itself is the module (a script).
- Each hook is a run of ``MODULE HOOK WORK_DIR``; exit 0 is success, anything else a failure whose
  reason is the tail of the module's output (stdout and stderr, kept in ``WORK_DIR/logs/``). A hook
  that runs past ``hook_timeout`` is killed (its whole process group) and has failed.
- ``WORK_DIR`` holds ``files/payload`` (the downloaded artifact), ``tmp/`` (the module's own scratch
  space), and the files ``artifact_name``, ``artifact_version``, ``deployment_id``.
- The hooks, in order: ``SupportsRollback`` (must print ``Yes``), ``Download``,
  ``ArtifactInstall``, ``ArtifactCommit``, ``Cleanup``; on a failure after ``Download``:
  ``ArtifactRollback``, then ``Cleanup``.

The flow's actions (an in-place kind: ``slot`` is always None):

- ``check``: the module exists and is executable, and answers ``Yes`` to ``SupportsRollback``.
  A module that cannot roll back is refused here, before any hook changes the system (ADR 0009
  leaves open what to do with one; we refuse it: an install that fails halfway could not be
  undone, and the device would run a mix).
- ``install``: ``Download`` then ``ArtifactInstall``. Which hooks have *started* is recorded in
  ``WORK_DIR/state.json`` before each runs, so a crash mid-hook is known.
- ``switch``, ``restart``: nothing (the install acted in place; restart mode ``none``).
- ``health``: healthy (the install hook's exit code was the verdict).
- ``commit``: ``ArtifactCommit``, skipped once it has succeeded.
- ``rollback``: ``ArtifactRollback`` if ``Download`` ever started (again after a crash: hooks must
  be idempotent, as Mender's are), else nothing.
- ``cleanup``: ``Cleanup`` if ``Download`` ever started (a failure is logged: the deployment's
  outcome stands), then the work dir is removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from corral.agent.update.installers import (
    ArtifactRefused,
    Checked,
    HealthResult,
    InstallError,
    remove_tree,
    run_command,
)
from corral.fileio import atomic_write

log = logging.getLogger("corral.agent.update.module")

HOOKS = ("SupportsRollback", "Download", "ArtifactInstall", "ArtifactCommit", "ArtifactRollback", "Cleanup")
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_MODULES_DIR = Path("/usr/share/corral/modules")


@dataclass(frozen=True)
class ModuleConfig:
    work_root: Path  # the agent's state dir / "update-modules"
    modules_dir: Path = DEFAULT_MODULES_DIR
    hook_timeout: float = 3600.0


class ModuleInstaller:
    def __init__(self, config: ModuleConfig, *, deployment_id: str, name: str, version: str,
                 module_type: str | None) -> None:
        if not _TYPE.fullmatch(deployment_id):
            raise InstallError(f"deployment id {deployment_id!r} cannot name a work directory")
        if module_type is not None and not _TYPE.fullmatch(module_type):
            raise ArtifactRefused(f"update module type {module_type!r} is not a plain name")
        self.config = config
        self.name, self.version, self.deployment_id = name, version, deployment_id
        self.module_type = module_type
        self.work_dir = config.work_root / deployment_id

    # --- the work dir and the record of hooks started ---

    def _module(self) -> Path:
        if self.module_type is not None:
            return self.config.modules_dir / self.module_type
        return self.work_dir / "module"

    def _prepare(self, artifact: Path) -> None:
        files = self.work_dir / "files"
        (self.work_dir / "tmp").mkdir(parents=True, exist_ok=True)
        files.mkdir(exist_ok=True)
        payload = files / "payload"
        if not payload.is_symlink():
            os.symlink(artifact.resolve(), payload)
        for key, value in (("artifact_name", self.name), ("artifact_version", self.version),
                           ("deployment_id", self.deployment_id)):
            (self.work_dir / key).write_text(value + "\n")
        if self.module_type is None and not self._module().exists():
            tmp = self.work_dir / ".module.tmp"
            shutil.copyfile(artifact, tmp)
            os.chmod(tmp, 0o700)
            os.replace(tmp, self._module())
        module = self._module()
        if not module.is_file() or not os.access(module, os.X_OK):
            raise ArtifactRefused(f"update module {module} does not exist or is not executable")

    def _state(self) -> dict[str, str]:
        try:
            data = json.loads((self.work_dir / "state.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if k in HOOKS and v in ("started", "done", "yes")}

    def _mark(self, hook: str, how: str) -> None:
        state = self._state()
        state[hook] = how
        atomic_write(self.work_dir / "state.json", json.dumps(state).encode(), 0o600)

    def hook(self, hook: str) -> str:
        """Run one hook; its output's tail on success, :class:`InstallError` with it on failure."""
        self._mark(hook, "started")
        result = run_command([str(self._module()), hook, str(self.work_dir)], cwd=self.work_dir,
                             timeout=self.config.hook_timeout, log=self.work_dir / "logs" / f"{hook}.log")
        if result.returncode != 0:
            how = (f"timed out after {self.config.hook_timeout:g}s" if result.returncode is None
                   else f"exited with {result.returncode}")
            raise InstallError(f"update module hook {hook} {how}" + (f": {result.output}" if result.output else ""))
        self._mark(hook, "done")
        return result.output

    # --- the flow's actions ---

    def check(self, artifact: Path) -> Checked:
        self._prepare(artifact)
        answer = self.hook("SupportsRollback").strip().splitlines()
        if not answer or answer[-1].strip() != "Yes":
            raise ArtifactRefused(f"update module {self._module().name} does not support rollback "
                                  "(SupportsRollback did not print Yes): an in-place install that fails "
                                  "could not be undone, so it is refused")
        self._mark("SupportsRollback", "yes")
        return Checked(self.version, None, artifact.stat().st_size)

    def install(self, artifact: Path, slot: str | None) -> None:
        if slot is not None:
            raise InstallError("an update module installs in place, not into a slot")
        if self._state().get("SupportsRollback") != "yes":
            self.check(artifact)
        self.hook("Download")
        self.hook("ArtifactInstall")

    def switch(self, slot: str | None) -> None:
        """Nothing: the install acted in place."""

    def restart(self, slot: str | None) -> None:
        """Nothing: restart mode ``none``."""

    def health(self, slot: str | None, deadline: float) -> HealthResult:
        return HealthResult(True)

    def commit(self) -> None:
        if self._state().get("ArtifactCommit") != "done":
            self.hook("ArtifactCommit")

    def rollback(self, slot: str | None) -> None:
        if "Download" in self._state():
            self.hook("ArtifactRollback")

    def cleanup(self) -> None:
        if not self.work_dir.exists():
            return
        if "Download" in self._state() and self._state().get("Cleanup") != "done":
            try:
                self.hook("Cleanup")
            except InstallError as e:  # the deployment has ended: its outcome stands
                log.warning("deployment %s: %s", self.deployment_id, e.detail)
        remove_tree(self.work_dir)

    def running_slot(self) -> str | None:
        return None
