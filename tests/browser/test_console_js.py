"""The console's pure JavaScript (corral/web/static: asciicast.js, device-lib.js, ...), tested by
node's own test runner: node comes with npm, which ``make venv`` needs for the console's packages.
Each ``tests/browser/js/*.test.mjs`` is a test here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

TESTS = sorted((Path(__file__).parent / "js").glob("*.test.mjs"))


@pytest.mark.parametrize("tests", TESTS, ids=[t.name for t in TESTS])
def test_the_pure_javascript(tests: Path) -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is missing and CI is set (it comes with npm, which make venv needs)")
        pytest.skip("node is missing (it comes with npm, which make venv needs)")
    r = subprocess.run([node, "--test", str(tests)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    passed = re.search(r"^# pass (\d+)$", r.stdout, re.MULTILINE)
    assert "# fail 0" in r.stdout and passed and int(passed.group(1)) > 0, r.stdout[-2000:]
