"""The server's TUF repository (python-tuf's Metadata API), ADR 0011.

Roles and keys
    The four top-level roles (root, targets, snapshot, timestamp), one Ed25519 key each,
    threshold 1. ``corral server init`` creates the keys as PEM (PKCS#8) files in
    ``DATA_DIR/secrets/tuf/ROLE.key`` (0600) and root version 1. targets, snapshot and timestamp
    are *online* keys: the server signs with them on every upload and delete, and re-signs
    before expiry. The root key signs only root: ``corral server export-root-key --out FILE
    --remove`` moves it off the server (offline root); the server then keeps working, but root
    is not re-signed (a warning is logged as its expiry nears) until the key is put back.

Where the metadata lives
    Every kept version of every role is a row of ``tuf_metadata`` (the exact bytes served), so
    all server replicas serve one repository, and an artifact's rows and the metadata that lists
    it are committed in one transaction: a target is never signed for bytes that were not
    stored, nor an artifact stored that is not signed. Publishing takes the repository lock
    (:func:`lock`: the process's write lock on SQLite, an advisory transaction lock on
    PostgreSQL), so concurrent uploads on any replica each get their own targets version and
    none loses another's target.

What is served (ADR 0010)
    Consistent snapshots: ``N.root.json`` (every version), ``N.targets.json``,
    ``N.snapshot.json`` (the newest ``keep_versions``), ``timestamp.json`` (the newest), and each
    target at ``NAME/VERSION/SHA256.FILENAME`` (:func:`target_url_path`).

Every function takes ``now`` (epoch seconds) so that expiry and re-signing run on a fake clock
in tests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]  # re-exported
from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from corral.errors import Conflict, CorralError, NotFound
from corral.server.config import Updates
from corral.server.secrets import write_secret_file
from corral.server.store.models import TufMetadata

log = logging.getLogger(__name__)

ROOT, TARGETS, SNAPSHOT, TIMESTAMP = Root.type, Targets.type, Snapshot.type, Timestamp.type
ROLES = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP)
ONLINE = (TARGETS, SNAPSHOT, TIMESTAMP)
THRESHOLD = 1
HASH = "sha256"  # the one hash of every target: its consistent-snapshot prefix and the blob's name

_VERSIONED = re.compile(r"^([1-9][0-9]{0,9})\.(root|targets|snapshot)\.json$")
_SERIALIZER = JSONSerializer(compact=True)


class TufError(CorralError):
    """The repository's keys or metadata are missing or do not fit together (a setup problem)."""


# --- keys ---------------------------------------------------------------------------------------


def key_dir(data_dir: Path) -> Path:
    return data_dir / "secrets" / "tuf"


def _key_path(data_dir: Path, role: str) -> Path:
    return key_dir(data_dir) / f"{role}.key"


def _load_signer(path: Path) -> CryptoSigner:
    try:
        return CryptoSigner(load_pem_private_key(path.read_bytes(), None))
    except (ValueError, TypeError) as e:
        raise TufError(f"{path} is not a PEM private key: {e}") from e


@dataclass(frozen=True)
class Keys:
    """The signers the server holds: every online role's, and root's unless it is offline."""

    online: dict[str, CryptoSigner]
    root: CryptoSigner | None

    @classmethod
    def load(cls, data_dir: Path) -> Keys:
        online = {}
        for role in ONLINE:
            path = _key_path(data_dir, role)
            if not path.exists():
                raise TufError(f"{path} is missing: run 'corral server init --data-dir {data_dir}'")
            online[role] = _load_signer(path)
        root = _key_path(data_dir, ROOT)
        return cls(online=online, root=_load_signer(root) if root.exists() else None)

    def signer(self, role: str) -> CryptoSigner:
        if role == ROOT:
            if self.root is None:
                raise TufError("the root key is offline: put it back in secrets/tuf/root.key to sign root")
            return self.root
        return self.online[role]


def ensure_keys(data_dir: Path) -> Keys:
    """Create the four keys if there are none (a new installation); otherwise load them."""
    d = key_dir(data_dir)
    if not any(_key_path(data_dir, role).exists() for role in ROLES):
        for role in ROLES:
            signer = CryptoSigner.generate_ed25519()
            write_secret_file(_key_path(data_dir, role), signer.private_bytes)
        os.chmod(d, 0o700)
    return Keys.load(data_dir)


def export_root_key(data_dir: Path, out: Path, remove: bool) -> dict[str, Any]:
    """Write the root key to ``out`` (0600, never over an existing file); with ``remove``,
    delete it from the data dir afterwards (offline root)."""
    src = _key_path(data_dir, ROOT)
    if not src.exists():
        raise NotFound(f"{src} does not exist: the root key is already offline (or the data dir is not initialized)")
    if out.exists():
        raise Conflict(f"{out} exists: choose a new file for the root key")
    data = src.read_bytes()
    signer = _load_signer(src)
    write_secret_file(out, data)
    if remove:
        src.unlink()
    return {"out": str(out), "keyid": signer.public_key.keyid, "removed_from_server": remove}


# --- metadata rows --------------------------------------------------------------------------------


def _expires(now: float, seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now + seconds, dt.UTC).replace(microsecond=0)


def _period(cfg: Updates, role: str) -> float:
    return float(getattr(cfg, f"{role}_expiry"))


async def lock(db: AsyncSession) -> None:
    """Serialise publishing across replicas (PostgreSQL); on SQLite the caller's transaction
    already holds the process-wide write lock (``ServerContext.writer``), and there is one process."""
    if db.get_bind().dialect.name == "postgresql":
        await db.execute(text("SELECT pg_advisory_xact_lock(hashtext('corral.tuf'))"))


async def _latest(db: AsyncSession, role: str) -> TufMetadata | None:
    return await db.scalar(select(TufMetadata).where(TufMetadata.role == role)
                           .order_by(TufMetadata.version.desc()).limit(1))


async def _load(db: AsyncSession, role: str) -> Metadata[Any]:
    row = await _latest(db, role)
    if row is None:
        raise TufError("the TUF repository is not initialized: run 'corral server init'")
    return Metadata.from_bytes(row.data)


async def _store(db: AsyncSession, md: Metadata[Any], signer: CryptoSigner, now: float) -> bytes:
    md.signatures.clear()
    md.sign(signer)
    data = md.to_bytes(_SERIALIZER)
    db.add(TufMetadata(role=md.signed.type, version=md.signed.version, data=data,
                       expires=md.signed.expires.timestamp(), created_at=now))
    await db.flush()
    return data


async def _new_version(db: AsyncSession, keys: Keys, cfg: Updates, md: Metadata[Any], now: float) -> bytes:
    md.signed.version += 1
    md.signed.expires = _expires(now, _period(cfg, md.signed.type))
    return await _store(db, md, keys.signer(md.signed.type), now)


def _snapshot_meta(version: int, data: bytes) -> MetaFile:
    """The timestamp's pointer to a snapshot, with its length and hash (the client checks both)."""
    return MetaFile(version, len(data), {HASH: hashlib.sha256(data).hexdigest()})


async def _publish(db: AsyncSession, keys: Keys, cfg: Updates, now: float,
                   targets: Metadata[Targets] | None) -> None:
    """A new targets version (when given), then a new snapshot and timestamp that point at it."""
    snapshot: Metadata[Snapshot] = await _load(db, SNAPSHOT)
    if targets is not None:
        await _new_version(db, keys, cfg, targets, now)
        snapshot.signed.meta[f"{TARGETS}.json"] = MetaFile(targets.signed.version)
    snapshot_bytes = await _new_version(db, keys, cfg, snapshot, now)
    timestamp: Metadata[Timestamp] = await _load(db, TIMESTAMP)
    timestamp.signed.snapshot_meta = _snapshot_meta(snapshot.signed.version, snapshot_bytes)
    await _new_version(db, keys, cfg, timestamp, now)
    await _prune(db, cfg.keep_versions)


async def _prune(db: AsyncSession, keep: int) -> None:
    for role in ONLINE:
        newest = await _latest(db, role)
        assert newest is not None
        await db.execute(delete(TufMetadata).where(TufMetadata.role == role,
                                                   TufMetadata.version <= newest.version - keep))


async def create(db: AsyncSession, keys: Keys, cfg: Updates, now: float) -> bool:
    """Version 1 of every role, unless the repository exists; then check that the keys the
    server holds are the ones root trusts. Returns whether it created the repository."""
    await lock(db)  # two replicas initializing at once: one creates, the other checks
    existing = await _latest(db, ROOT)
    if existing is not None:
        root: Root = Metadata[Root].from_bytes(existing.data).signed
        for role in ROLES:
            signer = keys.root if role == ROOT else keys.online[role]
            if signer is not None and signer.public_key.keyid not in root.roles[role].keyids:
                raise TufError(f"the {role} key in secrets/tuf/ is not the one the repository's root trusts: "
                               "every replica needs the secrets/tuf/ of the server that created the repository")
        return False
    root = Root(expires=_expires(now, cfg.root_expiry), consistent_snapshot=True)
    for role in ROLES:
        root.add_key(keys.signer(role).public_key, role)
        root.roles[role].threshold = THRESHOLD
    await _store(db, Metadata(root), keys.signer(ROOT), now)
    await _store(db, Metadata(Targets(expires=_expires(now, cfg.targets_expiry))), keys.signer(TARGETS), now)
    snapshot = Metadata(Snapshot(expires=_expires(now, cfg.snapshot_expiry)))  # lists targets.json v1
    snapshot_bytes = await _store(db, snapshot, keys.signer(SNAPSHOT), now)
    timestamp = Timestamp(expires=_expires(now, cfg.timestamp_expiry), snapshot_meta=_snapshot_meta(1, snapshot_bytes))
    await _store(db, Metadata(timestamp), keys.signer(TIMESTAMP), now)
    return True


# --- targets -----------------------------------------------------------------------------------


def target_url_path(target_path: str, sha256: str) -> str:
    """Where a target is served under the targets base URL (consistent snapshots)."""
    parent, sep, name = target_path.rpartition("/")
    return f"{parent}{sep}{sha256}.{name}"


async def _change_targets(db: AsyncSession, keys: Keys, cfg: Updates, now: float,
                          change: Callable[[dict[str, TargetFile]], None]) -> int:
    await lock(db)
    targets: Metadata[Targets] = await _load(db, TARGETS)
    change(targets.signed.targets)
    await _publish(db, keys, cfg, now, targets)
    return int(targets.signed.version)


async def add_target(db: AsyncSession, keys: Keys, cfg: Updates, now: float, path: str, length: int,
                     sha256: str, custom: dict[str, Any]) -> int:
    """Sign a new targets version that lists ``path``; returns that version."""

    def add(targets: dict[str, TargetFile]) -> None:
        if path in targets:
            raise Conflict(f"the TUF repository already has a target {path!r}")
        targets[path] = TargetFile(length, {HASH: sha256}, path, {"custom": custom})

    return await _change_targets(db, keys, cfg, now, add)


async def remove_target(db: AsyncSession, keys: Keys, cfg: Updates, now: float, path: str) -> int:
    def remove(targets: dict[str, TargetFile]) -> None:
        targets.pop(path, None)

    return await _change_targets(db, keys, cfg, now, remove)


# --- re-signing before expiry ---------------------------------------------------------------------


def _due(row: TufMetadata, cfg: Updates, now: float) -> bool:
    return row.expires - now < cfg.resign_margin * _period(cfg, row.role)


async def resign_due(db: AsyncSession, keys: Keys, cfg: Updates, now: float) -> list[str]:
    """Re-sign every role whose remaining validity is under ``resign_margin`` of its period
    (a new version, same content); a new targets or snapshot brings a new snapshot/timestamp.
    Returns the roles re-signed. Safe on every replica at once: it decides under the lock."""
    await lock(db)
    done: list[str] = []
    root_row = await _latest(db, ROOT)
    if root_row is None:
        raise TufError("the TUF repository is not initialized: run 'corral server init'")
    if _due(root_row, cfg, now):
        if keys.root is None:
            log.warning("TUF root metadata expires %s and the root key is offline: re-sign it before then",
                        dt.datetime.fromtimestamp(root_row.expires, dt.UTC).isoformat())
        else:
            await _new_version(db, keys, cfg, Metadata.from_bytes(root_row.data), now)
            done.append(ROOT)
    rows = {role: await _latest(db, role) for role in ONLINE}
    if any(row is not None and _due(row, cfg, now) for row in rows.values()):
        targets_row = rows[TARGETS]
        assert targets_row is not None
        targets: Metadata[Targets] | None = (Metadata.from_bytes(targets_row.data)
                                             if _due(targets_row, cfg, now) else None)
        snapshot_row = rows[SNAPSHOT]
        assert snapshot_row is not None
        if targets is not None or _due(snapshot_row, cfg, now):
            await _publish(db, keys, cfg, now, targets)
            done += [TARGETS, SNAPSHOT, TIMESTAMP] if targets is not None else [SNAPSHOT, TIMESTAMP]
        else:
            timestamp: Metadata[Timestamp] = await _load(db, TIMESTAMP)
            await _new_version(db, keys, cfg, timestamp, now)
            await _prune(db, cfg.keep_versions)
            done.append(TIMESTAMP)
    return done


# --- reading ----------------------------------------------------------------------------------------


async def metadata_file(db: AsyncSession, name: str) -> bytes:
    """The bytes of a metadata file as the client names it: ``timestamp.json`` or ``N.ROLE.json``."""
    if name == f"{TIMESTAMP}.json":
        row = await _latest(db, TIMESTAMP)
    else:
        m = _VERSIONED.match(name)
        row = await db.get(TufMetadata, (m.group(2), int(m.group(1)))) if m else None
    if row is None:
        raise NotFound(f"no TUF metadata {name!r}")
    return row.data


async def root_file(db: AsyncSession, version: int | None = None) -> bytes:
    """The newest root (what devices are provisioned with), or a given version."""
    if version is None:
        row = await _latest(db, ROOT)
    else:
        row = await db.get(TufMetadata, (ROOT, version))
    if row is None:
        raise NotFound("no such root version" if version else "the TUF repository is not initialized")
    return row.data


async def versions(db: AsyncSession) -> dict[str, dict[str, Any]]:
    """The newest version of each role and when it expires (for operators and tests)."""
    out = {}
    for role in ROLES:
        row = await _latest(db, role)
        if row is not None:
            out[role] = {"version": row.version, "expires": row.expires}
    return out
