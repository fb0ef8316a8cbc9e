"""ADR 0007: the installers are imported only when an update runs; what stays resident for
installed apps (the supervisor and the manifest reader) loads none of the archive or HTTP code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


UNWANTED = {"tarfile", "zstandard", "gzip", "shutil", "tempfile", "http.client", "urllib.request",
            "corral.agent.update.bundle", "corral.agent.update.health", "corral.agent.update.app_bundle",
            "corral.agent.update.rootfs", "corral.agent.update.update_module", "tuf"}


def loaded_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.split())


def test_the_app_supervisor_leaves_the_installers_heavy_imports_out() -> None:
    assert loaded_by("corral.agent.update.supervisor") & UNWANTED == set()


def test_the_watchdog_is_small() -> None:
    """One more resident process on the device: no psutil, no asyncio, nothing of the agent's."""
    unwanted = UNWANTED | {"psutil", "asyncio", "msgspec", "corral.agent.update.supervisor", "corral.agent.main"}
    assert loaded_by("corral.agent.update.watchdog") & unwanted == set()
