"""Delta benchmark: Corral's block delta (``corral.delta``) beside ``zstd --patch-from`` and the
full compressed artifact, on the same generated image.

What it does, in one run:

1. **Inputs.** A base image of ``--size`` MiB shaped like a filesystem image: 256 KiB extents of
   zeros, of text-like data (slices of a generated word corpus) and of random bytes (compressed
   or encrypted files). The target has ``--changed`` % of its 4 KiB blocks changed: half rewritten
   with random bytes (a new file's contents), half with 16 bytes edited in place.
2. **Corral.** ``build_delta`` in this process (level ``--level``), timed; applied by
   ``python -m corral.delta apply`` in a child process (which verifies the base and the output),
   its peak RSS read from ``wait4``.
3. **References** (same inputs): ``zstd -LEVEL --long=W --patch-from=BASE`` (the zstd CLI's
   delta) built and applied, its apply's peak RSS read from ``wait4`` too; and the target
   compressed by ``zstd -LEVEL --long=W`` (the full artifact a device without the base
   downloads). In the details, not a figure: the zstandard library's take on the same (the
   whole base as a raw-content dictionary), the option the issue named first.

Goals (the delta issue): delta ≤ 1.2× the zstd CLI patch and ≤ 10 % of the full compressed
artifact; applying in ≤ 64 MB RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.common import PY, Figure, add_figures, bench_main, bench_parser, new_result

MB = 1e6
BLOCK = 4096
EXTENT = 256 << 10
GOAL_VS_CLI = 1.2
GOAL_VS_FULL = 0.10
GOAL_RSS_MB = 64.0

_WORDS = (
    "the", "device", "fleet", "update", "rollout", "config", "kernel", "module", "service", "network",
    "interface", "sensor", "value", "error", "warning", "info", "debug", "timestamp", "version", "artifact",
    "image", "slot", "boot", "agent", "server", "metric", "library", "binary", "python", "systemd",
    "journal", "mount", "partition", "block", "inode", "directory", "file",
)


def _corpus(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        words = rng.choices(_WORDS, k=12)
        out += f"{rng.randrange(10**9):09d} {' '.join(words)} {rng.random():.6f}\n".encode()
    return bytes(out[:size])


def make_inputs(base: Path, target: Path, size: int, changed_pct: float, seed: int = 7) -> dict[str, int]:
    """Write the base image and the target; returns the counts of extents and changed blocks."""
    rng = random.Random(seed)
    corpus = _corpus(rng, 8 << 20)
    kinds = {"zero": 0, "text": 0, "random": 0}
    with base.open("wb") as f:
        left = size
        while left > 0:
            n = min(EXTENT, left)
            k = rng.choices(("zero", "text", "random"), weights=(25, 45, 30))[0]
            kinds[k] += 1
            if k == "zero":
                f.write(bytes(n))
            elif k == "text":
                at = rng.randrange(len(corpus) - n)
                f.write(corpus[at:at + n])
            else:
                f.write(rng.randbytes(n))
            left -= n
    nblocks = size // BLOCK
    chosen = sorted(rng.sample(range(nblocks), int(nblocks * changed_pct / 100)))
    shutil.copyfile(base, target)
    rewritten = 0
    with target.open("r+b") as f:
        for i in chosen:
            if rng.random() < 0.5:
                f.seek(i * BLOCK)
                f.write(rng.randbytes(BLOCK))
                rewritten += 1
            else:
                f.seek(i * BLOCK + rng.randrange(BLOCK - 16))
                f.write(rng.randbytes(16))
    return {**{f"extents_{k}": v for k, v in kinds.items()}, "blocks": nblocks, "blocks_changed": len(chosen),
            "blocks_rewritten": rewritten}


# Linux carries the hiwater RSS of the process that exec'd into a child's ru_maxrss, so a child
# started straight from this (large) process would report this process's peak. A small Python
# process starts the command instead and reports its wait4: the floor is that process (~10 MB).
_RUNNER = textwrap.dedent("""
    import json, os, sys, time
    t0 = time.perf_counter()
    pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
    _, status, usage = os.wait4(pid, 0)
    print(json.dumps({"seconds": time.perf_counter() - t0, "exit": os.waitstatus_to_exitcode(status),
                      "maxrss_kb": usage.ru_maxrss}))
""")


def _timed_child(args: list[str]) -> tuple[float, float]:
    """Run ``args``; seconds and peak RSS (MB, from ``wait4`` in a small parent)."""
    out = subprocess.run([PY, "-c", _RUNNER, *args], capture_output=True, text=True, check=False, timeout=3600)
    try:
        r = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}") from None
    if r["exit"] != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r['exit']}: {out.stderr.strip()}")
    return float(r["seconds"]), r["maxrss_kb"] * 1024 / MB


_LIBRARY_APPLY = textwrap.dedent("""
    import sys
    import zstandard
    with open(sys.argv[1], "rb") as f:
        base = f.read()
    zdict = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    dctx = zstandard.ZstdDecompressor(dict_data=zdict, max_window_size=1 << 31)
    with open(sys.argv[2], "rb") as f, open(sys.argv[3], "wb") as out:
        dctx.copy_stream(f, out)
""")


def library_patch(base: Path, target: Path, patch: Path, out: Path, long_log: int) -> dict[str, float]:
    """The zstandard library's take on ``--patch-from``: the whole base as a raw-content
    dictionary, long-distance matching, a window covering it (level 3: the point is its size
    and its memory, not its speed). Applied in a child (peak RSS from ``wait4``)."""
    import zstandard

    zdict = zstandard.ZstdCompressionDict(base.read_bytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=long_log, enable_ldm=True)
    t0 = time.perf_counter()
    patch.write_bytes(zstandard.ZstdCompressor(dict_data=zdict, compression_params=params).compress(
        target.read_bytes()))
    build_s = time.perf_counter() - t0
    del zdict
    apply_s, rss_mb = _timed_child([PY, "-c", _LIBRARY_APPLY, str(base), str(patch), str(out)])
    if out.read_bytes() != target.read_bytes():
        raise RuntimeError("the zstandard library's patch did not rebuild the target")
    return {"bytes": patch.stat().st_size, "build_s": build_s, "apply_s": apply_s, "apply_maxrss_mb": rss_mb}


def run(size_mib: int, changed: float, level: int, quick: bool, keep: bool) -> dict[str, Any]:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise RuntimeError("the zstd CLI is needed (the reference)")
    from corral.delta import build_delta

    size = size_mib << 20
    long_log = max(10, (2 * size - 1).bit_length())  # a window covering base + target
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-delta-"))
    result = new_result("delta", "Delta: block delta beside zstd --patch-from and the full artifact",
                        {"size_mib": size_mib, "changed_pct": changed, "level": level, "zstd_long": long_log},
                        quick)
    try:
        base, target = tmp / "base.img", tmp / "target.img"
        shape = make_inputs(base, target, size, changed)
        ours, cli_patch, full = tmp / "ours.delta", tmp / "cli.patch.zst", tmp / "full.zst"
        # ours: build in process, apply in a child (its peak RSS is the device's)
        t0 = time.perf_counter()
        with base.open("rb") as b, target.open("rb") as t, ours.open("wb") as o:
            info = build_delta(b, t, o, level=level)
        ours_build = time.perf_counter() - t0
        ours_apply, ours_rss = _timed_child([PY, "-m", "corral.delta", "apply", str(base), str(ours),
                                             str(tmp / "ours.out"), "--sha256", info.target_sha256,
                                             "--length", str(info.target_length)])
        # the zstd CLI: patch, apply (checked), and the full artifact
        zl = [f"-{level}", *(["--ultra"] if level > 19 else []), f"--long={long_log}", "-q", "-f"]
        cli_build, _ = _timed_child([zstd, *zl, f"--patch-from={base}", str(target), "-o", str(cli_patch)])
        cli_apply, cli_rss = _timed_child([zstd, "-d", *zl[-3:], f"--patch-from={base}", str(cli_patch),
                                           "-o", str(tmp / "cli.out")])
        if (tmp / "cli.out").read_bytes() != target.read_bytes():
            raise RuntimeError("zstd --patch-from did not rebuild the target")
        full_s, _ = _timed_child([zstd, *zl, str(target), "-o", str(full)])
        library = library_patch(base, target, tmp / "lib.patch.zst", tmp / "lib.out", long_log)
        (tmp / "lib.out").unlink()
        ours_mb, cli_mb, full_mb = info.delta_length / MB, cli_patch.stat().st_size / MB, full.stat().st_size / MB
        add_figures(
            result,
            Figure("delta size", ours_mb, "MB", reference=cli_mb, goal=f"≤ {GOAL_VS_CLI}× zstd --patch-from",
                   met=ours_mb <= GOAL_VS_CLI * cli_mb, note="reference: zstd CLI --patch-from"),
            Figure("delta size vs the full artifact", ours_mb, "MB", reference=full_mb,
                   goal=f"≤ {GOAL_VS_FULL:.0%} of the full artifact", met=ours_mb <= GOAL_VS_FULL * full_mb,
                   note=f"reference: the target, zstd -{level} --long"),
            Figure("apply peak RSS", ours_rss, "MB", reference=cli_rss, goal=f"≤ {GOAL_RSS_MB:.0f} MB",
                   met=ours_rss <= GOAL_RSS_MB, note="reference: zstd -d --patch-from"),
            Figure("build time", ours_build, "s", reference=cli_build, note="reference: zstd --patch-from"),
            Figure("apply time", ours_apply, "s", reference=cli_apply,
                   note="ours includes hashing the base and the output; reference: zstd -d --patch-from"),
        )
        result["details"] = {
            "inputs": shape, "ours": {"bytes": info.delta_length, "copied": info.copied, "literal": info.literal,
                                      "build_s": ours_build, "apply_s": ours_apply, "apply_maxrss_mb": ours_rss},
            "zstd_cli_patch": {"bytes": cli_patch.stat().st_size, "build_s": cli_build, "apply_s": cli_apply,
                               "apply_maxrss_mb": cli_rss},
            "full": {"bytes": full.stat().st_size, "compress_s": full_s},
            "zstandard_library_patch": library,
        }
        result["method"] = (
            f"A {size_mib} MiB base image of 256 KiB extents (zeros, text-like, random: "
            f"{shape['extents_zero']}/{shape['extents_text']}/{shape['extents_random']}); the target has "
            f"{shape['blocks_changed']} of its {shape['blocks']} 4 KiB blocks ({changed:g} %) changed, "
            f"{shape['blocks_rewritten']} rewritten with random bytes, the rest with 16 bytes edited. "
            f"**Corral**: `corral.delta.build_delta` (zstd level {level} for new data, with the base around it as "
            "a raw-content dictionary), timed in process; `python -m corral.delta apply` in a child process "
            "(which hashes the base first and verifies the output; the time includes the interpreter's start), "
            "its peak RSS from `wait4`. **References** on the same files: "
            f"`zstd -{level} --long={long_log} --patch-from=BASE` (zstd {_zstd_version(zstd)}), built and "
            "applied (`zstd -d`, peak RSS from `wait4`); the full artifact is the target compressed with "
            f"`zstd -{level} --long={long_log}`. MB = 10^6 bytes.")
        result["notes"] += [
            f"zstd --patch-from keeps the whole base in memory while applying ({cli_rss:.0f} MB RSS for a "
            f"{size_mib} MiB base); corral.delta holds one segment and one dictionary window (ADR 0014).",
            f"The zstandard library with the whole base as a raw-content dictionary (level 3, long-distance "
            f"matching, window 2^{long_log}): {library['bytes'] / MB:.1f} MB patch, built in "
            f"{library['build_s']:.1f} s, applied in {library['apply_s']:.2f} s with "
            f"{library['apply_maxrss_mb']:.0f} MB peak RSS.",
        ]
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _zstd_version(zstd: str) -> str:
    out = subprocess.run([zstd, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().split(" v")[-1].split(",")[0] if out.returncode == 0 else "?"


def _parser() -> argparse.ArgumentParser:
    ap = bench_parser("delta", __doc__ or "", "16 MiB, level 3")
    ap.add_argument("--size", type=int, default=256, help="image size, MiB")
    ap.add_argument("--changed", type=float, default=2.0, help="%% of 4 KiB blocks changed")
    ap.add_argument("--level", type=int, default=19, help="zstd level, for both")
    return ap


def main_result(argv: list[str] | None = None) -> dict[str, Any]:
    a = _parser().parse_args(argv)
    if a.quick:
        a.size, a.level = min(a.size, 16), 3
    return run(a.size, a.changed, a.level, a.quick, a.keep)


if __name__ == "__main__":
    bench_main(_parser(), main_result)
