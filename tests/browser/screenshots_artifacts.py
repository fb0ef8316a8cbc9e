"""Screenshots of the console's artifacts pages for docs/screenshots/ (called by
tests/browser/screenshots.py; alone, these pages only):

    .venv/bin/python -m tests.browser.screenshots_artifacts [OUT_DIR]

A real server with four simulated devices on loopback, Debian's chromium at 1280x800: the list
with an upload in the form (uploaded through the page, as a user would), and an artifact's page
with its SBOM's components and the rollout that installed it (made with the form).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.browser.conftest import CHROMIUM, VIEWPORT
from tests.browser.screenshots_updates import log_in
from tests.browser.sim_site import site, upload_app
from tests.conftest import wait_until
from tests.integration.test_artifacts import upload

SBOM = {"bomFormat": "CycloneDX", "specVersion": "1.5", "components": [
    {"type": "library", "name": name, "version": version, "purl": f"pkg:deb/debian/{name}@{version}"}
    for name, version in (("openssl", "3.0.13"), ("zlib", "1.3"), ("libcurl4", "7.88.1"), ("libsqlite3-0", "3.40.1"),
                          ("ca-certificates", "20230311"), ("libc6", "2.36"), ("python3.11", "3.11.2"))]}


def artifact_pages(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        fleet = site(Path(tmp_name), 4, ("--update-time", "0.5-1", "--telemetry-interval", "0"))
        s = next(fleet)
        try:
            server = s.server
            upload_app(server, "sensor", "1.4.0")
            r = upload(server, b"sensor 1.5.0 " * 4000, sbom=json.dumps(SBOM).encode(), name="sensor", version="1.5.0",
                       commit="9f3c2a7e51d04b6c",
                       build_url="https://ci.example.com/sensor/builds/1187")
            assert r.status_code == 201, r.text
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM))
                page = browser.new_context(viewport=VIEWPORT).new_page()
                log_in(page, s, "olga", "/artifacts")
                page.get_by_role("link", name="Roll out… sensor@1.5.0").click()
                page.wait_for_url(server.url + "/rollouts/new?artifact=sensor%401.5.0")
                page.get_by_label("Target selector").fill('tag.ring == "prod"')
                page.get_by_label("Waves").fill("all")
                page.get_by_role("button", name="Create rollout").click()
                page.wait_for_url(lambda url: "/rollouts/new" not in url)
                wait_until(lambda: page.locator("#r-status").inner_text() == "completed", timeout=60,
                           what="the rollout completed")
                page.goto(server.url + "/artifacts")
                page.get_by_label("File", exact=True).set_input_files(
                    {"name": "gateway.tar.zst", "mimeType": "application/octet-stream", "buffer": b"gw" * 30000})
                page.get_by_label("Name").fill("gateway")
                page.get_by_label("Version").fill("2.1.0")
                page.get_by_label("Kind").select_option("rootfs")
                page.get_by_label("Hardware models (optional)").fill("rpi4, imx8")
                page.get_by_role("button", name="Upload", exact=True).click()
                wait_until(lambda: page.locator("#upload-status").inner_text().startswith("Uploaded"),
                           what="the upload")
                page.screenshot(path=out / "artifacts.png", full_page=True)
                page.goto(f"{server.url}/artifacts/sensor/1.5.0")
                page.screenshot(path=out / "artifact.png", full_page=True)
                browser.close()
        finally:
            fleet.close()


if __name__ == "__main__":
    artifact_pages(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/screenshots"))
