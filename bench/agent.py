"""Agent benchmark: the memory and CPU of one idle ``corral agent`` process, beside the floor of
the interpreter it runs on and of a bare Python WebSocket client.

What it does, in one run:

1. **Corral.** A real ``corral server`` (a subprocess, SQLite) and one real agent process, started
   as a device would start it: ``python -m corral agent --server URL --enroll-token T
   --state-dir DIR`` with the default configuration (``LinuxPlatform``: psutil collectors of
   this machine; disk spool with fsync'd batch files; telemetry every 10 s; heartbeat every
   15 s as the server asks). It enrolls, is accepted, and then does what an idle device does:
   collect, spool, send, delete on ack, heartbeat. The agent runs **byte-compiled**, as an agent
   installed by pip (which writes ``.pyc`` files) does: see :func:`bytecode_env`.
2. **References**, started at the same time and measured the same way:
   *the interpreter's floor* — ``python -c`` that imports only ``time`` and sleeps (the same
   interpreter and ``site`` as the agent); *a WebSocket client's floor* — ``python -c`` with the
   ``websockets`` asyncio client (the library the agent used until ADR 0008, on plain asyncio
   like the agent) holding one idle connection to a bare ``websockets`` server.
3. After a settle period (the agent's first collection, its rules and inventory), a window of
   ``--window`` seconds: each process is sampled every second (``psutil``
   ``memory_full_info``: RSS, USS, PSS); CPU = (user + system CPU time at the end − at the
   start) ÷ wall time, as a share of one core. The server's Prometheus counter
   ``corral_telemetry_batches_total`` before and after the window shows the agent really sent
   (and had acked) its telemetry during it.

RSS counts every page the process maps, shared ones fully (libpython, libssl/libcrypto, libc,
other processes' copies of the same files); PSS divides shared pages among the processes that
map them; USS counts only the process's own pages (what killing it would free).

Run alone: ``python -m bench.agent [--window 60] [--settle 20] [--quick] [--no-docs]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    PY,
    ROOT,
    CorralServer,
    Figure,
    add_figures,
    finish,
    free_port,
    new_result,
    stop_process,
    tail,
)

RSS_GOAL_MB = 30.0
CPU_GOAL_PCT = 1.0
MB = 1_000_000  # the goal says MB: 10^6 bytes (30 MB = 28.6 MiB)

BARE = "import time\ntime.sleep(1e9)\n"

WS_SERVER = textwrap.dedent("""
    import asyncio, sys
    from websockets.asyncio.server import serve

    async def handler(ws):
        async for _ in ws:
            pass

    async def main():
        async with serve(handler, "127.0.0.1", int(sys.argv[1]), compression=None, ping_interval=None):
            print("listening", flush=True)
            await asyncio.Future()

    asyncio.run(main())
""")

WS_CLIENT = textwrap.dedent("""
    import asyncio, sys
    from websockets.asyncio.client import connect

    async def main():
        async with connect(sys.argv[1], compression=None, ping_interval=None) as ws:
            await ws.send("hello")
            print("connected", flush=True)
            await asyncio.Future()

    asyncio.run(main())
""")


def _popen(args: list[str], log: Path, stdout: Any = None,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=stdout if stdout is not None else out, stderr=out, cwd=ROOT, env=env)


#: what the compile step runs: the imports of ``corral agent`` at start and the reading of its
#: command line, so that the standard library's and the dependencies' modules they import get
#: their ``.pyc`` too
AGENT_STARTUP = ("import corral.cli.entry, corral.agent.cli, corral.agent.main, corral.agent.platform.linux, "
                 "corral.agent.transport; corral.agent.cli.parse_args(['--server', 'http://h', '--state-dir', 'd'])")


def bytecode_env(pycache: Path) -> dict[str, str]:
    """The agent's environment: bytecode caching allowed, the cache under ``pycache``.

    A device runs an installed agent: pip byte-compiles every module it installs, so the agent
    imports ``.pyc`` files. This source tree has none (it is an editable install, and this
    environment may set ``PYTHONDONTWRITEBYTECODE``), so an agent started from it as is compiles
    its own ~25 modules at every start, ~1 MB more RSS (31.1 MB against 30.2-30.3 MB with
    ``.pyc`` files, ADR 0007): a cost no installed agent pays. ``PYTHONPYCACHEPREFIX`` keeps
    the ``.pyc`` out of the source tree, in a temp dir; Python then reads ``.pyc`` only from
    there (the ones beside the standard library and site-packages are not looked at), so
    :func:`compile_agent` fills it first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def compile_agent(env: dict[str, str]) -> None:
    """What ``pip install`` does for the agent, into ``env``'s cache prefix: byte-compile all of
    ``corral`` (``compileall``) and run the agent's start-up imports (which writes the ``.pyc`` of
    the standard library and dependency modules they use)."""
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "corral")], env=env, cwd=ROOT, check=True)
    subprocess.run([PY, "-c", AGENT_STARTUP], env=env, cwd=ROOT, check=True)


def compiled_since(pycache: Path, t0: float) -> list[str]:
    """The ``.pyc`` files written after ``t0``: what the agent had to compile itself."""
    return sorted(str(f.relative_to(pycache)) for f in pycache.rglob("*.pyc") if f.stat().st_mtime > t0)


def _batches_total(server: CorralServer) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    m = re.search(r"^corral_telemetry_batches_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _rss_by_mapping(pid: int) -> list[tuple[str, int]]:
    """Resident bytes per mapped file (``[anon]``, ``[heap]``, libraries), largest first."""
    by: dict[str, int] = {}
    for m in psutil.Process(pid).memory_maps():
        name = m.path.rsplit("/", 1)[-1] or "[anon]"
        by[name] = by.get(name, 0) + int(m.rss)
    return sorted(by.items(), key=lambda kv: -kv[1])


def _device_accepted(server: CorralServer) -> dict[str, Any] | None:
    with server.client() as c:
        items = c.get("/devices", params={"limit": 10}).raise_for_status().json()["items"]
    for d in items:
        if d.get("status") == "accepted" and d.get("online"):
            return dict(d)
    return None


class Sampler:
    """RSS/USS/PSS every second and CPU time over the window, for one process."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[int, int, int]] = []
        self.cpu0 = 0.0
        self.cpu1 = 0.0

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def sample(self) -> None:
        m = self.proc.memory_full_info()
        self.samples.append((int(m.rss), int(m.uss), int(m.pss)))

    def summary(self, wall: float) -> dict[str, Any]:
        rss, uss, pss = (list(col) for col in zip(*self.samples, strict=True))
        return {"rss_end": rss[-1], "uss_end": uss[-1], "pss_end": pss[-1], "rss_max": max(rss), "uss_max": max(uss),
                "pss_max": max(pss), "cpu_s": self.cpu1 - self.cpu0, "cpu_pct": (self.cpu1 - self.cpu0) / wall * 100,
                "samples": len(rss), "threads": self.proc.num_threads()}


def run(window: float, settle: float, quick: bool, keep: bool = False) -> dict[str, Any]:
    params = {"window_s": window, "settle_s": settle, "telemetry_interval_s": 10, "platform": "LinuxPlatform",
              "spool": "disk", "bytecode": "compiled (.pyc) before start, as installed by pip"}
    result = new_result("agent", "Agent: one idle agent process, memory and CPU", params, quick)
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-agent-"))
    if keep:
        print(f"agent: keeping {tmp}", flush=True)
    server = CorralServer(tmp / "corral")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        server.init()
        server.start()
        with server.client() as c:
            token = c.post("/enrollment-tokens", json={"description": "bench agent"}).raise_for_status().json()["token"]
        ws_port = free_port()
        procs["ws-server"] = _popen([PY, "-c", WS_SERVER, str(ws_port)], tmp / "ws-server.log", subprocess.PIPE)
        out = procs["ws-server"].stdout
        assert out is not None
        if not out.readline():
            raise RuntimeError(f"the websockets server did not start:\n{tail(tmp / 'ws-server.log')}")
        agent_env = bytecode_env(tmp / "pycache")
        compile_agent(agent_env)
        compiled_at = time.time()
        t_start = time.monotonic()
        procs["agent"] = _popen([PY, "-m", "corral", "agent", "--server", server.url, "--enroll-token", token,
                                 "--state-dir", str(tmp / "agent-state")], tmp / "agent.log", env=agent_env)
        procs["bare"] = _popen([PY, "-c", BARE], tmp / "bare.log")
        procs["ws-client"] = _popen([PY, "-c", WS_CLIENT, f"ws://127.0.0.1:{ws_port}/"], tmp / "ws-client.log",
                                    subprocess.PIPE)
        out = procs["ws-client"].stdout
        assert out is not None
        if not out.readline():
            raise RuntimeError(f"the websockets client did not connect:\n{tail(tmp / 'ws-client.log')}")
        device = None
        deadline = time.monotonic() + 60
        while device is None:
            if procs["agent"].poll() is not None:
                raise RuntimeError(f"the agent exited with {procs['agent'].returncode}:\n{tail(tmp / 'agent.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent was not accepted in 60 s:\n{tail(tmp / 'agent.log')}")
            time.sleep(0.2)
            device = _device_accepted(server)
        connect_s = time.monotonic() - t_start
        print(f"agent: device {device['id'][:12]} enrolled and online in {connect_s:.1f} s; settling {settle:g} s",
              flush=True)
        time.sleep(settle)
        samplers = {name: Sampler(name, procs[name].pid) for name in ("agent", "bare", "ws-client")}
        b0 = _batches_total(server)
        w0 = time.monotonic()
        for s in samplers.values():
            s.cpu0 = s.cpu()
            s.sample()
        while time.monotonic() - w0 < window:
            time.sleep(min(1.0, max(0.0, window - (time.monotonic() - w0))))
            for name, s in samplers.items():
                if procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {procs[name].returncode}:\n{tail(tmp / f'{name}.log')}")
                s.sample()
        for s in samplers.values():
            s.cpu1 = s.cpu()
        wall = time.monotonic() - w0
        b1 = _batches_total(server)
        server.check_alive()
        stats = {name: s.summary(wall) for name, s in samplers.items()}
        maps = _rss_by_mapping(procs["agent"].pid)
        with server.client() as c:
            latest = c.get(f"/devices/{device['id']}/metrics").raise_for_status().json()
        agent_log = tail(tmp / "agent.log", 2000)
        self_compiled = compiled_since(tmp / "pycache", compiled_at)
    except BaseException:
        print(f"agent: agent log (tail):\n{tail(tmp / 'agent.log')}\nserver log (tail):\n{tail(server.log)}",
              file=sys.stderr)
        raise
    finally:
        for p in procs.values():
            stop_process(p)
        server.stop()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)

    ag, bare, wsc = stats["agent"], stats["bare"], stats["ws-client"]
    batches = b1 - b0
    result["details"] = {"processes": stats, "agent_rss_by_mapping": maps[:25], "window_wall_s": wall,
                         "connect_s": connect_s,
                         "telemetry_batches_in_window": batches, "metrics_reported": len(latest.get("metrics", {})),
                         "modules_the_agent_compiled": self_compiled,
                         "agent_log_tail": agent_log, "load_average_end": os.getloadavg()}

    def mb(x: int) -> float:
        return x / MB

    add_figures(
        result,
        Figure("agent RSS, end of window", mb(ag["rss_end"]), "MB", mb(bare["rss_end"]), goal=f"≤ {RSS_GOAL_MB:g} MB",
               met=mb(ag["rss_end"]) <= RSS_GOAL_MB),
        Figure("agent RSS, max over the window", mb(ag["rss_max"]), "MB", mb(bare["rss_max"]),
               goal=f"≤ {RSS_GOAL_MB:g} MB", met=mb(ag["rss_max"]) <= RSS_GOAL_MB),
        Figure("agent PSS, end of window", mb(ag["pss_end"]), "MB", mb(bare["pss_end"]),
               note="shared pages divided among the processes that map them"),
        Figure("agent USS, end of window", mb(ag["uss_end"]), "MB", mb(bare["uss_end"]),
               note="the agent's own pages"),
        Figure("agent CPU", ag["cpu_pct"], "% of a core", bare["cpu_pct"], goal=f"≤ {CPU_GOAL_PCT:g} %",
               met=ag["cpu_pct"] <= CPU_GOAL_PCT, note=f"{ag['cpu_s'] * 1000:.0f} ms CPU in {wall:.0f} s"),
        Figure("websockets client, one idle connection: RSS", mb(wsc["rss_end"]), "MB", mb(bare["rss_end"]),
               note="the floor of a Python WebSocket client"),
        Figure("websockets client: PSS", mb(wsc["pss_end"]), "MB", mb(bare["pss_end"])),
        Figure("websockets client: USS", mb(wsc["uss_end"]), "MB", mb(bare["uss_end"])),
        Figure("telemetry batches acked during the window", int(batches), "", better="higher",
               note=f"one every 10 s: {wall / 10:.0f} expected"),
    )
    result["method"] = (
        "One `corral server` (SQLite) and one real agent process started as on a device: `python -m corral agent "
        "--server URL --enroll-token T --state-dir DIR`, default configuration (`LinuxPlatform` collecting this "
        "machine's metrics with psutil, a disk spool of fsync'd batch files, telemetry every 10 s, a heartbeat "
        "every 15 s). The agent runs byte-compiled, as installed by pip (which writes `.pyc` files for what it "
        "installs): the bench first compiles all of `corral` and imports the agent's modules with "
        "`PYTHONPYCACHEPREFIX` set to a temp dir and bytecode writing allowed, and starts the agent with the same "
        "environment; from a source tree without `.pyc` (this environment sets `PYTHONDONTWRITEBYTECODE`) the agent "
        "would compile its own modules at every start, ~1 MB of RSS no installed agent has. Once it is enrolled "
        "and online, a settle period of "
        f"{settle:g} s, then a {window:g} s window in which RSS, PSS and USS (`psutil` `memory_full_info`, "
        "/proc/PID/smaps_rollup) are sampled every second and CPU = CPU time used in the window ÷ the window "
        "(share of one core). **Reference**, measured the same way in the same run: a bare `python -c` "
        "process of the same interpreter that imports only `time` and sleeps (the interpreter's own floor: "
        "what no Python agent can go below); and, as the floor of a Python WebSocket client, a `python -c` "
        "`websockets` asyncio client holding one idle connection to a bare `websockets` server. MB = 10^6 bytes "
        "(the goal's unit; 30 MB = 28.6 MiB)."
    )
    top = ", ".join(f"{name} {mb(size):.1f}" for name, size in maps[:8])
    result["notes"] = [
        "RSS counts shared pages in full: libpython, the C libraries (libssl/libcrypto through Python's `ssl` "
        "and `hashlib`, libc, libm) and the extension modules the agent maps, although every other process "
        "using the same files shares those pages. On a device the RSS is the figure `top` shows and the goal "
        "is stated in; PSS (shared pages divided among their users) and USS (the agent's own pages: what "
        "stopping it frees) say what the agent costs the device beside its other processes.",
        f"The agent's resident memory by mapping, MB (end of window): {top} "
        "(`[anon]` and `[heap]`: Python objects and allocator arenas; `libcrypto`: OpenSSL, through `ssl` and "
        "`hashlib`; `_sodium.abi3.so`: PyNaCl's libsodium; `_core…so`: msgspec's extension).",
        f"Beyond the bare interpreter the agent adds {mb(ag['rss_end'] - bare['rss_end']):.1f} MB of RSS "
        f"({mb(ag['uss_end'] - bare['uss_end']):.1f} MB USS); beyond a bare `websockets` client holding one "
        f"connection, {mb(ag['rss_end'] - wsc['rss_end']):.1f} MB RSS ({mb(ag['uss_end'] - wsc['uss_end']):.1f} MB "
        "USS): its own code, the crypto and psutil extensions, the spool and collectors, less what its own "
        "WebSocket client (`corral.agent.transport`, on wsproto) saves against `websockets`.",
        "Modules the agent compiled itself (no `.pyc` from the compile step): "
        + (", ".join(f"`{m}`" for m in self_compiled) if self_compiled else "none") + ".",
        f"During the window the server acknowledged {batches:.0f} telemetry batches from the agent "
        f"({len(latest.get('metrics', {}))} metrics in its latest values), so the figures are those of a working "
        f"agent, not an idle interpreter. The agent process has {ag['threads']} threads.",
    ]
    return result


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.agent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=60.0, help="measurement window, seconds")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after enrollment before the window")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database, state dir)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 s settle, 15 s window")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    return ap


def main_result(argv: list[str] | None = None) -> dict[str, Any]:
    a = _parser().parse_args(argv)
    if a.quick:
        a.window, a.settle = min(a.window, 15.0), min(a.settle, 5.0)
    return run(a.window, a.settle, a.quick, a.keep)


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    finish(main_result(argv), docs=not a.no_docs)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
