"""The console's rollout, alert and webhook forms read into the API's bodies, and the rollout
page's bars and gate states (corral.server.console_updates_forms): pure, table-driven."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from corral.errors import InvalidInput
from corral.server.api.alerts import AlertIn
from corral.server.api.rollouts import RolloutIn
from corral.server.console_updates_forms import (
    ROLLOUT_FIELDS,
    GateState,
    Segment,
    alert_badge,
    alert_body,
    counts_text,
    done_count,
    health_gate_state,
    install_gate_state,
    instance_row,
    moment,
    normalize_waves,
    rollout_body,
    segments,
    validation_errors,
    wave_preview,
    webhook_events,
)


@pytest.mark.parametrize(("typed", "sent"), [
    ("1%,10%,50%,100%", "1%,10%,50%,100%"),
    ("1% 10% 50% 100%", "1%,10%,50%,100%"),
    (" 5, 50 ,all ", "5,50,all"),
    ("5;all", "5,all"),
    ("1%,,all", "1%,all"),
    ("", ""),
    ("   ", ""),
])
def test_the_waves_field_takes_commas_or_spaces(typed: str, sent: str) -> None:
    assert normalize_waves(typed) == sent


@pytest.mark.parametrize(("waves", "devices", "sizes"), [
    ("1%,10%,50%,100%", 200, [2, 18, 80, 100]),
    ("1%,10%,50%,100%", 6, [1, 0, 2, 3]),  # percentages round up: the first wave is never empty
    ("1, 50% all", 6, [1, 2, 3]),
    ("5,50,all", 20, [5, 15, 0]),
    ("all", 7, [7]),
])
def test_the_wave_preview_is_each_waves_own_devices(waves: str, devices: int, sizes: list[int]) -> None:
    assert wave_preview(waves, devices) == sizes


@pytest.mark.parametrize("waves", ["", "10%,50%", "50%,10%,all", "0%,all", "x,all"])
def test_a_wave_preview_of_bad_waves_is_the_apis_refusal(waves: str) -> None:
    with pytest.raises(InvalidInput):
        wave_preview(waves, 10)


BASE = {"artifact": "app@1.0", "selector": 'tag.ring == "prod"', "waves": "1% 100%", "install_gate": "on",
        "max_failure_rate": "20", "min_sample": "5", "on_failure": "pause"}


def test_a_good_form_is_the_apis_body_with_its_defaults() -> None:
    body, errors = rollout_body({**BASE, "health_metric": "app.crashes", "health_tolerance": "10%",
                                 "health_absolute": "0.5", "health_window": "2m", "health_min_devices": "",
                                 "auto_revert": "on", "max_concurrent": "4", "wave_wait": "1m30s"})
    assert errors == {}
    assert body == {
        "artifact": "app@1.0", "selector": 'tag.ring == "prod"', "waves": "1%,100%", "canary": None,
        "install_gate": {"max_failure_rate": 0.2, "min_sample": 5, "action": "pause"},
        "health_gate": {"metric": "app.crashes", "window": 120.0, "tolerance": 0.1, "absolute": 0.5,
                        "higher_is_worse": True, "min_devices": 3, "auto_revert": True},
        "pacing": {"max_concurrent": 4, "max_per_minute": None, "wave_wait": 90.0}}
    RolloutIn.model_validate(body)  # the API's model takes it as it is


def test_unchecked_gates_and_blank_pacing() -> None:
    body, errors = rollout_body({**BASE, "install_gate": "", "health_metric": "  ", "lower_is_worse": "on"})
    assert errors == {} and body["install_gate"] is None and "health_gate" not in body
    assert body["pacing"] == {"max_concurrent": None, "max_per_minute": None, "wave_wait": 0.0}


@pytest.mark.parametrize(("changes", "field", "message"), [
    ({"waves": ""}, "waves", "waves must be a comma-separated list"),
    ({"waves": "10%,50%"}, "waves", "the last wave must be 100% or all"),
    ({"selector": "tag.ring == "}, "selector", "column"),
    ({"selector": ""}, "selector", "a selector is required"),
    ({"artifact": ""}, "artifact", "choose an artifact"),
    ({"canary": "tag.x =="}, "canary", "column"),
    ({"min_sample": "five"}, "min_sample", "'five' is not a whole number"),
    ({"min_sample": "-1"}, "min_sample", "is not a whole number"),
    ({"max_failure_rate": "lots"}, "max_failure_rate", "'lots' is not a number"),
    ({"max_failure_rate": "nan"}, "max_failure_rate", "is not a number"),
    ({"health_metric": "m", "health_window": "soon"}, "health_window", "not a duration"),
    ({"wave_wait": "-5s"}, "wave_wait", "not a duration"),
    ({"max_concurrent": "1.5"}, "max_concurrent", "is not a whole number"),
])
def test_each_bad_field_is_named_with_the_parsers_reason(changes: dict[str, str], field: str, message: str) -> None:
    _, errors = rollout_body({**BASE, **changes})
    assert list(errors) == [field] and message in errors[field], errors


def test_the_apis_model_errors_land_on_the_form_fields() -> None:
    body, errors = rollout_body({**BASE, "max_failure_rate": "150", "max_concurrent": "0"})
    assert errors == {}
    with pytest.raises(ValidationError) as e:
        RolloutIn.model_validate(body)
    assert validation_errors(e.value, ROLLOUT_FIELDS) == {
        "max_failure_rate": "Input should be less than 1",
        "max_concurrent": "Input should be greater than or equal to 1"}


def test_an_alert_form_leaves_out_what_its_kind_does_not_use() -> None:
    form = {"name": " hot ", "kind": "threshold", "selector": "", "expr": "avg(cpu.percent) > 80 for 5m",
            "by": "", "for": "", "window": "2m", "severity": "critical", "min_severity": "error", "count": "3",
            "source": "", "enabled": "on"}
    body = alert_body(form)
    assert body == {"name": "hot", "kind": "threshold", "selector": "", "severity": "critical", "enabled": True,
                    "expr": "avg(cpu.percent) > 80 for 5m", "window": "2m"}
    AlertIn.model_validate(body)
    rate = alert_body({**form, "kind": "event_rate", "expr": "", "source": "app", "enabled": ""})
    assert rate["min_severity"] == "error" and rate["count"] == "3" and rate["source"] == "app"
    assert rate["enabled"] is False and "expr" not in rate
    assert AlertIn.model_validate(rate).count == 3
    offline = alert_body({**form, "kind": "offline", "expr": "", "for": "10m"})
    assert offline["for"] == "10m" and AlertIn.model_validate(offline).for_ == "10m"


def test_pydantic_errors_of_an_alert_name_their_field() -> None:
    with pytest.raises(ValidationError) as e:
        AlertIn.model_validate(alert_body({"name": "<script>", "kind": "nope"}))
    errors = validation_errors(e.value)
    assert set(errors) == {"name", "kind"} and "pattern" in errors["name"]


@pytest.mark.parametrize(("text", "events"), [
    ("alert.*", ["alert.*"]),
    ("alert.* rollout.*", ["alert.*", "rollout.*"]),
    (" alert.firing,  rollout.* ,", ["alert.firing", "rollout.*"]),
    ("", []),
])
def test_webhook_events_are_split_on_commas_and_spaces(text: str, events: list[str]) -> None:
    assert webhook_events(text) == events


def test_a_waves_bar_stacks_its_states_in_order() -> None:
    states = {"pending": 2, "succeeded": 5, "failed": 1, "active": 2}
    assert segments(states, 10) == [Segment("succeeded", 0, 50.0, 5), Segment("failed", 50.0, 10.0, 1),
                                    Segment("active", 60.0, 20.0, 2), Segment("pending", 80.0, 20.0, 2)]
    assert counts_text(states) == "5 succeeded, 1 failed, 2 active, 2 pending"
    assert done_count(states) == 6
    assert segments({}, 0) == [] and counts_text({}) == "no devices"
    # more devices than the wave's size (devices that joined later): the bar still ends at 100
    joined = segments({"succeeded": 3, "revert_failed": 1, "odd": 1}, 4)
    assert [s.state for s in joined] == ["succeeded", "revert_failed", "odd"]
    assert joined[-1].x + joined[-1].width == pytest.approx(100)
    assert counts_text({"revert_failed": 1}) == "1 revert failed"


GATE: dict[str, Any] = {"max_failure_rate": 0.2, "min_sample": 5, "action": "pause"}


def test_the_install_gate_state() -> None:
    assert install_gate_state(None, {"failed": 3}, None, "") == GateState("off", "off")
    state = install_gate_state(GATE, {"succeeded": 4, "failed": 1, "active": 2}, None, "")
    assert state.level == "ok" and state.text.startswith("1 of 5 finished failed in this wave")
    assert "pauses above 20% failed, once 5 finished" in state.text
    # after a resume, the failures it accepted no longer count
    assert install_gate_state(GATE, {"succeeded": 4, "failed": 3}, [5, 2], "").text.startswith("1 of 2 finished")
    tripped = install_gate_state(GATE, {"failed": 3}, None,
                                 "install gate: 3 of 3 finished devices in wave 1 failed (100% > 20%)")
    assert tripped.level == "warn" and tripped.text.startswith("tripped: 3 of 3 finished devices in wave 1")


def test_the_health_gate_state() -> None:
    gate = {"metric": "app.crashes", "window": 60.0, "tolerance": 0.2, "absolute": 0.5, "higher_is_worse": True}
    assert health_gate_state(None, 1.0, "").level == "off"
    assert "no baseline yet" in health_gate_state(gate, None, "").text
    watching = health_gate_state(gate, 0.25, "paused by an operator")
    assert watching.level == "ok" and watching.text == (
        "watching app.crashes: higher is worse, tolerance 20% + 0.5, over 60s; baseline median 0.25")
    tripped = health_gate_state({**gate, "higher_is_worse": False}, 1.0, "health gate: app.crashes on 3 updated ...")
    assert tripped.level == "warn" and tripped.text == "tripped: app.crashes on 3 updated ..."


def test_an_alert_instance_as_the_cells_of_its_row() -> None:
    device = instance_row("d1", "firing", 95.123456, "2026-11-30T20:14:48.123Z", "2026-11-30T20:14:50.000Z", None,
                          is_device=True)
    assert device == [{"text": "d1", "href": "/devices/d1"}, {"text": "firing", "badge": "firing"},
                      {"text": "95.12"}, {"text": "2026-11-30 20:14:48 UTC", "class": "wide-only"},
                      {"text": "2026-11-30 20:14:50 UTC"}, {"text": "", "class": "wide-only"}]
    scope = instance_row("", "pending", None, None, None, None, is_device=False)
    assert scope[0] == {"text": "the whole scope", "class": "muted"} and scope[1]["badge"] == "warn"
    assert scope[2]["text"] == ""
    site = instance_row("<script>", "inactive", 0.0, None, None, None, is_device=False)
    assert site[0] == {"text": "<script>"} and site[1] == {"text": "inactive", "badge": ""}  # text, not markup
    assert site[2]["text"] == "0"
    assert moment(None) == "" and moment("2026-01-02T03:04:05.678Z") == "2026-01-02 03:04:05 UTC"


def test_an_alerts_state_badge() -> None:
    assert alert_badge(False, 3) == ("off", "disabled")
    assert alert_badge(True, 0) == ("ok", "ok")
    assert alert_badge(True, 2) == ("firing", "2 firing")
