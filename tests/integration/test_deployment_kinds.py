"""Deployments of every artifact kind end to end, each with a real server and real agent processes:
an update module (``script``) installs in place and rolls back with its own hook; a ``rootfs``
image goes to the inactive partition, the device reboots into it (simulated: the bootloader's
logic on an environment file, the agent killed and started again) and commits, and a slot that
does not come up is given up by the bootloader and reported as a crash loop; the agent updates
itself under its watchdog, and a new agent that cannot reconnect is replaced by the old one,
which says so."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent.update.rootfs import SimBootloader, read_bootenv
from corral.agent.update.self_update import AGENT_BUNDLE, AgentInstaller
from corral.agent.update.watchdog import ROLLBACK, TRIAL
from tests.bundles import app, file
from tests.conftest import AgentProc, ServerProc, start_agent, wait_until
from tests.integration.test_artifacts import upload
from tests.integration.test_deployments import deploy, finished

BASE_CONFIG = "[telemetry]\nenabled = false\n[update]\nhealth_interval = 0.1\nreserve_bytes = 0\n"


def online(s: ServerProc, dev: str) -> None:
    wait_until(lambda: s.api("GET", f"/devices/{dev}").json().get("online"), timeout=30, what="the agent online")


def software(s: ServerProc, dev: str) -> dict[str, str]:
    inventory = s.api("GET", f"/devices/{dev}").json()["inventory"]
    return dict(inventory.get("software", {}))


def upload_ok(s: ServerProc, data: bytes, name: str, version: str, kind: str) -> None:
    r = upload(s, data, name=name, version=version, kind=kind, filename=f"{name}-{version}")
    assert r.status_code == 201, r.text


# --- script: an update module, in place -----------------------------------------------------------

MODULE = """#!/bin/sh
# a Corral update module (docs/update-modules.md): the "installed software" is the file TARGET
TARGET=@TARGET@
hook="$1"; work="$2"
echo "$hook" >> "$TARGET.hooks"
case "$hook" in
  SupportsRollback) echo Yes ;;
  ArtifactInstall)
    [ -f "$TARGET" ] && cp "$TARGET" "$work/tmp/previous"
    cat "$work/artifact_version" > "$TARGET"
    grep -q bad "$TARGET" && { echo "cannot apply $(cat "$TARGET")"; exit 4; }
    exit 0 ;;
  ArtifactRollback)
    if [ -f "$work/tmp/previous" ]; then cp "$work/tmp/previous" "$TARGET"; else rm -f "$TARGET"; fi ;;
esac
exit 0
"""


@pytest.fixture
def plain_device(server: ServerProc, tmp_path: Path, agents: list[AgentProc]) -> Iterator[tuple[AgentProc, str]]:
    config = tmp_path / "agent.toml"
    config.write_text(BASE_CONFIG)
    agent = start_agent(server, tmp_path / "agent", server.create_enrollment_token(), "--config", str(config))
    agents.append(agent)
    dev = agent.wait_device_id()
    online(server, dev)
    yield agent, dev


def test_an_update_module_installs_in_place_and_rolls_back_with_its_hook(
        server: ServerProc, plain_device: tuple[AgentProc, str], tmp_path: Path) -> None:
    s = server
    agent, dev = plain_device
    target = tmp_path / "installed.txt"
    module = MODULE.replace("@TARGET@", str(target)).encode()
    upload_ok(s, module, "settings", "1", "script")
    row = finished(s, deploy(s, "settings@1", dev))["devices"][0]
    assert (row["status"], row["running_version"]) == ("succeeded", "1"), row
    assert target.read_text().strip() == "1"
    hooks = (tmp_path / "installed.txt.hooks").read_text().split()
    assert hooks == ["SupportsRollback", "Download", "ArtifactInstall", "ArtifactCommit", "Cleanup"], hooks
    wait_until(lambda: software(s, dev).get("script.settings") == "1", what="script.settings in the inventory")

    # version "2-bad" fails halfway through its install hook: the module's rollback undoes it
    upload_ok(s, module, "settings", "2-bad", "script")
    row = finished(s, deploy(s, "settings@2-bad", dev))["devices"][0]
    assert row["status"] == "rolled-back", row
    assert "ArtifactInstall exited with 4" in row["reason"] and "cannot apply 2-bad" in row["reason"], row
    assert row["running_version"] == "1"
    assert target.read_text().strip() == "1"
    assert (tmp_path / "installed.txt.hooks").read_text().split()[5:] == \
        ["SupportsRollback", "Download", "ArtifactInstall", "ArtifactRollback", "Cleanup"]
    assert not (agent.state_dir / "update-modules").exists() or not any((agent.state_dir / "update-modules").iterdir())

    # this device has no root partitions configured, and no watchdog: refused at once, with the reason
    upload_ok(s, b"\0" * 4096, "os", "1", "rootfs")
    row = finished(s, deploy(s, "os@1", dev))["devices"][0]
    assert row["status"] == "failed" and "[update.rootfs] names no partitions" in row["reason"], row
    upload_ok(s, b"not a bundle", AGENT_BUNDLE, "9", "agent")
    row = finished(s, deploy(s, f"{AGENT_BUNDLE}@9", dev))["devices"][0]
    assert row["status"] == "failed" and "does not run under the watchdog" in row["reason"], row


# --- rootfs: an inactive partition, a reboot, the bootloader's boot counter ------------------------

PARTITION = 256 * 1024


class RootfsDevice:
    """An agent whose root partitions are files and whose reboot is simulated (``simreboot.py``):
    the test plays init, starting the agent again each time a reboot killed it."""

    def __init__(self, server: ServerProc, tmp: Path, agents: list[AgentProc]) -> None:
        self.server, self.tmp, self.agents = server, tmp, agents
        self.parts = {slot: tmp / f"part-{slot}" for slot in "ab"}
        for part in self.parts.values():
            part.write_bytes(b"\0" * PARTITION)
        self.bootenv, self.booted = tmp / "bootenv", tmp / "booted"
        self.bootloader = SimBootloader(self.bootenv, self.booted)  # never rebooted: boots slot a
        reboot = [sys.executable, str(Path(__file__).with_name("simreboot.py")), str(self.bootenv), str(self.booted)]
        self.config = tmp / "agent.toml"
        self.config.write_text(
            f"reboot_command = {reboot!r}\n".replace("'", '"') + BASE_CONFIG
            + f'[update.rootfs]\npartition_a = "{self.parts["a"]}"\npartition_b = "{self.parts["b"]}"\n'
            f'bootenv = "{self.bootenv}"\nbooted_slot_file = "{self.booted}"\nboot_limit = 2\n')
        self.agent = self._start(server.create_enrollment_token())
        self.id = self.agent.wait_device_id()
        online(server, self.id)

    def _start(self, token: str | None) -> AgentProc:
        agent = start_agent(self.server, self.tmp / "agent", token, "--config", str(self.config))
        self.agents.append(agent)
        return agent

    def rebooted(self) -> None:
        """Wait for the reboot to take the agent down, then start it (the device came up)."""
        wait_until(lambda: self.agent.proc.poll() is not None, timeout=60, what="the reboot")
        assert self.agent.proc.returncode == -signal.SIGKILL
        self.agent = self._start(None)


def test_a_rootfs_image_boots_on_trial_commits_and_a_slot_that_never_comes_up_is_given_up(
        server: ServerProc, tmp_path: Path, agents: list[AgentProc]) -> None:
    s = server
    device = RootfsDevice(s, tmp_path, agents)
    image = bytes(range(256)) * 512  # 128 KiB, raw
    upload_ok(s, image, "os", "2", "rootfs")
    d2 = deploy(s, "os@2", device.id)
    device.rebooted()
    row = finished(s, d2)["devices"][0]
    assert (row["status"], row["running_version"]) == ("succeeded", "2"), row
    assert device.parts["b"].read_bytes()[:len(image)] == image
    assert device.parts["a"].read_bytes() == b"\0" * PARTITION  # the running slot was never written
    env = read_bootenv(device.bootenv)
    assert (env.active_slot, env.upgrade_available, device.booted.read_text()) == ("b", False, "b")

    # os@3 goes to slot a; it "never comes up": the device crash-loops until the bootloader's
    # boot counter is spent and it boots slot b again; the agent there reports why
    upload_ok(s, image[::-1], "os", "3", "rootfs")
    d3 = deploy(s, "os@3", device.id)
    wait_until(lambda: device.agent.proc.poll() is not None, timeout=60, what="the reboot into slot a")
    assert device.booted.read_text() == "a"
    for _ in range(2):  # boot_limit = 2: two more boots of slot a that die before the agent commits
        device.bootloader.reboot()
    assert device.booted.read_text() == "b"  # the fallback
    device.agent = device._start(None)
    row = finished(s, d3)["devices"][0]
    assert row["status"] == "rolled-back", row
    assert "crash loop" in row["reason"] and "the bootloader fell back to slot b" in row["reason"], row
    assert row["running_version"] == "2"
    env = read_bootenv(device.bootenv)
    assert (env.active_slot, env.upgrade_available) == ("b", False)
    assert wait_until(lambda: software(s, device.id).get("rootfs.os") == "2", what="rootfs.os in the inventory")


# --- agent: self-update under the watchdog ----------------------------------------------------------


def agent_bundle(path: Path, version: str, server: str = "") -> Path:
    """An agent release: its launcher starts this checkout's agent (on ``server`` instead of the
    one the watchdog passes, when given)."""
    override = f" --server {server}" if server else ""
    launcher = f'#!/bin/sh\nexec {sys.executable} -m corral agent "$@"{override}\n'
    return app(path, AGENT_BUNDLE, version, '[run]\ncommand = "./bin/corral-agent"\n',
               files=[file("bin/corral-agent", launcher, 0o755)])


def test_the_agent_updates_itself_and_a_new_agent_that_cannot_reconnect_is_replaced_by_the_old(
        server: ServerProc, tmp_path: Path) -> None:
    s = server
    root, state = tmp_path / "agent-root", tmp_path / "agent"
    installer = AgentInstaller(root, request_restart=lambda: None)
    installer.install(agent_bundle(tmp_path / "v1.tar.zst", "1"), "a")  # the device image's job
    installer.bootstrap_current("a")
    config = tmp_path / "agent.toml"
    config.write_text(BASE_CONFIG + "health_timeout = 60\nagent_confirm_timeout = 8\n")
    log = (tmp_path / "watchdog.log").open("ab")
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "corral.agent.update.watchdog", str(root), "--server", s.url,
         "--state-dir", str(state), "--enroll-token", s.create_enrollment_token(), "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        dev = wait_until(lambda: (state / "device.key").exists() and AgentProc(state, watchdog, tmp_path).device_id(),
                         what="the agent's key")
        online(s, dev)

        upload_ok(s, agent_bundle(tmp_path / "v2.tar.zst", "2").read_bytes(), AGENT_BUNDLE, "2", "agent")
        row = finished(s, deploy(s, f"{AGENT_BUNDLE}@2", dev))["devices"][0]
        assert (row["status"], row["running_version"]) == ("succeeded", "2"), row
        assert (root / "current").readlink().name == "b" and not (root / TRIAL).exists()
        wait_until(lambda: software(s, dev).get(f"agent.{AGENT_BUNDLE}") == "2", what="the agent's version")

        # v3's agent starts but cannot reach the server (its launcher points it elsewhere): it never
        # confirms, the watchdog restores v2's agent, which reports the rollback and its reason
        v3 = agent_bundle(tmp_path / "v3.tar.zst", "3", server="http://127.0.0.1:9")
        upload_ok(s, v3.read_bytes(), AGENT_BUNDLE, "3", "agent")
        row = finished(s, deploy(s, f"{AGENT_BUNDLE}@3", dev), timeout=90)["devices"][0]
        assert row["status"] == "rolled-back", row
        assert "did not confirm within 8s" in row["reason"] and "restored the previous one" in row["reason"], row
        assert row["running_version"] == "2"
        assert (root / "current").readlink().name == "b" and (root / ROLLBACK).exists()
        assert watchdog.poll() is None  # the watchdog kept the device's agent running throughout
    finally:
        watchdog.send_signal(signal.SIGTERM)
        try:
            watchdog.wait(timeout=15)
        except subprocess.TimeoutExpired:
            watchdog.kill()
        log.close()
