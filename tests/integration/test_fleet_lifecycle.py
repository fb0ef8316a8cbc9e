"""The issue's "done when", with real processes: an agent enrolls with a token, shows online
with its inventory, gets tagged, lands in a dynamic group, goes offline when stopped, comes
back with the same id, and once decommissioned can never come back."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.conftest import AgentProc, ServerProc, start_agent, wait_until


def device(server: ServerProc, device_id: str) -> dict:
    r = server.api("GET", f"/devices/{device_id}")
    assert r.status_code == 200, r.text
    return r.json()


def test_enroll_tag_group_presence_decommission(server: ServerProc, tmp_path: Path, agents: list[AgentProc]) -> None:
    token = server.create_enrollment_token(tags={"site": "berlin"}, max_uses=5)
    agent = start_agent(server, tmp_path / "agent1", token)
    agents.append(agent)
    dev_id = agent.wait_device_id()

    # enrolls with the token's tags, online, with its inventory
    d = wait_until(lambda: (x := device(server, dev_id) if server.api("GET", f"/devices/{dev_id}").status_code == 200
                            else None) and x["online"] and x["inventory"] and x, what="device online")
    assert d["status"] == "accepted"
    assert d["tags"] == {"site": "berlin"}
    inv = d["inventory"]
    for key in ("os", "kernel", "arch", "hostname", "agent_version", "software", "disk_free_bytes"):
        assert key in inv, key
    assert inv["software"]["corral-agent"] == inv["agent_version"]

    # tagged through the CLI, it lands in a dynamic group
    r = server.cli("group", "create", "berlin-prod", "--selector",
                   'tag.site == "berlin" and tag.stage == "prod" and online')
    assert r.returncode == 0, r.stderr
    assert server.api("GET", "/groups/berlin-prod").json()["size"] == 0
    r = server.cli("device", "tag", dev_id, "stage=prod")
    assert r.returncode == 0, r.stderr
    members = server.api("GET", "/groups/berlin-prod/devices").json()["items"]
    assert [m["id"] for m in members] == [dev_id]

    # stopped: offline (and out of the group that requires `online`)
    assert agent.stop() == 0
    wait_until(lambda: not device(server, dev_id)["online"], what="device offline")
    assert server.api("GET", "/groups/berlin-prod").json()["size"] == 0

    # restarted without a token: same identity, online again, tags kept
    agent2 = start_agent(server, tmp_path / "agent1")
    agents.append(agent2)
    d = wait_until(lambda: (x := device(server, dev_id))["online"] and x, what="device back online")
    assert d["tags"] == {"site": "berlin", "stage": "prod"}
    assert server.api("GET", "/devices").json()["items"].__len__() == 1

    # decommissioned: the live session closes, the agent stops for good, and cannot come back
    r = server.cli("device", "decommission", dev_id)
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: agent2.proc.poll() is not None, timeout=5, interval=0.05,
                      what="the agent's session closed within 5 s")
    assert agent2.proc.returncode == 1
    assert not device(server, dev_id)["online"]
    agent3 = start_agent(server, tmp_path / "agent1", token)
    agents.append(agent3)
    wait_until(lambda: agent3.proc.poll() is not None, what="refused agent exits")
    assert agent3.proc.returncode == 1
    d = device(server, dev_id)
    assert d["status"] == "decommissioned" and not d["online"]
    # the token was not consumed by the refused attempt
    toks = server.api("GET", "/enrollment-tokens").json()["items"]
    assert toks[0]["uses"] == 1


def test_offline_within_two_heartbeats_when_the_network_vanishes(server: ServerProc, tmp_path: Path,
                                                                 agents: list[AgentProc]) -> None:
    """SIGSTOP freezes the agent: its socket stays open but silent, like a dead NAT mapping."""
    token = server.create_enrollment_token()
    agent = start_agent(server, tmp_path / "a", token)
    agents.append(agent)
    dev_id = agent.wait_device_id()
    wait_until(lambda: server.api("GET", f"/devices/{dev_id}").status_code == 200
               and server.api("GET", f"/devices/{dev_id}").json()["online"], what="online")
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        # heartbeat interval is 1 s in tests: the hub closes silent sessions after 2 intervals
        wait_until(lambda: not server.api("GET", f"/devices/{dev_id}").json()["online"], timeout=10,
                   what="offline after silence")
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: server.api("GET", f"/devices/{dev_id}").json()["online"], what="back online after thaw")


def test_pending_device_is_accepted_by_an_operator(server: ServerProc, tmp_path: Path,
                                                   agents: list[AgentProc]) -> None:
    agent = start_agent(server, tmp_path / "p")
    agents.append(agent)
    dev_id = agent.wait_device_id()
    d = wait_until(lambda: (r := server.api("GET", f"/devices/{dev_id}")).status_code == 200 and r.json())
    assert d["status"] == "pending"
    # commands are for accepted devices only
    r = server.api("POST", f"/devices/{dev_id}/commands", json={"name": "ping"})
    assert r.status_code == 409
    r = server.cli("device", "accept", dev_id, "--json")
    assert r.returncode == 0, r.stderr
    # the live session is promoted without reconnecting: a command goes through
    r = server.api("POST", f"/devices/{dev_id}/commands", json={"name": "ping", "wait": 10})
    assert r.status_code == 201
    assert r.json()["status"] == "succeeded" and r.json()["result"]["pong"] is True


def test_rejected_pending_device_is_refused(server: ServerProc, tmp_path: Path, agents: list[AgentProc]) -> None:
    agent = start_agent(server, tmp_path / "r")
    agents.append(agent)
    dev_id = agent.wait_device_id()
    wait_until(lambda: server.api("GET", f"/devices/{dev_id}").status_code == 200)
    assert server.cli("device", "reject", dev_id).returncode == 0
    wait_until(lambda: agent.proc.poll() is not None, what="rejected agent exits")
    assert agent.proc.returncode == 1
    assert server.api("POST", f"/devices/{dev_id}/accept").status_code == 409


def test_preauthorized_key_is_accepted_on_first_connect(server: ServerProc, tmp_path: Path,
                                                        agents: list[AgentProc]) -> None:
    import base64

    from corral.agent.identity import Identity

    state = tmp_path / "pre"
    ident = Identity.load_or_create(state)
    pub = base64.b64encode(ident.public_key_raw).decode()
    r = server.cli("device", "preauthorize", pub, "--tag", "site=lisbon", "--json")
    assert r.returncode == 0, r.stderr
    agent = start_agent(server, state)  # no token
    agents.append(agent)
    d = wait_until(lambda: (x := server.api("GET", f"/devices/{ident.device_id}").json())["online"] and x)
    assert d["status"] == "accepted" and d["tags"] == {"site": "lisbon"}


def test_commands_round_trip_and_queue_for_offline_devices(server: ServerProc, tmp_path: Path,
                                                           agents: list[AgentProc]) -> None:
    token = server.create_enrollment_token()
    agent = start_agent(server, tmp_path / "c", token)
    agents.append(agent)
    dev_id = agent.wait_device_id()
    wait_until(lambda: (r := server.api("GET", f"/devices/{dev_id}")).status_code == 200 and r.json()["online"])

    r = server.cli("device", "command", dev_id, "ping", "--json")
    assert r.returncode == 0, r.stderr
    assert '"succeeded"' in r.stdout

    r = server.api("POST", f"/devices/{dev_id}/commands", json={"name": "no-such-command", "wait": 10}).json()
    assert r["status"] == "failed" and "unknown command" in r["error"]

    # offline: the command waits in the queue and is delivered on reconnect
    agent.stop()
    wait_until(lambda: not server.api("GET", f"/devices/{dev_id}").json()["online"])
    queued = server.api("POST", f"/devices/{dev_id}/commands", json={"name": "refresh-inventory"}).json()
    assert queued["status"] == "queued"
    agents.append(start_agent(server, tmp_path / "c"))
    done = wait_until(lambda: (c := server.api("GET", f"/commands/{queued['id']}").json())["status"] == "succeeded"
                      and c, what="queued command delivered")
    assert done["error"] is None
    history = server.api("GET", f"/devices/{dev_id}/commands").json()["items"]
    assert [c["name"] for c in history][:1] == ["refresh-inventory"]
