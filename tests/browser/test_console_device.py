"""The device list's sorting and the device page, complete, in a real browser (issue 7): Debian's
chromium driven by Playwright against one real server for this module, a real agent (telemetry
every second, file transfer with a small size limit) and simulated devices that report metrics
and take a deployment.

Finding a device by selector and opening it; sorting the list (with search and paging); the
chart with the device's points and its time ranges; editing tags (a bad tag's error, a
``<script>`` value shown as text); events and deployment history; presence kept live; uploading
a file to the agent and downloading it back, and the device's refusals; the web UI's button; what
a viewer and an operator without remote access see, and what the server refuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from corral import protocol as p
from tests.browser.conftest import PASSWORD, BrowserPage, Console, browser_login, make_console_user, page_csrf
from tests.conftest import ServerProc, corral_cmd, start_agent, start_server, wait_until
from tests.integration.rawdevice import Key, codec, connect_device
from tests.integration.test_artifacts import upload as upload_artifact
from tests.integration.test_proxy import DeviceApp

#: simulated devices besides the agent: one more than a page of the list holds with the agent
SIMS = 50
#: the agent's [remote] max_file_bytes
MAX_FILE = 128 * 1024


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """This module's fleet (it overrides the package's ``console``): the agent, named
    ``agent-box``, and ``SIMS`` simulated devices ``sim-0000``... reporting metrics every 2 s."""
    tmp = tmp_path_factory.mktemp("device-page")
    server = start_server(tmp)
    agent = None
    sim = None
    try:
        make_console_user(server, "olga", "operator", remote_access=True)
        make_console_user(server, "otto", "operator")
        make_console_user(server, "vera", "viewer")
        config = tmp / "agent.toml"
        config.write_text(f"[telemetry]\ninterval = 1\n[remote]\nidle_timeout = 120\nmax_file_bytes = {MAX_FILE}\n")
        token = server.create_enrollment_token()
        agent = start_agent(server, tmp / "agent", token, "--config", str(config))
        sim = subprocess.Popen(corral_cmd("sim", "--server", server.url, "--devices", str(SIMS), "--enroll-token",
                                          token, "--state-dir", str(tmp / "sim"), "--telemetry-interval", "2",
                                          "--update-time", "0.2-0.4"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dev = agent.wait_device_id()
        wait_until(lambda: server.api("GET", "/devices-count", params={"selector": "online"}).json()["online"]
                   == SIMS + 1, timeout=60, what="the agent and the simulated devices online")
        r = server.api("PATCH", f"/devices/{dev}/tags", json={"set": {"name": "agent-box", "site": "berlin"}})
        assert r.status_code == 200, r.text
        yield Console(server, agent, dev, {"admin": server.admin_password, "olga": PASSWORD, "otto": PASSWORD,
                                           "vera": PASSWORD})
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGTERM)
            sim.wait(timeout=30)
        if agent is not None:
            agent.stop()
        server.stop()


def sim_id(server: ServerProc, hostname: str) -> str:
    items = server.api("GET", "/devices", params={"selector": f'attr.hostname == "{hostname}"'}).json()["items"]
    assert len(items) == 1, items
    return str(items[0]["id"])


def column(page: Any, n: int) -> list[str]:
    """The device list's column ``n`` (1-based), row by row."""
    texts: list[str] = page.locator(f"table.devices tbody tr td:nth-child({n})").all_inner_texts()
    return [t.strip() for t in texts]


def sort_of(url: str) -> str:
    return parse_qs(urlparse(url).query).get("sort", [""])[0]


def no_csp_trouble(tab: BrowserPage) -> None:
    assert not [p for p in tab.problems if "Content Security Policy" in p or "Refused" in p], tab.problems


# --- the list --------------------------------------------------------------------------------------


def test_a_device_found_by_selector_opens_and_the_list_sorts_with_search_and_pages(
        tab: BrowserPage, console: Console) -> None:
    page = tab.page
    browser_login(tab, console, "admin")
    page.get_by_label("Selector").fill('attr.hostname == "sim-0007"')
    page.get_by_role("button", name="Search").click()
    assert column(page, 2) == ["sim-0007"]
    target = sim_id(console.server, "sim-0007")
    page.get_by_role("link", name=target).click()
    page.wait_for_url(f"{console.url}/devices/{target}")
    assert "sim-0007" in page.get_by_role("heading", level=1).inner_text()

    # sorting by name: the name tag, else the host name
    page.goto(console.url + "/devices")
    assert page.locator("th[aria-sort='ascending']").inner_text().startswith("Device")  # by id at first
    page.get_by_role("link", name="Name", exact=True).click()
    page.wait_for_url(lambda url: sort_of(url) == "name")
    names = column(page, 2)
    assert names[:3] == ["agent-box", "sim-0000", "sim-0001"] and len(names) == 50
    assert page.locator("th[aria-sort='ascending']").inner_text().startswith("Name")
    page.get_by_role("link", name=re.compile(r"^Name\W*sorted ascending$")).click()  # again: the other way round
    page.wait_for_url(lambda url: sort_of(url) == "-name")
    assert column(page, 2)[:2] == ["sim-0049", "sim-0048"]
    # the next page keeps the order: 51 devices, 50 a page
    page.get_by_role("link", name="Next page").click()
    page.wait_for_url(lambda url: "cursor=" in url)
    assert sort_of(page.url) == "-name" and column(page, 2) == ["agent-box"]
    assert page.get_by_role("link", name="Next page").count() == 0

    # a search keeps the order, and the order applies to what it finds
    page.goto(console.url + "/devices?sort=-name")
    page.get_by_label("Selector").fill('exists(attr.model) and attr.hostname < "sim-0003"')
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(lambda url: "selector=" in url)
    assert sort_of(page.url) == "-name"
    assert column(page, 2) == ["sim-0002", "sim-0001", "sim-0000"]
    # last seen: the most recent first
    page.get_by_role("link", name="Last seen", exact=True).click()
    page.wait_for_url(lambda url: sort_of(url) == "-last_seen")
    seen = page.locator("table.devices tbody tr td:nth-child(4) time").evaluate_all(
        "ts => ts.map(t => t.getAttribute('datetime'))")
    assert len(seen) == 3 and seen == sorted(seen, reverse=True)
    # the agent's version: ties (every device runs this agent) go by id
    page.get_by_role("link", name="Agent", exact=True).click()
    page.wait_for_url(lambda url: sort_of(url) == "version")
    ids = column(page, 1)
    assert ids == sorted(ids) and len(ids) == 3
    page.goto(console.url + "/devices?sort=password")  # an unknown order is the default one
    assert page.locator("th[aria-sort='ascending']").inner_text().startswith("Device")
    no_csp_trouble(tab)


# --- the chart -------------------------------------------------------------------------------------


def test_the_chart_shows_the_devices_points_and_its_time_ranges(tab: BrowserPage, console: Console) -> None:
    s = console.server
    dev = sim_id(s, "sim-0003")
    wait_until(lambda: "mem.percent" in s.api("GET", "/metrics", params={"device": dev}).json()["items"],
               what="the simulated device's metrics")
    page = tab.page
    browser_login(tab, console, "vera", next_path=f"/devices/{dev}")  # reading: a viewer may
    chart = page.locator("#chart")
    wait_until(lambda: chart.get_attribute("data-points") not in (None, "0"), what="the chart drawn")
    assert chart.get_attribute("data-metric") == "cpu.percent" and chart.get_attribute("data-range") == "1h"
    assert chart.locator("canvas").count() == 1
    assert "cpu.percent, last 1 h:" in page.locator("#chart-status").inner_text()

    with page.expect_response(lambda r: "/api/v1/metrics/query" in r.url) as answer:
        page.get_by_label("15 min").check()
    query = parse_qs(urlparse(answer.value.url).query)
    assert query == {"metric": ["cpu.percent"], "device": [dev], "since": ["15m"], "step": ["10s"], "agg": ["avg"]}
    wait_until(lambda: chart.get_attribute("data-range") == "15m", what="the chart redrawn for 15 min")
    # the chart holds the points the API has for the device (a bucket may have closed meanwhile)
    shown = int(chart.get_attribute("data-points") or 0)
    api = s.api("GET", "/metrics/query", params={k: v[0] for k, v in query.items()}).json()
    assert len(api["series"]) == 1 and shown >= 1 and abs(len(api["series"][0]["points"]) - shown) <= 1

    page.get_by_label("Metric", exact=True).select_option("mem.percent")
    wait_until(lambda: chart.get_attribute("data-metric") == "mem.percent", what="another metric drawn")
    assert int(chart.get_attribute("data-points") or 0) >= 1
    page.get_by_label("7 d").check()
    wait_until(lambda: chart.get_attribute("data-range") == "7d", what="7 days drawn")
    assert "mem.percent, last 7 d:" in page.locator("#chart-status").inner_text()
    no_csp_trouble(tab)


# --- tags -------------------------------------------------------------------------------------------


def test_tags_are_set_changed_and_removed_and_a_bad_one_is_explained(tab: BrowserPage, console: Console) -> None:
    s, dev = console.server, console.device_id
    page = tab.page
    browser_login(tab, console, "otto", next_path=f"/devices/{dev}")  # an operator: tags yes, remote access no
    script = "<script>window.__owned = 1</script><b>rack</b>"
    page.get_by_label("Key").fill("rack")
    page.get_by_label("Value").fill(script)
    page.get_by_role("button", name="Set tag").click()
    page.wait_for_url(f"{console.url}/devices/{dev}#tags-h")
    assert s.api("GET", f"/devices/{dev}").json()["tags"]["rack"] == script
    row = page.locator("#tags tr", has_text="rack")
    assert row.locator("td.tag-value").inner_text() == script  # text, not markup
    assert page.evaluate("window.__owned") is None and page.locator("main b").count() == 0

    page.get_by_role("link", name="Edit tag rack").click()  # the form, filled with the tag
    assert page.get_by_label("Key").input_value() == "rack"
    assert page.get_by_label("Value").input_value() == script
    page.get_by_label("Value").fill("r2")
    page.get_by_role("button", name="Set tag").click()
    page.wait_for_url(f"{console.url}/devices/{dev}#tags-h")
    wait_until(lambda: s.api("GET", f"/devices/{dev}").json()["tags"]["rack"] == "r2", what="the tag changed")
    assert page.locator("#tags tr", has_text="rack").locator("td.tag-value").inner_text() == "r2"

    before = s.api("GET", f"/devices/{dev}").json()["tags"]
    page.get_by_label("Key").fill("bad key!")
    page.get_by_label("Value").fill("x")
    with page.expect_response(lambda r: r.url.endswith(f"/devices/{dev}/tags")) as answer:
        page.get_by_role("button", name="Set tag").click()
    assert answer.value.status == 400
    error = page.locator("#tag-error")
    assert error.get_attribute("role") == "alert" and "tag key" in error.inner_text().lower()
    assert page.get_by_label("Key").input_value() == "bad key!"  # what was typed is kept
    assert page.get_by_label("Key").get_attribute("aria-invalid") == "true"
    assert s.api("GET", f"/devices/{dev}").json()["tags"] == before  # and nothing changed

    page.get_by_role("button", name="Remove tag rack").click()
    page.wait_for_url(f"{console.url}/devices/{dev}#tags-h")
    assert "rack" not in s.api("GET", f"/devices/{dev}").json()["tags"]
    assert page.locator("#tags tr", has_text="rack").count() == 0
    audit = s.api("GET", "/audit", params={"limit": 20}).json()["items"]
    assert [e["actor"] for e in audit if e["action"] == "device.tag"][:3] == ["user:otto"] * 3
    no_csp_trouble(tab)


# --- events, deployment history, presence ----------------------------------------------------------


def app_event(console: Console, line: str) -> None:
    """An event from an application on the device, through the agent's local socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(console.agent.state_dir / "metrics.sock"))
        sock.sendall(line.encode() + b"\n")


def test_events_newest_first_and_the_deployment_history(tab: BrowserPage, console: Console) -> None:
    s, dev = console.server, console.device_id
    app_event(console, "event:info|the first event")
    wait_until(lambda: s.api("GET", "/events", params={"device": dev}).json()["items"], what="the first event")
    app_event(console, "event:warning|disk <b>almost</b> full")
    wait_until(lambda: "disk <b>almost</b> full" in [e["message"] for e in s.api(
        "GET", "/events", params={"device": dev}).json()["items"]], what="the second event")
    page = tab.page
    browser_login(tab, console, "vera", next_path=f"/devices/{dev}")
    messages = [t.strip() for t in page.locator("#events tbody td.message").all_inner_texts()]
    newest = messages.index("disk <b>almost</b> full")
    assert newest < messages.index("the first event")  # the newest first
    assert page.locator("#events tbody tr").nth(newest).locator("td").nth(1).inner_text() == "warning"
    assert page.locator("main b").count() == 0
    assert page.get_by_text("No deployments to this device yet.").is_visible()

    target = sim_id(s, "sim-0004")
    r = upload_artifact(s, b"simulated bytes", name="sensor", version="2.1.0", kind="app")
    assert r.status_code == 201, r.text
    r = s.api("POST", "/deployments", json={"artifact": "sensor@2.1.0", "devices": [target]})
    assert r.status_code == 201, r.text
    dep = r.json()["id"]
    wait_until(lambda: s.api("GET", f"/deployments/{dep}").json()["status"] == "succeeded", timeout=30,
               what="the deployment done")
    page.goto(f"{console.url}/devices/{target}")
    row = page.locator("#history tbody tr")
    assert row.count() == 1
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == dep and cells[1] == "sensor@2.1.0 app" and cells[2].startswith("succeeded")
    assert cells[4] == "2.1.0" and "by admin" in cells[5]
    no_csp_trouble(tab)


def test_presence_follows_the_device_without_a_reload(tab: BrowserPage, console: Console) -> None:
    s = console.server
    key = Key.new()
    connected, leave, left = threading.Event(), threading.Event(), threading.Event()

    def device() -> None:  # a device of its own: it connects, beats, and goes away when told
        async def run() -> None:
            ws, _ = await connect_device(s.ws_url, key, s.create_enrollment_token())
            connected.set()
            seq = 0
            while not leave.is_set():
                seq += 1
                await ws.send(codec.encode(p.Heartbeat(seq=seq)))
                with contextlib.suppress(TimeoutError):
                    while True:  # the server's acks, until it is quiet for a while
                        await asyncio.wait_for(ws.recv(), 0.3)
            await ws.close()
            left.set()

        asyncio.run(run())

    thread = threading.Thread(target=device, daemon=True)
    thread.start()
    try:
        assert connected.wait(15)
        wait_until(lambda: s.api("GET", f"/devices/{key.device_id}").json()["online"], what="online")
        page = tab.page
        browser_login(tab, console, "vera", next_path=f"/devices/{key.device_id}")
        badge = page.locator("#presence-online")
        assert badge.inner_text() == "online"
        seen = page.locator("#presence-seen").inner_text()
        assert seen.endswith("UTC")
        leave.set()
        assert left.wait(15)
        wait_until(lambda: badge.inner_text() == "offline", what="the page told the device went offline")
        assert "off" in (badge.get_attribute("class") or "")
        assert page.locator("#presence-seen").inner_text().endswith("UTC")
    finally:
        leave.set()
        thread.join(timeout=15)
    no_csp_trouble(tab)


# --- remote access -----------------------------------------------------------------------------------


def test_a_file_goes_up_to_the_agent_and_comes_back_the_same(tab: BrowserPage, console: Console,
                                                             tmp_path: Path) -> None:
    data = os.urandom(100_000)  # four messages of 32 KiB: progress, and the pieces in order
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    files = (console.agent.state_dir / "files").resolve()
    page = tab.page
    browser_login(tab, console, "olga", next_path=f"/devices/{console.device_id}")
    page.locator("#files summary").click()
    status = page.locator("#transfer-status")

    page.get_by_label("File to upload").set_input_files(str(local))
    page.locator("#upload-path").fill(f"{files}/")  # a directory: the file keeps its name
    page.get_by_role("button", name="Upload", exact=True).click()
    wait_until(lambda: status.inner_text().startswith("Uploaded"), timeout=20, what="the upload done")
    assert f"100000 bytes, SHA-256 {hashlib.sha256(data).hexdigest()} checked" in status.inner_text()
    assert (files / "blob.bin").read_bytes() == data  # on the device's disk
    assert page.locator("#transfer-progress").evaluate("p => p.value === p.max && p.max === 100000")

    page.locator("#download-path").fill(str(files / "blob.bin"))
    with page.expect_download() as download:
        page.get_by_role("button", name="Download", exact=True).click()
    assert download.value.suggested_filename == "blob.bin"
    assert Path(download.value.path()).read_bytes() == data
    assert status.inner_text().startswith("Downloaded") and "SHA-256" in status.inner_text()
    assert page.locator("#transfer-link").inner_text() == "Save blob.bin again (97.7 KB)"

    # the device's refusals, as it gave them: outside the allowed directories, too large
    page.locator("#download-path").fill("/etc/hostname")
    page.get_by_role("button", name="Download", exact=True).click()
    wait_until(lambda: "failed" in status.inner_text(), what="the download refused")
    assert "outside the directories this device allows" in status.inner_text()
    assert status.get_attribute("role") == "alert" and "error" in (status.get_attribute("class") or "")
    page.locator("#upload-path").fill("/tmp/corral-console-test.bin")
    page.get_by_role("button", name="Upload", exact=True).click()
    wait_until(lambda: status.inner_text().startswith("Uploading") and "failed" in status.inner_text(),
               what="the upload refused")
    assert "outside the directories this device allows" in status.inner_text()
    assert not Path("/tmp/corral-console-test.bin").exists()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(MAX_FILE + 1))
    page.get_by_label("File to upload").set_input_files(str(big))
    page.locator("#upload-path").fill(f"{files}/")
    page.get_by_role("button", name="Upload", exact=True).click()
    wait_until(lambda: "big.bin failed" in status.inner_text(), what="the large upload refused")
    assert f"{MAX_FILE + 1} bytes is more than this device accepts ({MAX_FILE}" in status.inner_text()
    assert not (files / "big.bin").exists()

    sessions = console.server.api("GET", "/sessions", params={"limit": 10}).json()
    kinds = [(x["kind"], x["user"]) for x in sessions if x["device_id"] == console.device_id]
    assert kinds.count(("upload", "olga")) == 3 and kinds.count(("download", "olga")) == 2
    no_csp_trouble(tab)


def test_the_device_web_ui_opens_in_a_new_tab(tab: BrowserPage, console: Console) -> None:
    app = DeviceApp()
    try:
        page = tab.page
        browser_login(tab, console, "olga", next_path=f"/devices/{console.device_id}")
        page.get_by_label("Port", exact=True).fill(str(app.port))
        with page.context.expect_page() as opened:
            page.get_by_role("button", name="Device web UI").click()
        ui = opened.value
        ui.wait_for_load_state()
        assert f"/devices/{console.device_id}/proxy/{app.port}/~" in ui.url  # the proxy's own address
        assert page.url == f"{console.url}/devices/{console.device_id}"  # the console stays
        ui.close()
    finally:
        app.stop()
    # at phone width, everything on the page fits the screen (tables scroll in their own box)
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    page.locator("#files summary").click()
    wait_until(lambda: page.locator("#chart canvas").count() == 1, what="the chart drawn")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.locator("#chart canvas").bounding_box()["width"] <= 390
    no_csp_trouble(tab)


# --- roles ---------------------------------------------------------------------------------------------


def test_a_viewer_sees_no_controls_and_the_server_refuses_a_forged_tag_edit(
        tab: BrowserPage, console: Console, login_as: Callable[[str], httpx.Client]) -> None:
    s, dev = console.server, console.device_id
    page = tab.page
    browser_login(tab, console, "vera", next_path=f"/devices/{dev}")
    assert page.locator("#tags").is_visible() and page.locator("#chart").count() == 1
    main = page.locator("main")
    assert main.get_by_role("button").count() == 0  # nothing that changes anything
    assert main.locator("form").count() == 0
    for name in ("Terminal", "Edit tag site"):
        assert page.get_by_role("link", name=name).count() == 0
    assert page.get_by_text("File transfer").count() == 0 and page.get_by_label("Port", exact=True).count() == 0
    # with her page's own CSRF token, the form's request is still refused
    csrf = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    status = page.evaluate("""async ([device, csrf]) => (await fetch(`/devices/${device}/tags`, {method: "POST",
        headers: {"Content-Type": "application/x-www-form-urlencoded"},
        body: new URLSearchParams({csrf_token: csrf, action: "set", key: "forged", value: "1"})})).status""",
                           [dev, csrf])
    assert status == 403
    assert "forged" not in s.api("GET", f"/devices/{dev}").json()["tags"]
    vera = login_as("vera")
    assert vera.get(f"/devices/{dev}/web-ui", params={"port": "80"}).status_code == 403

    # an operator without the remote-access permission: tags yes, remote access no
    otto = login_as("otto")
    html = otto.get(f"/devices/{dev}").text
    assert "Set tag" in html and 'id="files"' not in html and "web-ui" not in html and "/terminal" not in html
    assert otto.get(f"/devices/{dev}/web-ui", params={"port": "80"}).status_code == 403
    # a form without the CSRF token is refused even for an operator
    r = otto.post(f"/devices/{dev}/tags", data={"action": "set", "key": "nocsrf", "value": "1"})
    assert r.status_code == 403 and "nocsrf" not in s.api("GET", f"/devices/{dev}").json()["tags"]
    r = otto.post(f"/devices/{dev}/tags", data={"action": "set", "key": "withcsrf", "value": "1",
                                                 "csrf_token": page_csrf(otto, f"/devices/{dev}")})
    assert r.status_code == 303 and s.api("GET", f"/devices/{dev}").json()["tags"]["withcsrf"] == "1"
    assert s.api("PATCH", f"/devices/{dev}/tags", json={"remove": ["withcsrf"]}).status_code == 200
    no_csp_trouble(tab)
