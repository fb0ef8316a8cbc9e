"""The server's per-device deployment bookkeeping: stale reports ignored, AWS IoT Jobs'
changes of status only, and the deployment's summary."""

from __future__ import annotations

import pytest

from corral.errors import InvalidInput
from corral.server.updates.deployments import (
    accept_report,
    parse_wire_id,
    running_version,
    split_ref,
    summarise,
    wire_id,
)


def test_a_report_is_kept_only_when_its_seq_is_newer() -> None:
    assert accept_report("queued", 0, "in-progress", 1)
    assert accept_report("in-progress", 3, "in-progress", 4)
    assert not accept_report("in-progress", 4, "in-progress", 4)  # the same report again
    assert not accept_report("in-progress", 5, "in-progress", 4)  # a late one
    assert not accept_report("in-progress", 5, "succeeded", 5)


@pytest.mark.parametrize(("current", "new", "ok"), [
    ("queued", "in-progress", True),
    ("queued", "failed", True),
    ("queued", "succeeded", True),  # the in-progress reports before it were superseded
    ("queued", "rolled-back", True),
    ("queued", "queued", False),
    ("in-progress", "succeeded", True),
    ("in-progress", "rolled-back", True),
    ("in-progress", "queued", False),
    ("succeeded", "failed", False),  # a final status never changes
    ("failed", "in-progress", False),
    ("rolled-back", "succeeded", False),
    ("in-progress", "done", False),  # not a status
])
def test_only_aws_transitions_are_kept(current: str, new: str, ok: bool) -> None:
    assert accept_report(current, 1, new, 2) is ok


def test_summary() -> None:
    assert summarise([]) == "queued"
    assert summarise(["queued", "queued"]) == "queued"
    assert summarise(["queued", "in-progress"]) == "in-progress"
    assert summarise(["succeeded", "queued"]) == "in-progress"
    assert summarise(["succeeded", "succeeded"]) == "succeeded"
    assert summarise(["succeeded", "rolled-back"]) == "failed"
    assert summarise(["failed"]) == "failed"


def test_artifact_reference() -> None:
    assert split_ref("demo@1.0.0") == ("demo", "1.0.0")
    for bad in ("demo", "@1", "demo@"):
        with pytest.raises(InvalidInput):
            split_ref(bad)


@pytest.mark.parametrize(("inventory", "expected"), [
    ({"software": {"app.demo": "1.2.0", "app.other": "9"}}, "1.2.0"),
    ({"software": {"rootfs.demo": "1.2.0"}}, ""),  # another kind's
    ({"software": {"app.demo": 3}}, ""),  # not a version string
    ({"software": "app.demo=1"}, ""),
    ({}, ""),
    (None, ""),
])
def test_the_running_version_is_the_inventory_entry_of_the_kind_and_name(
        inventory: dict[str, object] | None, expected: str) -> None:
    assert running_version(inventory, "app", "demo") == expected


@pytest.mark.parametrize(("dep_id", "attempt", "wire"), [
    ("0123456789abcdef", 1, "0123456789abcdef"),
    ("0123456789abcdef", 2, "0123456789abcdef.2"),
    ("0123456789abcdef", 11, "0123456789abcdef.11"),
])
def test_a_retry_is_a_new_deployment_id_to_the_device(dep_id: str, attempt: int, wire: str) -> None:
    assert wire_id(dep_id, attempt) == wire
    assert parse_wire_id(wire) == (dep_id, attempt)


@pytest.mark.parametrize("wire", ["abc.1", "abc.0", "abc.x", "abc.", "abc.-2"])
def test_ids_that_are_not_a_retry_are_the_deployment_id_itself(wire: str) -> None:
    assert parse_wire_id(wire) == (wire, 1)
