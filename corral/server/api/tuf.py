"""The TUF repository over HTTP.

Device surface (``/device/v1/tuf``), what ``corral tuf-client`` fetches (ADR 0010):

- ``GET /device/v1/tuf/metadata/timestamp.json`` and ``.../N.{root,targets,snapshot}.json``
- ``GET /device/v1/tuf/targets/NAME/VERSION/SHA256.FILENAME``: the artifact's bytes, streamed
  from disk, with ``Range`` (206 + ``Content-Range``; 416 past the end) and no content encoding.

These need no credentials for now (ADR 0011): TUF makes what a device installs independent of
the transport, and :func:`device_download_auth` is the one place where a device credential will
be checked when artifacts need to be confidential.

Management (``/api/v1/tuf``): the trusted root to provision devices with, and each role's
current version and expiry.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import select

from corral.errors import NotFound
from corral.server.api.deps import Ctx, Viewer
from corral.server.api.views import iso
from corral.server.store.models import Artifact
from corral.server.updates import artifacts, deltas, tuf_repo

log = logging.getLogger(__name__)

router = APIRouter(tags=["tuf"])
device_router = APIRouter(prefix="/device/v1/tuf", tags=["device"])

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
METADATA_PATH = "/device/v1/tuf/metadata"
TARGETS_PATH = "/device/v1/tuf/targets"


def device_urls(request: Request) -> tuple[str, str]:
    """The metadata and target base URLs for ``corral tuf-client``, as this request reached us."""
    base = str(request.base_url).rstrip("/")
    return base + METADATA_PATH, base + TARGETS_PATH


async def device_download_auth(request: Request) -> None:
    """SEAM (ADR 0011): who may fetch metadata and targets. Open for now; when artifacts must
    be confidential, check a short-lived device token here (``Authorization: Bearer``, which
    ``corral tuf-client`` already sends from ``CORRAL_TUF_TOKEN``) and nowhere else."""
    return None


DeviceDownload = Annotated[None, Depends(device_download_auth)]


@device_router.api_route("/metadata/{name}", methods=["GET", "HEAD"], summary="TUF metadata, as the client names it")
async def metadata(name: str, ctx: Ctx, _: DeviceDownload) -> Response:
    async with ctx.reader() as db:
        data = await tuf_repo.metadata_file(db, name)
    # a versioned file never changes; timestamp.json changes with every publish
    cache = "no-cache" if name == "timestamp.json" else "public, max-age=31536000, immutable"
    return Response(data, media_type="application/json", headers={"Cache-Control": cache})


@device_router.api_route("/targets/{path:path}", methods=["GET", "HEAD"],
                         summary="A target's bytes at NAME/VERSION/SHA256.FILENAME (Range supported)")
async def target(path: str, ctx: Ctx, _: DeviceDownload) -> FileResponse:
    parent, sep, base = path.rpartition("/")
    sha256, _dot, filename = base.partition(".")
    if not _SHA256.match(sha256) or not filename:
        raise NotFound(f"no target {path!r}")
    async with ctx.reader() as db:
        found = await db.scalar(select(Artifact.id).where(Artifact.target_path == f"{parent}{sep}{filename}",
                                                          Artifact.sha256 == sha256))
    blob = artifacts.blob_path(ctx.config.artifact_dir, sha256)
    if found is None:
        # HOOK (deltas, ADR 0014): NAME/VERSION/SHA256.delta-from-BASE is a delta's file
        delta_blob = deltas.served_blob(ctx.config.artifact_dir, sha256, filename)
        if delta_blob is None:
            raise NotFound(f"no target {path!r}")
        blob = delta_blob
    if not blob.is_file():
        log.error("artifact file %s is missing from %s", sha256, ctx.config.artifact_dir)
        raise NotFound(f"no target {path!r}")
    # Starlette answers Range itself (206/416), streaming the file in chunks
    return FileResponse(blob, media_type="application/octet-stream", headers={"Cache-Control": "no-cache"})


@router.get("/tuf/root.json", summary="The trusted root metadata, to provision devices with (newest by default)")
async def trusted_root(ctx: Ctx, _: Viewer,
                       version: Annotated[int | None, Query(ge=1, description="a given root version")] = None,
                       ) -> Response:
    async with ctx.reader() as db:
        data = await tuf_repo.root_file(db, version)
    return Response(data, media_type="application/json")


@router.get("/tuf", summary="The repository's roles: current version and expiry of each")
async def status(request: Request, ctx: Ctx, _: Viewer) -> dict[str, Any]:
    async with ctx.reader() as db:
        roles = await tuf_repo.versions(db)
    metadata_url, target_base_url = device_urls(request)
    return {"roles": {role: {"version": r["version"], "expires": iso(r["expires"])} for role, r in roles.items()},
            "root_key_online": ctx.tuf.root is not None,
            "metadata_url": metadata_url, "target_base_url": target_base_url}
