"""The pure part of the console's rollout, alert and webhook pages: their forms read into the
REST API's request bodies, pydantic's complaints put next to the field they are about, and the
rollout page's progress (bars, the gates' state). No I/O: ``corral.server.console_updates``
renders and acts; these are tested in tests/unit/test_console_updates_forms.py.

Every check here is the API's own parser (:func:`corral.core.rollout_spec.parse_waves`, the
selector parser, :func:`corral.core.durations.parse_duration`), run per field so that its reason
can be shown beside the field it is about; the API's models then judge the whole request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from corral.core.durations import parse_duration
from corral.core.rollout_plan import DONE
from corral.core.rollout_spec import parse_waves, wave_sizes
from corral.errors import InvalidInput
from corral.selectors import parse as parse_selector

#: a wave's devices by state, in the order the bars draw them (the finished ones first)
STATE_ORDER = ("succeeded", "failed", "revert_failed", "reverted", "reverting", "skipped", "active", "retry",
               "scheduled", "pending")

Errors = dict[str, str]


def normalize_waves(text: str) -> str:
    """The waves field as the API takes it: commas, spaces or both between the waves
    (``1% 10% 50% 100%``, ``5, 50, all``) become ``1%,10%,50%,100%``; an empty field stays empty
    (and is refused by the API's parser with its reason)."""
    return ",".join(p for p in re.split(r"[\s,;]+", text.strip()) if p)


def wave_preview(waves: str, devices: int) -> list[int]:
    """How many devices each wave holds (not cumulative) for ``devices`` devices; raises
    InvalidInput for waves the API would refuse."""
    sizes = wave_sizes(parse_waves(normalize_waves(waves)), devices)
    return [b - a for a, b in zip((0, *sizes), sizes, strict=False)]


def _check(errors: Errors, field: str, check: Callable[[], Any]) -> Any:
    try:
        return check()
    except InvalidInput as e:
        errors[field] = e.detail
        return None


def _int(form: Mapping[str, str], field: str, errors: Errors, default: int | None = None) -> int | None:
    text = form.get(field, "").strip()
    if not text:
        return default
    if not re.fullmatch(r"\d{1,9}", text):
        errors[field] = f"{text!r} is not a whole number"
        return None
    return int(text)


def _float(form: Mapping[str, str], field: str, errors: Errors, default: float) -> float | None:
    text = form.get(field, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        errors[field] = f"{text!r} is not a number"
        return None
    if value != value or value in (float("inf"), float("-inf")):
        errors[field] = f"{text!r} is not a number"
        return None
    return value


def _percent(form: Mapping[str, str], field: str, errors: Errors, default: float) -> float | None:
    """A share typed as a percentage (``20`` or ``20%``) as the API's fraction (0.2)."""
    text = form.get(field, "").strip().removesuffix("%").strip()
    value = _float({field: text}, field, errors, default * 100)
    return None if value is None else round(value / 100, 6)


def _duration(form: Mapping[str, str], field: str, errors: Errors, default: float | None) -> float | None:
    text = form.get(field, "").strip()
    if not text:
        return default
    return _check(errors, field, lambda: parse_duration(text))  # type: ignore[no-any-return]


def _checked(form: Mapping[str, str], field: str) -> bool:
    return form.get(field, "") in ("on", "true", "1", "yes")


def rollout_body(form: Mapping[str, str]) -> tuple[dict[str, Any], Errors]:
    """The rollout form as ``POST /api/v1/rollouts``'s body (:class:`RolloutIn`'s fields), and
    what is wrong with it, by field. Blank optional fields take the API's defaults."""
    errors: Errors = {}
    artifact = form.get("artifact", "").strip()
    if not artifact:
        errors["artifact"] = "choose an artifact (upload one with corral artifact upload)"
    selector = form.get("selector", "")  # as typed: a parse error's column is the API's
    if not selector.strip():
        errors["selector"] = "a selector is required, e.g. tag.ring == \"canary\""
    else:
        _check(errors, "selector", lambda: parse_selector(selector))
    waves = normalize_waves(form.get("waves", ""))
    _check(errors, "waves", lambda: parse_waves(waves))
    canary = form.get("canary", "") if form.get("canary", "").strip() else None
    if canary is not None:
        _check(errors, "canary", lambda: parse_selector(canary))
    body: dict[str, Any] = {"artifact": artifact, "selector": selector, "waves": waves, "canary": canary}
    if _checked(form, "install_gate"):
        body["install_gate"] = {"max_failure_rate": _percent(form, "max_failure_rate", errors, 0.2),
                                "min_sample": _int(form, "min_sample", errors, 5),
                                "action": form.get("on_failure", "pause")}
    else:
        body["install_gate"] = None
    metric = form.get("health_metric", "").strip()
    if metric:
        body["health_gate"] = {"metric": metric, "window": _duration(form, "health_window", errors, 300.0),
                               "tolerance": _percent(form, "health_tolerance", errors, 0.2),
                               "absolute": _float(form, "health_absolute", errors, 0.0),
                               "higher_is_worse": not _checked(form, "lower_is_worse"),
                               "min_devices": _int(form, "health_min_devices", errors, 3),
                               "auto_revert": _checked(form, "auto_revert")}
    body["pacing"] = {"max_concurrent": _int(form, "max_concurrent", errors),
                      "max_per_minute": _int(form, "max_per_minute", errors),
                      "wave_wait": _duration(form, "wave_wait", errors, 0.0)}
    return body, errors


#: pydantic's location of a value in the API's body → the form field that holds it
ROLLOUT_FIELDS: dict[tuple[str, ...], str] = {
    ("install_gate", "max_failure_rate"): "max_failure_rate",
    ("install_gate", "min_sample"): "min_sample",
    ("install_gate", "action"): "on_failure",
    ("health_gate", "metric"): "health_metric",
    ("health_gate", "window"): "health_window",
    ("health_gate", "tolerance"): "health_tolerance",
    ("health_gate", "absolute"): "health_absolute",
    ("health_gate", "min_devices"): "health_min_devices",
    ("pacing", "max_concurrent"): "max_concurrent",
    ("pacing", "max_per_minute"): "max_per_minute",
    ("pacing", "wave_wait"): "wave_wait",
}


def validation_errors(e: ValidationError, fields: Mapping[tuple[str, ...], str] | None = None) -> Errors:
    """pydantic's complaints about a request body by form field: the field a location maps to
    in ``fields``, else the location's last part (``for`` for an alert's ``for``), with the
    message the API would send (``"Input should be less than 1"``)."""
    out: Errors = {}
    for err in e.errors():
        loc = tuple(str(x) for x in err.get("loc", ()))
        field = (fields or {}).get(loc) or (loc[-1] if loc else "")
        out.setdefault(field, str(err.get("msg", "invalid")))
    return out


def alert_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The alert form as ``POST /api/v1/alerts``'s body: the fields a kind does not use are left
    out when blank (the API refuses ``expr`` on an offline alert, say), so that what the user
    typed is judged by the API itself."""
    body: dict[str, Any] = {"name": form.get("name", "").strip(), "kind": form.get("kind", ""),
                            "selector": form.get("selector", "").strip(),
                            "severity": form.get("severity", "warning"), "enabled": _checked(form, "enabled")}
    for field in ("expr", "by", "for", "window", "source"):
        value = form.get(field, "").strip()
        if value:
            body[field] = value
    if body["kind"] == "event_rate":
        body["min_severity"] = form.get("min_severity", "error")
        if form.get("count", "").strip():
            body["count"] = form.get("count", "").strip()
    return body


def webhook_events(text: str) -> list[str]:
    """The events field: globs separated by commas or spaces (``alert.* rollout.*``)."""
    return [p for p in re.split(r"[\s,]+", text.strip()) if p]


# --- the rollout page's progress -----------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A part of a wave's bar: ``state``'s devices from ``x`` to ``x + width`` (percent)."""

    state: str
    x: float
    width: float
    count: int


def done_count(states: Mapping[str, int]) -> int:
    return sum(n for s, n in states.items() if s in DONE)


def segments(states: Mapping[str, int], size: int) -> list[Segment]:
    """A wave's stacked bar: its devices by state in :data:`STATE_ORDER` (unknown states last),
    as shares of the wave's size (or of its devices, when more joined)."""
    total = max(size, sum(states.values()), 1)
    order = [s for s in STATE_ORDER if states.get(s)] + sorted(s for s in states if s not in STATE_ORDER)
    out, x = [], 0.0
    for s in order:
        width = round(100 * states[s] / total, 3)
        out.append(Segment(s, round(x, 3), width, states[s]))
        x += width
    return out


def counts_text(states: Mapping[str, int]) -> str:
    """``3 succeeded, 1 failed, 2 pending``: a wave's devices by state, in the bar's order."""
    order = [s for s in STATE_ORDER if states.get(s)] + sorted(s for s in states if s not in STATE_ORDER and states[s])
    return ", ".join(f"{states[s]} {s.replace('_', ' ')}" for s in order) or "no devices"


@dataclass(frozen=True)
class GateState:
    """What a gate is doing: ``level`` is ok, warn (it stopped the rollout) or off."""

    level: str
    text: str


def install_gate_state(gate: Mapping[str, Any] | None, wave: Mapping[str, int] | None,
                       acknowledged: Sequence[int] | None, reason: str) -> GateState:
    """The install gate's state in the current wave: off, tripped (the rollout's reason says so),
    or how many of the finished devices failed against its threshold, after the failures a
    resume accepted (``acknowledged``: finished, failed)."""
    if gate is None:
        return GateState("off", "off")
    rate, sample = float(gate.get("max_failure_rate", 0.2)), int(gate.get("min_sample", 5))
    limit = f"{gate.get('action', 'pause')}s above {100 * rate:g}% failed, once {sample} finished"
    if reason.startswith("install gate"):
        return GateState("warn", f"tripped: {reason.removeprefix('install gate: ')} ({limit})")
    states = wave or {}
    ack_finished, ack_failed = [*(acknowledged or []), 0, 0][:2]
    failed = states.get("failed", 0) - int(ack_failed)
    finished = states.get("succeeded", 0) + states.get("failed", 0) - int(ack_finished)
    return GateState("ok", f"{failed} of {finished} finished failed in this wave ({limit})")


def health_gate_state(gate: Mapping[str, Any] | None, baseline: float | None, reason: str) -> GateState:
    """The health gate's state: off, tripped (with the medians of the rollout's reason), or
    watching, with the baseline median seen last."""
    if gate is None:
        return GateState("off", "off")
    worse = "higher" if gate.get("higher_is_worse", True) else "lower"
    what = (f"{gate.get('metric')}: {worse} is worse, tolerance {100 * float(gate.get('tolerance', 0)):g}%"
            f" + {float(gate.get('absolute', 0)):g}, over {float(gate.get('window', 0)):g}s")
    if reason.startswith("health gate"):
        return GateState("warn", f"tripped: {reason.removeprefix('health gate: ')}")
    if baseline is None:
        return GateState("ok", f"watching {what}; no baseline yet (too few devices on each side)")
    return GateState("ok", f"watching {what}; baseline median {baseline:.4g}")


# --- an alert's page, live -------------------------------------------------------------------------


def moment(iso_text: str | None) -> str:
    """An API time (``2026-11-30T20:14:48.123Z``) for people: ``2026-11-30 20:14:48 UTC``."""
    return f"{iso_text[:19].replace('T', ' ')} UTC" if iso_text else ""


def alert_badge(enabled: bool, firing: int) -> tuple[str, str]:
    """An alert's state as (badge class, text)."""
    if not enabled:
        return "off", "disabled"
    return ("firing", f"{firing} firing") if firing else ("ok", "ok")


#: a table cell for the live pages: text, and optionally a link (``href``) or a badge (``badge``: its class)
Cell = dict[str, str]


def instance_row(key: str, state: str, value: float | None, since: str | None, fired_at: str | None,
                 resolved_at: str | None, is_device: bool) -> list[Cell]:
    """An alert instance as the cells of its row (the page renders them, and so does its script)."""
    first: Cell = {"text": key or "the whole scope"}
    if is_device:
        first["href"] = f"/devices/{key}"
    elif not key:
        first["class"] = "muted"
    badge = {"firing": "firing", "pending": "warn"}.get(state, "")
    return [first, {"text": state, "badge": badge}, {"text": "" if value is None else f"{value:.4g}"},
            {"text": moment(since), "class": "wide-only"}, {"text": moment(fired_at)},
            {"text": moment(resolved_at), "class": "wide-only"}]
