"""The console's artifacts pages in a real browser, against a real server and simulated devices:
a release uploaded through the page (streamed as the raw body of the API's upload, with its SBOM)
is listed with its components and rolled out from the browser to completion; the API's refusals
(a version that exists, a file too large, a name or version holding markup) are shown beside the
form and store nothing; a deployed artifact's delete is refused with the API's reason and an
unused one is deleted; a viewer sees no upload or delete, and a forged upload is refused."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from corral.server.console_artifacts import ARTIFACTS_PER_PAGE
from tests.browser.conftest import BrowserPage, browser_login, form_csrf
from tests.browser.sim_site import Site, http_login, site, upload_app
from tests.browser.test_console_browser import no_csp_trouble
from tests.conftest import wait_until
from tests.integration.test_artifacts import CYCLONEDX, upload

N = 3
LIMIT = 200_000  # the server's --max-artifact-bytes here
#: would run, or make bold text, if a page rendered it as markup
SCRIPT = "<script>window.__owned = 1</script><b>bold</b>"
SBOM = {**CYCLONEDX, "components": [*CYCLONEDX["components"], {"type": "library", "name": SCRIPT, "version": "1"}]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from site(tmp_path_factory.mktemp("artifacts"), N, ("--update-time", "0.2-0.4", "--telemetry-interval", "0"),
                    ("--max-artifact-bytes", str(LIMIT)))


def listed(s: Site) -> list[str]:
    r = s.server.api("GET", "/artifacts", params={"limit": 100})
    assert r.status_code == 200, r.text
    return [f"{a['name']}@{a['version']}" for a in r.json()["items"]]


def api_refusal(s: Site, status: int, data: bytes, **params: Any) -> str:
    """What the API itself answers to the same upload (nothing stored either way)."""
    r = upload(s.server, data, **params)
    assert r.status_code == status, r.text
    return str(r.json()["detail"])


def fill_upload(page: Any, name: str, version: str, data: bytes, sbom: bytes = b"", kind: str = "app") -> None:
    page.get_by_label("File", exact=True).set_input_files({"name": "release.bin", "mimeType": "application/x-tar",
                                                           "buffer": data})
    page.get_by_label("SBOM (optional)").set_input_files(
        {"name": "sbom.json", "mimeType": "application/json", "buffer": sbom} if sbom else [])
    page.get_by_label("Name").fill(name)
    page.get_by_label("Version").fill(version)
    page.get_by_label("Kind").select_option(kind)


def no_markup(page: Any) -> None:
    assert page.evaluate("window.__owned") is None and page.locator("main b").count() == 0


def test_a_release_uploaded_in_the_browser_is_listed_and_rolled_out(tab: BrowserPage, fleet: Site) -> None:
    data = (b"\x00web release 1.0.0\xff" * 600)[:10_000]
    sbom = json.dumps(SBOM).encode()
    page = tab.page
    browser_login(tab, fleet, "olga", next_path="/artifacts")
    page.evaluate("window.__same_page = 1")  # gone if the page were reloaded
    fill_upload(page, "web", "1.0.0", data, sbom)
    page.get_by_label("Git commit (optional)").fill("0123abcd")
    page.get_by_role("button", name="Upload", exact=True).click()
    wait_until(lambda: page.locator("#upload-status").inner_text().startswith("Uploaded"), what="the upload done")
    assert page.locator("#upload-status").inner_text() == "Uploaded web@1.0.0 (9.8 KB, 3 SBOM components)."
    assert page.locator("#upload-progress").evaluate("p => p.value === p.max && !p.hidden")
    row = page.locator("#artifact-web_1_0_0")
    assert "just-uploaded" in (row.get_attribute("class") or "")  # the list was read again, not the page
    assert page.evaluate("window.__same_page") == 1
    text = row.inner_text()
    for part in ("web@1.0.0", "app", "9.8 KB", "any", "olga", "0123abcd", "3 components", "CycloneDX 1.5"):
        assert part in text, (part, text)
    assert page.get_by_label("Name").input_value() == ""  # the form is ready for the next one
    # what the server stored: the SBOM's bytes went first, the artifact's after, as the API wants
    doc = fleet.server.api("GET", "/artifacts/web/1.0.0").json()
    assert doc["sha256"] == hashlib.sha256(data).hexdigest() and doc["size"] == len(data)
    assert doc["hardware"] == []
    assert doc["provenance"]["git_commit"] == "0123abcd" and doc["created_by"] == "olga"
    assert [c["name"] for c in doc["components"]] == ["OpenSSL", "zlib", SCRIPT]
    [entry] = [e for e in fleet.server.api("GET", "/audit", params={"action": "artifact.upload"}).json()["items"]
               if e["target"] == "web@1.0.0"]
    assert entry["actor"] == "user:olga" and entry["detail"]["sbom"] == "CycloneDX 1.5"

    page.get_by_role("link", name="web@1.0.0", exact=True).click()
    page.wait_for_url(fleet.url + "/artifacts/web/1.0.0")
    assert page.locator("#components tbody tr").count() == 3
    assert SCRIPT in page.locator("#components").inner_text()  # a component's name, as text
    no_markup(page)
    page.get_by_label("Find a component").fill("openssl")
    page.get_by_label("Find a component").press("Enter")  # the keyboard searches
    page.wait_for_url(re.compile(r".*\?q=openssl.*"))
    assert page.locator("#components tbody tr").all_inner_texts() == [
        "OpenSSL\t3.0.13\tlibrary\tpkg:deb/debian/openssl@3.0.13"]
    assert page.locator("#components-count").inner_text() == "1 of 3 match."

    page.get_by_role("link", name="Roll out…").click()
    page.wait_for_url(fleet.url + "/rollouts/new?artifact=web%401.0.0")
    assert page.get_by_label("Artifact and version").input_value() == "web@1.0.0"
    page.get_by_label("Target selector").fill('tag.ring == "prod"')
    page.get_by_label("Waves").fill("1, all")
    wait_until(lambda: page.locator("#matching").inner_text() == f"{N} accepted devices match.", what="the count")
    page.get_by_role("button", name="Create rollout").click()
    page.wait_for_url(re.compile(r".*/rollouts/[0-9a-f]{16}$"))
    rollout_id = page.url.rsplit("/", 1)[1]
    wait_until(lambda: page.locator("#r-status").inner_text() == "completed", timeout=40, interval=0.2,
               what="the rollout completed, live")
    assert page.locator("#r-progress-text").inner_text() == f"{N} of {N}"
    assert fleet.server.api("GET", f"/rollouts/{rollout_id}").json()["artifact"] == "web@1.0.0"

    # the artifact's page lists the rollout, and its delete is refused with the API's reason
    page.goto(fleet.url + "/artifacts/web/1.0.0")
    uses = page.locator("#uses tbody tr")
    assert uses.count() == 1 and rollout_id in uses.inner_text() and f"{N} succeeded" in uses.inner_text()
    with page.expect_navigation():
        page.get_by_role("button", name="Delete web@1.0.0").click()
    reason = page.locator("#delete-error").inner_text()
    assert reason.startswith("artifact web@1.0.0 is used by ") and "finish or delete those first" in reason
    assert fleet.server.api("GET", "/artifacts/web/1.0.0").status_code == 200
    no_csp_trouble(tab)


def test_the_apis_refusals_are_shown_beside_the_form_and_store_nothing(tab: BrowserPage, fleet: Site) -> None:
    upload_app(fleet.server, "dup", "1.0.0")
    before = listed(fleet)
    page = tab.page
    browser_login(tab, fleet, "olga", next_path="/artifacts")
    error = page.locator("#upload-error")

    def submit_by_keyboard() -> str:  # Enter in a field submits the form; the page stays
        page.get_by_label("Version").press("Enter")
        wait_until(lambda: error.is_visible() and error.inner_text(), what="the refusal shown")
        assert error.get_attribute("role") == "alert"
        return str(error.inner_text())

    fill_upload(page, "dup", "1.0.0", b"another build")
    assert submit_by_keyboard() == api_refusal(fleet, 409, b"x", name="dup", version="1.0.0")
    assert "exists" in error.inner_text()
    # markup in the name or the version is refused by the API, and its reason is shown as text
    fill_upload(page, "web", "2.0" + SCRIPT, b"release")
    assert submit_by_keyboard() == api_refusal(fleet, 400, b"x", name="web", version="2.0" + SCRIPT)
    assert SCRIPT in error.inner_text()
    fill_upload(page, SCRIPT, "2.0.0", b"release")
    assert submit_by_keyboard() == api_refusal(fleet, 400, b"x", name=SCRIPT, version="2.0.0")
    no_markup(page)
    # a bad SBOM: the API's parser says why
    fill_upload(page, "web", "2.0.0", b"release", sbom=b'{"bomFormat": "CycloneDX", "components": [{}]}')
    assert submit_by_keyboard() == api_refusal(fleet, 400, b"release", sbom=b'{"bomFormat": "CycloneDX", '
                                               b'"components": [{}]}', name="web", version="2.0.0")
    # too large: the server's own words, before a byte is sent
    fill_upload(page, "big", "1.0.0", b"x" * (LIMIT + 1))
    assert submit_by_keyboard() == api_refusal(fleet, 413, b"x" * (LIMIT + 1), name="big", version="1.0.0")
    assert listed(fleet) == before
    # the same form, fixed, uploads: the refusals left nothing behind
    fill_upload(page, "web", "2.0.0", b"release 2")
    page.get_by_label("Hardware models (optional)").fill("rpi4, imx8")
    page.get_by_label("Version").press("Enter")
    wait_until(lambda: page.locator("#upload-status").inner_text() == "Uploaded web@2.0.0 (9 B).",
               what="the fixed upload")
    assert error.is_hidden()
    assert listed(fleet) == ["web@2.0.0", *before]
    assert fleet.server.api("GET", "/artifacts/web/2.0.0").json()["hardware"] == ["imx8", "rpi4"]
    assert "imx8rpi4" in page.locator("#artifact-web_2_0_0").inner_text().replace(" ", "")
    # phone width: the list and the form fit the screen
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.get_by_label("File", exact=True).is_visible()
    no_csp_trouble(tab)


def test_an_unused_artifact_is_deleted_from_its_page(tab: BrowserPage, fleet: Site) -> None:
    upload_app(fleet.server, "gone", "1.0.0")
    page = tab.page
    browser_login(tab, fleet, "olga", next_path="/artifacts/gone/1.0.0")
    assert page.locator("#uses tbody").inner_text() == "Not deployed yet."
    with page.expect_navigation():
        page.get_by_role("button", name="Delete gone@1.0.0").click()
    assert page.url == fleet.url + "/artifacts"
    assert page.locator("#artifact-gone_1_0_0").count() == 0
    assert fleet.server.api("GET", "/artifacts/gone/1.0.0").status_code == 404
    [entry] = [e for e in fleet.server.api("GET", "/audit", params={"action": "artifact.delete"}).json()["items"]
               if e["target"] == "gone@1.0.0"]
    assert entry["actor"] == "user:olga"
    no_csp_trouble(tab)


def test_a_viewer_sees_no_upload_or_delete_and_a_forged_upload_is_refused(tab: BrowserPage, fleet: Site) -> None:
    r = upload(fleet.server, b"viewer's view", sbom=json.dumps(CYCLONEDX).encode(), name="seen", version="1.0.0")
    assert r.status_code == 201, r.text
    before = listed(fleet)
    page = tab.page
    browser_login(tab, fleet, "vera", next_path="/artifacts")
    assert "seen@1.0.0" in page.locator("#artifact-seen_1_0_0").inner_text()
    assert page.locator("#upload-form").count() == 0 and page.get_by_role("link", name="Roll out…").count() == 0
    assert page.get_by_role("link", name="Artifacts", exact=True).get_attribute("aria-current") == "page"
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # paged, newest first: the 26th artifact is on the next page
    for i in range(ARTIFACTS_PER_PAGE + 1 - len(before)):
        upload_app(fleet.server, "filler", f"0.{i}")
    page.reload()
    newest = listed(fleet)
    assert len(newest) == ARTIFACTS_PER_PAGE + 1 and newest[0] == f"filler@0.{len(newest) - len(before) - 1}"
    shown = "rows => rows.map(r => r.dataset.ref)"
    assert page.locator("tr[data-ref]").evaluate_all(shown) == newest[:ARTIFACTS_PER_PAGE]
    page.get_by_role("link", name="Older artifacts").click()
    page.wait_for_url(re.compile(r".*/artifacts\?cursor=.+"))
    assert page.locator("tr[data-ref]").evaluate_all(shown) == [newest[-1]]
    page.get_by_role("link", name="Newest artifacts").click()
    page.wait_for_url(fleet.url + "/artifacts")
    page.goto(fleet.url + "/artifacts/seen/1.0.0")
    assert page.locator("#components tbody tr").count() == 2
    assert [b.inner_text() for b in page.get_by_role("button").all()] == ["Log out", "Search"]
    no_csp_trouble(tab)

    vera = http_login(fleet, "vera")
    olga = http_login(fleet, "olga")
    try:
        csrf = form_csrf(vera.get("/artifacts").text)
        params = {"name": "forged", "version": "1.0.0", "kind": "app"}
        headers = {"X-CSRF-Token": csrf, "Content-Type": "application/octet-stream"}
        r = vera.post("/api/v1/artifacts", params=params, content=b"forged", headers=headers)
        assert r.status_code == 403 and "needs the operator role" in r.json()["detail"]
        r = vera.post("/artifacts/seen/1.0.0/delete", data={"csrf_token": csrf})
        assert r.status_code == 403 and "needs the operator role" in r.text
        # an operator's cookie without the page's token is refused too
        r = olga.post("/api/v1/artifacts", params=params, content=b"forged",
                      headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
        r = olga.post("/artifacts/seen/1.0.0/delete", data={})
        assert r.status_code == 403 and "CSRF" in r.text
        assert listed(fleet) == newest
    finally:
        vera.close()
        olga.close()
