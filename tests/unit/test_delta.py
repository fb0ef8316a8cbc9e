"""corral.delta: round trips over the shapes updates take, and refusals of wrong bases and of
truncated, corrupt or hostile deltas."""

from __future__ import annotations

import hashlib
import io
import random
import struct
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import delta as d


def _image(rng: random.Random, size: int) -> bytes:
    """Extents of zeros, repeated text and random bytes, like a small filesystem image."""
    out = bytearray()
    while len(out) < size:
        k = rng.randrange(3)
        if k == 0:
            out += bytes(16384)
        elif k == 1:
            out += (b"line %d of some config\n" % rng.randrange(1000)) * 700
        else:
            out += rng.randbytes(16384)
    return bytes(out[:size])


def _change_blocks(rng: random.Random, data: bytes, pct: float, block: int = 4096) -> bytes:
    t = bytearray(data)
    n = len(data) // block
    for i in rng.sample(range(n), int(n * pct / 100)):
        if rng.random() < 0.5:
            t[i * block:(i + 1) * block] = rng.randbytes(block)
        else:
            j = i * block + rng.randrange(block - 8)
            t[j:j + 8] = rng.randbytes(8)
    return bytes(t)


def _build(base: bytes, target: bytes, **kw: int) -> tuple[bytes, d.DeltaInfo]:
    out = io.BytesIO()
    info = d.build_delta(io.BytesIO(base), io.BytesIO(target), out, level=kw.pop("level", 3), **kw)
    assert info.delta_length == len(out.getvalue())
    return out.getvalue(), info


def _apply(base: bytes, delta: bytes, **kw: object) -> bytes:
    out = io.BytesIO()
    d.apply_delta(io.BytesIO(base), io.BytesIO(delta), out, **kw)  # type: ignore[arg-type]
    return out.getvalue()


def _roundtrip(base: bytes, target: bytes, **kw: int) -> bytes:
    delta, info = _build(base, target, **kw)
    assert _apply(base, delta) == target
    assert info.copied + info.literal == len(target)
    assert info.target_sha256 == hashlib.sha256(target).hexdigest()
    return delta


@pytest.mark.parametrize("pct", [0, 1, 2, 10, 50, 100])
def test_changed_blocks_round_trip_and_stay_small(pct: int) -> None:
    rng = random.Random(pct)
    base = _image(rng, 1 << 20)
    target = _change_blocks(rng, base, pct)
    delta = _roundtrip(base, target)
    if pct <= 10:  # a rewritten block costs its 4 KiB, an edited one a few bytes
        assert len(delta) <= len(target) * pct / 100 * 0.6 + 4096


def test_identical_inputs_are_one_copy() -> None:
    base = _image(random.Random(1), 300_001)
    delta, info = _build(base, base)
    assert _apply(base, delta) == base
    assert info.literal == 0
    assert len(delta) == d.HEADER_SIZE + 1 + 16 + 1  # one COPY, END


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("shift", [1, 7, 4096, 100_000, -3, -5000])
def test_inserted_and_deleted_bytes(where: str, shift: int) -> None:
    rng = random.Random(shift)
    base = _image(rng, 600_000)
    at = {"start": 10, "middle": 300_123, "end": 599_000}[where]
    target = base[:at] + rng.randbytes(shift) + base[at:] if shift > 0 else base[:at] + base[at - shift:]
    delta = _roundtrip(base, target)
    # the shifted content is found (by block or within the dictionary window), not resent
    assert len(delta) < max(shift, 0) + 60_000


def test_empty_base_empty_target_and_unrelated_target() -> None:
    rng = random.Random(3)
    data = _image(rng, 200_000)
    _roundtrip(b"", data)
    _roundtrip(data, b"")
    _roundtrip(b"", b"")
    other = rng.randbytes(150_000)
    delta = _roundtrip(data, other)
    assert len(delta) < len(other) + 1024  # random bytes do not compress: the cost is framing


def test_partial_last_blocks_and_block_moves() -> None:
    rng = random.Random(4)
    base = rng.randbytes(4096 * 20 + 123)
    blocks = [base[i:i + 4096] for i in range(0, len(base) - 123, 4096)]
    rng.shuffle(blocks)
    target = b"".join(blocks) + base[-123:]
    _, info = _build(base, target)
    assert info.literal == 0  # every block, the partial one too, is found wherever it moved
    _roundtrip(base, target)


def test_small_segments_and_odd_parameters() -> None:
    rng = random.Random(5)
    base = _image(rng, 100_000)
    target = _change_blocks(rng, base, 30, block=512)
    _roundtrip(base, target, block_size=512, max_segment=2048, max_dict=4096)
    with pytest.raises(d.DeltaError):
        _build(base, target, block_size=4096, max_segment=1024)


def test_wrong_base_is_refused_before_writing() -> None:
    rng = random.Random(6)
    base = _image(rng, 100_000)
    delta, _ = _build(base, _change_blocks(rng, base, 5))
    for wrong in (base[:-1], base[:-1] + b"\x00" if base[-1] else base[:-1] + b"\x01", b""):
        out = io.BytesIO()
        with pytest.raises(d.DeltaBaseMismatch, match="wrong base"):
            d.apply_delta(io.BytesIO(wrong), io.BytesIO(delta), out)
        assert out.getvalue() == b""


def test_truncated_deltas_are_refused() -> None:
    rng = random.Random(7)
    base = _image(rng, 200_000)
    delta, _ = _build(base, _change_blocks(rng, base, 10))
    for n in sorted({0, 5, d.HEADER_SIZE - 1, d.HEADER_SIZE, d.HEADER_SIZE + 3, len(delta) // 2, len(delta) - 1}):
        with pytest.raises(d.DeltaCorrupt):
            _apply(base, delta[:n])


def test_a_flipped_byte_never_gives_a_wrong_output() -> None:
    """Refused, or (a byte that changes nothing: a bound in the header, the dictionary of a frame
    that does not use it) the exact target: the output's sha256 is checked at END."""
    rng = random.Random(8)
    base = _image(rng, 60_000)
    target = _change_blocks(rng, base, 20, block=1024)
    delta, _ = _build(base, target, block_size=1024)
    refused = 0
    for i in range(len(delta)):
        bad = bytearray(delta)
        bad[i] ^= 0x41
        try:
            assert _apply(base, bytes(bad)) == target
        except d.DeltaError:
            refused += 1
    assert refused > len(delta) * 0.9


def _header(base: bytes, target: bytes, *, version: int = 1, block: int = 4096, seg: int = 1 << 20,
            dct: int = 1 << 20) -> bytes:
    return struct.pack(">8sHHIIIQ32sQ32s", d.MAGIC, version, 0, block, seg, dct, len(base),
                       hashlib.sha256(base).digest(), len(target), hashlib.sha256(target).digest())


def test_hostile_headers_and_ops_are_refused() -> None:
    base = b"B" * 10_000
    target = b"T" * 5000
    h = _header(base, target)
    cases = {
        "bad magic": b"NOTDELTA" + h[8:] + b"\x00",
        "version 2": _header(base, target, version=2) + b"\x00",
        "huge segment": _header(base, target, seg=1 << 31) + b"\x00",
        "huge dictionary": _header(base, target, dct=1 << 31) + b"\x00",
        "copy outside the base": h + b"\x01" + struct.pack(">QQ", 9_000, 2_000) + b"\x00",
        "copy past the target": h + b"\x01" + struct.pack(">QQ", 0, 6_000) + b"\x00",
        "copy of 2^64-1": h + b"\x01" + struct.pack(">QQ", 1, 2**64 - 1) + b"\x00",
        "dictionary outside the base": h + b"\x02" + struct.pack(">QIII", 9_999, 2, 10, 10) + b"\x00" * 11,
        "frame larger than its output may need": h + b"\x02" + struct.pack(">QIII", 0, 0, 10, 1 << 30),
        "segment over the header's": h + b"\x02" + struct.pack(">QIII", 0, 0, (1 << 20) + 1, 100),
        "unknown op": h + b"\x07",
        "bytes after END": h + b"\x01" + struct.pack(">QQ", 0, 0) + b"\x00\x00",
        "short output": h + b"\x00",
    }
    for name, delta in cases.items():
        out = io.BytesIO()
        with pytest.raises(d.DeltaCorrupt):
            d.apply_delta(io.BytesIO(base), io.BytesIO(delta), out)
        assert len(out.getvalue()) <= len(target), name


def test_a_frame_that_lies_about_its_size_is_refused() -> None:
    base = b""
    target = b"x" * 100
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * 10_000_000)  # a few hundred bytes
    for out_len in (100, 10_000_000):
        delta = _header(base, target, seg=1 << 20) + b"\x02" + struct.pack(">QIII", 0, 0, out_len, len(bomb)) \
            + bomb + b"\x00"
        with pytest.raises(d.DeltaCorrupt):
            _apply(base, delta)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(target)
    delta = _header(base, target) + b"\x02" + struct.pack(">QIII", 0, 0, 100, len(no_size)) + no_size + b"\x00"
    with pytest.raises(d.DeltaCorrupt, match="declares"):
        _apply(base, delta)


def test_limits_are_the_applier_s_own() -> None:
    rng = random.Random(9)
    base = _image(rng, 100_000)
    delta, _ = _build(base, _change_blocks(rng, base, 10))
    with pytest.raises(d.DeltaCorrupt, match="limits"):
        _apply(base, delta, limits=d.ApplyLimits(max_dict=1 << 20))
    info = d.read_header(io.BytesIO(delta))
    assert (info.block_size, info.max_segment, info.max_dict) == (4096, 1 << 20, 3 << 20)


def test_a_base_longer_than_the_image_is_its_first_bytes() -> None:
    """A rootfs base is read from a partition larger than the image that was written to it."""
    rng = random.Random(10)
    base = _image(rng, 50_000)
    target = _change_blocks(rng, base, 10)
    delta, _ = _build(base, target)
    assert _apply(base + rng.randbytes(7000), delta) == target


def test_apply_file_is_crash_safe_and_checks_the_expected_target(tmp_path: Path) -> None:
    rng = random.Random(11)
    base = _image(rng, 80_000)
    target = _change_blocks(rng, base, 10)
    delta, _ = _build(base, target)
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "delta").write_bytes(delta)
    out = tmp_path / "new" / "image"
    out.parent.mkdir()
    sha = hashlib.sha256(target).hexdigest()
    with pytest.raises(d.DeltaCorrupt, match="not the expected"):
        d.apply_file(tmp_path / "base", tmp_path / "delta", out, target_sha256="0" * 64, target_length=len(target))
    (tmp_path / "delta").write_bytes(delta[:-1])
    with pytest.raises(d.DeltaCorrupt, match="truncated"):
        d.apply_file(tmp_path / "base", tmp_path / "delta", out, target_sha256=sha, target_length=len(target))
    assert list(out.parent.iterdir()) == []  # nothing half-written left behind
    (tmp_path / "delta").write_bytes(delta)
    info = d.apply_file(tmp_path / "base", tmp_path / "delta", out, target_sha256=sha.upper(),
                        target_length=len(target))
    assert out.read_bytes() == target and info.target_sha256 == sha


def test_command_line_builds_and_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(12)
    base = _image(rng, 50_000)
    target = _change_blocks(rng, base, 10)
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "target").write_bytes(target)
    p = [str(tmp_path / n) for n in ("base", "target", "delta", "out")]
    assert d.main(["build", p[0], p[1], p[2], "--level", "3"]) == 0
    sha = hashlib.sha256(target).hexdigest()
    assert d.main(["apply", p[0], p[2], p[3], "--sha256", sha, "--length", str(len(target))]) == 0
    assert (tmp_path / "out").read_bytes() == target
    capsys.readouterr()
    (tmp_path / "base").write_bytes(base[:-1])
    assert d.main(["apply", p[0], p[2], p[3], "--sha256", sha, "--length", str(len(target))]) == 1
    assert capsys.readouterr().err.startswith("error: wrong base")


_edit = st.tuples(st.sampled_from(["insert", "delete", "replace"]), st.integers(0, 5000), st.binary(max_size=300))


@settings(max_examples=150, deadline=None)
@given(base=st.binary(max_size=3000).map(lambda b: b * 3), edits=st.lists(_edit, max_size=6),
       block=st.sampled_from([64, 128, 512]))
def test_any_edits_round_trip(base: bytes, edits: list[tuple[str, int, bytes]], block: int) -> None:
    target = base
    for kind, at, data in edits:
        at = min(at, len(target))
        if kind == "insert":
            target = target[:at] + data + target[at:]
        elif kind == "delete":
            target = target[:at] + target[at + len(data):]
        else:
            target = target[:at] + data + target[at + len(data):]
    _roundtrip(base, target, block_size=block, max_segment=4 * block, max_dict=16 * block)
