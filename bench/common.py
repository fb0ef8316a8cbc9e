"""What every benchmark shares: server processes, percentiles, result files and the report.

A benchmark produces one *result*: a JSON document with the parameters it ran with, the machine,
and a list of *figures*. A figure is one measured value beside its reference (measured in the
same run), their ratio, and the goal it is held to (if any) with whether it was met::

    {"name": "p99 command round trip", "value": 12.3, "unit": "ms",
     "reference": 0.4, "ratio": 30.7, "goal": "< 50 ms", "met": true}

Results go to ``bench/results/<bench>.json`` (``<bench>-quick.json`` for ``--quick`` smoke runs,
which never touch the docs). ``docs/benchmarks.md`` is rendered from the full results present,
so running one benchmark alone refreshes its section and keeps the others. The full results are
committed with the docs, so a fresh checkout that runs one benchmark keeps every other section.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DOCS_FILE = ROOT / "docs" / "benchmarks.md"
PY = sys.executable

#: the order sections appear in the docs
BENCH_ORDER = ("connections", "registry", "ingest", "agent", "download", "delta", "downtime", "rollout", "relay")


# --- processes and limits -----------------------------------------------------------------


def raise_nofile() -> int:
    """Lift the soft open-file limit to the hard one (inherited by child processes)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def settle(pid: int, below: float = 0.15, window: float = 1.0, timeout: float = 30.0) -> float:
    """Wait until process ``pid`` uses less than ``below`` of a core over ``window`` seconds
    (its backlog of work is done). Returns the seconds waited."""
    t0 = time.monotonic()
    proc = psutil.Process(pid)
    while time.monotonic() - t0 < timeout:
        c0 = sum(proc.cpu_times()[:2])
        time.sleep(window)
        if (sum(proc.cpu_times()[:2]) - c0) / window < below:
            break
    return time.monotonic() - t0


def wait_http_ok(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s:\n{tail(log)}")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class CorralServer:
    """A real ``corral server`` process on SQLite in ``workdir`` (as ``tests/conftest.py`` starts it),
    or on the database ``db_url`` names (``corral server init --db``; the server finds it again)."""

    workdir: Path
    extra_args: list[str] = field(default_factory=list)
    db_url: str = ""
    port: int = 0
    token: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "server"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "corral.db"

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def init(self) -> dict[str, Any]:
        """``corral server init --json``: schema, keys and the admin; keeps the API token."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        db = ["--db", self.db_url] if self.db_url else []
        out = subprocess.run([PY, "-m", "corral", "server", "init", "--data-dir", str(self.data_dir), *db, "--json"],
                             capture_output=True, text=True, timeout=120, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"corral server init failed: {out.stderr.strip()}")
        creds: dict[str, Any] = json.loads(out.stdout)
        self.token = creds["api_token"]
        return creds

    def start(self) -> None:
        self.port = self.port or free_port()
        args = [PY, "-m", "corral", "server", "--data-dir", str(self.data_dir),
                "--bind", f"127.0.0.1:{self.port}", *self.extra_args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "CORRAL_LOG_LEVEL": "WARNING"})
        wait_http_ok(self.url + "/healthz", self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url + "/api/v1", timeout=timeout,
                            headers={"Authorization": f"Bearer {self.token}"})

    def async_client(self, timeout: float = 60.0, max_connections: int = 100) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url + "/api/v1", timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.token}"},
                                 limits=httpx.Limits(max_connections=max_connections,
                                                     max_keepalive_connections=max_connections))

    def connected(self) -> int:
        """Devices with a live session, as the server counts them (``/healthz``)."""
        return int(httpx.get(self.url + "/healthz", timeout=30).json().get("devices_connected", 0))

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the server died:\n{tail(self.log)}")


# --- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); ``q`` in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(seconds: Iterable[float]) -> dict[str, float]:
    """Latency samples in seconds → n, p50, p90, p99, mean, min, max in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "mean": sum(ms) / len(ms), "min": min(ms), "max": max(ms)}


# --- results --------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured value beside its reference. ``better`` says which direction is good."""

    name: str
    value: float | None
    unit: str
    reference: float | None = None
    goal: str | None = None
    met: bool | None = None
    better: str = "lower"  # lower | higher
    note: str = ""
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.value is not None and self.reference:
            self.ratio = self.value / self.reference


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("websockets", "uvicorn", "uvloop", "fastapi", "sqlalchemy", "aiosqlite", "httpx"):
        with contextlib.suppress(PackageNotFoundError):
            versions[pkg] = version(pkg)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "sqlite": sqlite3.sqlite_version,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "packages": versions,
    }


def new_result(bench: str, title: str, params: dict[str, Any], quick: bool) -> dict[str, Any]:
    return {
        "bench": bench,
        "title": title,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "quick": quick,
        "machine": machine_info(),
        "params": params,
        "figures": [],
        "details": {},
        "notes": [],
        "method": "",
    }


def add_figures(result: dict[str, Any], *figures: Figure) -> None:
    result["figures"].extend(asdict(f) for f in figures)


def save_result(result: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = result["bench"] + ("-quick" if result.get("quick") else "")
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    return path


def load_results() -> dict[str, dict[str, Any]]:
    """The latest full (not ``--quick``) result of each benchmark."""
    out: dict[str, dict[str, Any]] = {}
    for name in BENCH_ORDER:
        path = RESULTS_DIR / f"{name}.json"
        if path.exists():
            with contextlib.suppress(ValueError, OSError):
                out[name] = json.loads(path.read_text())
    return out


# --- rendering --------------------------------------------------------------------------------


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):  # a count: no decimals
        return f"{v:,} {unit}".strip() if unit else f"{v:,}"
    if abs(v) >= 1000:
        s = f"{v:,.0f}"
    elif abs(v) >= 100:
        s = f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    elif abs(v) >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3f}"
    return f"{s} {unit}".strip() if unit else s


def fmt_ratio(f: dict[str, Any]) -> str:
    r = f.get("ratio")
    if r is None:
        return "–"
    if r >= 10:
        return f"{r:.0f}×"
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def fmt_met(met: bool | None) -> str:
    return "–" if met is None else ("**met**" if met else "**not met**")


def print_result(result: dict[str, Any]) -> None:
    """The figures as a plain table on stdout."""
    print(f"\n== {result['title']} ({'quick' if result.get('quick') else 'full'}) ==")
    rows = [("figure", "corral", "reference", "ratio", "goal", "met")]
    for f in result["figures"]:
        met = "" if f["met"] is None else ("yes" if f["met"] else "NO")
        rows.append((f["name"], fmt(f["value"], f["unit"]), fmt(f["reference"], f["unit"]),
                     fmt_ratio(f), f["goal"] or "", met))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for n in result.get("notes", []):
        print(f"  note: {n}")
    sys.stdout.flush()


def _machine_line(m: dict[str, Any]) -> str:
    pk = m.get("packages", {})
    pkgs = ", ".join(f"{k} {v}" for k, v in pk.items())
    load = m.get("load_average_at_start")
    load_s = f"; load average at start {load[0]:.2f} (1 min)" if load else ""
    return (f"{m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}, "
            f"SQLite {m['sqlite']}; {pkgs}{load_s}")


def render_markdown(results: dict[str, dict[str, Any]]) -> str:
    out: list[str] = [
        "# Benchmarks",
        "",
        "The latest figures of `make bench` (`.venv/bin/python -m bench`) or of a benchmark run alone",
        "(each section says when and with which parameters it ran). Every figure is measured",
        "beside a **reference measured in the same run on the same machine**, so the ratio",
        "(Corral ÷ reference) says what Corral's own layers cost, whatever the machine. The goals come",
        "from the issues (foundation, monitoring, updates, rollouts, remote access).",
        "",
        "_This file is rewritten by the benchmarks (`bench/common.py` renders it from",
        "`bench/results/*.json`); edit the code, not the file._",
        "",
    ]
    if not results:
        out += ["No results yet: run `make bench`.", ""]
        return "\n".join(out)

    out += [
        "**Caveats.** The reference machine has 2 CPUs: the server, the simulated devices (or the HTTP",
        "client) and the reference all share them, so absolute rates and latencies are lower bounds for a",
        "server with a machine of its own; the ratios are the robust part. The machine is not otherwise",
        "reserved: the load average at the start of each run is recorded below, and a run on a busy machine",
        "reads slower. Each figure is from one run (percentiles over its samples), not an average of runs.",
        "",
    ]
    # goals first: the summary a reader wants
    out += ["## Goals", "", "| Benchmark | Goal | Measured | Met |", "|---|---|---|---|"]
    for name in BENCH_ORDER:
        r = results.get(name)
        if r is None:
            continue
        for f in r["figures"]:
            if f.get("goal"):
                out.append(f"| {name} | {f['name']}: {f['goal']} | {fmt(f['value'], f['unit'])} | "
                           f"{fmt_met(f['met'])} |")
    out.append("")

    for name in BENCH_ORDER:
        r = results.get(name)
        if r is None:
            continue
        out += [f"## {r['title']} (`bench/{name}.py`)", ""]
        out += [f"Measured {r['date']} on {_machine_line(r['machine'])}.", ""]
        params = ", ".join(f"`{k}={v}`" for k, v in r["params"].items())
        out += [f"Parameters: {params}.", ""]
        if r.get("method"):
            out += [r["method"].strip(), ""]
        out += ["| Figure | Corral | Reference | Ratio | Goal | Met |", "|---|---:|---:|---:|---|---|"]
        for f in r["figures"]:
            name_cell = f["name"] + (f" ({f['note']})" if f.get("note") else "")
            out.append(f"| {name_cell} | {fmt(f['value'], f['unit'])} | {fmt(f['reference'], f['unit'])} | "
                       f"{fmt_ratio(f)} | {f['goal'] or ''} | {fmt_met(f['met'])} |")
        out.append("")
        if r.get("notes"):
            out += ["Notes:", ""]
            out += [f"- {n}" for n in r["notes"]]
            out.append("")
    out += [
        "## Running them",
        "",
        "```",
        "make bench                                        # everything, rewrites this file",
        ".venv/bin/python -m bench --quick                 # smoke run of everything (small N)",
        ".venv/bin/python -m bench.connections --devices 1000",
        ".venv/bin/python -m bench.registry --devices 100000",
        ".venv/bin/python -m bench.ingest --agents 600 --clients 2   # SQLite, then PostgreSQL on 127.0.0.1:5432",
        ".venv/bin/python -m bench.agent --window 60",
        ".venv/bin/python -m bench.delta --size 256 --changed 2",
        ".venv/bin/python -m bench.rollout --devices 10000 --fail-devices 500",
        ".venv/bin/python -m bench.relay --size 256 --idle 1000 --busy 100",
        "```",
        "",
        "Each run writes its raw figures (all percentiles, timings per phase) to",
        "`bench/results/<bench>.json`; `--quick` runs write `<bench>-quick.json` and leave this file alone.",
        "",
    ]
    return "\n".join(out)


def write_docs() -> Path:
    DOCS_FILE.parent.mkdir(parents=True, exist_ok=True)
    DOCS_FILE.write_text(render_markdown(load_results()))
    return DOCS_FILE


def bench_parser(name: str, doc: str, quick_help: str) -> argparse.ArgumentParser:
    """A benchmark's command line with the options every one has (``--keep``, ``--quick``,
    ``--no-docs``); the caller adds its own."""
    ap = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {quick_help}")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    return ap


def bench_main(parser: argparse.ArgumentParser, main_result: Callable[[list[str] | None], dict[str, Any]],
               argv: list[str] | None = None) -> None:
    """``python -m bench.NAME``: run, save, print and (unless ``--no-docs``) re-render the docs."""
    a = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        finish(main_result(argv), docs=not a.no_docs)


def finish(result: dict[str, Any], docs: bool = True) -> None:
    """Save, print, and (for a full run) re-render the docs."""
    path = save_result(result)
    print_result(result)
    print(f"results: {path.relative_to(ROOT)}")
    if docs and not result.get("quick"):
        print(f"docs: {write_docs().relative_to(ROOT)}")
