"""Registry operations shared by the REST API and the device hub: validation of names, tags
and enrollment tokens, and the writes that enrolling a device implies."""

from __future__ import annotations

import re
import secrets
import time
import unicodedata
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from corral.core.admission import TokenVerdict
from corral.errors import InvalidInput, NotFound
from corral.selectors import parse
from corral.server.auth import token_digest
from corral.server.config import Limits
from corral.server.store.models import Device, DeviceTag, EnrollmentToken, Group, GroupMember
from corral.server.store.selector_sql import to_sql

TAG_KEY = re.compile(r"[A-Za-z0-9_-]+")
GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+")
ENROLL_PREFIX = "cet_"


def _has_control(s: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in s)


def validate_tag(key: str, value: str, limits: Limits) -> None:
    if not key or len(key) > limits.max_tag_key_len or not TAG_KEY.fullmatch(key):
        raise InvalidInput(
            f"tag key {key[:80]!r} must be 1-{limits.max_tag_key_len} characters of letters, digits, _ and -"
        )
    if len(value) > limits.max_tag_value_len:
        raise InvalidInput(f"tag {key!r}: value is longer than {limits.max_tag_value_len} characters")
    if _has_control(value):
        raise InvalidInput(f"tag {key!r}: value contains control or unassigned characters")


def validate_tags(tags: dict[str, Any], limits: Limits) -> dict[str, str]:
    if len(tags) > limits.max_tags_per_device:
        raise InvalidInput(f"at most {limits.max_tags_per_device} tags per device")
    out: dict[str, str] = {}
    for k, v in tags.items():
        if not isinstance(v, str):
            raise InvalidInput(f"tag {k!r}: value must be a string")
        validate_tag(k, v, limits)
        out[k] = v
    return out


def validate_group_name(name: str, limits: Limits) -> str:
    if not name or len(name) > limits.max_group_name_len or not GROUP_NAME.fullmatch(name):
        raise InvalidInput(
            f"group name {name[:80]!r} must be 1-{limits.max_group_name_len} characters of letters, digits, ._-"
        )
    return name


def new_enrollment_secret() -> str:
    return ENROLL_PREFIX + secrets.token_urlsafe(24)


async def check_enrollment_token(db: AsyncSession, secret: str | None) -> tuple[TokenVerdict, EnrollmentToken | None]:
    if not secret:
        return "none", None
    if not secret.startswith(ENROLL_PREFIX) or len(secret) > 128:
        return "invalid", None
    row = await db.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == token_digest(secret)))
    if row is None:
        return "invalid", None
    if row.revoked:
        return "revoked", row
    if row.expires_at is not None and row.expires_at <= time.time():
        return "expired", row
    if row.max_uses is not None and row.uses >= row.max_uses:
        return "used_up", row
    return "valid", row


async def consume_enrollment_token(db: AsyncSession, row: EnrollmentToken) -> bool:
    """Take one use of the token; False if a concurrent enrollment took the last one."""
    now = time.time()
    stmt = (
        update(EnrollmentToken)
        .where(EnrollmentToken.id == row.id, EnrollmentToken.revoked.is_(False))
        .where((EnrollmentToken.max_uses.is_(None)) | (EnrollmentToken.uses < EnrollmentToken.max_uses))
        .where((EnrollmentToken.expires_at.is_(None)) | (EnrollmentToken.expires_at > now))
        .values(uses=EnrollmentToken.uses + 1)
        .execution_options(synchronize_session=False)
    )
    result = await db.execute(stmt)
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def set_tags(db: AsyncSession, device_id: str, tags: dict[str, str]) -> None:
    if not tags:
        return
    await db.execute(delete(DeviceTag).where(DeviceTag.device_id == device_id, DeviceTag.key.in_(list(tags))))
    db.add_all([DeviceTag(device_id=device_id, key=k, value=v) for k, v in tags.items()])
    await db.flush()


async def remove_tags(db: AsyncSession, device_id: str, keys: list[str]) -> None:
    if keys:
        await db.execute(delete(DeviceTag).where(DeviceTag.device_id == device_id, DeviceTag.key.in_(keys)))


async def add_members(db: AsyncSession, group: str, device_ids: list[str]) -> int:
    """Add devices to a static group; devices already in it are left alone. Returns added count."""
    existing = set(
        (await db.scalars(select(GroupMember.device_id).where(
            GroupMember.group_name == group, GroupMember.device_id.in_(device_ids)))).all()
    )
    new = [d for d in dict.fromkeys(device_ids) if d not in existing]
    db.add_all([GroupMember(group_name=group, device_id=d) for d in new])
    await db.flush()
    return len(new)


def missing_devices(missing: list[str], what: str = "device") -> NotFound:
    """The error for a list of device ids some of which do not exist: names the first."""
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return NotFound(f"no {what} {missing[0]!r}{more}")


async def get_device(db: AsyncSession, device_id: str) -> Device:
    dev = await db.get(Device, device_id)
    if dev is None:
        raise NotFound(f"no device {device_id!r}")
    return dev


def members_clause(g: Group) -> Any:
    """A condition on ``devices`` that selects the group's members (static or dynamic)."""
    if g.selector is not None:
        return to_sql(parse(g.selector))
    return Device.id.in_(select(GroupMember.device_id).where(GroupMember.group_name == g.name))


async def get_group(db: AsyncSession, name: str) -> Group:
    grp = await db.get(Group, name)
    if grp is None:
        raise NotFound(f"no group {name!r}")
    return grp


async def device_tags(db: AsyncSession, device_ids: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {d: {} for d in device_ids}
    if not device_ids:
        return out
    rows = await db.execute(select(DeviceTag.device_id, DeviceTag.key, DeviceTag.value)
                            .where(DeviceTag.device_id.in_(device_ids)))
    for dev_id, k, v in rows:
        out[dev_id][k] = v
    return out


async def device_groups(db: AsyncSession, device_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {d: [] for d in device_ids}
    if not device_ids:
        return out
    rows = await db.execute(select(GroupMember.device_id, GroupMember.group_name)
                            .where(GroupMember.device_id.in_(device_ids)))
    for dev_id, g in rows:
        out[dev_id].append(g)
    return out
