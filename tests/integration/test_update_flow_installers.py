"""The update flow (corral.core.update_flow) driving the real installers through
corral.agent.update.actions: the loop the update runner will run, minus the download, the
persistence and the reports. Exact final states, statuses and what runs afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from corral.agent.update.actions import perform, verify
from corral.agent.update.app_bundle import AppConfig, AppInstaller
from corral.agent.update.installers import Installer
from corral.agent.update.supervisor import Supervisor
from corral.agent.update.update_module import ModuleConfig, ModuleInstaller
from corral.core.update_flow import (
    Artifact,
    Event,
    EventKind,
    State,
    UpdateLimits,
    UpdateRecord,
    new_record,
    resume,
    step,
)
from tests.conftest import free_port
from tests.integration.test_update_app import get, make_app
from tests.integration.test_update_module import module

LIMITS = UpdateLimits(health_timeout=20.0)


def run(record: UpdateRecord, installer: Installer, artifact: Path) -> tuple[UpdateRecord, list[str]]:
    """Start the deployment (download and TUF skipped: the artifact is on disk) and perform
    actions until none are left; the final record and the path of states taken."""
    record, actions = step(record, Event(EventKind.START, time.time()), LIMITS)
    path = [record.state.value]
    record, actions = step(record, Event(EventKind.DOWNLOADED, time.time()), LIMITS)
    path.append(record.state.value)
    event, checked = verify(installer, artifact)
    if checked is not None and checked.health_timeout is not None:  # the artifact's own wins (ADR 0009)
        record = msgspec.structs.replace(record, health_timeout=checked.health_timeout)
    pending = [event]
    while pending:
        record, actions = step(record, pending.pop(), LIMITS)
        path.append(record.state.value)
        for action in actions:
            result = perform(installer, action, artifact)
            if result is not None:
                pending.append(result)
    return record, path


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[tuple[AppInstaller, int]]:
    supervisor = Supervisor(tmp_path / "apps", stop_timeout=5.0)
    installer = AppInstaller(AppConfig(tmp_path / "apps", reserve=0, health_interval=0.05), "demo", supervisor)
    try:
        yield installer, free_port()
    finally:
        supervisor.stop_all()


def deploy(installer: AppInstaller, artifact: Path, version: str) -> UpdateRecord:
    previous = installer.active()
    target = "b" if previous == "a" else "a"
    record = new_record(f"dep-{version}", Artifact("demo", version, "app"), target_slot=target,
                        previous_slot=previous, previous_version=previous and installer.version(previous),
                        limits=LIMITS)
    return run(record, installer, artifact)[0]


HAPPY = ["downloading", "verifying", "installing", "switching", "restarting", "health_checking", "committing",
         "committed"]


def test_an_app_is_installed_then_updated_then_a_bad_version_rolled_back(
        tmp_path: Path, apps: tuple[AppInstaller, int]) -> None:
    installer, port = apps
    record = new_record("d1", Artifact("demo", "1.0.0", "app"), target_slot="a", previous_slot=None,
                        previous_version=None, limits=LIMITS)
    record, path = run(record, installer, make_app(tmp_path / "v1.tar.zst", "1.0.0", port))
    assert path == HAPPY and record.status.status == "succeeded"
    assert get(port).split()[:2] == ["1.0.0", "a"]

    assert deploy(installer, make_app(tmp_path / "v2.tar.zst", "2.0.0", port), "2.0.0").state is State.COMMITTED
    assert get(port).split()[:2] == ["2.0.0", "b"]

    bad = deploy(installer, make_app(tmp_path / "bad.tar.zst", "bad", port,
                                     health=f'[health]\nhttp = "http://127.0.0.1:{port}/health"\ntimeout = "1s"\n'),
                 "bad")
    assert bad.state is State.ROLLED_BACK
    assert bad.status.status == "rolled-back" and "unhealthy" in bad.status.reason
    assert installer.health("b", time.time() + 20).healthy
    assert get(port).split()[:2] == ["2.0.0", "b"]


def test_a_refused_bundle_fails_at_verify_and_changes_nothing(tmp_path: Path, apps: tuple[AppInstaller, int]) -> None:
    installer, port = apps
    deploy(installer, make_app(tmp_path / "v1.tar.zst", "1.0.0", port), "1.0.0")
    wrong = make_app(tmp_path / "other.tar.zst", "2.0.0", port)
    installer_other = AppInstaller(installer.config, "other", installer.supervisor)
    record = new_record("d9", Artifact("other", "2.0.0", "app"), target_slot="a", previous_slot=None,
                        previous_version=None, limits=LIMITS)
    record, path = run(record, installer_other, wrong)
    assert path == ["downloading", "verifying", "failed"]
    assert record.status.reason == "verification failed: bundle is for app 'demo', not 'other'"
    assert get(port).split()[:2] == ["1.0.0", "a"]


def test_a_crash_during_install_resumes_by_installing_again(tmp_path: Path, apps: tuple[AppInstaller, int]) -> None:
    installer, port = apps
    artifact = make_app(tmp_path / "v1.tar.zst", "1.0.0", port)
    record = new_record("d1", Artifact("demo", "1.0.0", "app"), target_slot="a", previous_slot=None,
                        previous_version=None, limits=LIMITS)
    for kind in (EventKind.START, EventKind.DOWNLOADED, EventKind.VERIFIED):
        record, _ = step(record, Event(kind, time.time()), LIMITS)
    (installer.slot_dir("a")).mkdir(parents=True)  # a half-written slot, as a crash leaves it
    (installer.slot_dir("a") / "partial").write_text("x")
    record, actions = resume(record, time.time(), LIMITS)
    assert [a.kind.value for a in actions] == ["install"]
    pending = [perform(installer, actions[0], artifact)]
    while pending and (event := pending.pop()) is not None:
        record, actions = step(record, event, LIMITS)
        pending.extend(perform(installer, a, artifact) for a in actions)
    assert record.state is State.COMMITTED
    assert not (installer.slot_dir("a") / "partial").exists()


def test_a_script_module_whose_install_fails_is_rolled_back(tmp_path: Path) -> None:
    log = tmp_path / "log"
    (tmp_path / "modules").mkdir()
    module(tmp_path / "modules" / "cfg", log, fail="ArtifactInstall")
    payload = tmp_path / "payload"
    payload.write_text("x")
    installer = ModuleInstaller(ModuleConfig(tmp_path / "work", tmp_path / "modules"), deployment_id="d1",
                                name="cfg", version="2", module_type="cfg")
    record = new_record("d1", Artifact("cfg", "2", "script"), target_slot=None, previous_slot=None,
                        previous_version="1", limits=LIMITS)
    record, path = run(record, installer, payload)
    assert path == ["downloading", "verifying", "installing", "rolling_back", "rolled_back"]
    assert record.status.reason.startswith("install failed: update module hook ArtifactInstall exited with 3")
    assert [line.split()[0] for line in log.read_text().splitlines()] == [
        "SupportsRollback", "Download", "ArtifactInstall", "ArtifactRollback", "Cleanup"]
