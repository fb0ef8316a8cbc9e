"""The agent's telemetry pump: collect, evaluate rules, spool, send, delete on ack.

One :class:`TelemetryPump` per agent, independent of the connection::

    every interval:  metrics = platform.metrics() + app metrics   (local socket)
                     events  = rules.evaluate(metrics) + app events
                     seq     = spool.append(record)               (durable before anything else)
                     send what the window allows
    connected:       attach(send)  → everything in the spool, oldest first, is (re)sent
    telemetry_ack:   spool.ack(seq) → the batch is gone; send the next
    disconnected:    detach()      → collection and spooling go on; nothing is lost

At most ``send_window`` batches are unacknowledged at a time, so a device back from a week
offline replays its spool at the server's pace instead of flooding the socket. After a
reconnect the whole spool is resent from the oldest batch: batches that were in flight when the
connection died may or may not have been stored, and the server's (device, seq) idempotency
makes resending them harmless. A batch is deleted only after its ack, so a crash at any point
loses nothing that reached the spool and duplicates nothing the server stored. (A full spool
drops its oldest batches, counted in ``dropped``; one that was in flight may still arrive, so
the count can exceed what was really lost by at most ``send_window``.)

Spool calls block on the disk (fsync); for a :class:`~corral.agent.telemetry.spool.DiskSpool`
they run in a thread, for the simulator's memory spool inline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import msgspec

from corral import protocol as p
from corral.agent.telemetry.spool import Spool, SpoolError

log = logging.getLogger("corral.agent.telemetry")

T = TypeVar("T")
SendFn = Callable[[p.Telemetry], Awaitable[None]]


class SpoolRecord(msgspec.Struct, array_like=True):
    """What the spool holds for one batch; the seq and drop counter are added when it is sent."""

    series: list[p.MetricSeries]
    events: list[p.Event]


class MetricSource(Protocol):
    def metrics(self) -> dict[str, float]: ...


class RuleHook(Protocol):
    def evaluate(self, metrics: dict[str, float], now_ms: int) -> list[p.Event]: ...


class AppSource(Protocol):
    def drain(self, now_ms: int) -> tuple[list[tuple[str, float]], list[p.Event]]: ...


def next_collection(now: float, interval: float, last_slot: int) -> tuple[int, float]:
    """The next interval-grid slot to collect (after ``last_slot``) and how long to wait for it."""
    slot = max(int(now // interval) + 1, last_slot + 1)
    return slot, max(0.0, slot * interval - now)


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(SpoolRecord)


class TelemetryPump:
    def __init__(self, source: MetricSource, spool: Spool, *, interval: float = 10.0, send_window: int = 8,
                 rules: RuleHook | None = None, app: AppSource | None = None, blocking_spool: bool = True,
                 clock: Callable[[], float] = time.time, tag: str = "") -> None:
        self.source = source
        self.spool = spool
        self.interval = interval
        self.send_window = max(1, send_window)
        self.rules = rules
        self.app = app
        self._blocking = blocking_spool
        self._clock = clock
        self._tag = tag
        self._send: SendFn | None = None
        self._inflight: set[int] = set()
        self._last_sent = 0  # highest seq sent on this connection
        self._lock = asyncio.Lock()  # one pump() at a time: acks and ticks both trigger it
        self._last_ms = 0
        #: counters (tests and the sim summary read them)
        self.collected = 0
        self.acked = 0
        self.sent = 0
        self.rejected = 0

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        if self._blocking:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    # --- collection ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Collect every interval until cancelled, aligned to the interval grid so that the
        devices' points land on the same bucket edges."""
        last_slot = -1
        while True:
            # the next grid slot after the last one collected: timers may fire a little early
            # (uvloop: ~1 ms), and a slot must never be collected twice
            last_slot, delay = next_collection(self._clock(), self.interval, last_slot)
            await asyncio.sleep(delay)
            try:
                await self.collect_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("device %s: telemetry collection failed", self._tag)

    async def collect_once(self) -> int | None:
        now = self._clock()
        # strictly increasing per device: the server keeps one point per series and millisecond,
        # so two collections in one millisecond (a clock step back, say) would lose the second
        now_ms = max(int(now * 1000), self._last_ms + 1)
        self._last_ms = now_ms
        try:
            metrics = self.source.metrics()
        except Exception as e:  # a broken collector must not stop rules or app metrics
            log.warning("device %s: collecting metrics failed: %s", self._tag, e)
            metrics = {}
        events: list[p.Event] = []
        if self.app is not None:
            app_points, app_events = self.app.drain(now_ms)
            metrics.update(app_points)
            events += app_events
        if self.rules is not None:
            events += self.rules.evaluate(metrics, now_ms)
        record = SpoolRecord(series=[p.MetricSeries(name, [now_ms], [value]) for name, value in metrics.items()],
                             events=events)
        if not record.series and not record.events:
            return None
        try:
            seq = await self._io(self.spool.append, _ENC.encode(record))
        except (SpoolError, OSError) as e:  # a full disk: keep running, say so
            log.warning("device %s: cannot spool telemetry: %s", self._tag, e)
            return None
        self.collected += 1
        log.debug("device %s: spooled batch %d (%d metrics, %d events)", self._tag, seq, len(record.series),
                  len(record.events))
        await self.pump()
        return seq

    # --- sending ------------------------------------------------------------------------------

    async def attach(self, send: SendFn) -> None:
        """A session started: resend everything not yet acknowledged, oldest first."""
        self._send = send
        self._inflight.clear()
        self._last_sent = 0
        await self.pump()

    def detach(self) -> None:
        self._send = None
        self._inflight.clear()

    async def on_ack(self, ack: p.TelemetryAck) -> None:
        if ack.seq not in self._inflight:
            return  # from an earlier connection, or a server bug: the spool decides, not the ack
        self._inflight.discard(ack.seq)
        if ack.rejected:
            self.rejected += ack.rejected
            log.warning("device %s: server rejected %d values of batch %d: %s", self._tag, ack.rejected,
                        ack.seq, ack.reason)
        await self._io(self.spool.ack, ack.seq)
        self.acked += 1
        await self.pump()

    async def pump(self) -> None:
        """Send spooled batches while the window has room."""
        async with self._lock:
            while self._send is not None and len(self._inflight) < self.send_window:
                room = self.send_window - len(self._inflight)
                batch = await self._io(self.spool.pending, self._last_sent, room)
                if not batch:
                    return
                for seq, payload in batch:
                    send = self._send
                    if send is None:
                        return
                    try:
                        record = _DEC.decode(payload)
                    except msgspec.DecodeError:  # cannot happen with a checked spool; never loop on it
                        await self._io(self.spool.ack, seq)
                        continue
                    self._inflight.add(seq)
                    self._last_sent = seq
                    try:
                        await send(p.Telemetry(seq=seq, series=record.series, events=record.events,
                                               dropped=self.spool.dropped))
                    except Exception as e:  # the connection died: its loop reconnects, we resend then
                        log.debug("device %s: telemetry send failed: %s", self._tag, e)
                        self.detach()
                        return
                    self.sent += 1
