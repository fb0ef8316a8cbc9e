"""Prometheus ``/metrics`` for the server itself (DESIGN §6).

Figures about the server, never about individual devices: no label carries a device id, a tag
value or a user, so the series count stays constant whatever the fleet size (per-device data
lives in Corral's own time-series store). Gauges are read from live objects at scrape time by
a custom collector, so nothing on the hot path updates them; only request latency is observed
per request, labelled by route template (``/api/v1/devices/{device_id}``), never the raw path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from corral.server.context import ServerContext

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
API_PREFIX = "/api/v1"


class _ServerCollector(Collector):
    def __init__(self, ctx_getter: object) -> None:
        self._ctx = ctx_getter

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        ctx: ServerContext | None = self._ctx()  # type: ignore[operator]
        if ctx is None:
            return
        hub = ctx.hub
        if hub is not None:
            yield GaugeMetricFamily("corral_device_sessions", "Device WebSocket sessions on this replica",
                                    value=len(hub.sessions))
            yield GaugeMetricFamily("corral_device_handshakes", "Device handshakes in progress",
                                    value=hub._handshaking)
            yield CounterMetricFamily("corral_device_connects", "Device sessions established",
                                      value=hub.connects_total)
            yield CounterMetricFamily("corral_device_refused", "Device connections refused in the handshake",
                                      value=hub.refused_total)
            yield CounterMetricFamily("corral_device_busy", "Device connections turned away (too many handshakes)",
                                      value=hub.busy_total)
        commits = ctx.commits
        if commits is not None:
            yield GaugeMetricFamily("corral_write_queue_depth", "Writes waiting for the group committer",
                                    value=commits._queue.qsize())
            yield CounterMetricFamily("corral_write_batches", "Group-commit transactions", value=commits.batches)
            yield CounterMetricFamily("corral_writes", "Writes committed through the group committer",
                                      value=commits.writes)
        if ctx.telemetry is not None:
            yield GaugeMetricFamily("corral_telemetry_queue_depth", "Telemetry batches waiting to be stored",
                                    value=ctx.telemetry.depth)
        ts = ctx.tsdb
        if ts is not None:
            yield CounterMetricFamily("corral_telemetry_points", "Telemetry points stored", value=ts.points_total)
            yield CounterMetricFamily("corral_telemetry_batches", "Telemetry batches received",
                                      value=ts.batches_total)
            yield CounterMetricFamily("corral_telemetry_duplicates", "Telemetry batches received again (acked, "
                                      "not stored)", value=ts.duplicates_total)
            yield CounterMetricFamily("corral_telemetry_rejected", "Telemetry points and events rejected",
                                      value=ts.rejected_total)


class ServerMetrics:
    """One registry per app (tests start many apps in one process)."""

    def __init__(self, ctx_getter: object) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ServerCollector(ctx_getter))
        self.requests = Histogram(
            "corral_http_request_duration_seconds", "REST request latency", ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """ASGI middleware observing each HTTP request's latency by route template."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if scope["path"].startswith(API_PREFIX) and not template.startswith((API_PREFIX, "unmatched")):
                template = API_PREFIX + template  # routers included with a prefix keep their own path
            self.metrics.requests.labels(scope["method"], template, f"{status[0] // 100}xx").observe(
                time.perf_counter() - t0)
