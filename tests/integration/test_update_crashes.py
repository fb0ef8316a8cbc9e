"""SIGKILL at every point of an app update (issue: "SIGKILL at every state of download, install
and commit"): the device ends on the old version or the new one, never a mix, and says so.

A real server and a real ``corral agent``. The agent is started with ``CORRAL_UPDATE_CRASH_AT``
(the runner's fault injection: it SIGKILLs itself right after a record is persisted, or right
after an action's side effect, before its event is persisted), is sent the next version, dies
there, and is started again without it. The outcome each case expects is the one the update
flow's ``RESUMED`` rows give for the record left on disk (corral/core/update_flow.py):

- downloading, verifying, installing: the step is done again (the download kept, the inactive
  slot scratch), and the deployment goes on to commit;
- switching, committing: idempotent, done again; restarting: the start that finds the record is
  the restart (the supervisor starts the active slot), so the health check follows;
  health_checking: another start of the new version on trial, a new health window;
- rolling_back: the rollback is finished; a final record (committed, rolled_back) is only
  reported again and dropped.

One device for the whole module: each case deploys a version newer than all before it over
whatever the previous case ended on (read from the server's report, not assumed).
"""

from __future__ import annotations

import os
import random
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from corral.agent.update.runner import CRASH_AT_ENV
from corral.core import update_flow as flow
from corral.core.update_flow import ActionKind, State
from tests.conftest import AgentProc, ServerProc, free_port, start_agent, wait_until
from tests.integration.test_deployments import (
    FAILING_HEALTH,
    Device,
    _device,
    deploy,
    finished,
    restart_agent,
    serving,
    upload_app,
)
from tests.integration.test_update_app import get

GOOD, BAD = "healthy", "unhealthy"  # the new version's health check passes, or fails (2s)
NEW, OLD = "new", "old"  # which version the device must end on
COMMITTED = ("succeeded", "committed")
ROLLED_BACK = ("rolled-back", "rolled_back")
#: the bulk of every version: the same bytes, so that the server always offers a delta from the
#: version the device runs (random, so that it is not because they compress well)
PAYLOAD = random.Random(7).randbytes(64 << 10)

# (crash point, the new version's health, the state of the record it leaves, (final status, final
# step), the version that runs in the end)
CASES: list[tuple[str, str, str, tuple[str, str], str]] = [
    ("persisted:downloading", GOOD, "downloading", COMMITTED, NEW),  # downloaded again (Range)
    ("performed:download", GOOD, "downloading", COMMITTED, NEW),  # the verified file is found, kept
    ("persisted:verifying", GOOD, "verifying", COMMITTED, NEW),  # verification only reads: again
    ("performed:verify", GOOD, "verifying", COMMITTED, NEW),
    ("persisted:installing", GOOD, "installing", COMMITTED, NEW),  # the inactive slot is scratch: again
    ("performed:install", GOOD, "installing", COMMITTED, NEW),
    ("persisted:switching", GOOD, "switching", COMMITTED, NEW),  # the switch is idempotent: again
    ("performed:switch", GOOD, "switching", COMMITTED, NEW),
    ("persisted:restarting", GOOD, "restarting", COMMITTED, NEW),  # this start is the restart
    ("performed:restart", GOOD, "restarting", COMMITTED, NEW),
    ("persisted:health_checking", GOOD, "health_checking", COMMITTED, NEW),  # another start: a new window
    ("performed:start_health_check", GOOD, "health_checking", COMMITTED, NEW),  # "healthy" lost: again
    ("persisted:committing", GOOD, "committing", COMMITTED, NEW),  # the commit is idempotent: finished
    ("performed:commit", GOOD, "committing", COMMITTED, NEW),
    ("persisted:committed", GOOD, "committed", COMMITTED, NEW),  # final: reported again, dropped
    ("performed:cleanup", GOOD, "committed", COMMITTED, NEW),
    ("persisted:health_checking", BAD, "health_checking", ROLLED_BACK, OLD),  # unhealthy again
    ("performed:start_health_check", BAD, "health_checking", ROLLED_BACK, OLD),  # "unhealthy" lost: again
    ("persisted:rolling_back", BAD, "rolling_back", ROLLED_BACK, OLD),  # the rollback is idempotent: finished
    ("performed:rollback", BAD, "rolling_back", ROLLED_BACK, OLD),
    ("persisted:rolled_back", BAD, "rolled_back", ROLLED_BACK, OLD),  # final: reported again, dropped
    ("performed:cleanup", BAD, "rolled_back", ROLLED_BACK, OLD),
]


def test_the_cases_cover_every_point_of_an_app_deployment() -> None:
    """Every state an app deployment that commits or rolls back is persisted in, every action."""
    never = {State.IDLE, State.FAILED, State.ROLLBACK_FAILED}  # idle is never persisted; no failure here
    points = {f"persisted:{s}" for s in State if s not in never} | {f"performed:{a}" for a in ActionKind}
    assert {point for point, *_ in CASES} == points
    rolling_back = {"persisted:rolling_back", "performed:rollback", "persisted:rolled_back", "performed:cleanup"}
    assert {point for point, health, *_ in CASES if health == BAD} >= rolling_back


@dataclass
class Rig:
    server: ServerProc
    agent: AgentProc
    dev: str
    config: Path
    tmp: Path
    port: int
    last_deployment: str
    started: list[AgentProc]
    versions: int = 1

    @property
    def state(self) -> Path:
        return self.agent.state_dir

    def online(self) -> bool:
        return bool(self.server.api("GET", f"/devices/{self.dev}").json().get("online"))

    def start(self, env: dict[str, str] | None = None) -> tuple[AgentProc, int]:
        """A new agent process on the device's state (the previous one has ended); its log's offset."""
        offset = self.agent.log.stat().st_size
        if env is None:
            agent = restart_agent(self.server, self.agent, self.config)
        else:  # restart_agent's command line, with the fault injected
            agent = start_agent(self.server, self.state, None, "--config", str(self.config),
                                "--tuf-root", str(self.state.parent / "root.json"), env=env)
        self.started.append(agent)
        self.agent = agent
        return agent, offset

    def log_since(self, offset: int) -> str:
        with self.agent.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


@pytest.fixture(scope="module")
def rig(shared_server: ServerProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A provisioned device with demo 1.0.0 installed and committed."""
    s = shared_server
    tmp = tmp_path_factory.mktemp("crashes")
    started: list[AgentProc] = []
    device: Iterator[Device] = _device(s, tmp, started, provisioned=True)
    agent, dev, config = next(device)
    try:
        port = free_port()
        upload_app(s, tmp, "1.0.0", port, payload=PAYLOAD)
        d1 = deploy(s, "demo@1.0.0", dev)
        row = finished(s, d1)["devices"][0]
        assert (row["status"], row["running_version"]) == ("succeeded", "1.0.0"), row
        yield Rig(s, agent, dev, config, tmp, port, d1, started)
    finally:
        for a in started:
            a.stop(signal.SIGKILL)
        next(device, None)  # on past its yield: _device's own cleanup (its agent killed, the apps stopped)


def _current_slot(app: Path) -> str:
    return Path(os.readlink(app / "current")).name


def _app_processes(app: Path) -> dict[int, str]:
    """{pid: slot} of the live processes whose working directory is one of the app's slots."""
    slots = {str((app / "slots" / slot).resolve()): slot for slot in ("a", "b")}
    found: dict[int, str] = {}
    for p in psutil.process_iter():
        try:
            cwd = p.cwd()
            if p.status() != psutil.STATUS_ZOMBIE and cwd in slots:
                found[p.pid] = slots[cwd]
        except psutil.Error:
            continue
    return found


def _inventory(s: ServerProc, dev: str) -> dict[str, str]:
    software: dict[str, str] = s.api("GET", f"/devices/{dev}").json()["inventory"].get("software") or {}
    return software


@pytest.mark.parametrize(("point", "health", "left", "outcome", "runs"), CASES,
                         ids=[f"{point}-{health}" for point, health, *_ in CASES])
def test_sigkill_at_a_point_of_the_update_ends_on_one_version_and_says_which(
        rig: Rig, point: str, health: str, left: str, outcome: tuple[str, str], runs: str) -> None:
    s, dev = rig.server, rig.dev
    app = rig.state / "apps" / "demo"
    update = rig.state / "update"
    # where the previous case (or the setup) left the device, as the server was told
    if rig.agent.proc.poll() is not None:
        rig.start()
    old = finished(s, rig.last_deployment)["devices"][0]["running_version"]
    assert old and serving(rig.port) == [old, _current_slot(app)]
    rig.versions += 1
    new = f"{rig.versions}.0.0"
    upload_app(s, rig.tmp, new, rig.port, health=FAILING_HEALTH if health == BAD else "", payload=PAYLOAD)

    # the agent that dies at the point
    rig.agent.stop()
    wait_until(lambda: not rig.online(), what="the agent offline")
    armed, offset = rig.start(env={CRASH_AT_ENV: point})
    wait_until(rig.online, what="the agent with the fault online")
    dep = deploy(s, f"demo@{new}", dev)
    rig.last_deployment = dep
    wait_until(lambda: armed.proc.poll() is not None, timeout=60, what=f"the agent to die at {point}")
    assert armed.proc.returncode == -signal.SIGKILL, rig.log_since(offset)[-3000:]
    assert f"crash injected at {point} ({CRASH_AT_ENV})" in rig.log_since(offset)
    record = flow.decode((update / "record").read_bytes())  # it died with the deployment under way
    assert (record.deployment_id, record.state) == (dep, left), record

    # started again without the fault: it resumes from the record and ends the deployment
    _, offset = rig.start()
    ended = re.compile(rf"deployment {dep}: (succeeded|failed|rolled-back)\b")
    wait_until(lambda: ended.search(rig.log_since(offset)), timeout=60, what=f"the agent to end deployment {dep}")
    row = finished(s, dep)["devices"][0]  # the last report, after the agent ended the deployment
    expected = new if runs == NEW else old
    # the new version came as a delta from the file of the version last committed (the old one)
    assert (row["status"], row["step"], row["running_version"], row["download"]) == (*outcome, expected, "delta"), row
    if runs == OLD:
        assert row["reason"].startswith("unhealthy: ") and "not ready" in row["reason"], row
    else:
        assert row["reason"] == "", row

    # what runs is that version, from the slot `current` points to, and nothing of the other slot
    slot = _current_slot(app)
    other = "b" if slot == "a" else "a"
    assert (app / "slots" / slot / "VERSION").read_text() == expected
    # A/B: the other slot holds the other version, whole (the previous one, or the one rolled back)
    assert (app / "slots" / other / "VERSION").read_text() == (old if runs == NEW else new)
    assert serving(rig.port) == [expected, slot]
    pid = int(get(rig.port).split()[2])
    assert _app_processes(app) == {pid: slot}, (slot, other)
    wait_until(lambda: _inventory(s, dev).get("app.demo") == expected, what=f"app.demo {expected} in the inventory")
    # nothing of the deployment is left on disk
    assert not (update / "record").exists()
    assert not (update / "job").exists()
    for folder in ("downloads", "deltas"):
        files = sorted(p.name for p in (update / folder).iterdir()) if (update / folder).is_dir() else []
        assert files == [], (folder, files)
    assert [p for p in update.rglob("*") if p.name.endswith((".part", ".tmp"))] == []  # partial or temporary
