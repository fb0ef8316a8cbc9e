"""Downtime benchmark: how long an application is unavailable while the agent updates it, and while
it rolls a bad version back, measured by a probe polling the application.

What it does, in one run:

1. ``corral server`` (SQLite) and one real ``corral agent`` process (provisioned with the TUF root,
   ``[update] health_interval = 0.1``). Three app bundles of an HTTP application that answers
   ``GET /`` on a fixed loopback port: v1, v2 (healthy) and v3 (its health command fails), uploaded
   through the API.
2. v1 is deployed (``POST /api/v1/deployments``) and awaited. Then a probe thread polls the
   application every ``--probe-interval`` (a new TCP connection and ``GET /`` each time, 0.5 s
   timeout) while v2 is deployed (**update**: stop v1, start v2 from the other slot, health check,
   commit), and then while v3 is deployed (the switch to v3, its failing health check, and the
   **rollback**: stop v3, start v2 again). Downtime = the longest run of failed probes (from the
   last success before it to the first success after it). For v3, the gap at the rollback is the
   last one of that deployment.
3. **Reference**, same run, same application: the bare restart of the v1 process by hand
   (SIGTERM, wait, start it again), probed the same way: the floor of any stop-and-start update of
   this application on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import textwrap
import threading
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
    tail,
)

GOAL_S = 2.0

APP = textwrap.dedent("""\
    import http.server, sys
    VERSION = open("VERSION").read().strip()
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = VERSION.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    class S(http.server.ThreadingHTTPServer):
        allow_reuse_address = True
        def handle_error(self, request, client_address):
            pass  # a probe cut off by a stop is expected here
    S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _bundle(path: Path, version: str, port: int, healthy: bool) -> Path:
    health = (f'[health]\nhttp = "http://127.0.0.1:{port}/"\ntimeout = "20s"\n' if healthy
              else '[health]\ncommand = "sh -c \'exit 3\'"\ntimeout = "3s"\n')
    manifest = f'name = "demo"\nversion = "{version}"\n[run]\ncommand = "{PY} app.py {port}"\n{health}'
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("corral-app.toml", manifest), ("app.py", APP), ("VERSION", version)):
            raw = data.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(raw), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(raw))
    return path


class Probe:
    """Polls ``GET /`` on the port; records (time, ok)."""

    def __init__(self, port: int, interval: float) -> None:
        self.port, self.interval = port, interval
        self.samples: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _once(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/1.0 200")
        except OSError:
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._once()))
            time.sleep(self.interval)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def gaps(self) -> list[float]:
        """Each run of failed probes, as seconds from the success before it to the success after."""
        out: list[float] = []
        last_ok: float | None = None
        failing = False
        for t, ok in self.samples:
            if ok:
                if failing and last_ok is not None:
                    out.append(t - last_ok)
                last_ok, failing = t, False
            else:
                failing = True
        if failing:
            raise RuntimeError("the application did not come back")
        return out


def _deploy(server: CorralServer, ref: str, device: str, expect: str, margin: float = 0.0,
            timeout: float = 120.0) -> dict[str, Any]:
    """Deploy ``ref`` to ``device`` and wait until it ends as ``expect``; ``margin`` seconds of
    quiet before and after, so that a probe sees the application steady on both sides."""
    time.sleep(margin)
    with server.client() as c:
        dep = c.post("/deployments", json={"artifact": ref, "devices": [device]}).raise_for_status().json()["id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row: dict[str, Any] = c.get(f"/deployments/{dep}").raise_for_status().json()["devices"][0]
            if row["status"] in ("succeeded", "failed", "rolled-back"):
                if row["status"] != expect:
                    raise RuntimeError(f"{ref} ended {row['status']}, not {expect}: {row}")
                time.sleep(margin)
                return row
            time.sleep(0.1)
    raise RuntimeError(f"deployment of {ref} did not finish in {timeout:g} s")


def run(probe_interval: float, quick: bool, keep: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-downtime-"))
    server = CorralServer(tmp / "corral")
    agent: subprocess.Popen[bytes] | None = None
    manual: subprocess.Popen[bytes] | None = None
    result = new_result("downtime", "Downtime: an app's unavailability during an update and a rollback",
                        {"probe_interval_s": probe_interval}, quick)
    port = free_port()
    try:
        server.init()
        server.start()
        with server.client() as c:
            token = c.post("/enrollment-tokens", json={"description": "bench"}).raise_for_status().json()["token"]
            (tmp / "root.json").write_bytes(c.get("/tuf/root.json").raise_for_status().content)
            for version, healthy in (("1.0.0", True), ("2.0.0", True), ("3.0.0", False)):
                bundle = _bundle(tmp / f"demo-{version}.tar.gz", version, port, healthy)
                with bundle.open("rb") as f:
                    c.post("/artifacts", params={"name": "demo", "version": version, "kind": "app",
                                                 "filename": bundle.name}, content=f).raise_for_status()
        (tmp / "agent.toml").write_text("[update]\nhealth_interval = 0.1\nreserve_bytes = 0\n")
        with (tmp / "agent.log").open("ab") as log:
            agent = subprocess.Popen([PY, "-m", "corral", "agent", "--server", server.url, "--enroll-token", token,
                                      "--state-dir", str(tmp / "agent"), "--config", str(tmp / "agent.toml"),
                                      "--tuf-root", str(tmp / "root.json")], stdout=log, stderr=subprocess.STDOUT)
        device = None
        deadline = time.monotonic() + 60
        while device is None:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not come online:\n{tail(tmp / 'agent.log')}")
            with server.client() as c:
                online = [d for d in c.get("/devices").json()["items"] if d.get("online")]
            device = online[0]["id"] if online else None
            time.sleep(0.2)
        _deploy(server, "demo@1.0.0", device, "succeeded")
        with Probe(port, probe_interval) as update_probe:
            _deploy(server, "demo@2.0.0", device, "succeeded", margin=1.0)
        with Probe(port, probe_interval) as rollback_probe:
            third = _deploy(server, "demo@3.0.0", device, "rolled-back", margin=1.0)
        update_gaps, rollback_gaps = update_probe.gaps(), rollback_probe.gaps()
        # the reference: the same app, stopped and started by hand
        app_dir = tmp / "manual"
        app_dir.mkdir()
        (app_dir / "app.py").write_text(APP)
        (app_dir / "VERSION").write_text("1.0.0")
        ref_port = free_port()
        manual = subprocess.Popen([PY, "app.py", str(ref_port)], cwd=app_dir)
        with Probe(ref_port, probe_interval) as ref_probe:
            time.sleep(1)
            manual.send_signal(signal.SIGTERM)
            manual.wait(10)
            manual = subprocess.Popen([PY, "app.py", str(ref_port)], cwd=app_dir)
            time.sleep(1.5)
        ref_gaps = ref_probe.gaps()
        ref = max(ref_gaps, default=0.0)
        update_s = max(update_gaps, default=0.0)
        rollback_s = rollback_gaps[-1] if rollback_gaps else 0.0
        add_figures(
            result,
            Figure("app unavailable during an update (v1 → v2)", update_s, "s", reference=ref,
                   goal=f"< {GOAL_S:g} s", met=update_s < GOAL_S, note=f"{len(update_gaps)} gap(s)"),
            Figure("app unavailable during a rollback (v3 unhealthy → v2)", rollback_s, "s", reference=ref,
                   goal=f"< {GOAL_S:g} s", met=rollback_s < GOAL_S,
                   note=f"gaps of the v3 deployment: {', '.join(f'{g:.2f}' for g in rollback_gaps)} s"),
        )
        result["details"] = {"update_gaps_s": update_gaps, "rollback_gaps_s": rollback_gaps,
                             "reference_gaps_s": ref_gaps, "v3": third}
        result["method"] = (
            "One `corral server` (SQLite) and one real `corral agent` (provisioned with the TUF root, "
            "`[update] health_interval = 0.1`). App bundles (tar.gz) of a small Python HTTP server on a fixed "
            "loopback port, uploaded through the API and deployed through `POST /api/v1/deployments`: v1, then "
            "v2 (healthy; its health check is an HTTP probe of the app), then v3 (its health command fails, so "
            "the agent rolls back to v2). A probe opens a new TCP connection and sends `GET /` every "
            f"{probe_interval * 1000:g} ms (0.5 s timeout). Downtime = the longest run of failed probes, from the "
            "success before it to the success after it; for the rollback, the last gap of the v3 deployment (the "
            "first is its switch to v3). **Reference**, same run: the same application stopped (SIGTERM) and "
            "started again by hand, probed the same way.")
    finally:
        for p in (manual, agent):
            if p is not None:
                stop_process(p)
        server.stop()
        with contextlib.suppress(Exception):  # the app the agent supervises runs in its own process group
            subprocess.run(["pkill", "-f", f"app.py {port}"], check=False)
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _parser() -> argparse.ArgumentParser:
    ap = bench_parser("downtime", __doc__ or "", "the same steps; results kept apart")
    ap.add_argument("--probe-interval", type=float, default=0.02, help="seconds between probes")
    return ap


def main_result(argv: list[str] | None = None) -> dict[str, Any]:
    a = _parser().parse_args(argv)
    return run(a.probe_interval, a.quick, a.keep)


if __name__ == "__main__":
    bench_main(_parser(), main_result)
