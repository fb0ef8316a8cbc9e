"""The web console's fixtures: one real server and one real agent (remote access on) for the
whole package, Debian's chromium driven by Playwright (sync API), and users of each role.

Chromium is /usr/bin/chromium (``make test`` installs Debian's ``chromium`` when it is missing);
Playwright's own browser builds are never downloaded. Without chromium the browser tests skip
with a message, unless CI is set: then they fail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import AgentProc, ServerProc, start_agent, start_server, wait_until

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "correct horse battery"
#: a tag value that would run if the console rendered it as HTML
SCRIPT_TAG = "<script>window.__owned = 1</script><b>bold</b>"
VIEWPORT = {"width": 1280, "height": 800}


@dataclass
class Console:
    server: ServerProc
    agent: AgentProc
    device_id: str
    #: user name → password (the admin's is from ``corral server init``)
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url


def make_console_user(server: ServerProc, name: str, role: str, remote_access: bool = False) -> None:
    r = server.api("POST", "/users", json={"name": name, "role": role, "password": PASSWORD,
                                           "remote_access": remote_access})
    assert r.status_code == 201, r.text


@pytest.fixture(scope="package")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    server = start_server(tmp)
    agent = None
    try:
        make_console_user(server, "olga", "operator", remote_access=True)
        make_console_user(server, "vera", "viewer")
        config = tmp / "agent.toml"
        config.write_text('[telemetry]\nenabled = false\n[remote]\nidle_timeout = 120\n')
        agent = start_agent(server, tmp / "agent", server.create_enrollment_token(), "--config", str(config))
        dev = agent.wait_device_id()
        wait_until(lambda: server.api("GET", f"/devices/{dev}").json().get("online"), what="the agent online")
        r = server.api("PATCH", f"/devices/{dev}/tags", json={"set": {"name": SCRIPT_TAG, "site": "berlin"}})
        assert r.status_code == 200, r.text
        yield Console(server, agent, dev, {"admin": server.admin_password, "olga": PASSWORD, "vera": PASSWORD})
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


def form_csrf(html: str) -> str:
    """The CSRF token a page's form carries (the login form's, or the log-out form's)."""
    return html.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


@pytest.fixture
def http() -> Iterator[Callable[[str], httpx.Client]]:
    """Plain HTTP clients for a server (closed after the test)."""
    made: list[httpx.Client] = []

    def client(base_url: str) -> httpx.Client:
        made.append(httpx.Client(base_url=base_url, timeout=30))
        return made[-1]

    yield client
    for c in made:
        c.close()


@pytest.fixture
def login_as(console: Console, http: Callable[[str], httpx.Client]) -> Callable[[str], httpx.Client]:
    """An HTTP client holding a console login, made by the login form as a browser does."""

    def login(user: str) -> httpx.Client:
        c = http(console.url)
        r = c.post("/login", data={"user": user, "password": console.passwords[user],
                                   "csrf_token": form_csrf(c.get("/login").text), "next": "/devices"})
        assert r.status_code == 303, r.text
        return c

    return login


def page_csrf(client: httpx.Client, path: str = "/devices") -> str:
    """The CSRF token rendered into a console page (the log-out form carries it)."""
    return form_csrf(client.get(path).text)


def record_a_session(console: Console, commands: bytes) -> str:
    """A terminal session run by the admin over the API, recorded by the server; its id."""
    s = console.server
    r = s.api("POST", f"/devices/{console.device_id}/sessions", json={"kind": "terminal",
                                                                      "params": {"cols": 100, "rows": 30}})
    assert r.status_code == 201, r.text
    doc = r.json()
    url = s.url.replace("http", "ws", 1) + doc["ws_path"] + "?token=" + doc["token"]
    with connect(url, additional_headers={"Authorization": f"Bearer {s.admin_token}"}, open_timeout=10) as ws:
        ws.send(commands)
        while True:
            message = ws.recv(timeout=15)
            if isinstance(message, str) and json.loads(message)["type"] in ("exit", "error"):
                break
    wait_until(lambda: s.api("GET", "/sessions").json()[0]["status"] == "closed", what="the session closed")
    return str(doc["id"])


# --- the browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing and CI is set: the browser tests must run (make test installs "
                        "Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is missing: 'make test' installs Debian's chromium (set CI to make this a failure)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield b
        finally:
            b.close()


@dataclass
class BrowserPage:
    """A page in a fresh browser context, with what the browser complained about."""

    page: Any
    problems: list[str]


@pytest.fixture
def tab(browser: Any) -> Iterator[BrowserPage]:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    try:
        yield BrowserPage(page, problems)
    finally:
        context.close()


def browser_login(tab: BrowserPage, console: Console, user: str, next_path: str = "") -> None:
    page = tab.page
    page.goto(console.url + "/login" + (f"?next={next_path}" if next_path else ""))
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(console.passwords[user])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/login" not in url)
