"""Screenshots of the console's rollout, alert and webhook pages for docs/screenshots/ (called
by tests/browser/screenshots.py; alone, these pages only):

    .venv/bin/python -m tests.browser.screenshots_updates [OUT_DIR]

A real server with twelve simulated devices on loopback, Debian's chromium at 1280x800 (and a
rollout at phone width).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from tests.browser.conftest import CHROMIUM, VIEWPORT
from tests.browser.sim_site import Site, site, upload_app
from tests.conftest import wait_until
from tests.integration.webhook_receiver import Receiver


def log_in(page: Page, s: Site, user: str, next_path: str) -> None:
    page.goto(f"{s.url}/login?next={next_path}")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(s.passwords[user])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(s.url + next_path)


def update_pages(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    receiver = Receiver().start()
    with tempfile.TemporaryDirectory() as tmp_name:
        fleet = site(Path(tmp_name), 12, ("--update-time", "2-4", "--telemetry-interval", "2"),
                     ("--alert-interval", "1"), tags={"ring": "prod", "site": "lisbon"})
        s = next(fleet)
        try:
            server = s.server
            for version in ("1.4.0", "1.5.0"):
                upload_app(server, "sensor", version)
            server.api("POST", "/webhooks", json={"url": receiver.url, "events": ["alert.*", "rollout.*"],
                                                  "description": "on-call pager bridge"})
            server.api("POST", "/alerts", json={"name": "cpu-busy", "kind": "threshold", "by": "tag.site",
                                                "expr": "max(cpu.percent) >= 0 for 1s", "window": "30s"})
            server.api("POST", "/alerts", json={"name": "device-offline", "kind": "offline", "for": "10m",
                                                "severity": "critical"})
            done = server.api("POST", "/rollouts", json={"artifact": "sensor@1.4.0", "selector": 'tag.ring == "prod"',
                                                         "waves": "all", "pacing": {"max_concurrent": 12}}).json()["id"]
            wait_until(lambda: server.api("GET", f"/rollouts/{done}").json()["status"] == "completed", timeout=90,
                       what="the first rollout completed")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM))
                page = browser.new_context(viewport=VIEWPORT).new_page()
                log_in(page, s, "olga", "/rollouts/new")
                page.get_by_label("Artifact and version").select_option("sensor@1.5.0")
                page.get_by_label("Target selector").fill('tag.ring == "prod"')
                page.get_by_label("Waves").fill("1, 25%, 50%, all")
                page.get_by_label("Metric", exact=True).fill("app.crashes")
                page.get_by_label("Plus (metric's unit)").fill("0.5")
                page.get_by_label("Window").fill("1m")
                page.get_by_label("Installing at once").fill("2")
                wait_until(lambda: page.locator("#wave-sizes").inner_text().startswith("Devices per wave"),
                           what="the waves' sizes")
                page.screenshot(path=out / "rollout-new.png", full_page=True)
                page.get_by_role("button", name="Create rollout").click()
                page.wait_for_url(lambda url: "/rollouts/new" not in url)
                wait_until(lambda: int(page.locator("#r-progress").evaluate("p => p.value")) >= 4, timeout=60,
                           what="the rollout under way")
                page.screenshot(path=out / "rollout.png", full_page=True)
                phone = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
                log_in(phone, s, "olga", page.url.split(server.url, 1)[1])
                phone.wait_for_timeout(1500)
                phone.screenshot(path=out / "rollout-phone.png")
                page.goto(server.url + "/rollouts")
                page.screenshot(path=out / "rollouts.png")
                wait_until(lambda: server.api("GET", "/alerts/cpu-busy").json()["firing"], timeout=60,
                           what="the alert firing")
                page.goto(server.url + "/alerts")
                page.get_by_text("New alert").click()
                page.screenshot(path=out / "alerts.png", full_page=True)
                browser.close()
            with sync_playwright() as pw:  # webhooks are the admin's
                browser = pw.chromium.launch(executable_path=str(CHROMIUM))
                page = browser.new_context(viewport=VIEWPORT).new_page()
                log_in(page, s, "admin", "/webhooks")
                page.get_by_role("link", name=receiver.url).click()
                page.get_by_role("button", name="Send test").click()
                page.wait_for_timeout(1000)
                page.reload()
                page.screenshot(path=out / "webhook.png", full_page=True)
                browser.close()
        finally:
            fleet.close()
            receiver.stop()


if __name__ == "__main__":
    update_pages(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/screenshots"))
