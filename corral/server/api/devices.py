"""Devices: list (selector, paging, sorting), show, tag, admission, pre-authorization, commands."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import Select, and_, func, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral import protocol
from corral.errors import Conflict, InvalidInput, NotFound
from corral.selectors import parse
from corral.server import registry
from corral.server.api.deps import Ctx, Operator, Paging, Viewer, encode_cursor, rid
from corral.server.api.views import (
    CommandOut,
    CommandPage,
    DeviceOut,
    DevicePage,
    command_view,
    device_views,
)
from corral.server.context import ServerContext
from corral.server.hub import QueuedCommand
from corral.server.store.models import Device, DeviceCommand, DeviceTag
from corral.server.store.selector_sql import to_sql

router = APIRouter(tags=["devices"])

#: the list's sort orders: each a key (a SQL expression) and whether it is text; ties go by id.
#: ``name`` is the ``name`` tag, else the host name the device reported; ``version`` the agent's
#: version (compared as text). Both are computed per row: fine for the console's pages, while
#: ``id``, ``created_at`` and ``last_seen`` are indexed.
SORTS: dict[str, tuple[Callable[[], Any], bool]] = {
    "id": (lambda: Device.id, True),
    "created_at": (lambda: func.coalesce(Device.created_at, 0.0), False),
    "last_seen": (lambda: func.coalesce(Device.last_seen, 0.0), False),
    "name": (lambda: func.coalesce(
        func.nullif(select(DeviceTag.value).where(DeviceTag.device_id == Device.id, DeviceTag.key == "name")
                    .scalar_subquery(), ""),
        Device.inventory["hostname"].as_string(), ""), True),
    "version": (lambda: func.coalesce(Device.inventory["agent_version"].as_string(), ""), True),
}
STATUSES = ("pending", "accepted", "rejected", "decommissioned")


def selector_clause(expr: str | None, max_len: int) -> Any:
    if expr is None or not expr.strip():
        return None
    if len(expr) > max_len:
        raise InvalidInput(f"selector is longer than {max_len} characters")
    return to_sql(parse(expr))


def keyset(stmt: Select[Any], sort: str, paging: Paging) -> Select[Any]:
    """Order by (sort key, id) and continue after the cursor: stable pages at any depth. The sort
    key is the statement's last column (the next page's cursor is made of it)."""
    desc = sort.startswith("-")
    name = sort.lstrip("-")
    if name not in SORTS:
        raise InvalidInput(f"sort must be one of {', '.join(SORTS)} (prefix - for descending), not {sort!r}")
    make_key, text = SORTS[name]
    key = make_key()
    if paging.cursor is not None:
        if name == "id":
            if len(paging.cursor) != 1 or not isinstance(paging.cursor[0], str):
                raise InvalidInput("cursor does not belong to this sort order")
            after = Device.id < paging.cursor[0] if desc else Device.id > paging.cursor[0]
        else:
            if (len(paging.cursor) != 2 or not isinstance(paging.cursor[1], str)
                    or not isinstance(paging.cursor[0], str if text else int | float)
                    or isinstance(paging.cursor[0], bool)):
                raise InvalidInput("cursor does not belong to this sort order")
            v, last_id = paging.cursor
            after = (or_(key < v, and_(key == v, Device.id < last_id)) if desc
                     else or_(key > v, and_(key == v, Device.id > last_id)))
        stmt = stmt.where(after)
    if name == "id":
        stmt = stmt.order_by(Device.id.desc() if desc else Device.id)
    else:
        stmt = stmt.order_by(key.desc(), Device.id.desc()) if desc else stmt.order_by(key, Device.id)
    return stmt.add_columns(key).limit(paging.limit + 1)


async def page_of_devices(db: AsyncSession, stmt: Select[Any], sort: str, paging: Paging) -> DevicePage:
    rows = list((await db.execute(keyset(stmt, sort, paging))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    nxt = None
    if more and rows:
        last, key = rows[-1][0], rows[-1][-1]
        nxt = encode_cursor([last.id] if sort.lstrip("-") == "id" else [key, last.id])
    return DevicePage(items=await device_views(db, [r[0] for r in rows]), next_cursor=nxt)


@router.get("/devices", response_model=DevicePage, summary="List devices")
async def list_devices(
    ctx: Ctx, _: Viewer, paging: Paging,
    selector: Annotated[str | None, Query(description="selector expression, see docs/selectors.md")] = None,
    status: Annotated[str | None, Query(description="admission status")] = None,
    sort: Annotated[str, Query(description="id, created_at, last_seen, name (the name tag, else the host name) "
                                         "or version (the agent's, as text); prefix - to descend")] = "id",
) -> DevicePage:
    stmt = select(Device)
    clause = selector_clause(selector, ctx.config.limits.max_selector_len)
    if clause is not None:
        stmt = stmt.where(clause)
    if status is not None:
        if status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")
        stmt = stmt.where(Device.status == status)
    async with ctx.reader() as db:
        return await page_of_devices(db, stmt, sort, paging)


class CountOut(BaseModel):
    total: int
    online: int
    by_status: dict[str, int]


@router.get("/devices-count", response_model=CountOut, summary="Count devices matching a selector")
async def count_devices(ctx: Ctx, _: Viewer, selector: str | None = None) -> CountOut:
    stmt = select(Device.status, Device.online, func.count()).group_by(Device.status, Device.online)
    clause = selector_clause(selector, ctx.config.limits.max_selector_len)
    if clause is not None:
        stmt = stmt.where(clause)
    by_status: dict[str, int] = {}
    online = 0
    async with ctx.reader() as db:
        for st, on, n in await db.execute(stmt):
            by_status[st] = by_status.get(st, 0) + n
            online += n if on else 0
    return CountOut(total=sum(by_status.values()), online=online, by_status=by_status)


@router.get("/devices/{device_id}", response_model=DeviceOut, summary="Show one device")
async def show_device(device_id: str, ctx: Ctx, _: Viewer) -> DeviceOut:
    async with ctx.reader() as db:
        dev = await registry.get_device(db, device_id)
        return (await device_views(db, [dev]))[0]


class TagChange(BaseModel):
    set: dict[str, str] = Field(default_factory=dict, description="tags to add or overwrite")
    remove: list[str] = Field(default_factory=list, description="tag keys to remove")


@router.patch("/devices/{device_id}/tags", response_model=DeviceOut, summary="Set or remove tags")
async def change_tags(device_id: str, body: TagChange, ctx: Ctx, who: Operator, request: Request) -> DeviceOut:
    limits = ctx.config.limits
    tags = registry.validate_tags(body.set, limits)
    for k in body.remove:
        registry.validate_tag(k, "", limits)
    if set(tags) & set(body.remove):
        raise InvalidInput("a tag key cannot be both set and removed")
    async with ctx.writer() as db:
        dev = await registry.get_device(db, device_id)
        current = (await registry.device_tags(db, [dev.id]))[dev.id]
        if len(set(current) | set(tags)) - len(set(body.remove) & set(current)) > limits.max_tags_per_device:
            raise InvalidInput(f"at most {limits.max_tags_per_device} tags per device")
        await registry.set_tags(db, dev.id, tags)
        await registry.remove_tags(db, dev.id, body.remove)
        dev.updated_at = time.time()
        await ctx.audit(db, who, "device.tag", dev.id, {"set": tags, "remove": body.remove}, rid(request))
    await ctx.bus.publish(f"device.{device_id}.rules", b"")  # its tags may change which rules it gets
    async with ctx.reader() as db:
        return (await device_views(db, [await registry.get_device(db, device_id)]))[0]


# admission transitions (DESIGN §2): what each verb may move from
TRANSITIONS = {
    "accept": ({"pending"}, "accepted"),
    "reject": ({"pending"}, "rejected"),
    "decommission": ({"pending", "accepted"}, "decommissioned"),
}


async def _admission(device_id: str, verb: str, ctx: Ctx, who: Any, request: Request) -> DeviceOut:
    sources, target = TRANSITIONS[verb]
    async with ctx.writer() as db:
        dev = await registry.get_device(db, device_id)
        if dev.status not in sources:
            raise Conflict(f"cannot {verb} a device that is {dev.status}")
        before = dev.status
        dev.status = target
        dev.updated_at = time.time()
        if target == "accepted":
            dev.admitted_at = dev.updated_at
        await ctx.audit(db, who, f"device.{verb}", dev.id, {"from": before, "to": target}, rid(request))
    await ctx.bus.publish(f"device.{device_id}.status", target.encode())
    async with ctx.reader() as db:
        return (await device_views(db, [await registry.get_device(db, device_id)]))[0]


@router.post("/devices/{device_id}/accept", response_model=DeviceOut, summary="Accept a pending device")
async def accept_device(device_id: str, ctx: Ctx, who: Operator, request: Request) -> DeviceOut:
    return await _admission(device_id, "accept", ctx, who, request)


@router.post("/devices/{device_id}/reject", response_model=DeviceOut, summary="Reject a pending device")
async def reject_device(device_id: str, ctx: Ctx, who: Operator, request: Request) -> DeviceOut:
    return await _admission(device_id, "reject", ctx, who, request)


@router.post("/devices/{device_id}/decommission", response_model=DeviceOut,
             summary="Decommission a device: its session closes and its key can never connect again")
async def decommission_device(device_id: str, ctx: Ctx, who: Operator, request: Request) -> DeviceOut:
    return await _admission(device_id, "decommission", ctx, who, request)


class Preauthorize(BaseModel):
    public_key: str = Field(description="the device's raw Ed25519 public key, base64 (32 bytes)")
    tags: dict[str, str] = Field(default_factory=dict)


def decode_public_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise InvalidInput("public_key must be a base64-encoded 32-byte Ed25519 public key")
    return raw


@router.post("/devices/preauthorize", response_model=DeviceOut, status_code=201,
             summary="Pre-authorize a device by its public key: it is accepted on first connect")
async def preauthorize(body: Preauthorize, ctx: Ctx, who: Operator, request: Request) -> DeviceOut:
    raw = decode_public_key(body.public_key)
    tags = registry.validate_tags(body.tags, ctx.config.limits)
    device_id = protocol.device_id_for(raw)
    async with ctx.writer() as db:
        if await db.get(Device, device_id) is not None:
            raise Conflict(f"device {device_id} already exists")
        now = time.time()
        db.add(Device(id=device_id, public_key=raw, status="accepted", created_at=now, updated_at=now,
                      admitted_at=now, inventory={}))
        await db.flush()
        await registry.set_tags(db, device_id, tags)
        await ctx.audit(db, who, "device.preauthorize", device_id, {"tags": tags}, rid(request))
    async with ctx.reader() as db:
        return (await device_views(db, [await registry.get_device(db, device_id)]))[0]


# --- commands ---------------------------------------------------------------------------------


class CommandIn(BaseModel):
    name: str = Field(description="ping, refresh-inventory, reboot, ...", min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    ttl: float | None = Field(default=None, gt=0, description="seconds a queued command stays deliverable")
    wait: float = Field(default=0, ge=0, description="seconds to wait for the result before answering")


async def publish_command(ctx: ServerContext, device_id: str, cmd_id: str, name: str, args: dict[str, Any]) -> None:
    payload = msgspec.json.encode(QueuedCommand(id=cmd_id, name=name, args=args))
    await ctx.bus.publish(f"device.{device_id}.command", payload)


def check_command(ctx: ServerContext, name: str, args: dict[str, Any], wait: float) -> None:
    t, limits = ctx.config.timeouts, ctx.config.limits
    if not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidInput("command name must be letters, digits and -_.")
    if len(json.dumps(args)) > limits.max_command_args_bytes:
        raise InvalidInput(f"command args are larger than {limits.max_command_args_bytes} bytes")
    if wait > t.command_wait_max:
        raise InvalidInput(f"wait must be at most {t.command_wait_max:g} seconds")


@router.post("/devices/{device_id}/commands", response_model=CommandOut, status_code=201,
             summary="Send a command to a device (queued while it is offline)")
async def send_command(device_id: str, body: CommandIn, ctx: Ctx, who: Operator, request: Request) -> CommandOut:
    t = ctx.config.timeouts
    check_command(ctx, body.name, body.args, body.wait)
    now = time.time()
    cmd_id = secrets.token_hex(8)
    async with ctx.writer() as db:
        dev = await registry.get_device(db, device_id)
        if dev.status != "accepted":
            raise Conflict(f"device is {dev.status}; commands go to accepted devices only")
        db.add(DeviceCommand(id=cmd_id, device_id=dev.id, name=body.name, args=body.args, status="queued",
                             created_at=now, updated_at=now, expires_at=now + (body.ttl or t.command_default_ttl),
                             created_by=who.name))
        await ctx.audit(db, who, "device.command", dev.id, {"command": cmd_id, "name": body.name}, rid(request))
    done = ctx.hub.watch_command(cmd_id) if body.wait and ctx.hub is not None else None
    await publish_command(ctx, device_id, cmd_id, body.name, body.args)
    if done is not None and ctx.hub is not None:
        await ctx.hub.await_command(cmd_id, done, body.wait)
    async with ctx.reader() as db:
        c = await db.get(DeviceCommand, cmd_id)
        assert c is not None
        return command_view(c)


@router.get("/devices/{device_id}/commands", response_model=CommandPage, summary="Commands sent to a device")
async def list_commands(device_id: str, ctx: Ctx, _: Viewer, paging: Paging) -> CommandPage:
    async with ctx.reader() as db:
        await registry.get_device(db, device_id)
        stmt = select(DeviceCommand).where(DeviceCommand.device_id == device_id)
        if paging.cursor:
            if len(paging.cursor) != 2 or not isinstance(paging.cursor[0], int | float):
                raise InvalidInput("cursor does not belong to this list")
            at, last_id = paging.cursor
            stmt = stmt.where(or_(DeviceCommand.created_at < at,
                                  and_(DeviceCommand.created_at == at, DeviceCommand.id < str(last_id))))
        rows = list((await db.scalars(stmt.order_by(DeviceCommand.created_at.desc(), DeviceCommand.id.desc())
                                      .limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    return CommandPage(items=[command_view(c) for c in rows], next_cursor=None if not more else
                       encode_cursor([rows[-1].created_at, rows[-1].id]))


@router.get("/commands/{command_id}", response_model=CommandOut, summary="Show a command and its result")
async def show_command(command_id: str, ctx: Ctx, _: Viewer,
                       wait: Annotated[float, Query(ge=0)] = 0) -> CommandOut:
    if wait > ctx.config.timeouts.command_wait_max:
        raise InvalidInput(f"wait must be at most {ctx.config.timeouts.command_wait_max:g} seconds")
    if wait and ctx.hub is not None:
        await ctx.hub.wait_command(command_id, wait)
    async with ctx.reader() as db:
        c = await db.get(DeviceCommand, command_id)
        if c is None:
            raise NotFound(f"no command {command_id!r}")
        if c.status in ("queued", "sent") and c.expires_at < time.time():
            c.status = "expired"
        return command_view(c)



class BulkCommandIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    selector: str | None = Field(default=None, description="every accepted device it selects")
    device_ids: list[str] | None = Field(default=None, max_length=100000)
    ttl: float | None = Field(default=None, gt=0)


class BulkCommandOut(BaseModel):
    count: int
    commands: dict[str, str] = Field(description="device id -> command id")


@router.post("/commands", response_model=BulkCommandOut, status_code=201,
             summary="Send one command to many devices (by selector or ids) in one request")
async def send_bulk_command(body: BulkCommandIn, ctx: Ctx, who: Operator, request: Request) -> BulkCommandOut:
    check_command(ctx, body.name, body.args, 0)
    if (body.selector is None) == (body.device_ids is None):
        raise InvalidInput("give exactly one of selector or device_ids")
    stmt = select(Device.id).where(Device.status == "accepted")
    if body.selector is not None:
        stmt = stmt.where(selector_clause(body.selector, ctx.config.limits.max_selector_len))
    now = time.time()
    expires = now + (body.ttl or ctx.config.timeouts.command_default_ttl)
    async with ctx.writer() as db:
        if body.device_ids is not None:
            wanted = list(dict.fromkeys(body.device_ids))
            found: set[str] = set()
            for i in range(0, len(wanted), 500):
                found |= set((await db.scalars(stmt.where(Device.id.in_(wanted[i:i + 500])))).all())
            missing = [d for d in wanted if d not in found]
            if missing:
                raise registry.missing_devices(missing, "accepted device")
            ids = wanted
        else:
            ids = list((await db.scalars(stmt.order_by(Device.id))).all())
        commands = {d: secrets.token_hex(8) for d in ids}
        rows = [{"id": c, "device_id": d, "name": body.name, "args": body.args, "status": "queued",
                 "created_at": now, "updated_at": now, "expires_at": expires, "created_by": who.name,
                 "result": None, "error": None} for d, c in commands.items()]
        if rows:
            await db.execute(insert(DeviceCommand), rows)
        await ctx.audit(db, who, "device.command_bulk", body.selector or f"{len(ids)} devices",
                        {"name": body.name, "count": len(ids)}, rid(request))
    for d, c in commands.items():
        await publish_command(ctx, d, c, body.name, body.args)
    return BulkCommandOut(count=len(commands), commands=commands)
