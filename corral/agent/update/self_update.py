"""Agent self-update: the new agent into the inactive slot of the agent's own A/B directory, a
switch on trial, a hand-over through the watchdog (:mod:`.watchdog`), which restores the old
agent when the new one does not confirm in time.

The agent artifact is an app bundle (the same format and checks, :mod:`.bundle`) named
``corral-agent``, whose ``[run] command`` starts the agent: a release ships its own launcher in
the bundle (e.g. ``./bin/corral-agent``: an interpreter and the ``corral`` package, or a whole
virtual environment). The flow's actions:

- ``check``, ``install``, ``cleanup``: as for an app (:class:`~.app_bundle.AppInstaller`, on
  ``ROOT/slots/<slot>``); the bundle must be named ``corral-agent`` and have a ``[run]`` command.
- ``switch(slot)``: ``trial.json`` (slot, previous slot, confirmation timeout) is written first,
  then ``current`` is pointed to ``slot``: a crash between the two leaves a trial that does not
  name the active slot, which the watchdog ignores. A previous ``rollback.json`` is removed.
- ``restart(slot)``: ``request_restart()``: the update runner persists the record and makes the
  agent exit with :data:`~.watchdog.EXIT_RESTART`; the watchdog starts the new slot.
- ``health(slot)``: the running agent is the one of ``slot`` (``CORRAL_AGENT_SLOT``, set by the
  watchdog); the update runner adds "reconnected to the server".
- ``commit()``: delete ``trial.json``: the confirmation the watchdog waits for.
- ``rollback(slot)``: ``current`` back to ``slot``, ``trial.json`` deleted, and a restart
  requested unless the agent running is already ``slot``'s (the watchdog's own rollback).

:meth:`AgentInstaller.watchdog_verdict` is the watchdog's ``rollback.json``: the old agent that
finds its update record in ``restarting`` or ``health_checking`` reads it to report why (the
update runner sends ``restart_failed`` or ``unhealthy`` with that reason instead of resuming).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from corral.agent.update.app_bundle import AppConfig, AppInstaller
from corral.agent.update.installers import (
    Checked,
    FreeSpace,
    HealthResult,
    InstallError,
    active_slot,
    free_space,
    point_current,
)
from corral.agent.update.supervisor import Supervisor
from corral.agent.update.watchdog import ROLLBACK, TRIAL, Trial, read_rollback, write_trial
from corral.fileio import fsync_dir

AGENT_BUNDLE = "corral-agent"


def own_slot() -> str | None:
    """The slot the running agent was started from, as the watchdog said."""
    return os.environ.get("CORRAL_AGENT_SLOT") or None


class AgentInstaller:
    def __init__(self, root: Path, *, request_restart: Callable[[], object], confirm_timeout: float = 300.0,
                 running: Callable[[], str | None] = own_slot, free: FreeSpace = free_space) -> None:
        self.root = root
        self.request_restart = request_restart
        self.confirm_timeout = confirm_timeout
        self.running = running
        self._bundle = AppInstaller(AppConfig(root.parent, free=free), AGENT_BUNDLE, Supervisor(root),
                                    app_dir=root, require_run=True)

    def active(self) -> str | None:
        return active_slot(self.root)

    def version(self, slot: str) -> str | None:
        """The agent version a slot holds (its bundle's), None if none."""
        return self._bundle.version(slot)

    def check(self, artifact: Path) -> Checked:
        return self._bundle.check(artifact)

    def install(self, artifact: Path, slot: str | None) -> None:
        self._bundle.install(artifact, slot)

    def bootstrap_current(self, slot: str) -> None:
        """Make ``slot`` the active agent of a root that has none yet (first installation, the
        device image's job): no trial, nothing to roll back to."""
        if active_slot(self.root) is not None:
            raise InstallError(f"an agent is already active in {self.root}")
        if self._bundle.version(slot) is None:
            raise InstallError(f"agent slot {slot} holds no installed version")
        point_current(self.root, slot)

    def switch(self, slot: str | None) -> None:
        if slot is None or self._bundle.version(slot) is None:
            raise InstallError(f"agent slot {slot} holds no installed version")
        previous = active_slot(self.root)
        if previous is None:
            raise InstallError(f"no agent is active in {self.root}: install one before self-updating")
        if previous != slot:
            write_trial(self.root, Trial(slot, previous, self.confirm_timeout))
            (self.root / ROLLBACK).unlink(missing_ok=True)
            point_current(self.root, slot)

    def restart(self, slot: str | None) -> None:
        self.request_restart()

    def health(self, slot: str | None, deadline: float) -> HealthResult:
        running = self.running()
        if running != slot:
            return HealthResult(False, f"the agent running is slot {running}'s, not slot {slot}'s")
        return HealthResult(True)

    def commit(self) -> None:
        trial = self.root / TRIAL
        if trial.exists():
            trial.unlink()
            fsync_dir(self.root)

    def rollback(self, slot: str | None) -> None:
        if slot is None:
            raise InstallError("an agent rollback needs the previous slot")
        point_current(self.root, slot)
        if (self.root / TRIAL).exists():
            (self.root / TRIAL).unlink()
            fsync_dir(self.root)
        if self.running() != slot:
            self.request_restart()

    def cleanup(self) -> None:
        self._bundle.cleanup()

    def running_slot(self) -> str | None:
        return self.running()

    def watchdog_verdict(self) -> dict[str, str] | None:
        return read_rollback(self.root)
