"""The console's security over plain HTTP (no browser needed): the session cookie's flags, CSRF
for cookie-authenticated requests (console forms and the REST API alike), the Origin check on
cookie-authenticated WebSockets, the security headers, the vendor allow-list; and the pure
helpers behind them."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from corral.server.auth import csrf_token, csrf_token_ok, origin_allowed
from corral.server.console import content_security_policy, cookies_secure, parse_form, safe_next
from tests.browser.conftest import Console, form_csrf, page_csrf, record_a_session

Client = Callable[[str], httpx.Client]


def test_the_session_cookie_is_httponly_strict_and_expires(console: Console, http: Client) -> None:
    c = http(console.url)
    form = c.get("/login")
    assert form.status_code == 200
    csrf = form_csrf(form.text)
    r = c.post("/login", data={"user": "vera", "password": console.passwords["vera"], "csrf_token": csrf,
                               "next": "//evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/devices"  # not to another site
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("corral_session="))
    flags = [f.strip().lower() for f in cookie.split(";")[1:]]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "max-age=43200" in flags
    assert "secure" not in flags  # http://127.0.0.1: a Secure cookie would never come back
    # behind a local proxy that terminates TLS, the cookie is Secure
    proxied = http(console.url)
    csrf = form_csrf(proxied.get("/login").text)
    r = proxied.post("/login", data={"user": "vera", "password": console.passwords["vera"], "csrf_token": csrf},
                     headers={"X-Forwarded-Proto": "https"})
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("corral_session="))
    assert "secure" in [f.strip().lower() for f in cookie.split(";")[1:]]
    assert c.get("/api/v1/auth/whoami").json()["user"] == "vera"  # the cookie authenticates the API too


def test_the_login_form_needs_its_own_csrf_cookie(console: Console) -> None:
    r = httpx.post(console.url + "/login", data={"user": "admin", "password": console.passwords["admin"],
                                                 "csrf_token": "guessed"})
    assert r.status_code == 403 and "expired" in r.text
    assert not [h for h in r.headers.get_list("set-cookie") if h.startswith("corral_session=")]


def test_a_wrong_password_is_refused_with_a_message(console: Console, http: Client) -> None:
    c = http(console.url)
    csrf = form_csrf(c.get("/login").text)
    r = c.post("/login", data={"user": "admin", "password": "wrong", "csrf_token": csrf})
    assert r.status_code == 401 and "Wrong user name or password." in r.text
    assert "corral_session" not in c.cookies


def test_cookie_requests_that_change_things_need_the_csrf_token(console: Console, login_as: Client) -> None:
    c = login_as("admin")
    path = f"/api/v1/devices/{console.device_id}/tags"
    body = {"set": {"csrf-http": "x"}}
    assert c.patch(path, json=body).status_code == 403
    assert c.patch(path, json=body, headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    assert c.patch(path, json=body, headers={"X-CSRF-Token": page_csrf(c), "Origin": "http://evil.example"}
                   ).status_code == 403
    assert "csrf-http" not in console.server.api("GET", f"/devices/{console.device_id}").json()["tags"]
    assert c.get(path.rsplit("/", 1)[0]).status_code == 200  # reading needs no token
    r = c.patch(path, json=body, headers={"X-CSRF-Token": page_csrf(c)})
    assert r.status_code == 200 and r.json()["tags"]["csrf-http"] == "x"
    # a bearer token is not a cookie: no CSRF token asked for
    r = console.server.api("PATCH", path.removeprefix("/api/v1"), json={"remove": ["csrf-http"]})
    assert r.status_code == 200 and "csrf-http" not in r.json()["tags"]


def test_logging_out_needs_the_token_and_revokes_the_session(console: Console, login_as: Client) -> None:
    c = login_as("olga")
    session = c.cookies["corral_session"]
    assert c.post("/logout", data={}).status_code == 403
    assert c.get("/api/v1/auth/whoami").status_code == 200  # still signed in
    r = c.post("/logout", data={"csrf_token": page_csrf(c)})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    again = httpx.get(console.url + "/api/v1/auth/whoami", cookies={"corral_session": session})
    assert again.status_code == 401  # the token behind the cookie is gone, not only the cookie
    page = httpx.get(console.url + "/devices", cookies={"corral_session": session})
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")


def test_ending_a_session_from_the_console_is_for_admins_with_the_token(console: Console, login_as: Client) -> None:
    r = console.server.api("POST", f"/devices/{console.device_id}/sessions", json={"kind": "terminal"})
    sid = r.json()["id"]
    olga = login_as("olga")
    assert olga.post(f"/sessions/{sid}/end", data={"csrf_token": page_csrf(olga)}).status_code == 403
    admin = login_as("admin")
    assert admin.post(f"/sessions/{sid}/end", data={}).status_code == 403
    assert console.server.api("GET", "/sessions").json()[0]["status"] == "pending"
    r = admin.post(f"/sessions/{sid}/end", data={"csrf_token": page_csrf(admin)})
    assert r.status_code == 303
    assert next(s for s in console.server.api("GET", "/sessions").json() if s["id"] == sid)["status"] == "ended"


def test_sessions_and_recordings_are_shown_to_whom_they_belong(console: Console, login_as: Client) -> None:
    s = console.server
    admin_sid = s.api("POST", f"/devices/{console.device_id}/sessions", json={"kind": "terminal"}).json()["id"]
    olga = login_as("olga")
    olga_sid = olga.post(f"/api/v1/devices/{console.device_id}/sessions", json={"kind": "terminal"},
                         headers={"X-CSRF-Token": page_csrf(olga)}).json()["id"]
    page = olga.get("/sessions").text
    assert olga_sid in page and admin_sid not in page and "/end" not in page  # hers only, and no End button
    admin_page = login_as("admin").get("/sessions").text
    assert olga_sid in admin_page and admin_sid in admin_page and f"/sessions/{admin_sid}/end" in admin_page
    recorded = record_a_session(console, b"exit\n")
    assert login_as("admin").get(f"/sessions/{recorded}/playback").status_code == 200
    assert olga.get(f"/sessions/{recorded}/playback").status_code == 403
    assert login_as("vera").get(f"/sessions/{recorded}/playback").status_code == 403
    assert olga.get("/sessions/nonexistent/playback").status_code == 404


def session_socket(console: Console, client: httpx.Client) -> tuple[str, str]:
    r = client.post(f"/api/v1/devices/{console.device_id}/sessions", json={"kind": "terminal"},
                    headers={"X-CSRF-Token": page_csrf(client)})
    assert r.status_code == 201, r.text
    doc = r.json()
    return doc["id"], console.url.replace("http", "ws", 1) + doc["ws_path"] + "?token=" + doc["token"]


def test_a_cookie_websocket_from_another_origin_is_refused(console: Console, login_as: Client) -> None:
    c = login_as("admin")
    cookie = f"corral_session={c.cookies['corral_session']}"
    sid, url = session_socket(console, c)
    with pytest.raises((ConnectionClosed, InvalidStatus)), \
            connect(url, additional_headers={"Cookie": cookie}, origin="http://evil.example",  # type: ignore[arg-type]
                    open_timeout=10) as ws:
        ws.recv(timeout=10)
    refused = [e for e in console.server.api("GET", "/audit", params={"limit": 50}).json()["items"]
               if e["action"] == "session.refused" and e["detail"].get("session") == sid]
    assert refused
    # the same socket from the server's own origin works (a fresh token: the first is refused now)
    sid, url = session_socket(console, c)
    with connect(url, additional_headers={"Cookie": cookie}, origin=console.url,  # type: ignore[arg-type]
                 open_timeout=10) as ws:
        ws.send(b"echo same-$((40+2))\nexit\n")
        got = b""
        while b"same-42" not in got:
            message = ws.recv(timeout=15)
            if isinstance(message, bytes):
                got += message


def test_pages_carry_the_security_headers_and_vendor_files_are_an_allow_list(console: Console,
                                                                            login_as: Client) -> None:
    c = login_as("vera")
    for path in ("/login", "/devices", f"/devices/{console.device_id}", "/nowhere-console"):
        r = c.get(path)
        if r.status_code == 404 and path == "/nowhere-console":
            continue  # not a console route: the API's JSON 404
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin"
    r = c.get("/static/vendor/xterm/xterm.mjs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert c.get("/static/console.css").headers["content-type"].startswith("text/css")
    assert c.get("/static/vendor/uplot/uPlot.esm.js").status_code == 200  # for the charts to come
    for path in ("/static/vendor/xterm/package.json", "/static/vendor/@xterm/xterm/lib/xterm.mjs",
                 "/static/vendor/../package.json", "/static/..%2fpackage.json", "/static/.hidden.js",
                 "/static/vendor/uplot/package.json"):
        assert c.get(path).status_code == 404, path
    assert c.get(f"/devices/{console.device_id}/terminal").status_code == 403  # a viewer
    assert c.get("/sessions").status_code == 403


def test_the_device_list_searches_by_selector(console: Console, login_as: Client) -> None:
    c = login_as("vera")
    assert console.device_id in c.get("/devices", params={"selector": 'tag.site == "berlin" and online'}).text
    page = c.get("/devices", params={"selector": 'tag.site == "nowhere"'}).text
    assert console.device_id not in page and "No devices match this selector." in page
    r = c.get("/devices", params={"selector": "tag.site =="})
    assert r.status_code == 200 and 'id="selector-error"' in r.text and "column" in r.text
    assert 'value="tag.site =="' in r.text  # the search is kept for correcting


# --- the pure helpers ------------------------------------------------------------------------------


def test_the_csrf_token_is_bound_to_the_session_and_not_its_stored_digest() -> None:
    import hashlib

    token = "crl_abc"
    assert csrf_token_ok(token, csrf_token(token))
    assert not csrf_token_ok(token, csrf_token("crl_other"))
    assert not csrf_token_ok(token, None) and not csrf_token_ok(token, "")
    assert csrf_token(token) != hashlib.sha256(token.encode()).hexdigest()


@pytest.mark.parametrize(("origin", "host", "ok"), [
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("https://corral.example", "127.0.0.1:8080", True),  # the public URL, behind a TLS proxy
    ("http://evil.example", "127.0.0.1:8080", False),
    ("http://127.0.0.1:8081", "127.0.0.1:8080", False),
    ("null", "127.0.0.1:8080", False),
    (None, "127.0.0.1:8080", False),
    ("javascript://127.0.0.1:8080", "127.0.0.1:8080", False),
])
def test_origin_allowed(origin: str | None, host: str, ok: bool) -> None:
    assert origin_allowed(origin, host, "https://corral.example/") is ok


@pytest.mark.parametrize(("target", "expected"), [
    ("/devices/abc", "/devices/abc"), ("/sessions?x=1", "/sessions?x=1"), (None, "/devices"), ("", "/devices"),
    ("//evil.example", "/devices"), ("/\\evil.example", "/devices"), ("https://evil.example", "/devices"),
    ("/a\r\nSet-Cookie: x=1", "/devices"),
])
def test_safe_next(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_the_csp_allows_styles_by_nonce_only_where_asked() -> None:
    plain = content_security_policy()
    assert "style-src 'self'" in plain and "nonce" not in plain and "unsafe-inline" not in plain
    assert "'nonce-abc'" in content_security_policy("abc")
    assert "script-src 'self';" in content_security_policy("abc")


def test_parse_form() -> None:
    assert parse_form(b"user=a%20b&password=&next=%2Fdevices") == {"user": "a b", "password": "", "next": "/devices"}


def test_cookies_are_secure_over_https() -> None:
    assert cookies_secure("https://corral.example", "http")  # a proxy terminates TLS
    assert cookies_secure("http://127.0.0.1:8080", "https")  # X-Forwarded-Proto: https from a local proxy
    assert not cookies_secure("http://127.0.0.1:8080", "http")
