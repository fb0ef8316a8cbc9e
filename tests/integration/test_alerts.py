"""Server-side alerts end to end: a threshold over a group aggregate fires to a signed webhook and
resolves; an offline alert per device; an event-rate alert; bad alert definitions are refused.
Devices are hand-written protocol clients, so the metric values are exactly what the test says."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from corral import protocol as p
from tests.conftest import ServerProc, start_server, wait_until
from tests.integration.rawdevice import Key, codec, connect_device, recv_type
from tests.integration.webhook_receiver import Receiver


@pytest.fixture
def server(tmp_path: Path) -> Any:
    s = start_server(tmp_path, heartbeat=0.5, extra=["--alert-interval", "0.3"])
    yield s
    s.stop()


def subscribe(server: ServerProc, receiver: Receiver) -> str:
    r = server.api("POST", "/webhooks", json={"url": receiver.url, "events": ["alert.*"]})
    assert r.status_code == 201, r.text
    return str(r.json()["secret"])


def alert_messages(receiver: Receiver) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in receiver.requests]


class Reporter:
    """A device that reports cpu.percent = value every 0.2 s until told otherwise."""

    def __init__(self, server: ServerProc, token: str) -> None:
        self.server, self.token, self.key = server, token, Key.new()
        self.value = 0.0
        self.seq = 0

    async def run(self, stop: asyncio.Event) -> None:
        ws, welcome = await connect_device(self.server.ws_url, self.key, self.token)
        assert isinstance(welcome, p.Welcome)
        try:
            while not stop.is_set():
                self.seq += 1
                now = int(time.time() * 1000)
                await ws.send(codec.encode(p.Telemetry(seq=self.seq, series=[
                    p.MetricSeries("cpu.percent", [now], [self.value])])))
                await recv_type(ws, p.TelemetryAck)
                await asyncio.sleep(0.2)
        finally:
            await ws.close()


def test_threshold_alert_fires_to_a_signed_webhook_and_resolves(server: ServerProc, receiver: Receiver) -> None:
    secret = subscribe(server, receiver)
    token = server.create_enrollment_token(tags={"site": "berlin"})
    r = server.cli("alert", "create", "hot-berlin", "--threshold", "avg(cpu.percent) > 80 for 1s",
                   "--window", "2s", "--by", "tag.site", "--selector", 'tag.site == "berlin"', "--severity", "critical")
    assert r.returncode == 0, r.stderr
    devs = [Reporter(server, token) for _ in range(2)]

    async def scenario() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(d.run(stop)) for d in devs]
        try:
            for d in devs:
                d.value = 50.0
            await asyncio.sleep(2)
            assert not alert_messages(receiver), "fired while the average was 50"
            devs[0].value, devs[1].value = 95.0, 85.0  # average 90
            await asyncio.to_thread(wait_until, lambda: alert_messages(receiver), 30, 0.1, "alert.firing")
            for d in devs:
                d.value = 20.0
            await asyncio.to_thread(wait_until, lambda: len(alert_messages(receiver)) >= 2, 30, 0.1,
                                    "alert.resolved")
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert receiver.verified(secret), "a notification's signature did not verify"
    msgs = alert_messages(receiver)
    assert [m["type"] for m in msgs[:2]] == ["alert.firing", "alert.resolved"]
    fired = msgs[0]["data"]
    assert fired["alert"]["name"] == "hot-berlin" and fired["key"] == "berlin" and fired["state"] == "firing"
    assert 80 < fired["value"] <= 95
    shown = json.loads(server.cli("alert", "show", "hot-berlin", "--json").stdout)
    assert [(i["key"], i["state"]) for i in shown["instances"]] == [("berlin", "inactive")]
    assert shown["instances"][0]["resolved_at"] is not None


def test_offline_alert_per_device(server: ServerProc, receiver: Receiver) -> None:
    subscribe(server, receiver)
    token = server.create_enrollment_token()
    assert server.cli("alert", "create", "gone", "--offline", "1s").returncode == 0

    key = Key.new()

    async def connect_then_vanish() -> str:
        ws, welcome = await connect_device(server.ws_url, key, token)
        assert isinstance(welcome, p.Welcome)
        await ws.close()
        return key.device_id

    dev = asyncio.run(connect_then_vanish())
    wait_until(lambda: alert_messages(receiver), 30, what="the offline alert")
    m = alert_messages(receiver)[0]
    assert m["type"] == "alert.firing" and m["data"]["key"] == dev
    ov = server.api("GET", "/overview").json()
    assert [(a["alert"], a["key"]) for a in ov["firing_alerts"]] == [("gone", dev)]

    async def come_back() -> None:
        ws, welcome = await connect_device(server.ws_url, key, None)
        assert isinstance(welcome, p.Welcome)
        try:
            await asyncio.to_thread(wait_until, lambda: len(alert_messages(receiver)) >= 2, 30, 0.1, "resolved")
        finally:
            await ws.close()

    asyncio.run(come_back())
    assert [(x["type"], x["data"]["key"]) for x in alert_messages(receiver)][:2] == [
        ("alert.firing", dev), ("alert.resolved", dev)]


def test_event_rate_alert(server: ServerProc, receiver: Receiver) -> None:
    subscribe(server, receiver)
    token = server.create_enrollment_token()
    assert server.cli("alert", "create", "crashes", "--event-rate", "3", "--min-severity", "error",
                      "--window", "1m").returncode == 0

    async def crash(n: int) -> None:
        ws, _ = await connect_device(server.ws_url, Key.new(), token)
        now = int(time.time() * 1000)
        events = [p.Event(ts=now + i, severity="error", source="app", message=f"crash {i}") for i in range(n)]
        events.append(p.Event(ts=now, severity="info", source="app", message="not counted"))
        await ws.send(codec.encode(p.Telemetry(seq=1, events=events)))
        await recv_type(ws, p.TelemetryAck)
        await ws.close()

    asyncio.run(crash(2))
    time.sleep(1.5)
    assert not alert_messages(receiver)
    asyncio.run(crash(1))
    wait_until(lambda: alert_messages(receiver), 30, what="the event-rate alert")
    assert alert_messages(receiver)[0]["data"]["value"] == 3


@pytest.mark.parametrize("args,needle", [
    (["--threshold", "cpu.percent > 80"], "aggregate"),
    (["--threshold", "avg(cpu.percent) >"], "column"),
    (["--threshold", "median(cpu.percent) > 1"], "column"),
    (["--offline", "soon"], "duration"),
    (["--threshold", "avg(x) > 1", "--by", "site"], "tag.KEY"),
    (["--threshold", "avg(x) > 1", "--selector", "tag.site =="], "column"),
    (["--threshold", "avg(x) > 1", "--offline", "1m"], "exactly one"),
])
def test_bad_alerts_are_refused(server: ServerProc, args: list[str], needle: str) -> None:
    r = server.cli("alert", "create", "bad", *args)
    assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert server.api("GET", "/alerts").json()["items"] == []
