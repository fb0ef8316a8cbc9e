"""Response shapes of the REST API (pydantic models, so /openapi.json documents them)."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from corral.server import registry
from corral.server.store.models import Device, DeviceCommand


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DeviceOut(BaseModel):
    id: str
    status: str
    online: bool
    last_seen: str | None
    created_at: str | None
    admitted_at: str | None
    public_key: str
    tags: dict[str, str]
    groups: list[str]
    inventory: dict[str, Any]
    inventory_at: str | None


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None = None


async def device_views(db: AsyncSession, devices: list[Device]) -> list[DeviceOut]:
    ids = [d.id for d in devices]
    tags = await registry.device_tags(db, ids)
    groups = await registry.device_groups(db, ids)
    return [
        DeviceOut(
            id=d.id, status=d.status, online=d.online, last_seen=iso(d.last_seen), created_at=iso(d.created_at),
            admitted_at=iso(d.admitted_at), public_key=base64.b64encode(d.public_key).decode(),
            tags=tags[d.id], groups=sorted(groups[d.id]), inventory=d.inventory or {},
            inventory_at=iso(d.inventory_at),
        )
        for d in devices
    ]


class CommandOut(BaseModel):
    id: str
    device_id: str
    name: str
    args: dict[str, Any]
    status: str
    created_at: str | None
    updated_at: str | None
    expires_at: str | None
    result: dict[str, Any] | None
    error: str | None
    created_by: str


class CommandPage(BaseModel):
    items: list[CommandOut]
    next_cursor: str | None = None


def command_view(c: DeviceCommand) -> CommandOut:
    return CommandOut(id=c.id, device_id=c.device_id, name=c.name, args=c.args or {}, status=c.status,
                      created_at=iso(c.created_at), updated_at=iso(c.updated_at), expires_at=iso(c.expires_at),
                      result=c.result, error=c.error, created_by=c.created_by)
