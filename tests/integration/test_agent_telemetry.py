"""Telemetry and rules with real agent processes (LinuxPlatform, disk spool) against a real server:
backfill after an outage, SIGKILL mid-flight, a full spool, app metrics over the local socket, a
threshold rule firing on the device, and an allow-list rule killing an untrusted process.

Ground truth for "exactly once": every batch a Linux agent spools holds one ``uptime.seconds``
point, and the agent logs (at debug level) each batch right after the spool stored it. So
(points stored on the server) + (batches still in the spool) must equal (batches spooled)."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AgentProc, ServerProc, start_agent, start_server, wait_until
from tests.integration.webhook_receiver import Receiver

INTERVAL = 0.1


def agent_config(tmp: Path, **telemetry: Any) -> Path:
    lines = ['log_level = "debug"', "[telemetry]", f"interval = {telemetry.pop('interval', INTERVAL)}"]
    lines += [f"{k} = {v}" for k, v in telemetry.items()]
    path = tmp / f"agent-{len(list(tmp.glob('agent-*.toml')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def spooled(agent: AgentProc) -> list[int]:
    """The seqs the agent says it spooled (its log accumulates over restarts)."""
    return [int(m.group(1)) for m in re.finditer(r"spooled batch (\d+) ", agent.log.read_text())]


def left_in_spool(agent: AgentProc) -> int:
    return len(list((agent.state_dir / "spool").glob("*.batch")))


def spool_seqs(agent: AgentProc) -> set[int]:
    return {int(p.stem) for p in (agent.state_dir / "spool").glob("*.batch")}


def receipt_seqs(server: ServerProc, dev: str) -> set[int]:
    """The seqs the server has ingested for ``dev``, read from its SQLite file (ground truth: a
    batch stored while its ack was in flight is both here and still in the agent's spool)."""
    with sqlite3.connect(server.data_dir / "corral.db") as db:
        return {seq for (seq,) in db.execute("SELECT seq FROM telemetry_batches WHERE device_id = ?", (dev,))}


def stored_count(server: ServerProc, dev: str, metric: str = "uptime.seconds") -> int:
    r = server.api("GET", "/metrics/query", params={"metric": metric, "device": dev, "since": "1h",
                                                       "step": "1h", "agg": "count"})
    if r.status_code == 404:
        return 0
    assert r.status_code == 200, r.text
    return int(sum(v for s in r.json()["series"] for _, v in s["points"]))


def per_second(server: ServerProc, dev: str, metric: str = "uptime.seconds") -> dict[int, float]:
    r = server.api("GET", "/metrics/query", params={"metric": metric, "device": dev, "since": "10m",
                                                       "step": "1s", "agg": "count"})
    assert r.status_code == 200, r.text
    return {int(t): v for s in r.json()["series"] for t, v in s["points"]}


@pytest.fixture
def server(tmp_path: Path) -> Any:
    s = start_server(tmp_path, extra=["--rollup-interval", "1"])
    yield s
    s.stop()


def test_outage_is_backfilled_with_original_timestamps_exactly_once(server: ServerProc, tmp_path: Path) -> None:
    token = server.create_enrollment_token()
    a = start_agent(server, tmp_path / "dev", token, "--config", str(agent_config(tmp_path)))
    try:
        dev = a.wait_device_id()
        wait_until(lambda: stored_count(server, dev) >= 10, 30, what="first points")
        server.stop(signal.SIGKILL)  # the server (or the network) vanishes without a goodbye
        outage_start = time.time()
        time.sleep(3)  # an hour offline, time-scaled: ~30 collections at 0.1 s
        outage_end = time.time()
        server.restart()
        wait_until(lambda: left_in_spool(a) == 0 and stored_count(server, dev) >= len(spooled(a)) - 2, 60,
                   what="the backfill")
    finally:
        assert a.stop() == 0
    truth = spooled(a)
    assert len(truth) == len(set(truth)), "a seq was reused"
    stored, left = receipt_seqs(server, dev), spool_seqs(a)
    # every spooled batch is stored or still spooled (or both, when the agent stopped with its ack
    # in flight), and each stored batch is one point, stored once. Nothing else was stored but, at
    # most, the batch being appended when the agent was told to stop: the append finishes in the
    # spool's thread, the stop cancels the coroutine before it logs the seq (and a send may take it)
    assert set(truth) <= stored | left, (len(truth), len(stored), len(left))
    assert (stored | left) - set(truth) <= {max(truth) + 1}, sorted((stored | left) - set(truth))
    assert stored_count(server, dev) == len(stored)
    # the outage's points carry the time they were measured, not the time they arrived
    seconds = per_second(server, dev)
    during = sum(n for t, n in seconds.items() if outage_start * 1000 + 1000 <= t < outage_end * 1000 - 1000)
    assert during >= 0.5 * (outage_end - outage_start - 2) / INTERVAL, seconds


def test_sigkill_mid_flight_loses_and_duplicates_nothing(server: ServerProc, tmp_path: Path) -> None:
    token = server.create_enrollment_token()
    cfg = str(agent_config(tmp_path, interval=0.05))
    state = tmp_path / "dev"
    a = start_agent(server, state, token, "--config", cfg)
    dev = a.wait_device_id()
    rng = random.Random(7)
    kills = 0
    for _ in range(4):
        wait_until(lambda: stored_count(server, dev) > 0, 30)
        time.sleep(rng.uniform(0.2, 0.8))
        a.stop(signal.SIGKILL)
        kills += 1
        a = start_agent(server, state, None, "--config", cfg)
    wait_until(lambda: len(spooled(a)) > 0, 30)
    time.sleep(1)
    assert a.stop() == 0
    truth = spooled(a)
    accounted = stored_count(server, dev) + left_in_spool(a)
    # a kill between the spool's fsync and the log line leaves a batch the log never mentions
    assert len(truth) <= accounted <= len(truth) + kills, (len(truth), accounted)
    assert len(truth) == len(set(truth)), "a seq was reused"


def test_full_spool_drops_the_oldest_counts_them_and_keeps_running(server: ServerProc, tmp_path: Path) -> None:
    token = server.create_enrollment_token()
    a = start_agent(server, tmp_path / "dev", token, "--config",
                    str(agent_config(tmp_path, interval=0.05, spool_max_batches=15)))
    try:
        dev = a.wait_device_id()
        wait_until(lambda: stored_count(server, dev) > 0, 30)
        server.stop(signal.SIGKILL)
        time.sleep(2.5)  # ~50 collections into a 15-batch spool
        assert a.proc.poll() is None, "the agent died with a full spool"
        assert left_in_spool(a) <= 15
        server.restart()
        wait_until(lambda: server.api("GET", f"/devices/{dev}/metrics").json()["dropped_batches"] > 0, 60,
                   what="the drop counter reported")
    finally:
        assert a.stop() == 0
    dropped = server.api("GET", f"/devices/{dev}/metrics").json()["dropped_batches"]
    assert dropped >= 20
    # A batch dropped while it was in flight (sent, not yet acked) may still have been stored:
    # the count is exact up to the send window (8).
    excess = stored_count(server, dev) + left_in_spool(a) + dropped - len(spooled(a))
    assert 0 <= excess <= 8, excess


def test_app_metrics_and_events_over_the_local_socket(server: ServerProc, tmp_path: Path) -> None:
    token = server.create_enrollment_token()
    a = start_agent(server, tmp_path / "dev", token, "--config", str(agent_config(tmp_path)))
    try:
        dev = a.wait_device_id()
        sock_path = a.state_dir / "metrics.sock"
        wait_until(sock_path.exists, 30, what="the metrics socket")

        def push(*lines: str) -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock_path))
                s.sendall("".join(line + "\n" for line in lines).encode())

        push("queue_depth:7|g", "cpu.percent:99|g", "garbage line", "event:error|service foo crashed")
        wait_until(lambda: stored_count(server, dev, "app.queue_depth") > 0, 30)
        r = server.api("GET", "/metrics/query", params={"metric": "app.queue_depth", "device": dev, "agg": "max"})
        assert {v for _, v in r.json()["series"][0]["points"]} == {7.0}
        # an application cannot forge a system metric: its cpu.percent lands under app.
        assert stored_count(server, dev, "app.cpu.percent") == 1
        events = server.api("GET", "/events", params={"device": dev, "source": "app"}).json()["items"]
        assert [(e["severity"], e["message"]) for e in events] == [("error", "service foo crashed")]
    finally:
        a.stop()


def test_threshold_rule_fires_on_the_device_and_survives_a_restart(server: ServerProc, tmp_path: Path) -> None:
    token = server.create_enrollment_token(tags={"site": "berlin"})
    cfg = str(agent_config(tmp_path))
    a = start_agent(server, tmp_path / "dev", token, "--config", cfg)
    try:
        dev = a.wait_device_id()
        r = server.cli("rule", "create", "busy", "--threshold", "proc.count > 1 for 0.5s", "--severity", "error",
                       "--selector", 'tag.site == "berlin"')
        assert r.returncode == 0, r.stderr
        fired = wait_firing(server, dev)
        assert fired[0]["severity"] == "error" and "proc.count=" in fired[0]["message"]
        wait_until(lambda: server.api("GET", "/rules/busy").json()["devices_acked"] == 1, 30)
    finally:
        a.stop()
    assert (a.state_dir / "rules.json").exists()
    # offline from the start: the stored rule is evaluated without the server
    server.stop()
    a = start_agent(server, tmp_path / "dev", None, "--config", cfg)
    try:
        wait_until(lambda: "is firing" in a.log.read_text(), 30, what="the stored rule firing offline")
    finally:
        a.stop()


def wait_firing(server: ServerProc, dev: str) -> list[dict[str, Any]]:

    def firing() -> list[dict[str, Any]]:
        items = server.api("GET", "/events", params={"device": dev, "source": "rule"}).json()["items"]
        return [e for e in items if e["attrs"].get("state") == "firing"]

    return list(wait_until(firing, 30, what="the rule to fire"))


def test_bad_rules_are_refused_at_creation_naming_the_column(server: ServerProc) -> None:
    before = server.api("GET", "/audit", params={"limit": 1}).json()["items"][0]["seq"]
    for args, needle in [
        (["--threshold", "cpu.percent >> 90"], "column 14"),
        (["--threshold", "avg(cpu.percent) > 90"], "not allowed"),
        (["--threshold", "cpu.percent + 1"], "column"),
        (["--allow", "relative/path"], "absolute"),
        (["--allow", "/usr/bin/*", "--mode", "kill"], "mode"),
    ]:
        r = server.cli("rule", "create", "bad", *args)
        assert r.returncode == 1, (args, r.stdout)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert server.api("GET", "/rules").json()["items"] == []
    assert server.api("GET", "/audit", params={"limit": 1}).json()["items"][0]["seq"] == before


def test_allowlist_enforce_kills_an_untrusted_process_and_audits_it(server: ServerProc, tmp_path: Path) -> None:
    bindir = tmp_path / "apps"
    bindir.mkdir()
    for name in ("trusted-sleep", "untrusted-sleep"):
        shutil.copy(shutil.which("sleep") or "/bin/sleep", bindir / name)
    trusted = subprocess.Popen([str(bindir / "trusted-sleep"), "300"])
    untrusted = subprocess.Popen([str(bindir / "untrusted-sleep"), "300"])
    token = server.create_enrollment_token()
    receiver = Receiver().start()
    hook = server.api("POST", "/webhooks", json={"url": receiver.url, "events": ["device.rule_action"]})
    assert hook.status_code == 201, hook.text
    a = start_agent(server, tmp_path / "dev", token, "--config", str(agent_config(tmp_path)))
    try:
        dev = a.wait_device_id()
        # the rule watches only executables under bindir: the test must not touch the machine's
        r = server.cli("rule", "create", "apps", "--allow", f"{bindir}/trusted-*", "--scope", f"{bindir}/*",
                       "--mode", "enforce")
        assert r.returncode == 0, r.stderr
        assert untrusted.wait(timeout=30) == -signal.SIGKILL
        time.sleep(1)
        assert trusted.poll() is None, "an allowed process was killed"
        wait_until(lambda: server.api("GET", "/events", params={"device": dev, "source": "allowlist"})
                   .json()["items"], 30, what="the kill reported")
        ev = server.api("GET", "/events", params={"device": dev, "source": "allowlist"}).json()["items"][0]
        assert ev["attrs"]["outcome"] == "killed" and ev["attrs"]["exe"].endswith("untrusted-sleep")
        audit = server.api("GET", "/audit", params={"limit": 20}).json()["items"]
        assert any(e["action"] == "device.rule_action" and e["target"] == dev for e in audit)
        wait_until(lambda: receiver.requests, 30, what="the rule_action webhook")
        assert receiver.verified(hook.json()["secret"])
        msg = json.loads(receiver.requests[0].body)
        assert msg["type"] == "device.rule_action" and msg["data"]["device_id"] == dev
        assert msg["data"]["attrs"]["outcome"] == "killed"
    finally:
        a.stop()
        receiver.stop()
        for p in (trusted, untrusted):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_an_operator_cannot_create_a_killing_rule(server: ServerProc) -> None:
    op_token = server.make_user("op", "operator")
    viewer = server.make_user("vic", "viewer")
    body = {"name": "k", "kind": "allowlist", "allow": ["/usr/*"], "mode": "enforce"}
    assert server.api("POST", "/rules", token=op_token, json=body).status_code == 403
    assert server.api("GET", "/rules").json()["items"] == []
    body["mode"] = "report"
    assert server.api("POST", "/rules", token=viewer, json=body).status_code == 403
    assert server.api("POST", "/rules", token=op_token, json=body).status_code == 201
