"""The console's pure JavaScript (corral/web/static/asciicast.js), tested by node's own test
runner: node comes with npm, which ``make venv`` needs for the console's packages."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

TESTS = Path(__file__).parent / "js" / "asciicast.test.mjs"


def test_the_playback_parser_and_timing() -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is missing and CI is set (it comes with npm, which make venv needs)")
        pytest.skip("node is missing (it comes with npm, which make venv needs)")
    r = subprocess.run([node, "--test", str(TESTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    passed = re.search(r"^# pass (\d+)$", r.stdout, re.MULTILINE)
    assert "# fail 0" in r.stdout and passed and int(passed.group(1)) > 0, r.stdout[-2000:]
