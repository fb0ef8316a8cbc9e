"""Screenshots of the console's main pages for docs/screenshots/ (shown in the README).

    .venv/bin/python -m tests.browser.screenshots [OUT_DIR]

A real server and agent on loopback, Debian's chromium, 1280x800 (and the device list at phone
width). Not part of the test run: the pictures change a little on every run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Page, sync_playwright
from websockets.sync.client import connect

from tests.browser.conftest import CHROMIUM, PASSWORD, VIEWPORT, make_console_user
from tests.browser.screenshots_artifacts import artifact_pages
from tests.browser.screenshots_updates import update_pages
from tests.conftest import AgentProc, ServerProc, start_agent, start_server, wait_until


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = start_server(tmp)
        agents = []
        try:
            make_console_user(server, "olga", "operator", remote_access=True)
            config = tmp / "agent.toml"
            config.write_text("[telemetry]\ninterval = 1\n")  # the device page's chart has points
            token = server.create_enrollment_token()
            for i in range(3):
                agents.append(start_agent(server, tmp / f"agent{i}", token, "--config", str(config)))
            ids = [a.wait_device_id() for a in agents]
            for dev, site in zip(ids, ("berlin", "berlin", "lisbon"), strict=True):
                wait_until(lambda d=dev: server.api("GET", f"/devices/{d}").json().get("online"), what="online")
                server.api("PATCH", f"/devices/{dev}/tags", json={"set": {"site": site, "ring": "canary"}})
            dev = ids[0]
            r = server.api("POST", f"/devices/{dev}/sessions", json={"kind": "terminal",
                                                                     "params": {"cols": 100, "rows": 24}})
            doc = r.json()
            url = server.url.replace("http", "ws", 1) + doc["ws_path"] + "?token=" + doc["token"]
            with connect(url, additional_headers={"Authorization": f"Bearer {server.admin_token}"}) as ws:
                ws.send(b"uname -sm; df -h / | tail -1\nexit\n")
                while not (isinstance(m := ws.recv(timeout=15), str) and json.loads(m)["type"] == "exit"):
                    pass
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM))
                page = browser.new_context(viewport=VIEWPORT).new_page()
                page.goto(server.url + "/login")
                page.get_by_label("User name").fill("admin")
                page.screenshot(path=out / "login.png")
                page.get_by_label("Password").fill(server.admin_password)
                page.get_by_role("button", name="Log in").click()
                page.wait_for_url(server.url + "/devices")
                page.screenshot(path=out / "devices.png")
                query = {"metric": "cpu.percent", "device": dev, "since": "15m", "step": "10s"}
                wait_until(lambda: len((server.api("GET", "/metrics/query", params=query).json()["series"]
                                        or [{"points": []}])[0]["points"]) >= 5, timeout=120, what="a chart's points")
                page.goto(f"{server.url}/devices/{dev}")
                page.get_by_label("15 min").check()
                wait_until(lambda: int(page.locator("#chart").get_attribute("data-points") or 0) >= 5,
                           what="the chart drawn")  # not wait_for_function: the CSP has no unsafe-eval
                page.screenshot(path=out / "device.png", full_page=True)
                page.get_by_role("link", name="Terminal").click()
                wait_until(lambda: page.get_by_role("status").inner_text().startswith("Connected"), what="connected")
                page.locator(".xterm-helper-textarea").focus()
                page.keyboard.type("uptime; ls /\n")
                page.wait_for_timeout(800)
                page.screenshot(path=out / "terminal.png")
                page.goto(server.url + "/sessions")
                page.screenshot(path=out / "sessions.png")
                page.goto(f"{server.url}/sessions/{doc['id']}/playback")
                page.get_by_label("Speed").select_option("16")
                page.get_by_role("button", name="Play").click()
                wait_until(lambda: page.get_by_role("status").inner_text() == "Finished.", what="played")
                page.screenshot(path=out / "playback.png")
                phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1)
                mobile = phone.new_page()
                mobile.goto(server.url + "/login")
                mobile.get_by_label("User name").fill("olga")
                mobile.get_by_label("Password").fill(PASSWORD)
                mobile.get_by_role("button", name="Log in").click()
                mobile.wait_for_url(server.url + "/devices")
                mobile.screenshot(path=out / "devices-phone.png", full_page=True)
                fleet_pages(server, page, agents, ids, out)
                browser.close()
        finally:
            for a in agents:
                a.stop()
            server.stop()
    update_pages(out)  # rollouts, alerts and webhooks, with a fleet of simulated devices of their own
    artifact_pages(out)  # the artifacts list (an upload through the page) and an artifact's page


def fleet_pages(server: ServerProc, page: Page, agents: list[AgentProc], ids: list[str], out: Path) -> None:
    """The dashboard (one device gone offline, its alert firing), groups and the audit log."""
    server.api("POST", "/alerts", json={"name": "device-offline", "kind": "offline", "for": "1s",
                                        "severity": "critical"})
    server.api("POST", "/groups", json={"name": "berlin", "selector": 'tag.site == "berlin"',
                                        "description": "every device at the Berlin site"})
    server.api("POST", "/groups", json={"name": "canary-lab", "description": "bench devices for first installs"})
    server.api("POST", "/groups/canary-lab/members", json={"device_ids": ids[:2]})
    agents[-1].stop()
    wait_until(lambda: server.api("GET", "/overview").json()["firing_alerts"], timeout=40, what="the alert firing")
    page.goto(server.url + "/")
    page.wait_for_timeout(500)
    page.screenshot(path=out / "dashboard.png", full_page=True)
    page.goto(server.url + "/groups")
    page.screenshot(path=out / "groups.png", full_page=True)
    page.goto(server.url + "/groups/canary-lab")
    page.screenshot(path=out / "group.png", full_page=True)
    page.goto(server.url + "/audit")
    page.screenshot(path=out / "audit.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/screenshots"))
