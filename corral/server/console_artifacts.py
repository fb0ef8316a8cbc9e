"""The console's artifacts pages (issue 7; docs/console.md): the list, an artifact's page, upload
and delete, so a release can be uploaded and rolled out entirely from the browser.

Reads go through the REST API's own route functions (``api.artifacts.list_artifacts``,
``show_artifact``), called server-side with the signed-in principal; delete calls
``api.artifacts.delete_artifact`` (checked, audited and refused exactly as ``corral artifact
delete``: an artifact a deployment still uses is refused with its reason, shown on the page).

The upload is not a console form: ``static/artifacts.js`` streams the file (after the SBOM's bytes,
if any) as the raw body of ``POST /api/v1/artifacts`` with the cookie and the page's CSRF token,
as ``corral artifact upload`` does with its bearer token; the API's refusals are shown beside
the form. Who may do what is the API's: operators and admins upload and delete, viewers read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select

from corral.errors import Conflict
from corral.server.api import artifacts as api_artifacts
from corral.server.api.deps import Ctx, PageParams, decode_cursor
from corral.server.api.errors import status_for
from corral.server.auth import Principal
from corral.server.console import ConsoleRoute, Who, form_principal, read_form, render, require_role
from corral.server.console_updates_forms import counts_text
from corral.server.context import ServerContext
from corral.server.store.models import Deployment, Rollout, RolloutDevice
from corral.server.updates import artifacts, deployments

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

ARTIFACTS_PER_PAGE = 25
#: components listed on an artifact's page (after the search): a narrower search shows the rest
COMPONENTS_SHOWN = 500
#: deployments and rollouts listed on an artifact's page, newest first
USES_SHOWN = 50


def ref_path(name: str, version: str) -> str:
    return f"/artifacts/{quote(name, safe='')}/{quote(version, safe='')}"


def list_row(a: api_artifacts.ArtifactOut) -> dict[str, Any]:
    ref = f"{a.name}@{a.version}"
    return {"a": a, "ref": ref, "href": ref_path(a.name, a.version), "row_id": "artifact-" + ref_id(ref),
            "rollout_href": "/rollouts/new?artifact=" + quote(ref, safe="")}


def ref_id(ref: str) -> str:
    """An element id for NAME@VERSION (names and versions are ``[A-Za-z0-9._+~-]``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in ref)


def matches(c: api_artifacts.ComponentOut, search: str) -> bool:
    """A component matches a search when its name, version or purl contains it (any case)."""
    needle = search.strip().lower()
    return not needle or any(needle in (v or "").lower() for v in (c.name, c.version, c.purl))


@dataclass(frozen=True)
class Use:
    """A deployment of the artifact, and the rollout that made it, if one did."""

    deployment_id: str
    created_at: float
    created_by: str
    counts: str
    rollout_id: str | None
    rollout_status: str | None


async def uses_of(ctx: ServerContext, name: str, version: str) -> list[Use]:
    """The deployments (and their rollouts) that used the artifact, newest first: what keeps a
    delete from happening."""
    async with ctx.reader() as db:
        a = await artifacts.get(db, name, version)
        rows = (await db.execute(
            select(Deployment, Rollout.id, Rollout.status).outerjoin(Rollout, Rollout.deployment_id == Deployment.id)
            .where(Deployment.artifact_id == a.id).order_by(Deployment.created_at.desc()).limit(USES_SHOWN))).all()
        counts = await deployments.counts(db, [d.id for d, r, _ in rows if r is None])
        by_rollout: dict[str, dict[str, int]] = {}
        # a rollout's devices by its own states (a device it skipped was never told)
        for rollout_id, state, n in (await db.execute(
                select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
                .where(RolloutDevice.rollout_id.in_([r for _, r, _ in rows if r is not None]))
                .group_by(RolloutDevice.rollout_id, RolloutDevice.state))).all():
            by_rollout.setdefault(rollout_id, {})[state] = int(n)
    return [Use(d.id, d.created_at, d.created_by, counts_text(by_rollout.get(r, {}) if r else counts.get(d.id, {})),
                r, status) for d, r, status in rows]


# --- the list -------------------------------------------------------------------------------------


async def artifacts_page_response(request: Request, ctx: ServerContext, who: Principal, cursor: str | None,
                                  error: str = "", status: int = 200) -> Response:
    page = await api_artifacts.list_artifacts(
        request, ctx, who, PageParams(ARTIFACTS_PER_PAGE, decode_cursor(cursor) if cursor else None),
        name=None, kind=None)
    u = ctx.config.updates
    return render(request, "artifacts.html", who, status=status, rows=[list_row(a) for a in page.items],
                  next_cursor=page.next_cursor, first_page=not cursor, may_upload=who.has_role("operator"),
                  may_roll_out=who.has_role("operator"), kinds=artifacts.KINDS, max_bytes=u.max_artifact_bytes,
                  max_sbom_bytes=u.max_sbom_bytes, error=error)


@router.get("/artifacts")
async def artifacts_page(request: Request, ctx: Ctx, who: Who,
                         cursor: Annotated[str | None, Query(max_length=512)] = None) -> Response:
    return await artifacts_page_response(request, ctx, who, cursor)


# --- one artifact -----------------------------------------------------------------------------------


async def artifact_page_response(request: Request, ctx: ServerContext, who: Principal, name: str, version: str,
                                 search: str = "", error: str = "", status: int = 200) -> Response:
    a = await api_artifacts.show_artifact(name, version, request, ctx, who)
    found = [c for c in a.components or [] if matches(c, search)]
    return render(request, "artifact.html", who, status=status, a=a, row=list_row(a), search=search,
                  components=found[:COMPONENTS_SHOWN], found=len(found), uses=await uses_of(ctx, a.name, a.version),
                  uses_shown=USES_SHOWN, may_delete=who.has_role("operator"), may_roll_out=who.has_role("operator"),
                  error=error)


@router.get("/artifacts/{name}/{version}")
async def artifact_page(request: Request, ctx: Ctx, who: Who, name: str, version: str,
                        q: Annotated[str, Query(max_length=200)] = "") -> Response:
    return await artifact_page_response(request, ctx, who, name[:64], version[:64], q)


@router.post("/artifacts/{name}/{version}/delete")
async def artifact_delete(request: Request, ctx: Ctx, name: str, version: str) -> Response:
    """Delete, through the API's own function: a refusal (a deployment still uses it) is shown
    on the artifact's page beside the button."""
    form = await read_form(request)
    who = await form_principal(request, ctx, form)
    require_role(who, "operator", "deleting an artifact")
    name, version = name[:64], version[:64]
    try:
        await api_artifacts.delete_artifact(name, version, request, ctx, who)
    except Conflict as e:
        return await artifact_page_response(request, ctx, who, name, version, error=e.detail, status=status_for(e))
    return RedirectResponse("/artifacts", status_code=303)
