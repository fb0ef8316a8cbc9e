"""Rollouts end to end (issue 5): a real server, a fleet of simulated devices (`corral sim`, whose
updates follow the real report protocol and whose "bad" releases raise their metrics), the CLI.

Waves advance and the rollout completes; the install gate pauses at exactly the right count; the
health gate stops a bad release and reverts the updated devices; a server killed mid-rollout
finishes it without telling a device twice or forgetting one; abort with revert."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProc, corral_cmd, wait_until
from tests.integration.test_artifacts import upload
from tests.integration.test_sim import online_ids
from tests.integration.webhook_receiver import Receiver

N = 12


@dataclass
class Fleet:
    server: ServerProc
    ids: list[str]


def start_sim(server: ServerProc, tmp: Path, n: int, *extra: str) -> subprocess.Popen[bytes]:
    token = server.create_enrollment_token(tags={"ring": "prod"})
    tmp.mkdir(parents=True, exist_ok=True)
    with (tmp / "sim.log").open("ab") as log:
        return subprocess.Popen(corral_cmd("sim", "--server", server.url, "--devices", str(n), "--enroll-token",
                                           token, "--state-dir", str(tmp / "sim"), "--update-time", "0.2-0.6",
                                           "--telemetry-interval", "1", *extra),
                                stdout=subprocess.DEVNULL, stderr=log)


def fleet_of(server: ServerProc, tmp: Path, *extra: str, n: int = N) -> Iterator[Fleet]:
    sim = start_sim(server, tmp, n, *extra)
    try:
        ids = wait_until(lambda: (got := online_ids(server)) and len(got) == n and sorted(got), timeout=60,
                         what=f"{n} sim devices online")
        yield Fleet(server, ids)
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=30)


@pytest.fixture
def fleet(server: ServerProc, tmp_path: Path) -> Iterator[Fleet]:
    yield from fleet_of(server, tmp_path)


def artifact(s: ServerProc, version: str, name: str = "sensor") -> None:
    r = upload(s, f"{name} {version}".encode(), name=name, version=version, kind="app")
    assert r.status_code == 201, r.text


def create(s: ServerProc, ref: str, *args: str) -> str:
    r = s.cli("rollout", "create", ref, "--selector", 'tag.ring == "prod"', "--seed", "7", "--json", *args)
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["id"])


def show(s: ServerProc, rollout_id: str) -> dict[str, Any]:
    r = s.api("GET", f"/rollouts/{rollout_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def devices(s: ServerProc, rollout_id: str) -> list[dict[str, Any]]:
    r = s.api("GET", f"/rollouts/{rollout_id}/devices", params={"limit": 1000})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def status_is(s: ServerProc, rollout_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
    doc: dict[str, Any] = wait_until(lambda: (d := show(s, rollout_id))["status"] in statuses and d,
                                     timeout=timeout, interval=0.2, what=f"rollout {rollout_id} {'/'.join(statuses)}")
    return doc


def versions(s: ServerProc, ids: list[str], name: str = "sensor") -> dict[str, str | None]:
    out = {}
    for d in ids:
        out[d] = s.api("GET", f"/devices/{d}").json()["inventory"].get("software", {}).get(f"app.{name}")
    return out


def test_four_waves_complete_from_the_cli_with_both_gates(fleet: Fleet, receiver: Receiver) -> None:
    s = fleet.server
    hook = s.api("POST", "/webhooks", json={"url": receiver.url, "events": ["rollout.*"]})
    assert hook.status_code == 201, hook.text
    secret = hook.json()["secret"]
    artifact(s, "1.0.0")
    rollout_id = create(s, "sensor@1.0.0", "--waves", "1,25%,50%,all", "--min-sample", "1",
                        "--max-failure-rate", "0.5", "--health-metric", "app.crashes", "--health-window", "30s",
                        "--health-absolute", "0.5", "--max-concurrent", "4")
    watched = s.cli("rollout", "watch", rollout_id, "--timeout", "90")
    assert watched.returncode == 0, watched.stderr
    assert f"rollout {rollout_id} completed" in watched.stderr
    doc = show(s, rollout_id)
    assert doc["status"] == "completed" and doc["current_wave"] == 4
    assert [w["size"] for w in doc["waves"]] == [1, 2, 3, 6]  # cumulative 1, 3, 6, 12
    assert all(w["states"] == {"succeeded": w["size"]} for w in doc["waves"])
    rows = devices(s, rollout_id)
    assert sorted(r["device_id"] for r in rows) == fleet.ids and all(r["attempt"] == 1 for r in rows)
    assert {r["status"] for r in rows} == {"succeeded"}
    wait_until(lambda: set(versions(s, fleet.ids).values()) == {"1.0.0"}, what="1.0.0 in every inventory")
    # the wave order is the seeded one, reproducible: the same seed gives the same first device
    first = [r["device_id"] for r in rows if r["wave"] == 1]
    assert len(first) == 1
    events = wait_until(lambda: (ev := receiver.verified(secret)) and ev[-1]["type"] == "rollout.completed" and ev,
                        what="the webhook events")
    kinds = [e["type"] for e in events]
    assert kinds == ["rollout.started", "rollout.wave_advanced", "rollout.wave_advanced", "rollout.wave_advanced",
                     "rollout.completed"]
    listed = s.cli("rollout", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["id"] == rollout_id
    actions = [e["action"] for e in s.api("GET", "/audit").json()["items"]]
    assert "rollout.create" in actions


def test_the_install_gate_pauses_at_exactly_the_right_count(server: ServerProc, tmp_path: Path) -> None:
    s = server
    for f in fleet_of(s, tmp_path, "--update-fail-rate", "1"):
        artifact(s, "2.0.0")
        # one device at a time: the third failure is the one that trips 50 % over a sample of 3
        rollout_id = create(s, "sensor@2.0.0", "--waves", "all", "--min-sample", "3", "--max-failure-rate", "0.5",
                            "--max-concurrent", "1")
        doc = status_is(s, rollout_id, "paused")
        assert doc["reason"] == "install gate: 3 of 3 finished devices in wave 1 failed (100% > 50%)"
        rows = devices(s, rollout_id)
        told = [r for r in rows if r["attempt"] > 0]
        assert len(told) == 3 and all(r["state"] == "failed" for r in told)
        assert all(r["state"] == "pending" for r in rows if r["attempt"] == 0)
        # paused: nobody else is told while the engine keeps stepping (it does every second)
        for _ in range(6):
            time.sleep(0.5)
            assert len([r for r in devices(s, rollout_id) if r["attempt"] > 0]) == 3
        # resume accepts those three; the next three failures trip it again
        r = s.cli("rollout", "resume", rollout_id)
        assert r.returncode == 0 and "running" in r.stdout, r.stderr
        status_is(s, rollout_id, "paused")
        assert len([r for r in devices(s, rollout_id) if r["attempt"] > 0]) == 6
        # bad requests change nothing
        assert s.api("POST", f"/rollouts/{rollout_id}/pause").status_code == 409
        assert s.api("POST", "/rollouts/nope/pause").status_code == 404
        r = s.cli("rollout", "pause", rollout_id)
        assert r.returncode == 1 and "paused" in r.stderr and r.stderr.count("\n") == 1
        assert f.ids


def test_bad_requests_create_nothing(fleet: Fleet) -> None:
    s = fleet.server
    artifact(s, "1.0.0")
    base = {"artifact": "sensor@1.0.0", "selector": 'tag.ring == "prod"'}
    bad = [
        ({**base, "artifact": "sensor@9"}, "no artifact sensor@9"),
        ({**base, "selector": "tag.ring =="}, "selector"),
        ({**base, "selector": 'tag.ring == "nowhere"'}, "matches no accepted device"),
        ({**base, "waves": "10%,50%"}, "last wave must be 100% or all"),
        ({**base, "waves": "50%,10%,all"}, "must not shrink"),
        ({**base, "pacing": {"windows": ["25:00-26:00"]}}, "not a time of day"),
        ({**base, "pacing": {"per_tag": "site"}}, "per_tag and per_tag_max go together"),
        ({**base, "install_gate": {"max_failure_rate": 1.5}}, "max_failure_rate"),
        ({**base, "health_gate": {"metric": ""}}, "metric"),
    ]
    for body, why in bad:
        r = s.api("POST", "/rollouts", json=body)
        assert 400 <= r.status_code < 500 and why in r.text, (body, r.status_code, r.text)
    viewer = s.make_user("vera", "viewer")
    assert s.api("POST", "/rollouts", token=viewer, json=base).status_code == 403
    assert s.api("GET", "/rollouts").json()["items"] == []
    assert s.api("GET", "/deployments").json()["items"] == []
    r = s.cli("rollout", "create", "sensor@1.0.0", "--selector", "tag.ring ==")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr


def test_the_health_gate_stops_a_bad_release_and_reverts_the_updated_devices(fleet: Fleet) -> None:
    s = fleet.server
    artifact(s, "1.0.0")
    first = create(s, "sensor@1.0.0", "--waves", "all")
    status_is(s, first, "completed")
    wait_until(lambda: set(versions(s, fleet.ids).values()) == {"1.0.0"}, what="1.0.0 everywhere")
    # 1.1.0-bad raises app.crashes on the devices that run it; the canary wave of 4 shows it
    artifact(s, "1.1.0-bad")
    bad = create(s, "sensor@1.1.0-bad", "--waves", "4,all", "--wave-wait", "5m", "--health-metric", "app.crashes",
                 "--health-window", "30s", "--health-absolute", "0.5", "--health-min-devices", "3", "--auto-revert")
    doc = status_is(s, bad, "paused", timeout=90)
    assert doc["reason"].startswith("health gate: app.crashes on 4 updated devices"), doc["reason"]
    rows = wait_until(lambda: (rs := devices(s, bad)) and all(r["state"] != "reverting" for r in rs) and rs,
                      timeout=60, what="the reverts to finish")
    updated = [r for r in rows if r["wave"] == 1]
    assert {r["state"] for r in updated} == {"reverted"} and {r["previous_version"] for r in updated} == {"1.0.0"}
    assert all(r["state"] == "pending" for r in rows if r["wave"] == 2)  # the bad release went no further
    wait_until(lambda: set(versions(s, fleet.ids).values()) == {"1.0.0"}, what="1.0.0 everywhere again")


def test_a_server_killed_mid_rollout_finishes_it_without_telling_a_device_twice(fleet: Fleet) -> None:
    s = fleet.server
    artifact(s, "3.0.0")
    rollout_id = create(s, "sensor@3.0.0", "--waves", "25%,all", "--max-concurrent", "2")
    wait_until(lambda: any(r["state"] == "succeeded" for r in devices(s, rollout_id)), interval=0.05,
               what="the first device updated")
    s.stop(signal.SIGKILL)
    s.restart()
    doc = status_is(s, rollout_id, "completed", timeout=90)
    assert all(w["states"] == {"succeeded": w["size"]} for w in doc["waves"])
    rows = devices(s, rollout_id)
    assert sorted(r["device_id"] for r in rows) == fleet.ids  # none forgotten
    assert all(r["attempt"] == 1 for r in rows)  # none told twice (a second attempt would be ID.2)
    dep = s.api("GET", f"/deployments/{doc['deployment_id']}").json()
    assert sorted(d["device_id"] for d in dep["devices"]) == fleet.ids and {d["status"] for d in dep["devices"]} == \
        {"succeeded"}


def test_abort_with_revert(fleet: Fleet) -> None:
    s = fleet.server
    artifact(s, "1.0.0")
    status_is(s, create(s, "sensor@1.0.0", "--waves", "all"), "completed")
    artifact(s, "2.0.0")
    rollout_id = create(s, "sensor@2.0.0", "--waves", "50%,all", "--wave-wait", "5m")
    wait_until(lambda: show(s, rollout_id)["waves"][0]["states"] == {"succeeded": N // 2}, timeout=60,
               what="the first wave updated")
    r = s.cli("rollout", "abort", rollout_id, "--revert")
    assert r.returncode == 0 and "aborted" in r.stdout, r.stderr
    rows = wait_until(lambda: (rs := devices(s, rollout_id)) and all(x["state"] != "reverting" for x in rs) and rs,
                      timeout=60, what="the reverts")
    assert sorted(x["state"] for x in rows) == ["pending"] * (N // 2) + ["reverted"] * (N // 2)
    wait_until(lambda: set(versions(s, fleet.ids).values()) == {"1.0.0"}, what="1.0.0 everywhere again")
    assert s.api("POST", f"/rollouts/{rollout_id}/resume").status_code == 409  # aborted stays aborted


def test_devices_that_join_later_are_included(fleet: Fleet, tmp_path: Path) -> None:
    s = fleet.server
    artifact(s, "1.0.0")
    rollout_id = create(s, "sensor@1.0.0", "--waves", "50%,all", "--include-new")
    wait_until(lambda: all(w["states"] == {"succeeded": w["size"]} for w in show(s, rollout_id)["waves"]),
               timeout=60, what="the first devices updated")
    assert show(s, rollout_id)["status"] == "running"  # following the selector: it does not complete
    late = start_sim(s, tmp_path / "late", 2)  # two more devices with the same tag
    try:
        rows = wait_until(lambda: (rs := devices(s, rollout_id)) and len(rs) == N + 2
                          and all(r["state"] == "succeeded" for r in rs) and rs, timeout=60,
                          what="the late devices updated")
        assert len({r["device_id"] for r in rows} - set(fleet.ids)) == 2
        assert {r["wave"] for r in rows if r["device_id"] not in fleet.ids} == {2}  # the last wave
    finally:
        late.send_signal(signal.SIGTERM)
        late.wait(timeout=30)
    r = s.cli("rollout", "abort", rollout_id)  # a following rollout ends when told
    assert r.returncode == 0 and "aborted" in r.stdout


def test_failed_devices_are_retried_as_new_attempts_then_given_up(server: ServerProc, tmp_path: Path) -> None:
    s = server
    for f in fleet_of(s, tmp_path, "--update-fail-rate", "1", n=3):
        artifact(s, "2.0.0")
        rollout_id = create(s, "sensor@2.0.0", "--waves", "all", "--no-install-gate", "--retries", "1",
                            "--retry-backoff", "1s", "--per-tag", "ring=1")
        doc = status_is(s, rollout_id, "completed")
        assert doc["waves"][0]["states"] == {"failed": 3}
        rows = devices(s, rollout_id)
        # each device was told twice: attempt 2 reached it as a new deployment (ID.2) and its report counted
        assert [(r["attempt"], r["status"], r["reason"]) for r in rows] == \
            [(2, "failed", "simulated install failure")] * 3
        assert sorted(r["device_id"] for r in rows) == f.ids
