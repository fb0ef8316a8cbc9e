"""Agent self-update under the watchdog, with real processes: the hand-over to a new agent that
confirms (commit), a new agent that crashes or never confirms (the watchdog restores the old one),
and a real ``corral agent`` started from a slot path, reconnecting to a hub as the new version."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from corral.agent.update.installers import ArtifactRefused, active_slot
from corral.agent.update.self_update import AgentInstaller
from corral.agent.update.watchdog import TRIAL, read_trial
from tests.bundles import Entry, app, file
from tests.unit.test_agent_connection import GUARD, FakeHub

ROOT = Path(__file__).resolve().parents[2]
PY = shlex.quote(sys.executable)

STUB = """\
import os, signal, sys, time
version = open("VERSION").read().strip()
with open(sys.argv[1], "a") as f:
    f.write(f"{version} {os.environ['CORRAL_AGENT_SLOT']} {os.getpid()}\\n")
if version.startswith("crash"):
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(0.05)
"""


def stub_agent(path: Path, version: str) -> Path:
    return app(path, "corral-agent", version, f'[run]\ncommand = "{PY} stub.py"\n',
               files=[file("stub.py", STUB), file("VERSION", version)])


def wait_for(condition: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + GUARD
    while not condition():
        assert time.monotonic() < give_up, f"gave up waiting for {what}"
        time.sleep(0.02)


def started(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


class Device:
    """An agent root with v1 installed, and the watchdog running it."""

    def __init__(self, tmp: Path, first: Path, args: list[str], confirm_timeout: float = 30.0) -> None:
        self.root = tmp / "agent"
        self.restarts = 0
        self.installer = AgentInstaller(self.root, request_restart=self.restart, confirm_timeout=confirm_timeout,
                                        running=self.running_slot)
        self.installer.install(first, "a")
        self.installer.bootstrap_current("a")
        self.watchdog = subprocess.Popen([sys.executable, "-m", "corral.agent.update.watchdog", str(self.root), *args],
                                         cwd=ROOT, stderr=subprocess.PIPE)

    def agent(self) -> psutil.Process | None:
        children = psutil.Process(self.watchdog.pid).children()
        return children[0] if children else None

    def running_slot(self) -> str | None:
        agent = self.agent()
        return agent.environ().get("CORRAL_AGENT_SLOT") if agent else None

    def restart(self) -> None:
        """What the update runner does for a restart: the agent exits (75) and the watchdog starts
        the active slot. Played here by stopping the agent process."""
        self.restarts += 1
        agent = self.agent()
        assert agent is not None
        agent.send_signal(signal.SIGTERM)

    def stop(self) -> str:
        if self.watchdog.poll() is None:
            self.watchdog.send_signal(signal.SIGTERM)
        try:
            _, err = self.watchdog.communicate(timeout=GUARD)
        except subprocess.TimeoutExpired:
            self.watchdog.kill()
            _, err = self.watchdog.communicate()
        return err.decode()


@pytest.fixture
def devices() -> Iterator[list[Device]]:
    made: list[Device] = []
    try:
        yield made
    finally:
        for d in made:
            d.stop()


def test_a_new_agent_that_confirms_is_kept(tmp_path: Path, devices: list[Device]) -> None:
    log = tmp_path / "started"
    dev = Device(tmp_path, stub_agent(tmp_path / "v1.tar.zst", "1"), [str(log)])
    devices.append(dev)
    wait_for(lambda: len(started(log)) == 1, "v1")
    inst = dev.installer
    inst.check(stub_agent(tmp_path / "v2.tar.zst", "2"))
    inst.install(tmp_path / "v2.tar.zst", "b")
    inst.switch("b")
    inst.switch("b")
    assert read_trial(dev.root) is not None and active_slot(dev.root) == "b"
    inst.restart("b")
    wait_for(lambda: len(started(log)) == 2, "v2")
    assert started(log)[1][:2] == ["2", "b"]
    wait_for(lambda: inst.health("b", 0).healthy, "the new agent's health")
    inst.commit()
    inst.commit()
    assert not (dev.root / TRIAL).exists()
    assert dev.stop() == ""
    assert [s[:2] for s in started(log)] == [["1", "a"], ["2", "b"]]


@pytest.mark.parametrize(("version", "why"), [("crash-2", "exited with 3 while on trial"),
                                               ("2", "did not confirm within 1s")])
def test_a_new_agent_that_does_not_come_back_is_replaced_by_the_old_one(
        tmp_path: Path, devices: list[Device], version: str, why: str) -> None:
    log = tmp_path / "started"
    dev = Device(tmp_path, stub_agent(tmp_path / "v1.tar.zst", "1"), [str(log)], confirm_timeout=1.0)
    devices.append(dev)
    wait_for(lambda: len(started(log)) == 1, "v1")
    inst = dev.installer
    inst.install(stub_agent(tmp_path / "v2.tar.zst", version), "b")
    inst.switch("b")
    inst.restart("b")
    wait_for(lambda: len(started(log)) == 3, "v1 again")
    assert [s[:2] for s in started(log)] == [["1", "a"], [version, "b"], ["1", "a"]]
    assert active_slot(dev.root) == "a" and not (dev.root / TRIAL).exists()
    assert inst.watchdog_verdict() == {"slot": "b", "reason": why}
    # the old agent's update runner then rolls back: already done, so no restart
    restarts = dev.restarts
    inst.rollback("a")
    assert dev.restarts == restarts
    assert f"agent slot b {why}: back to slot a" in dev.stop()


def test_an_agent_bundle_must_be_named_and_start_something(tmp_path: Path) -> None:
    inst = AgentInstaller(tmp_path / "agent", request_restart=lambda: None)
    with pytest.raises(ArtifactRefused, match="not 'corral-agent'"):
        inst.check(app(tmp_path / "x.tar.zst", "demo", "1", '[run]\ncommand = "x"\n'))
    with pytest.raises(ArtifactRefused, match="no \\[run\\] command"):
        inst.check(app(tmp_path / "y.tar.zst", "corral-agent", "1"))


def agent_bundle(path: Path, version: str, *, broken: bool = False) -> Path:
    """The ``corral`` package as it is, with another version (or a syntax error), started with
    ``python -m corral agent`` from the slot (the slot's package comes first on sys.path)."""
    files: list[Entry] = []
    for source in sorted((ROOT / "corral").rglob("*.py")):
        rel = source.relative_to(ROOT).as_posix()
        data = source.read_bytes()
        if rel == "corral/__init__.py":
            data = data.replace(b'__version__ = "0.1.0"', f'__version__ = "{version}"'.encode())
        if broken and rel == "corral/agent/main.py":
            data += b"\nthis is not python\n"
        files.append(file(rel, data))
    return app(path, "corral-agent", version, f'[run]\ncommand = "{PY} -m corral agent"\n', files=files)


def test_a_real_agent_hands_over_to_the_new_version_and_back_from_a_broken_one(
        tmp_path: Path, devices: list[Device]) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('enroll_token = "good-token"\nproxy = "none"\n[telemetry]\nenabled = false\n')
    v1 = agent_bundle(tmp_path / "v1.tar.zst", "1.0.0")
    v2 = agent_bundle(tmp_path / "v2.tar.zst", "2.0.0")
    v3 = agent_bundle(tmp_path / "v3.tar.zst", "3.0.0", broken=True)

    async def scenario() -> None:
        async with FakeHub() as hub:
            dev = Device(tmp_path, v1, ["--config", str(config), "--server", hub.url,
                                        "--state-dir", str(tmp_path / "state")], confirm_timeout=GUARD)
            devices.append(dev)
            inv = (await hub.next("inventory"))[3]
            assert inv.agent_version == "1.0.0"
            inst = dev.installer
            inst.install(v2, "b")
            inst.switch("b")
            inst.restart("b")
            inv = (await hub.next("inventory"))[3]  # the agent reconnected, as the new version: confirm
            assert inv.agent_version == "2.0.0"
            assert inst.health("b", 0).healthy
            inst.commit()
            inst.cleanup()
            inst.install(v3, "a")
            inst.switch("a")
            inst.restart("a")
            inv = (await hub.next("inventory"))[3]  # v3 crashed at import: the watchdog brought v2 back
            assert inv.agent_version == "2.0.0"
            assert active_slot(dev.root) == "b"
            assert inst.watchdog_verdict() == {"slot": "a", "reason": "exited with 1 while on trial"}
            await asyncio.to_thread(dev.stop)

    asyncio.run(scenario())
    assert json.loads((tmp_path / "agent" / "rollback.json").read_text())["slot"] == "a"
    assert os.readlink(tmp_path / "agent" / "current") == "slots/b"
