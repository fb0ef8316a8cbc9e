"""The telemetry pump (window, acks, resend after reconnect) and the agent's rule host (accept,
refuse, persist, evaluate) over the simulated platform and an in-memory spool."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from corral import protocol as p
from corral.agent.config import RulesConfig
from corral.agent.platform.sim import SimPlatform
from corral.agent.rules import AgentRules
from corral.agent.telemetry.pump import TelemetryPump, next_collection
from corral.agent.telemetry.spool import MemorySpool, SpoolLimits


class Source:
    def __init__(self) -> None:
        self.n = 0

    def metrics(self) -> dict[str, float]:
        self.n += 1
        return {"x.n": float(self.n)}


def make_pump(window: int = 2) -> tuple[TelemetryPump, MemorySpool, list[p.Telemetry]]:
    spool = MemorySpool(SpoolLimits(max_batches=100))
    pump = TelemetryPump(Source(), spool, send_window=window, blocking_spool=False)
    return pump, spool, []


def test_window_acks_and_resend_after_reconnect() -> None:
    async def go() -> None:
        pump, spool, sent = make_pump(window=2)

        async def send(b: p.Telemetry) -> None:
            sent.append(b)

        for _ in range(5):  # offline: spooled, nothing sent
            await pump.collect_once()
        assert spool.count == 5 and not sent
        await pump.attach(send)
        assert [b.series[0].values for b in sent] == [[1.0], [2.0]]  # the window, oldest first
        await pump.on_ack(p.TelemetryAck(seq=sent[0].seq))
        assert len(sent) == 3 and spool.count == 4
        await pump.on_ack(p.TelemetryAck(seq=999))  # unknown: ignored
        assert spool.count == 4
        # the connection drops with two in flight: after reconnect they are sent again
        pump.detach()
        sent.clear()
        await pump.attach(send)
        assert [b.series[0].values for b in sent] == [[2.0], [3.0]]
        acked: set[int] = set()
        for _ in range(10):  # ack whatever is in flight until the spool is empty
            for b in [b for b in sent if b.seq not in acked]:
                acked.add(b.seq)
                await pump.on_ack(p.TelemetryAck(seq=b.seq, duplicate=True))
        assert spool.count == 0 and len(acked) == 4  # the first was acked above

    asyncio.run(go())


def test_a_failing_send_detaches_and_keeps_the_batch() -> None:
    async def go() -> None:
        pump, spool, _ = make_pump()

        async def broken(b: p.Telemetry) -> None:
            raise ConnectionError("gone")

        await pump.collect_once()
        await pump.attach(broken)
        assert spool.count == 1
        await pump.collect_once()  # detached: spooled only
        assert spool.count == 2

    asyncio.run(go())


def spec(**kw: object) -> p.RuleSpec:
    base: dict[str, object] = {"id": "r1", "name": "r1", "kind": "threshold", "expr": "x.n > 2"}
    return msgspec.convert(base | kw, p.RuleSpec)


def test_rules_accept_refuse_persist_and_evaluate(tmp_path: Path) -> None:
    plat = SimPlatform(0)
    host = AgentRules(plat, RulesConfig(), tmp_path, "t")
    rogue = plat.spawn("/opt/rogue/miner", "miner")
    good = plat.spawn("/usr/bin/app", "app")
    rules = p.Rules(version="v1", rules=[
        spec(),
        spec(id="a1", name="apps", kind="allowlist", expr="", mode="enforce", allow=["/usr/*", "/opt/app/*"],
             scope=["/opt/*", "/usr/*"]),
        # would kill init (and the agent): refused, and nothing of it applies
        spec(id="a2", name="bad", kind="allowlist", expr="", mode="enforce", allow=["/usr/*"]),
        spec(id="t2", name="broken", expr="x.n >"),
    ])
    ack = asyncio.run(host.apply(rules))
    assert set(ack.refused) == {"a2", "t2"} and "enforce would kill" in ack.refused["a2"]
    events = host.evaluate({"x.n": 1.0}, 1000)
    kills = [e for e in events if e.source == "allowlist"]
    assert [(e.attrs["pid"], e.attrs["outcome"]) for e in kills] == [(rogue, "killed")]
    assert good in {pr.pid for pr in plat.processes()} and rogue not in {pr.pid for pr in plat.processes()}
    fired = host.evaluate({"x.n": 5.0}, 2000)
    assert [e.attrs["state"] for e in fired if e.source == "rule"] == ["firing"]
    # persisted: a new host (a restarted agent) has the same rules before any server contact
    again = AgentRules(plat, RulesConfig(), tmp_path, "t")
    again.load()
    assert again.version == "v1" and len(again.thresholds) == 1 and set(again.refused) == {"a2", "t2"}


def test_enforce_can_be_disabled_in_the_agent_config() -> None:
    plat = SimPlatform(0)
    host = AgentRules(plat, RulesConfig(enforce=False))
    ack = asyncio.run(host.apply(p.Rules(version="v", rules=[
        spec(id="a", name="a", kind="allowlist", expr="", mode="enforce", allow=["/*"])])))
    assert "disabled" in ack.refused["a"]
    off = AgentRules(plat, RulesConfig(enabled=False))
    assert set(asyncio.run(off.apply(p.Rules(version="v", rules=[spec()]))).refused) == {"r1"}


def test_collections_never_share_a_timestamp_even_if_the_clock_does() -> None:
    """Timers fire early and clocks step back: every batch still gets its own, later millisecond."""

    async def go() -> None:
        stamps = iter([100.0, 100.0, 99.5, 100.0004])
        spool = MemorySpool()
        pump = TelemetryPump(Source(), spool, blocking_spool=False, clock=lambda: next(stamps))
        for _ in range(4):
            await pump.collect_once()
        ts = [msgspec.msgpack.decode(b)[0][0][1][0] for _, b in spool.pending(0, 10)]
        assert ts == [100000, 100001, 100002, 100003]

    asyncio.run(go())


def test_each_grid_slot_is_collected_once_when_timers_fire_early() -> None:
    # the timer for slot 11 fired at 10.999: the next collection is slot 12, a second away
    assert next_collection(10.9995, 1.0, 11) == (12, pytest.approx(1.0005))
    assert next_collection(10.2, 1.0, -1) == (11, pytest.approx(0.8))
    # a stall past several slots: the next slot after now, no burst of catch-up collections
    assert next_collection(15.5, 1.0, 11) == (16, pytest.approx(0.5))


LAZY_ENGINE = """
import asyncio, sys
from pathlib import Path
from corral import protocol as p
from corral.agent.config import RulesConfig
from corral.agent.main import run_agent
from corral.agent.platform.sim import SimPlatform
from corral.agent.rules import AgentRules

def loaded():
    return {m for m in ("corral.core.expr", "corral.core.rules", "corral.agent.rule_engine") if m in sys.modules}

state = Path(sys.argv[1])
host = AgentRules(SimPlatform(0), RulesConfig(), state, "t")
host.load()
ack = asyncio.run(host.apply(p.Rules(version="empty", rules=[])))
assert ack.version == "empty" and ack.refused == {} and host.evaluate({"x.n": 1.0}, 1) == []
print(sorted(loaded()))
again = AgentRules(SimPlatform(0), RulesConfig(), state, "t")
again.load()
assert again.version == "empty"
print(sorted(loaded()))
rule = p.RuleSpec(id="r1", name="r1", kind="threshold", expr="x.n > 2")
asyncio.run(host.apply(p.Rules(version="one", rules=[rule])))
print(sorted(loaded()))
"""


def test_the_rules_engine_is_imported_only_for_a_non_empty_rule_set(tmp_path: Path) -> None:
    """The expression language costs every device memory (ADR 0007): an agent with no rules (an
    empty set pushed, or stored from the last session) never imports it."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", LAZY_ENGINE, str(tmp_path)], cwd=root, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    engine = str(sorted(["corral.agent.rule_engine", "corral.core.expr", "corral.core.rules"]))
    assert out == ["[]", "[]", engine]
    # and the stored non-empty set brings it back at the next start
    again = AgentRules(SimPlatform(0), RulesConfig(), tmp_path, "t")
    again.load()
    assert again.version == "one" and len(again.thresholds) == 1


def test_an_emptied_rule_set_stops_the_rules() -> None:
    plat = SimPlatform(0)
    host = AgentRules(plat, RulesConfig())
    asyncio.run(host.apply(p.Rules(version="v1", rules=[spec(expr="x.n > 0")])))
    assert [e.attrs["state"] for e in host.evaluate({"x.n": 5.0}, 1000)] == ["firing"]
    ack = asyncio.run(host.apply(p.Rules(version="v2", rules=[])))
    assert ack.refused == {} and host.version == "v2" and host.thresholds == []
    assert host.evaluate({"x.n": 5.0}, 2000) == []
