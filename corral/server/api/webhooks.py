"""Webhooks: where event notifications go (Standard Webhooks signing), and their delivery log.

Roles: creating, changing, deleting, testing and retrying are for admins, because a webhook
carries a signing secret and sends fleet data to any URL. Operators may read webhooks (secrets
masked) and their delivery logs; viewers may not, since a URL can itself be a credential. The
secret is returned once, by the create call, and never written to the audit log.
"""

from __future__ import annotations

import time
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.errors import Conflict, InvalidInput, NotFound
from corral.server import webhooks as wh
from corral.server.api.deps import Admin, Ctx, Operator, Paging, encode_cursor, rid
from corral.server.api.views import iso
from corral.server.store.models import Webhook, WebhookDelivery

router = APIRouter(tags=["webhooks"])


class WebhookIn(BaseModel):
    url: str = Field(description="http:// or https:// URL that receives the POSTs")
    events: list[str] = Field(description="event-type globs, e.g. alert.* or * for all")
    description: str = ""
    secret: str | None = Field(default=None, description="whsec_<base64 of 24-64 bytes>; generated if absent")


class WebhookPatch(BaseModel):
    enabled: bool | None = None
    events: list[str] | None = None
    url: str | None = None
    description: str | None = None


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    secret: str = Field(description="the whole secret in the create response only; masked otherwise")
    created_at: str | None
    created_by: str


class WebhookPage(BaseModel):
    items: list[WebhookOut]
    next_cursor: str | None = None


class DeliveryOut(BaseModel):
    id: str = Field(description="the webhook-id header: the same on every attempt")
    webhook_id: str
    event_type: str
    status: str = Field(description="pending, delivered or failed")
    attempts: int
    last_status: int | None = Field(description="HTTP status of the last attempt (none: no response)")
    last_error: str | None
    created_at: str | None
    next_attempt_at: str | None
    delivered_at: str | None
    payload: dict[str, Any]


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None = None


def view(h: Webhook, reveal: bool = False) -> WebhookOut:
    return WebhookOut(id=h.id, url=h.url, events=list(h.events or []), description=h.description,
                      enabled=h.enabled, secret=h.secret if reveal else wh.mask_secret(h.secret),
                      created_at=iso(h.created_at), created_by=h.created_by)


def delivery_view(d: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(id=d.id, webhook_id=d.webhook_id, event_type=d.event_type, status=d.status,
                       attempts=d.attempts, last_status=d.last_status, last_error=d.last_error,
                       created_at=iso(d.created_at),
                       next_attempt_at=iso(d.next_attempt_at) if d.status == wh.PENDING else None,
                       delivered_at=iso(d.delivered_at), payload=d.payload)


def origin(url: str) -> str:
    """What the audit log keeps of a URL: its origin. Paths and queries can be credentials
    (chat services put the token there), and viewers read the audit log."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def check_description(description: str, max_len: int) -> str:
    if len(description) > max_len:
        raise InvalidInput(f"description is longer than {max_len} characters")
    return description


async def get_webhook(db: AsyncSession, webhook_id: str) -> Webhook:
    h = await db.get(Webhook, webhook_id)
    if h is None:
        raise NotFound(f"no webhook {webhook_id!r}")
    return h


@router.post("/webhooks", response_model=WebhookOut, status_code=201,
             summary="Create a webhook (the response holds its signing secret, shown only here)")
async def create_webhook(body: WebhookIn, ctx: Ctx, who: Admin, request: Request) -> WebhookOut:
    s = ctx.config.webhooks
    url = wh.validate_url(body.url, s)
    events = wh.validate_events(body.events, s)
    description = check_description(body.description, s.max_description_len)
    secret = wh.validate_secret(body.secret) if body.secret is not None else wh.new_secret()
    async with ctx.writer() as db:
        h = Webhook(id=wh.new_webhook_id(), url=url, events=events, secret=secret, description=description,
                    enabled=True, created_at=time.time(), created_by=who.name)
        db.add(h)
        await db.flush()
        await ctx.audit(db, who, "webhook.create", h.id,
                        {"url": origin(url), "events": events, "secret_given": body.secret is not None},
                        rid(request))
    return view(h, reveal=True)


@router.get("/webhooks", response_model=WebhookPage, summary="List webhooks (secrets masked)")
async def list_webhooks(ctx: Ctx, _: Operator, paging: Paging) -> WebhookPage:
    stmt = select(Webhook).order_by(Webhook.created_at, Webhook.id)
    if paging.cursor:
        at, hid = _cursor(paging.cursor)
        stmt = stmt.where(or_(Webhook.created_at > at, and_(Webhook.created_at == at, Webhook.id > hid)))
    async with ctx.reader() as db:
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    return WebhookPage(items=[view(h) for h in rows],
                       next_cursor=encode_cursor([rows[-1].created_at, rows[-1].id]) if more else None)


@router.get("/webhooks/{webhook_id}", response_model=WebhookOut, summary="Show a webhook (secret masked)")
async def show_webhook(webhook_id: str, ctx: Ctx, _: Operator) -> WebhookOut:
    async with ctx.reader() as db:
        return view(await get_webhook(db, webhook_id))


@router.patch("/webhooks/{webhook_id}", response_model=WebhookOut,
              summary="Change a webhook: enable/disable it, its URL, events or description")
async def update_webhook(webhook_id: str, body: WebhookPatch, ctx: Ctx, who: Admin, request: Request) -> WebhookOut:
    s = ctx.config.webhooks
    changes: dict[str, Any] = {}
    if body.url is not None:
        changes["url"] = wh.validate_url(body.url, s)
    if body.events is not None:
        changes["events"] = wh.validate_events(body.events, s)
    if body.description is not None:
        changes["description"] = check_description(body.description, s.max_description_len)
    if body.enabled is not None:
        changes["enabled"] = body.enabled
    if not changes:
        raise InvalidInput("nothing to change: give enabled, events, url or description")
    async with ctx.writer() as db:
        h = await get_webhook(db, webhook_id)
        for k, v in changes.items():
            setattr(h, k, v)
        await ctx.audit(db, who, "webhook.update", webhook_id,
                        {**changes, "url": origin(changes["url"])} if "url" in changes else changes, rid(request))
    if changes.get("enabled"):
        wh.notify(ctx)  # deliveries that waited while it was disabled
    return view(h)


@router.delete("/webhooks/{webhook_id}", status_code=204, summary="Delete a webhook and its delivery log")
async def delete_webhook(webhook_id: str, ctx: Ctx, who: Admin, request: Request) -> Response:
    async with ctx.writer() as db:
        h = await get_webhook(db, webhook_id)
        await db.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id))
        await db.delete(h)
        await ctx.audit(db, who, "webhook.delete", webhook_id, {"url": origin(h.url)}, rid(request))
    return Response(status_code=204)


@router.get("/webhooks/{webhook_id}/deliveries", response_model=DeliveryPage,
            summary="A webhook's delivery log, newest first")
async def list_deliveries(webhook_id: str, ctx: Ctx, _: Operator, paging: Paging,
                          status: Annotated[str | None, Query(description="pending, delivered or failed")] = None,
                          ) -> DeliveryPage:
    if status is not None and status not in wh.STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(wh.STATUSES)}, not {status!r}")
    stmt = (select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()))
    if status is not None:
        stmt = stmt.where(WebhookDelivery.status == status)
    if paging.cursor:
        at, did = _cursor(paging.cursor)
        stmt = stmt.where(or_(WebhookDelivery.created_at < at,
                              and_(WebhookDelivery.created_at == at, WebhookDelivery.id < did)))
    async with ctx.reader() as db:
        await get_webhook(db, webhook_id)
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    return DeliveryPage(items=[delivery_view(d) for d in rows],
                        next_cursor=encode_cursor([rows[-1].created_at, rows[-1].id]) if more else None)


@router.post("/webhooks/{webhook_id}/test", response_model=DeliveryOut, status_code=202,
             summary="Queue a webhook.test event for this webhook (whatever its event globs)")
async def test_webhook(webhook_id: str, ctx: Ctx, who: Admin, request: Request) -> DeliveryOut:
    now = time.time()
    async with ctx.writer() as db:
        h = await get_webhook(db, webhook_id)
        if not h.enabled:
            raise Conflict(f"webhook {webhook_id!r} is disabled: enable it first")
        data = {"webhook_id": h.id, "message": "a test event from Corral", "requested_by": who.name}
        d = wh.new_delivery(h.id, wh.TEST_EVENT, wh.payload_for(wh.TEST_EVENT, data, now), now)
        db.add(d)
        await db.flush()
        await ctx.audit(db, who, "webhook.test", webhook_id, {"delivery": d.id}, rid(request))
    wh.notify(ctx)
    return delivery_view(d)


@router.post("/webhooks/deliveries/{delivery_id}/retry", response_model=DeliveryOut, status_code=202,
             summary="Send a failed delivery once more")
async def retry_delivery(delivery_id: str, ctx: Ctx, who: Admin, request: Request) -> DeliveryOut:
    async with ctx.writer() as db:
        d = await db.get(WebhookDelivery, delivery_id)
        if d is None:
            raise NotFound(f"no webhook delivery {delivery_id!r}")
        if d.status != wh.FAILED:
            raise Conflict(f"delivery {delivery_id!r} is {d.status}: only a failed delivery can be retried")
        d.status = wh.PENDING
        d.next_attempt_at = time.time()
        await ctx.audit(db, who, "webhook.retry", d.webhook_id, {"delivery": delivery_id}, rid(request))
    wh.notify(ctx)
    return delivery_view(d)


def _cursor(values: list[Any]) -> tuple[float, str]:
    try:
        at, key = values
        return float(at), str(key)
    except (TypeError, ValueError) as e:
        raise InvalidInput("cursor is not valid: pass next_cursor from the previous page") from e
