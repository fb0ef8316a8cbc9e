"""Deltas between two versions of an artifact, built by the server and served as TUF targets.

A device running ``NAME@BASE`` that is to install ``NAME@VERSION`` downloads the delta
``NAME/VERSION/delta-from-BASE`` instead of the full artifact, when there is one: built by
:func:`build` from the two stored files (:mod:`corral.delta`, ADR 0014), it is a TUF target of
its own, signed like an artifact, so ``corral tuf-client`` verifies the delta it downloads; the
device then rebuilds the image and checks it against the *full artifact's* sha256 and length
from the same signed metadata (:func:`corral.delta.apply_file`). Any other device gets the full
artifact.

Storage. A delta's bytes live in ``ARTIFACT_DIR/deltas/SHA256`` (content-addressed, like the
artifacts beside them, but in their own folder: no artifact row references them, so
:func:`corral.server.updates.artifacts.collect` never sees them). What a delta is for lives only
in the signed targets metadata, in the target's ``custom``::

    {"name", "version", "kind", "hardware",          # as the full artifact's
     "delta": {"format": 1, "base_version", "base_sha256", "target_sha256", "target_length"}}

so there is no table to migrate, and every replica that reads the metadata sees the same deltas.

When to build: when a deployment of ``NAME@VERSION`` is created, once for each version its
devices run (``await build(ctx, name, version, base)`` for each; it is idempotent and returns
``None`` when a delta would not pay: same bytes, or a delta over ``max_ratio`` of the full
artifact). Building reads both files and writes the delta on a thread; a 256 MiB image with 2 %
of its blocks changed takes a few seconds (``docs/benchmarks.md``, bench ``delta``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from tuf.api.metadata import Metadata, Targets

from corral import delta as delta_format
from corral.errors import InvalidInput
from corral.fileio import create_temp, fsync_dir
from corral.server.context import ServerContext
from corral.server.updates import artifacts, tuf_repo

log = logging.getLogger(__name__)

#: a delta's TUF name is ``NAME/VERSION/delta-from-BASEVERSION``
PREFIX = "delta-from-"
#: a delta larger than this share of the full artifact is not published: the full one will do
DEFAULT_MAX_RATIO = 0.5


@dataclass(frozen=True)
class DeltaTarget:
    """A published delta: what the deployment layer hands a device."""

    target_path: str
    sha256: str
    length: int
    name: str
    version: str
    base_version: str
    base_sha256: str
    target_sha256: str
    target_length: int

    @property
    def url_path(self) -> str:
        """Where it is served under the targets base URL (consistent snapshots)."""
        return tuf_repo.target_url_path(self.target_path, self.sha256)


def target_path(name: str, version: str, base_version: str) -> str:
    return f"{name}/{version}/{PREFIX}{base_version}"


def delta_dir(artifact_dir: Path) -> Path:
    return artifact_dir / "deltas"


def served_blob(artifact_dir: Path, sha256: str, filename: str) -> Path | None:
    """The file to serve for a target ``NAME/VERSION/SHA256.FILENAME`` that is no artifact: a
    delta's, when ``FILENAME`` names one and the file exists. Content-addressed, so the bytes are
    those of ``sha256`` whatever the rest of the path says (the device's TUF client checks that
    the path and hash are a signed target). The hook for ``corral.server.api.tuf.target``."""
    if not filename.startswith(PREFIX) or len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        return None
    path = delta_dir(artifact_dir) / sha256
    return path if path.is_file() else None


# --- building ---------------------------------------------------------------------------------


def build_file(base: Path, target: Path, out_dir: Path, level: int = delta_format.DEFAULT_LEVEL,
               ) -> tuple[str, delta_format.DeltaInfo]:
    """Build the delta from the file ``base`` to ``target`` into ``out_dir/SHA256`` (written to
    a temporary file, fsync'd, renamed); returns its sha256 and what the build reports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for left in out_dir.glob(".build.*.tmp"):  # from a server that died mid-build
        with contextlib.suppress(OSError):
            if time.time() - left.stat().st_mtime > artifacts.STALE_UPLOAD_SECONDS:
                left.unlink()
    fd, tmp = create_temp(out_dir / "build")
    try:
        with os.fdopen(fd, "wb") as out, base.open("rb") as b, target.open("rb") as t:
            info = delta_format.build_delta(b, t, out, level=level)
            out.flush()
            os.fsync(out.fileno())
        h = hashlib.sha256()
        with tmp.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        sha256 = h.hexdigest()
        os.replace(tmp, out_dir / sha256)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_dir)
    return sha256, info


async def _targets(db: AsyncSession) -> Targets:
    version = (await tuf_repo.versions(db))[tuf_repo.TARGETS]["version"]
    md: Metadata[Targets] = Metadata.from_bytes(await tuf_repo.metadata_file(db, f"{version}.targets.json"))
    return md.signed


def _from_target(path: str, length: int, sha256: str, custom: dict[str, Any]) -> DeltaTarget | None:
    d = custom.get("delta")
    if not isinstance(d, dict):
        return None
    return DeltaTarget(path, sha256, length, str(custom.get("name")), str(custom.get("version")),
                       str(d["base_version"]), str(d["base_sha256"]), str(d["target_sha256"]),
                       int(d["target_length"]))


async def published(db: AsyncSession, name: str | None = None) -> list[DeltaTarget]:
    """The deltas the signed targets list (of artifact ``name``, or all)."""
    out = []
    for path, t in (await _targets(db)).targets.items():
        custom = t.unrecognized_fields.get("custom") or {}
        if name is not None and custom.get("name") != name:
            continue
        d = _from_target(path, t.length, t.hashes[tuf_repo.HASH], custom)
        if d is not None:
            out.append(d)
    return out


async def find(db: AsyncSession, name: str, version: str, base_version: str) -> DeltaTarget | None:
    """The published delta to ``name@version`` from ``base_version``: what a device running
    ``base_version`` should download instead of the full artifact. ``None``: the full one."""
    path = target_path(name, version, base_version)
    t = (await _targets(db)).targets.get(path)
    if t is None:
        return None
    return _from_target(path, t.length, t.hashes[tuf_repo.HASH], t.unrecognized_fields.get("custom") or {})


async def build(ctx: ServerContext, name: str, version: str, base_version: str, *,
                level: int = delta_format.DEFAULT_LEVEL, max_ratio: float = DEFAULT_MAX_RATIO) -> DeltaTarget | None:
    """Build and publish the delta to ``name@version`` from ``name@base_version`` (idempotent:
    an existing one is returned). ``None`` when a delta would not pay: the two versions have
    the same bytes, or the delta is over ``max_ratio`` of the full artifact."""
    if version == base_version:
        raise InvalidInput(f"a delta of {name}@{version} from itself")
    async with ctx.reader() as db:
        new = await artifacts.get(db, name, version)
        old = await artifacts.get(db, name, base_version)
        existing = await find(db, name, version, base_version)
    if existing is not None and existing.target_sha256 == new.sha256 and existing.base_sha256 == old.sha256:
        return existing
    if new.sha256 == old.sha256:
        return None
    artifact_dir = ctx.config.artifact_dir
    out_dir = delta_dir(artifact_dir)
    t0 = time.monotonic()
    sha256, info = await asyncio.to_thread(build_file, artifacts.blob_path(artifact_dir, old.sha256),
                                           artifacts.blob_path(artifact_dir, new.sha256), out_dir, level)
    log.info("delta %s@%s from %s: %d bytes (%.1f %% of %d) in %.1f s", name, version, base_version,
             info.delta_length, 100 * info.delta_length / max(new.size, 1), new.size, time.monotonic() - t0)
    if info.target_sha256 != new.sha256 or info.base_sha256 != old.sha256:
        (out_dir / sha256).unlink(missing_ok=True)
        raise InvalidInput(f"the stored files of {name}@{version} or @{base_version} do not match their sha256")
    if info.delta_length > max_ratio * new.size:
        await _remove_unused(ctx, sha256)
        return None
    path = target_path(name, version, base_version)
    custom = {"name": name, "version": version, "kind": new.kind, "hardware": new.hardware,
              "delta": {"format": delta_format.VERSION, "base_version": base_version, "base_sha256": old.sha256,
                        "target_sha256": new.sha256, "target_length": new.size}}
    async with ctx.writer() as db:
        await tuf_repo.lock(db)
        # deleted (or replaced) while we built: publish nothing
        new_now = await artifacts.get(db, name, version)
        old_now = await artifacts.get(db, name, base_version)
        if (new_now.sha256, old_now.sha256) != (new.sha256, old.sha256):
            raise InvalidInput(f"{name}@{version} or @{base_version} changed while its delta was built")
        current = await find(db, name, version, base_version)
        if current is not None:  # another replica published it meanwhile (the same bytes)
            return current
        await tuf_repo.add_target(db, ctx.tuf, ctx.config.updates, time.time(), path, info.delta_length,
                                  sha256, custom)
    return DeltaTarget(path, sha256, info.delta_length, name, version, base_version, old.sha256, new.sha256,
                       new.size)


async def withdraw(ctx: ServerContext, name: str, version: str) -> list[str]:
    """Remove every delta to or from ``name@version`` from the signed targets and their files:
    for when the artifact is deleted (call it before :func:`artifacts.delete`). Returns their
    target paths."""
    async with ctx.writer() as db:
        await tuf_repo.lock(db)
        gone = [d for d in await published(db, name) if version in (d.version, d.base_version)]
        for d in gone:
            await tuf_repo.remove_target(db, ctx.tuf, ctx.config.updates, time.time(), d.target_path)
    for d in gone:
        await _remove_unused(ctx, d.sha256)
    return [d.target_path for d in gone]


async def _remove_unused(ctx: ServerContext, sha256: str) -> None:
    """Remove a delta's file unless a published delta has those bytes (under the lock)."""
    async with ctx.writer() as db:
        await tuf_repo.lock(db)
        if not any(d.sha256 == sha256 for d in await published(db)):
            (delta_dir(ctx.config.artifact_dir) / sha256).unlink(missing_ok=True)
