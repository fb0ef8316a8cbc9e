"""The web console in a real browser (issues 6 and 7): Debian's chromium driven by Playwright
against a real server and a real agent process. Logging in, escaping, the terminal page typing
into a real shell on the device, a recording played back, what a viewer sees and may do, CSRF,
and the Content-Security-Policy (no page may trip it)."""

from __future__ import annotations

import json
import re
from typing import Any

from playwright.sync_api import expect

from tests.browser.conftest import SCRIPT_TAG, BrowserPage, Console, browser_login, record_a_session
from tests.conftest import wait_until


def terminal_lines(page: Any) -> list[str]:
    """The rows xterm.js shows, as text (its DOM renderer draws one element per row)."""
    rows: list[str] = page.locator(".xterm-rows > div").all_inner_texts()
    return [r.replace("\xa0", " ").rstrip() for r in rows]


def tty_size(page: Any, nth: int) -> tuple[int, int]:
    """The device's idea of the terminal's size: `stty size`'s answer, the ``nth`` time it is asked."""
    page.keyboard.type("stty size")
    page.keyboard.press("Enter")

    def answers() -> list[str]:
        return [line for line in terminal_lines(page) if re.fullmatch(r"\d+ \d+", line)]

    wait_until(lambda: len(answers()) >= nth, what="stty size")
    rows, cols = answers()[nth - 1].split()
    return int(rows), int(cols)


def no_csp_trouble(tab: BrowserPage) -> None:
    assert not [p for p in tab.problems if "Content Security Policy" in p or "Refused" in p], tab.problems


def test_a_wrong_password_shows_an_error_and_the_right_one_logs_in(tab: BrowserPage, console: Console) -> None:
    page = tab.page
    response = page.goto(console.url + "/devices")
    assert page.url.startswith(console.url + "/login?next=%2Fdevices")  # not signed in: the login page
    csp = response.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "frame-ancestors 'none'", "object-src 'none'",
                      "base-uri 'none'", "form-action 'self'"):
        assert directive in csp, csp
    assert "unsafe-inline" not in csp.split("script-src", 1)[1].split(";", 1)[0]
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_role("alert").inner_text() == "Wrong user name or password."
    assert "/login" in page.url
    assert "corral_session" not in [c["name"] for c in page.context.cookies()]
    page.get_by_label("Password").fill(console.passwords["admin"])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(console.url + "/devices")
    assert page.get_by_role("heading", name="Devices").is_visible()
    assert page.get_by_role("link", name=console.device_id).is_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "corral_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    no_csp_trouble(tab)


def test_a_tag_holding_a_script_is_shown_as_text(tab: BrowserPage, console: Console) -> None:
    page = tab.page
    browser_login(tab, console, "admin")
    for path in ("/devices", f"/devices/{console.device_id}"):
        page.goto(console.url + path)
        assert SCRIPT_TAG in page.locator("main").inner_text()
        assert page.evaluate("window.__owned") is None  # the script did not run
        assert page.locator("main b").count() == 0  # nor did the markup become elements
        assert page.locator("script:not([src])").count() == 0
    no_csp_trouble(tab)


def test_the_terminal_page_runs_a_shell_on_the_device(tab: BrowserPage, console: Console) -> None:
    page = tab.page
    browser_login(tab, console, "olga")  # an operator with the remote-access permission
    page.goto(f"{console.url}/devices/{console.device_id}")
    page.get_by_role("link", name="Terminal").click()
    page.wait_for_url(f"{console.url}/devices/{console.device_id}/terminal")
    status = page.get_by_role("status")
    wait_until(lambda: status.inner_text().startswith("Connected"), what="the terminal connected")
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("echo hi")
    page.keyboard.press("Enter")
    # the command line echoes "echo hi"; the shell's output is a line that is "hi" alone
    wait_until(lambda: "hi" in terminal_lines(page), what="the output 'hi'")
    before = tty_size(page, 1)
    page.set_viewport_size({"width": 900, "height": 600})  # the terminal follows: a resize goes to the device
    rows, cols = tty_size(page, 2)
    assert rows < before[0] and cols < before[1], (before, (rows, cols))
    page.keyboard.type("exit 3")
    page.keyboard.press("Enter")
    wait_until(lambda: status.inner_text() == "The shell exited with status 3.", what="the exit status shown")
    no_csp_trouble(tab)
    sessions = console.server.api("GET", "/sessions").json()
    mine = [s for s in sessions if s["user"] == "olga" and s["kind"] == "terminal"]
    assert mine and mine[0]["recording"] and mine[0]["bytes_from_device"] > 0
    cast = console.server.api("GET", f"/sessions/{mine[0]['id']}/recording").text.splitlines()
    assert [json.loads(line)[2] for line in cast[1:] if json.loads(line)[1] == "r"][-1] == f"{cols}x{rows}"


def test_a_recorded_session_plays_back(tab: BrowserPage, console: Console) -> None:
    sid = record_a_session(console, b"echo played-back-$((6*7))\nsleep 0.5\nexit\n")
    page = tab.page
    browser_login(tab, console, "admin", next_path="/sessions")
    page.locator(f"#session-{sid}").get_by_role("link", name="Play").click()
    page.wait_for_url(f"{console.url}/sessions/{sid}/playback")
    status = page.get_by_role("status")
    wait_until(lambda: status.inner_text().startswith("Ready"), what="the recording loaded")
    assert not any("played-back-42" in line for line in terminal_lines(page))  # nothing shown before play
    page.get_by_label("Speed").select_option("4")
    page.get_by_role("button", name="Play").click()
    # the echoed command line holds "$((6*7))": only the shell's output holds 42 (after a prompt, maybe)
    wait_until(lambda: any("played-back-42" in line for line in terminal_lines(page)),
               what="the recorded output played back")
    wait_until(lambda: status.inner_text() == "Finished.", what="the playback finished")
    no_csp_trouble(tab)


def test_a_viewer_sees_no_terminal_and_the_server_refuses_one(tab: BrowserPage, console: Console) -> None:
    page = tab.page
    browser_login(tab, console, "vera")
    page.goto(f"{console.url}/devices/{console.device_id}")
    assert page.get_by_role("heading", level=1).is_visible()
    assert page.get_by_role("link", name="Terminal").count() == 0
    assert page.get_by_role("navigation").get_by_role("link", name="Sessions").count() == 0
    response = page.goto(f"{console.url}/devices/{console.device_id}/terminal")
    assert response.status == 403 and "remote-access permission" in page.get_by_role("alert").inner_text()
    # with the page's own CSRF token, the API still says no
    csrf = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    status = page.evaluate("""async ([device, csrf]) => (await fetch(`/api/v1/devices/${device}/sessions`, {
        method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
        body: JSON.stringify({kind: "terminal", params: {}})})).status""", [console.device_id, csrf])
    assert status == 403


def test_a_cookie_request_without_the_csrf_token_is_refused(tab: BrowserPage, console: Console) -> None:
    page = tab.page
    browser_login(tab, console, "admin")
    change = """async ([device, csrf]) => {
        const headers = {"Content-Type": "application/json"};
        if (csrf) headers["X-CSRF-Token"] = csrf;
        const r = await fetch(`/api/v1/devices/${device}/tags`, {method: "PATCH", headers,
                              body: JSON.stringify({set: {csrf: "changed"}})});
        return r.status; }"""
    assert page.evaluate(change, [console.device_id, ""]) == 403
    create = """async () => (await fetch("/api/v1/groups", {method: "POST",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify({name: "csrf-probe"})})).status"""
    assert page.evaluate(create) == 403
    assert console.server.api("GET", "/groups/csrf-probe").status_code == 404
    assert "csrf" not in console.server.api("GET", f"/devices/{console.device_id}").json()["tags"]
    csrf = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    assert re.fullmatch(r"[0-9a-f]{64}", csrf or "")
    assert page.evaluate(change, [console.device_id, csrf]) == 200  # the same call with the token works
    assert console.server.api("GET", f"/devices/{console.device_id}").json()["tags"]["csrf"] == "changed"
    console.server.api("PATCH", f"/devices/{console.device_id}/tags", json={"remove": ["csrf"]})


def test_the_console_works_from_the_keyboard_at_phone_width(tab: BrowserPage, console: Console) -> None:
    page = tab.page
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(console.url + "/login")
    # the user name field takes the focus by itself (autofocus), once the browser gets to it
    expect(page.locator("#user")).to_be_focused()
    page.keyboard.type("olga")
    page.keyboard.press("Tab")
    page.keyboard.type(console.passwords["olga"])
    page.keyboard.press("Enter")
    page.wait_for_url(console.url + "/devices")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    # nothing wider than the phone's screen but the table's own scroller
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.get_by_role("link", name=console.device_id).focus()
    page.keyboard.press("Enter")
    page.wait_for_url(f"{console.url}/devices/{console.device_id}")
    no_csp_trouble(tab)
