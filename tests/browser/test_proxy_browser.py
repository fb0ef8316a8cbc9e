"""A device's web UI through the proxy in a real browser (issue 6, ADR 0018): the operator logs in
to the console, opens the device's page, and the page's relative assets, its `fetch` and its
WebSocket work — while the page, sandboxed, can neither read the console's cookie nor call
Corral's API with the operator's login; its form logs in to the device, whose cookie the server
keeps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import BrowserPage, Console, browser_login
from tests.integration.test_proxy import DeviceApp

PAGE = b"""<!doctype html><meta charset=utf-8><title>device ui</title>
<link rel=stylesheet href="style.css">
<p id=origin></p><p id=cookie></p><p id=data></p><p id=ws></p><p id=api></p>
<form method=post action="login"><input name=user value=olga><button>Log in to the device</button></form>
<script src="app.js"></script>"""

SCRIPT = b"""
const show = (id, text) => { document.getElementById(id).textContent = text; };
show("origin", "origin " + window.origin);
try { show("cookie", "cookie " + document.cookie); } catch (e) { show("cookie", "cookie blocked"); }
fetch("data.json", {credentials: "include"}).then(r => r.json()).then(d => show("data", "data " + d.answer),
                                          e => show("data", "data failed " + e));
const ws = new WebSocket(location.href.replace(/^http/, "ws").replace(/[^/]*$/, "") + "ws");
ws.onopen = () => ws.send("ping");
ws.onmessage = m => show("ws", "ws " + m.data);
ws.onerror = () => show("ws", "ws failed");
fetch("/api/v1/auth/whoami", {credentials: "include"}).then(r => show("api", "api " + r.status),
                                                          e => show("api", "api refused"));
"""


async def ui(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The device's web UI: a page, its script and style, a JSON endpoint, a WebSocket echo."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (m := await receive())["type"] != "websocket.disconnect":
            await send({"type": "websocket.send", "text": "pong to " + (m.get("text") or "")})
        return
    if scope["type"] != "http":
        return
    body = b""
    while (m := await receive()).get("more_body"):
        body += m.get("body", b"")
    body += m.get("body", b"")
    headers = dict(scope["headers"])
    if scope["path"] == "/login" and scope["method"] == "POST":  # the device's own login: a cookie
        cookie = b"sid=" + body.split(b"=")[1] + b"; Path=/"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"/welcome"), (b"set-cookie", cookie)]})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] == "/welcome":
        page = b"<!doctype html><title>welcome</title><p id=who>" + headers.get(b"cookie", b"nobody") + b"</p>"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": page})
        return
    files = {"/": (b"text/html", PAGE), "/app.js": (b"text/javascript", SCRIPT),
             "/style.css": (b"text/css", b"p { font-family: monospace }"),
             "/data.json": (b"application/json", json.dumps({"answer": 42}).encode())}
    ctype, body = files.get(scope["path"], (b"text/plain", b"not found"))
    await send({"type": "http.response.start", "status": 200 if scope["path"] in files else 404,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def device_ui() -> Iterator[DeviceApp]:
    app = DeviceApp(ui)
    try:
        yield app
    finally:
        app.stop()


def test_a_devices_page_works_sandboxed_with_its_websocket(tab: BrowserPage, console: Console,
                                                           device_ui: DeviceApp) -> None:
    page = tab.page
    browser_login(tab, console, "olga")
    requests: list[Any] = []
    page.on("request", lambda r: requests.append(r))
    page.goto(f"{console.url}/devices/{console.device_id}/proxy/{device_ui.port}/")
    assert f"/devices/{console.device_id}/proxy/{device_ui.port}/~" in page.url
    page.wait_for_function("document.getElementById('ws').textContent !== ''")
    page.wait_for_function("document.getElementById('api').textContent !== ''")
    page.wait_for_function("document.getElementById('data').textContent !== ''")
    text = {k: page.locator(f"#{k}").inner_text() for k in ("origin", "cookie", "data", "ws", "api")}
    assert text == {"origin": "origin null", "cookie": "cookie blocked", "data": "data 42",
                    "ws": "ws pong to ping", "api": "api refused"}, text
    # what the browser sent: the console's cookie on the navigation the operator made, and on
    # nothing the device's page asked for (its assets, its fetch, its attempt at the API)
    sent = [(r.url, r.all_headers().get("cookie", "")) for r in requests]
    entry = f"/devices/{console.device_id}/proxy/{device_ui.port}/"
    assert any(url.endswith(entry) and "corral_session=" in cookie for url, cookie in sent), sent
    asked = [(url, cookie) for url, cookie in sent if url.endswith(("app.js", "style.css", "data.json", "whoami"))]
    assert len(asked) == 4 and not any("corral_session" in cookie for _, cookie in asked), sent
    # its form posts to the device, whose login cookie the server keeps and sends back: the
    # device's redirect to its root stays in the proxy
    page.get_by_role("button", name="Log in to the device").click()
    page.wait_for_url("**/welcome")
    assert f"/devices/{console.device_id}/proxy/{device_ui.port}/~" in page.url
    assert page.locator("#who").inner_text() == "sid=olga"
    assert not [c for c in page.context.cookies() if c["name"] == "sid"]  # not in the browser
