"""Binary deltas between two versions of an artifact: build on the server, apply on the device.

A device running version A of an image downloads a delta instead of version B when the server
holds one; the delta rebuilds B from A's bytes. Applying must fit in a device's memory whatever
the image's size (DESIGN §4: "never hold a whole image in memory"), which is why this is not
``zstd --patch-from`` with the whole base as a dictionary (ADR 0014 has the measurements): the
applier here holds at most one segment of output and one dictionary window of the base.

**How it works.** The base is cut into aligned blocks of ``block_size`` (4 KiB), each hashed
(BLAKE2b-128) into an index while the builder streams it. The builder then streams the target
block by block: a block whose hash is in the index becomes (part of) a ``COPY`` of base bytes,
preferring the base block right after the previous copy so runs stay long; consecutive blocks not
found are gathered (up to ``max_segment`` bytes) into a ``DATA`` op, compressed with zstd using
as a raw-content dictionary the base bytes around where that run sits in the base (the previous
copy's offset shift, plus a margin as long as the run, up to ``max_dict``). A block with a few
bytes edited then costs a few bytes, and content shifted by less than the margin (an insertion
or deletion inside a run of new blocks) is still found by zstd.

**Format, version 1** (all integers big-endian)::

    header  magic "CRLDELTA" | version u16 = 1 | flags u16 = 0 | block_size u32
            | max_segment u32 | max_dict u32
            | base_length u64 | base_sha256 [32] | target_length u64 | target_sha256 [32]
    ops     0x01 COPY  base_offset u64 | length u64
            0x02 DATA  dict_offset u64 | dict_length u32 | out_length u32 | frame_length u32
                       | zstd frame (content size set, no dictionary id)
            0x00 END   (nothing may follow)

**Applying** checks the header against the applier's own limits (a hostile header cannot make it
allocate more than :class:`ApplyLimits` allows), hashes the base and refuses a wrong one before
writing a byte, then streams the ops: a ``COPY`` is read from the base by offset in 1 MiB
pieces, a ``DATA`` frame is bounded by ``out_length`` before it is decompressed, nothing is
written past ``target_length``, and at ``END`` the output's length and sha256 must equal the
header's. On any error the output holds garbage: the caller writes into a temporary file (or the
inactive slot) and uses it only when :func:`apply_delta` returned.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from corral.errors import CorralError
from corral.fileio import create_temp, fsync_dir

MAGIC = b"CRLDELTA"
VERSION = 1
_HEADER = struct.Struct(">8sHHIIIQ32sQ32s")
HEADER_SIZE = _HEADER.size

OP_END = 0x00
OP_COPY = 0x01
OP_DATA = 0x02
_COPY = struct.Struct(">QQ")
_DATA = struct.Struct(">QIII")

DEFAULT_BLOCK_SIZE = 4096
DEFAULT_MAX_SEGMENT = 1 << 20
DEFAULT_MAX_DICT = 3 << 20
DEFAULT_MIN_MARGIN = 16 << 10
DEFAULT_LEVEL = 19

_IO_CHUNK = 1 << 20


class DeltaError(CorralError):
    """A delta that cannot be built or applied."""

    code = "delta_error"


class DeltaBaseMismatch(DeltaError):
    """The base given is not the one the delta was built against (length or sha256)."""

    code = "delta_base_mismatch"


class DeltaCorrupt(DeltaError):
    """The delta is truncated, malformed, over the applier's limits, or does not rebuild the
    target it names."""

    code = "delta_corrupt"


@dataclass(frozen=True)
class DeltaInfo:
    """What a delta's header says, and what building it produced."""

    base_length: int
    base_sha256: str
    target_length: int
    target_sha256: str
    block_size: int = DEFAULT_BLOCK_SIZE
    max_segment: int = DEFAULT_MAX_SEGMENT
    max_dict: int = DEFAULT_MAX_DICT
    delta_length: int = 0
    copied: int = 0
    """target bytes taken from the base by ``COPY``"""
    literal: int = 0
    """target bytes carried in ``DATA`` frames"""


@dataclass(frozen=True)
class ApplyLimits:
    """The most a delta may make the applier hold: refused above, so memory stays bounded
    (about ``max_dict`` + 2 × ``max_segment`` plus zstd's own state)."""

    max_segment: int = 8 << 20
    max_dict: int = 16 << 20
    max_block_size: int = 1 << 20


# --- building ---------------------------------------------------------------------------------


def _block_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at end of file."""
    parts: list[bytes] = []
    while n > 0:
        b = f.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return _read_exact(f, n)


class _Writer:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.length = 0

    def write(self, b: bytes) -> None:
        self.out.write(b)
        self.length += len(b)


def build_delta(
    base: BinaryIO,
    target: BinaryIO,
    out: BinaryIO,
    *,
    level: int = DEFAULT_LEVEL,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_segment: int = DEFAULT_MAX_SEGMENT,
    max_dict: int = DEFAULT_MAX_DICT,
    min_margin: int = DEFAULT_MIN_MARGIN,
) -> DeltaInfo:
    """Write a delta from ``base`` to ``target`` into ``out``.

    ``base`` and ``target`` must be seekable (both are read twice: hashed first, since the header
    carries their sha256). Memory: the base's block index (~130 bytes a block) and one segment.
    """
    if block_size < 64 or max_segment < block_size or max_dict < max_segment:
        raise DeltaError("need 64 <= block_size <= max_segment <= max_dict")
    # pass 1: the base's index and both digests
    base.seek(0)
    base_sha = hashlib.sha256()
    base_hashes: list[bytes] = []
    index: dict[bytes, int] = {}  # block hash -> its first block in the base
    repeated: set[bytes] = set()  # hashes of blocks the base holds more than once (zeros ...)
    while block := _read_exact(base, block_size):
        base_sha.update(block)
        h = _block_hash(block)
        if index.setdefault(h, len(base_hashes)) != len(base_hashes):
            repeated.add(h)
        base_hashes.append(h)
    base_len = base.tell()
    target.seek(0)
    target_sha = hashlib.sha256()
    while chunk := target.read(_IO_CHUNK):
        target_sha.update(chunk)
    target_len = target.tell()

    w = _Writer(out)
    w.write(_HEADER.pack(MAGIC, VERSION, 0, block_size, max_segment, max_dict, base_len,
                         base_sha.digest(), target_len, target_sha.digest()))
    copied = literal = 0
    shift = 0  # base offset - target offset of the latest copy: where unmatched runs likely sit
    copy_base = copy_len = 0  # the pending COPY run
    pending = bytearray()  # the pending DATA run
    pending_at = 0  # its target offset

    def flush_copy() -> None:
        nonlocal copy_len, copied
        if copy_len:
            w.write(bytes([OP_COPY]) + _COPY.pack(copy_base, copy_len))
            copied += copy_len
            copy_len = 0

    def flush_data() -> None:
        nonlocal literal
        if not pending:
            return
        n = len(pending)
        margin = min(max(n, min_margin, block_size), (max_dict - n) // 2)
        lo = max(0, min(base_len, pending_at + shift - margin))
        hi = max(lo, min(base_len, pending_at + shift + n + margin))
        dict_bytes = _read_at(base, lo, hi - lo) if hi > lo else b""
        if dict_bytes:
            zdict = zstandard.ZstdCompressionDict(dict_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            cctx = zstandard.ZstdCompressor(level=level, dict_data=zdict, write_checksum=False,
                                            write_content_size=True, write_dict_id=False)
        else:
            cctx = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
        frame = cctx.compress(bytes(pending))
        w.write(bytes([OP_DATA]) + _DATA.pack(lo, len(dict_bytes), n, len(frame)))
        w.write(frame)
        literal += n
        pending.clear()

    def _locate(h: bytes, here: int) -> int | None:
        """The base block to copy a target block with hash ``h`` from, ``here`` its likely
        place. A block the base holds several times (zeros, fill) tells nothing of where the
        content around it went: it is taken at ``here``, or anywhere when no new data is
        pending, but it does not cut a pending DATA run, which keeps runs whole when the
        alignment is lost (an insertion), so their dictionary window can still find the content."""
        i = index.get(h)
        if i is None or h not in repeated:
            return i
        if here % block_size == 0 and 0 <= here // block_size < len(base_hashes) \
                and base_hashes[here // block_size] == h:
            return here // block_size
        return None if pending else i

    target.seek(0)
    pos = 0
    while block := _read_exact(target, block_size):
        h = _block_hash(block)
        # extend the current copy if the next base block matches, else look the block up
        nxt = copy_base + copy_len
        if copy_len and nxt % block_size == 0 and nxt // block_size < len(base_hashes) \
                and base_hashes[nxt // block_size] == h:
            copy_len += len(block)
        elif (i := _locate(h, pos + shift)) is not None:
            flush_data()
            flush_copy()
            if h not in repeated:
                shift = i * block_size - pos
            copy_base, copy_len = i * block_size, len(block)
        else:
            flush_copy()
            if not pending:
                pending_at = pos
            pending += block
            if len(pending) + block_size > max_segment:
                flush_data()
        pos += len(block)
    flush_data()
    flush_copy()
    w.write(bytes([OP_END]))
    return DeltaInfo(base_len, base_sha.hexdigest(), target_len, target_sha.hexdigest(), block_size,
                     max_segment, max_dict, w.length, copied, literal)


# --- applying ---------------------------------------------------------------------------------


def read_header(delta: BinaryIO, limits: ApplyLimits | None = None) -> DeltaInfo:
    """Parse and bound-check a delta's header (``delta`` is left just after it)."""
    limits = limits or ApplyLimits()
    raw = _read_exact(delta, HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise DeltaCorrupt("delta truncated: incomplete header")
    magic, version, flags, block_size, max_segment, max_dict, base_len, base_sha, target_len, target_sha = \
        _HEADER.unpack(raw)
    if magic != MAGIC:
        raise DeltaCorrupt("not a Corral delta (bad magic)")
    if version != VERSION:
        raise DeltaCorrupt(f"delta format version {version} is not supported (this agent reads {VERSION})")
    if flags != 0:
        raise DeltaCorrupt(f"unknown delta flags {flags:#x}")
    if not 0 < block_size <= limits.max_block_size or not 0 < max_segment <= limits.max_segment \
            or not 0 < max_dict <= limits.max_dict:
        raise DeltaCorrupt(f"delta needs block {block_size}, segment {max_segment}, dictionary {max_dict} "
                           f"bytes: over this applier's limits {limits}")
    return DeltaInfo(base_len, base_sha.hex(), target_len, target_sha.hex(), block_size, max_segment, max_dict)


def _check_base(base: BinaryIO, info: DeltaInfo) -> None:
    """The base's first ``base_length`` bytes must be the delta's base. Bytes after them are
    allowed: a rootfs base is read from a partition larger than the image written to it."""
    base.seek(0)
    sha = hashlib.sha256()
    n = 0
    while n < info.base_length and (chunk := base.read(min(_IO_CHUNK, info.base_length - n))):
        sha.update(chunk)
        n += len(chunk)
    if n != info.base_length or sha.hexdigest() != info.base_sha256:
        raise DeltaBaseMismatch(f"wrong base: the delta needs {info.base_length} bytes with sha256 "
                                f"{info.base_sha256}, got {n} bytes with sha256 {sha.hexdigest()}")


def apply_delta(
    base: BinaryIO,
    delta: BinaryIO,
    out: BinaryIO,
    *,
    limits: ApplyLimits | None = None,
    verify_base: bool = True,
) -> DeltaInfo:
    """Rebuild the target from ``base`` (seekable; its first ``base_length`` bytes are the base)
    and ``delta`` (read sequentially) into ``out`` (written sequentially). Raises
    :class:`DeltaBaseMismatch` before writing anything if the base is not the delta's,
    :class:`DeltaCorrupt` if the delta is bad or the result does not match.
    ``verify_base=False`` skips hashing the base (only when the caller just verified it)."""
    info = read_header(delta, limits)
    if verify_base:
        _check_base(base, info)
    sha = hashlib.sha256()
    written = 0
    dctx_plain = zstandard.ZstdDecompressor()

    def emit(b: bytes) -> None:
        nonlocal written
        if written + len(b) > info.target_length:
            raise DeltaCorrupt(f"delta writes past the target's {info.target_length} bytes")
        out.write(b)
        sha.update(b)
        written += len(b)

    while True:
        op = delta.read(1)
        if not op:
            raise DeltaCorrupt(f"delta truncated after {written} bytes of output (no END)")
        if op[0] == OP_END:
            break
        if op[0] == OP_COPY:
            raw = _read_exact(delta, _COPY.size)
            if len(raw) < _COPY.size:
                raise DeltaCorrupt("delta truncated inside a COPY")
            offset, length = _COPY.unpack(raw)
            if offset + length > info.base_length or written + length > info.target_length:
                raise DeltaCorrupt(f"COPY of {length} bytes at {offset} is outside the base or the target")
            base.seek(offset)
            left = length
            while left:
                b = base.read(min(left, _IO_CHUNK))
                if not b:
                    raise DeltaBaseMismatch(f"the base ended before offset {offset + length}")
                emit(b)
                left -= len(b)
        elif op[0] == OP_DATA:
            raw = _read_exact(delta, _DATA.size)
            if len(raw) < _DATA.size:
                raise DeltaCorrupt("delta truncated inside a DATA header")
            dict_off, dict_len, out_len, frame_len = _DATA.unpack(raw)
            if dict_len > info.max_dict or out_len > info.max_segment or dict_off + dict_len > info.base_length:
                raise DeltaCorrupt(f"DATA op over the header's bounds (dictionary {dict_len} at {dict_off}, "
                                   f"output {out_len})")
            if frame_len > out_len + (out_len >> 7) + 1024:  # zstd's compress bound, rounded up
                raise DeltaCorrupt(f"DATA frame of {frame_len} bytes for {out_len} bytes of output")
            if written + out_len > info.target_length:
                raise DeltaCorrupt(f"delta writes past the target's {info.target_length} bytes")
            frame = _read_exact(delta, frame_len)
            if len(frame) < frame_len:
                raise DeltaCorrupt("delta truncated inside a DATA frame")
            emit(_decompress(frame, out_len, _read_at(base, dict_off, dict_len) if dict_len else b"",
                             dctx_plain))
        else:
            raise DeltaCorrupt(f"unknown delta op {op[0]:#x}")
    if delta.read(1):
        raise DeltaCorrupt("bytes after the delta's END")
    if written != info.target_length or sha.hexdigest() != info.target_sha256:
        raise DeltaCorrupt(f"the rebuilt target does not match: {written} bytes with sha256 {sha.hexdigest()}, "
                           f"expected {info.target_length} with {info.target_sha256}")
    return info


def _decompress(frame: bytes, out_len: int, dict_bytes: bytes, plain: zstandard.ZstdDecompressor) -> bytes:
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise DeltaCorrupt(f"DATA frame: {exc}") from None
    if size != out_len:
        raise DeltaCorrupt(f"DATA frame declares {size} bytes, the op {out_len}")
    if dict_bytes:
        zdict = zstandard.ZstdCompressionDict(dict_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        dctx = zstandard.ZstdDecompressor(dict_data=zdict)
    else:
        dctx = plain
    try:
        data = dctx.decompress(frame, max_output_size=out_len)
    except zstandard.ZstdError as exc:
        raise DeltaCorrupt(f"DATA frame does not decompress: {exc}") from None
    if len(data) != out_len:
        raise DeltaCorrupt(f"DATA frame gave {len(data)} bytes, expected {out_len}")
    return data


def apply_file(base: Path, delta: Path, out: Path, *, target_sha256: str, target_length: int,
               limits: ApplyLimits | None = None) -> DeltaInfo:
    """Rebuild a target into the file ``out``, crash-safe: written to a temporary file beside it,
    fsync'd and renamed only once complete and verified. ``target_sha256`` and ``target_length``
    are what the caller trusts (the full artifact's, from signed TUF metadata): a delta whose
    header names another target is refused before anything is written."""
    with delta.open("rb") as df:
        info = read_header(df, limits)
        if info.target_sha256 != target_sha256.lower() or info.target_length != target_length:
            raise DeltaCorrupt(f"the delta rebuilds {info.target_length} bytes with sha256 {info.target_sha256}, "
                               f"not the expected {target_length} with {target_sha256}")
        df.seek(0)
        fd, tmp = create_temp(out)
        try:
            with os.fdopen(fd, "wb") as of, base.open("rb") as bf:
                apply_delta(bf, df, of, limits=limits)
                of.flush()
                os.fsync(of.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(out.parent)
    return info


def main(argv: list[str] | None = None) -> int:
    """``python -m corral.delta build BASE TARGET DELTA`` / ``apply BASE DELTA OUT --sha256 H
    --length N``: the same functions from a shell, or from the agent as a short-lived process
    (so the resident agent does not load zstd for an update, ADR 0007). Prints the header's
    facts as JSON; exit 1 with one ``error:`` line."""
    import argparse
    import json
    import sys
    from dataclasses import asdict

    ap = argparse.ArgumentParser(prog="python -m corral.delta", description="Build or apply a Corral delta.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the delta from BASE to TARGET into DELTA")
    b.add_argument("base", type=Path)
    b.add_argument("target", type=Path)
    b.add_argument("delta", type=Path)
    b.add_argument("--level", type=int, default=DEFAULT_LEVEL)
    a = sub.add_parser("apply", help="rebuild OUT from BASE and DELTA (crash-safe; verified)")
    a.add_argument("base", type=Path)
    a.add_argument("delta", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--sha256", required=True, help="the target's sha256, as trusted (signed metadata)")
    a.add_argument("--length", type=int, required=True, help="the target's length in bytes")
    args = ap.parse_args(argv)
    try:
        if args.command == "build":
            with args.base.open("rb") as bf, args.target.open("rb") as tf, args.delta.open("wb") as df:
                info = build_delta(bf, tf, df, level=args.level)
        else:
            info = apply_file(args.base, args.delta, args.out, target_sha256=args.sha256, target_length=args.length)
    except (OSError, DeltaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(info)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
