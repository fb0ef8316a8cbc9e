"""Bad input on the device surface: each is refused, the server stays healthy, and nothing in
the database changes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from corral import protocol as p
from tests.conftest import ServerProc
from tests.integration.rawdevice import Key, challenge, close_code, codec, connect_device, open_ws, recv_type


def snapshot(server: ServerProc) -> tuple:
    """What must not change: devices, tokens (uses) and the audit log."""
    devices = server.api("GET", "/devices", params={"limit": 1000}).json()["items"]
    tokens = server.api("GET", "/enrollment-tokens").json()["items"]
    audit = server.api("GET", "/audit", params={"limit": 1}).json()["items"]
    return (sorted((d["id"], d["status"]) for d in devices), sorted((t["id"], t["uses"]) for t in tokens),
            audit[0]["seq"] if audit else 0)


def healthy(server: ServerProc) -> bool:
    return httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def refused(server: ServerProc, key: Key, token: str | None) -> int | None:
    async def go() -> int | None:
        ws, body = await connect_device(server.ws_url, key, token)
        await ws.close()
        assert not isinstance(body, p.Welcome), body
        return body if isinstance(body, int) else None

    return asyncio.run(go())


@pytest.mark.parametrize("case", ["wrong", "expired", "used_up", "revoked"])
def test_bad_enrollment_token_is_refused_and_changes_nothing(shared_server: ServerProc, case: str) -> None:
    if case == "wrong":
        token = "cet_" + "x" * 32
    elif case == "expired":
        token = shared_server.create_enrollment_token(expires="1s")
        time.sleep(1.2)
    elif case == "used_up":
        token = shared_server.create_enrollment_token(max_uses=1)

        async def use_once() -> object:
            ws, body = await connect_device(shared_server.ws_url, Key.new(), token)
            await ws.close()
            return body

        body = asyncio.run(use_once())
        assert isinstance(body, p.Welcome) and body.status == "accepted"
    else:
        created = shared_server.api("POST", "/enrollment-tokens", json={}).json()
        token, tid = created["token"], created["id"]
        assert shared_server.api("DELETE", f"/enrollment-tokens/{tid}").status_code == 200
    before = snapshot(shared_server)
    assert refused(shared_server, Key.new(), token) == p.CloseCode.AUTH_FAILED
    assert snapshot(shared_server) == before
    assert healthy(shared_server)


def test_forged_signature_and_mismatched_id_are_refused(shared_server: ServerProc) -> None:
    token = shared_server.create_enrollment_token()
    before = snapshot(shared_server)
    victim, attacker = Key.new(), Key.new()

    async def go() -> list[int | None]:
        codes = []
        # claims the victim's identity, signs with another key
        ws = await open_ws(shared_server.ws_url)
        nonce = await challenge(ws)
        forged = p.Hello(device_id=victim.device_id, public_key=victim.public,
                         signature=attacker.private.sign(
                             p.hello_signing_payload(nonce, victim.device_id, victim.public)),
                         enroll_token=token)
        await ws.send(codec.encode(forged))
        codes.append(await close_code(ws))
        # a device id that is not the fingerprint of the key presented (an unknown key)
        ws = await open_ws(shared_server.ws_url)
        nonce = await challenge(ws)
        h = attacker.hello(nonce, token)
        await ws.send(codec.encode(p.Hello(device_id=victim.device_id, public_key=h.public_key,
                                           signature=h.signature, enroll_token=token)))
        codes.append(await close_code(ws))
        return codes

    assert asyncio.run(go()) == [p.CloseCode.AUTH_FAILED, p.CloseCode.AUTH_FAILED]
    assert snapshot(shared_server) == before
    assert healthy(shared_server)


def test_replayed_hello_is_refused(shared_server: ServerProc) -> None:
    token = shared_server.create_enrollment_token(max_uses=1)
    key = Key.new()

    async def go() -> int | None:
        ws1 = await open_ws(shared_server.ws_url)
        nonce1 = await challenge(ws1)
        captured = codec.encode(key.hello(nonce1, token))
        await ws1.close()  # the legitimate device never completed
        ws2 = await open_ws(shared_server.ws_url)
        await challenge(ws2)  # a fresh nonce; the attacker replays the old signature
        await ws2.send(captured)
        return await close_code(ws2)

    before = snapshot(shared_server)
    assert asyncio.run(go()) == p.CloseCode.AUTH_FAILED
    assert snapshot(shared_server) == before


def test_tokenless_unknown_device_refused_when_pending_is_disabled(tmp_path) -> None:
    from tests.conftest import start_server

    s = start_server(tmp_path, extra=["--no-allow-pending"])
    try:
        before = snapshot(s)
        assert refused(s, Key.new(), None) == p.CloseCode.AUTH_FAILED
        assert snapshot(s) == before
    finally:
        s.stop()


@pytest.mark.parametrize("frame", [
    b"\x00\x01garbage",
    "not json at all",
    codec.encode(p.Heartbeat(seq=1)),  # wrong message before hello
    b"\x81\xa4type\xa5hello",  # hello without a body
], ids=["garbage", "not-json", "heartbeat-before-hello", "hello-without-body"])  # fixed ids: one encodes a time
def test_malformed_handshake_frames_close_the_socket(shared_server: ServerProc, frame: bytes | str) -> None:
    before = snapshot(shared_server)

    async def go() -> int | None:
        ws = await open_ws(shared_server.ws_url)
        await challenge(ws)
        await ws.send(frame)
        return await close_code(ws)

    assert asyncio.run(go()) == p.CloseCode.MALFORMED
    assert snapshot(shared_server) == before
    assert healthy(shared_server)


def test_malformed_and_oversized_frames_after_welcome(shared_server: ServerProc) -> None:
    token = shared_server.create_enrollment_token()
    key = Key.new()

    async def go() -> tuple[int | None, int | None]:
        ws, body = await connect_device(shared_server.ws_url, key, token)
        assert isinstance(body, p.Welcome)
        await ws.send(b"\xc1")  # never valid msgpack
        c1 = await close_code(ws)
        ws, body = await connect_device(shared_server.ws_url, key)
        assert isinstance(body, p.Welcome)
        await ws.send(b"\x00" * (2 << 20))  # over the 1 MiB frame limit
        c2 = await close_code(ws)
        return c1, c2

    c1, c2 = asyncio.run(go())
    assert c1 == p.CloseCode.MALFORMED
    assert c2 == p.CloseCode.TOO_BIG
    assert healthy(shared_server)
    d = shared_server.api("GET", f"/devices/{key.device_id}").json()
    assert d["status"] == "accepted" and d["inventory"] == {}

    # and a well-behaved device still works afterwards
    async def ok() -> bool:
        ws, _ = await connect_device(shared_server.ws_url, key)
        await ws.send(codec.encode(p.Heartbeat(seq=7)))
        ack = await recv_type(ws, p.HeartbeatAck, 5)
        await ws.close()
        return ack.seq == 7

    assert asyncio.run(ok())


def test_a_second_connection_replaces_the_first(shared_server: ServerProc) -> None:
    token = shared_server.create_enrollment_token()
    key = Key.new()

    async def go() -> int | None:
        ws1, b1 = await connect_device(shared_server.ws_url, key, token)
        ws2, b2 = await connect_device(shared_server.ws_url, key)
        assert isinstance(b1, p.Welcome) and isinstance(b2, p.Welcome)
        code = await close_code(ws1)
        await ws2.close()
        return code

    assert asyncio.run(go()) == p.CloseCode.REPLACED


def test_no_hello_in_time_times_out(shared_server: ServerProc) -> None:
    async def go() -> bool:
        ws = await open_ws(shared_server.ws_url)
        await challenge(ws)
        # the server waits `hello` seconds (10); it must still serve others meanwhile
        assert healthy(shared_server)
        await ws.close()
        return True

    assert asyncio.run(go())


def test_subprotocol_is_required(shared_server: ServerProc) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    async def go() -> object:
        try:
            async with connect(shared_server.ws_url, open_timeout=5) as ws:
                await ws.recv()
        except ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None
        except InvalidStatus as e:
            return e.response.status_code
        return None

    assert asyncio.run(go()) in (p.CloseCode.MALFORMED, 403)


def test_handshakes_over_the_limit_are_refused_with_4429(tmp_path) -> None:
    from tests.conftest import start_server

    s = start_server(tmp_path, extra=["--max-handshakes", "2"])
    try:
        async def go() -> tuple[int | None, bool]:
            stalled = [await open_ws(s.ws_url) for _ in range(2)]  # take the challenge, never answer
            for ws in stalled:
                await challenge(ws)
            extra = await open_ws(s.ws_url)
            code = await close_code(extra)
            for ws in stalled:
                await ws.close()
            # once the stalled handshakes are gone, devices get in again
            token = s.create_enrollment_token()
            ws, body = await connect_device(s.ws_url, Key.new(), token)
            await ws.close()
            return code, isinstance(body, p.Welcome)

        code, admitted = asyncio.run(go())
        assert code == p.CloseCode.RATE_LIMITED
        assert admitted
        assert healthy(s)
    finally:
        s.stop()
