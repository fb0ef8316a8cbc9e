"""Update modules with real executables: the hooks in order with their arguments, a failing hook
followed by the rollback hook, a module without rollback refused before any hook acts, output
kept (bounded) for the reason, a hanging hook killed at its timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.agent.update.installers import ArtifactRefused, InstallError
from corral.agent.update.update_module import HOOKS, ModuleConfig, ModuleInstaller

MODULE = """#!/bin/sh
echo "$1 $2 $(cat "$2/artifact_name" 2>/dev/null) $(cat "$2/files/payload" 2>/dev/null)" >> {log}
case "$1" in
  SupportsRollback) echo {rollback} ;;
  {fail}) echo "no space on /opt" >&2; exit 3 ;;
  {hang}) sleep 30 ;;
esac
exit 0
"""


def module(path: Path, log: Path, *, fail: str = "none", rollback: str = "Yes", hang: str = "none") -> Path:
    path.write_text(MODULE.format(log=log, fail=fail, rollback=rollback, hang=hang))
    path.chmod(0o755)
    return path


def calls(log: Path, work: Path) -> list[str]:
    """The hook calls logged (a script payload, cat into the log, adds lines of its own)."""
    return [line.replace(str(work), "W") for line in log.read_text().splitlines() if line.split(" ")[0] in HOOKS]


def installer(tmp: Path, module_type: str | None = "demo", timeout: float = 60) -> ModuleInstaller:
    config = ModuleConfig(tmp / "work", tmp / "modules", hook_timeout=timeout)
    return ModuleInstaller(config, deployment_id="d1", name="cfg", version="7", module_type=module_type)


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    (tmp_path / "modules").mkdir()
    p = tmp_path / "payload.bin"
    p.write_text("PAYLOAD")
    return p


def test_the_hooks_run_in_order_with_the_work_dir(tmp_path: Path, payload: Path) -> None:
    log = tmp_path / "log"
    module(tmp_path / "modules" / "demo", log)
    m = installer(tmp_path)
    m.check(payload)
    m.install(payload, None)
    m.switch(None)
    m.restart(None)
    assert m.health(None, 0).healthy
    m.commit()
    m.commit()  # done once: not run again
    m.cleanup()
    m.cleanup()
    assert calls(log, m.work_dir) == [f"{hook} W cfg PAYLOAD" for hook in
                                      ("SupportsRollback", "Download", "ArtifactInstall", "ArtifactCommit", "Cleanup")]
    assert not m.work_dir.exists()


def test_a_failing_install_hook_then_the_rollback_hook(tmp_path: Path, payload: Path) -> None:
    log = tmp_path / "log"
    module(tmp_path / "modules" / "demo", log, fail="ArtifactInstall")
    m = installer(tmp_path)
    m.check(payload)
    with pytest.raises(InstallError) as e:
        m.install(payload, None)
    assert e.value.detail == "update module hook ArtifactInstall exited with 3: no space on /opt"
    m.rollback(None)
    m.cleanup()
    assert [c.split()[0] for c in calls(log, m.work_dir)] == [
        "SupportsRollback", "Download", "ArtifactInstall", "ArtifactRollback", "Cleanup"]


def test_a_module_without_rollback_is_refused_before_any_hook_acts(tmp_path: Path, payload: Path) -> None:
    log = tmp_path / "log"
    module(tmp_path / "modules" / "demo", log, rollback="No")
    m = installer(tmp_path)
    with pytest.raises(ArtifactRefused, match="does not support rollback"):
        m.check(payload)
    with pytest.raises(ArtifactRefused):
        m.install(payload, None)
    m.rollback(None)  # nothing was started: nothing to undo
    m.cleanup()
    assert [c.split()[0] for c in calls(log, m.work_dir)] == ["SupportsRollback", "SupportsRollback"]


def test_a_missing_module_and_a_bad_type_are_refused(tmp_path: Path, payload: Path) -> None:
    with pytest.raises(ArtifactRefused, match="does not exist or is not executable"):
        installer(tmp_path, "absent").check(payload)
    with pytest.raises(ArtifactRefused, match="not a plain name"):
        installer(tmp_path, "../bin/sh")


def test_the_artifact_itself_as_the_module(tmp_path: Path) -> None:
    log = tmp_path / "log"
    script = module(tmp_path / "script.sh", log)
    m = installer(tmp_path, module_type=None)
    m.check(script)
    m.install(script, None)
    m.commit()
    assert [c.split()[0] for c in calls(log, m.work_dir)] == [
        "SupportsRollback", "Download", "ArtifactInstall", "ArtifactCommit"]


def test_a_hanging_hook_is_killed_and_long_output_is_cut(tmp_path: Path, payload: Path) -> None:
    module(tmp_path / "modules" / "demo", tmp_path / "log", hang="Download")
    m = installer(tmp_path, timeout=0.5)
    m.check(payload)
    with pytest.raises(InstallError, match=r"hook Download timed out after 0\.5s"):
        m.install(payload, None)
    chatty = tmp_path / "modules" / "chatty"
    chatty.write_text('#!/bin/sh\n[ "$1" = SupportsRollback ] && echo Yes && exit 0\n'
                      'yes "line of output" | head -c 1000000; echo LAST; exit 1\n')
    chatty.chmod(0o755)
    c = ModuleInstaller(ModuleConfig(tmp_path / "work", tmp_path / "modules"), deployment_id="d2", name="x",
                        version="1", module_type="chatty")
    c.check(payload)
    with pytest.raises(InstallError) as e:
        c.install(payload, None)
    assert e.value.detail.endswith("LAST") and len(e.value.detail) < 4200
    assert "exited with 1: …" in e.value.detail
