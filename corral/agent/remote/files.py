"""File transfer sessions (``corral cp``): one file to or from the device, over a
:class:`Channel`.

Both directions check the path on the device with :func:`~corral.core.remote.resolve_allowed`:
absolute, and inside one of ``[remote] dirs`` once ``..`` and symlinks are resolved; and the size
against ``[remote] max_file_bytes``.

**Upload** (:func:`run_upload`), client → device:

- in: ``size`` bytes in binary frames (the session ends when all have come; more is an error);
  ``{"type": "eof"}`` before that ends the upload unfinished; ``{"type": "error"}`` aborts it.
- out: ``{"type": "done", "bytes": N, "sha256": H}`` once the file is in place, or
  ``{"type": "error", "message"}``.
- The bytes go to a new temporary file beside the target (``.NAME.RANDOM.tmp``, mode 0600),
  which is fsync'd, checked (size and SHA-256) and only then given its mode and renamed over the
  target, and the directory fsync'd: the target is the old file or the whole new one, never a
  part. Anything wrong, the temporary file is removed and the target left as it was. A refusal
  (path, size, free space) comes before anything is written.

**Download** (:func:`run_download`), device → client: a regular file only; out
``{"type": "file", "size": N}``, the contents in binary frames of ``chunk_bytes``, then
``{"type": "eof", "sha256": H}``; or ``{"type": "error", "message"}``.

Disk I/O runs in the agent's executor thread (one chunk per call): a slow SD card or an fsync
of 64 MiB never stalls the event loop. Memory: one chunk in flight each way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from corral.agent.config import RemoteConfig
from corral.agent.remote.channel import (
    CLOSE_ERROR,
    Channel,
    control,
    finish,
    parse_control,
    refuse,
)
from corral.core.remote import resolve_allowed
from corral.errors import InvalidInput
from corral.fileio import create_temp, fsync_dir

log = logging.getLogger("corral.agent.remote.files")

T = TypeVar("T")

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
#: the mode of an uploaded file that replaces none and was given none
DEFAULT_MODE = 0o644


@dataclass(frozen=True)
class Transferred:
    """One file copied, for the audit log."""

    path: Path
    bytes: int
    sha256: str


class _Failed(Exception):
    """An upload that cannot complete: the message for the client."""


async def _in_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in the executor. Cancelled, it still waits for the call to end: the caller
    closes the file descriptor next, and a thread must never write to a closed (or reused) one."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await fut
        raise


async def _checked_path(ch: Channel, path: str, config: RemoteConfig) -> Path:
    if not config.files:
        raise await refuse(ch, "file transfer is turned off on this device (remote.files = false)")
    if not config.dirs:
        raise await refuse(ch, "this device allows file transfer in no directory (remote.dirs)")
    try:
        return resolve_allowed(path, config.dirs)
    except InvalidInput as e:
        log.warning("file transfer: refused %r: %s", path, e.detail)
        raise await refuse(ch, e.detail) from None


def _too_big(path: str, size: int, config: RemoteConfig) -> str:
    return f"{path}: {size} bytes is more than this device accepts ({config.max_file_bytes}, remote.max_file_bytes)"


# --- upload -----------------------------------------------------------------------------------


def _prepare_upload(target: Path, size: int, dirs: tuple[Path, ...]) -> None:
    """Raises :class:`_Failed` when ``target`` cannot be written (in the executor: it stats)."""
    if target.is_dir():
        raise _Failed(f"{target} is a directory")
    parent = target.parent
    if not parent.is_dir():
        if any(os.path.realpath(d) == str(parent) for d in dirs):
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # an allowed directory not made yet
        else:
            raise _Failed(f"{parent}: no such directory")
    vfs = os.statvfs(parent)
    if vfs.f_bavail * vfs.f_frsize < size:
        raise _Failed(f"{parent}: not enough free space for {size} bytes")


def _write_chunk(fd: int, data: bytes, digest: hashlib._Hash) -> None:
    digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _finish_upload(fd: int, target: Path, mode: int | None) -> None:
    """Mode (and owner, when replacing a file as root), fsync, close."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    os.fchmod(fd, mode if mode is not None else stat.S_IMODE(st.st_mode) if st else DEFAULT_MODE)
    if st is not None and os.geteuid() == 0:
        os.fchown(fd, st.st_uid, st.st_gid)
    os.fsync(fd)


async def _receive(ch: Channel, fd: int, size: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    received = 0
    while received < size:
        msg = await ch.recv()
        if isinstance(msg, bytes):
            if received + len(msg) > size:
                raise _Failed(f"the upload sent more than the {size} bytes it announced")
            await _in_thread(_write_chunk, fd, msg, digest)
            received += len(msg)
            continue
        ctl = parse_control(msg)
        if ctl is None:
            continue
        if ctl["type"] == "eof":
            raise _Failed(f"the upload ended after {received} of {size} bytes")
        if ctl["type"] == "error":
            raise _Failed(f"the client aborted the upload: {ctl.get('message', '')}")
    return received, digest.hexdigest()


async def run_upload(ch: Channel, path: str, size: int, sha256: str, mode: int | None,
                     config: RemoteConfig) -> Transferred:
    """Receive ``size`` bytes over ``ch`` into ``path`` (atomically, see the module), check them
    against ``sha256`` (hex), apply ``mode`` (``None``: the replaced file's, or 0644), and send
    ``done``. :class:`~corral.agent.remote.channel.RemoteError` after ``error`` was sent when the
    upload is refused or fails (nothing is left behind);
    :class:`~corral.agent.remote.channel.ChannelClosed` when the client went away mid-upload
    (the temporary file is removed). The channel is closed on return."""
    target = await _checked_path(ch, path, config)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise await refuse(ch, f"an upload needs a size in bytes, not {size!r}")
    if size > config.max_file_bytes:
        raise await refuse(ch, _too_big(path, size, config))
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise await refuse(ch, "an upload needs the SHA-256 of its contents (64 hex digits)")
    if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777):
        raise await refuse(ch, f"a file mode is 0 to 0o7777, not {mode!r}")
    assert config.dirs is not None  # _checked_path
    try:
        await _in_thread(_prepare_upload, target, size, config.dirs)
        fd, tmp = await _in_thread(create_temp, target)
    except _Failed as e:
        raise await refuse(ch, str(e)) from None
    except OSError as e:
        raise await refuse(ch, f"{path}: {e.strerror or e}", CLOSE_ERROR) from None
    done = False
    try:
        try:
            received, digest = await _receive(ch, fd, size)
            if digest != sha256.lower():
                raise _Failed(f"{path}: the SHA-256 of the {received} bytes received is {digest}, "
                              f"not {sha256.lower()}: the file was not written")
            await _in_thread(_finish_upload, fd, target, mode)
        finally:
            os.close(fd)
        await _in_thread(os.replace, tmp, target)
        done = True
        await _in_thread(fsync_dir, target.parent)
    except _Failed as e:
        log.warning("upload to %s failed: %s", target, e)
        raise await refuse(ch, str(e), CLOSE_ERROR) from None
    except OSError as e:
        log.warning("upload to %s failed: %s", target, e)
        raise await refuse(ch, f"{path}: {e.strerror or e}", CLOSE_ERROR) from None
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    log.info("upload: %s written (%d bytes, sha256 %s)", target, received, digest)
    await finish(ch, control("done", bytes=received, sha256=digest))  # the file is in place, told or not
    return Transferred(target, received, digest)


# --- download ---------------------------------------------------------------------------------


def _read_chunk(fd: int, n: int, digest: hashlib._Hash) -> bytes:
    data = os.read(fd, n)
    digest.update(data)
    return data


def _open_regular(target: Path) -> tuple[int, int]:
    """``(fd, size)`` of a regular file; :class:`_Failed` for anything else. O_NONBLOCK: opening
    a FIFO must not wait for a writer (it is refused after the fstat)."""
    fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Failed(f"{target} is {'a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


async def run_download(ch: Channel, path: str, config: RemoteConfig) -> Transferred:
    """Send the regular file ``path`` over ``ch``: ``file`` ``{size}``, its bytes, ``eof``
    ``{sha256}``; the channel is closed on return.
    :class:`~corral.agent.remote.channel.RemoteError` after ``error`` was sent when the file is
    refused (not allowed, not a regular file, too big) or cannot be read whole;
    :class:`~corral.agent.remote.channel.ChannelClosed` when the client went away."""
    target = await _checked_path(ch, path, config)
    try:
        fd, size = await _in_thread(_open_regular, target)
    except _Failed as e:
        raise await refuse(ch, str(e)) from None
    except OSError as e:
        raise await refuse(ch, f"{path}: {e.strerror or e}") from None
    digest = hashlib.sha256()
    try:
        if size > config.max_file_bytes:
            raise await refuse(ch, _too_big(path, size, config))
        await ch.send(control("file", size=size))
        sent = 0
        while sent < size:
            data = await _in_thread(_read_chunk, fd, min(config.chunk_bytes, size - sent), digest)
            if not data:
                raise await refuse(ch, f"{path} shrank from {size} to {sent} bytes while it was sent", CLOSE_ERROR)
            await ch.send(data)
            sent += len(data)
    except OSError as e:
        raise await refuse(ch, f"{path}: {e.strerror or e}", CLOSE_ERROR) from None
    finally:
        os.close(fd)
    hexdigest = digest.hexdigest()
    log.info("download: %s sent (%d bytes, sha256 %s)", target, size, hexdigest)
    await ch.send(control("eof", sha256=hexdigest))  # without it the client cannot check what it got
    await finish(ch, None)
    return Transferred(target, size, hexdigest)

