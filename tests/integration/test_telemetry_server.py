"""Telemetry on the server, driven by a hand-written device: idempotent ingestion, acks, bad
input rejected with a reason, queries per device and per tag, rollups and late backfill, events,
the overview and Prometheus. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import httpx
import msgspec
import pytest

from corral import protocol as p
from tests.conftest import ServerProc, server_on, wait_until
from tests.integration.rawdevice import Key, close_code, codec, connect_device, recv_type


class Device:
    def __init__(self, server: ServerProc, token: str) -> None:
        self.server, self.token, self.key = server, token, Key.new()
        self.ws: Any = None

    async def __aenter__(self) -> Device:
        self.ws, welcome = await connect_device(self.server.ws_url, self.key, self.token)
        assert isinstance(welcome, p.Welcome) and welcome.status == "accepted", welcome
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    async def send(self, batch: p.Telemetry) -> p.TelemetryAck:
        await self.ws.send(codec.encode(batch))
        ack = await recv_type(self.ws, p.TelemetryAck)
        assert ack.seq == batch.seq
        return ack


def now_ms() -> int:
    return int(time.time() * 1000)


def series(name: str, points: list[tuple[int, float]]) -> p.MetricSeries:
    return p.MetricSeries(name, [t for t, _ in points], [v for _, v in points])


def query(server: ServerProc, **params: Any) -> dict[str, Any]:
    r = server.api("GET", "/metrics/query", params=params)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(params=["sqlite", "postgresql"])
def mserver(request: pytest.FixtureRequest, tmp_path) -> Any:
    yield from server_on(request.param, tmp_path, extra=["--rollup-interval", "0.5"])


def test_ingest_is_idempotent_and_queryable(mserver: ServerProc) -> None:
    s = mserver
    token = s.create_enrollment_token(tags={"site": "berlin"})
    t0 = now_ms() - 120_000
    pts = [(t0 + i * 10_000, float(i)) for i in range(12)]

    async def go() -> tuple[str, list[p.TelemetryAck]]:
        async with Device(s, token) as d:
            acks = [await d.send(p.Telemetry(seq=1, series=[series("cpu.percent", pts[:6])])),
                    await d.send(p.Telemetry(seq=2, series=[series("cpu.percent", pts[6:])])),
                    await d.send(p.Telemetry(seq=1, series=[series("cpu.percent", pts[:6])]))]  # again
            return d.key.device_id, acks

    dev, acks = asyncio.run(go())
    assert [a.duplicate for a in acks] == [False, False, True]
    assert all(a.rejected == 0 for a in acks)
    r = query(s, metric="cpu.percent", device=dev, since="5m", step="10s", agg="count")
    got = [v for _, v in r["series"][0]["points"]]
    assert sum(got) == 12 and max(got) == 1  # each point exactly once
    raw = query(s, metric="cpu.percent", device=dev, since="5m", step="10s", agg="avg")["series"][0]["points"]
    assert [v for _, v in raw] == [float(i) for i in range(12)]
    assert [t for t, _ in raw] == sorted(t for t, _ in raw)
    latest = s.api("GET", f"/devices/{dev}/metrics").json()
    assert latest["metrics"]["cpu.percent"]["value"] == 11.0


def test_bad_points_are_rejected_with_a_reason_and_the_rest_kept(mserver: ServerProc) -> None:
    s = mserver
    token = s.create_enrollment_token()
    t = now_ms()

    async def go() -> tuple[str, list[p.TelemetryAck]]:
        async with Device(s, token) as d:
            acks = []
            for i, (name, ts, v) in enumerate([
                ("mem.percent", t, math.nan), ("mem.percent", t, math.inf), ("mem.percent", t + 86_400_000, 1.0),
                ("mem.percent", t - 30 * 86_400_000, 1.0), ("../etc/passwd", t, 1.0), ("x; DROP TABLE points", t, 1.0),
                ("a" * 200, t, 1.0),
            ], start=1):
                acks.append(await d.send(p.Telemetry(seq=i, series=[series(name, [(ts, v)]),
                                                                    series("mem.percent", [(t - i, 5.0)])])))
            # too many points: the batch as a whole
            big = p.Telemetry(seq=99, series=[p.MetricSeries("x.y", list(range(t - 30_000, t)), [1.0] * 30_000)])
            acks.append(await d.send(big))
            return d.key.device_id, acks

    dev, acks = asyncio.run(go())
    for a in acks[:-1]:
        assert a.rejected == 1 and a.reason, a
    assert acks[-1].rejected == 30_000 and "at most" in acks[-1].reason
    r = query(s, metric="mem.percent", device=dev, since="5m", step="1s", agg="count")
    assert sum(v for _, v in r["series"][0]["points"]) == 7  # the good point of every batch
    names = s.api("GET", "/metrics", params={"device": dev}).json()["items"]
    assert names == ["mem.percent"]
    assert httpx.get(s.url + "/healthz", timeout=5).status_code == 200


def test_group_query_by_tag_and_rollups_with_late_backfill(mserver: ServerProc) -> None:
    s = mserver
    tokens = {site: s.create_enrollment_token(tags={"site": site}) for site in ("berlin", "lisbon")}
    base = (now_ms() // 60_000) * 60_000 - 30 * 60_000  # half an hour ago, on a minute edge

    async def go() -> list[str]:
        ids = []
        for site, value in (("berlin", 10.0), ("berlin", 30.0), ("lisbon", 50.0)):
            async with Device(s, tokens[site]) as d:
                # 20 minutes of points every 10 s, sent as a late backfill in one go
                pts = [(base + i * 10_000, value) for i in range(120)]
                await d.send(p.Telemetry(seq=1, series=[series("cpu.percent", pts)]))
                ids.append(d.key.device_id)
        return ids

    ids = asyncio.run(go())
    # rollups run every 0.5 s: the 1-minute buckets of the backfilled range appear
    def by_site() -> dict[str, Any]:
        r = query(s, metric="cpu.percent", selector='exists(tag.site)', by="tag.site", since="40m", step="1m")
        return r

    wait_until(lambda: "1m" in by_site()["sources"] and len(by_site()["series"]) == 2, 30)
    r = by_site()
    vals = {ser["key"]["tag.site"]: {v for _, v in ser["points"]} for ser in r["series"]}
    assert vals == {"berlin": {20.0}, "lisbon": {50.0}}
    mx = query(s, metric="cpu.percent", selector='tag.site == "berlin"', since="40m", step="1m", agg="max")
    assert {v for _, v in mx["series"][0]["points"]} == {30.0}
    total = query(s, metric="cpu.percent", since="40m", step="1m", agg="count")
    assert sum(v for _, v in total["series"][0]["points"]) == 360
    p95 = query(s, metric="cpu.percent", since="40m", step="10m", agg="p95", by="device")
    assert {ser["key"]["device"] for ser in p95["series"]} == set(ids)
    # the overview counts the fleet
    ov = s.api("GET", "/overview").json()
    assert ov["devices"]["accepted"] >= 3


def test_bad_queries_are_clear_errors(mserver: ServerProc) -> None:
    s = mserver
    for params, code, needle in [
        ({"metric": "cpu.percent", "agg": "median"}, 400, "agg"),
        ({"metric": "cpu.percent", "selector": "tag.site =="}, 400, "column"),
        ({"metric": "cpu.percent", "since": "yesterday-ish"}, 400, "not a time"),
        ({"metric": "cpu.percent", "step": "1ms", "since": "1d"}, 400, "step"),
        ({"metric": "cpu.percent", "by": "owner"}, 400, "by must"),
        ({"metric": "no.such.metric"}, 404, "no device"),
        ({"metric": "cpu.percent", "device": "f" * 32}, 404, "device"),
    ]:
        r = s.api("GET", "/metrics/query", params=params)
        assert r.status_code == code, (params, r.text)
        assert needle in r.json()["detail"], r.json()


def test_prometheus_metrics_have_no_device_labels(mserver: ServerProc) -> None:
    s = mserver
    s.api("GET", "/devices")
    text = httpx.get(s.url + "/metrics", timeout=5).text
    assert "corral_device_sessions" in text and "corral_telemetry_points_total" in text
    assert 'corral_http_request_duration_seconds_count{method="GET",route="/api/v1/devices",status="2xx"}' in text
    assert "device_id" not in text


def test_malformed_telemetry_closes_the_socket_and_stores_nothing(mserver: ServerProc) -> None:
    s = mserver
    token = s.create_enrollment_token()

    async def go() -> list[int | None]:
        codes = []
        for body in ({"seq": "one"}, {"seq": 1, "series": [["cpu.percent", [1], "not a list"]]},
                     {"seq": 1, "events": [{"ts": 1, "severity": "apocalyptic", "source": "x", "message": "m"}]}):
            async with Device(s, token) as d:
                env = p.Envelope(type="telemetry", body=msgspec.Raw(msgspec.msgpack.encode(body)))
                await d.ws.send(msgspec.msgpack.encode(env))
                codes.append(await close_code(d.ws))
        return codes

    assert asyncio.run(go()) == [p.CloseCode.MALFORMED] * 3
    assert httpx.get(s.url + "/healthz", timeout=5).status_code == 200
    assert s.api("GET", "/metrics").json()["items"] == []
    assert s.api("GET", "/events").json()["items"] == []
