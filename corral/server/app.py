"""The ASGI application: REST API under /api/v1, the device surface under /device/v1,
/healthz, and the web console. ``create_app`` wires a :class:`ServerContext` into it."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.types import Receive, Scope, Send

from corral import __version__
from corral.server.api import errors as api_errors
from corral.server.bus import make_bus
from corral.server.config import ServerConfig
from corral.server.context import ServerContext
from corral.server.groupcommit import GroupCommitter
from corral.server.handover import CONN_KEY
from corral.server.hub import Hub
from corral.server.monitor import Monitor
from corral.server.prom import CONTENT_TYPE as PROM_CONTENT_TYPE
from corral.server.prom import RequestTimer, ServerMetrics
from corral.server.remote import DEVICE_RELAY_PATH, Relay
from corral.server.secrets import load_audit_key
from corral.server.store.db import create_engine, is_sqlite, session_factory
from corral.server.telemetry_writer import TelemetryWriter
from corral.server.tsdb import TimeSeriesStore
from corral.server.updates.rollout_engine import RolloutEngine
from corral.server.updates.tuf_repo import Keys
from corral.server.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)


DEVICE_PATH = "/device/v1/connect"


class DeviceSurface:
    """The outermost ASGI app: device sockets go straight to the hub, everything else to the API.

    A device session lives for days and there are tens of thousands of them, so it skips the
    API's routing, middleware and dependency machinery: each of those layers would keep its
    frames and closures alive for the whole session (measured: ~40% of the per-connection
    memory). The device surface is separate from the management API anyway (DESIGN §8).
    """

    def __init__(self, api: FastAPI) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # for a remote-access session's hand-over to the relay worker
            scope[CONN_KEY] = getattr(receive, "__self__", None)
        if scope["type"] == "websocket" and scope["path"] == DEVICE_PATH:
            ctx: ServerContext = self.api.state.ctx
            assert ctx.hub is not None
            await ctx.hub.handle(WebSocket(scope, receive, send))
        elif scope["type"] == "websocket" and scope["path"].startswith(DEVICE_RELAY_PATH):
            ctx = self.api.state.ctx  # a device's end of a remote-access session
            assert ctx.relay is not None
            await ctx.relay.device(WebSocket(scope, receive, send), scope["path"][len(DEVICE_RELAY_PATH):])
        else:
            await self.api(scope, receive, send)


def create_asgi(config: ServerConfig) -> DeviceSurface:
    return DeviceSurface(create_app(config))


def create_app(config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(config.database_url)
        bus = make_bus(config.bus_url)
        await bus.start()
        ctx = ServerContext(config=config, engine=engine, sessions=session_factory(engine),
                            audit_key=load_audit_key(config.data_dir), bus=bus,
                            sqlite=is_sqlite(config.database_url))
        ctx.tuf = Keys.load(config.data_dir)
        ctx.commits = GroupCommitter(ctx)
        ctx.commits.start()
        webhook_dispatcher = WebhookDispatcher(ctx)
        webhook_dispatcher.start()
        ctx.tsdb = TimeSeriesStore(postgres=not ctx.sqlite,
                                   max_series_per_device=config.monitoring.max_series_per_device)
        ctx.telemetry = TelemetryWriter(ctx, flushers=1 if ctx.sqlite else ctx.config.monitoring.postgres_flushers)
        ctx.telemetry.start()
        ctx.hub = Hub(ctx)
        app.state.ctx = ctx
        await ctx.hub.start()
        monitor = Monitor(ctx)
        app.state.monitor = monitor
        monitor.start()
        ctx.rollouts = RolloutEngine(ctx)
        ctx.rollouts.start()
        ctx.relay = Relay(ctx)
        await ctx.relay.start()
        gc.freeze()  # what startup built lives as long as the process: keep it out of collections
        try:
            yield
        finally:
            await ctx.relay.stop()
            await ctx.rollouts.stop()
            await monitor.stop()
            await ctx.hub.stop()
            await ctx.telemetry.stop()
            await webhook_dispatcher.stop()
            await ctx.commits.stop()
            await bus.close()
            await engine.dispose()

    app = FastAPI(
        title="Corral",
        version=__version__,
        summary="Open-source IoT fleet management",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    metrics = ServerMetrics(lambda: getattr(app.state, "ctx", None))
    app.add_middleware(RequestTimer, metrics=metrics)
    # artifact uploads stream to disk under their own limit (Updates.max_artifact_bytes)
    app.add_middleware(api_errors.BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes,
                       exempt=(("POST", "/api/v1/artifacts"),))
    app.add_middleware(api_errors.RequestIdMiddleware)  # outermost: every response carries an id
    api_errors.install(app)

    from corral.server.api import (
        alerts,
        artifacts,
        audit,
        auth,
        deployments,
        devices,
        enrollment,
        groups,
        monitoring,
        proxy,
        rollouts,
        rules,
        sessions,
        tuf,
        webhooks,
    )

    for module in (auth, devices, groups, enrollment, audit, monitoring, rules, webhooks, alerts, artifacts, tuf,
                   deployments, rollouts, sessions):
        app.include_router(module.router, prefix="/api/v1")
    app.include_router(tuf.device_router)  # the device surface's HTTP side: TUF metadata and targets
    app.include_router(proxy.router)  # a device's web UI: /devices/ID/proxy/PORT/ (ADR 0018)

    @app.get("/healthz", tags=["server"])
    async def healthz() -> JSONResponse:
        ctx: ServerContext = app.state.ctx
        try:
            async with ctx.reader() as db:
                await db.execute(text("SELECT 1"))
        except Exception as e:  # report, don't raise: load balancers read the status code
            return JSONResponse({"status": "unavailable", "detail": str(e)[:200]}, status_code=503)
        hub = ctx.hub
        return JSONResponse({"status": "ok", "version": __version__, "replica": config.replica_id,
                             "devices_connected": len(hub.sessions) if hub else 0})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """Prometheus exposition of the server's own figures (no per-device labels)."""
        return Response(metrics.render(), media_type=PROM_CONTENT_TYPE)

    from corral.server import console, console_fleet

    app.include_router(console_fleet.router)  # the dashboard (at /), groups and the audit log
    app.include_router(console.router)  # the web console: pages, its modules and the npm files it loads
    from corral.server import console_updates

    app.include_router(console_updates.router)  # the console's rollouts, alerts and webhooks pages
    from corral.server import console_artifacts

    app.include_router(console_artifacts.router)  # the console's artifacts: list, upload, an artifact's page
    return app
