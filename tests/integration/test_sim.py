"""`corral sim` against a real server: N real agents in one process, each with its own key; after
a server restart they all come back (with jittered backoff) under the same identities. Simulated
devices take deployments (simulated updates: the real protocol, nothing installed)."""

from __future__ import annotations

import json
import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

from tests.conftest import ServerProc, corral_cmd, wait_until
from tests.integration.test_artifacts import upload

N = 100


def online_ids(server: ServerProc) -> set[str]:
    ids: set[str] = set()
    cursor = None
    while True:
        params = {"limit": 1000, "selector": "online and exists(attr.model)", **({"cursor": cursor} if cursor else {})}
        page = server.api("GET", "/devices", params=params).json()
        ids |= {d["id"] for d in page["items"]}
        cursor = page["next_cursor"]
        if not cursor:
            return ids


def all_online(server: ServerProc) -> set[str] | None:
    ids = online_ids(server)
    return ids if len(ids) == N else None


def test_sim_fleet_survives_a_server_restart(server: ServerProc, tmp_path: Path) -> None:
    t1 = server.create_enrollment_token(tags={"site": "berlin"})
    t2 = server.create_enrollment_token(tags={"site": "osaka"})
    sim = subprocess.Popen(corral_cmd("sim", "--server", server.url, "--devices", str(N), "--enroll-token", t1,
                                      "--enroll-token", t2, "--state-dir", str(tmp_path / "sim"),
                                      "--models", "rpi4,imx8mm"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = wait_until(lambda: all_online(server), timeout=120,
                           what=f"{N} sim devices online")
        devices = server.api("GET", "/devices", params={"limit": 1000}).json()["items"]
        assert {d["tags"]["site"] for d in devices} == {"berlin", "osaka"}
        assert {d["inventory"]["model"] for d in devices} == {"rpi4", "imx8mm"}
        assert len({d["inventory"]["hostname"] for d in devices}) == N
        server.restart()
        back = wait_until(lambda: all_online(server), timeout=120,
                          what="the whole fleet back after the restart")
        assert back == first
        assert server.api("GET", "/devices-count").json()["total"] == N  # nobody enrolled twice
        # a command reaches a sim device
        dev = sorted(first)[0]
        r = server.api("POST", f"/devices/{dev}/commands", json={"name": "ping", "wait": 10}).json()
        assert r["status"] == "succeeded"
        # one request fans a command out to a selection; every device answers
        bulk = server.api("POST", "/commands", json={"name": "ping", "selector": 'tag.site == "osaka"'})
        assert bulk.status_code == 201, bulk.text
        cmds = bulk.json()["commands"]
        osaka = {d["id"] for d in devices if d["tags"]["site"] == "osaka"}
        assert set(cmds) == osaka and bulk.json()["count"] == len(osaka)
        wait_until(lambda: all(server.api("GET", f"/commands/{c}").json()["status"] == "succeeded"
                               for c in cmds.values()), timeout=60, what="every bulk command answered")
        # bad bulk requests change nothing
        assert server.api("POST", "/commands", json={"name": "ping"}).status_code == 400
        assert server.api("POST", "/commands", json={"name": "ping", "selector": "online",
                                                     "device_ids": [dev]}).status_code == 400
        assert server.api("POST", "/commands", json={"name": "ping", "device_ids": [dev, "nope"]}).status_code == 404
        assert server.api("POST", "/commands", json={"name": "ping", "selector": "online =="}).status_code == 400
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=30)
    assert sim.returncode == 0


def test_sim_devices_take_a_deployment(server: ServerProc, tmp_path: Path) -> None:
    token = server.create_enrollment_token()
    sim = subprocess.Popen(corral_cmd("sim", "--server", server.url, "--devices", "2", "--enroll-token", token,
                                      "--state-dir", str(tmp_path / "sim"), "--update-time", "0.2-0.5"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        devices = wait_until(lambda: (ids := online_ids(server)) and len(ids) == 2 and sorted(ids),
                             timeout=30, what="2 sim devices online")
        r = upload(server, b"simulated bytes", name="sensor", version="2.1.0", kind="app")
        assert r.status_code == 201, r.text
        args = ["deploy", "sensor@2.1.0", "--json"]
        for d in devices:
            args += ["--device", d]
        done = server.cli(*args)
        assert done.returncode == 0, done.stderr
        dep_id = json.loads(done.stdout)["id"]

        def ended() -> list[dict[str, Any]] | None:
            rows: list[dict[str, Any]] = server.api("GET", f"/deployments/{dep_id}").json()["devices"]
            return rows if all(d["status"] not in ("queued", "in-progress") for d in rows) else None

        rows = wait_until(ended, timeout=30, interval=0.1, what=f"deployment {dep_id} to end")
        assert [(d["device_id"], d["status"], d["running_version"]) for d in rows] == \
            [(d, "succeeded", "2.1.0") for d in devices]

        def software(dev: str) -> dict[str, str] | None:
            sw: dict[str, str] = server.api("GET", f"/devices/{dev}").json()["inventory"]["software"]
            return sw if sw.get("app.sensor") == "2.1.0" else None

        for dev in devices:
            assert "corral-agent" in wait_until(partial(software, dev), what=f"app.sensor in {dev}'s inventory")
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=30)
    assert sim.returncode == 0
