"""``corral sim``'s simulated updates at their I/O seam: a fake ``send`` collects the reports that
would go to the server; acks and deploys are handed in as the agent's receive loop does."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from corral import protocol
from corral.agent.config import config_from_dict
from corral.agent.platform.sim import SimPlatform
from corral.errors import InvalidInput
from corral.sim.runner import SimFleet
from corral.sim.updates import FAILURE_REASON, FINISHED_KEPT, SimUpdater, SimUpdateSettings, parse_time_range
from tests.unit.test_agent_connection import FakeHub

R = protocol.DeploymentReport
T = TypeVar("T")
GUARD = 10.0
FAST = SimUpdateSettings(duration=(0.01, 0.02))


def deploy(dep_id: str, version: str = "2.0.0", name: str = "demo", kind: str = "app") -> protocol.Deploy:
    return protocol.Deploy(deployment_id=dep_id, name=name, version=version, kind=kind,  # type: ignore[arg-type]
                           target_name=f"{name}-{version}.tar.zst", metadata_url="http://server/tuf",
                           target_base_url="http://server/targets")


class Sent:
    """The fake ``send``: the reports in order (with the loop time each was sent at)."""

    def __init__(self) -> None:
        self.reports: list[R] = []
        self.at: list[float] = []

    async def __call__(self, report: R) -> None:
        self.reports.append(report)
        self.at.append(asyncio.get_running_loop().time())

    def take(self) -> list[R]:
        out, self.reports, self.at = self.reports, [], []
        return out


class Finished:
    """The ``on_finished`` callback (the agent's ``send_inventory``): counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(scenario(), GUARD)

    return asyncio.run(guarded())


async def idle(u: SimUpdater) -> None:
    """Until nothing runs or waits."""
    while u.running is not None or u.queued:
        await asyncio.sleep(0.005)


def succeeded(dep_id: str, version: str = "2.0.0", old: str = "") -> list[R]:
    return [
        R(deployment_id=dep_id, seq=1, status="in-progress", step="downloading", running_version=old),
        R(deployment_id=dep_id, seq=2, status="in-progress", step="installing", running_version=old, download="full"),
        R(deployment_id=dep_id, seq=3, status="succeeded", step="committed", running_version=version,
          download="full"),
    ]


def test_a_deploy_is_reported_downloading_installing_then_succeeded_and_installs_the_version() -> None:
    async def scenario() -> None:
        sent, fin = Sent(), Finished()
        u = SimUpdater(SimUpdateSettings(duration=(0.2, 0.2)), random.Random(1), on_finished=fin)
        assert u.inventory() == {}
        await u.attach(sent)
        await u.on_deploy(deploy("d1"))
        assert u.running == "d1"
        await idle(u)
        assert sent.reports == succeeded("d1")
        # downloading at once, installing half-way, the end after the whole (simulated) time
        assert 0.09 <= sent.at[1] - sent.at[0] < 0.5
        assert 0.19 <= sent.at[2] - sent.at[0] < 1.0
        assert fin.calls == 1  # the agent re-sends its inventory
        assert u.inventory() == {"app.demo": "2.0.0"}
        assert await asyncio.to_thread(u.inventory) == {"app.demo": "2.0.0"}  # as the agent calls it
        u.inventory()["app.demo"] = "x"  # a copy
        assert u.inventory() == {"app.demo": "2.0.0"}
        # the next version of the same app reports the one it replaces until it commits
        await u.on_deploy(deploy("d2", "3.0.0"))
        await idle(u)
        assert sent.take()[3:] == succeeded("d2", "3.0.0", old="2.0.0")
        assert u.inventory() == {"app.demo": "3.0.0"}

    run(scenario)


def test_the_last_report_is_resent_on_every_attach_until_its_ack_arrives() -> None:
    async def scenario() -> None:
        sent, fin = Sent(), Finished()
        u = SimUpdater(SimUpdateSettings(duration=(0.1, 0.1)), random.Random(1), on_finished=fin)
        await u.attach(sent)
        await u.on_deploy(deploy("d1"))
        await asyncio.sleep(0.02)
        assert sent.take() == succeeded("d1")[:1]
        u.detach()  # the connection dropped: the rest is not sent, nor the inventory
        await idle(u)
        assert sent.reports == [] and fin.calls == 0
        final = succeeded("d1")[2]
        await u.attach(sent)
        assert sent.take() == [final]
        u.detach()
        await u.attach(sent)
        assert sent.take() == [final]  # still not acked
        u.on_ack(protocol.DeploymentAck(deployment_id="d1", seq=2))  # an older report's ack
        u.on_ack(protocol.DeploymentAck(deployment_id="other", seq=3))
        await u.attach(sent)
        assert sent.take() == [final]
        u.on_ack(protocol.DeploymentAck(deployment_id="d1", seq=3))
        await u.attach(sent)
        assert sent.reports == []
        # an in-progress report is re-sent too, until acked
        await u.on_deploy(deploy("d2", "3.0.0"))
        await asyncio.sleep(0.02)
        u.detach()
        await u.attach(sent)
        assert [r.seq for r in sent.take()] == [1, 1]
        u.on_ack(protocol.DeploymentAck(deployment_id="d2", seq=1))
        await u.attach(sent)
        assert sent.reports == []
        await idle(u)

    run(scenario)


def test_a_failing_send_does_not_stop_the_deployment() -> None:
    async def scenario() -> None:
        async def broken(report: R) -> None:
            raise ConnectionError("not connected")

        u = SimUpdater(FAST, random.Random(1))
        await u.attach(broken)
        await u.on_deploy(deploy("d1"))
        await idle(u)
        sent = Sent()
        await u.attach(sent)
        assert sent.reports == succeeded("d1")[2:]

    run(scenario)


def test_a_deploy_sent_again_gets_the_last_report_and_runs_once() -> None:
    async def scenario() -> None:
        sent, fin = Sent(), Finished()
        u = SimUpdater(SimUpdateSettings(duration=(0.1, 0.1)), random.Random(1), on_finished=fin)
        await u.attach(sent)
        await u.on_deploy(deploy("d1"))
        await u.on_deploy(deploy("d1"))  # while it runs: its last report again
        await asyncio.sleep(0.02)
        assert sent.take() == [succeeded("d1")[0]] * 2
        await idle(u)
        sent.take()
        await u.on_deploy(deploy("d1"))  # finished: the final report again, nothing installed again
        await u.on_deploy(deploy("d1"))
        assert sent.take() == [succeeded("d1")[2]] * 2
        assert u.running is None and fin.calls == 1
        # a retry attempt has an id of its own: a new deployment
        await u.on_deploy(deploy("d1.2"))
        await idle(u)
        assert sent.take() == succeeded("d1.2", old="2.0.0")

    run(scenario)


def test_a_finished_duplicate_does_not_displace_the_running_deployments_report() -> None:
    async def scenario() -> None:
        sent = Sent()
        u = SimUpdater(SimUpdateSettings(duration=(0.1, 0.1)), random.Random(1))
        await u.attach(sent)
        await u.on_deploy(deploy("d1"))
        await idle(u)
        await u.on_deploy(deploy("d2", "3.0.0"))
        await asyncio.sleep(0.02)
        await u.on_deploy(deploy("d1"))  # the server asks about d1 again while d2 runs
        assert sent.take()[-1] == succeeded("d1")[2]
        u.detach()
        await u.attach(sent)
        assert sent.take() == [succeeded("d2", "3.0.0", old="2.0.0")[0]]
        await idle(u)

    run(scenario)


def test_only_the_last_outcomes_are_kept() -> None:
    async def scenario() -> None:
        sent = Sent()
        u = SimUpdater(SimUpdateSettings(duration=(0.0, 0.0)), random.Random(1))
        await u.attach(sent)
        for i in range(FINISHED_KEPT + 1):
            await u.on_deploy(deploy(f"d{i}", f"1.{i}.0"))
            await idle(u)
        sent.take()
        await u.on_deploy(deploy(f"d{FINISHED_KEPT}"))  # kept: answered
        await u.on_deploy(deploy("d1"))  # kept: answered
        assert [(r.deployment_id, r.seq) for r in sent.take()] == [(f"d{FINISHED_KEPT}", 3), ("d1", 3)]
        await u.on_deploy(deploy("d0", "9.0.0"))  # forgotten: taken as new
        await idle(u)
        assert [(r.deployment_id, r.seq) for r in sent.take()] == [("d0", 1), ("d0", 2), ("d0", 3)]

    run(scenario)


def test_a_second_deployment_waits_for_the_first() -> None:
    async def scenario() -> None:
        sent, fin = Sent(), Finished()
        u = SimUpdater(SimUpdateSettings(duration=(0.05, 0.05)), random.Random(1), on_finished=fin)
        await u.attach(sent)
        await u.on_deploy(deploy("a", "2.0.0"))
        await u.on_deploy(deploy("b", "7.1", name="os", kind="rootfs"))
        await u.on_deploy(deploy("b", "7.1", name="os", kind="rootfs"))  # queued: nothing to say yet
        assert u.running == "a" and u.queued == ["b"]
        await asyncio.sleep(0.01)
        assert sent.reports == succeeded("a")[:1]
        await idle(u)
        assert sent.reports == [*succeeded("a"), *succeeded("b", "7.1")]
        assert fin.calls == 2
        assert u.inventory() == {"app.demo": "2.0.0", "rootfs.os": "7.1"}

    run(scenario)


def test_failures_are_injected_with_the_seeded_generator() -> None:
    async def scenario(settings: SimUpdateSettings, seed: int, n: int) -> tuple[list[str], SimUpdater, Sent]:
        sent = Sent()
        u = SimUpdater(settings, random.Random(seed))
        u.install("app", "demo", "1.0.0")
        await u.attach(sent)
        for i in range(n):
            await u.on_deploy(deploy(f"d{i}", f"2.{i}.0"))
        await idle(u)
        return [r.status for r in sent.reports if r.seq == 3], u, sent

    always = SimUpdateSettings(duration=(0.0, 0.0), fail_rate=1.0)
    statuses, u, sent = run(lambda: scenario(always, 1, 1))
    assert statuses == ["failed"]
    assert sent.reports[2] == R(deployment_id="d0", seq=3, status="failed", step="failed", reason=FAILURE_REASON,
                                running_version="1.0.0", download="full")
    assert u.inventory() == {"app.demo": "1.0.0"}  # the old version stays

    half = SimUpdateSettings(duration=(0.0, 0.0), fail_rate=0.5)
    first, _, _ = run(lambda: scenario(half, 7, 40))
    again, _, _ = run(lambda: scenario(half, 7, 40))
    other, _, _ = run(lambda: scenario(half, 8, 40))
    assert first == again  # the same seed, the same outcomes
    assert first != other
    assert 5 < first.count("failed") < 35 and first.count("succeeded") + first.count("failed") == 40


def test_close_cancels_the_running_deployment_and_starts_no_other() -> None:
    async def scenario() -> None:
        sent = Sent()
        u = SimUpdater(SimUpdateSettings(duration=(5.0, 5.0)), random.Random(1))
        await u.attach(sent)
        await u.on_deploy(deploy("a"))
        await u.on_deploy(deploy("b", "3.0.0"))
        await asyncio.sleep(0.01)
        await u.close()
        await asyncio.sleep(0.01)
        assert u.running is None and u.queued == []
        assert [r.deployment_id for r in sent.reports] == ["a"]

    run(scenario)


def test_a_sim_fleet_device_takes_a_deployment_after_being_accepted_while_connected(tmp_path: Path) -> None:
    """SimFleet wires each device's updater; a device accepted during its session (no enrollment
    token: pending first) reports on that same session."""

    async def scenario() -> None:
        async with FakeHub(tokens=()) as hub:
            cfg = config_from_dict({"server": hub.url, "proxy": "none", "telemetry": {"enabled": False}})
            fleet = SimFleet(cfg, [], 1, tmp_path / "sim", ["rpi4"], 1, updates=FAST)
            await fleet.start(1000.0)
            try:
                _, conn, _, inv = await hub.next("inventory")
                assert "app.demo" not in inv.software
                await hub.send(conn, protocol.Status(status="accepted"))
                await hub.send(conn, deploy("d1"))
                reports = [(await hub.next("deployment_status"))[3] for _ in range(3)]
                assert reports == succeeded("d1")
                _, _, _, inv = await hub.next("inventory")  # re-sent after the deployment
                assert inv.software["app.demo"] == "2.0.0"
                agent = fleet.agents[0]
                assert agent is not None and isinstance(agent.updates, SimUpdater)
                assert agent.platform.metrics()["app.crashes"] == 0.0  # the platform sees the updater
            finally:
                await fleet.stop()

    run(scenario)


def platform_with(settings: SimUpdateSettings = FAST) -> tuple[SimPlatform, SimUpdater]:
    p = SimPlatform(7, seed=3, boot_delay=(0.0, 0.0), rng=random.Random(5))
    u = SimUpdater(settings, random.Random(1))
    p.software = u
    return p, u


def test_a_bad_release_raises_the_cpu_and_crashes_and_a_good_one_reports_zero_crashes() -> None:
    bare = SimPlatform(7, seed=3, boot_delay=(0.0, 0.0))
    assert "app.crashes" not in bare.metrics()  # a platform without software: the metrics as before
    p, u = platform_with()
    m = p.metrics()
    assert m["app.crashes"] == 0.0  # not updated yet: the baseline
    assert m["cpu.percent"] == pytest.approx(bare.metrics()["cpu.percent"], abs=0.01)
    u.install("app", "demo", "1.2.0")
    assert p.metrics()["app.crashes"] == 0.0
    u.install("app", "demo", "1.3.0-bad")
    assert u.regression() == 30.0
    for _ in range(20):
        m, base = p.metrics(), bare.metrics()["cpu.percent"]
        assert m["app.crashes"] in (1.0, 2.0, 3.0)
        assert m["cpu.percent"] == pytest.approx(min(100.0, base + 30.0), abs=0.01)
    assert {p.metrics()["app.crashes"] for _ in range(50)} == {1.0, 2.0, 3.0}
    u.install("app", "demo", "1.3.1")  # fixed
    assert p.metrics()["app.crashes"] == 0.0 and u.regression() is None
    u.install("rootfs", "os", "7.1-bad")  # any software's version counts
    assert p.metrics()["app.crashes"] >= 1.0


def test_the_regression_is_configurable_and_capped_at_100() -> None:
    p, u = platform_with(SimUpdateSettings(duration=(0.0, 0.0), bad_marker="rc", bad_cpu_delta=100.0))
    u.install("app", "demo", "2.0.0-bad")  # not this fleet's marker
    assert p.metrics()["app.crashes"] == 0.0
    u.install("app", "demo", "2.0.0-rc1")
    assert p.metrics()["cpu.percent"] == 100.0
    p, u = platform_with(SimUpdateSettings(bad_marker=""))  # no bad releases at all
    u.install("app", "demo", "2.0.0-bad")
    assert p.metrics()["app.crashes"] == 0.0


def test_a_bad_release_deployed_shows_in_the_metrics() -> None:
    async def scenario() -> None:
        p, u = platform_with()
        await u.attach(Sent())
        await u.on_deploy(deploy("d1", "1.3.0-bad"))
        assert p.metrics()["app.crashes"] == 0.0  # not before it is installed
        await idle(u)
        assert p.metrics()["app.crashes"] >= 1.0

    run(scenario)


def test_settings_and_the_time_range_are_checked() -> None:
    assert parse_time_range("1-3") == (1.0, 3.0)
    assert parse_time_range(" 0.5-0.5 ") == (0.5, 0.5)
    assert parse_time_range("2") == (2.0, 2.0)
    for bad in ("3-1", "x", "-1", "1-", "1-x", "inf", "nan"):
        with pytest.raises(InvalidInput, match="--update-time"):
            parse_time_range(bad)
    for kw in ({"duration": (2.0, 1.0)}, {"duration": (-1.0, 1.0)}, {"fail_rate": 1.5}, {"bad_cpu_delta": -1.0}):
        with pytest.raises(InvalidInput):
            SimUpdateSettings(**kw)
