"""Deployments end to end (issue 4): a real server, a real ``corral agent`` process, artifacts
uploaded through the API, deployed with the CLI. An app bundle installs and runs from its slot;
a version whose health check fails rolls back by itself and says so; an artifact altered on the
server's disk is refused by TUF with nothing installed; bad requests create nothing; an agent
killed in the middle of an update resumes and ends on one version."""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.agent.update.supervisor import Supervisor
from tests.conftest import AgentProc, ServerProc, free_port, start_agent, wait_until
from tests.integration.test_artifacts import targets, upload
from tests.integration.test_update_app import get, make_app
from tests.integration.webhook_receiver import Receiver

FINAL = ("succeeded", "failed", "rolled-back")
FAILING_HEALTH = "[health]\ncommand = \"sh -c 'echo not ready; exit 3'\"\ntimeout = \"2s\"\n"


Device = tuple[AgentProc, str, Path]


def _device(server: ServerProc, tmp_path: Path, agents: list[AgentProc], provisioned: bool) -> Iterator[Device]:
    state = tmp_path / "agent"
    state.mkdir()
    config = tmp_path / "agent.toml"
    flags = ["--config", str(config)]
    if provisioned:  # the trusted root the device is provisioned with (ADR 0013)
        r = server.api("GET", "/tuf/root.json")
        assert r.status_code == 200, r.text
        (tmp_path / "root.json").write_bytes(r.content)
        flags += ["--tuf-root", str(tmp_path / "root.json")]
    config.write_text("model = \"testbox\"\n[update]\nhealth_interval = 0.1\nstop_timeout = 5.0\nreserve_bytes = 0\n"
                      "[telemetry]\nenabled = false\n")
    agent = start_agent(server, state, server.create_enrollment_token(), *flags)
    agents.append(agent)
    dev = agent.wait_device_id()
    wait_until(lambda: server.api("GET", f"/devices/{dev}").json().get("online"), what="the agent online")
    try:
        yield agent, dev, config
    finally:
        agent.stop(signal.SIGKILL)
        Supervisor(state / "apps", stop_timeout=2.0).stop_all()


@pytest.fixture
def device(server: ServerProc, tmp_path: Path, agents: list[AgentProc]) -> Iterator[Device]:
    """An accepted agent provisioned with the TUF root, its apps in tmp_path/agent/apps (stopped afterwards)."""
    yield from _device(server, tmp_path, agents, provisioned=True)


@pytest.fixture
def tofu_device(server: ServerProc, tmp_path: Path, agents: list[AgentProc]) -> Iterator[Device]:
    """The same without a provisioned root: it trusts the server's on its first update."""
    yield from _device(server, tmp_path, agents, provisioned=False)


def restart_agent(server: ServerProc, agent: AgentProc, config: Path) -> AgentProc:
    root = agent.state_dir.parent / "root.json"
    return start_agent(server, agent.state_dir, None, "--config", str(config),
                       *(["--tuf-root", str(root)] if root.exists() else []))


def deploy(s: ServerProc, ref: str, *devices: str) -> str:
    args = ["deploy", ref, "--json"]
    for d in devices:
        args += ["--device", d]
    r = s.cli(*args)
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["id"])


def show(s: ServerProc, dep_id: str) -> dict[str, Any]:
    r = s.cli("deployment", "show", dep_id, "--json")
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def finished(s: ServerProc, dep_id: str, timeout: float = 60.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = s.api("GET", f"/deployments/{dep_id}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc if all(d["status"] in FINAL for d in doc["devices"]) else None

    result: dict[str, Any] = wait_until(done, timeout=timeout, interval=0.2, what=f"deployment {dep_id} to end")
    return result


def serving(port: int) -> list[str]:
    """The app's answer (version, slot), once it listens: a restarted app takes a moment."""
    def answer() -> list[str] | None:
        try:
            return get(port).split()[:2]
        except OSError:
            return None

    result: list[str] = wait_until(answer, what=f"the app on port {port}")
    return result


def upload_app(s: ServerProc, tmp: Path, version: str, port: int, health: str = "",
               payload: bytes = b"") -> dict[str, Any]:
    bundle = make_app(tmp / f"demo-{version}.tar.zst", version, port, health=health, payload=payload)
    r = upload(s, bundle.read_bytes(), name="demo", version=version, kind="app", filename="demo.tar.zst")
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


#: the bulk of every version of the demo app in the main test: the same bytes, so that a delta
#: between two versions is small (random, so that it is not because they compress well)
PAYLOAD = random.Random(4).randbytes(2 << 20)


def test_install_then_a_bad_version_rolls_back_then_a_delta_then_a_tampered_one_is_refused(
        server: ServerProc, device: Device, tmp_path: Path) -> None:
    """The issue's "done when", from the CLI."""
    s = server
    agent, dev, _ = device
    port = free_port()
    upload_app(s, tmp_path, "1.0.0", port, payload=PAYLOAD)

    r = s.cli("deploy", "demo@1.0.0", "--device", dev, "--wait", "--json")  # waits, showing progress
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    d1 = doc["id"]
    assert "in-progress" in r.stderr or "succeeded" in r.stderr
    row = doc["devices"][0]
    assert (doc["status"], row["status"], row["step"], row["running_version"], row["download"]) == \
        ("succeeded", "succeeded", "committed", "1.0.0", "full"), doc
    assert serving(port) == ["1.0.0", "a"]  # the app runs from slot a
    assert not (agent.state_dir / "update" / "root-tofu.json").exists()  # the provisioned root was used
    assert (agent.state_dir / "apps" / "demo" / "slots" / "a" / "VERSION").read_text() == "1.0.0"
    # the agent reports the app's version in its inventory once the deployment ended
    wait_until(lambda: s.api("GET", f"/devices/{dev}").json()["inventory"].get("software", {}).get("app.demo")
               == "1.0.0", what="app.demo in the inventory")
    shown = show(s, d1)
    assert shown["devices"][0]["status"] == "succeeded" and shown["counts"] == {"succeeded": 1}

    # v2's health command fails: the agent rolls back by itself, says why, and v1 runs again
    upload_app(s, tmp_path, "2.0.0", port, health=FAILING_HEALTH, payload=PAYLOAD)
    d2 = deploy(s, "demo@2.0.0", dev)
    row = finished(s, d2)["devices"][0]
    assert row["status"] == "rolled-back", row
    assert row["reason"].startswith("unhealthy") and "not ready" in row["reason"], row
    assert row["running_version"] == "1.0.0"
    assert serving(port) == ["1.0.0", "a"]

    # v3 arrives as a delta from the version the device runs (1.0.0, after the rollback), and commits
    v3 = upload_app(s, tmp_path, "3.0.0", port, payload=PAYLOAD)
    d3 = deploy(s, "demo@3.0.0", dev)
    row = finished(s, d3)["devices"][0]
    assert (row["status"], row["running_version"], row["download"]) == ("succeeded", "3.0.0", "delta"), row
    assert serving(port) == ["3.0.0", "b"]
    delta = targets(s)["demo/3.0.0/delta-from-1.0.0"]
    assert delta["length"] < v3["size"] // 10, (delta["length"], v3["size"])  # what the device fetched
    bases = agent.state_dir / "update" / "bases" / "demo"
    assert [f.name for f in bases.iterdir()] == [v3["sha256"]]  # v3's file is the next delta's base
    r = s.cli("deployment", "show", d3)
    assert r.returncode == 0 and "delta" in r.stdout, r.stdout

    # v4's bytes are altered on the server's disk after upload: no delta can be built from them,
    # and TUF refuses the full artifact
    v4 = upload_app(s, tmp_path, "4.0.0", port, payload=PAYLOAD)
    blob = s.data_dir / "artifacts" / v4["sha256"]
    tampered = bytearray(blob.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    blob.write_bytes(bytes(tampered))
    d4 = deploy(s, "demo@4.0.0", dev)
    row = finished(s, d4)["devices"][0]
    assert row["status"] == "failed", row
    assert "hash" in row["reason"].lower() or "length" in row["reason"].lower(), row
    assert row["running_version"] == "3.0.0"
    assert serving(port) == ["3.0.0", "b"]
    slot_a = agent.state_dir / "apps" / "demo" / "slots" / "a" / "VERSION"
    assert not slot_a.exists() or slot_a.read_text() != "4.0.0"  # nothing of v4 installed

    # a device that no longer holds its version's file is offered the delta and downloads in full
    for f in bases.iterdir():
        f.unlink()
    upload_app(s, tmp_path, "5.0.0", port, payload=PAYLOAD)
    d5 = deploy(s, "demo@5.0.0", dev)
    row = finished(s, d5)["devices"][0]
    assert (row["status"], row["running_version"], row["download"]) == ("succeeded", "5.0.0", "full"), row
    assert "demo/5.0.0/delta-from-3.0.0" in targets(s)

    r = s.cli("deployment", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = {d["id"]: d["status"] for d in json.loads(r.stdout)}
    assert listed == {d1: "succeeded", d2: "failed", d3: "succeeded", d4: "failed", d5: "succeeded"}
    # an artifact a deployment used cannot be deleted
    assert s.api("DELETE", "/artifacts/demo/1.0.0").status_code == 409
    # audited
    actions = [e["action"] for e in s.api("GET", "/audit").json()["items"]]
    assert actions.count("deployment.create") == 5


def test_bad_requests_create_nothing(server: ServerProc, device: Device,
                                     tmp_path: Path) -> None:
    s = server
    _, dev, _ = device
    upload_app(s, tmp_path, "1.0.0", free_port())
    r = upload(s, b"x" * 100, name="fw", version="1", kind="app", hardware=["rpi4"])
    assert r.status_code == 201, r.text
    wait_until(lambda: s.api("GET", f"/devices/{dev}").json()["inventory"].get("model") == "testbox",
               what="the agent's inventory")
    bad = [
        ({"artifact": "demo@9.9.9", "devices": [dev]}, "no artifact demo@9.9.9"),
        ({"artifact": "demo", "devices": [dev]}, "NAME@VERSION"),
        ({"artifact": "demo@1.0.0", "devices": []}, "at least one device"),
        ({"artifact": "demo@1.0.0", "devices": ["0" * 32]}, "no device"),
        ({"artifact": "fw@1", "devices": [dev]}, "is for rpi4; device"),
    ]
    for body, why in bad:
        r = s.api("POST", "/deployments", json=body)
        assert 400 <= r.status_code < 500 and why in r.text, (body, r.status_code, r.text)
    r = s.cli("deploy", "demo@9.9.9", "--device", dev)
    assert r.returncode == 1 and "no artifact" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    viewer = s.make_user("vera", "viewer")
    assert s.api("POST", "/deployments", token=viewer, json={"artifact": "demo@1.0.0", "devices": [dev]}) \
        .status_code == 403
    assert s.api("GET", "/deployments", token=viewer).json()["items"] == []
    assert s.api("GET", "/deployments/nope").status_code == 404
    # a decommissioned device is refused
    assert s.cli("device", "decommission", dev).returncode == 0
    r = s.api("POST", "/deployments", json={"artifact": "demo@1.0.0", "devices": [dev]})
    assert r.status_code == 400 and "decommissioned" in r.text, r.text
    assert s.api("GET", "/deployments").json()["items"] == []


def test_an_agent_killed_during_an_update_resumes_and_ends_on_one_version(
        server: ServerProc, device: Device, tmp_path: Path, agents: list[AgentProc]) -> None:
    s = server
    agent, dev, config = device
    port = free_port()
    upload_app(s, tmp_path, "1.0.0", port)
    assert finished(s, deploy(s, "demo@1.0.0", dev))["devices"][0]["status"] == "succeeded"
    # v2 takes a while to become healthy (its health command sleeps): kill the agent meanwhile
    slow = "[health]\ncommand = \"sh -c 'sleep 3'\"\ntimeout = \"30s\"\n"
    upload_app(s, tmp_path, "2.0.0", port, health=slow)
    d2 = deploy(s, "demo@2.0.0", dev)
    wait_until(lambda: s.api("GET", f"/deployments/{d2}").json()["devices"][0]["step"] == "health_checking",
               timeout=30, interval=0.05, what="the health check under way")
    agent.stop(signal.SIGKILL)
    record = agent.state_dir / "update" / "record"
    assert record.exists()
    again = restart_agent(s, agent, config)
    agents.append(again)
    row = finished(s, d2)["devices"][0]
    assert row["status"] == "succeeded", row  # the health check was opened again and passed
    assert row["running_version"] == "2.0.0"
    assert serving(port) == ["2.0.0", "b"]
    assert not record.exists()


def test_an_offline_device_is_told_when_it_connects(
        server: ServerProc, tofu_device: Device, tmp_path: Path, agents: list[AgentProc],
        receiver: Receiver) -> None:
    s = server
    agent, dev, config = tofu_device
    r = s.api("POST", "/webhooks", json={"url": receiver.url, "events": ["deployment.*"]})
    assert r.status_code == 201, r.text
    secret = r.json()["secret"]
    port = free_port()
    upload_app(s, tmp_path, "1.0.0", port)
    agent.stop()
    wait_until(lambda: not s.api("GET", f"/devices/{dev}").json().get("online"), what="the agent offline")
    d1 = deploy(s, "demo@1.0.0", dev)
    doc = s.api("GET", f"/deployments/{d1}").json()
    assert (doc["status"], doc["devices"][0]["status"]) == ("queued", "queued")
    again = restart_agent(s, agent, config)  # the update code is not loaded until the deploy arrives
    agents.append(again)
    row = finished(s, d1)["devices"][0]
    assert (row["status"], row["running_version"]) == ("succeeded", "1.0.0"), row
    assert serving(port) == ["1.0.0", "a"]
    assert (agent.state_dir / "update" / "root-tofu.json").read_bytes() == s.api("GET", "/tuf/root.json").content
    [event] = wait_until(lambda: receiver.verified(secret), what="the webhook event")
    assert event["type"] == "deployment.device_finished"
    assert {k: event["data"][k] for k in ("deployment", "device", "status")} == \
        {"deployment": d1, "device": dev, "status": "succeeded"}
    # a final status is not sent again on the next connect, and nothing changes
    again.stop()
    third = restart_agent(s, agent, config)
    agents.append(third)
    wait_until(lambda: s.api("GET", f"/devices/{dev}").json().get("online"), what="the agent online")
    assert s.api("GET", f"/deployments/{d1}").json()["devices"][0] == row


def test_reports_lost_while_the_server_is_down_arrive_after_it_comes_back(
        server: ServerProc, device: Device, tmp_path: Path) -> None:
    s = server
    agent, dev, _ = device
    port = free_port()
    upload_app(s, tmp_path, "1.0.0", port, health="[health]\ncommand = \"sh -c 'sleep 3'\"\ntimeout = \"30s\"\n")
    d1 = deploy(s, "demo@1.0.0", dev)
    wait_until(lambda: s.api("GET", f"/deployments/{d1}").json()["devices"][0]["step"] == "health_checking",
               timeout=30, interval=0.05, what="the health check under way")
    s.stop()  # the final report is made while the server is away
    finished_on_disk = agent.state_dir / "update" / "finished"
    wait_until(finished_on_disk.exists, timeout=30, what="the deployment to end on the device")
    s.restart()
    row = finished(s, d1)["devices"][0]
    assert (row["status"], row["step"], row["running_version"]) == ("succeeded", "committed", "1.0.0"), row


def test_a_full_disk_aborts_cleanly_and_the_running_version_stays(
        server: ServerProc, device: Device, tmp_path: Path, agents: list[AgentProc]) -> None:
    s = server
    agent, dev, config = device
    port = free_port()
    upload_app(s, tmp_path, "1.0.0", port)
    assert finished(s, deploy(s, "demo@1.0.0", dev))["devices"][0]["status"] == "succeeded"
    # the device must keep more free than its disk has: whatever it installs does not fit
    agent.stop()
    config.write_text(config.read_text().replace("reserve_bytes = 0", f"reserve_bytes = {1 << 60}"))
    again = restart_agent(s, agent, config)
    agents.append(again)
    upload_app(s, tmp_path, "2.0.0", port)
    row = finished(s, deploy(s, "demo@2.0.0", dev))["devices"][0]
    assert (row["status"], row["running_version"]) == ("failed", "1.0.0"), row
    assert "not enough space" in row["reason"], row
    assert serving(port) == ["1.0.0", "a"]
    slot_b = agent.state_dir / "apps" / "demo" / "slots" / "b"
    assert not slot_b.exists() or not any(slot_b.iterdir())  # nothing written, or what was is gone
    assert not any((agent.state_dir / "update" / "downloads").iterdir())
