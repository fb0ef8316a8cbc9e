"""Webhook notifications (DESIGN §6): an outbox in the database, and the dispatcher that empties it.

Workflow::

    state change + enqueue()  ──(one write transaction)──►  webhook_deliveries (status pending)
    notify(ctx)  ──►  WebhookDispatcher wakes, claims due rows, POSTs them, records each attempt
                                   └── failed attempt: pending again at now + corral.core.retry delay
                                   └── schedule exhausted: failed  (an admin may retry it by hand)

Messages follow the Standard Webhooks spec (https://www.standardwebhooks.com): the body is
``{"type", "timestamp", "data"}`` as JSON; the headers ``webhook-id`` (the delivery id, the same
on every attempt), ``webhook-timestamp`` (of this attempt) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256>`` over ``id.timestamp.body`` with the webhook's ``whsec_`` secret).

Guarantees. Delivery is *at least once*: a delivery exists iff the state change that caused it
committed (the outbox), and it stays ``pending`` until an attempt is recorded, so a server that
dies mid-attempt sends it again after the restart. A receiver can therefore see one message
twice and must deduplicate by ``webhook-id``. Deliveries are not ordered, not even per webhook:
order by the payload's ``timestamp`` if it matters.

Several replicas. A replica *claims* due deliveries before sending them: in one transaction it
locks them (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite has a single writer process) and
moves their ``next_attempt_at`` forward by ``claim_lease``. No other replica sees them as due
while that lease runs, and an attempt's result is written only if the lease is still the one
its replica took. A replica that dies holding a claim leaves the delivery to whoever finds it
due once the lease ends; a replica that stops cleanly hands back the claims it did not finish.

Event types are dotted lower-case names (``alert.firing``, ``device.rule_action``,
``webhook.test``). A webhook subscribes with globs, where a ``*`` segment matches exactly one
segment and a trailing ``*`` matches one or more: ``*`` (everything), ``alert.*``,
``*.failed``. Deliveries of a disabled webhook wait, pending, until it is enabled again; new
events are not queued for it meanwhile. Delivered and failed deliveries are kept, as the delivery
log, for ``log_retention`` (30 days), then pruned by the dispatcher.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from standardwebhooks import Webhook as StandardWebhook

from corral import __version__
from corral.core.retry import next_attempt_delay
from corral.errors import InvalidInput
from corral.server.store.models import Webhook, WebhookDelivery

if TYPE_CHECKING:
    from corral.server.config import WebhookSettings
    from corral.server.context import ServerContext

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
STATUSES = (PENDING, DELIVERED, FAILED)
TEST_EVENT = "webhook.test"
MAX_EVENT_TYPE_LEN = 64  # webhook_deliveries.event_type

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24  # generated secrets
SECRET_MIN_BYTES, SECRET_MAX_BYTES = 24, 64  # secrets given by the caller

_NAME = r"[a-z][a-z0-9_]*"
_EVENT_TYPE = re.compile(rf"{_NAME}(?:\.{_NAME})*")
_GLOB_SEGMENT = re.compile(rf"{_NAME}|\*")


# --- event types and globs (pure) ---------------------------------------------------------------


def validate_event_type(event_type: str) -> str:
    if len(event_type) > MAX_EVENT_TYPE_LEN or not _EVENT_TYPE.fullmatch(event_type):
        raise InvalidInput(f"event type {event_type!r} is not valid: dotted lower-case names, "
                           f"e.g. alert.firing, at most {MAX_EVENT_TYPE_LEN} characters")
    return event_type


def validate_event_glob(glob: str, max_len: int = MAX_EVENT_TYPE_LEN) -> str:
    """An event-type glob: dotted lower-case names where a segment may be ``*``."""
    if not glob:
        raise InvalidInput("an event glob is empty: use e.g. alert.* or * for every event")
    if len(glob) > max_len:
        raise InvalidInput(f"event glob {glob[:20]!r}... is longer than {max_len} characters")
    for segment in glob.split("."):
        if not _GLOB_SEGMENT.fullmatch(segment):
            raise InvalidInput(f"event glob {glob!r} is not valid: dotted lower-case names where a whole "
                               "segment may be *, e.g. alert.*, alert.firing or *")
    return glob


def validate_events(globs: list[str], settings: WebhookSettings) -> list[str]:
    """The globs of a webhook, checked and without duplicates (order kept)."""
    if not globs:
        raise InvalidInput("events needs at least one event glob, e.g. alert.* or *")
    if len(globs) > settings.max_events:
        raise InvalidInput(f"at most {settings.max_events} event globs per webhook")
    return list(dict.fromkeys(validate_event_glob(g, settings.max_event_len) for g in globs))


def event_matches(glob: str, event_type: str) -> bool:
    """Whether ``event_type`` is one of the events ``glob`` subscribes to."""
    pattern = glob.split(".")
    parts = event_type.split(".")
    if pattern[-1] == "*":  # trailing: one or more segments
        head = pattern[:-1]
        if len(parts) <= len(head):
            return False
        parts = parts[: len(head)]
        pattern = head
    elif len(parts) != len(pattern):
        return False
    return all(p == "*" or p == e for p, e in zip(pattern, parts, strict=True))


def matches_any(globs: list[Any], event_type: str) -> bool:
    return any(isinstance(g, str) and event_matches(g, event_type) for g in globs)


# --- URLs and secrets (pure) --------------------------------------------------------------------


def validate_url(url: str, settings: WebhookSettings) -> str:
    url = url.strip()
    if not url:
        raise InvalidInput("url is empty")
    if len(url) > settings.max_url_len:
        raise InvalidInput(f"url is longer than {settings.max_url_len} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise InvalidInput("url must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        given = f"{parts.scheme}:" if parts.scheme else url[:20]
        raise InvalidInput(f"url must start with http:// or https://, not {given!r}")
    if "@" in parts.netloc:
        raise InvalidInput("url must not contain a user name or password: put credentials in the path or "
                           "query, or better, verify the webhook-signature header")
    if not parts.hostname:
        raise InvalidInput("url has no host")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise InvalidInput(f"url has an invalid port: {e}") from e
    if parts.fragment:
        raise InvalidInput("url must not have a #fragment (it is never sent)")
    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise InvalidInput(f"url is not valid: {e}") from e
    return url


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def validate_secret(secret: str) -> str:
    what = (f"secret must be {SECRET_PREFIX!r} followed by the base64 of {SECRET_MIN_BYTES} to "
            f"{SECRET_MAX_BYTES} random bytes (or leave it out and one is generated)")
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidInput(what)
    raw = secret[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(what) from e
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise InvalidInput(what)
    return secret


def mask_secret(secret: str) -> str:
    """What lists and shows return: enough to tell two secrets apart, nothing to sign with."""
    return f"{SECRET_PREFIX}****{secret[-4:]}" if len(secret) > len(SECRET_PREFIX) + 8 else SECRET_PREFIX + "****"


def new_webhook_id() -> str:
    return "wh_" + secrets.token_hex(6)


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(16)


def iso_utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payload_for(event_type: str, data: dict[str, Any], now: float) -> dict[str, Any]:
    return {"type": event_type, "timestamp": iso_utc(now), "data": data}


# --- the outbox ---------------------------------------------------------------------------------


async def enqueue(db: AsyncSession, event_type: str, data: dict[str, Any], now: float) -> int:
    """Queue ``event_type`` for every enabled webhook subscribed to it; returns how many.

    Call it inside the write transaction that makes the state change the event reports (the
    outbox pattern): the deliveries commit or roll back with that change, so a notification
    exists if and only if what it announces happened. After the transaction commits, call
    :func:`notify` so this replica sends at once rather than at its next poll::

        async with ctx.writer() as db:
            ...                                   # e.g. the alert instance becomes firing
            await webhooks.enqueue(db, "alert.firing", {...}, now)
        webhooks.notify(ctx)

    ``data`` must be JSON-serialisable; it becomes the payload's ``data``.
    """
    validate_event_type(event_type)
    try:
        json.dumps(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"webhook data for {event_type} is not JSON-serialisable: {e}") from e
    rows = (await db.execute(select(Webhook.id, Webhook.events).where(Webhook.enabled.is_(True)))).all()
    payload = payload_for(event_type, data, now)
    deliveries = [new_delivery(hook_id, event_type, payload, now)
                  for hook_id, globs in rows if matches_any(globs or [], event_type)]
    if deliveries:
        db.add_all(deliveries)
        await db.flush()
    return len(deliveries)


def new_delivery(webhook_id: str, event_type: str, payload: dict[str, Any], now: float) -> WebhookDelivery:
    return WebhookDelivery(id=new_message_id(), webhook_id=webhook_id, event_type=event_type, payload=payload,
                           status=PENDING, attempts=0, next_attempt_at=now, created_at=now)


_DISPATCHERS: dict[int, WebhookDispatcher] = {}


def notify(ctx: ServerContext) -> None:
    """Wake this process's dispatcher for ``ctx`` (if one runs): something was enqueued and committed.
    Without it the delivery still goes out, at the dispatcher's next poll."""
    d = _DISPATCHERS.get(id(ctx))
    if d is not None:
        d.notify()


# --- the dispatcher -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Claim:
    id: str
    webhook_id: str
    url: str
    secret: str
    payload: dict[str, Any]
    attempts: int
    lease_until: float


def _one_line(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


class WebhookDispatcher:
    """Sends due deliveries, at most ``max_in_flight`` at once; one per server process."""

    def __init__(self, ctx: ServerContext, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.config.webhooks
        self._transport = transport
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[asyncio.Task[None], _Claim] = {}
        self._http: httpx.AsyncClient | None = None
        # counters, for /metrics and tests
        self.attempts = 0
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        s = self.settings
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(s.request_timeout, connect=s.connect_timeout),
            follow_redirects=False,  # a redirect is an answer other than 2xx: retried, never followed
            limits=httpx.Limits(max_connections=s.max_in_flight, max_keepalive_connections=s.max_in_flight),
            transport=self._transport,
        )
        _DISPATCHERS[id(self.ctx)] = self
        self._task = asyncio.create_task(self._run(), name="corral-webhooks")

    def notify(self) -> None:
        """Something was enqueued: look for due deliveries now rather than at the next poll."""
        self._wake.set()

    async def stop(self, grace: float = 3.0) -> None:
        """Stop claiming; give attempts in flight ``grace`` seconds, then hand theirs back."""
        if _DISPATCHERS.get(id(self.ctx)) is self:
            del _DISPATCHERS[id(self.ctx)]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        unfinished: list[_Claim] = []
        if self._inflight:
            _, pending = await asyncio.wait(list(self._inflight), timeout=grace)
            unfinished = [self._inflight[t] for t in pending]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if unfinished:
            await self._release(unfinished)
        if self._http is not None:
            await self._http.aclose()

    async def _run(self) -> None:
        s = self.settings
        next_prune = time.monotonic()
        while True:
            self._wake.clear()  # before looking: a notify() during the scan means "look again"
            try:
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + s.prune_interval
                    await self.prune(time.time() - s.log_retention)
                wait = await self._dispatch_due()
            except Exception:
                log.exception("webhook dispatcher: looking for due deliveries failed; again in %gs", s.poll_interval)
                wait = s.poll_interval
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    async def _dispatch_due(self) -> float:
        """Start what is due; return how long to wait before looking again."""
        s = self.settings
        free = s.max_in_flight - len(self._inflight)
        if free <= 0:
            return s.poll_interval  # each finished attempt wakes the loop
        claims = await self._claim(free, time.time())
        for c in claims:
            task = asyncio.create_task(self._deliver(c), name=f"corral-webhook-{c.id}")
            self._inflight[task] = c
            task.add_done_callback(self._finished)
        if len(claims) == free:
            return 0.0  # there may be more due
        async with self.ctx.reader() as db:
            next_due = await db.scalar(
                select(func.min(WebhookDelivery.next_attempt_at))
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(WebhookDelivery.status == PENDING, Webhook.enabled.is_(True)))
        if next_due is None:
            return s.poll_interval
        # a floor, so rows another replica is claiming right now (skipped, still due) are no busy loop
        return min(s.poll_interval, max(0.01, float(next_due) - time.time()))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery task failed", exc_info=task.exception())
        self._wake.set()

    async def _claim(self, limit: int, now: float) -> list[_Claim]:
        lease_until = now + self.settings.claim_lease
        due = (select(WebhookDelivery.id)
               .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
               .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now,
                      Webhook.enabled.is_(True))
               .order_by(WebhookDelivery.next_attempt_at)
               .limit(limit))
        if not self.ctx.sqlite:
            # replicas claiming at the same moment take disjoint rows instead of queueing on locks
            due = due.with_for_update(of=WebhookDelivery, skip_locked=True)
        async with self.ctx.writer() as db:
            ids = list((await db.scalars(due)).all())
            if not ids:
                return []
            await db.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids))
                             .values(next_attempt_at=lease_until).execution_options(synchronize_session=False))
            rows = (await db.execute(
                select(WebhookDelivery.id, WebhookDelivery.webhook_id, Webhook.url, Webhook.secret,
                       WebhookDelivery.payload, WebhookDelivery.attempts)
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(WebhookDelivery.id.in_(ids)))).all()
        return [_Claim(id=r[0], webhook_id=r[1], url=r[2], secret=r[3], payload=r[4], attempts=r[5],
                       lease_until=lease_until) for r in rows]

    async def _deliver(self, c: _Claim) -> None:
        status, error = await self._attempt(c)
        self.attempts += 1
        try:
            await self._record(c, status, error)
        except Exception:
            # the claim's lease runs out and the delivery is attempted again: at least once
            log.exception("webhook delivery %s: recording the attempt failed", c.id)

    async def _attempt(self, c: _Claim) -> tuple[int | None, str | None]:
        """One POST. Returns (HTTP status or None, error or None when delivered)."""
        s = self.settings
        assert self._http is not None
        status: int | None = None
        try:
            body = json.dumps(c.payload, separators=(",", ":"), ensure_ascii=False).encode()
            sent_at = dt.datetime.now(dt.UTC)
            headers = {
                "content-type": "application/json",
                "accept-encoding": "identity",  # the excerpt of a refusal is read raw
                "user-agent": f"corral/{__version__}",
                "webhook-id": c.id,
                "webhook-timestamp": str(math.floor(sent_at.timestamp())),
                "webhook-signature": StandardWebhook(c.secret).sign(c.id, sent_at, body.decode()),
            }
            async with asyncio.timeout(s.request_timeout), \
                    self._http.stream("POST", c.url, content=body, headers=headers) as r:
                status = r.status_code
                if 200 <= status < 300:
                    return status, None
                excerpt = await self._excerpt(r)
                return status, f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
        except TimeoutError:
            return status, f"timed out after {s.request_timeout:g}s"
        except httpx.HTTPError as e:
            return status, _one_line(f"{type(e).__name__}: {e}")
        except Exception as e:  # a bad URL that slipped through, a broken secret: record, don't crash
            log.warning("webhook delivery %s: %s", c.id, type(e).__name__)
            return status, _one_line(f"{type(e).__name__}: {e}")

    async def _excerpt(self, r: httpx.Response) -> str:
        """The start of a response body: enough to explain a refusal, never more than that read."""
        limit = self.settings.response_excerpt_bytes
        buf = b""
        with contextlib.suppress(httpx.HTTPError):
            async for chunk in r.aiter_raw():
                buf += chunk
                if len(buf) >= limit:
                    break
        return _one_line(buf[:limit].decode("utf-8", "replace"))

    async def _record(self, c: _Claim, status: int | None, error: str | None) -> None:
        s = self.settings
        now = time.time()
        attempts = c.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_status": status,
                                  "last_error": error[: s.max_error_len] if error else None}
        if error is None:
            values.update(status=DELIVERED, delivered_at=now, next_attempt_at=None)
        else:
            delay = next_attempt_delay(attempts, s.retry_scale)
            if delay is None:
                values.update(status=FAILED, next_attempt_at=None)
            else:
                values.update(next_attempt_at=now + delay)
        async with self.ctx.writer() as db:
            res = await db.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == c.id, WebhookDelivery.status == PENDING,
                       WebhookDelivery.next_attempt_at == c.lease_until)
                .values(**values).execution_options(synchronize_session=False))
        if not res.rowcount:  # type: ignore[attr-defined]
            # the webhook was deleted meanwhile, or our claim ran out and another replica took it
            log.info("webhook delivery %s changed while it was attempted; this attempt is not recorded", c.id)
            return
        if error is None:
            self.delivered += 1
        elif values.get("status") == FAILED:
            self.failed += 1
            log.warning("webhook delivery %s to webhook %s failed for good after %d attempts",
                        c.id, c.webhook_id, attempts)

    async def prune(self, before: float, batch: int = 1000) -> int:
        """Delete delivered and failed deliveries created before ``before``, in small batches so
        other writers never wait long. Returns how many."""
        total = 0
        while True:
            async with self.ctx.writer() as db:
                old = (select(WebhookDelivery.id)
                       .where(WebhookDelivery.status.in_((DELIVERED, FAILED)), WebhookDelivery.created_at < before)
                       .limit(batch))
                res = await db.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(old.scalar_subquery()))
                                       .execution_options(synchronize_session=False))
            n = int(res.rowcount or 0)  # type: ignore[attr-defined]
            total += n
            if n < batch:
                return total

    async def _release(self, claims: list[_Claim]) -> None:
        """Hand unfinished claims back, so whichever replica looks next sends them at once."""
        now = time.time()
        try:
            async with asyncio.timeout(2.0), self.ctx.writer() as db:
                for c in claims:
                    await db.execute(
                        update(WebhookDelivery)
                        .where(WebhookDelivery.id == c.id, WebhookDelivery.status == PENDING,
                               WebhookDelivery.next_attempt_at == c.lease_until)
                        .values(next_attempt_at=now).execution_options(synchronize_session=False))
        except Exception as e:  # their leases run out instead
            log.warning("webhook dispatcher: handing back %d claims failed: %s", len(claims), e)
