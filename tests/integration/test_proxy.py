"""A device's local web UI through the server (issue 6, ADR 0018): a real server, a real
`corral agent` and a real small HTTP + WebSocket app on the device's loopback. Pages and their
relative assets over kept-alive sessions, a POST, a large streamed download, redirects, the
app's cookies kept apart from the operator's credentials, the sandbox, WebSocket echo and close
codes; and the refusals: viewers, unknown devices, bad ports, targets the agent does not allow,
an app that breaks off."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import uvicorn
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import AgentProc, ServerProc, free_port, start_agent, wait_until
from tests.integration.test_remote import EchoServer

ASSETS = 20
#: the close codes the device's app received from its WebSocket clients
APP_CLOSES: list[int | None] = []
BLOCK = hashlib.sha256(b"corral").digest() * 2048  # 64 KiB


def big_body(size: int) -> bytes:
    return (BLOCK * (size // len(BLOCK) + 1))[:size]


async def device_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The device's web UI: a page with relative assets, an echo, a big download, redirects,
    a login cookie, and a WebSocket echo (``bye`` closes with 4001)."""
    if scope["type"] == "lifespan":
        return
    path = scope["path"]
    if scope["type"] == "websocket":
        await receive()
        if path != "/ws":
            await send({"type": "websocket.close", "code": 1008})  # refused: 403
            return
        await send({"type": "websocket.accept", "subprotocol": (scope.get("subprotocols") or [None])[0]})
        while True:
            m = await receive()
            if m["type"] == "websocket.disconnect":
                APP_CLOSES.append(m.get("code"))
                return
            if m.get("text") == "bye":
                await send({"type": "websocket.close", "code": 4001, "reason": "bye yourself"})
                return
            if m.get("text") is not None:
                await send({"type": "websocket.send", "text": "echo:" + m["text"]})
            else:
                await send({"type": "websocket.send", "bytes": m["bytes"][::-1]})
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    status, extra, content = 200, [], b""
    ctype = b"text/plain"
    if path == "/":
        links = "".join(f'<script src="asset/{i}.js"></script>' for i in range(ASSETS))
        content = f"<!doctype html><title>device ui</title>{links}<p id=ok>device page</p>".encode()
        ctype = b"text/html"
    elif path.startswith("/asset/"):
        content = f"// {path}\n".encode()
    elif path in ("/echo", "/headers"):
        content = json.dumps({"method": scope["method"], "path": path, "query": scope["query_string"].decode(),
                              "headers": headers, "sha256": hashlib.sha256(body).hexdigest(),
                              "size": len(body)}).encode()
        ctype = b"application/json"
    elif path == "/big":
        size = int(scope["query_string"].decode().split("=")[1])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        for i in range(0, size, len(BLOCK)):  # big_body(size), a block at a time
            await send({"type": "http.response.body", "body": BLOCK[:size - i], "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    elif path == "/broken":  # half a download, then the app fails
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"), (b"content-length", b"2000000")]})
        await send({"type": "http.response.body", "body": big_body(1_000_000), "more_body": True})
        raise RuntimeError("the device's app broke down (on purpose)")
    elif path == "/redirect":
        status, extra = 302, [(b"location", b"/landing?from=root")]
    elif path == "/redirect-abs":
        status, extra = 302, [(b"location", f"http://localhost:{scope['server'][1]}/landing".encode())]
    elif path == "/redirect-away":
        status, extra = 302, [(b"location", b"https://example.org/elsewhere")]
    elif path == "/login":
        extra = [(b"set-cookie", b"device_sid=s3cret; Path=/; HttpOnly"),
                 (b"set-cookie", b"corral_session=device-chosen; Path=/"),
                 (b"www-authenticate", b'Basic realm="Corral login"'),
                 (b"strict-transport-security", b"max-age=99999999")]
        content = b"logged in"
    else:
        status, content = 404, b"no such page"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(content)).encode()), *extra]})
    await send({"type": "http.response.body", "body": content})


class DeviceApp:
    """An ASGI app (``device_app``) served by uvicorn on the loopback, in a thread of the test."""

    def __init__(self, app: Any = device_app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, what="the device's app")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class DyingApp(EchoServer):
    """An app that reads a request and hangs up without answering."""

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            got = b""
            while b"\r\n\r\n" not in got and (data := conn.recv(4096)):
                got += data


Device = tuple[str, DeviceApp, DyingApp]


@pytest.fixture
def device(server: ServerProc, tmp_path: Path, agents: list[AgentProc]) -> Iterator[Device]:
    app, dying = DeviceApp(), DyingApp()
    config = tmp_path / "agent.toml"
    config.write_text("[telemetry]\nenabled = false\n[remote]\n"
                      f'allow = ["localhost:{app.port}", "localhost:{dying.port}"]\n')
    agent = start_agent(server, tmp_path / "agent", server.create_enrollment_token(), "--config", str(config))
    agents.append(agent)
    dev = agent.wait_device_id()
    wait_until(lambda: server.api("GET", f"/devices/{dev}").json().get("online"), what="the agent online")
    try:
        yield dev, app, dying
    finally:
        app.stop()
        dying.sock.close()


def forward_sessions(s: ServerProc) -> list[dict[str, Any]]:
    return [x for x in s.api("GET", "/sessions", params={"limit": 1000}).json() if x["kind"] == "forward"]


def audit(s: ServerProc, action: str) -> list[dict[str, Any]]:
    items = s.api("GET", "/audit", params={"limit": 500}).json()["items"]
    return [e for e in items if e["action"] == action]


def browser(s: ServerProc, token: str | None = None) -> httpx.Client:
    """A client that behaves like the console's browser: the session cookie, nothing else."""
    return httpx.Client(base_url=s.url, cookies={"corral_session": token or s.admin_token}, timeout=30,
                        headers={"sec-fetch-site": "same-origin"})


def open_page(c: httpx.Client, dev: str, port: int, path: str = "") -> tuple[httpx.Response, str]:
    """Open a device's page as the console links to it: (the page, its capability prefix)."""
    r = c.get(f"/devices/{dev}/proxy/{port}/{path}", follow_redirects=True)
    m = re.match(rf"/devices/{dev}/proxy/{port}/~[A-Za-z0-9_-]{{43}}", r.url.path)
    assert m, (r.url, r.status_code, r.text)
    return r, m.group(0)


def test_a_page_its_assets_a_post_a_download_and_redirects(server: ServerProc, device: Device) -> None:
    s = server
    dev, app, _ = device
    before = len(forward_sessions(s))
    with browser(s) as c:
        # the console's link → the capability URL, then the page and its relative assets
        first = c.get(f"/devices/{dev}/proxy/{app.port}/", follow_redirects=False)
        assert first.status_code == 303, first.text
        page, prefix = open_page(c, dev, app.port)
        assert page.status_code == 200 and "device page" in page.text
        # the sandbox: the device's page never runs with the console's origin
        csp = page.headers["content-security-policy"]
        assert csp.startswith("sandbox") and "allow-scripts" in csp and "allow-same-origin" not in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        assets = re.findall(r'src="([^"]+)"', page.text)
        assert len(assets) == ASSETS
        cookieless = httpx.Client(base_url=s.url, timeout=30)  # as a sandboxed page asks: no cookie at all
        for a in assets:
            r = cookieless.get(f"{prefix}/{a}")
            assert r.status_code == 200 and r.text == f"// /{a}\n", (a, r.text)
            assert r.headers["access-control-allow-origin"] == "*"
        # kept alive: the page and its 20 assets took one session on the device
        assert len(forward_sessions(s)) - before == 1, forward_sessions(s)
        # as a browser loads them, six at a time: at most six sessions in all
        with ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(lambda a: httpx.get(f"{s.url}{prefix}/{a}", timeout=30).text, assets * 3))
        assert texts == [f"// /{a}\n" for a in assets * 3]
        assert len(forward_sessions(s)) - before <= 6, forward_sessions(s)

        # a form's POST, its body streamed through
        body = bytes(range(256)) * 2000
        r = cookieless.post(f"{prefix}/echo?x=1", content=body, headers={"content-type": "application/octet-stream"})
        doc = r.json()
        assert (doc["method"], doc["query"], doc["size"], doc["sha256"]) == \
            ("POST", "x=1", len(body), hashlib.sha256(body).hexdigest())
        # a chunked body of unknown length
        r = cookieless.post(f"{prefix}/echo", content=iter([b"a" * 70_000, b"b" * 70_000]))
        assert r.json()["size"] == 140_000
        # over the server's limit for request bodies (1 MiB): refused with the reason, told or not in advance
        for content in (b"x" * (2 << 20), iter([b"x" * 600_000] * 4)):
            r = cookieless.post(f"{prefix}/echo", content=content)
            assert r.status_code == 413 and "larger than" in r.json()["detail"], r.text
        # a CORS preflight from the sandboxed page is answered by the proxy
        r = cookieless.options(f"{prefix}/echo", headers={"origin": "null", "access-control-request-method": "PUT",
                                                           "access-control-request-headers": "content-type"})
        assert r.status_code == 204 and r.headers["access-control-allow-methods"] == "PUT"

        # a large download streams, and arrives whole
        size = 24 * 1024 * 1024 + 123
        digest = hashlib.sha256()
        got = 0
        with cookieless.stream("GET", f"{prefix}/big?size={size}") as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                digest.update(chunk)
                got += len(chunk)
        assert got == size and digest.hexdigest() == hashlib.sha256(big_body(size)).hexdigest()

        # a browser that reads slowly slows the device down: nothing piles up in the server
        def rss() -> int:  # the server's and its children's (a relay worker)
            server_proc = psutil.Process(s.proc.pid)
            return sum(p.memory_info().rss for p in [server_proc, *server_proc.children(recursive=True)])

        before_rss = rss()
        with cookieless.stream("GET", f"{prefix}/big?size={96 << 20}") as r:
            chunks = r.iter_bytes()
            got = len(next(chunks))
            time.sleep(3)
            grown = rss() - before_rss
            assert grown < 24 << 20, f"the server grew by {grown >> 20} MiB for a 96 MiB answer read slowly"
            for chunk in chunks:
                got += len(chunk)
        assert got == 96 << 20
        # redirects to the device's root stay in the proxy; others are left alone
        r = cookieless.get(f"{prefix}/redirect", follow_redirects=False)
        assert r.status_code == 302 and r.headers["location"] == f"{prefix}/landing?from=root"
        r = cookieless.get(f"{prefix}/redirect-abs", follow_redirects=False)
        assert r.headers["location"] == f"{prefix}/landing"
        r = cookieless.get(f"{prefix}/redirect-away", follow_redirects=False)
        assert r.headers["location"] == "https://example.org/elsewhere"
        cookieless.close()

    # one grant, audited once, for all of it; each session is audited as usual
    grants = audit(s, "session.proxy")
    assert len(grants) == 1 and grants[0]["detail"]["port"] == app.port and grants[0]["target"] == dev
    assert len(audit(s, "session.forward")) == len(forward_sessions(s))


def test_the_operators_credentials_never_reach_the_device(server: ServerProc, device: Device) -> None:
    s = server
    dev, app, _ = device
    with browser(s) as c:
        _, prefix = open_page(c, dev, app.port)
        # the device's login sets cookies: kept by the server, never by the browser on our host
        r = c.get(f"{prefix}/login", headers={"authorization": f"Bearer {s.admin_token}"})
        assert r.text == "logged in"
        for banned in ("set-cookie", "www-authenticate", "strict-transport-security"):
            assert banned not in r.headers, (banned, r.headers)
        assert "device_sid" not in c.cookies
        # the app sees its own cookie, and nothing of the operator's
        r = c.get(f"{prefix}/headers", headers={"authorization": f"Bearer {s.admin_token}", "origin": "null",
                                                 "x-csrf-token": "console-secret"})
        seen = r.json()["headers"]
        assert s.admin_token not in json.dumps(seen)
        assert "authorization" not in seen and "x-csrf-token" not in seen
        cookies = dict(kv.split("=", 1) for kv in seen["cookie"].split("; "))
        assert cookies == {"device_sid": "s3cret", "corral_session": "device-chosen"}, seen["cookie"]
        assert seen["host"] == f"localhost:{app.port}" and seen["origin"] == f"http://localhost:{app.port}"
        # the console's own cookie is still ours, untouched by the device
        assert c.cookies["corral_session"] == s.admin_token
    # the page's address is good only from where it was opened: a leaked link is no use elsewhere
    with browser(s) as c:
        _, prefix = open_page(c, dev, app.port)
        elsewhere = httpx.Client(base_url=s.url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        r = elsewhere.get(f"{prefix}/headers")
        assert r.status_code == 403 and "another network address" in r.json()["detail"], r.text
        # opened again from there through the console, it moves there
        elsewhere.cookies.set("corral_session", s.admin_token)
        r = elsewhere.get(f"/devices/{dev}/proxy/{app.port}/headers", headers={"sec-fetch-site": "same-origin"})
        assert r.status_code == 303 and r.headers["location"].startswith(prefix)
        assert elsewhere.get(f"{prefix}/headers").status_code == 200
        assert c.get(f"{prefix}/headers").status_code == 403
        elsewhere.close()
    # the page's address ends with the login that opened it
    olga = s.make_user("olga", "operator")
    assert s.api("PATCH", "/users/olga", json={"remote_access": True}).status_code == 200
    with browser(s, olga) as c:
        _, prefix = open_page(c, dev, app.port)
        assert c.get(f"{prefix}/headers").status_code == 200
        assert s.api("POST", "/auth/logout", token=olga).status_code == 204
        time.sleep(5.5)  # what a replica may trust a token for without asking the database
        r = httpx.get(f"{s.url}{prefix}/headers")
        assert r.status_code == 401 and "log in again" in r.json()["detail"], r.text
    # with an API token (a script): served directly, and the token stays here too
    with httpx.Client(base_url=s.url, timeout=30, headers={"authorization": f"Bearer {s.admin_token}"}) as api:
        r = api.get(f"/devices/{dev}/proxy/{app.port}/headers?q=1")
        assert r.status_code == 200 and r.json()["query"] == "q=1"
        assert s.admin_token not in r.text and "sandbox" in r.headers["content-security-policy"]


def test_a_websocket_through_the_proxy(server: ServerProc, device: Device) -> None:
    s = server
    dev, app, _ = device
    with browser(s) as c:
        _, prefix = open_page(c, dev, app.port)
    url = s.url.replace("http://", "ws://") + f"{prefix}/ws"
    with connect(url, subprotocols=["chat"], origin="null", open_timeout=20) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        ws.send("hello")
        assert ws.recv(timeout=15) == "echo:hello"
        ws.send(b"\x01\x02\x03" * 50_000)
        assert ws.recv(timeout=15) == (b"\x01\x02\x03" * 50_000)[::-1]
        ws.send("bye")  # the app closes with its own code: passed on
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=15)
    rcvd = closed.value.rcvd
    assert rcvd is not None and (rcvd.code, rcvd.reason) == (4001, "bye yourself")
    # the browser closing with a code: the app is told that code, and the session ends
    with connect(url, open_timeout=20) as ws:
        ws.send("x")
        assert ws.recv(timeout=15) == "echo:x"
        ws.close(4002, "done here")
    wait_until(lambda: 4002 in APP_CLOSES, what="the app told the browser's close code")
    # the app refuses the upgrade: the browser is refused too, with the reason
    with pytest.raises(InvalidStatus) as refused:
        connect(s.url.replace("http://", "ws://") + f"{prefix}/not-a-socket", open_timeout=20)
    assert refused.value.response.status_code == 502
    assert b"refused the WebSocket" in refused.value.response.body and b"403" in refused.value.response.body
    # every session ends: the sockets' with them, the page's kept connection once idle (15 s)
    wait_until(lambda: all(x["status"] == "closed" for x in forward_sessions(s)), timeout=40,
               what="the sessions closed")


def test_refusals_are_clear_and_open_nothing(server: ServerProc, device: Device) -> None:
    s = server
    dev, app, dying = device
    viewer = s.make_user("vera", "viewer")
    otto = s.make_user("otto", "operator")  # without the remote-access permission
    before = len(forward_sessions(s))
    for token in (viewer, otto):
        with browser(s, token) as c:
            r = c.get(f"/devices/{dev}/proxy/{app.port}/")
            assert r.status_code == 403 and "remote-access permission" in r.json()["detail"], r.text
        r = httpx.get(f"{s.url}/devices/{dev}/proxy/{app.port}/", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 403
        with pytest.raises(InvalidStatus) as refused:
            connect(s.url.replace("http://", "ws://") + f"/devices/{dev}/proxy/{app.port}/ws",
                    additional_headers={"authorization": f"Bearer {token}"}, open_timeout=10)
        assert refused.value.response.status_code == 403
    r = httpx.get(f"{s.url}/devices/{dev}/proxy/{app.port}/")
    assert r.status_code == 401
    # a browser that is not logged in goes to the console's login, and comes back after it
    r = httpx.get(f"{s.url}/devices/{dev}/proxy/{app.port}/x?y=1", headers={"sec-fetch-mode": "navigate"})
    assert r.status_code == 303
    assert r.headers["location"] == f"/login?next=%2Fdevices%2F{dev}%2Fproxy%2F{app.port}%2Fx%3Fy%3D1"
    with browser(s) as c:
        # bad ports, an unknown device
        for port in ("0", "65536", "http"):
            r = c.get(f"/devices/{dev}/proxy/{port}/")
            assert r.status_code == 400 and "port" in r.json()["detail"], r.text
        r = c.get(f"/devices/{'0' * 32}/proxy/{app.port}/")
        assert r.status_code == 404 and "no device" in r.json()["detail"]
        # a capability that does not exist, or for another port
        r = c.get(f"/devices/{dev}/proxy/{app.port}/~{'A' * 43}/")
        assert r.status_code == 404 and "open it again from the console" in r.json()["detail"]
        # another site cannot make the operator's browser open a device's page
        r = c.get(f"/devices/{dev}/proxy/{app.port}/", headers={"sec-fetch-site": "cross-site"})
        assert r.status_code == 403
    assert len(forward_sessions(s)) == before and audit(s, "session.proxy") == []

    with browser(s) as c:
        # a port the device's allow-list refuses: a 502 that says so
        _, prefix = open_page(c, dev, app.port)
        other = free_port()
        r = c.get(f"/devices/{dev}/proxy/{other}/", follow_redirects=True)
        assert r.status_code == 502 and "not an allowed forward target" in r.json()["detail"], r.text
        # the app hangs up without answering: a 502 that says so
        r = c.get(f"/devices/{dev}/proxy/{dying.port}/anything", follow_redirects=True)
        assert r.status_code == 502 and "closed the connection" in r.json()["detail"], r.text
        # the app breaks down in the middle of a download: the browser sees it cut short, not whole
        with pytest.raises(httpx.RemoteProtocolError), c.stream("GET", f"{prefix}/broken") as r:
            assert r.status_code == 200
            for _ in r.iter_bytes():
                pass
        # the app is gone altogether
        app.stop()
        r = c.get(f"{prefix}/", headers={"cache-control": "no-cache"})
        assert r.status_code == 502 and "cannot connect" in r.json()["detail"], r.text
