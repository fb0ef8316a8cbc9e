"""The app bundle (DESIGN §4, a stable contract): its manifest and its safe, streaming extraction.

A bundle is a ``.tar.gz`` or ``.tar.zst`` with ``corral-app.toml`` at its root::

    name = "demo"
    version = "1.2.0"
    [run]
    command = "./bin/demo --port 8081"
    [health]
    command = "./bin/healthcheck"          # exit 0 = healthy, and/or
    http = "http://127.0.0.1:8081/health"  # 2xx = healthy
    timeout = "30s"

:func:`~corral.agent.update.manifest.parse_manifest` reads the manifest strictly.
:func:`scan_bundle` reads a bundle once without writing anything (the flow's verify step);
:func:`extract_bundle` writes it into a slot directory. Both read the archive as a stream
(``tarfile`` in ``r|`` mode over a gzip or zstd reader: one member at a time, 64 KiB at a time),
so a bundle of any size needs the same little memory.

What a bundle may hold (anything else refuses the whole bundle):

- regular files and directories under relative paths without ``..``; absolute paths are refused;
- no setuid or setgid bits, no device files, FIFOs or sockets;
- symbolic links with a relative target that stays inside the slot: checked lexically when the
  link is read, then once every link is known by resolving each through the others as the
  kernel would (:func:`resolves_inside`: a chain of links cannot point out either), and after
  extraction once more on disk; nothing is ever written *through* a link (each parent directory must
  be a real directory, and files are opened with ``O_NOFOLLOW`` and ``O_EXCL``);
- hard links only to a regular file earlier in the same bundle;
- each path once (a second member of the same name would overwrite the first).

Owners are not restored (files belong to the agent's user); file permission bits are kept,
directories are 0755.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from corral.agent.update.installers import (
    CHUNK,
    ArtifactRefused,
    SpaceBudget,
    disk_full_as_error,
    open_decompressed,
)
from corral.agent.update.manifest import MANIFEST, AppManifest, parse_manifest

MAX_MANIFEST_BYTES = 64 * 1024
ENTRY_OVERHEAD = 4096  # what a directory, a link or an empty file costs on disk, about
_ZEROS = bytes(CHUNK)


def member_path(name: str) -> str:
    """The normalized relative path of a member name ("" for the root itself); refuses absolute
    paths and any ``..`` component."""
    if not name or "\x00" in name:
        raise ArtifactRefused(f"bundle member {name!r}: empty or invalid name")
    if name.startswith("/"):
        raise ArtifactRefused(f"bundle member {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArtifactRefused(f"bundle member {name!r}: '..' in the path")
    return "/".join(parts)


def link_stays_inside(path: str, target: str) -> bool:
    """Whether a symlink at ``path`` (relative to the slot) with ``target`` resolves, read
    lexically (no other link followed), inside the slot. :func:`resolves_inside` follows them."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    parent = path.rpartition("/")[0]
    return resolves_inside(f"{parent}/{target}" if parent else target, {})


def resolves_inside(path: str, links: dict[str, str], max_links: int = 40) -> bool:
    """Whether ``path`` (relative to the slot), resolved the way the kernel will through the
    bundle's symlinks (``links``: path → target), stays inside the slot at every step. False
    for a target that climbs out, an absolute one, or a loop longer than ``max_links``."""
    pending = path.split("/")
    done: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                return False
            done.pop()
            continue
        here = "/".join([*done, part])
        target = links.get(here)
        if target is None:
            done.append(part)
            continue
        hops += 1
        if hops > max_links or target.startswith("/"):
            return False
        pending = target.split("/") + pending
    return True


def check_member(member: tarfile.TarInfo) -> str:
    """The member's path if the bundle may hold it (see the module docstring), else refused."""
    path = member_path(member.name)
    what = f"bundle member {member.name!r}"
    if member.mode & (stat.S_ISUID | stat.S_ISGID):
        raise ArtifactRefused(f"{what}: setuid/setgid bits are not allowed")
    if member.isreg() or member.isdir():
        if not path and not member.isdir():
            raise ArtifactRefused(f"{what}: a file with no name")
        return path
    if member.issym():
        if not link_stays_inside(path, member.linkname):
            raise ArtifactRefused(f"{what}: symbolic link to {member.linkname!r} points outside the bundle")
        return path
    if member.islnk():
        member_path(member.linkname)  # refuses absolute and '..' hard-link targets
        return path
    raise ArtifactRefused(f"{what}: device files, FIFOs and other special files are not allowed")


@dataclass(frozen=True)
class BundleInfo:
    manifest: AppManifest
    size: int  # bytes on disk once extracted, about (file sizes + an allowance per entry)
    entries: int


class _Seen:
    """What one pass over a bundle has read: every path, which are files, the links, the manifest."""

    def __init__(self, max_entries: int) -> None:
        self.kinds: dict[str, str] = {}
        self.links: dict[str, str] = {}
        self.max_entries = max_entries
        self.manifest: bytes | None = None
        self.size = 0

    def add(self, member: tarfile.TarInfo, path: str) -> None:
        kind = "dir" if member.isdir() else "file" if member.isreg() else "link"
        parts = path.split("/")
        for n in range(1, len(parts)):
            if self.kinds.get("/".join(parts[:n]), "dir") != "dir":
                raise ArtifactRefused(f"bundle member {member.name!r}: a parent is not a directory (a link?)")
        earlier = self.kinds.get(path)
        if earlier is not None and not (earlier == kind == "dir"):
            raise ArtifactRefused(f"bundle member {member.name!r}: the path appears twice")
        if member.islnk():
            target = member_path(member.linkname)
            if self.kinds.get(target) != "file":
                raise ArtifactRefused(f"bundle member {member.name!r}: hard link to {member.linkname!r}, "
                                      "which is not a regular file earlier in the bundle")
        self.kinds[path] = kind
        if member.issym():
            self.links[path] = member.linkname
        if len(self.kinds) > self.max_entries:
            raise ArtifactRefused(f"bundle has more than {self.max_entries} entries")
        self.size += ENTRY_OVERHEAD + (member.size if member.isreg() else 0)

    def finish(self) -> AppManifest:
        for path in self.links:  # now that every link is known: no chain of them leads out
            if not resolves_inside(path, self.links):
                raise ArtifactRefused(f"bundle member {path!r}: symbolic link resolves outside the bundle")
        if self.manifest is None:
            raise ArtifactRefused(f"bundle has no {MANIFEST} at its root")
        return parse_manifest(self.manifest)


def _is_manifest(member: tarfile.TarInfo, path: str) -> bool:
    if path != MANIFEST:
        return False
    if not member.isreg():
        raise ArtifactRefused(f"{MANIFEST} must be a regular file")
    if member.size > MAX_MANIFEST_BYTES:
        raise ArtifactRefused(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    return True


class _TarStream:
    """The bundle's members, one at a time (``tarfile`` stream mode over the decompressor);
    a corrupt archive or compressed stream is :class:`ArtifactRefused`."""

    def __init__(self, artifact: Path) -> None:
        self.artifact = artifact
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> tarfile.TarFile:
        with self._stack as stack, self.refusing_corrupt():
            stream = stack.enter_context(open_decompressed(self.artifact))
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|"))
            self._stack = stack.pop_all()
            return tar

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def refusing_corrupt(self) -> Iterator[None]:
        try:
            yield
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as e:
            raise ArtifactRefused(f"{self.artifact.name}: corrupt archive: {e}") from None


def scan_bundle(artifact: Path, max_entries: int = 100_000) -> BundleInfo:
    """Read the whole bundle, write nothing: every member checked, the manifest parsed, the
    extracted size summed."""
    seen = _Seen(max_entries)
    stream = _TarStream(artifact)
    with stream as tar, stream.refusing_corrupt():
        for member in tar:
            path = check_member(member)
            seen.add(member, path)
            if _is_manifest(member, path):
                f = tar.extractfile(member)
                assert f is not None
                seen.manifest = f.read()
    return BundleInfo(seen.finish(), seen.size, len(seen.kinds))


def _real_dir(root: Path, path: str) -> Path:
    """``root/path``'s parent, created as real directories; refused if a parent is a link."""
    parent = root
    for part in path.split("/")[:-1]:
        parent = parent / part
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            os.mkdir(parent, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ArtifactRefused(f"bundle member {path!r}: a parent is not a directory (a link?)")
    return root / path


def _write_file(src: Any, dest: Path, size: int, mode: int) -> None:
    """Copy ``size`` bytes chunk by chunk; all-zero chunks become holes (the file is new)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while chunk := src.read(CHUNK):
            if chunk == _ZEROS[: len(chunk)]:
                os.lseek(fd, len(chunk), os.SEEK_CUR)
            else:
                _write_all(fd, chunk)
        os.ftruncate(fd, size)
        os.fchmod(fd, mode & 0o1777)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def extract_bundle(artifact: Path, dest: Path, budget: SpaceBudget, max_entries: int = 100_000) -> AppManifest:
    """Extract the bundle into the empty directory ``dest`` (the caller removes it on failure)."""
    seen = _Seen(max_entries)
    stream = _TarStream(artifact)
    with stream as tar, stream.refusing_corrupt(), disk_full_as_error(dest):
        for member in tar:
            path = check_member(member)
            seen.add(member, path)
            target = _real_dir(dest, path) if path else dest
            if member.isdir():
                if path:
                    budget.take(ENTRY_OVERHEAD, member.name)
                    if not os.path.lexists(target):
                        os.mkdir(target, 0o755)
            elif member.isreg():
                budget.take(ENTRY_OVERHEAD + member.size, member.name)
                f = tar.extractfile(member)
                assert f is not None
                if _is_manifest(member, path):
                    seen.manifest = f.read()
                    _write_file(io.BytesIO(seen.manifest), target, member.size, member.mode)
                else:
                    _write_file(f, target, member.size, member.mode)
            elif member.issym():
                budget.take(ENTRY_OVERHEAD, member.name)
                os.symlink(member.linkname, target)
            else:  # a hard link to an earlier regular file (checked by seen.add)
                budget.take(ENTRY_OVERHEAD, member.name)
                os.link(dest / member_path(member.linkname), target, follow_symlinks=False)
    manifest = seen.finish()
    root = dest.resolve()
    for path in seen.links:  # and once more as the kernel resolves them, on disk
        if not (dest / path).resolve().is_relative_to(root):
            raise ArtifactRefused(f"bundle member {path!r}: symbolic link resolves outside the bundle")
    return manifest
