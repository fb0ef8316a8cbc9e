"""Download benchmark: artifact download throughput from ``corral server``, beside a plain static
file server serving the same file in the same run.

What it does, in one run:

1. **Corral.** ``corral server`` (SQLite) with an artifact of ``--size`` MiB of incompressible
   bytes uploaded through the API (``POST /api/v1/artifacts``), downloaded from the device-facing
   route a device's ``corral tuf-client`` uses (``/device/v1/tuf/targets/…``, the path the
   artifact's ``tuf.target_url_path`` names), ``--rounds`` times, by ``curl`` (a C client, so the
   client is not what is measured), discarding the bytes. Each round checks the size curl got.
2. **Reference** (same run, same file): a bare uvicorn + Starlette ``StaticFiles`` app serving the
   artifact's file from the server's artifact folder, with the same event loop and HTTP parser
   (uvloop, httptools) as the Corral server: a plain static file server, the floor of Corral's
   serving stack.
3. **Resume**: one Range request for the second half (``206``), checked for length.

The figure is the median throughput over the rounds (MB/s, 10^6 bytes), Corral ÷ reference; the
goal is at least 80 % of the reference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    CorralServer,
    Figure,
    add_figures,
    bench_main,
    bench_parser,
    free_port,
    new_result,
    stop_process,
    wait_http_ok,
)

GOAL_RATIO = 0.8
MB = 1e6


def _make_artifact(path: Path, size: int) -> None:
    """``size`` bytes that do not compress (so no layer can cheat with compression)."""
    chunk = 1 << 20
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def _curl(url: str, expect: int, range_from: int | None = None) -> float:
    """Seconds for curl to fetch ``url`` into /dev/null; fails if the size differs."""
    args = ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{http_code}", url]
    if range_from is not None:
        args[1:1] = ["-r", f"{range_from}-"]
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"curl {url}: {out.stderr.strip()}")
    size, code = out.stdout.split()
    want_code = "206" if range_from is not None else "200"
    if int(size) != expect or code != want_code:
        raise RuntimeError(f"curl {url}: got {size} bytes, HTTP {code}; expected {expect}, {want_code}")
    return elapsed


def _static_server(directory: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    code = textwrap.dedent(f"""
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
        app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok")),
                                Mount("/files", StaticFiles(directory={str(directory)!r}))])
        uvicorn.run(app, host="127.0.0.1", port={port}, loop="uvloop", http="httptools", log_level="warning")
    """)
    with log.open("ab") as out:
        proc = subprocess.Popen([PY, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(url + "/", proc, log, timeout=30)
    return proc, url


def run(size_mib: int, rounds: int, quick: bool, keep: bool) -> dict[str, Any]:
    if shutil.which("curl") is None:
        raise RuntimeError("curl is needed (the download client)")
    size = size_mib << 20
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-download-"))
    server = CorralServer(tmp / "corral")
    static: subprocess.Popen[bytes] | None = None
    result = new_result("download", "Download: artifact throughput beside a plain static file server",
                        {"size_mib": size_mib, "rounds": rounds}, quick)
    try:
        server.init()
        server.start()
        blob = tmp / "artifact.img"
        _make_artifact(blob, size)
        with server.client(timeout=600) as c, blob.open("rb") as f:
            r = c.post("/artifacts", params={"name": "bench-image", "version": "1.0.0", "kind": "rootfs",
                                              "filename": "image.img"}, content=f)
            if r.status_code != 201:
                raise RuntimeError(f"upload: {r.status_code} {r.text}")
            info = c.get("/artifacts/bench-image/1.0.0").json()
        tuf = info["tuf"]
        corral_url = tuf["target_base_url"].rstrip("/") + "/" + tuf["target_url_path"].lstrip("/")
        stored = server.data_dir / "artifacts" / info["sha256"]
        if not stored.exists():
            raise RuntimeError(f"the artifact is not at {stored}")
        static, static_url = _static_server(stored.parent, tmp / "static.log")
        ref_url = f"{static_url}/files/{stored.name}"
        _curl(corral_url, size)  # warm-up: page cache, connections
        _curl(ref_url, size)
        corral_s, ref_s = [], []
        for _ in range(rounds):  # interleaved, so that drift in the machine hits both alike
            corral_s.append(_curl(corral_url, size))
            ref_s.append(_curl(ref_url, size))
        half = size // 2
        _curl(corral_url, size - half, range_from=half)
        corral_mbs = size / MB / statistics.median(corral_s)
        ref_mbs = size / MB / statistics.median(ref_s)
        add_figures(result, Figure(
            "download throughput", corral_mbs, "MB/s", reference=ref_mbs, goal=f"≥ {GOAL_RATIO:.0%} of reference",
            met=corral_mbs >= GOAL_RATIO * ref_mbs, better="higher",
            note=f"median of {rounds}, {size_mib} MiB artifact, curl to /dev/null"))
        result["details"] = {"corral_s": corral_s, "reference_s": ref_s, "url_path": tuf["target_url_path"]}
        result["method"] = (
            f"One `corral server` (SQLite); an artifact of {size_mib} MiB of random bytes uploaded through "
            "`POST /api/v1/artifacts`, then fetched from the device route a device's `corral tuf-client` uses "
            "(`/device/v1/tuf/targets/NAME/VERSION/SHA256.FILE`, Range-capable, streamed from disk) by `curl` into "
            f"/dev/null, {rounds} rounds after one warm-up, each checked for its size. **Reference**, interleaved "
            "round by round: a bare uvicorn + Starlette `StaticFiles` app (uvloop, httptools: the Corral server's "
            "own loop and parser) serving the same stored file. Figure: median throughput, MB = 10^6 bytes. A Range "
            "request for the second half is checked for a 206 of the right length.")
    finally:
        if static is not None:
            stop_process(static)
        server.stop()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _parser() -> argparse.ArgumentParser:
    ap = bench_parser("download", __doc__ or "", "32 MiB, 2 rounds")
    ap.add_argument("--size", type=int, default=512, help="artifact size, MiB")
    ap.add_argument("--rounds", type=int, default=5)
    return ap


def main_result(argv: list[str] | None = None) -> dict[str, Any]:
    a = _parser().parse_args(argv)
    if a.quick:
        a.size, a.rounds = min(a.size, 32), min(a.rounds, 2)
    return run(a.size, a.rounds, a.quick, a.keep)


if __name__ == "__main__":
    bench_main(_parser(), main_result)
