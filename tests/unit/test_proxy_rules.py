"""The device web proxy's pure rules (ADR 0018): paths, headers, redirects, cookies, preflights."""

from __future__ import annotations

import pytest

from corral.errors import InvalidInput
from corral.server.proxy import (
    SANDBOX,
    CookieJar,
    entry_allowed,
    is_navigation,
    parse_port,
    preflight,
    proxy_prefix,
    request_headers,
    response_headers,
    rewrite_location,
    split_capability,
    upstream_target,
)

CAP = "A" * 40 + "_-9"
PREFIX = f"/devices/d1/proxy/8080/~{CAP}"


def test_ports_and_capabilities() -> None:
    assert parse_port("1") == 1 and parse_port("65535") == 65535
    for bad in ("0", "65536", "-1", "", "80a", "１２", "080"):
        with pytest.raises(InvalidInput):
            parse_port(bad)
    assert split_capability(f"~{CAP}/a/b") == (CAP, "/a/b")
    assert split_capability(f"~{CAP}") == (CAP, "")
    assert split_capability("~short/a") == (None, "/~short/a")
    assert split_capability("a/b") == (None, "/a/b")
    assert proxy_prefix("d1", 8080, CAP) == PREFIX
    assert proxy_prefix("d1", 8080, None) == "/devices/d1/proxy/8080"


def test_the_prefix_is_stripped_as_the_browser_encoded_the_path() -> None:
    assert upstream_target(PREFIX.encode() + b"/a%2Fb/c", PREFIX, b"x=1") == b"/a%2Fb/c?x=1"
    assert upstream_target(PREFIX.encode(), PREFIX, b"") == b"/"
    assert upstream_target(b"/devices/d1/proxy/8080/", "/devices/d1/proxy/8080", b"") == b"/"


def test_request_headers_carry_nothing_of_the_operator() -> None:
    raw = [(b"Host", b"corral.example:8000"), (b"Cookie", b"corral_session=tok"),
           (b"Authorization", b"Bearer tok"), (b"X-CSRF-Token", b"c"), (b"Origin", b"null"),
           (b"Referer", b"http://corral/devices/d1/proxy/8080/~cap/"), (b"Connection", b"keep-alive, X-Secret"),
           (b"X-Secret", b"hop"), (b"Keep-Alive", b"5"), (b"Sec-Fetch-Site", b"cross-site"),
           (b"Accept", b"text/html"), (b"Content-Length", b"5"), (b"X-Forwarded-For", b"1.2.3.4")]
    out = dict(request_headers(raw, 8080, "sid=1", chunked=False))
    assert out == {b"host": b"localhost:8080", b"origin": b"http://localhost:8080", b"accept": b"text/html",
                   b"content-length": b"5", b"cookie": b"sid=1"}
    out2 = request_headers([(b"content-length", b"5")], 80, "", chunked=True)
    assert out2 == [(b"host", b"localhost:80"), (b"transfer-encoding", b"chunked")]


@pytest.mark.parametrize(("location", "expected"), [
    ("/login?next=/x#top", f"{PREFIX}/login?next=/x#top"),
    ("/", f"{PREFIX}/"),
    ("http://localhost:8080/a", f"{PREFIX}/a"),
    ("http://127.0.0.1:8080", f"{PREFIX}/"),
    ("http://[::1]:8080/b", f"{PREFIX}/b"),
    ("http://localhost:9090/a", "http://localhost:9090/a"),  # another port: not this proxy's
    ("https://example.org/", "https://example.org/"),
    ("//example.org/x", "//example.org/x"),
    ("next/page", "next/page"),  # relative: the browser resolves it under the prefix
    ("../up", "../up"),
    ("http://localhost:bad/", "http://localhost:bad/"),
])
def test_redirects_to_the_devices_root_stay_in_the_proxy(location: str, expected: str) -> None:
    assert rewrite_location(location, PREFIX, 8080) == expected


def test_response_headers_are_sandboxed_and_the_device_sets_nothing_on_our_host() -> None:
    raw = [(b"Content-Type", b"text/html"), (b"Set-Cookie", b"sid=1; Path=/"), (b"Location", b"/next"),
           (b"WWW-Authenticate", b'Basic realm="x"'), (b"Strict-Transport-Security", b"max-age=1"),
           (b"Clear-Site-Data", b'"*"'), (b"Access-Control-Allow-Origin", b"https://evil"),
           (b"Transfer-Encoding", b"chunked"), (b"Content-Security-Policy", b"default-src 'self'"),
           (b"Service-Worker-Allowed", b"/")]
    out, cookies = response_headers(raw, PREFIX, 8080, cors=b"")
    names = [k for k, _ in out]
    assert cookies == ["sid=1; Path=/"]
    for gone in (b"set-cookie", b"www-authenticate", b"strict-transport-security", b"clear-site-data",
                 b"transfer-encoding", b"service-worker-allowed"):
        assert gone not in names
    d = dict(out)
    assert d[b"location"] == f"{PREFIX}/next".encode()
    assert d[b"access-control-allow-origin"] == b"*"
    # ours, and the device's own policy too (both are enforced: it can only narrow ours)
    csps = [v for k, v in out if k == b"content-security-policy"]
    assert SANDBOX.encode() in csps and b"default-src 'self'" in csps
    assert b"allow-same-origin" not in SANDBOX.encode()
    assert d[b"x-content-type-options"] == b"nosniff" and d[b"referrer-policy"] == b"no-referrer"
    out, _ = response_headers([], "/devices/d1/proxy/80", 80, cors=None)
    assert b"access-control-allow-origin" not in dict(out)
    # the sandboxed page itself (origin null) may read them even with credentials: it has none of ours
    out, _ = response_headers([(b"content-type", b"text/plain"), (b"x-app", b"1")], PREFIX, 8080, cors=b"null")
    d = dict(out)
    assert (d[b"access-control-allow-origin"], d[b"access-control-allow-credentials"]) == (b"null", b"true")
    assert b"x-app" in d[b"access-control-expose-headers"].split(b", ")


def test_preflights_are_answered_by_the_proxy() -> None:
    got = preflight([(b"origin", b"null"), (b"access-control-request-method", b"PUT"),
                     (b"access-control-request-headers", b"content-type")])
    assert got is not None and dict(got)[b"access-control-allow-methods"] == b"PUT"
    assert dict(got)[b"access-control-allow-origin"] == b"null"
    assert dict(got)[b"access-control-allow-headers"] == b"content-type"
    assert preflight([(b"origin", b"null")]) is None  # a plain OPTIONS: the device's
    assert preflight([(b"access-control-request-method", b"PUT")]) is None


def test_the_cookie_jar() -> None:
    jar = CookieJar(limit=3)
    jar.store("sid=abc; Path=/; HttpOnly; SameSite=Strict", "/login", 100.0)
    jar.store("pref=dark", "/settings/page", 100.0)  # default path: /settings
    jar.store("short=1; Max-Age=10", "/", 100.0)
    assert jar.header("/", 101.0) == "sid=abc; short=1"
    assert jar.header("/settings/x", 101.0) == "pref=dark; sid=abc; short=1"
    assert jar.header("/settingsx", 101.0) == "sid=abc; short=1"
    assert jar.header("/", 111.0) == "sid=abc"  # expired
    jar.store("sid=; Expires=Thu, 01 Jan 1970 00:00:00 GMT", "/", 112.0)  # deleted
    assert jar.header("/", 112.0) == ""
    for i in range(5):
        jar.store(f"c{i}=v", "/", 113.0)
    assert len(jar.cookies) == 3  # bounded
    jar.store("x=" + "y" * 5000, "/", 113.0)
    assert ("x", "/") not in jar.cookies
    jar.store("novalue", "/", 113.0)
    assert ("novalue", "/") not in jar.cookies


def test_only_the_console_or_the_user_may_open_a_devices_page_with_the_cookie() -> None:
    assert entry_allowed([(b"sec-fetch-site", b"same-origin")])
    assert entry_allowed([(b"sec-fetch-site", b"none")])
    assert not entry_allowed([(b"sec-fetch-site", b"cross-site")])
    assert not entry_allowed([(b"sec-fetch-site", b"same-site")])
    assert entry_allowed([])  # a browser without Fetch Metadata


def test_a_page_load_is_told_from_a_script_call() -> None:
    assert is_navigation("GET", [(b"sec-fetch-mode", b"navigate"), (b"accept", b"text/html")])
    assert not is_navigation("GET", [(b"sec-fetch-mode", b"cors"), (b"accept", b"text/html")])
    assert is_navigation("GET", [(b"accept", b"text/html,application/xhtml+xml")])
    assert not is_navigation("GET", [(b"accept", b"*/*")])
    assert not is_navigation("POST", [(b"sec-fetch-mode", b"navigate")])
