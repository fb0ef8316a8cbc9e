"""``make run``: the server on SQLite under ./corral-data with a simulated fleet of 50 devices
in 3 sites and 2 hardware models, and one real agent on this machine (tag ``name=this-machine``:
simulated devices have no shell, so this is the device whose terminal, files and metrics are
real; ``CORRAL_LOCAL_AGENT=0`` leaves it out). Ctrl-C stops everything; running it again reuses
the data (the same devices come back with the same identities)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from corral.server.config import ServerConfig
from corral.server.main import init

DATA = Path(os.environ.get("CORRAL_DATA_DIR", "corral-data"))
BIND = os.environ.get("CORRAL_BIND", "127.0.0.1:8080")
SITES = ("berlin", "lisbon", "osaka")
DEVICES = int(os.environ.get("CORRAL_SIM_DEVICES", "50"))
#: more `corral sim` options (tests make the fleet report faster: --telemetry-interval 1)
SIM_ARGS = shlex.split(os.environ.get("CORRAL_SIM_ARGS", ""))
LOCAL_AGENT = os.environ.get("CORRAL_LOCAL_AGENT", "1") != "0"
LOCAL_AGENT_NAME = "this-machine"


def _write_private(path: Path, doc: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"error: the server did not become healthy at {url}")


def _demo_setup(url: str, token: str) -> list[str]:
    """Create the demo's site groups and one enrollment token per site (once)."""
    path = DATA / "demo-tokens.json"
    if path.exists():
        return list(json.loads(path.read_text()))
    h = {"Authorization": f"Bearer {token}"}
    tokens = []
    with httpx.Client(base_url=f"{url}/api/v1", headers=h, timeout=30) as c:
        for site in SITES:
            c.post("/groups", json={"name": f"site-{site}", "selector": f'tag.site == "{site}"',
                                    "description": f"devices in {site}"})
            r = c.post("/enrollment-tokens", json={"tags": {"site": site}, "description": f"demo fleet, {site}"})
            r.raise_for_status()
            tokens.append(r.json()["token"])
        c.post("/groups", json={"name": "rpi4", "selector": 'attr.model == "rpi4"'})
        # monitoring: a group alert per site, an offline alert, and a rule every device evaluates
        c.post("/alerts", json={"name": "site-cpu-high", "kind": "threshold", "by": "tag.site",
                                "expr": "avg(cpu.percent) > 80 for 5m", "severity": "warning"})
        c.post("/alerts", json={"name": "device-offline", "kind": "offline", "for": "10m", "severity": "error"})
        c.post("/rules", json={"name": "cpu-pegged", "kind": "threshold", "expr": "cpu.percent > 95 for 2m",
                               "severity": "warning"})
    _write_private(path, tokens)
    return tokens


def _local_agent(url: str, token: str, corral: list[str]) -> list[str]:
    """The command of the real agent on this machine (its enrollment token made once). Its files
    go to DATA/agent/files only; its shell is the user's own, reachable by the console's admin."""
    path = DATA / "demo-agent-token.json"
    if path.exists():
        enroll = str(json.loads(path.read_text()))
    else:
        with httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            r = c.post("/enrollment-tokens", json={"tags": {"name": LOCAL_AGENT_NAME},
                                                   "description": "make run: the agent on this machine"})
            r.raise_for_status()
            enroll = r.json()["token"]
        _write_private(path, enroll)
    state = DATA / "agent"
    (state / "files").mkdir(parents=True, exist_ok=True)
    config = DATA / "agent.toml"
    config.write_text(f"[remote]\ndirs = [{json.dumps(str((state / 'files').resolve()))}]\n")
    return [*corral, "agent", "--server", url, "--state-dir", str(state), "--enroll-token", enroll,
            "--config", str(config)]


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # stop the children on `kill` too, not only Ctrl-C
    host, _, port = BIND.rpartition(":")
    cfg = ServerConfig(data_dir=DATA, host=host, port=int(port))
    creds_path = DATA / "demo-credentials.json"
    creds = init(cfg)
    if creds is not None:
        _write_private(creds_path, creds)
    elif creds_path.exists():
        creds = json.loads(creds_path.read_text())
    url = cfg.public_url
    corral = [sys.executable, "-m", "corral"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = subprocess.Popen([*corral, "server", "--data-dir", str(DATA), "--bind", BIND])
        procs.append(server)
        _wait_healthy(url, server)
        tokens = _demo_setup(url, creds["api_token"]) if creds else []
        sim_cmd = [*corral, "sim", "--server", url, "--devices", str(DEVICES), "--state-dir", str(DATA / "sim")]
        for t in tokens:
            sim_cmd += ["--enroll-token", t]
        sim_cmd += SIM_ARGS
        procs.append(subprocess.Popen(sim_cmd))
        if LOCAL_AGENT and creds:
            procs.append(subprocess.Popen(_local_agent(url, creds["api_token"], corral)))
        print("\n" + "=" * 64)
        print(f"  Corral is running: {url}")
        if creds:
            print(f"  admin user:     {creds['admin_user']}")
            print(f"  admin password: {creds['admin_password']}")
            print(f"  CLI:  corral login --server {url} --user {creds['admin_user']}")
        print(f"  {DEVICES} simulated devices in {', '.join(SITES)}; data in {DATA}/")
        if LOCAL_AGENT and creds:
            print(f"  and a real agent on this machine (tag name={LOCAL_AGENT_NAME}): its terminal, file")
            print("  transfer and metrics are real (the simulated devices have no shell)")
        print("  live metrics: corral metrics query --metric cpu.percent --by tag.site --since 15m")
        print("  the fleet:    corral overview")
        print("  Ctrl-C stops everything.")
        print("=" * 64 + "\n", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
