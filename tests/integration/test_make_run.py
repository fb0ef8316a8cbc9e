"""`make run` (corral.devrun): server + simulated fleet, Ctrl-C stops all of it, a rerun reuses
the data and the same devices come back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import free_port, wait_until


def _start(data: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "CORRAL_DATA_DIR": str(data), "CORRAL_BIND": f"127.0.0.1:{port}",
           "CORRAL_SIM_DEVICES": "12", "CORRAL_LOG_LEVEL": "WARNING"}
    # its own process group, so a "Ctrl-C" reaches the launcher and its children like a terminal's
    return subprocess.Popen([sys.executable, "-m", "corral.devrun"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _devices(url: str, token: str) -> list[dict]:
    try:
        r = httpx.get(f"{url}/api/v1/devices", params={"limit": 100},
                      headers={"Authorization": f"Bearer {token}"}, timeout=5)
    except httpx.HTTPError:
        return []
    return r.json()["items"] if r.status_code == 200 else []


def _query(url: str, token: str, **params: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/metrics/query", params={"metric": "cpu.percent", "since": "5m", **params},
                  headers={"Authorization": f"Bearer {token}"}, timeout=5)
    return r.json()["series"] if r.status_code == 200 else []


def _ctrl_c(proc: subprocess.Popen[str]) -> str:
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return out


def test_make_run_starts_a_fleet_stops_cleanly_and_reuses_data(tmp_path: Path) -> None:
    data, port = tmp_path / "corral-data", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(data, port)
    try:
        wait_until(lambda: (data / "demo-credentials.json").exists(), timeout=60, what="credentials")
        creds = json.loads((data / "demo-credentials.json").read_text())
        devices = wait_until(lambda: (d := _devices(url, creds["api_token"])) and len(d) == 12
                             and all(x["online"] and x["inventory"].get("model") for x in d) and d, timeout=90,
                             what="12 devices online with their inventory")
        # live metrics per site and per device (the simulated devices report every 10 s)
        by_site = wait_until(lambda: len(_query(url, creds["api_token"], by="tag.site")) == 3, timeout=60,
                             what="cpu.percent per site") and _query(url, creds["api_token"], by="tag.site")
        one = _query(url, creds["api_token"], device=devices[0]["id"])
        alerts = httpx.get(f"{url}/api/v1/alerts", headers={"Authorization": f"Bearer {creds['api_token']}"},
                           timeout=5).json()["items"]
    finally:
        out = _ctrl_c(proc)
    assert proc.returncode == 0, out
    assert url in out and creds["admin_password"] in out
    assert {s["key"]["tag.site"] for s in by_site} == {"berlin", "lisbon", "osaka"}
    assert all(0 <= v <= 100 for s in by_site for _, v in s["points"])
    assert len(one) == 1 and one[0]["points"]
    assert {a["name"] for a in alerts} == {"site-cpu-high", "device-offline"}
    sites = {d["tags"]["site"] for d in devices}
    models = {d["inventory"]["model"] for d in devices}
    assert len(sites) == 3 and len(models) == 2
    # everything stopped: nothing listens on the port any more
    try:
        httpx.get(url + "/healthz", timeout=2)
        raise AssertionError("the server is still running after Ctrl-C")
    except httpx.ConnectError:
        pass

    proc = _start(data, port)
    try:
        again = wait_until(lambda: (d := _devices(url, creds["api_token"])) and len(d) == 12
                           and all(x["online"] for x in d) and d, timeout=90, what="the same fleet back")
    finally:
        out = _ctrl_c(proc)
    assert proc.returncode == 0, out
    assert sorted(d["id"] for d in again) == sorted(d["id"] for d in devices)
    assert creds["admin_password"] in out  # the same admin, printed again
