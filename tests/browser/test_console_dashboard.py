"""The console's fleet pages in a real browser (issue 7): the dashboard against a fleet of
simulated devices, following it live (a device goes offline, an alert fires) without a reload;
groups made, filled, emptied and deleted through their page; the audit log showing it and its
chain verified; a viewer shown no mutating control and refused when forging one; every value
escaped. One server and one small simulated fleet for the module; plus the live stream over
plain HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import corral
from corral.errors import SelectorError
from corral.selectors import parse
from tests.browser.conftest import PASSWORD, SCRIPT_TAG, BrowserPage, form_csrf, make_console_user
from tests.conftest import ServerProc, corral_cmd, start_server, wait_until


@dataclass
class Fleet:
    server: ServerProc
    #: the devices of the simulator that keeps running, and of the one a test stops
    steady: list[str]
    leaving: str
    leaving_sim: subprocess.Popen[bytes]
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url


def start_sim(server: ServerProc, tmp: Path, n: int, name: str) -> subprocess.Popen[bytes]:
    token = server.create_enrollment_token(tags={"site": "berlin", "sim": name})
    with (tmp / f"{name}.log").open("ab") as log:
        return subprocess.Popen(corral_cmd("sim", "--server", server.url, "--devices", str(n), "--enroll-token", token,
                                           "--state-dir", str(tmp / name), "--telemetry-interval", "0"),
                                stdout=subprocess.DEVNULL, stderr=log)


def online(server: ServerProc, sim: str) -> list[str]:
    selector = f'online and tag.sim == "{sim}"'
    page = server.api("GET", "/devices", params={"selector": selector, "limit": 100}).json()
    return sorted(d["id"] for d in page["items"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    server = start_server(tmp, heartbeat=0.5, extra=["--alert-interval", "0.3"])
    sims: list[subprocess.Popen[bytes]] = []
    try:
        make_console_user(server, "olga", "operator")
        make_console_user(server, "vera", "viewer")
        sims = [start_sim(server, tmp, 3, "steady"), start_sim(server, tmp, 1, "leaving")]
        steady = wait_until(lambda: len(ids := online(server, "steady")) == 3 and ids, timeout=30, what="3 devices")
        leaving = wait_until(lambda: online(server, "leaving"), timeout=30, what="the fourth device")[0]
        r = server.api("PATCH", f"/devices/{steady[0]}/tags", json={"set": {"name": SCRIPT_TAG}})
        assert r.status_code == 200, r.text
        yield Fleet(server, steady, leaving, sims[1], {"admin": server.admin_password, "olga": PASSWORD,
                                                        "vera": PASSWORD})
    finally:
        for sim in sims:
            if sim.poll() is None:
                sim.send_signal(signal.SIGTERM)
                sim.wait(timeout=30)
        server.stop()


def log_in(tab: BrowserPage, fleet: Fleet, user: str, path: str = "/") -> Any:
    page = tab.page
    page.goto(f"{fleet.url}/login?next={path}")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(fleet.passwords[user])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/login" not in url)
    return page


def no_trouble(tab: BrowserPage) -> None:
    """Nothing the browser complained about (but the refusals a test asked for: an error page's
    status is reported too): no CSP violation, no script error, no script of ours run."""
    refusal = "Failed to load resource: the server responded with a status of 4"
    assert not [p for p in tab.problems if not p.startswith(refusal)], tab.problems
    assert tab.page.evaluate("window.__owned") is None
    assert tab.page.locator("script:not([src])").count() == 0


def figure(page: Any, name: str) -> int:
    return int(page.locator(f"#fig-{name}").inner_text())


def test_the_dashboard_shows_the_fleet_and_follows_it_live(tab: BrowserPage, fleet: Fleet) -> None:
    s = fleet.server
    alert = s.api("POST", "/alerts", json={"name": "gone-quiet", "kind": "offline", "for": "1s",
                                           "severity": "critical"})
    assert alert.status_code == 201, alert.text
    page = log_in(tab, fleet, "admin")
    assert page.url == fleet.url + "/"
    assert page.get_by_role("heading", name="Dashboard", level=1).is_visible()
    assert (figure(page, "online"), figure(page, "offline"), figure(page, "firing")) == (4, 0, 0)
    agents = page.locator("#agent-versions tbody tr")
    assert agents.count() == 1 and agents.first.inner_text().split("\t")[:2] == [corral.__version__, "4"]
    wait_until(lambda: page.get_by_role("status").inner_text().startswith("Live"), what="the live stream open")
    page.evaluate("window.__stillThere = true")  # gone if the page reloads
    fleet.leaving_sim.send_signal(signal.SIGKILL)  # a device drops off without saying goodbye
    fleet.leaving_sim.wait(timeout=10)
    wait_until(lambda: (figure(page, "online"), figure(page, "offline")) == (3, 1), timeout=20,
               what="the dashboard showing the device offline")
    wait_until(lambda: figure(page, "firing") == 1, timeout=20, what="the offline alert firing on the dashboard")
    item = page.locator("#alerts-list li").first
    assert "gone-quiet" in item.inner_text() and fleet.leaving in item.inner_text()
    assert item.get_by_role("link", name="gone-quiet").get_attribute("href") == "/alerts"
    assert page.evaluate("window.__stillThere") is True
    overview = s.api("GET", "/overview").json()  # the page says what the API says
    assert (overview["online"], overview["offline"]) == (3, 1)
    # a version links to its devices in the device list
    page.locator("#agent-versions").get_by_role("link", name=corral.__version__).click()
    page.wait_for_url(lambda url: "/devices?selector=" in url)
    assert page.locator("table.devices tbody tr").count() == 4
    no_trouble(tab)


def test_an_active_rollout_is_on_the_dashboard(tab: BrowserPage, fleet: Fleet) -> None:
    s = fleet.server
    upload = s.api("POST", "/artifacts", params={"name": "probe", "version": "1.0", "kind": "app"},
                   content=b"probe 1.0", headers={"Content-Type": "application/octet-stream"})
    assert upload.status_code == 201, upload.text
    r = s.api("POST", "/rollouts", json={"artifact": "probe@1.0", "selector": "online", "waves": "1,all",
                                         "pacing": {"wave_wait": 3600}})
    assert r.status_code == 201, r.text
    rollout_id = r.json()["id"]
    wait_until(lambda: s.api("GET", f"/rollouts/{rollout_id}").json()["devices"] > 0, what="the rollout placed")
    page = log_in(tab, fleet, "vera")
    row = page.locator("#rollouts tbody tr").filter(has_text=rollout_id)
    assert row.get_by_role("link", name=rollout_id).get_attribute("href") == f"/rollouts/{rollout_id}"
    assert "probe@1.0" in row.inner_text() and "1 of 2" in row.inner_text()  # the first of two waves
    assert row.locator("progress").count() == 1
    # the first wave's device installs it: its progress, then the software it runs, follow live
    wait_until(lambda: "1 / " in row.inner_text(), timeout=30, what="the first device done")
    software = page.locator("#software table").filter(has=page.locator("caption", has_text="app.probe"))
    wait_until(lambda: software.count() == 1, timeout=30, what="app.probe among the software the fleet runs")
    assert software.locator("tbody tr").first.inner_text().split("\t")[:2] == ["1.0", "1"]
    assert s.api("POST", f"/rollouts/{rollout_id}/pause").status_code == 200
    wait_until(lambda: "paused" in row.inner_text(), what="the pause shown live")
    assert s.api("POST", f"/rollouts/{rollout_id}/abort", json={}).status_code == 200
    wait_until(lambda: page.locator("#rollouts tbody").inner_text().strip() == "No rollout is running.",
               what="the aborted rollout gone from the dashboard")
    no_trouble(tab)


BAD_SELECTOR = 'tag.site == "berlin" and'


def test_groups_are_made_filled_emptied_and_deleted_through_their_page(tab: BrowserPage, fleet: Fleet) -> None:
    page = log_in(tab, fleet, "olga", "/groups")
    new = page.get_by_role("region", name="New group")
    new.get_by_label("Name").fill("broken")
    new.get_by_label("Dynamic: the devices a selector matches").check()
    new.get_by_label("Selector (dynamic groups)").fill(BAD_SELECTOR)
    new.get_by_role("button", name="Create group").click()
    with pytest.raises(SelectorError) as bad:
        parse(BAD_SELECTOR)
    assert page.get_by_role("alert").inner_text() == bad.value.detail  # "column 25: ..."
    assert new.get_by_label("Selector (dynamic groups)").input_value() == BAD_SELECTOR  # kept to be fixed
    assert fleet.server.api("GET", "/groups/broken").status_code == 404
    new.get_by_label("Selector (dynamic groups)").fill(f'tag.site == "berlin" or tag.name == "{SCRIPT_TAG}"')
    new.get_by_label("Description (optional)").fill(SCRIPT_TAG)
    new.get_by_role("button", name="Create group").click()
    page.wait_for_url(fleet.url + "/groups/broken")
    assert page.locator("#group-size").inner_text() == "4"
    assert SCRIPT_TAG in page.locator("main").inner_text()  # the selector and description, as text
    assert page.get_by_role("button", name="Add").count() == 0  # a dynamic group's members follow its selector
    page.get_by_role("link", name="Groups").first.click()
    new = page.get_by_role("region", name="New group")
    new.get_by_label("Name").fill("lab")
    new.get_by_role("button", name="Create group").click()
    page.wait_for_url(fleet.url + "/groups/lab")
    page.get_by_label("Add devices").fill(f"{fleet.steady[0]}, {fleet.steady[1]}")
    page.get_by_role("button", name="Add").click()
    page.wait_for_url(fleet.url + "/groups/lab")
    assert page.locator("#group-size").inner_text() == "2"
    assert SCRIPT_TAG in page.locator("table.devices").inner_text()  # the first device's name tag
    page.get_by_label("Add devices").fill("nosuchdevice")
    page.get_by_role("button", name="Add").click()
    assert "nosuchdevice" in page.get_by_role("alert").inner_text()
    page.get_by_role("button", name=f"Remove {fleet.steady[0]} from the group").click()
    page.wait_for_url(fleet.url + "/groups/lab")
    members = fleet.server.api("GET", "/groups/lab/devices").json()["items"]
    assert [d["id"] for d in members] == [fleet.steady[1]]
    assert page.locator("#group-size").inner_text() == "1"
    page.get_by_role("button", name="Delete group lab").click()
    page.wait_for_url(fleet.url + "/groups")
    assert page.locator("#group-lab").count() == 0 and page.locator("#group-broken").count() == 1
    assert fleet.server.api("GET", "/groups/lab").status_code == 404
    no_trouble(tab)


def test_the_audit_log_shows_what_was_done_and_its_chain_verifies(tab: BrowserPage, fleet: Fleet) -> None:
    s = fleet.server
    token = s.make_user("otto", "operator")
    r = s.api("POST", "/groups", token=token, json={"name": "audited", "selector": f'tag.x == "{SCRIPT_TAG}"'})
    assert r.status_code == 201, r.text
    page = log_in(tab, fleet, "admin", "/audit")
    rows = page.locator("table.audit tbody tr")
    seqs = [int(n) for n in rows.locator("td.num").all_inner_texts()]
    assert seqs == sorted(seqs, reverse=True) and len(seqs) > 5  # newest first
    done = rows.filter(has_text="user:otto").filter(has_text="group.create")
    assert done.count() == 1 and "audited" in done.inner_text()
    assert SCRIPT_TAG in done.locator("code.detail").inner_text()  # the detail, escaped
    page.get_by_label("Actor").fill("user:otto")
    page.get_by_label("Action (prefix)").fill("group.")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(lambda url: "actor=user%3Aotto" in url)
    rows = page.locator("table.audit tbody tr")
    assert rows.count() == 1 and "audited" in rows.first.inner_text()
    page.get_by_role("button", name="Verify the chain").click()
    result = page.locator("#verify-result")
    assert result.inner_text().startswith("The hash chain is intact:"), result.inner_text()
    assert page.get_by_label("Actor").input_value() == "user:otto"  # the filter stays
    no_trouble(tab)


FORGERIES = [("/groups", {"name": "forged", "kind": "static"}),
             ("/groups/static1/delete", {}),
             ("/groups/static1/members", {"device_ids": "DEVICE"}),
             ("/groups/static1/members/DEVICE/remove", {})]


def test_a_viewer_sees_no_mutating_control_and_forged_forms_are_refused(tab: BrowserPage, fleet: Fleet) -> None:
    s = fleet.server
    assert s.api("POST", "/groups", json={"name": "static1"}).status_code == 201
    assert s.api("POST", "/groups/static1/members", json={"device_ids": [fleet.steady[2]]}).status_code == 200
    page = log_in(tab, fleet, "vera", "/groups")
    assert page.get_by_role("heading", name="Groups").is_visible()
    assert page.get_by_role("button", name="Create group").count() == 0
    page.goto(fleet.url + "/groups/static1")
    assert page.get_by_role("link", name=fleet.steady[2]).is_visible()
    for name in ("Add", "Remove", "Delete group static1"):
        assert page.get_by_role("button", name=name).count() == 0, name
    page.goto(fleet.url + "/audit")
    assert page.get_by_role("button", name="Filter").is_visible()
    assert page.get_by_role("button", name="Verify the chain").count() == 0
    assert page.goto(fleet.url + "/audit?verify=true").status == 403
    # the viewer's own CSRF token, forms the page never offered: each refused, nothing changed
    csrf = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    for path, fields in FORGERIES:
        body = {**{k: v.replace("DEVICE", fleet.steady[2]) for k, v in fields.items()}, "csrf_token": csrf}
        status = page.evaluate("""async ([path, body]) => (await fetch(path, {method: "POST",
            headers: {"Content-Type": "application/x-www-form-urlencoded"},
            body: new URLSearchParams(body).toString(), redirect: "manual"})).status""",
                               [path.replace("DEVICE", fleet.steady[2]), body])
        assert status == 403, (path, status)
    assert s.api("GET", "/groups/forged").status_code == 404
    assert [d["id"] for d in s.api("GET", "/groups/static1/devices").json()["items"]] == [fleet.steady[2]]
    no_trouble(tab)


def test_the_dashboard_at_phone_width_and_from_the_keyboard(tab: BrowserPage, fleet: Fleet) -> None:
    page = tab.page
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(tab, fleet, "vera")
    for path in ("/", "/groups", "/groups/static1", "/audit"):
        page.goto(fleet.url + path)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path
    page.goto(fleet.url + "/")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # the skip link
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('href')") == "/devices?selector=online"
    no_trouble(tab)


# --- the live stream over plain HTTP ---------------------------------------------------------------


def http_login(fleet: Fleet, user: str) -> httpx.Client:
    c = httpx.Client(base_url=fleet.url, timeout=30)
    r = c.post("/login", data={"user": user, "password": fleet.passwords[user],
                               "csrf_token": form_csrf(c.get("/login").text)})
    assert r.status_code == 303, r.text
    return c


def first_event(client: httpx.Client) -> tuple[httpx.Response, dict[str, Any]]:
    with client.stream("GET", "/dashboard/live") as r:
        lines: list[str] = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data: "):
                return r, json.loads(line[len("data: "):])
    raise AssertionError(f"no event in {lines}")


def test_the_live_stream_sends_the_state_first_and_needs_a_login(fleet: Fleet) -> None:
    with httpx.Client(base_url=fleet.url, timeout=10) as anonymous:
        r = anonymous.get("/dashboard/live")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    c = http_login(fleet, "vera")
    try:
        response, state = first_event(c)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        overview = fleet.server.api("GET", "/overview").json()
        assert (state["online"], state["offline"]) == (overview["online"], overview["offline"])
        assert state["agent_versions"][0]["version"] == corral.__version__
        c.post("/logout", data={"csrf_token": form_csrf(c.get("/").text)})
        assert c.get("/dashboard/live").status_code == 401
    finally:
        c.close()


def test_the_fleet_forms_need_the_csrf_token_and_verifying_needs_an_admin(fleet: Fleet) -> None:
    c = http_login(fleet, "olga")  # an operator: may change groups, may not verify the audit log
    try:
        r = c.post("/groups", data={"name": "no-token", "kind": "static"})
        assert r.status_code == 403 and "CSRF" in r.text
        assert fleet.server.api("GET", "/groups/no-token").status_code == 404
        r = c.get("/audit", params={"verify": "true"})
        assert r.status_code == 403 and "needs the admin role" in r.text
        assert "Verify the chain" not in c.get("/audit").text
        csrf = form_csrf(c.get("/groups").text)
        r = c.post("/groups", data={"name": "with-token", "kind": "static", "csrf_token": csrf})
        assert r.status_code == 303 and r.headers["location"] == "/groups/with-token"
        assert fleet.server.api("GET", "/groups/with-token").json()["kind"] == "static"
    finally:
        c.close()


def test_the_audit_log_pages_back_by_cursor_with_its_filter(fleet: Fleet) -> None:
    with fleet.server.client() as api:
        for i in range(55):
            assert api.post("/groups", json={"name": f"paged-{i:02d}"}).status_code == 201
    c = http_login(fleet, "vera")
    try:
        def seqs(html: str) -> list[int]:
            return [int(part.split('"', 1)[0]) for part in html.split('<tr id="audit-')[1:]]

        first = c.get("/audit", params={"action": "group.create"})
        newest = seqs(first.text)
        assert len(newest) == 50 and newest == sorted(newest, reverse=True)
        assert "Older entries" in first.text
        link = next(part.split('"', 1)[0] for part in first.text.split('<a href="')[1:]
                    if part.split('"', 1)[0].startswith("/audit?") and "cursor=" in part.split('"', 1)[0])
        second = c.get(link.replace("&amp;", "&"))
        rest = seqs(second.text)
        assert rest and max(rest) < min(newest)  # older entries, none shown twice
        rows = second.text.split('<tr id="audit-')[1:]
        actions = [row.split('<td class="mono">', 3)[2].split("<", 1)[0] for row in rows]
        assert set(actions) == {"group.create"}  # the filter kept
    finally:
        c.close()
