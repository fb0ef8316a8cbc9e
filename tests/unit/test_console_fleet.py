"""The fleet pages' pure parts (corral.server.console_fleet): the dashboard's figures from the
API's data, the group forms' reading, the audit log's detail and verification texts, and the
state shared by every open dashboard."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import pytest

from corral.errors import InvalidInput
from corral.selectors import DeviceView, evaluate, parse
from corral.server.api.audit import VerifyOut
from corral.server.api.monitoring import FiringOut, OverviewOut
from corral.server.console_fleet import (
    SharedState,
    dashboard_state,
    detail_text,
    device_ids,
    distribution,
    group_form,
    iso_text,
    rollout_progress,
    software_distributions,
    verify_message,
)


def link_selector(href: str) -> str:
    parts = urlsplit(href)
    assert parts.path == "/devices"
    return parse_qs(parts.query)["selector"][0]


def test_versions_are_ranked_with_their_share_and_the_tail_summed() -> None:
    rows = distribution({"1.0": 2, "2.0": 5, "0.9": 2, "3.0": 1}, "agent_version", shown=3)
    assert [(r["version"], r["count"], r["percent"]) for r in rows] == [
        ("2.0", 5, 50), ("0.9", 2, 20), ("1.0", 2, 20), ("1 other version", 1, 10)]
    assert rows[-1]["href"] == ""  # the summed tail links nowhere
    assert distribution({}, "agent_version") == []
    assert distribution({"1.0": 0}, "agent_version") == []


def test_a_versions_link_lists_exactly_the_accepted_devices_that_report_it() -> None:
    odd = 'v"1\\2 <b>'  # quotes, a backslash and markup survive the round trip through the link
    rows = distribution({odd: 1, "unknown": 2}, "os_version")
    by_version = {r["version"]: r for r in rows}
    assert by_version["unknown"]["href"] == ""  # devices that report nothing: no selector for them
    node = parse(link_selector(by_version[odd]["href"]))
    assert evaluate(node, DeviceView("a", "accepted", True, attrs={"os_version": odd}))
    assert not evaluate(node, DeviceView("b", "pending", True, attrs={"os_version": odd}))
    assert not evaluate(node, DeviceView("c", "accepted", True, attrs={"os_version": "v1"}))


def test_the_software_the_fleet_runs_by_component() -> None:
    counts = {"corral-agent": {"0.1": 9}, "app.b": {"1": 1, "2": 2}, "app.a": {"1": 3}, "rootfs": {"r1": 1},
              "app.none": {}}
    rows = software_distributions(counts, shown=2)
    assert [r["component"] for r in rows] == ["app.a", "app.b"]  # most devices first; the agent has its own table
    assert [(v["version"], v["count"], v["href"]) for v in rows[1]["versions"]] == [("2", 2, ""), ("1", 1, "")]
    assert software_distributions({}) == []


def test_a_rollouts_progress_counts_devices_whose_part_is_over() -> None:
    waves = [{"wave": 1, "size": 2, "states": {"succeeded": 1, "failed": 1}},
             {"wave": 2, "size": 4, "states": {"active": 2, "succeeded": 1, "skipped": 1}},
             {"wave": 3, "size": 4, "states": {"pending": 4}}]
    p = rollout_progress("r1", "app@1.0", "running", 1, waves)
    assert p == {"id": "r1", "artifact": "app@1.0", "status": "running", "wave": 2, "waves": 3, "done": 4,
                 "total": 10, "failed": 1, "succeeded": 2, "percent": 40}
    # before its devices are placed: the waves' sizes; past the last wave: the last wave
    empty = [{"wave": 1, "size": 3, "states": {}}]
    assert rollout_progress("r2", "", "paused", 5, empty) == {
        "id": "r2", "artifact": "", "status": "paused", "wave": 1, "waves": 1, "done": 0, "total": 3, "failed": 0,
        "succeeded": 0, "percent": 0}
    assert rollout_progress("r3", "", "running", 0, [])["percent"] == 0
    reverted = [{"wave": 1, "size": 3, "states": {"reverted": 2, "revert_failed": 1}}]
    assert rollout_progress("r4", "", "running", 0, reverted)["percent"] == 100
    assert rollout_progress("r4", "", "running", 0, reverted)["failed"] == 1


def test_the_dashboards_state_from_the_overview() -> None:
    firing = [FiringOut(alert=f"a{i}", key=f"dev{i}", severity="critical", since=None, value=1.0) for i in range(7)]
    ov = OverviewOut(devices={"accepted": 5, "pending": 2}, online=3, offline=2, agent_versions={"1.0": 5},
                     os_versions={"12": 4, "unknown": 1}, firing_alerts=firing, telemetry_points_last_minute=42,
                     generated_at="2026-01-01T00:00:00.000Z")
    state = dashboard_state(ov, 120, [{"id": "r"}])
    assert (state["online"], state["offline"], state["pending"], state["accepted"]) == (3, 2, 2, 5)
    assert state["firing"] == 120 and len(state["alerts"]) == 5  # the count is exact; the list is short
    assert state["alerts"][0] == {"alert": "a0", "key": "dev0", "severity": "critical", "since": "", "since_text": ""}
    assert [r["version"] for r in state["os_versions"]] == ["12", "unknown"]
    assert state["points_per_minute"] == 42 and state["rollouts"] == [{"id": "r"}]
    assert "generated_at" not in str(state)  # nothing that changes by itself: the stream sends changes only
    later = ov.model_copy(update={"generated_at": "2026-01-01T00:00:05.000Z"})
    assert dashboard_state(later, 120, [{"id": "r"}]) == state


def test_times_for_people() -> None:
    assert iso_text("2026-11-30T20:13:42.637Z") == "2026-11-30 20:13:42 UTC"
    assert iso_text(None) == iso_text("") == ""


def test_the_new_group_form() -> None:
    assert group_form({"name": " berlin ", "kind": "static", "selector": "ignored"}) == ("berlin", None, "")
    assert group_form({"name": "b", "kind": "dynamic", "selector": ' tag.site == "berlin" ', "description": "d"}) == (
        "b", 'tag.site == "berlin"', "d")
    with pytest.raises(InvalidInput, match="needs a selector"):
        group_form({"name": "b", "kind": "dynamic", "selector": "  "})
    with pytest.raises(InvalidInput, match="description"):
        group_form({"name": "b", "description": "x" * 1001})


def test_device_ids_typed_into_a_form() -> None:
    assert device_ids(" a, b\nc  a,,") == ["a", "b", "c"]
    with pytest.raises(InvalidInput, match="enter the ids"):
        device_ids(" ,\n ")


def test_audit_details_and_the_verification_text() -> None:
    assert detail_text({"b": 1, "a": "<script>"}) == '{"a": "<script>", "b": 1}'  # escaped by the template
    long = detail_text({"x": "y" * 50}, limit=20)
    assert len(long) == 20 and long.endswith("…")
    assert verify_message(VerifyOut(ok=True, entries=1, problem="", seq=None)) == \
        "The hash chain is intact: 1 entry verified."
    assert verify_message(VerifyOut(ok=False, entries=3, problem="entry 4 was altered", seq=4)) == \
        "The hash chain is broken after 3 good entries: entry 4 was altered."


def test_every_open_dashboard_shares_one_read_per_interval() -> None:
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)
        return reads

    async def go() -> None:
        shared = SharedState(ttl=0.2)
        assert await asyncio.gather(*(shared.get(read) for _ in range(20))) == [1] * 20
        await asyncio.sleep(0.25)
        assert await shared.get(read) == 2

    asyncio.run(go())
    assert reads == 2
