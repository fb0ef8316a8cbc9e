"""The console's device pages, the parts that are not routes (issue 7; docs/console.md).

The routes live in :mod:`corral.server.console`; what they need besides is here:

- the device list's sortable columns (:data:`LIST_COLUMNS`) and the links that sort by them
  (:func:`sort_links`), on top of the API's server-side sort orders
  (``corral.server.api.devices.SORTS``);
- the chart's time ranges (:data:`TIME_RANGES`): each becomes the query parameters of
  ``GET /api/v1/metrics/query`` (:func:`range_params`) that the page's module fetches;
- the tag form's fields read as one change of the API's ``PATCH .../tags`` (:func:`tag_change`);
- the port of the device's web UI (:func:`proxy_entry`);
- the device's deployment history (:func:`deployment_history`), read from ``deployment_devices``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.errors import InvalidInput
from corral.server.store.models import Artifact, Deployment, DeploymentDevice, Rollout

#: deployments shown on a device's page, newest first
HISTORY_SHOWN = 50
#: events shown on a device's page, newest first
EVENTS_SHOWN = 50


# --- the device list's sorting ---------------------------------------------------------------------


@dataclass(frozen=True)
class ListColumn:
    """A column of the device list; ``sort`` is the API's sort order for it ("" when it has none)."""

    key: str
    label: str
    sort: str
    #: hidden at phone width
    wide_only: bool = False


LIST_COLUMNS: tuple[ListColumn, ...] = (
    ListColumn("id", "Device", "id"),
    ListColumn("name", "Name", "name", wide_only=True),
    ListColumn("status", "Status", ""),
    ListColumn("last_seen", "Last seen", "last_seen", wide_only=True),
    ListColumn("version", "Agent", "version", wide_only=True),
    ListColumn("tags", "Tags", ""),
)
LIST_SORTS = frozenset(c.sort for c in LIST_COLUMNS if c.sort)


def list_sort(text: str | None) -> str:
    """The device list's sort order from its ``sort`` parameter: a sortable column, ``-`` first to
    descend; the list's default (by id) for anything else."""
    if text and text.lstrip("-") in LIST_SORTS and text.count("-") <= 1:
        return text
    return "id"


@dataclass(frozen=True)
class SortLink:
    """A column header's link: the sort order it asks for, and how the column is sorted now
    (``aria-sort``: ascending, descending or none)."""

    sort: str
    aria: str


def sort_links(current: str) -> dict[str, SortLink]:
    """For each sortable column: clicking sorts by it ascending, or, when it already is, the other
    way round. Last seen starts with the most recent (descending), as people look for it."""
    links = {}
    for c in LIST_COLUMNS:
        if not c.sort:
            continue
        if current.lstrip("-") == c.sort:
            descending = current.startswith("-")
            links[c.key] = SortLink(c.sort if descending else f"-{c.sort}", "descending" if descending else "ascending")
        else:
            links[c.key] = SortLink(f"-{c.sort}" if c.sort == "last_seen" else c.sort, "none")
    return links


# --- the chart's time ranges -----------------------------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    key: str
    label: str
    seconds: int
    #: the bucket width: a few hundred points at most, and no finer than the device's interval
    step: str


TIME_RANGES: tuple[TimeRange, ...] = (
    TimeRange("15m", "15 min", 15 * 60, "10s"),
    TimeRange("1h", "1 h", 3600, "30s"),
    TimeRange("6h", "6 h", 6 * 3600, "2m"),
    TimeRange("24h", "24 h", 24 * 3600, "10m"),
    TimeRange("7d", "7 d", 7 * 24 * 3600, "1h"),
)
DEFAULT_RANGE = "1h"
#: the metric a chart shows first, when the device reports it
PREFERRED_METRICS = ("cpu.percent", "mem.percent", "load.1")


def range_params(key: str) -> dict[str, str]:
    """The ``/api/v1/metrics/query`` parameters of a time range (``since``, ``step``, ``agg``)."""
    for r in TIME_RANGES:
        if r.key == key:
            return {"since": r.key, "step": r.step, "agg": "avg"}
    raise InvalidInput(f"time range must be one of {', '.join(r.key for r in TIME_RANGES)}, not {key!r}")


def first_metric(names: list[str]) -> str:
    """The metric the chart opens with: a familiar one the device reports, else its first."""
    for name in PREFERRED_METRICS:
        if name in names:
            return name
    return names[0] if names else ""


# --- tags, the web UI's port ----------------------------------------------------------------


def tag_change(form: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The tag form as the API's change (``set``, ``remove``): ``action`` is ``set`` (``key`` and
    ``value``; an existing key is changed) or ``remove`` (``key``). The API validates the rest."""
    action, key = form.get("action", ""), form.get("key", "").strip()
    if not key:
        raise InvalidInput("a tag needs a key")
    if action == "set":
        return {key: form.get("value", "")}, []
    if action == "remove":
        return {}, [key]
    raise InvalidInput(f"the tag form's action must be set or remove, not {action!r}")


def proxy_entry(device_id: str, port: str) -> str:
    """The device web UI's entry URL (ADR 0018) for a port typed into the form."""
    text = port.strip()
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise InvalidInput(f"the device's web UI needs a port number (1-65535), not {port!r}")
    return f"/devices/{device_id}/proxy/{int(text)}/"


# --- deployment history ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentRow:
    id: str
    artifact: str
    kind: str
    status: str
    step: str
    reason: str
    running_version: str
    rollout_id: str | None
    created_at: float
    created_by: str
    updated_at: float


async def deployment_history(db: AsyncSession, device_id: str, limit: int = HISTORY_SHOWN) -> list[DeploymentRow]:
    """The deployments that included the device, newest first, with its own status in each (and
    the rollout that made it, if one did)."""
    stmt = (select(Deployment, Artifact, DeploymentDevice, Rollout.id)
            .join(DeploymentDevice, DeploymentDevice.deployment_id == Deployment.id)
            .join(Artifact, Artifact.id == Deployment.artifact_id)
            .outerjoin(Rollout, Rollout.deployment_id == Deployment.id)
            .where(DeploymentDevice.device_id == device_id)
            .order_by(Deployment.created_at.desc(), Deployment.id.desc()).limit(limit))
    return [DeploymentRow(id=d.id, artifact=f"{a.name}@{a.version}", kind=a.kind, status=dd.status, step=dd.step,
                          reason=dd.reason, running_version=dd.running_version, rollout_id=rollout_id,
                          created_at=d.created_at, created_by=d.created_by, updated_at=dd.updated_at)
            for d, a, dd, rollout_id in (await db.execute(stmt)).all()]
