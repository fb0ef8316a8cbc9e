"""App metrics over the local socket: the line format, aggregation, bounds, and a real UNIX socket
with several clients, an over-long line and garbage."""

from __future__ import annotations

import asyncio
import logging
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from corral import protocol
from corral.agent.telemetry.localsock import (
    MAX_LINE_BYTES,
    AppEvent,
    AppMetrics,
    Counter,
    Gauge,
    parse_line,
    serve_local_socket,
)

GUARD = 15.0  # seconds before a stuck test gives up (not a timing assertion)


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"queue_depth:7|g", Gauge("app.queue_depth", 7.0)),
        (b"jobs_done:1|c\n", Counter("app.jobs_done", 1.0)),
        (b"jobs_done:1|c\r\n", Counter("app.jobs_done", 1.0)),
        (b"cpu.percent:0|g", Gauge("app.cpu.percent", 0.0)),  # can never shadow the system metric
        (b"db.pool.in_use:-0.5|g", Gauge("app.db.pool.in_use", -0.5)),
        (b"bytes:1e6|c", Counter("app.bytes", 1e6)),
        (b"ratio:.25|g", Gauge("app.ratio", 0.25)),
        (b"temp:+3.|g", Gauge("app.temp", 3.0)),
        (b"Sensor_2.value:42|g", Gauge("app.Sensor_2.value", 42.0)),
        (b"event:warning|disk almost full", AppEvent("warning", "disk almost full")),
        (b"event:critical|  padded  \n", AppEvent("critical", "padded")),
        ("event:info|Grüße ✓ | with a pipe".encode(), AppEvent("info", "Grüße ✓ | with a pipe")),
        (b"event:debug|" + b"m" * 1024, AppEvent("debug", "m" * 1024)),
    ],
)
def test_valid_lines(line: bytes, expected: object) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"../x:1|g", "invalid metric name"),
        (b"a/b:1|g", "invalid metric name"),
        (b"a..b:1|g", "invalid metric name"),
        (b"a-b:1|g", "invalid metric name"),
        (b"x y:1|g", "invalid metric name"),
        (b":1|g", "invalid metric name"),
        (b"a" * 125 + b":1|g", "invalid metric name"),  # app. + 125 > 128 characters
        (b"x:abc|g", "not a number"),
        (b"x:|g", "not a number"),
        (b"x:1_000|g", "not a number"),
        (b"x:0x10|g", "not a number"),
        (b"x:nan|g", "not a number"),
        (b"x:inf|c", "not a number"),
        (b"x:1e999|g", "out of range"),
        (b"x:1|ms", "unknown type"),
        (b"x:1|g|@0.1", "unknown type"),
        (b"x:1|", "unknown type"),
        (b"x:1", "missing |TYPE"),
        (b"just text", "expected NAME:VALUE|TYPE"),
        (b"\xff\xfe:1|g", "not UTF-8"),
        (b"x" * (MAX_LINE_BYTES + 1), "longer than 4096"),
        (b"event:loud|x", "unknown severity"),
        (b"event:info|", "empty event message"),
        (b"event:info|   ", "empty event message"),
        (b"event:info", "expected event:SEVERITY|MESSAGE"),
        (b"event:info|" + b"m" * 1025, "longer than 1024"),
        (b"event:info|bell\x07 and escape \x1b[2J", "control characters"),
        (b"event:7|g", "unknown severity"),  # "event" is reserved for events
    ],
)
def test_invalid_lines(line: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("|", r"\|")):
        parse_line(line)


# --- aggregation ------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def lines(sink: AppMetrics, *items: bytes) -> None:
    for item in items:
        sink.record_line(item)


def test_gauges_keep_the_last_value_counters_sum_and_drain_resets() -> None:
    wall = Clock(1_700_000_000.0)
    sink = AppMetrics(wall_clock=wall)
    lines(sink, b"depth:3|g", b"depth:9|g", b"done:1|c", b"done:2.5|c", b"", b"  \n")
    wall.t += 1.5
    lines(sink, b"event:error|backup failed", b"depth:4|g")
    values, events = sink.drain(now_ms=1_700_000_010_000)
    assert dict(values) == {"app.depth": 4.0, "app.done": 3.5}
    assert events == [
        protocol.Event(ts=1_700_000_001_500, severity="error", source="app", message="backup failed")
    ]
    assert (sink.accepted, sink.rejected) == (6, 0)  # blank lines are neither
    assert sink.drain(now_ms=1_700_000_020_000) == ([], [])  # a new interval: counters do not report 0
    lines(sink, b"done:1|c")
    assert sink.drain(now_ms=0)[0] == [("app.done", 1.0)]


def test_values_drain_into_a_telemetry_batch() -> None:
    sink = AppMetrics()
    lines(sink, b"depth:3|g", b"event:info|hello")
    values, events = sink.drain(now_ms=5000)
    batch = protocol.Telemetry(
        seq=1, series=[protocol.MetricSeries(name=n, ts=[5000], values=[v]) for n, v in values], events=events
    )
    codec = protocol.Codec()
    assert codec.expect(codec.encode(batch), protocol.Telemetry)[1] == batch


def test_an_event_is_never_later_than_its_batch() -> None:
    wall = Clock(2000.0)
    sink = AppMetrics(wall_clock=wall)
    sink.record_line(b"event:info|before the clock stepped back")
    _, events = sink.drain(now_ms=1_000_000)
    assert events[0].ts == 1_000_000


def test_one_name_cannot_be_both_gauge_and_counter_in_an_interval() -> None:
    sink = AppMetrics()
    lines(sink, b"x:1|g", b"x:1|c")
    assert sink.rejected == 1 and "both a gauge and a counter" in sink.last_reason
    assert sink.drain(0)[0] == [("app.x", 1.0)]
    lines(sink, b"x:1|c")  # the next interval may decide otherwise
    assert sink.drain(0)[0] == [("app.x", 1.0)]


def test_counter_overflow_is_rejected_not_infinite() -> None:
    sink = AppMetrics()
    lines(sink, b"big:1e308|c", b"big:1e308|c")
    assert sink.rejected == 1 and "overflow" in sink.last_reason
    assert sink.drain(0)[0] == [("app.big", 1e308)]


def test_bounds_per_interval() -> None:
    sink = AppMetrics(max_names=3, max_events=2)
    lines(sink, b"a:1|g", b"b:1|c", b"c:1|g", b"d:1|g", b"e:1|c")
    lines(sink, b"a:2|g", b"b:1|c")  # names already in the interval still update
    lines(sink, *[f"event:info|{i}".encode() for i in range(4)])
    assert sink.rejected == 4
    values, events = sink.drain(0)
    assert dict(values) == {"app.a": 2.0, "app.b": 2.0, "app.c": 1.0}
    assert [e.message for e in events] == ["0", "1"]
    lines(sink, b"d:1|g", b"event:info|fresh")  # the bounds are per interval
    values, events = sink.drain(0)
    assert values == [("app.d", 1.0)] and [e.message for e in events] == ["fresh"]
    assert sink.rejected == 4


def test_rejections_are_counted_always_but_logged_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    mono = Clock(100.0)
    sink = AppMetrics(monotonic=mono)
    with caplog.at_level(logging.WARNING, logger="corral.agent.telemetry.localsock"):
        for _ in range(50):
            sink.record_line(b"garbage")
        mono.t += 59.0
        sink.record_line(b"x:nan|g")
        assert len(caplog.records) == 1
        mono.t += 1.0
        sink.record_line(b"x:1|ms")
    assert sink.rejected == 52
    assert len(caplog.records) == 2
    assert "rejected 51 line(s)" in caplog.records[1].getMessage()  # all since the first report
    assert "unknown type" in caplog.records[1].getMessage()


# --- the real socket ----------------------------------------------------------------------------


async def until(pred: Callable[[], bool], what: str) -> None:
    async def poll() -> None:
        while not pred():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), GUARD)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def send(path: Path, *chunks: bytes, keep_open: bool = False) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_unix_connection(str(path))
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    if not keep_open:
        writer.close()
        await writer.wait_closed()
    return writer


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), GUARD * 2))


def test_many_clients_garbage_and_an_over_long_line(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    sink = AppMetrics()

    async def scenario() -> None:
        server = await serve_local_socket(path, sink)
        try:
            assert stat.S_ISSOCK(path.stat().st_mode)
            assert stat.S_IMODE(path.stat().st_mode) == 0o660
            assert [p.name for p in tmp_path.iterdir()] == ["app.sock"]  # no temp name left

            # an over-long line whose tail would be a valid line if the reader lost track of it
            long_line = b"x" * (3 * MAX_LINE_BYTES) + b"tail:99|g\n"
            await asyncio.gather(
                send(path, *[b"hits:1|c\n"] * 50),  # one client, many lines
                send(path, b"hits:1|c\nhi", b"ts:1|c\nwaiting:", b"3|g\n"),  # lines split across writes
                send(path, long_line[:5000], long_line[5000:], b"after_long:1|g\n"),
                send(path, b"\x00\xffgarbage\n", b"no newline at the end:1|g\n", b"event:error|it broke"),
                *[send(path, f"client_{i}:{i}|g\n".encode()) for i in range(10)],
            )
            await until(lambda: sink.accepted + sink.rejected >= 50 + 3 + 1 + 1 + 10 + 3, "every line")
            values, events = sink.drain(now_ms=1)
        finally:
            server.close()
            await server.wait_closed()
        got = dict(values)
        assert got.pop("app.hits") == 52.0
        assert got.pop("app.waiting") == 3.0
        assert got.pop("app.after_long") == 1.0
        assert got == {f"app.client_{i}": float(i) for i in range(10)}
        assert "app.tail" not in got
        assert [(e.severity, e.message, e.source) for e in events] == [("error", "it broke", "app")]
        assert sink.rejected == 3  # the long line once, the garbage, the invalid name

    run(scenario)


def taken_or_rejected(sink: AppMetrics, rejected_before: int) -> Callable[[], bool]:
    return lambda: sink.accepted == 4 or sink.rejected > rejected_before


def test_the_client_limit_rejects_extra_clients_only(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    sink = AppMetrics()

    async def scenario() -> None:
        server = await serve_local_socket(path, sink, max_clients=2)
        try:
            a = await send(path, b"a:1|g\n", keep_open=True)
            b = await send(path, b"b:1|g\n", keep_open=True)
            await until(lambda: sink.accepted == 2, "two clients")
            await send(path, b"c:1|g\n")
            await until(lambda: sink.rejected == 1, "the third client's rejection")
            assert "more than 2 clients" in sink.last_reason
            a.write(b"a:2|g\n")  # the first two are undisturbed
            await a.drain()
            await until(lambda: sink.accepted == 3, "the first client's next line")
            a.close()
            await a.wait_closed()
            # a slot is free again, once the server has seen the client go (retry until it has)
            while sink.accepted < 4:
                await send(path, b"d:1|g\n")
                await until(taken_or_rejected(sink, sink.rejected), "a new client after one left")
            b.close()
            await b.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
        assert dict(sink.drain(0)[0]) == {"app.a": 2.0, "app.b": 1.0, "app.d": 1.0}

    run(scenario)


def test_a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed agent leaves

    async def scenario() -> None:
        sink = AppMetrics()
        server = await serve_local_socket(path, sink)
        try:
            with pytest.raises(OSError, match="in use"):
                await serve_local_socket(path, AppMetrics())
            await send(path, b"alive:1|g\n")
            await until(lambda: sink.accepted == 1, "a line through the replaced socket")
        finally:
            server.close()
            await server.wait_closed()

    run(scenario)
    other = tmp_path / "not-a-socket"
    other.write_text("precious")

    async def refuse() -> None:
        with pytest.raises(OSError, match="not a socket"):
            await serve_local_socket(other, AppMetrics())

    run(refuse)
    assert other.read_text() == "precious"
