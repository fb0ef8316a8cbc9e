"""``corral sim``: many real agents in one process, against the fake hub."""

from __future__ import annotations

import asyncio
import io
import stat
from pathlib import Path
from typing import Any

import pytest

from corral import protocol
from corral.agent.config import config_from_dict
from corral.errors import InvalidInput
from corral.sim.runner import main_sim, run_sim
from tests.unit.test_agent_connection import GUARD, FakeHub


async def run_until_connected(
    hub: FakeHub, state_dir: Path, tokens: list[str], devices: int, out: io.StringIO, max_connecting: int = 200
) -> tuple[int, dict[int, Any], dict[int, Any]]:
    """Run the simulator until every device has reported its inventory, then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_sim(
            hub.url,
            tokens,
            devices,
            state_dir,
            ["rpi4", "imx8mm"],
            3,
            stop,
            start_rate=1000.0,
            max_connecting=max_connecting,
            summary_interval=0.05,
            out=out,
            config=config_from_dict({"server": hub.url, "proxy": "none"}),
        )
    )
    inventories: dict[int, Any] = {}
    while len(inventories) < devices:
        _, conn, _, inv = await hub.next("inventory")
        inventories[conn] = inv
    stop.set()
    rc = await asyncio.wait_for(task, GUARD)
    return rc, hub.hello_by_conn, inventories


def test_sim_runs_agents_with_their_own_persistent_identities(tmp_path: Path) -> None:
    state = tmp_path / "sim"
    tokens = ["tok-a", "tok-b"]

    async def scenario() -> None:
        async with FakeHub(tokens=tuple(tokens)) as hub:
            out = io.StringIO()
            rc, hellos, invs = await run_until_connected(hub, state, tokens, 5, out)
            assert rc == 0
            by_host = {inv.hostname: hellos[conn] for conn, inv in invs.items()}
            assert sorted(by_host) == [f"sim-000{i}" for i in range(5)]
            for i in range(5):
                assert by_host[f"sim-000{i}"].enroll_token == tokens[i % 2]  # round-robin
            ids = {host: h.device_id for host, h in by_host.items()}
            assert len(set(ids.values())) == 5  # each its own key
            assert {inv.model for inv in invs.values()} <= {"rpi4", "imx8mm"}
            lines = out.getvalue().splitlines()
            assert lines[0].startswith("sim: starting 5 devices")
            assert lines[-1] == "sim: 5/5 connected (5 accepted, 0 pending)"

            for i in range(5):
                d = state / f"sim-000{i}"
                assert stat.S_IMODE(d.stat().st_mode) == 0o700
                assert stat.S_IMODE((d / "device.key").stat().st_mode) == 0o600

            # run again: the same fleet comes back, already enrolled
            rc, hellos, invs = await run_until_connected(hub, state, tokens, 5, io.StringIO())
            assert rc == 0
            again = {inv.hostname: hellos[conn] for conn, inv in invs.items()}
            assert {host: h.device_id for host, h in again.items()} == ids
            assert all(h.enroll_token is None for h in again.values())

    asyncio.run(scenario())


def test_sim_without_token_enrolls_pending(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FakeHub() as hub:
            out = io.StringIO()
            # one device at a time: each starts once the previous one got its answer
            rc, hellos, _ = await run_until_connected(hub, tmp_path, [], 3, out, max_connecting=1)
            assert rc == 0
            assert len(hellos) == 3 and all(h.enroll_token is None for h in hellos.values())
            assert out.getvalue().splitlines()[-1] == "sim: 3/3 connected (0 accepted, 3 pending)"

    asyncio.run(scenario())


def test_sim_exits_1_when_every_device_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> int:
        async with FakeHub(policy=lambda n, hello: protocol.CloseCode.REFUSED) as hub:
            return await asyncio.wait_for(
                run_sim(
                    hub.url,
                    ["t"],
                    3,
                    tmp_path,
                    ["rpi4"],
                    0,
                    start_rate=1000.0,
                    out=io.StringIO(),
                    config=config_from_dict({"server": hub.url, "proxy": "none"}),
                ),
                GUARD,
            )

    assert asyncio.run(scenario()) == 1
    err = capsys.readouterr().err
    assert "error: all 3 simulated devices stopped: 3 refused, 0 failed" in err


@pytest.mark.parametrize(
    ("server", "devices", "message"),
    [("http://127.0.0.1:9", 0, "--devices must be at least 1"), ("nope", 1, "must look like https://host")],
)
def test_sim_invalid_input(tmp_path: Path, server: str, devices: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        asyncio.run(run_sim(server, ["t"], devices, tmp_path, ["rpi4"], 0))


def test_main_sim_reports_invalid_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("corral.agent.main.setup_logging", lambda level: None)  # leave test logging alone
    assert main_sim("nope", ["t"], 2, tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: server URL 'nope'") and err.count("\n") == 1
