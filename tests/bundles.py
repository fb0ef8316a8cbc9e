"""Building app bundles (and other archives) for the installer tests: real tar.gz / tar.zst files."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zstandard


@dataclass
class Entry:
    """One tar member: a file (``data``), a directory, a symlink or hard link (``link``), or any
    other ``kind`` (tarfile's type byte, e.g. ``tarfile.CHRTYPE``)."""

    name: str
    data: bytes = b""
    mode: int = 0o644
    kind: bytes = tarfile.REGTYPE
    link: str = ""


def manifest(name: str = "demo", version: str = "1.0.0", extra: str = "") -> bytes:
    return f'name = "{name}"\nversion = "{version}"\n{extra}'.encode()


def file(name: str, data: bytes | str, mode: int = 0o644) -> Entry:
    return Entry(name, data.encode() if isinstance(data, str) else data, mode)


def directory(name: str) -> Entry:
    return Entry(name, mode=0o755, kind=tarfile.DIRTYPE)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, mode=0o777, kind=tarfile.SYMTYPE, link=target)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, kind=tarfile.LNKTYPE, link=target)


def write_tar(out: io.RawIOBase | io.BufferedIOBase | zstandard.ZstdCompressionWriter, entries: Iterable[Entry],
              big: tuple[str, int] | None = None) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.linkname = e.kind, e.mode, e.link
            if e.kind == tarfile.REGTYPE:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
        if big is not None:  # a large file of zeros, generated as it is written
            info = tarfile.TarInfo(big[0])
            info.size = big[1]
            tar.addfile(info, Zeros(big[1]))


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def bundle(path: Path, entries: Iterable[Entry], *, compression: str = "zst",
           big: tuple[str, int] | None = None) -> Path:
    """Write a bundle to ``path``: ``zst`` or ``gz``; ``big`` adds a generated file of zeros."""
    with path.open("wb") as raw:
        if compression == "zst":
            with zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False) as z:
                write_tar(z, entries, big)
        else:
            import gzip

            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as g:
                write_tar(g, entries, big)
    return path


def app(path: Path, name: str = "demo", version: str = "1.0.0", extra: str = "",
        files: Iterable[Entry] = (), compression: str = "zst") -> Path:
    """A valid bundle: the manifest and ``files``."""
    return bundle(path, [file("corral-app.toml", manifest(name, version, extra)), *files], compression=compression)
