"""Installers: what the update flow's actions do to the device, one class per artifact kind.

The update flow (:mod:`corral.core.update_flow`, ADR 0009) decides *what* happens; an installer
does it. Each kind implements :class:`Installer`, whose methods are the flow's actions:

==================  ===========================================================================
flow action         installer method (each one idempotent: the flow repeats it after a crash)
==================  ===========================================================================
VERIFY (its end)    ``check(artifact)``: the artifact is one this installer accepts (a bundle's
                    members and manifest, an update module's rollback support) and fits on disk;
                    reads only, so a refusal changes nothing
INSTALL             ``install(artifact, slot)``: write the inactive ``slot`` (A/B kinds), or run
                    the install hooks (in place, ``slot`` None). Streams: the artifact is never
                    held in memory
SWITCH              ``switch(slot)``: make ``slot`` the active one (atomic; a no-op in place)
RESTART             ``restart(slot)``: start what the active slot holds (process, reboot, agent)
START_HEALTH_CHECK  ``health(slot, deadline)``: the kind's own checks until ``deadline``; the
                    update runner adds "the agent reconnected" where it applies
COMMIT              ``commit()``: make the new version permanent
ROLLBACK            ``rollback(slot)``: converge to "``slot`` (the previous one) is active and
                    runs": switch back and restart when it is not already so
CLEANUP             ``cleanup()``: drop what the deployment left (work dirs, a failed slot's
                    files); the download itself is the runner's
==================  ===========================================================================

``running_slot()`` answers the one question the flow leaves to the I/O layer: whether the
version that runs now is the one a restart was to start (``resume(..., restarted=)``).

The kinds (``KIND_POLICIES``): ``app`` is :mod:`.app_bundle` (A/B slot directories, a
supervised process), ``rootfs`` is :mod:`.rootfs` (an inactive partition and a bootloader
environment), ``script`` is :mod:`.update_module` (a user executable with Mender-style hooks, in
place), ``agent`` is :mod:`.self_update` (the agent's own A/B directory, handed over through
:mod:`.watchdog`). This module holds what they share: the errors, the slot link, the archive
opener (gzip or zstd, by magic), the free-space seam, atomic writes and bounded subprocess output.

Only the update runner imports the installers, when an update runs (ADR 0007): ``tarfile``,
``zstandard``, ``http.client`` and ``shutil`` stay out of the idle agent. The app supervisor
(:mod:`.supervisor`), which runs for as long as apps are installed, imports this module and
:mod:`.manifest` only: they load none of those (a test says so).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from corral.errors import CorralError
from corral.fileio import fsync_dir

SLOTS = ("a", "b")
CHUNK = 64 * 1024
OUTPUT_TAIL = 4096  # bytes of a hook's or health command's output kept for the failure reason


class InstallError(CorralError):
    """An action failed; ``detail`` is the reason the deployment status reports."""

    code = "install_failed"


class ArtifactRefused(InstallError):
    """The artifact is not one this device may install (bad bundle, missing rollback hook, ...).
    Raised by ``check`` and ``install`` before anything the device runs was changed."""

    code = "artifact_refused"


class DiskFull(InstallError):
    """Not enough free space (checked first and while writing, or ENOSPC): the install stopped and
    removed what it had written; the active slot is untouched."""

    code = "disk_full"


CURRENT = "current"


def active_slot(root: Path) -> str | None:
    """The slot ``root/current`` points to (``slots/<slot>``), or None before the first switch."""
    try:
        target = os.readlink(root / CURRENT)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Path(target).name


def point_current(root: Path, slot: str) -> None:
    """Make ``root/current`` point to ``slots/<slot>`` with one rename: whoever reads it (or a
    crash) sees the old target or the new, never neither. Idempotent."""
    if active_slot(root) == slot:
        return
    tmp = root / f".{CURRENT}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(f"slots/{slot}", tmp)
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)


def other_slot(slot: str) -> str:
    """The A/B partner of ``slot``."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}")
    return SLOTS[1 - SLOTS.index(slot)]


@dataclass(frozen=True)
class HealthResult:
    healthy: bool
    reason: str = ""


@dataclass(frozen=True)
class Checked:
    """What ``check`` learnt of an artifact: the version it carries (when it says), its own
    health timeout (an app's ``[health] timeout``: it wins over the limits'), its size installed."""

    version: str | None
    health_timeout: float | None
    size: int


class Installer(Protocol):
    """One artifact kind's side of the update flow's actions (see the module docstring)."""

    def check(self, artifact: Path) -> Checked: ...

    def install(self, artifact: Path, slot: str | None) -> None: ...

    def switch(self, slot: str | None) -> None: ...

    def restart(self, slot: str | None) -> None: ...

    def health(self, slot: str | None, deadline: float) -> HealthResult: ...

    def commit(self) -> None: ...

    def rollback(self, slot: str | None) -> None: ...

    def cleanup(self) -> None: ...

    def running_slot(self) -> str | None: ...


#: the bytes free for an unprivileged writer on the file system of a path (a seam: tests trip
#: "disk full" without filling a disk)
FreeSpace = Callable[[Path], int]


def free_space(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class SpaceBudget:
    """Bytes an install may still write: the free space when it started, less a reserve. Checked
    before each write, so a too-large artifact stops before the file system is full."""

    def __init__(self, path: Path, free: FreeSpace, reserve: int) -> None:
        self.left = free(path) - reserve
        self.path = path

    def take(self, size: int, what: str) -> None:
        if size > self.left:
            raise DiskFull(f"not enough space in {self.path} for {what}: {size} more bytes needed, "
                           f"{max(self.left, 0)} available")
        self.left -= size


@contextlib.contextmanager
def disk_full_as_error(where: Path) -> Iterator[None]:
    """ENOSPC/EDQUOT from the file system is :class:`DiskFull`, whatever the budget said."""
    try:
        yield
    except OSError as e:
        if e.errno in (28, 122):  # ENOSPC, EDQUOT
            raise DiskFull(f"disk full while writing {where}: {e.strerror}") from None
        raise


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


@contextlib.contextmanager
def open_decompressed(path: Path, *, allow_raw: bool = False) -> Iterator[BinaryIO]:
    """``path`` as a stream of its decompressed bytes (zstd or gzip, told by the magic number; a
    raw file with ``allow_raw``). Nothing is read ahead beyond a decompressor's window."""
    with path.open("rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic.startswith(ZSTD_MAGIC):
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as reader:
                yield reader
        elif magic.startswith(GZIP_MAGIC):
            import gzip

            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g  # type: ignore[misc]  # a readable binary stream, as tarfile needs
        elif allow_raw:
            yield f
        else:
            raise ArtifactRefused(f"{path.name}: not a .tar.gz or .tar.zst archive")


def tail(data: bytes, truncated: bool = False, limit: int = OUTPUT_TAIL) -> str:
    """The last ``limit`` bytes of some output, as text for a reason (``…`` where cut)."""
    text = data[-limit:].decode("utf-8", "replace").strip()
    return ("…" + text) if truncated or len(data) > limit else text


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None  # None: killed at the timeout
    output: str  # the tail of stdout and stderr together


def run_command(argv: Sequence[str], *, cwd: Path, timeout: float, log: Path,
                env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``argv`` to completion or ``timeout`` (then its process group is killed), its output
    going to the file ``log`` (bounded memory, whatever it prints); return the exit code and the
    output's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w+b") as out:
        try:
            proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=None if env is None else {**os.environ, **env})
        except OSError as e:
            return CommandResult(127, f"cannot run {argv[0]}: {e.strerror or e}")
        try:
            code: int | None = proc.wait(timeout=max(timeout, 0.001))
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
            code = None
        size = out.seek(0, os.SEEK_END)
        out.seek(max(size - OUTPUT_TAIL, 0))
        data = out.read()
    return CommandResult(code, tail(data, size > OUTPUT_TAIL))


def kill_group(pid: int, sig: int = 9) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def remove_tree(path: Path) -> None:
    """Remove ``path`` (a directory tree, a file or a link) if it exists; never follows links."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        import shutil

        shutil.rmtree(path)
