"""The console's alert and webhook pages in a real browser, against a real server and a simulated
device that reports metrics, with a real webhook receiver on loopback.

An alert made with the form fires on the device's metrics and is disabled, enabled and deleted
from the page; a webhook made with the form shows its secret once, sends a test that is delivered
and logged, a failed delivery is retried from the page; bad forms show the API's reasons with
the typed values kept as text; viewers and operators see what their role allows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import BrowserPage, browser_login, form_csrf
from tests.browser.sim_site import Site, http_login, site
from tests.browser.test_console_browser import no_csp_trouble
from tests.conftest import wait_until
from tests.integration.webhook_receiver import Receiver

SCRIPT = "<script>window.__owned = 1</script><b>bold</b>"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with pytest.MonkeyPatch.context() as mp:
        # a delivery that keeps failing is given up after about 2 s (the ~24 h schedule, scaled)
        mp.setenv("CORRAL_WEBHOOK_RETRY_SCALE", "0.00002")
        yield from site(tmp_path_factory.mktemp("alerts"), 1, ("--telemetry-interval", "0.5"),
                        ("--alert-interval", "0.3"), tags={"ring": "prod", "site": "lab"})


def text_of(page: Any, selector: str) -> str:
    loc = page.locator(selector)
    return str(loc.inner_text()) if loc.count() else ""


def submit(page: Any, button: str) -> None:
    """Press a form's button and wait for the page it leads to (often the same URL again)."""
    with page.expect_navigation():
        page.get_by_role("button", name=button).click()


def reload_until(page: Any, check: Any, what: str, timeout: float = 30) -> None:
    """Reload the page until ``check()`` holds (pages without a live stream)."""

    def again() -> bool:
        page.reload()
        return bool(check())

    wait_until(again, timeout=timeout, interval=0.3, what=what)


def test_an_alert_made_with_the_form_fires_and_is_changed_from_the_page(tab: BrowserPage, fleet: Site) -> None:
    page = tab.page
    browser_login(tab, fleet, "olga", next_path="/alerts")
    page.get_by_text("New alert").click()
    page.get_by_label("Name").fill("lab-cpu")
    page.get_by_label("Kind").select_option("threshold")
    page.get_by_label("Selector").fill('tag.ring == "prod"')
    page.get_by_label("Threshold expression").fill("max(cpu.percent) >= 0 for 1s")
    page.get_by_label("Window").fill("10s")
    page.get_by_label("Per tag").fill("tag.site")
    page.get_by_role("button", name="Create alert").click()
    page.wait_for_url(lambda url: "/alerts/" in url)
    alert_id = page.url.rsplit("/", 1)[1]
    assert page.get_by_role("heading", name="Alert lab-cpu").is_visible()
    # the sim device's cpu.percent makes it fire: one instance, for its site, shown live
    page.evaluate("window.__same_page = 1")
    wait_until(lambda: "firing" in text_of(page, "table.instances tbody"), timeout=30, interval=0.2,
               what="the alert firing on the page")
    row = page.locator("table.instances tbody tr").first
    assert row.locator("td").first.inner_text() == "lab"
    assert page.locator("#live-badge").inner_text() == "1 firing" and page.evaluate("window.__same_page") == 1
    page.get_by_role("link", name="Alerts").first.click()
    page.wait_for_url(fleet.url + "/alerts")
    assert "1 firing" in page.locator(f"#alert-{alert_id}").inner_text()
    submit(page, "Disable lab-cpu")
    assert "disabled" in page.locator(f"#alert-{alert_id}").inner_text()
    assert fleet.server.api("GET", f"/alerts/{alert_id}").json()["enabled"] is False
    submit(page, "Enable lab-cpu")
    assert fleet.server.api("GET", f"/alerts/{alert_id}").json()["enabled"] is True
    submit(page, "Delete lab-cpu")
    assert page.url == fleet.url + "/alerts" and page.locator(f"#alert-{alert_id}").count() == 0
    assert fleet.server.api("GET", f"/alerts/{alert_id}").status_code == 404
    actions = [e["action"] for e in fleet.server.api("GET", "/audit").json()["items"] if e["actor"] == "user:olga"]
    assert {"alert.create", "alert.disable", "alert.enable", "alert.delete"} <= set(actions)
    no_csp_trouble(tab)


def test_a_bad_alert_shows_the_apis_reason_and_a_script_stays_text(tab: BrowserPage, fleet: Site) -> None:
    page = tab.page
    browser_login(tab, fleet, "olga", next_path="/alerts")
    page.get_by_text("New alert").click()
    page.get_by_label("Name").fill(SCRIPT)
    page.get_by_label("Selector").fill(f'tag.name == "{SCRIPT}"')
    page.get_by_label("Threshold expression").fill("avg(cpu.percent) > 80 for 5m")
    submit(page, "Create alert")
    r = fleet.server.api("POST", "/alerts", json={"name": SCRIPT, "kind": "threshold",
                                                   "expr": "avg(cpu.percent) > 80 for 5m"})
    assert r.status_code == 400
    assert "name: " + page.locator("#name-error").inner_text() == r.json()["detail"]
    assert page.get_by_label("Name").input_value() == SCRIPT  # kept, as a value
    assert page.evaluate("window.__owned") is None and page.locator("main b").count() == 0
    page.get_by_label("Name").fill("hot")
    page.get_by_label("Threshold expression").fill("avg(cpu.percent > 80")
    submit(page, "Create alert")
    r = fleet.server.api("POST", "/alerts", json={"name": "hot", "kind": "threshold", "expr": "avg(cpu.percent > 80"})
    assert page.get_by_role("alert").inner_text() == r.json()["detail"]
    # a valid alert whose selector holds the script: listed as text
    page.get_by_label("Threshold expression").fill("avg(cpu.percent) > 80 for 5m")
    page.get_by_role("button", name="Create alert").click()
    page.wait_for_url(lambda url: "/alerts/" in url)
    assert SCRIPT in page.locator("main").inner_text()
    page.goto(fleet.url + "/alerts")
    assert SCRIPT in page.locator("main").inner_text()
    assert page.evaluate("window.__owned") is None and page.locator("main b").count() == 0
    no_csp_trouble(tab)


def test_a_webhook_made_with_the_form_sends_a_test_and_its_log_shows_it(tab: BrowserPage, fleet: Site,
                                                                     receiver: Receiver) -> None:
    page = tab.page
    browser_login(tab, fleet, "admin", next_path="/webhooks")
    page.get_by_text("New webhook").click()
    page.get_by_label("URL").fill(receiver.url)
    page.get_by_label("Events").fill("alert.* rollout.*")
    page.get_by_label("Description").fill(SCRIPT)
    page.get_by_role("button", name="Create webhook").click()
    secret = page.get_by_label("Signing secret").input_value()
    assert secret.startswith("whsec_")
    page.get_by_role("link", name="Go to the webhook").click()
    page.wait_for_url(lambda url: "/webhooks/wh_" in url)
    hook_id = page.url.rsplit("/", 1)[1]
    main = page.locator("main").inner_text()
    assert secret not in main and SCRIPT in main  # masked from now on; the description is text
    assert page.evaluate("window.__owned") is None and page.locator("main b").count() == 0
    submit(page, "Send test")
    reload_until(page, lambda: "delivered" in text_of(page, "table.deliveries tbody"), "the test delivered")
    assert "webhook.test" in text_of(page, "table.deliveries tbody") and "HTTP 200" in text_of(page, "tbody")
    [event] = receiver.verified(secret)  # signed with the secret shown once
    assert event["type"] == "webhook.test" and event["data"]["requested_by"] == "admin"

    # a receiver that keeps failing: the delivery is given up, then retried from the page
    receiver.set_default(503)
    submit(page, "Send test")
    reload_until(page, lambda: page.get_by_role("button", name="Retry").count() == 1, "the delivery failed")
    assert "HTTP 503" in text_of(page, "table.deliveries tbody")
    receiver.set_default(200)
    submit(page, "Retry")
    reload_until(page, lambda: text_of(page, "table.deliveries tbody").count("delivered") == 2, "the retry delivered")
    assert len(receiver.verified(secret)) > 2

    submit(page, "Disable")
    assert fleet.server.api("GET", f"/webhooks/{hook_id}").json()["enabled"] is False
    assert page.get_by_role("button", name="Send test").is_disabled()
    submit(page, "Delete")
    assert page.url == fleet.url + "/webhooks" and page.locator(f"#webhook-{hook_id}").count() == 0
    assert fleet.server.api("GET", f"/webhooks/{hook_id}").status_code == 404
    page.get_by_text("New webhook").click()
    page.get_by_label("URL").fill("ftp://127.0.0.1/x")
    submit(page, "Create webhook")
    assert page.locator("#url-error").inner_text() == "url must start with http:// or https://, not 'ftp:'"
    no_csp_trouble(tab)


def test_viewers_and_operators_see_and_may_do_what_their_role_allows(tab: BrowserPage, fleet: Site,
                                                                     receiver: Receiver) -> None:
    hook = fleet.server.api("POST", "/webhooks", json={"url": receiver.url, "events": ["alert.*"]}).json()
    alert = fleet.server.api("POST", "/alerts", json={"name": "gone", "kind": "offline", "for": "10m"}).json()
    page = tab.page
    browser_login(tab, fleet, "vera", next_path="/alerts")
    assert page.locator(f"#alert-{alert['id']}").is_visible()
    assert [b.inner_text() for b in page.get_by_role("button").all()] == ["Log out"]
    assert page.get_by_text("New alert").count() == 0
    assert page.get_by_role("link", name="Webhooks", exact=True).count() == 0  # not in a viewer's navigation
    response = page.goto(fleet.url + "/webhooks")
    assert response is not None and response.status == 403
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{fleet.url}/alerts/{alert['id']}")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    no_csp_trouble(tab)
    vera, olga = http_login(fleet, "vera"), http_login(fleet, "olga")
    try:
        csrf = form_csrf(vera.get("/alerts").text)
        for path in (f"/alerts/{alert['id']}/disable", f"/alerts/{alert['id']}/delete", "/alerts/new"):
            r = vera.post(path, data={"csrf_token": csrf, "name": "x", "kind": "offline", "for": "1m"})
            assert r.status_code == 403, (path, r.status_code)
        # an operator reads webhooks but may not change them (the API's rule: admins only)
        page_html = olga.get("/webhooks").text
        assert hook["url"] in page_html and "Send test" not in page_html and hook["secret"] not in page_html
        csrf = form_csrf(page_html)
        for action in ("test", "disable", "delete"):
            r = olga.post(f"/webhooks/{hook['id']}/{action}", data={"csrf_token": csrf})
            assert r.status_code == 403 and "needs the admin role" in r.text
    finally:
        vera.close()
        olga.close()
    assert fleet.server.api("GET", f"/alerts/{alert['id']}").json()["enabled"] is True
    assert fleet.server.api("GET", f"/webhooks/{hook['id']}").json()["enabled"] is True
    assert not fleet.server.api("GET", f"/webhooks/{hook['id']}/deliveries").json()["items"]
