"""The console's rollout pages in a real browser, against a real server and a fleet of simulated
devices (real agents whose installs are simulated: they download, verify and report).

A rollout made with the form progresses live to completion without the page reloading; pause and
resume from the page change what the page shows and what the engine does; a bad form shows the
API's own reason and creates nothing; a viewer sees no buttons and a forged POST is refused."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import BrowserPage, browser_login, form_csrf
from tests.browser.sim_site import Site, http_login, site, upload_app
from tests.browser.test_console_browser import no_csp_trouble
from tests.conftest import wait_until

N = 6
#: would run if a page rendered the selector as markup
SCRIPT = "<script>window.__owned = 1</script><b>bold</b>"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from site(tmp_path_factory.mktemp("rollouts"), N, ("--update-time", "0.6-1.0", "--telemetry-interval", "0"))


def rollouts(s: Site) -> list[dict[str, Any]]:
    r = s.server.api("GET", "/rollouts", params={"limit": 100})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def show(s: Site, rollout_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = s.server.api("GET", f"/rollouts/{rollout_id}").json()
    return doc


def told(s: Site, rollout_id: str) -> int:
    """How many of the rollout's devices have been told to update."""
    items = s.server.api("GET", f"/rollouts/{rollout_id}/devices", params={"limit": 1000}).json()["items"]
    return sum(1 for d in items if d["attempt"] > 0)


def create(s: Site, version: str, selector: str = 'tag.ring == "prod"', **pacing: Any) -> str:
    r = s.server.api("POST", "/rollouts", json={"artifact": f"sensor@{version}", "selector": selector, "waves": "all",
                                                "seed": 3, "pacing": pacing})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def progress(page: Any) -> tuple[int, int]:
    value, top = page.locator("#r-progress").evaluate("p => [p.value, p.max]")
    return int(value), int(top)


def test_a_rollout_made_with_the_form_progresses_live_to_completion(tab: BrowserPage, fleet: Site) -> None:
    upload_app(fleet.server, "sensor", "1.0.0")
    page = tab.page
    browser_login(tab, fleet, "olga", next_path="/rollouts")
    page.get_by_role("link", name="New rollout").click()
    page.wait_for_url(fleet.url + "/rollouts/new")
    page.get_by_label("Artifact and version").select_option("sensor@1.0.0")
    page.get_by_label("Target selector").fill('tag.ring == "prod"')
    wait_until(lambda: page.locator("#matching").inner_text() == f"{N} accepted devices match.",
               what="the live count of matching devices")
    page.get_by_label("Waves").fill("1, 50%, all")  # spaces are fine: the page sends 1,50%,all
    wait_until(lambda: page.locator("#wave-sizes").inner_text() == "Devices per wave: 1, 2, 3.",
               what="the waves' sizes for the matching devices")
    page.get_by_label("Installing at once").fill("2")
    page.get_by_role("button", name="Create rollout").click()
    page.wait_for_url(re.compile(r".*/rollouts/[0-9a-f]{16}$"))
    rollout_id = page.url.rsplit("/", 1)[1]
    page.evaluate("window.__same_page = 1")  # gone if the page were reloaded
    seen: set[int] = set()

    def finished() -> bool:
        value, top = progress(page)
        seen.add(value)
        return top == N and page.locator("#r-status").inner_text() == "completed"

    wait_until(finished, timeout=60, interval=0.1, what="the page to show the rollout completed")
    assert page.evaluate("window.__same_page") == 1
    assert progress(page) == (N, N)
    assert any(0 < v < N for v in seen), seen  # the bar moved through the waves, not in one jump
    assert page.locator("#r-progress-text").inner_text() == f"{N} of {N}"
    assert [page.locator(f"#wave-{w} .counts").inner_text() for w in (1, 2, 3)] == \
        ["1 succeeded", "2 succeeded", "3 succeeded"]
    wait_until(lambda: page.locator("#r-devices .state-succeeded").count() == N, what="the devices table, live")
    doc = show(fleet, rollout_id)
    assert doc["status"] == "completed" and doc["spec"]["waves"] == "1,50%,all"
    assert doc["spec"]["pacing"]["max_concurrent"] == 2 and doc["created_by"] == "olga"
    page.get_by_role("link", name="Rollouts").first.click()
    page.wait_for_url(fleet.url + "/rollouts")
    row = page.locator(f"#rollout-{rollout_id}")
    assert "completed" in row.inner_text() and "sensor@1.0.0" in row.inner_text()
    no_csp_trouble(tab)


def test_pause_and_resume_from_the_page(tab: BrowserPage, fleet: Site) -> None:
    upload_app(fleet.server, "sensor", "2.0.0")
    rollout_id = create(fleet, "2.0.0", max_concurrent=1)  # one device at a time: several seconds in all
    page = tab.page
    browser_login(tab, fleet, "olga", next_path=f"/rollouts/{rollout_id}")
    wait_until(lambda: progress(page)[0] >= 1, timeout=30, what="a first device done")
    with page.expect_navigation():
        page.get_by_role("button", name="Pause").click()
    wait_until(lambda: page.locator("#r-status").inner_text() == "paused", what="the page to show paused")
    assert page.locator("#r-reason").inner_text() == "paused by an operator"
    assert page.get_by_role("button", name="Resume").is_visible()
    assert not page.get_by_role("button", name="Pause").is_visible()
    assert show(fleet, rollout_id)["status"] == "paused"
    # the engine obeys: the device told before the pause may finish, nobody else is told
    before = told(fleet, rollout_id)
    assert before < N
    for _ in range(6):
        time.sleep(0.5)
        assert told(fleet, rollout_id) == before
    page.evaluate("window.__same_page = 1")
    with page.expect_navigation():
        page.get_by_role("button", name="Resume").click()
    wait_until(lambda: page.locator("#r-status").inner_text() in ("running", "completed"), what="running again")
    page.evaluate("window.__same_page = 1")
    wait_until(lambda: page.locator("#r-status").inner_text() == "completed", timeout=60, interval=0.2,
               what="the page to show the rollout completed")
    assert page.evaluate("window.__same_page") == 1  # the end came live, after the resume's page load
    assert told(fleet, rollout_id) == N and progress(page) == (N, N)
    actions = [e["action"] for e in fleet.server.api("GET", "/audit").json()["items"] if e["target"] == rollout_id]
    assert "rollout.pause" in actions and "rollout.resume" in actions
    no_csp_trouble(tab)


def test_a_bad_form_shows_the_apis_reason_and_creates_nothing(tab: BrowserPage, fleet: Site) -> None:
    upload_app(fleet.server, "sensor", "3.0.0")
    before = len(rollouts(fleet))

    def api_reason(**body: Any) -> str:
        r = fleet.server.api("POST", "/rollouts", json={"artifact": "sensor@3.0.0", "selector": 'tag.ring == "prod"',
                                                        "waves": "all", **body})
        assert r.status_code == 400, r.text
        return str(r.json()["detail"])

    page = tab.page
    browser_login(tab, fleet, "olga", next_path="/rollouts/new")
    page.get_by_label("Artifact and version").select_option("sensor@3.0.0")
    page.get_by_label("Target selector").fill('tag.ring == ')
    wait_until(lambda: page.locator("#matching").inner_text().startswith("Not a selector:"),
               what="the selector's error while typing")
    page.get_by_label("Waves").fill("")
    with page.expect_navigation():
        page.get_by_role("button", name="Create rollout").click()
    assert page.get_by_role("alert").inner_text() == "The rollout was not created: see the fields marked below."
    assert page.locator("#waves-error").inner_text() == api_reason(waves="")
    assert page.locator("#selector-error").inner_text() == api_reason(selector="tag.ring == ")
    assert page.get_by_label("Waves").get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Target selector").input_value() == "tag.ring == "  # what was typed is kept
    # a form whose fields are fine but that the service refuses: its reason, above the form
    page.get_by_label("Target selector").fill('tag.ring == "nowhere"')
    page.get_by_label("Waves").fill("10%,all")
    with page.expect_navigation():
        page.get_by_role("button", name="Create rollout").click()
    assert page.get_by_role("alert").inner_text() == api_reason(selector='tag.ring == "nowhere"')
    page.get_by_label("Target selector").fill('tag.ring == "prod"')
    page.get_by_label("Failure threshold (%)").fill("150")
    with page.expect_navigation():  # by keyboard: Enter in a field submits the form
        page.get_by_label("Failure threshold (%)").press("Enter")
    assert page.locator("#max_failure_rate-error").inner_text() == "Input should be less than 1"
    assert len(rollouts(fleet)) == before
    no_csp_trouble(tab)


def test_a_viewer_sees_no_buttons_and_a_forged_post_is_refused(tab: BrowserPage, fleet: Site) -> None:
    upload_app(fleet.server, "sensor", "4.0.0")
    before = len(rollouts(fleet))
    selector = f'tag.ring == "prod" or tag.name == "{SCRIPT}"'
    rollout_id = create(fleet, "4.0.0", selector=selector, max_per_minute=1)
    r = fleet.server.api("POST", f"/rollouts/{rollout_id}/pause")
    assert r.status_code == 200, r.text
    page = tab.page
    browser_login(tab, fleet, "vera", next_path="/rollouts")
    assert page.get_by_role("link", name="New rollout").count() == 0
    assert selector in page.locator(f"#rollout-{rollout_id}").inner_text()  # the selector, as text
    page.goto(f"{fleet.url}/rollouts/{rollout_id}")
    assert page.locator("#r-status").inner_text() == "paused"
    assert selector in page.locator("main").inner_text()
    assert page.evaluate("window.__owned") is None and page.locator("main b").count() == 0
    assert [b.inner_text() for b in page.get_by_role("button").all()] == ["Log out"]
    page.set_viewport_size({"width": 390, "height": 844})  # phone width: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    response = page.goto(f"{fleet.url}/rollouts/new")
    assert response is not None and response.status == 403
    no_csp_trouble(tab)

    vera = http_login(fleet, "vera")
    olga = http_login(fleet, "olga")
    try:
        csrf = form_csrf(vera.get(f"/rollouts/{rollout_id}").text)
        for action in ("resume", "abort"):
            r = vera.post(f"/rollouts/{rollout_id}/{action}", data={"csrf_token": csrf, "revert": "on"})
            assert r.status_code == 403 and "needs the operator role" in r.text
        r = vera.post("/rollouts/new", data={"csrf_token": csrf, "artifact": "sensor@4.0.0", "waves": "all",
                                             "selector": 'tag.ring == "prod"'})
        assert r.status_code == 403
        r = olga.post(f"/rollouts/{rollout_id}/abort", data={})  # an operator, but no CSRF token
        assert r.status_code == 403 and "CSRF" in r.text
        assert show(fleet, rollout_id)["status"] == "paused"
        assert len(rollouts(fleet)) == before + 1  # the forged form created nothing
        # the operator, with the page's token: aborted, reverting what it updated
        r = olga.post(f"/rollouts/{rollout_id}/abort", data={"csrf_token": form_csrf(olga.get("/rollouts").text),
                                                             "revert": "on"})
        assert r.status_code == 303 and show(fleet, rollout_id)["status"] == "aborted"
        [entry] = [e for e in fleet.server.api("GET", "/audit", params={"action": "rollout.abort"}).json()["items"]
                   if e["target"] == rollout_id]
        assert entry["actor"] == "user:olga" and entry["detail"] == {"revert": True}
    finally:
        vera.close()
        olga.close()
