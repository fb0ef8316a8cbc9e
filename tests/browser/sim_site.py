"""A server with a fleet of simulated devices for the console's rollout and alert tests: one per
test module (the package's ``console`` fixture has a single real agent; rollouts need a fleet).

The sim devices are real agents with simulated installs (``corral sim``): they download and
verify the artifacts from the server and report each step, so a rollout moves as it would in a
real fleet, only faster (``--update-time``).
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.browser.conftest import PASSWORD, form_csrf, make_console_user
from tests.conftest import ServerProc, corral_cmd, start_server, wait_until
from tests.integration.test_artifacts import upload
from tests.integration.test_sim import online_ids


@dataclass
class Site:
    """What ``browser_login`` needs (``url``, ``passwords``), and the fleet."""

    server: ServerProc
    ids: list[str]
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url


def site(tmp: Path, devices: int, sim_args: tuple[str, ...] = (), server_args: tuple[str, ...] = (),
         tags: dict[str, str] | None = None) -> Iterator[Site]:
    """A server, an operator (olga) and a viewer (vera), and ``devices`` sim devices online,
    enrolled with ``tags``; stopped when the generator is closed (a fixture's ``yield from``)."""
    server = start_server(tmp, extra=list(server_args))
    sim = None
    try:
        make_console_user(server, "olga", "operator")
        make_console_user(server, "vera", "viewer")
        token = server.create_enrollment_token(tags=tags or {"ring": "prod"})
        with (tmp / "sim.log").open("ab") as log:
            sim = subprocess.Popen(corral_cmd("sim", "--server", server.url, "--devices", str(devices),
                                              "--enroll-token", token, "--state-dir", str(tmp / "sim"), *sim_args),
                                   stdout=subprocess.DEVNULL, stderr=log)
        ids = wait_until(lambda: (got := online_ids(server)) and len(got) == devices and sorted(got), timeout=60,
                         what=f"{devices} sim devices online")
        yield Site(server, ids, {"admin": server.admin_password, "olga": PASSWORD, "vera": PASSWORD})
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGTERM)
            try:
                sim.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()
        server.stop()


def upload_app(s: ServerProc, name: str, version: str) -> None:
    r = upload(s, f"{name} {version}".encode(), name=name, version=version, kind="app")
    assert r.status_code == 201, r.text


def http_login(s: Site, user: str) -> httpx.Client:
    """A plain HTTP client holding a console login made by the login form (close it after)."""
    c = httpx.Client(base_url=s.url, timeout=30)
    r = c.post("/login", data={"user": user, "password": s.passwords[user],
                               "csrf_token": form_csrf(c.get("/login").text), "next": "/rollouts"})
    assert r.status_code == 303, r.text
    return c
