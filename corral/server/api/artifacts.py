"""Artifacts: streaming upload, list, show, delete, and the SBOM component query.

Upload is ``POST /api/v1/artifacts?name=N&version=V&kind=K[&hardware=H]...`` with the bytes as
the request body (``application/octet-stream``), streamed to disk: the body is not parsed as a
form, so a 2 GB rootfs costs 1 MiB of server memory. With an SBOM, the body is the SBOM's
``sbom_size`` bytes followed by the artifact's, e.g. with curl::

    cat sbom.json app.tar.zst | curl -T - -H 'Authorization: Bearer T' \\
      "$URL/api/v1/artifacts?name=demo&version=1.2.0&kind=app&filename=app.tar.zst&sbom_size=$(stat -c%s sbom.json)"

Roles: operators upload and delete, viewers read. Upload and delete are audited.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.requests import ClientDisconnect

from corral.errors import InvalidInput, PayloadTooLarge
from corral.server.api.deps import Ctx, Operator, Paging, Viewer, encode_cursor, rid
from corral.server.api.tuf import device_urls
from corral.server.api.views import iso
from corral.server.store.models import Artifact, ArtifactComponent
from corral.server.updates import artifacts, deltas, sbom, tuf_repo

router = APIRouter(tags=["artifacts"])


class Provenance(BaseModel):
    git_commit: str | None
    build_url: str | None
    build_time: str | None


class SbomInfo(BaseModel):
    format: str = Field(description='e.g. "CycloneDX 1.5" or "SPDX-2.3"')
    components: int


class ComponentOut(BaseModel):
    name: str
    version: str | None
    purl: str | None
    type: str | None


class TufTarget(BaseModel):
    """How a device fetches this artifact with ``corral tuf-client`` (ADR 0010/0011)."""

    target_name: str = Field(description="the TUF target path (--target-name)")
    target_url_path: str = Field(description="where the bytes are served, under target_base_url")
    metadata_url: str = Field(description="--metadata-url")
    target_base_url: str = Field(description="--target-base-url")


class ArtifactOut(BaseModel):
    name: str
    version: str
    kind: str
    hardware: list[str]
    filename: str
    size: int
    sha256: str
    provenance: Provenance
    sbom: SbomInfo | None
    tuf: TufTarget
    created_at: str | None
    created_by: str
    components: list[ComponentOut] | None = Field(default=None, description="SBOM components (show only)")


class ArtifactPage(BaseModel):
    items: list[ArtifactOut]
    next_cursor: str | None = None


class ComponentMatch(BaseModel):
    artifact: str = Field(description="NAME@VERSION")
    kind: str
    sha256: str
    component: ComponentOut


class ComponentPage(BaseModel):
    items: list[ComponentMatch]
    next_cursor: str | None = None


def component_view(c: ArtifactComponent) -> ComponentOut:
    return ComponentOut(name=c.name, version=c.version, purl=c.purl, type=c.type)


def view(a: Artifact, request: Request, n_components: int,
         components: list[ArtifactComponent] | None = None) -> ArtifactOut:
    metadata_url, target_base_url = device_urls(request)
    return ArtifactOut(
        name=a.name, version=a.version, kind=a.kind, hardware=list(a.hardware or []), filename=a.filename,
        size=a.size, sha256=a.sha256,
        provenance=Provenance(git_commit=a.git_commit, build_url=a.build_url, build_time=iso(a.build_time)),
        sbom=SbomInfo(format=a.sbom_format, components=n_components) if a.sbom_format else None,
        tuf=TufTarget(target_name=a.target_path, target_url_path=tuf_repo.target_url_path(a.target_path, a.sha256),
                      metadata_url=metadata_url, target_base_url=target_base_url),
        created_at=iso(a.created_at), created_by=a.created_by,
        components=[component_view(c) for c in components] if components is not None else None)


@router.post("/artifacts", response_model=ArtifactOut, status_code=201,
             summary="Upload an artifact (the body is its bytes, after the SBOM's sbom_size bytes if any)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_artifact(
    request: Request, ctx: Ctx, who: Operator,
    name: Annotated[str, Query(description="artifact name, e.g. demo")],
    version: Annotated[str, Query(description="e.g. 1.2.0")],
    kind: Annotated[str, Query(description="app, rootfs, script or agent")],
    hardware: Annotated[list[str] | None, Query(description="compatible device model (repeat)")] = None,
    filename: Annotated[str | None, Query(description="file name devices store it under")] = None,
    commit: Annotated[str | None, Query(description="git commit it was built from")] = None,
    build_url: Annotated[str | None, Query(description="the CI job that built it")] = None,
    build_time: Annotated[str | None, Query(description="ISO 8601 build time")] = None,
    sbom_size: Annotated[int, Query(ge=0, description="the body starts with an SBOM of this many bytes")] = 0,
) -> ArtifactOut:
    u = ctx.config.updates
    spec = artifacts.validate(name, version, kind, hardware or [], filename, commit, build_url, build_time)
    if sbom_size > u.max_sbom_bytes:
        raise PayloadTooLarge(f"the SBOM is larger than {u.max_sbom_bytes} bytes (max_sbom_bytes)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) - sbom_size > u.max_artifact_bytes:
        raise PayloadTooLarge(f"the artifact is larger than {u.max_artifact_bytes} bytes (max_artifact_bytes)")
    if request.headers.get("content-type", "").startswith("multipart/"):
        raise InvalidInput("send the artifact as the raw request body (application/octet-stream), not as a form")
    async with ctx.reader() as db:
        await artifacts.check_new(db, spec)
    try:
        received = await artifacts.receive(request.stream(), ctx.config.artifact_dir, sbom_size,
                                           u.max_artifact_bytes)
    except ClientDisconnect:  # nothing was kept; nobody is left to answer
        raise InvalidInput("the client went away before the upload ended") from None
    try:
        parsed = sbom.parse(received.sbom, u.max_sbom_components) if sbom_size else None
    except BaseException:
        received.discard()
        raise
    a = await artifacts.store(ctx, who, spec, received, parsed, rid(request))
    return view(a, request, len(parsed.components) if parsed else 0)


async def _component_counts(ctx: Ctx, ids: list[int]) -> dict[int, int]:
    if not ids:
        return {}
    async with ctx.reader() as db:
        rows = await db.execute(select(ArtifactComponent.artifact_id, func.count())
                                .where(ArtifactComponent.artifact_id.in_(ids))
                                .group_by(ArtifactComponent.artifact_id))
        return {int(i): int(n) for i, n in rows.all()}


@router.get("/artifacts", response_model=ArtifactPage, summary="List artifacts, newest first")
async def list_artifacts(
    request: Request, ctx: Ctx, _: Viewer, paging: Paging,
    name: Annotated[str | None, Query(description="only this name")] = None,
    kind: Annotated[str | None, Query(description="only this kind")] = None,
) -> ArtifactPage:
    stmt = select(Artifact).order_by(Artifact.id.desc())
    if name is not None:
        stmt = stmt.where(Artifact.name == name)
    if kind is not None:
        if kind not in artifacts.KINDS:
            raise InvalidInput(f"kind {kind!r} is not valid: one of {', '.join(artifacts.KINDS)}")
        stmt = stmt.where(Artifact.kind == kind)
    if paging.cursor:
        stmt = stmt.where(Artifact.id < int(paging.cursor[0]))
    async with ctx.reader() as db:
        rows = list((await db.scalars(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    counts = await _component_counts(ctx, [a.id for a in rows])
    return ArtifactPage(items=[view(a, request, counts.get(a.id, 0)) for a in rows],
                        next_cursor=encode_cursor([rows[-1].id]) if more else None)


@router.get("/artifacts/components", response_model=ComponentPage,
            summary="Which artifacts contain a component (from their SBOMs)")
async def find_components(
    ctx: Ctx, _: Viewer, paging: Paging,
    name: Annotated[str, Query(min_length=1, description="component name (case-insensitive), e.g. openssl")],
    version: Annotated[str | None, Query(description="only this component version")] = None,
) -> ComponentPage:
    stmt = (select(ArtifactComponent, Artifact).join(Artifact, Artifact.id == ArtifactComponent.artifact_id)
            .where(ArtifactComponent.key == name.lower())
            .order_by(ArtifactComponent.artifact_id, ArtifactComponent.idx))
    if version is not None:
        stmt = stmt.where(ArtifactComponent.version == version)
    if paging.cursor:
        aid, idx = (int(x) for x in paging.cursor[:2])
        stmt = stmt.where((ArtifactComponent.artifact_id > aid)
                          | ((ArtifactComponent.artifact_id == aid) & (ArtifactComponent.idx > idx)))
    async with ctx.reader() as db:
        rows: list[Any] = list((await db.execute(stmt.limit(paging.limit + 1))).all())
    more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    items = [ComponentMatch(artifact=f"{a.name}@{a.version}", kind=a.kind, sha256=a.sha256,
                            component=component_view(c)) for c, a in rows]
    last = rows[-1][0] if rows else None
    return ComponentPage(items=items,
                         next_cursor=encode_cursor([last.artifact_id, last.idx]) if more and last else None)


@router.get("/artifacts/{name}/{version}", response_model=ArtifactOut,
            summary="Show an artifact: provenance, SBOM components, and how devices fetch it")
async def show_artifact(name: str, version: str, request: Request, ctx: Ctx, _: Viewer) -> ArtifactOut:
    async with ctx.reader() as db:
        a = await artifacts.get(db, name, version)
    comps = await artifacts.components(ctx, a.id)
    return view(a, request, len(comps), comps)


@router.delete("/artifacts/{name}/{version}", status_code=204,
               summary="Delete an artifact: its TUF target and its deltas' are withdrawn (new targets version)")
async def delete_artifact(name: str, version: str, request: Request, ctx: Ctx, who: Operator) -> Response:
    await artifacts.delete(ctx, who, name, version, rid(request))
    # after the artifact: a refused delete keeps its deltas. A delta left by a crash in between
    # is harmless: it is only offered while it rebuilds a stored artifact's exact bytes
    await deltas.withdraw(ctx, name, version)
    return Response(status_code=204)
