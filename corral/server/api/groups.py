"""Groups: static (explicit members) and dynamic (a selector, evaluated at query time)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.errors import Conflict, InvalidInput, NotFound
from corral.selectors import parse
from corral.server import registry
from corral.server.api.deps import Ctx, Operator, Paging, Viewer, encode_cursor, rid
from corral.server.api.devices import page_of_devices
from corral.server.api.views import DevicePage, iso
from corral.server.store.models import Device, Group, GroupMember

router = APIRouter(tags=["groups"])


class GroupOut(BaseModel):
    name: str
    kind: str = Field(description="static or dynamic")
    selector: str | None
    description: str
    created_at: str | None
    size: int


class GroupPage(BaseModel):
    items: list[GroupOut]
    next_cursor: str | None = None


class GroupIn(BaseModel):
    name: str
    selector: str | None = Field(default=None, description="makes the group dynamic")
    description: str = Field(default="", max_length=1000)


class MembersIn(BaseModel):
    device_ids: list[str] = Field(min_length=1, max_length=10000)


async def group_view(db: AsyncSession, g: Group) -> GroupOut:
    size = await db.scalar(select(func.count()).select_from(Device).where(registry.members_clause(g)))
    return GroupOut(name=g.name, kind="dynamic" if g.selector is not None else "static", selector=g.selector,
                    description=g.description, created_at=iso(g.created_at), size=size or 0)


@router.get("/groups", response_model=GroupPage, summary="List groups")
async def list_groups(ctx: Ctx, _: Viewer, paging: Paging) -> GroupPage:
    stmt = select(Group).order_by(Group.name)
    if paging.cursor:
        stmt = stmt.where(Group.name > str(paging.cursor[0]))
    async with ctx.reader() as db:
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
        more = len(rows) > paging.limit
        rows = rows[: paging.limit]
        items = [await group_view(db, g) for g in rows]
    return GroupPage(items=items, next_cursor=encode_cursor([rows[-1].name]) if more else None)


@router.post("/groups", response_model=GroupOut, status_code=201, summary="Create a group")
async def create_group(body: GroupIn, ctx: Ctx, who: Operator, request: Request) -> GroupOut:
    limits = ctx.config.limits
    registry.validate_group_name(body.name, limits)
    selector = None
    if body.selector is not None:
        if len(body.selector) > limits.max_selector_len:
            raise InvalidInput(f"selector is longer than {limits.max_selector_len} characters")
        parse(body.selector)  # column-precise error before anything is written
        selector = body.selector.strip()
    async with ctx.writer() as db:
        if await db.get(Group, body.name) is not None:
            raise Conflict(f"group {body.name!r} already exists")
        g = Group(name=body.name, selector=selector, description=body.description, created_at=time.time())
        db.add(g)
        await db.flush()
        await ctx.audit(db, who, "group.create", body.name, {"selector": selector}, rid(request))
    async with ctx.reader() as db:
        return await group_view(db, await registry.get_group(db, body.name))


@router.get("/groups/{name}", response_model=GroupOut, summary="Show a group")
async def show_group(name: str, ctx: Ctx, _: Viewer) -> GroupOut:
    async with ctx.reader() as db:
        return await group_view(db, await registry.get_group(db, name))


@router.get("/groups/{name}/devices", response_model=DevicePage, summary="The group's devices")
async def group_devices(name: str, ctx: Ctx, _: Viewer, paging: Paging,
                        sort: Annotated[str, Query()] = "id") -> DevicePage:
    async with ctx.reader() as db:
        g = await registry.get_group(db, name)
        return await page_of_devices(db, select(Device).where(registry.members_clause(g)), sort, paging)


@router.post("/groups/{name}/members", response_model=GroupOut, summary="Add devices to a static group")
async def add_members(name: str, body: MembersIn, ctx: Ctx, who: Operator, request: Request) -> GroupOut:
    ids = list(dict.fromkeys(body.device_ids))
    async with ctx.writer() as db:
        g = await registry.get_group(db, name)
        if g.selector is not None:
            raise Conflict(f"group {name!r} is dynamic: its members follow its selector")
        found = set((await db.scalars(select(Device.id).where(Device.id.in_(ids)))).all())
        missing = [d for d in ids if d not in found]
        if missing:
            raise registry.missing_devices(missing)
        added = await registry.add_members(db, name, ids)
        await ctx.audit(db, who, "group.add", name, {"devices": ids, "added": added}, rid(request))
    for d in ids:  # membership may change which on-device rules they get
        await ctx.bus.publish(f"device.{d}.rules", b"")
    async with ctx.reader() as db:
        return await group_view(db, await registry.get_group(db, name))


@router.delete("/groups/{name}/members/{device_id}", response_model=GroupOut,
               summary="Remove a device from a static group")
async def remove_member(name: str, device_id: str, ctx: Ctx, who: Operator, request: Request) -> GroupOut:
    async with ctx.writer() as db:
        g = await registry.get_group(db, name)
        if g.selector is not None:
            raise Conflict(f"group {name!r} is dynamic: its members follow its selector")
        res = await db.execute(delete(GroupMember).where(GroupMember.group_name == name,
                                                         GroupMember.device_id == device_id))
        if not res.rowcount:  # type: ignore[attr-defined]
            raise NotFound(f"device {device_id!r} is not in group {name!r}")
        await ctx.audit(db, who, "group.remove", name, {"device": device_id}, rid(request))
    await ctx.bus.publish(f"device.{device_id}.rules", b"")
    async with ctx.reader() as db:
        return await group_view(db, await registry.get_group(db, name))


@router.delete("/groups/{name}", status_code=204, summary="Delete a group (devices are not affected)")
async def delete_group(name: str, ctx: Ctx, who: Operator, request: Request) -> Response:
    async with ctx.writer() as db:
        await registry.get_group(db, name)
        await db.execute(delete(GroupMember).where(GroupMember.group_name == name))
        await db.execute(delete(Group).where(Group.name == name))
        await ctx.audit(db, who, "group.delete", name, {}, rid(request))
    return Response(status_code=204)
