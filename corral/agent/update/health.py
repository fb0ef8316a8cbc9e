"""Health checks of a new version on trial (DESIGN §4): a command, an HTTP probe, a condition.

Each check is *tried until it passes or the deadline comes*: a freshly started service needs a
moment before it answers, so a first refusal is not a verdict. The deadline is the update flow's
(``Action.deadline``, wall-clock seconds); each try is bounded by the time left, so a hanging
command or server cannot hold the check past it.

- :func:`command_check`: ``argv`` run in the slot's directory; exit 0 is healthy. Output goes to a
  log file and its tail is the reason of a failure.
- :func:`http_check`: ``GET url`` (plain ``http://``, through ``http.client``); a 2xx is healthy.
- :func:`until`: any condition (the update runner's "the agent reconnected to the server", "the
  booted slot is the new one").
"""

from __future__ import annotations

import http.client
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from corral.agent.update.installers import HealthResult, run_command

Clock = Callable[[], float]
Sleep = Callable[[float], None]
INTERVAL = 0.5


def until(attempt: Callable[[float], HealthResult], deadline: float, *, interval: float = INTERVAL,
          clock: Clock = time.time, sleep: Sleep = time.sleep) -> HealthResult:
    """Call ``attempt(seconds_left)`` until it is healthy or ``deadline`` passes; the last
    failure's reason (with "timed out") if it never was."""
    last = HealthResult(False, "no check ran before the deadline")
    while (left := deadline - clock()) > 0:
        last = attempt(left)
        if last.healthy:
            return last
        sleep(min(interval, max(deadline - clock(), 0)))
    return HealthResult(False, f"timed out: {last.reason}" if last.reason else "timed out")


def command_check(command: str, cwd: Path, deadline: float, log: Path, *, interval: float = INTERVAL) -> HealthResult:
    argv = shlex.split(command)

    def attempt(left: float) -> HealthResult:
        result = run_command(argv, cwd=cwd, timeout=left, log=log)
        if result.returncode == 0:
            return HealthResult(True)
        how = "did not finish" if result.returncode is None else f"exited with {result.returncode}"
        return HealthResult(False, f"health command {command!r} {how}: {result.output}".rstrip(": "))

    return until(attempt, deadline, interval=interval)


def http_get_status(url: str, timeout: float) -> int:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url!r}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": "corral-agent health check", "Connection": "close"})
        response = conn.getresponse()
        response.read(64 * 1024)
        return response.status
    finally:
        conn.close()


def http_check(url: str, deadline: float, *, interval: float = INTERVAL) -> HealthResult:
    def attempt(left: float) -> HealthResult:
        try:
            status = http_get_status(url, left)
        except (OSError, http.client.HTTPException) as e:
            return HealthResult(False, f"GET {url}: {e or type(e).__name__}")
        if 200 <= status < 300:
            return HealthResult(True)
        return HealthResult(False, f"GET {url}: HTTP {status}")

    return until(attempt, deadline, interval=interval)
