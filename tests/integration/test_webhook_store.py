"""The webhook outbox and dispatcher against real SQLite and PostgreSQL, in process: ``enqueue``
commits and rolls back with its transaction, replicas claim disjoint deliveries, and a claim that
is handed back (clean stop) or abandoned (dead replica) is delivered by whoever looks next."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from corral.errors import InvalidInput
from corral.server import webhooks
from corral.server.bus import make_bus
from corral.server.config import ServerConfig, WebhookSettings
from corral.server.context import ServerContext
from corral.server.store import migrate
from corral.server.store.db import create_engine, is_sqlite, session_factory
from corral.server.store.models import Webhook, WebhookDelivery
from corral.server.webhooks import WebhookDispatcher, enqueue
from tests.integration.webhook_receiver import Receiver

FAST = {"retry_scale": 0.001, "poll_interval": 0.2}


@pytest.fixture
def pg_db_url(pg_url: str) -> str:
    migrate.upgrade(pg_url)
    return pg_url


def make_ctx(url: str, tmp: Path, **settings: Any) -> ServerContext:
    config = ServerConfig(data_dir=tmp, db_url=url, webhooks=WebhookSettings(**{**FAST, **settings}))
    engine = create_engine(url)
    return ServerContext(config=config, engine=engine, sessions=session_factory(engine), audit_key=b"k" * 32,
                         bus=make_bus(""), sqlite=is_sqlite(url))


async def add_hook(ctx: ServerContext, url: str, events: list[str], enabled: bool = True) -> Webhook:
    h = Webhook(id=webhooks.new_webhook_id(), url=url, events=events, secret=webhooks.new_secret(),
                description="", enabled=enabled, created_at=time.time(), created_by="test")
    async with ctx.writer() as db:
        db.add(h)
    return h


async def rows(ctx: ServerContext) -> list[WebhookDelivery]:
    async with ctx.reader() as db:
        return list((await db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at))).all())


async def eventually(pred: Callable[[], Awaitable[Any]], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await pred()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last value: {last!r})")


def test_enqueue_routes_by_glob_and_commits_with_the_change(db_url: str, tmp_path: Path) -> None:
    async def go() -> None:
        ctx = make_ctx(db_url, tmp_path)
        try:
            every = await add_hook(ctx, "http://127.0.0.1:9/a", ["*"])
            alerts = await add_hook(ctx, "http://127.0.0.1:9/b", ["alert.*"])
            rules = await add_hook(ctx, "http://127.0.0.1:9/c", ["device.rule_action", "alert.resolved"])
            await add_hook(ctx, "http://127.0.0.1:9/d", ["*"], enabled=False)  # gets nothing
            now = time.time()
            async with ctx.writer() as db:
                assert await enqueue(db, "alert.firing", {"alert": "hot", "value": 91.5}, now) == 2
                assert await enqueue(db, "alert.resolved", {"alert": "hot"}, now) == 3
                assert await enqueue(db, "device.rule_action", {"device": "d1"}, now) == 2
                assert await enqueue(db, "rollout.started", {}, now) == 1
            got = await rows(ctx)
            by_event: dict[str, set[str]] = {}
            for d in got:
                by_event.setdefault(d.event_type, set()).add(d.webhook_id)
                assert d.status == "pending" and d.attempts == 0 and d.next_attempt_at == now
                assert d.id.startswith("msg_") and d.payload["type"] == d.event_type
                assert d.payload["timestamp"].endswith("Z")
            assert by_event == {"alert.firing": {every.id, alerts.id},
                                "alert.resolved": {every.id, alerts.id, rules.id},
                                "device.rule_action": {every.id, rules.id},
                                "rollout.started": {every.id}}
            assert len({d.id for d in got}) == len(got) == 8

            # the outbox: a transaction that fails leaves no notification behind
            with pytest.raises(RuntimeError):
                async with ctx.writer() as db:
                    assert await enqueue(db, "alert.firing", {"alert": "cold"}, time.time()) == 2
                    raise RuntimeError("the state change failed")
            assert len(await rows(ctx)) == 8

            async with ctx.writer() as db:
                with pytest.raises(InvalidInput):
                    await enqueue(db, "Alert Firing", {}, now)
                with pytest.raises(ValueError, match="JSON"):
                    await enqueue(db, "alert.firing", {"when": object()}, now)
        finally:
            await ctx.engine.dispose()

    asyncio.run(go())


def test_replicas_claim_disjoint_deliveries(pg_db_url: str, tmp_path: Path, receiver: Receiver) -> None:
    """Two dispatchers on one PostgreSQL database (as two server replicas): every message once."""
    n = 150

    async def go() -> None:
        a, b = make_ctx(pg_db_url, tmp_path, max_in_flight=4), make_ctx(pg_db_url, tmp_path, max_in_flight=4)
        hook = await add_hook(a, receiver.url, ["*"])
        async with a.writer() as db:
            for i in range(n):
                await enqueue(db, "alert.firing", {"i": i}, time.time())
        da, db_ = WebhookDispatcher(a), WebhookDispatcher(b)
        da.start()
        db_.start()
        try:
            async def all_delivered() -> bool:
                async with a.reader() as s:
                    return await s.scalar(select(func.count()).select_from(WebhookDelivery)
                                          .where(WebhookDelivery.status == "delivered")) == n

            await eventually(all_delivered, timeout=60, what="every delivery")
        finally:
            await da.stop()
            await db_.stop()
            await a.engine.dispose()
            await b.engine.dispose()
        ids = [r.msg_id for r in receiver.received()]
        assert len(ids) == len(set(ids)) == n  # no attempt was sent twice
        assert da.attempts + db_.attempts == n
        assert len(receiver.verified(hook.secret)) == n

    asyncio.run(go())


def test_a_clean_stop_hands_back_claims_in_flight(db_url: str, tmp_path: Path, receiver: Receiver) -> None:
    async def go() -> None:
        ctx = make_ctx(db_url, tmp_path)
        hook = await add_hook(ctx, receiver.url, ["*"])
        receiver.hold()
        async with ctx.writer() as db:
            await enqueue(db, "alert.firing", {}, time.time())
        d1 = WebhookDispatcher(ctx)
        d1.start()
        try:
            await eventually(lambda: asyncio.sleep(0, receiver.received()), what="the request to arrive")
            await d1.stop(grace=0.1)  # the receiver has not answered: the claim goes back
            [d] = await rows(ctx)
            assert d.status == "pending" and d.attempts == 0 and d.next_attempt_at is not None
            assert d.next_attempt_at <= time.time()
            receiver.release()
            d2 = WebhookDispatcher(ctx)
            d2.start()
            try:
                await eventually(lambda: _status_is(ctx, "delivered"), what="delivery after the restart")
            finally:
                await d2.stop()
            [d] = await rows(ctx)
            assert d.attempts == 1
            assert len(receiver.verified(hook.secret)) == 2  # at least once: the receiver saw it twice
        finally:
            await ctx.engine.dispose()

    asyncio.run(go())


def test_a_dead_replicas_claim_is_taken_over_after_its_lease(db_url: str, tmp_path: Path,
                                                              receiver: Receiver) -> None:
    async def go() -> None:
        lease = {"claim_lease": 1.0, "request_timeout": 0.5, "connect_timeout": 0.2}
        ctx = make_ctx(db_url, tmp_path, **lease)
        await add_hook(ctx, receiver.url, ["*"])
        async with ctx.writer() as db:
            await enqueue(db, "alert.firing", {}, time.time())
        dead = WebhookDispatcher(ctx)
        [claim] = await dead._claim(8, time.time())  # claimed, then the replica died
        assert await dead._claim(8, time.time()) == []  # nobody else sees it as due meanwhile
        alive = WebhookDispatcher(ctx)
        alive.start()
        try:
            await eventually(lambda: _status_is(ctx, "delivered"), what="the takeover")
        finally:
            await alive.stop()
        # the dead replica's late answer is not recorded over the delivery
        await dead._record(claim, 500, "late")
        [d] = await rows(ctx)
        assert d.status == "delivered" and d.attempts == 1 and d.last_status == 200
        await ctx.engine.dispose()

    asyncio.run(go())


def test_disabled_webhooks_deliveries_wait(db_url: str, tmp_path: Path, receiver: Receiver) -> None:
    async def go() -> None:
        ctx = make_ctx(db_url, tmp_path)
        hook = await add_hook(ctx, receiver.url, ["*"])
        async with ctx.writer() as db:
            await enqueue(db, "alert.firing", {}, time.time())
            await db.execute(update(Webhook).where(Webhook.id == hook.id).values(enabled=False))
        d = WebhookDispatcher(ctx)
        assert await d._claim(8, time.time()) == []  # nothing is due for a disabled webhook
        d.start()
        try:
            async with ctx.writer() as db:
                await db.execute(update(Webhook).where(Webhook.id == hook.id).values(enabled=True))
            webhooks.notify(ctx)
            await eventually(lambda: _status_is(ctx, "delivered"), what="delivery once enabled")
        finally:
            await d.stop()
            await ctx.engine.dispose()

    asyncio.run(go())


async def _status_is(ctx: ServerContext, status: str) -> bool:
    got = await rows(ctx)
    return bool(got) and all(d.status == status for d in got)


def test_old_finished_deliveries_are_pruned(db_url: str, tmp_path: Path) -> None:
    async def go() -> None:
        ctx = make_ctx(db_url, tmp_path)
        hook = await add_hook(ctx, "http://127.0.0.1:9/x", ["*"])
        old, new = 1_000.0, time.time()
        async with ctx.writer() as db:
            for status in ("pending", "delivered", "failed"):
                for at in (old, new):
                    for _ in range(3):
                        d = webhooks.new_delivery(hook.id, "alert.firing", {}, at)
                        d.status = status
                        db.add(d)
        assert await WebhookDispatcher(ctx).prune(new - 60, batch=2) == 6
        left = [(d.status, d.created_at) for d in await rows(ctx)]
        assert sorted(left) == sorted([("pending", old)] * 3 + [(s, new) for s in ("pending", "delivered", "failed")
                                                                 for _ in range(3)])
        await ctx.engine.dispose()

    asyncio.run(go())
