"""Crash-safe file writes, shared by the agent, its update tools and the server.

A write that a SIGKILL or a power cut may interrupt goes to a temporary file beside the target,
is fsync'd, renamed over the target and the directory fsync'd: readers see the old content or
the new, never a mix, and the rename survives a power cut. Only ``os``: the agent's watchdog and
``corral tuf-client`` import this too, and the resident agent counts every module it loads
(ADR 0007) -- ``tempfile`` alone would bring ``shutil``, ``bz2`` and ``lzma``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: what :func:`atomic_write` creates files with unless told otherwise: owner only
PRIVATE_FILE_MODE = 0o600


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_temp(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` (``.NAME.RANDOM.tmp``, created exclusively, mode 0600), open
    for writing: what ``tempfile.mkstemp`` does."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name beside {path}")


def write_temp(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new fsync'd temporary file beside ``path`` with ``mode``; returns its path."""
    fd, tmp = create_temp(path)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix."""
    tmp = write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
