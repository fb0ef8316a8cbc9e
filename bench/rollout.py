"""Rollout benchmark: N simulated devices (10,000) through four waves on one server process (issue 5).

What it does, in one run:

1. **The fleet.** ``corral server`` (a subprocess, SQLite) and two fleets of simulated devices
   (``corral.sim.runner.run_sim``: real agents whose updates follow the real report protocol,
   :mod:`corral.sim.updates`), each enrolled with a token of its own that tags it: ``--devices``
   (10,000) in ``--clients`` processes (``fleet=main``), and ``--fail-devices`` (500) in one more
   process whose updates all fail (``--update-fail-rate 1``, ``fleet=failing``). Updates take
   ``--update-time`` (0.5-1.5 s, uniform). Telemetry is off (no health gate here). Each sim process
   notes when each device received each ``deploy`` (the device's side of "notified").
   The parts run in this order, so that one part's load cannot spill into the next:
2. **Reference**: one direct deployment (``POST /api/v1/deployments``) of an app artifact to 1,000
   of the main fleet's devices (the most one deployment takes): every device told at once, no
   waves, no gates. Measured from its creation: when the devices received the ``deploy``, the last
   final report, the server's CPU.
3. **Time to pause** (``--repeat`` rollouts, one after the other): a release that fails everywhere,
   to every device (N + F, so each engine step reads as many rows as with the full fleet), waves
   ``1%,10%,50%,100%``, the failing fleet first (the ``canary`` selector), install gate
   ``min_sample`` 20, ``max_failure_rate`` 0.1. The threshold is crossed by the final report that
   makes the gate trip, replayed in arrival order from the deployment's rows (``GET
   /api/v1/deployments/{id}``: each device's ``updated_at``). The pause: the rollout's row, polled
   every 10 ms from the database (read-only; the poll costs the server nothing): when ``paused`` is
   first read (committed), and the rollout's ``updated_at`` then (the pausing step's clock; a
   later step rewrites it). Then the devices told finish, the rollout is aborted.
4. **Throughput** (the main fleet): ``POST /api/v1/rollouts`` with waves ``1%,10%,50%,100%``, the
   default install gate, no pacing. From the server's own rows (``rollout_devices.started_at``:
   when the engine told a device): devices notified per minute = N ÷ (the last device told − the
   rollout's creation); the same at the devices; devices updated per minute (to the last final
   report); the time until ``completed``; the server's CPU (user + system seconds ÷ wall time, %
   of one core); per wave, when it was told and when its last final report arrived; the fewest
   devices connected meanwhile (``/healthz``).

Run alone: ``python -m bench.rollout [--devices 10000] [--fail-devices 500] [--clients 1]
[--repeat 5] [--quick]``. The internal ``--role sim`` mode is the sim processes it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    CorralServer,
    Figure,
    add_figures,
    bench_main,
    bench_parser,
    cpu_seconds,
    new_result,
    percentile,
    raise_nofile,
    settle,
    stop_process,
    tail,
)
from bench.connections import _spread, _started_at, _wait_connected, prepare_identities

NOTIFY_GOAL_PER_MIN = 10_000
GOAL_DEVICES = 10_000  # the fleet
AWS_JOBS_CAP_PER_MIN = 1_000  # AWS IoT Jobs' maximum rollout rate (maximumPerMinute)
PAUSE_GOAL_S = 1.0
DEPLOYMENT_MAX = 1_000  # devices in one POST /api/v1/deployments (corral.server.updates.deployments)
MIN_SAMPLE, MAX_FAILURE_RATE = 20, 0.1
WAVES = "1%,10%,50%,100%"
APP = "sensor"
FINAL = ("succeeded", "failed", "rolled-back")


# --- the sim processes ------------------------------------------------------------------------


def _sim(a: argparse.Namespace) -> int:
    """``run_sim`` with ``--devices`` devices; writes ``--receipts`` on exit: per deployment id,
    device id → when it received the ``deploy`` (the first time)."""
    from corral.agent.main import run_until_signalled, setup_logging
    from corral.sim.runner import run_sim
    from corral.sim.updates import SimUpdater, SimUpdateSettings, parse_time_range

    setup_logging("warning")
    raise_nofile()
    received: dict[str, dict[str, float]] = {}
    on_deploy = SimUpdater.on_deploy

    async def noting(self: SimUpdater, msg: Any) -> None:
        agent = getattr(self.on_finished, "__self__", None)  # the agent: its send_inventory
        device = agent.identity.device_id if agent is not None else f"?{id(self)}"
        received.setdefault(msg.deployment_id, {}).setdefault(device, time.time())
        await on_deploy(self, msg)

    SimUpdater.on_deploy = noting  # type: ignore[method-assign]
    updates = SimUpdateSettings(duration=parse_time_range(a.update_time), fail_rate=a.fail_rate)
    print(json.dumps({"started": time.time()}), flush=True)
    rc = run_until_signalled(lambda stop: run_sim(
        a.server, [a.token], a.devices, Path(a.state_dir), ["rpi4", "imx8mm"], a.seed, stop,
        start_rate=1e6, max_connecting=a.in_flight, summary_interval=10.0, telemetry_interval=0.0,
        updates=updates))
    Path(a.receipts).write_text(json.dumps(received))
    return rc


class Fleet:
    """The sim processes: started, watched, stopped (then their receipts are read)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.receipt_files: list[Path] = []
        self.stopped = False

    def spawn(self, server: CorralServer, token: str, n: int, name: str, seed: int, fail_rate: float,
              update_time: str, in_flight: int) -> None:
        k = len(self.procs)
        state = self.tmp / f"sim-{name}-{k}"
        prepare_identities(state, n)
        log, receipts = self.tmp / f"sim-{name}-{k}.log", self.tmp / f"receipts-{k}.json"
        with open(log, "ab") as out:
            self.procs.append(subprocess.Popen(
                [PY, "-m", "bench.rollout", "--role", "sim", "--server", server.url, "--token", token, "--devices",
                 str(n), "--state-dir", str(state), "--seed", str(seed), "--fail-rate", str(fail_rate),
                 "--update-time", update_time, "--in-flight", str(in_flight), "--receipts", str(receipts)],
                stdout=subprocess.PIPE, stderr=out, cwd=Path(__file__).resolve().parent.parent))
        self.logs.append(log)
        self.receipt_files.append(receipts)

    def started_at(self) -> float:
        return _started_at(self.procs, self.logs)

    def check_alive(self) -> None:
        for p, log in zip(self.procs, self.logs, strict=True):
            if p.poll() is not None:
                raise RuntimeError(f"a sim process exited with {p.returncode}:\n{tail(log)}")

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> dict[str, dict[str, float]]:
        """Stop every process (once); their receipts merged."""
        if self.stopped:
            return {}
        self.stopped = True
        for p in self.procs:
            stop_process(p, timeout=60)
        out: dict[str, dict[str, float]] = {}
        for f in self.receipt_files:
            with contextlib.suppress(OSError, ValueError):
                for dep, times in json.loads(f.read_text()).items():
                    out.setdefault(dep, {}).update(times)
        return out


# --- reading the server's rows -----------------------------------------------------------------


def _query(db_path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows from the server's database, read-only (a WAL reader does not block the server)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return list(con.execute(sql, args).fetchall())
    finally:
        con.close()


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _ids(server: CorralServer, selector: str) -> list[str]:
    ids: list[str] = []
    cursor = None
    with server.client() as c:
        while True:
            q: dict[str, Any] = {"selector": selector, "limit": 1000, "status": "accepted"}
            if cursor:
                q["cursor"] = cursor
            body = c.get("/devices", params=q).raise_for_status().json()
            ids += [d["id"] for d in body["items"]]
            cursor = body.get("next_cursor")
            if not cursor:
                return ids


def _wait(what: str, done: Callable[[], bool], timeout: float, alive: Callable[[], None],
          interval: float = 0.25) -> float:
    """Poll ``done()`` until true; returns the seconds waited."""
    t0 = time.monotonic()
    while not done():
        alive()
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: not done in {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - t0


def _upload(server: CorralServer, version: str) -> None:
    with server.client() as c:
        c.post("/artifacts", params={"name": APP, "version": version, "kind": "app"},
               content=f"{APP} {version}\n".encode() * 64,
               headers={"Content-Type": "application/octet-stream"}).raise_for_status()


def _per_minute(n: int, seconds: float | None) -> float | None:
    return n * 60.0 / seconds if seconds and seconds > 0 else None


# --- part 1: a rollout to the main fleet, and the reference ------------------------------------


def run_rollout(server: CorralServer, fleet: Fleet, n: int, timeout: float, alive: Callable[[], None]
                ) -> dict[str, Any]:
    _upload(server, "1.1.0")
    settle(server.pid)
    cpu0, sim0, w0 = cpu_seconds(server.pid), fleet.cpu(), time.time()
    with server.client() as c:
        rollout_id = c.post("/rollouts", json={"artifact": f"{APP}@1.1.0", "selector": 'tag.fleet == "main"',
                                               "waves": WAVES, "seed": 7}).raise_for_status().json()["id"]
    timeline: list[tuple[float, int, int, int]] = []

    def completed() -> bool:
        (status,), = _query(server.db_path, "SELECT status FROM rollouts WHERE id = ?", rollout_id)
        told, done = _query(server.db_path, "SELECT sum(attempt > 0), sum(state = 'succeeded') FROM rollout_devices "
                                            "WHERE rollout_id = ?", rollout_id)[0]
        timeline.append((round(time.time() - w0, 2), int(told or 0), int(done or 0), server.connected()))
        if status not in ("running", "completed"):
            raise RuntimeError(f"rollout {rollout_id} is {status}")
        return bool(status == "completed")

    _wait("the rollout", completed, timeout, alive, interval=0.5)
    wall = time.time() - w0
    cpu, sim_cpu = cpu_seconds(server.pid) - cpu0, fleet.cpu() - sim0
    (created, dep_id, updated), = _query(server.db_path, "SELECT created_at, deployment_id, updated_at FROM rollouts "
                                                         "WHERE id = ?", rollout_id)
    waves = _query(server.db_path,
                   "SELECT rd.wave, count(*), min(rd.started_at), max(rd.started_at), max(dd.updated_at), "
                   "sum(rd.attempt > 1) FROM rollout_devices rd LEFT JOIN deployment_devices dd "
                   "ON dd.deployment_id = ? AND dd.device_id = rd.device_id WHERE rd.rollout_id = ? "
                   "GROUP BY rd.wave ORDER BY rd.wave", dep_id, rollout_id)
    told = sum(w[1] for w in waves)
    last_told = max(w[3] for w in waves)
    last_report = max(w[4] for w in waves)
    # the engine's reaction: a wave's last final report (its arrival) → the next wave told
    reaction = [nxt[2] - w[4] for w, nxt in itertools.pairwise(waves)]
    return {"wave_reaction_s": [round(x, 3) for x in reaction], "connected_min": min(t[3] for t in timeline),
            "rollout_id": rollout_id, "deployment_id": dep_id, "devices": told,
            "created_at": created, "completed_at": updated, "last_told_s": last_told - created,
            "last_report_s": last_report - created, "completed_s": updated - created,
            "told_per_min": _per_minute(told, last_told - created),
            "updated_per_min": _per_minute(told, last_report - created), "watched_s": wall,
            "server_cpu_s": cpu, "server_cpu_pct": 100 * cpu / wall, "sims_cpu_pct": 100 * sim_cpu / wall,
            "retried": sum(w[5] for w in waves),
            "waves": [{"wave": w[0] + 1, "devices": w[1], "first_told_s": round(w[2] - created, 3),
                       "last_told_s": round(w[3] - created, 3), "last_report_s": round(w[4] - created, 3)}
                      for w in waves],
            "timeline": timeline[::max(1, len(timeline) // 60)]}


def run_direct(server: CorralServer, fleet: Fleet, ids: list[str], timeout: float, alive: Callable[[], None]
               ) -> dict[str, Any]:
    """The reference: one direct deployment to as many of the same devices as one takes."""
    _upload(server, "1.0.0")
    settle(server.pid)
    cpu0, sim0, w0 = cpu_seconds(server.pid), fleet.cpu(), time.time()
    with server.client() as c:
        dep_id = c.post("/deployments", json={"artifact": f"{APP}@1.0.0", "devices": ids}
                        ).raise_for_status().json()["id"]
    connected: list[int] = []

    def finished() -> bool:
        connected.append(server.connected())
        (final,), = _query(server.db_path, "SELECT count(*) FROM deployment_devices WHERE deployment_id = ? "
                                           "AND status IN ('succeeded', 'failed', 'rolled-back')", dep_id)
        return bool(final >= len(ids))

    _wait("the direct deployment", finished, timeout, alive, interval=0.25)
    wall = time.time() - w0
    cpu, sim_cpu = cpu_seconds(server.pid) - cpu0, fleet.cpu() - sim0
    (created,), = _query(server.db_path, "SELECT created_at FROM deployments WHERE id = ?", dep_id)
    (succeeded, last_report), = _query(server.db_path, "SELECT sum(status = 'succeeded'), max(updated_at) FROM "
                                                       "deployment_devices WHERE deployment_id = ?", dep_id)
    return {"deployment_id": dep_id, "devices": len(ids), "succeeded": int(succeeded), "created_at": created,
            "connected_min": min(connected),
            "last_report_s": last_report - created, "updated_per_min": _per_minute(len(ids), last_report - created),
            "watched_s": wall, "server_cpu_s": cpu, "server_cpu_pct": 100 * cpu / wall,
            "sims_cpu_pct": 100 * sim_cpu / wall}


def _received(receipts: dict[str, dict[str, float]], dep_ids: list[str], since: float, n: int
              ) -> dict[str, Any]:
    """When the devices received the deploy of ``dep_ids`` (attempt 1), from ``since``."""
    times = sorted(t for d in dep_ids for t in receipts.get(d, {}).values())
    if not times:
        return {"devices": 0}
    last = times[-1] - since
    return {"devices": len(times), "first_s": times[0] - since, "last_s": last,
            "per_min": _per_minute(len(times), last), "all": len(times) >= n}


# --- part 2: time to pause ---------------------------------------------------------------------


def _crossing(rows: list[dict[str, Any]]) -> tuple[float, int] | None:
    """The arrival of the final report that makes the install gate trip, replayed in arrival
    order (the gate: at least ``min_sample`` finished, failed > rate × finished), and its rank."""
    failed = 0
    finals = sorted((_epoch(r["updated_at"]), r["status"]) for r in rows if r["status"] in FINAL)
    for finished, (at, status) in enumerate(finals, start=1):
        failed += status != "succeeded"
        if finished >= MIN_SAMPLE and failed > MAX_FAILURE_RATE * finished:
            return at, finished
    return None


def _first_paused(server: CorralServer, rollout_id: str, timeout: float) -> tuple[float, float]:
    """Poll the rollout's row every 10 ms until it is no longer running; returns (when that was
    first seen, its ``updated_at`` then: the clock of the step that paused it)."""
    deadline = time.monotonic() + timeout
    while True:
        (status, updated_at), = _query(server.db_path, "SELECT status, updated_at FROM rollouts WHERE id = ?",
                                       rollout_id)
        if status != "running":
            seen = time.time()
            if status != "paused":
                raise RuntimeError(f"rollout {rollout_id} became {status}, not paused")
            return seen, float(updated_at)
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollout {rollout_id} did not pause in {timeout:.0f} s")
        time.sleep(0.01)


def time_to_pause(server: CorralServer, repeat: int, timeout: float, alive: Callable[[], None]) -> dict[str, Any]:
    """Rollouts of a release that fails everywhere, the failing fleet first, until the install
    gate pauses them: the time from the report that crosses the threshold to the pause."""
    _upload(server, "2.0.0")
    runs = []
    for k in range(repeat):
        settle(server.pid)
        with server.client() as c:
            t_post = time.time()
            rollout_id = c.post("/rollouts", json={
                "artifact": f"{APP}@2.0.0", "selector": 'tag.bench == "rollout"', "canary": 'tag.fleet == "failing"',
                "waves": WAVES, "seed": 100 + k,
                "install_gate": {"min_sample": MIN_SAMPLE, "max_failure_rate": MAX_FAILURE_RATE}},
                timeout=300).raise_for_status().json()["id"]
        created_s = time.time() - t_post
        seen, updated_at = _first_paused(server, rollout_id, timeout)
        with server.client() as c:
            doc = c.get(f"/rollouts/{rollout_id}").raise_for_status().json()
            dep_id = doc["deployment_id"]

            def told_done(dep_id: str = dep_id) -> bool:  # the devices told before the pause finish
                counts = c.get(f"/deployments/{dep_id}").raise_for_status().json()["counts"]
                return not counts.get("queued") and not counts.get("in-progress")

            _wait("the told devices", told_done, timeout, alive, interval=0.5)
            rows = c.get(f"/deployments/{dep_id}").raise_for_status().json()["devices"]
            c.post(f"/rollouts/{rollout_id}/abort", json={}).raise_for_status()
        crossing = _crossing(rows)
        if crossing is None:
            raise RuntimeError(f"rollout {rollout_id}: the reports do not cross the threshold")
        crossed_at, rank = crossing
        runs.append({"rollout_id": rollout_id, "reason": doc["reason"], "create_request_s": round(created_s, 3),
                     "wave_1": doc["waves"][0]["size"], "told": len(rows), "crossing_rank": rank,
                     "finished_when_paused": sum(1 for r in rows if r["status"] in FINAL
                                                 and _epoch(r["updated_at"]) <= updated_at),
                     "crossing_to_pause_s": round(updated_at - crossed_at, 4),
                     "crossing_to_visible_s": round(seen - crossed_at, 4),
                     "pausing_step_to_visible_s": round(seen - updated_at, 4)})
        print(f"rollout: pause {k + 1}/{repeat}: committed {runs[-1]['crossing_to_visible_s'] * 1000:.0f} ms after "
              f"the crossing (the pausing step's clock: {runs[-1]['crossing_to_pause_s'] * 1000:.0f} ms)", flush=True)
    return {"runs": runs}


# --- the benchmark -----------------------------------------------------------------------------


def run(n: int, fail_devices: int, clients: int, repeat: int, update_time: str, in_flight: int, quick: bool,
        keep: bool) -> dict[str, Any]:
    nofile = raise_nofile()
    total = n + fail_devices
    if nofile < total + 1024:
        raise SystemExit(f"the open-file limit is {nofile}; {total} connections need at least {total + 1024}")
    params = {"devices": n, "fail_devices": fail_devices, "sim_processes": clients + 1, "waves": WAVES,
              "update_time_s": update_time, "pause_repeats": repeat, "install_gate":
              f"min_sample {MIN_SAMPLE}, max_failure_rate {MAX_FAILURE_RATE}"}
    result = new_result("rollout", "Rollouts: N devices through four waves, and the install gate's pause", params,
                        quick)
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-rollout-"))
    if keep:
        print(f"rollout: keeping {tmp}", flush=True)
    server = CorralServer(tmp / "corral")
    fleet = Fleet(tmp)
    timeout = max(300.0, total / 15)
    try:
        server.init()
        server.start()
        with server.client() as c:
            tokens = {name: c.post("/enrollment-tokens", json={"description": f"bench {name}", "tags": {
                "bench": "rollout", "fleet": name}}).raise_for_status().json()["token"] for name in ("main", "failing")}
        for k, share in enumerate(_spread(n, clients)):
            fleet.spawn(server, tokens["main"], share, "main", k + 1, 0.0, update_time, max(1, in_flight // clients))
        fleet.spawn(server, tokens["failing"], fail_devices, "failing", 99, 1.0, update_time, max(1, in_flight // 4))
        t_start = fleet.started_at()

        def alive() -> None:
            server.check_alive()
            fleet.check_alive()

        took, _ = _wait_connected(server.connected, total, t_start, timeout, alive)
        if took is None:
            raise RuntimeError(f"only {server.connected()} of {total} devices connected in {timeout:.0f} s")
        print(f"rollout: {total:,} devices connected in {took:.0f} s", flush=True)
        settle(server.pid, timeout=60)
        ids = _ids(server, 'tag.fleet == "main"')
        if len(ids) != n:
            raise RuntimeError(f"{len(ids)} of {n} main devices accepted")
        c0 = cpu_seconds(server.pid)
        time.sleep(5.0)
        idle_pct = 100 * (cpu_seconds(server.pid) - c0) / 5.0
        # the reference and the pauses first: the rollout's load must not spill into them
        sample = ids[:DEPLOYMENT_MAX]
        direct = run_direct(server, fleet, sample, timeout, alive)
        print(f"rollout: reference: a deployment to {len(sample):,} devices, the last report after "
              f"{direct['last_report_s']:.1f} s; server CPU {direct['server_cpu_pct']:.0f} %", flush=True)
        pause = time_to_pause(server, repeat, timeout, alive)
        load_before = os.getloadavg()
        roll = run_rollout(server, fleet, n, timeout, alive)
        print(f"rollout: {roll['devices']:,} told in {roll['last_told_s']:.1f} s, completed in "
              f"{roll['completed_s']:.1f} s; server CPU {roll['server_cpu_pct']:.0f} %; at least "
              f"{roll['connected_min']:,} of {total:,} devices connected throughout", flush=True)
        load_after = os.getloadavg()
        receipts = fleet.stop()
    except BaseException:
        print(f"rollout: server log (tail):\n{tail(server.log)}", file=sys.stderr)
        raise
    finally:
        fleet.stop()
        server.stop()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)

    roll["received"] = _received(receipts, [roll["deployment_id"]], roll["created_at"], n)
    direct["received"] = _received(receipts, [direct["deployment_id"]], direct["created_at"], len(sample))
    result["details"] = {"connect_s": took, "server_idle_cpu_pct": idle_pct, "rollout": roll, "reference": direct,
                         "pause": pause, "load_average_before_rollout": [round(x, 2) for x in load_before],
                         "load_average_end": [round(x, 2) for x in load_after]}
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    """The figures, the method and the notes of a run, from its details (so a saved result can be
    rendered again)."""
    p, d = result["params"], result["details"]
    roll, direct, runs, idle_pct = d["rollout"], d["reference"], d["pause"]["runs"], d["server_idle_cpu_pct"]
    update_time, clients = p["update_time_s"], p["sim_processes"] - 1
    load_before, load_after = d["load_average_before_rollout"][0], d["load_average_end"][0]
    n, total = p["devices"], p["devices"] + p["fail_devices"]
    result["figures"] = []
    rate, ref_rate = roll["told_per_min"], direct["received"].get("per_min")
    to_pause = [r["crossing_to_pause_s"] for r in runs]
    to_visible = [r["crossing_to_visible_s"] for r in runs]
    step = [r["pausing_step_to_visible_s"] for r in runs]
    worst = max(to_visible)
    reaction = max(roll["wave_reaction_s"], default=None)
    lost = total - roll["connected_min"]
    add_figures(
        result,
        Figure("devices notified per minute, four waves", rate, "devices/min", ref_rate,
               goal=f"≥ {NOTIFY_GOAL_PER_MIN:,}/min", better="higher",
               met=bool(rate and rate >= NOTIFY_GOAL_PER_MIN) if n >= GOAL_DEVICES else None,
               note=f"{roll['devices']:,} devices, rollout created → last one told; AWS IoT Jobs caps at "
                    f"{AWS_JOBS_CAP_PER_MIN:,}/min" + ("" if n >= GOAL_DEVICES else
                                                      f"; the goal needs a run with --devices {GOAL_DEVICES:,}")),
        Figure("devices that received the deploy per minute", roll["received"].get("per_min"), "devices/min",
               ref_rate, better="higher", note="at the simulated devices"),
        Figure("devices updated per minute", roll["updated_per_min"], "devices/min", direct["updated_per_min"],
               better="higher", note=f"created → the last final report; an update takes {update_time} s"),
        Figure("rollout created → completed", roll["completed_s"], "s"),
        Figure("server CPU during the rollout", roll["server_cpu_pct"], "% of a core", direct["server_cpu_pct"],
               note=f"created → completed; idle with the fleet connected: {idle_pct:.0f} %"),
        Figure("a wave's last final report → the next wave told, max", reaction, "s",
               note="the engine's reaction to a report under the rollout's load"),
        Figure("devices that lost their session during the rollout", lost, "", total - direct["connected_min"],
               note=f"of {total:,}, the lowest count connected (`/healthz`) while it ran"),
        Figure("threshold crossed → paused (the pausing step's clock), p50", percentile(to_pause, 50) * 1000, "ms",
               note=f"{len(runs)} rollouts of {total:,} devices, the gate trips in wave 1 "
                    f"({runs[0]['wave_1']} devices)"),
        Figure("threshold crossed → paused (committed), p50", percentile(to_visible, 50) * 1000, "ms"),
        Figure("threshold crossed → paused (committed), max", worst * 1000, "ms",
               goal=f"< {PAUSE_GOAL_S * 1000:.0f} ms", met=worst < PAUSE_GOAL_S),
    )
    result["method"] = (
        f"One `corral server` (SQLite) and {total:,} simulated devices (`corral.sim.runner.run_sim`: real agents; "
        "their updates follow the real report protocol — in-progress, in-progress, final, then the inventory — "
        f"and take {update_time} s) in {clients + 1} processes: {n:,} devices (`fleet=main`) in {clients}, and "
        f"{p['fail_devices']:,} whose updates all fail (`fleet=failing`) in one more; telemetry off. In this "
        "order, so that one part's load cannot spill into the next: the reference, the pauses, the rollout. "
        f"**Throughput**: `POST /api/v1/rollouts` of an app artifact to the main fleet, waves `{WAVES}`, the "
        "default install gate, no pacing. *Devices notified per minute* = devices ÷ (the last device told − the "
        "rollout's creation), from the server's rows (`rollout_devices.started_at`: the clock of the engine step "
        "that told it; the `deploy` goes out once that step commits); *received* = the same at the devices (when "
        "each got its `deploy`); *updated* = devices ÷ (the last final report's arrival − the creation). *Server "
        "CPU* = (user + system) seconds of the server process ÷ wall time over the span measured. **Reference** "
        f"(same run, same fleet, idle before): one direct deployment (`POST /api/v1/deployments`) to "
        f"{direct['devices']:,} of the same devices, the most one takes: no waves and no gates, every device "
        "told at once, the update path a rollout drives without the rollout; measured the same way from its "
        f"creation. **Time to pause** ({len(runs)} rollouts, one after the other): a release that fails "
        f"everywhere, to all {total:,} devices (each engine step reads every one of them), waves `{WAVES}` with "
        f"the failing fleet first (`canary`), install gate `min_sample` {MIN_SAMPLE}, `max_failure_rate` "
        f"{MAX_FAILURE_RATE}. The crossing: the final report that makes the gate trip, replayed in arrival order "
        "from the deployment's rows (`GET /api/v1/deployments/{id}`: each device's `updated_at`, when its final "
        "report arrived). The pause: the rollout's row, polled every 10 ms from the database (read-only): "
        "*committed* = when the poll first read `paused`; *the pausing step's clock* = the rollout's `updated_at` "
        "then (the step's `now`, taken before it waits for the write lock, so before the commit). The goal is "
        "held to the committed time. Then the devices told finish, the rollout is aborted and the next created."
    )
    wave_text = "; ".join(f"wave {w['wave']} ({w['devices']:,}): told at {w['first_told_s']:.1f} s, its last final "
                          f"report at {w['last_report_s']:.1f} s" for w in roll["waves"])
    result["notes"] = [
        f"One machine with {os.cpu_count()} CPUs runs the server, the {clients + 1} sim processes and the driver. "
        f"Load average (1 min) {result['machine']['load_average_at_start'][0]:.2f} at the start (the fleet then "
        f"connects), {load_before:.2f} when the rollout began, {load_after:.2f} at its end. The sim processes used "
        f"{roll['sims_cpu_pct']:.0f} % of a core during the rollout, {direct['sims_cpu_pct']:.0f} % during the "
        "reference.",
        f"Where the rollout's time goes (from its creation): {wave_text}; completed at {roll['completed_s']:.1f} s. "
        "A wave is told in the engine step that first sees the previous wave's last final report committed. A "
        "report's time is when the hub read it (it reads a session's next frame once the previous one's write "
        "is committed); the group committer writes it, sharing SQLite's one writer (the write lock) with the "
        "engine's steps, so a gap between a wave's last report and the next wave is mostly that write's wait.",
        f"The reference: {direct['devices']:,} devices received the `deploy` within "
        f"{direct['received'].get('last_s', math.nan):.2f} s of the deployment's creation; the last final report "
        f"arrived after {direct['last_report_s']:.1f} s.",
        f"Time to pause per rollout, committed (ms): {', '.join(f'{x * 1000:.0f}' for x in to_visible)}; by the "
        f"pausing step's clock: {', '.join(f'{x * 1000:.0f}' for x in to_pause)}; the pausing step from its clock "
        f"to its commit: p50 {percentile(step, 50) * 1000:.0f} ms. The engine steps at most every `min_gap` "
        "(0.2 s) after a final report kicks it, and each step reads every device of the rollout. This is the "
        "canary case (the gate trips while only wave 1's devices report); a gate that trips in a large wave "
        "waits behind the same backlog of report writes as a wave's advance (the figure *a wave's last final "
        "report → the next wave told*). No reference: nothing else in the run pauses a rollout.",
    ]
    if lost:
        result["notes"].append(
            f"{lost:,} devices lost their session during the rollout: the hub reads a session's next frame only "
            "once its previous write is committed, so when the writes fall more than two heartbeat intervals "
            "(30 s) behind, the presence check closes such sessions as silent; the devices reconnect with "
            "backoff, and one told meanwhile gets its `deploy` when it is back.")


def _parser() -> argparse.ArgumentParser:
    ap = bench_parser("rollout", __doc__ or "", "300 + 60 devices, 2 pauses; results kept apart")
    ap.add_argument("--devices", type=int, default=GOAL_DEVICES,
                    help=f"devices of the rollout (default {GOAL_DEVICES:,})")
    ap.add_argument("--fail-devices", type=int, default=500, help="devices whose updates fail (the pause)")
    ap.add_argument("--clients", type=int, default=1, help="sim processes for --devices (one more for the failing)")
    ap.add_argument("--repeat", type=int, default=5, help="rollouts paused by the install gate")
    ap.add_argument("--update-time", default="0.5-1.5", help="seconds a simulated update takes, MIN-MAX")
    ap.add_argument("--in-flight", type=int, default=64, help="devices connecting at a time, all processes")
    # internal: the sim processes this benchmark starts
    ap.add_argument("--role", choices=["sim"], help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--state-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--fail-rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--receipts", help=argparse.SUPPRESS)
    return ap


def main_result(argv: list[str] | None = None) -> dict[str, Any]:
    """Run with command-line style arguments; returns the result (not saved)."""
    a = _parser().parse_args(argv)
    if a.quick:
        a.devices, a.fail_devices, a.clients, a.repeat = min(a.devices, 300), min(a.fail_devices, 60), 1, 2
    return run(a.devices, a.fail_devices, a.clients, a.repeat, a.update_time, a.in_flight, a.quick, a.keep)


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    if a.role == "sim":
        sys.exit(_sim(a))
    bench_main(_parser(), main_result, argv)


if __name__ == "__main__":
    main()
