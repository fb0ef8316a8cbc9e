"""Secrets that live in the data dir, outside the database (so a database dump alone is not
enough to forge them): the audit chain key."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from corral.errors import CorralError


def _secrets_dir(data_dir: Path) -> Path:
    return data_dir / "secrets"


def write_secret_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_audit_key(data_dir: Path) -> bytes:
    path = _secrets_dir(data_dir) / "audit.key"
    if not path.exists():
        write_secret_file(path, secrets.token_bytes(32))
    return path.read_bytes()


def load_audit_key(data_dir: Path) -> bytes:
    path = _secrets_dir(data_dir) / "audit.key"
    env = os.environ.get("CORRAL_AUDIT_KEY")
    if env:
        return bytes.fromhex(env)
    if not path.exists():
        raise CorralError(f"{path} is missing: run 'corral server init --data-dir {data_dir}' first")
    return path.read_bytes()
