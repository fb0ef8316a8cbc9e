"""`make run` (corral.devrun): server + simulated fleet + one real agent on this machine, Ctrl-C
stops all of it, a rerun reuses the data and the same devices come back; the real agent's terminal
works (the simulated devices have none)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import free_port, wait_until


def _start(data: Path, port: int, sim_args: str = "", devices: int = 12) -> subprocess.Popen[str]:
    env = {**os.environ, "CORRAL_DATA_DIR": str(data), "CORRAL_BIND": f"127.0.0.1:{port}",
           "CORRAL_SIM_DEVICES": str(devices), "CORRAL_LOG_LEVEL": "WARNING", "CORRAL_SIM_ARGS": sim_args}
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
        everything = wait_until(lambda: (d := _devices(url, creds["api_token"])) and len(d) == 13
                                and all(x["online"] for x in d)
                                and all(x["inventory"].get("model") for x in d if "site" in x["tags"]) and d,
                                timeout=90, what="12 simulated devices and the real agent online")
        devices = [d for d in everything if "site" in d["tags"]]
        (local,) = [d for d in everything if d["tags"].get("name") == "this-machine"]
        # the real agent's shell, through the server (what the console's terminal page opens)
        env = {**os.environ, "CORRAL_SERVER": url, "CORRAL_TOKEN": creds["api_token"],
               "XDG_CONFIG_HOME": str(tmp_path / "cli")}
        shell = subprocess.run([sys.executable, "-m", "corral", "terminal", local["id"]], env=env, timeout=60,
                               input="echo hi-from-$((6*7))\nexit 3\n", capture_output=True, text=True)
        # live metrics per site and per device (the simulated devices report every 10 s)
        def sites() -> list[dict]:  # the real agent has no site: its series is keyed None
            return [x for x in _query(url, creds["api_token"], by="tag.site") if x["key"]["tag.site"]]

        by_site = wait_until(lambda: len(sites()) == 3 and sites(), timeout=60, what="cpu.percent per site")
        one = _query(url, creds["api_token"], device=devices[0]["id"])
        alerts = httpx.get(f"{url}/api/v1/alerts", headers={"Authorization": f"Bearer {creds['api_token']}"},
                           timeout=5).json()["items"]
    finally:
        out = _ctrl_c(proc)
    assert proc.returncode == 0, out
    assert url in out and creds["admin_password"] in out and "a real agent on this machine" in out
    assert shell.returncode == 3 and "hi-from-42" in shell.stdout, (shell.returncode, shell.stdout, shell.stderr)
    assert len(devices) == 12
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
        again = wait_until(lambda: (d := _devices(url, creds["api_token"])) and len(d) == 13
                           and all(x["online"] for x in d) and d, timeout=90, what="the same fleet back")
    finally:
        out = _ctrl_c(proc)
    assert proc.returncode == 0, out
    assert sorted(d["id"] for d in again) == sorted(d["id"] for d in everything)
    assert creds["admin_password"] in out  # the same admin, printed again


def test_the_readme_rollout_demo_on_the_make_run_fleet(tmp_path: Path) -> None:
    """The README's rollout demo, command by command, on `make run`'s fleet (reporting every second
    and updating in under a second, so the waits are shorter than the README's)."""
    data, port = tmp_path / "corral-data", free_port()
    url = f"http://127.0.0.1:{port}"
    # 30 devices: the first wave (10 %) holds 3, what the health gate needs by default to judge
    proc = _start(data, port, "--telemetry-interval 1 --update-time 0.2-0.5", devices=30)
    try:
        wait_until(lambda: (data / "demo-credentials.json").exists(), timeout=60, what="credentials")
        creds = json.loads((data / "demo-credentials.json").read_text())
        wait_until(lambda: len(_devices(url, creds["api_token"])) == 31, timeout=90,
                   what="30 simulated devices and the real agent")
        env = {**os.environ, "CORRAL_SERVER": url, "CORRAL_TOKEN": creds["api_token"],
               "XDG_CONFIG_HOME": str(tmp_path / "cli"), "COLUMNS": "200"}

        def corral(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True, text=True, env=env,
                                  timeout=180, cwd=tmp_path)

        (tmp_path / "demo.bin").write_bytes(os.urandom(1 << 20))
        assert corral("artifact", "upload", "demo.bin", "--name", "demo", "--version", "1.0.0",
                      "--kind", "app").returncode == 0
        gates = ["--health-metric", "app.crashes", "--health-absolute", "0.5"]
        r = corral("rollout", "create", "demo@1.0.0", "--selector", "exists(tag.site)", "--waves",
                   "10%,25%,50%,100%", *gates, "--wave-wait", "3s")
        assert r.returncode == 0, r.stderr
        good = r.stdout.strip()
        watched = corral("rollout", "watch", good)
        assert watched.returncode == 0 and f"rollout {good} completed" in watched.stderr, watched.stderr
        assert corral("artifact", "upload", "demo.bin", "--name", "demo", "--version", "1.1.0-bad",
                      "--kind", "app").returncode == 0
        r = corral("rollout", "create", "demo@1.1.0-bad", "--selector", "exists(tag.site)", "--waves",
                   "10%,25%,50%,100%", *gates, "--wave-wait", "1m", "--auto-revert")
        assert r.returncode == 0, r.stderr
        bad = r.stdout.strip()
        watched = corral("rollout", "watch", bad, "--timeout", "120")
        assert watched.returncode == 1 and f"rollout {bad} paused: health gate" in watched.stderr, watched.stderr
        shown = json.loads(corral("rollout", "show", bad, "--json").stdout)
        assert shown["status"] == "paused" and shown["reason"].startswith("health gate: app.crashes"), shown
        first_wave = [d for d in json.loads(corral("rollout", "devices", bad, "--json").stdout) if d["wave"] == 1]
        assert len(first_wave) == 3
        wait_until(lambda: all(d["state"] == "reverted" for d in json.loads(
            corral("rollout", "devices", bad, "--json").stdout) if d["wave"] == 1), timeout=60,
                   what="the first wave reverted")
    finally:
        out = _ctrl_c(proc)
    assert proc.returncode == 0, out
