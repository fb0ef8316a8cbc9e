"""The management API on both database engines: roles, validation, paging, selectors, audit."""

from __future__ import annotations

import asyncio

import pytest

from corral import protocol as p
from tests.conftest import ServerProc
from tests.integration.rawdevice import Key, codec, connect_device


def enroll(server: ServerProc, n: int, tags: dict[str, str] | None = None) -> list[str]:
    """Enroll n devices over the real device protocol; returns their ids (they disconnect)."""
    token = server.create_enrollment_token(tags=tags or {})

    async def go() -> list[str]:
        ids = []
        for _ in range(n):
            key = Key.new()
            ws, _ = await connect_device(server.ws_url, key, token)
            await ws.close()
            ids.append(key.device_id)
        return ids

    return asyncio.run(go())


def audit_head(server: ServerProc) -> int:
    items = server.api("GET", "/audit", params={"limit": 1}).json()["items"]
    return items[0]["seq"] if items else 0


def make_user(server: ServerProc, name: str, role: str) -> str:
    return server.make_user(name, role)


def test_roles_and_errors(any_server: ServerProc) -> None:
    s = any_server
    [dev] = enroll(s, 1)
    viewer = make_user(s, "vera", "viewer")
    operator = make_user(s, "otto", "operator")
    before = audit_head(s)

    # a viewer reads but cannot change anything
    assert s.api("GET", "/devices", token=viewer).status_code == 200
    for method, path, body in [
        ("PATCH", f"/devices/{dev}/tags", {"set": {"a": "b"}}),
        ("POST", f"/devices/{dev}/decommission", None),
        ("POST", "/groups", {"name": "g"}),
        ("POST", "/enrollment-tokens", {}),
        ("POST", f"/devices/{dev}/commands", {"name": "ping"}),
        ("POST", "/users", {"name": "x", "role": "admin", "password": "whatever123"}),
    ]:
        r = s.api(method, path, token=viewer, json=body)
        assert r.status_code == 403, (path, r.text)
        doc = r.json()
        assert doc["error"] == "forbidden" and doc["detail"] and doc["request_id"]
    # an operator manages devices but not users
    assert s.api("POST", "/users", token=operator,
                 json={"name": "x", "role": "admin", "password": "whatever123"}).status_code == 403
    # no token, a bad token
    assert s.api("GET", "/devices", token="crl_nope").status_code == 401
    with s.client() as c:
        c.headers.pop("Authorization")
        r = c.get("/devices")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert audit_head(s) == before

    # unknown device: 404 everywhere
    for method, path in [("GET", "/devices/nope"), ("PATCH", "/devices/nope/tags"),
                         ("POST", "/devices/nope/accept"), ("POST", "/devices/nope/commands")]:
        body = {"set": {"a": "b"}} if method == "PATCH" else {"name": "ping"}
        r = s.api(method, path, json=body)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"] == "not_found"
    assert audit_head(s) == before


@pytest.mark.parametrize("tags", [
    {"site": "a\x00b"},
    {"site": "line\nbreak"},
    {"site": "bell\x07"},
    {"site": "rtl\u202eoverride"},
    {"bad key": "x"},
    {"": "x"},
    {"k\x01": "x"},
    {"k" * 65: "x"},
    {"site": "v" * 257},
])
def test_bad_tags_are_refused_and_change_nothing(shared_server: ServerProc, tags: dict[str, str]) -> None:
    s = shared_server
    [dev] = enroll(s, 1)
    before = (s.api("GET", f"/devices/{dev}").json()["tags"], audit_head(s))
    r = s.api("PATCH", f"/devices/{dev}/tags", json={"set": tags})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_input" and "tag" in r.json()["detail"]
    assert s.api("POST", "/enrollment-tokens", json={"tags": tags}).status_code == 400
    assert (s.api("GET", f"/devices/{dev}").json()["tags"], audit_head(s)) == before


def test_limits_at_the_edge_are_accepted(shared_server: ServerProc) -> None:
    s = shared_server
    [dev] = enroll(s, 1)
    tags = {"k" * 64: "v" * 256, "unicode": "Zürich · 東京"}
    r = s.api("PATCH", f"/devices/{dev}/tags", json={"set": tags})
    assert r.status_code == 200, r.text
    assert r.json()["tags"] == tags


@pytest.mark.parametrize(("selector", "column"), [
    ('tag.site == ', 13),
    ('tag.site = "x"', 10),
    ('online and (tag.a == "b"', 25),
    ('bogus.field == 1', 1),
    ('tag.site == "unterminated', 13),
])
def test_invalid_selector_names_the_column(shared_server: ServerProc, selector: str, column: int) -> None:
    s = shared_server
    before = audit_head(s)
    r = s.api("GET", "/devices", params={"selector": selector})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_selector"
    assert f"column {column}" in r.json()["detail"], r.json()["detail"]
    r = s.api("POST", "/groups", json={"name": "broken", "selector": selector})
    assert r.status_code == 400 and f"column {column}" in r.json()["detail"]
    assert s.api("GET", "/groups/broken").status_code == 404
    assert audit_head(s) == before
    r = s.cli("device", "list", "--selector", selector)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and f"column {column}" in r.stderr


def test_paging_and_selectors(any_server: ServerProc) -> None:
    s = any_server
    berlin = enroll(s, 7, {"site": "berlin"})
    lisbon = enroll(s, 5, {"site": "lisbon"})
    seen: list[str] = []
    cursor = None
    while True:
        page = s.api("GET", "/devices", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 3
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted(berlin + lisbon) and len(seen) == len(set(seen))
    # descending by creation time, paged
    seen = []
    cursor = None
    while True:
        params = {"limit": 4, "sort": "-created_at", **({"cursor": cursor} if cursor else {})}
        page = s.api("GET", "/devices", params=params).json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(berlin + lisbon))

    r = s.api("GET", "/devices", params={"selector": 'tag.site == "lisbon"', "limit": 100}).json()
    assert sorted(d["id"] for d in r["items"]) == sorted(lisbon)
    assert s.api("GET", "/devices", params={"cursor": "!!!"}).status_code == 400
    assert s.api("GET", "/devices", params={"limit": 100000}).status_code == 400
    assert s.api("GET", "/devices", params={"sort": "password"}).status_code == 400

    # static and dynamic groups, and the selector's `group` field
    assert s.api("POST", "/groups", json={"name": "canary"}).status_code == 201
    assert s.api("POST", "/groups/canary/members", json={"device_ids": berlin[:2]}).json()["size"] == 2
    assert s.api("POST", "/groups/canary/members", json={"device_ids": ["nope"]}).status_code == 404
    assert s.api("POST", "/groups", json={"name": "canary-lisbon",
                                          "selector": 'group == "canary" or tag.site == "lisbon"'}).status_code == 201
    g = s.api("GET", "/groups/canary-lisbon").json()
    assert g["kind"] == "dynamic" and g["size"] == 7
    assert s.api("POST", "/groups/canary-lisbon/members", json={"device_ids": berlin[:1]}).status_code == 409
    assert s.api("POST", "/groups", json={"name": "canary"}).status_code == 409
    assert s.api("POST", "/groups", json={"name": "bad name!"}).status_code == 400
    members = s.api("GET", "/groups/canary-lisbon/devices", params={"limit": 2}).json()
    assert len(members["items"]) == 2 and members["next_cursor"]
    # tokens can put devices in a static group at enrollment
    tok = s.create_enrollment_token(groups=["canary"])
    assert s.api("POST", "/enrollment-tokens", json={"groups": ["canary-lisbon"]}).status_code == 400
    assert s.api("POST", "/enrollment-tokens", json={"groups": ["missing"]}).status_code == 404

    async def one() -> str:
        key = Key.new()
        ws, _ = await connect_device(s.ws_url, key, tok)
        await ws.close()
        return key.device_id

    newcomer = asyncio.run(one())
    assert s.api("GET", f"/devices/{newcomer}").json()["groups"] == ["canary"]


def enroll_reporting(server: ServerProc, inventories: list[dict[str, str]], tags: dict[str, str]) -> list[str]:
    """Enroll devices that report an inventory each (host name, agent version); their ids, once the
    server has stored what they reported."""
    token = server.create_enrollment_token(tags=tags)

    async def go() -> list[str]:
        ids = []
        for inv in inventories:
            key = Key.new()
            ws, _ = await connect_device(server.ws_url, key, token)
            if inv:
                await ws.send(codec.encode(p.Inventory(**inv)))  # type: ignore[arg-type]
                path = f"/devices/{key.device_id}"
                for _ in range(200):
                    if (await asyncio.to_thread(server.api, "GET", path)).json()["inventory"]:
                        break
                    await asyncio.sleep(0.05)
            await ws.close()
            ids.append(key.device_id)
        return ids

    return asyncio.run(go())


def test_sorting_by_name_and_version_with_a_selector_and_pages(any_server: ServerProc) -> None:
    s = any_server
    d0, d1, d2, d3 = enroll_reporting(s, [{"hostname": "delta", "agent_version": "1.2.0"},
                                          {"hostname": "zulu", "agent_version": "1.10.0"},
                                          {"hostname": "bravo"}, {}], {"sortcase": "yes"})
    enroll(s, 2, {"sortcase": "no"})  # not selected: never on a page
    assert s.api("PATCH", f"/devices/{d1}/tags", json={"set": {"name": "alpha"}}).status_code == 200
    assert s.api("PATCH", f"/devices/{d3}/tags", json={"set": {"name": "charlie"}}).status_code == 200
    assert s.api("PATCH", f"/devices/{d0}/tags", json={"set": {"name": ""}}).status_code == 200  # empty: the host

    def pages(sort: str) -> list[str]:
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 3, "sort": sort, "selector": 'tag.sortcase == "yes"', **({"cursor": cursor} if cursor
                                                                                         else {})}
            r = s.api("GET", "/devices", params=params)
            assert r.status_code == 200, r.text
            seen += [d["id"] for d in r.json()["items"]]
            cursor = r.json()["next_cursor"]
            if not cursor:
                return seen

    # the name tag, else the host name: alpha (tag), bravo (host), charlie (tag), delta (host)
    assert pages("name") == [d1, d2, d3, d0]
    assert pages("-name") == [d0, d3, d2, d1]
    # versions compare as text; none at all first (ties by id)
    assert pages("version") == [*sorted([d2, d3]), d1, d0]
    assert pages("-version") == [d0, d1, *sorted([d2, d3], reverse=True)]
    # a cursor of another order is refused, not misread
    first = s.api("GET", "/devices", params={"limit": 1, "sort": "id"}).json()["next_cursor"]
    r = s.api("GET", "/devices", params={"limit": 1, "sort": "name", "cursor": first})
    assert r.status_code == 400 and "sort order" in r.json()["detail"]
    by_seen = s.api("GET", "/devices", params={"limit": 1, "sort": "last_seen"}).json()["next_cursor"]
    assert s.api("GET", "/devices", params={"limit": 1, "sort": "version", "cursor": by_seen}).status_code == 400


def test_audit_chain_detects_altered_and_deleted_rows(any_server: ServerProc) -> None:
    s = any_server
    [dev] = enroll(s, 1)
    for i in range(5):
        assert s.api("PATCH", f"/devices/{dev}/tags", json={"set": {"n": str(i)}}).status_code == 200
    r = s.cli("audit", "verify")
    assert r.returncode == 0, r.stderr
    assert "intact" in r.stderr
    r = s.cli("audit", "list", "--json")
    entries = __import__("json").loads(r.stdout)
    assert entries[0]["action"] == "device.tag" and entries[-1]["action"] == "server.init"

    def sql(statement: str) -> None:
        if s.db_url:
            import asyncpg

            async def run() -> None:
                conn = await asyncpg.connect(s.db_url)
                try:
                    await conn.execute(statement)
                finally:
                    await conn.close()

            asyncio.run(run())
        else:
            import sqlite3

            con = sqlite3.connect(s.data_dir / "corral.db")
            con.execute(statement)
            con.commit()
            con.close()

    # altered: someone rewrites who did it
    sql("UPDATE audit_log SET actor = 'user:nobody' WHERE seq = 4")
    r = s.cli("audit", "verify")
    assert r.returncode == 1 and "entry 4 was altered" in r.stderr, r.stderr
    sql("UPDATE audit_log SET actor = 'user:admin' WHERE seq = 4")
    assert s.cli("audit", "verify").returncode == 0
    # deleted from the middle
    sql("DELETE FROM audit_log WHERE seq = 3")
    r = s.cli("audit", "verify", "--json")
    assert r.returncode == 1 and "missing" in r.stdout


def test_audit_truncated_tail_is_detected(shared_server: ServerProc) -> None:
    import sqlite3

    s = shared_server
    enroll(s, 1)
    con = sqlite3.connect(s.data_dir / "corral.db")
    last = con.execute("SELECT max(seq) FROM audit_log").fetchone()[0]
    con.execute("DELETE FROM audit_log WHERE seq = ?", (last,))
    con.commit()
    con.close()
    r = s.cli("audit", "verify")
    assert r.returncode == 1 and "truncated" in r.stderr


def test_service_endpoints_and_body_limit(shared_server: ServerProc) -> None:
    import httpx

    s = shared_server
    health = httpx.get(s.url + "/healthz").json()
    assert health["status"] == "ok"
    spec = httpx.get(s.url + "/openapi.json").json()
    for path in ("/api/v1/devices", "/api/v1/groups", "/api/v1/enrollment-tokens", "/api/v1/audit",
                 "/api/v1/auth/login"):
        assert path in spec["paths"], path
    home = httpx.get(s.url + "/")  # the web console: its login page first
    assert home.status_code == 303 and home.headers["location"].startswith("/login")
    r = s.api("GET", "/devices", headers={"X-Request-ID": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    before = audit_head(s)
    big = {"set": {"k": "v"}, "pad": "x" * (2 << 20)}
    r = s.api("PATCH", "/devices/whatever/tags", json=big)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    r = s.api("POST", "/groups", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_input"
    assert audit_head(s) == before
