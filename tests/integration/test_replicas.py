"""Scale-out: two server replicas on one PostgreSQL database with NATS between them. A device
connected to replica A is reached by commands and decommissioning done through replica B."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import AgentProc, ServerProc, _spawn_server, free_port, port_open, start_agent, wait_until

NATS = "nats://127.0.0.1:4222"


def _nats_up() -> bool:
    return port_open(4222)


def test_command_and_decommission_across_replicas(tmp_path: Path, pg_url: str, agents: list[AgentProc]) -> None:
    import os

    from tests.conftest import start_server

    if not _nats_up():
        if os.environ.get("CI"):
            pytest.fail("NATS at 127.0.0.1:4222 does not answer, and CI is set")
        pytest.skip("NATS at 127.0.0.1:4222 does not answer")
    a = start_server(tmp_path / "a", db_url=pg_url, extra=["--bus", NATS])
    b_url = f"http://127.0.0.1:{free_port()}"
    b_proc = _spawn_server(a.data_dir, b_url, pg_url, tmp_path / "b.log", a.extra_args)
    b = ServerProc(url=b_url, data_dir=a.data_dir, db_url=pg_url, admin_token=a.admin_token,
                   admin_password=a.admin_password, proc=b_proc, log=tmp_path / "b.log", extra_args=a.extra_args)
    try:
        token = b.create_enrollment_token(tags={"site": "berlin"})
        agent = start_agent(a, tmp_path / "dev", token)  # the device talks to replica A only
        agents.append(agent)
        dev = agent.wait_device_id()
        wait_until(lambda: (r := b.api("GET", f"/devices/{dev}")).status_code == 200 and r.json()["online"],
                   what="B sees the device online")
        r = b.api("POST", f"/devices/{dev}/commands", json={"name": "ping", "wait": 10})
        assert r.json()["status"] == "succeeded", r.text
        assert b.api("POST", f"/devices/{dev}/decommission").status_code == 200
        wait_until(lambda: agent.proc.poll() is not None, timeout=5, what="session on A closed within 5 s")
        assert agent.proc.returncode == 1
        assert not a.api("GET", f"/devices/{dev}").json()["online"]
    finally:
        b.stop()
        a.stop()
