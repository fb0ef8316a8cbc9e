"""The artifact store: uploads streamed to disk, content-addressed files, rows, and their targets.

An upload, step by step (:func:`receive`, then :func:`store`):

1. The request's fields are checked (:func:`validate`) and NAME@VERSION must be new — before a
   byte of the body is read, so a mistake costs no transfer.
2. The body streams into a temporary file in the artifact folder (``.upload-*``), its sha256
   computed on the way; more than ``max_artifact_bytes`` stops it with 413. An SBOM, when there is
   one, is the first ``sbom_size`` bytes of the body (so one request carries both, still streamed)
   and is parsed (:mod:`corral.server.updates.sbom`) before anything is stored.
3. In one write transaction under the repository lock: NAME@VERSION is checked again, the file
   is renamed to ``ARTIFACT_DIR/SHA256`` (two artifacts with the same bytes share it), the rows
   are inserted, a new TUF targets version listing it is signed, and the audit entry written.

Any failure removes the temporary file and leaves no row, no metadata version and no stored file
that no artifact references (:func:`collect`). Deleting an artifact removes its target from
the TUF metadata (a new version) and, once no artifact references them, its bytes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from corral.fileio import fsync_dir
from corral.server.auth import Principal
from corral.server.context import ServerContext
from corral.server.store.models import Artifact, ArtifactComponent
from corral.server.updates import tuf_repo
from corral.server.updates.sbom import Sbom

log = logging.getLogger(__name__)

KINDS = ("app", "rootfs", "script", "agent")
MAX_HARDWARE = 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# a version is numbers separated by dots, optionally after a "v", optionally followed by a
# pre-release/build suffix: 1.2.0, v2, 2024.05.1, 1.2.0-rc.1, 1.2.0+build.7, 3.1~beta
_VERSION = re.compile(r"^v?[0-9]+(\.[0-9]+)*([-+~][0-9A-Za-z][0-9A-Za-z.+~-]*)?$")
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_COMMIT = re.compile(r"^[0-9a-f]{7,64}$")
#: an ``.upload-*`` file untouched this long is left from a server that died mid-upload
STALE_UPLOAD_SECONDS = 3600.0
#: bytes gathered before a write to the temporary file (each write is a hop to a thread)
WRITE_CHUNK = 1 << 20


@dataclass(frozen=True)
class Spec:
    """What an upload says about its artifact, validated."""

    name: str
    version: str
    kind: str
    hardware: list[str]
    filename: str
    git_commit: str | None
    build_url: str | None
    build_time: float | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def target_path(self) -> str:
        """Its TUF target name; the device downloads it by this name (ADR 0011)."""
        return f"{self.name}/{self.version}/{self.filename}"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(f"name {name!r} is not valid: 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def check_version(version: str) -> str:
    if len(version) > 64 or not _VERSION.match(version):
        raise InvalidInput(f"version {version!r} is not valid: numbers separated by dots (1.2.0, v2, "
                           "2024.05.1), optionally with a suffix after -, + or ~ (1.2.0-rc.1); at most 64 characters")
    return version


def validate(name: str, version: str, kind: str, hardware: list[str], filename: str | None,
             git_commit: str | None, build_url: str | None, build_time: str | None) -> Spec:
    check_name(name)
    check_version(version)
    if kind not in KINDS:
        raise InvalidInput(f"kind {kind!r} is not valid: one of {', '.join(KINDS)}")
    if len(hardware) > MAX_HARDWARE:
        raise InvalidInput(f"at most {MAX_HARDWARE} hardware models")
    for hw in hardware:
        if not _NAME.match(hw):
            raise InvalidInput(f"hardware {hw!r} is not valid: 1-64 letters, digits, '.', '_' or '-'")
    filename = filename or f"{name}-{version}"
    if not _FILENAME.match(filename) or ".." in filename:
        raise InvalidInput(f"filename {filename!r} is not valid: 1-128 letters, digits, '.', '_', '+' or '-'")
    if git_commit is not None:
        git_commit = git_commit.lower()
        if not _COMMIT.match(git_commit):
            raise InvalidInput(f"commit {git_commit!r} is not a git commit id (7-64 hex digits)")
    if build_url is not None and (len(build_url) > 2048 or not re.match(r"^https?://[^\s/]+", build_url)):
        raise InvalidInput("build_url must be an http:// or https:// URL of at most 2048 characters")
    return Spec(name=name, version=version, kind=kind, hardware=sorted(set(hardware)), filename=filename,
                git_commit=git_commit, build_url=build_url, build_time=parse_time(build_time))


def parse_time(value: str | None) -> float | None:
    """ISO 8601 (``2026-11-30T12:00:00Z``); without a zone it is UTC."""
    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError as e:
        raise InvalidInput(f"build_time {value!r} is not an ISO 8601 time (e.g. 2026-11-30T12:00:00Z)") from e
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


# --- receiving the body -------------------------------------------------------------------------


@dataclass
class Received:
    """An upload's bytes on disk (not yet stored) and its SBOM's bytes."""

    tmp: Path
    sha256: str
    size: int
    sbom: bytes

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def _write(f: IO[bytes], h: Any, data: bytes) -> None:
    h.update(data)
    f.write(data)


def _close(f: IO[bytes], fsync: bool) -> None:
    try:
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    finally:
        f.close()


async def receive(body: AsyncIterator[bytes], artifact_dir: Path, sbom_size: int, max_bytes: int) -> Received:
    """Stream ``body`` (the SBOM's ``sbom_size`` bytes, then the artifact's) to a temporary file
    in ``artifact_dir`` (made by ``corral server init``)."""
    fd, name = tempfile.mkstemp(dir=artifact_dir, prefix=".upload-")
    f = os.fdopen(fd, "wb")
    h = hashlib.sha256()
    sbom, pending = bytearray(), bytearray()
    size = 0
    ok = False
    try:
        async for chunk in body:
            if len(sbom) < sbom_size:
                take = sbom_size - len(sbom)
                sbom += chunk[:take]
                chunk = chunk[take:]
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"the artifact is larger than {max_bytes} bytes (max_artifact_bytes)")
            pending += chunk
            if len(pending) >= WRITE_CHUNK:
                await asyncio.to_thread(_write, f, h, bytes(pending))
                pending.clear()
        if len(sbom) < sbom_size:
            raise InvalidInput(f"the body ended after {len(sbom)} bytes, inside the SBOM (sbom_size={sbom_size})")
        if size == 0:
            raise InvalidInput("the artifact is empty")
        await asyncio.to_thread(_write, f, h, bytes(pending))
        await asyncio.to_thread(_close, f, True)
        ok = True
    finally:
        if not ok:
            _close(f, False)
            os.unlink(name)
    return Received(tmp=Path(name), sha256=h.hexdigest(), size=size, sbom=bytes(sbom))


def remove_stale_uploads(artifact_dir: Path, now: float) -> int:
    """Delete temporary files of uploads that were cut off by a crash (at startup). Another
    replica's upload in progress keeps its file's mtime fresh, so it is not touched."""
    removed = 0
    for path in artifact_dir.glob(".upload-*"):
        try:
            if now - path.stat().st_mtime > STALE_UPLOAD_SECONDS:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


# --- rows ----------------------------------------------------------------------------------------


async def find(db: AsyncSession, name: str, version: str) -> Artifact | None:
    return await db.scalar(select(Artifact).where(Artifact.name == name, Artifact.version == version))


async def get(db: AsyncSession, name: str, version: str) -> Artifact:
    a = await find(db, name, version)
    if a is None:
        raise NotFound(f"no artifact {name}@{version}")
    return a


async def check_new(db: AsyncSession, spec: Spec) -> None:
    if await find(db, spec.name, spec.version) is not None:
        raise Conflict(f"artifact {spec.ref} exists: a version is uploaded once (delete it first, or bump it)")


async def deployments_referencing(db: AsyncSession, artifact: Artifact) -> list[str]:
    """Ids of deployments (later: rollouts) that still need ``artifact``; a delete is refused
    while there are any. A deployment keeps its artifact for its history (delete the deployment
    first), as ``deployments.artifact_id`` is a restricting foreign key."""
    from corral.server.updates import deployments  # imports this module

    return await deployments.referencing(db, artifact.id)


def blob_path(artifact_dir: Path, sha256: str) -> Path:
    return artifact_dir / sha256


async def store(ctx: ServerContext, who: Principal, spec: Spec, received: Received, sbom: Sbom | None,
                request_id: str) -> Artifact:
    """Make an uploaded artifact real: file, rows, signed target, audit entry; all or nothing."""
    artifact_dir = ctx.config.artifact_dir
    now = time.time()
    try:
        async with ctx.writer() as db:
            await tuf_repo.lock(db)
            await check_new(db, spec)
            os.replace(received.tmp, blob_path(artifact_dir, received.sha256))
            fsync_dir(artifact_dir)
            a = Artifact(name=spec.name, version=spec.version, kind=spec.kind, hardware=spec.hardware,
                         filename=spec.filename, target_path=spec.target_path, sha256=received.sha256,
                         size=received.size, git_commit=spec.git_commit, build_url=spec.build_url,
                         build_time=spec.build_time, sbom_format=sbom.format if sbom else None,
                         created_at=now, created_by=who.name)
            db.add(a)
            await db.flush()
            if sbom and sbom.components:
                await db.execute(insert(ArtifactComponent), [
                    {"artifact_id": a.id, "idx": i, "key": c.name.lower(), "name": c.name, "version": c.version,
                     "purl": c.purl, "type": c.type} for i, c in enumerate(sbom.components)])
            version = await tuf_repo.add_target(
                db, ctx.tuf, ctx.config.updates, now, spec.target_path, received.size, received.sha256,
                {"name": spec.name, "version": spec.version, "kind": spec.kind, "hardware": spec.hardware})
            await ctx.audit(db, who, "artifact.upload", spec.ref,
                            {"kind": spec.kind, "sha256": received.sha256, "size": received.size,
                             "git_commit": spec.git_commit, "sbom": a.sbom_format, "targets_version": version},
                            request_id)
    except BaseException:
        received.discard()
        await asyncio.shield(collect(ctx, received.sha256))
        raise
    return a


async def delete(ctx: ServerContext, who: Principal, name: str, version: str, request_id: str) -> Artifact:
    async with ctx.writer() as db:
        await tuf_repo.lock(db)
        a = await get(db, name, version)
        users = await deployments_referencing(db, a)
        if users:
            raise Conflict(f"artifact {name}@{version} is used by {', '.join(users[:5])}: finish or delete those first")
        await db.delete(a)  # its components go with it (ON DELETE CASCADE)
        targets_version = await tuf_repo.remove_target(db, ctx.tuf, ctx.config.updates, time.time(), a.target_path)
        await ctx.audit(db, who, "artifact.delete", f"{name}@{version}",
                        {"sha256": a.sha256, "targets_version": targets_version}, request_id)
    await collect(ctx, a.sha256)
    return a


async def collect(ctx: ServerContext, sha256: str) -> None:
    """Remove the stored file of ``sha256`` unless an artifact references it. Under the
    repository lock, so that an upload of the same bytes cannot slip in between."""
    try:
        async with ctx.writer() as db:
            await tuf_repo.lock(db)
            used = await db.scalar(select(func.count()).select_from(Artifact).where(Artifact.sha256 == sha256))
            if not used:
                blob_path(ctx.config.artifact_dir, sha256).unlink(missing_ok=True)
    except Exception:  # a leftover file is harmless; the next upload or delete of it tries again
        log.exception("could not remove the unreferenced artifact file %s", sha256)


async def components(ctx: ServerContext, artifact_id: int) -> list[ArtifactComponent]:
    async with ctx.reader() as db:
        return list((await db.scalars(select(ArtifactComponent).where(ArtifactComponent.artifact_id == artifact_id)
                                      .order_by(ArtifactComponent.idx))).all())
