"""Which installer a deployment gets, and what each kind says about the running version.

The update runner is the same loop for every artifact kind (ADR 0009); what differs is here:

==========  ==================================  ===========================  ======================
kind        installer (its module)              the slots                    a restart is
==========  ==================================  ===========================  ======================
``app``     app bundle into ``APPS/NAME``       ``current`` link             its process restarted
``rootfs``  image into the inactive partition   the booted slot              a reboot (the command)
``agent``   agent bundle into the agent root    the watchdog's ``current``   exit 75 to the watchdog
``script``  update module hooks, in place       none                         nothing
==========  ==================================  ===========================  ======================

A device that is not set up for a kind refuses its deployments at once, with the reason
(:class:`~.installers.ArtifactRefused`): rootfs needs ``[update.rootfs]`` partitions, agent
self-update needs the watchdog's agent root.

After a restart the flow needs to know whether the restart happened (:func:`restarted`) and
whether the platform already undid it (:func:`verdict`): the watchdog restored the old agent
(its ``rollback.json``), or the bootloader fell back after too many boots on trial. That verdict
is the event the resumed record takes, instead of a health check of the old version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral import protocol
from corral.agent.config import AgentConfig
from corral.agent.update.app_bundle import AppConfig, AppInstaller
from corral.agent.update.installers import ArtifactRefused, Installer, other_slot
from corral.agent.update.rootfs import RootfsConfig, RootfsInstaller
from corral.agent.update.self_update import AGENT_BUNDLE, AgentInstaller
from corral.agent.update.supervisor import Supervisor
from corral.agent.update.update_module import ModuleConfig, ModuleInstaller
from corral.core import update_flow as flow
from corral.core.update_flow import Event, EventKind, UpdateRecord
from corral.fileio import atomic_write

#: the kernel command line's word naming the booted slot, without ``booted_slot_file``
CMDLINE_SLOT = "corral.slot="


@dataclass(frozen=True)
class Platform:
    """What installers ask of the agent: hand over to a new agent (exit 75 once the record is on
    disk), and reboot the device."""

    request_agent_restart: Callable[[], object]
    reboot: Callable[[], object]


@dataclass(frozen=True)
class Slots:
    """Where a new deployment goes: the slot running now, the one written, the version running."""

    previous: str | None
    target: str | None
    previous_version: str | None


def booted_slot(booted_file: Path | None, cmdline: Path = Path("/proc/cmdline")) -> str:
    """The slot the device booted: the boot scripts' file, else ``corral.slot=`` on the kernel
    command line; an installer error when neither says."""
    try:
        text = booted_file.read_text() if booted_file is not None else cmdline.read_text()
    except OSError as e:
        raise ArtifactRefused(f"cannot tell which root partition booted: {e}") from None
    if booted_file is None:
        words = [w[len(CMDLINE_SLOT):] for w in text.split() if w.startswith(CMDLINE_SLOT)]
        text = words[-1] if words else ""
    slot = text.strip()
    if slot not in ("a", "b"):
        where = booted_file if booted_file is not None else f"{cmdline} ({CMDLINE_SLOT}a or b)"
        raise ArtifactRefused(f"cannot tell which root partition booted: {where} says {slot!r}")
    return slot


def agent_root(config: AgentConfig) -> Path | None:
    root = config.update.agent_root
    if root is None and os.environ.get("CORRAL_AGENT_ROOT"):
        root = Path(os.environ["CORRAL_AGENT_ROOT"])
    return root


def make_installer(config: AgentConfig, job: protocol.Deploy, supervisor: Supervisor, app_config: AppConfig,
                   platform: Platform) -> Installer:
    """The installer for ``job``'s kind; :class:`ArtifactRefused` when this device cannot take it."""
    u = config.update
    if job.kind == "app":
        return AppInstaller(app_config, job.name, supervisor)
    if job.kind == "script":
        return ModuleInstaller(ModuleConfig(config.state_dir / "update-modules", u.modules_dir, u.hook_timeout),
                               deployment_id=job.deployment_id, name=job.name, version=job.version,
                               module_type=None)
    if job.kind == "rootfs":
        r = u.rootfs
        if r.partition_a is None or r.partition_b is None:
            raise ArtifactRefused("this device installs no rootfs images: [update.rootfs] names no partitions")
        booted_file = r.booted_slot_file
        return RootfsInstaller(
            RootfsConfig({"a": r.partition_a, "b": r.partition_b}, r.bootenv, config.state_dir / "rootfs",
                         boot_limit=r.boot_limit),
            version=job.version, booted_slot=lambda: booted_slot(booted_file), reboot=platform.reboot)
    if job.kind == "agent":
        root = agent_root(config)
        if root is None:
            raise ArtifactRefused("this agent does not run under the watchdog (no [update] agent_root or "
                                  "CORRAL_AGENT_ROOT): it cannot update itself")
        if job.name != AGENT_BUNDLE:
            raise ArtifactRefused(f"an agent artifact must be named {AGENT_BUNDLE!r}, not {job.name!r}")
        return AgentInstaller(root, request_restart=platform.request_agent_restart,
                              confirm_timeout=u.agent_confirm_timeout)
    raise ArtifactRefused(f"unknown artifact kind {job.kind!r}")


def slots(installer: Installer, installed: dict[str, str], job: protocol.Deploy) -> Slots:
    """Where a new deployment of ``job`` goes on this device."""
    if isinstance(installer, RootfsInstaller):
        previous = installer.booted_slot()
        return Slots(previous, other_slot(previous), installer.running_version())
    if isinstance(installer, (AppInstaller, AgentInstaller)):
        current = installer.active()
        return Slots(current, "b" if current == "a" else "a",
                     installer.version(current) if current is not None else None)
    return Slots(None, None, installed.get(key(job.kind, job.name)))  # in place


def key(kind: str, name: str) -> str:
    """The inventory's ``software`` key of an artifact: what the server reads as the version a
    device runs, to offer it a delta from there."""
    return f"{kind}.{name}"


def running_version(installer: Installer, installed: dict[str, str], job: protocol.Deploy) -> str:
    """The version of ``job.name`` that runs now ("" when none), as the device can tell."""
    if isinstance(installer, RootfsInstaller):
        return installer.running_version() or ""
    if isinstance(installer, (AppInstaller, AgentInstaller)):
        slot = installer.running_slot() if isinstance(installer, AgentInstaller) else installer.active()
        return (installer.version(slot) or "") if slot else ""
    return installed.get(key(job.kind, job.name), "")


def restarted(installer: Installer, record: UpdateRecord) -> bool:
    """Whether the restart a record in ``restarting`` asked for has happened: the new version is
    the one running."""
    return installer.running_slot() == record.target_slot


def verdict(installer: Installer, record: UpdateRecord, now: float) -> Event | None:
    """The platform's own undoing of a trial, found at start, as the event the record takes
    (None: nothing was undone, resume as usual). Only for a record between restart and commit."""
    if record.state not in (flow.State.RESTARTING, flow.State.HEALTH_CHECKING):
        return None
    # the flow's own words for "the new version did not come up" in each of the two states
    kind = EventKind.RESTART_FAILED if record.state is flow.State.RESTARTING else EventKind.UNHEALTHY
    if isinstance(installer, AgentInstaller):
        found = installer.watchdog_verdict()
        if found is None or found.get("slot") != record.target_slot:
            return None
        return Event(kind, now, f"the new agent {found.get('reason', 'failed')}; "
                                "the watchdog restored the previous one")
    if isinstance(installer, RootfsInstaller):
        env, booted = installer.env(), installer.booted_slot()
        on_trial = env.upgrade_available and env.active_slot == record.target_slot
        if booted != record.target_slot and not on_trial:
            return Event(kind, now, f"crash loop: slot {record.target_slot} did not come up in {env.boot_limit} "
                                    f"boots, the bootloader fell back to slot {booted}")
    return None


def needs_reconnect(kind: str) -> bool:
    """Whether the health check includes "the agent reconnected to the server": after a reboot or
    an agent hand-over, a device that cannot reach the server must not commit."""
    return flow.KIND_POLICIES[kind].restart in ("reboot", "agent")  # type: ignore[index]


class Installed:
    """``STATE_DIR/update/installed.json``: ``{"KIND.NAME": version}`` of every artifact this
    device committed, for the inventory and for in-place kinds (which have no slot to read)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def committed(self, kind: str, name: str, version: str) -> None:
        atomic_write(self.path, json.dumps({**self.read(), key(kind, name): version}, sort_keys=True).encode())

