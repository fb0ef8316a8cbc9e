"""``corral rollout create|list|show|devices|watch|pause|resume|abort`` (DESIGN §8, ADR 0015)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from corral.cli.common import JsonOpt, ServerOpt, TokenOpt, client, parse_kv
from corral.cli.output import emit_json, kv, table
from corral.core.durations import parse_duration

app = typer.Typer(help="Rollouts: an artifact to the devices a selector matches, in waves, behind gates.",
                  no_args_is_help=True)

#: device states that are over for the rollout
DONE = ("succeeded", "failed", "skipped", "reverted", "revert_failed")
#: watch stops at these: the rollout is over, or waits for an operator
STOPPED = ("completed", "aborted", "paused")
POLL = 1.0

ROLLOUT_COLUMNS: list[tuple[str, Any]] = [
    ("ID", lambda r: r["id"]),
    ("ARTIFACT", lambda r: r["artifact"]),
    ("STATUS", lambda r: r["status"]),
    ("WAVE", lambda r: f"{r['current_wave']}/{len(r['waves'])}"),
    ("DEVICES", lambda r: r["devices"]),
    ("DONE", lambda r: sum(n for w in r["waves"] for s, n in w["states"].items() if s in DONE)),
    ("SELECTOR", lambda r: r["selector"]),
    ("REASON", lambda r: r["reason"]),
]
WAVE_COLUMNS: list[tuple[str, Any]] = [
    ("WAVE", lambda w: w["wave"]),
    ("SIZE", lambda w: w["size"]),
    ("STATES", lambda w: " ".join(f"{k}={v}" for k, v in w["states"].items())),
]
DEVICE_COLUMNS: list[tuple[str, Any]] = [
    ("DEVICE", lambda d: d["device_id"]),
    ("WAVE", lambda d: d["wave"]),
    ("STATE", lambda d: d["state"]),
    ("ATTEMPT", lambda d: d["attempt"]),
    ("STATUS", lambda d: d["status"] or ""),
    ("STEP", lambda d: d["step"] or ""),
    ("PREVIOUS", lambda d: d["previous_version"]),
    ("REASON", lambda d: d["reason"]),
]

def _seconds(value: str | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except Exception as e:
        raise typer.BadParameter(str(e), param_hint=what) from None


@app.command("create")
def create(
    ref: Annotated[str, typer.Argument(help="the artifact, NAME@VERSION")],
    selector: Annotated[str, typer.Option("--selector", "-s", help="the devices, e.g. 'tag.site == \"berlin\"'")],
    waves: Annotated[str, typer.Option("--waves", help="cumulative: 1%,10%,50%,100% or 5,50,all")] = "1%,10%,50%,100%",
    canary: Annotated[str | None, typer.Option("--canary", help="a selector whose devices go first")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="the random order's seed")] = None,
    include_new: Annotated[bool, typer.Option("--include-new", help="devices that match later join")] = False,
    max_failure_rate: Annotated[float, typer.Option("--max-failure-rate", min=0, max=0.999,
                                                    help="install gate: stop above this share failed")] = 0.2,
    min_sample: Annotated[int, typer.Option("--min-sample", min=1, help="install gate: finished devices first")] = 5,
    on_failure: Annotated[str, typer.Option("--on-failure", help="install gate: pause or abort")] = "pause",
    no_install_gate: Annotated[bool, typer.Option("--no-install-gate", help="no install gate")] = False,
    health_metric: Annotated[str | None, typer.Option("--health-metric", help="health gate: a metric")] = None,
    health_window: Annotated[str, typer.Option("--health-window", help="health gate: compared over")] = "5m",
    health_tolerance: Annotated[float, typer.Option("--health-tolerance", min=0,
                                                    help="health gate: 0.2 = 20% worse")] = 0.2,
    health_absolute: Annotated[float, typer.Option("--health-absolute", min=0,
                                                   help="health gate: plus this, in the metric's unit")] = 0.0,
    lower_is_worse: Annotated[bool, typer.Option("--lower-is-worse", help="health gate: a drop regresses")] = False,
    health_min_devices: Annotated[int, typer.Option("--health-min-devices", min=1)] = 3,
    auto_revert: Annotated[bool, typer.Option("--auto-revert", help="health gate: roll back on a regression")] = False,
    max_per_minute: Annotated[int | None, typer.Option("--max-per-minute", min=1)] = None,
    max_concurrent: Annotated[int | None, typer.Option("--max-concurrent", min=1)] = None,
    per_tag: Annotated[str | None, typer.Option("--per-tag", help="KEY=N: at most N in progress per tag value")] = None,
    start_delay: Annotated[str | None, typer.Option("--start-delay", help="random delay per device, e.g. 30s")] = None,
    window: Annotated[list[str] | None, typer.Option(
        "--window", help="maintenance window in the device's time zone, e.g. 'Mon-Fri 02:00-05:00' (repeat)")] = None,
    retries: Annotated[int, typer.Option("--retries", min=0, max=10)] = 0,
    retry_backoff: Annotated[str, typer.Option("--retry-backoff")] = "1m",
    device_timeout: Annotated[str, typer.Option("--device-timeout")] = "1h",
    wave_wait: Annotated[str | None, typer.Option("--wave-wait", help="a done wave waits this long")] = None,
    health_timeout: Annotated[float | None, typer.Option("--health-timeout", min=0.001,
                                                        help="seconds; the devices' own health check")] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Create a rollout; prints its id ({id} with --json). Follow it with `corral rollout watch ID`."""
    if on_failure not in ("pause", "abort"):
        raise typer.BadParameter("must be pause or abort", param_hint="--on-failure")
    pacing: dict[str, Any] = {"max_per_minute": max_per_minute, "max_concurrent": max_concurrent,
                              "windows": window or [], "retries": retries,
                              "retry_backoff": _seconds(retry_backoff, "--retry-backoff"),
                              "device_timeout": _seconds(device_timeout, "--device-timeout")}
    if per_tag is not None:
        [(key, n)] = parse_kv([per_tag], "per-tag").items()
        if not n.isdigit() or int(n) < 1:
            raise typer.BadParameter("must be KEY=N with N >= 1", param_hint="--per-tag")
        pacing |= {"per_tag": key, "per_tag_max": int(n)}
    if start_delay is not None:
        pacing["start_delay"] = _seconds(start_delay, "--start-delay")
    if wave_wait is not None:
        pacing["wave_wait"] = _seconds(wave_wait, "--wave-wait")
    body: dict[str, Any] = {"artifact": ref, "selector": selector, "waves": waves, "canary": canary, "seed": seed,
                            "include_new": include_new, "pacing": pacing, "health_timeout": health_timeout,
                            "install_gate": None if no_install_gate else {
                                "max_failure_rate": max_failure_rate, "min_sample": min_sample,
                                "action": on_failure}}
    if health_metric is not None:
        body["health_gate"] = {"metric": health_metric, "window": _seconds(health_window, "--health-window"),
                               "tolerance": health_tolerance, "absolute": health_absolute,
                               "higher_is_worse": not lower_is_worse, "min_devices": health_min_devices,
                               "auto_revert": auto_revert}
    doc = client(server, token).post("/rollouts", body)
    if json_out:
        emit_json(doc)
    else:
        print(doc["id"])


@app.command("list")
def list_(limit: Annotated[int | None, typer.Option("--limit", min=1)] = None, json_out: JsonOpt = False,
          server: ServerOpt = None, token: TokenOpt = None) -> None:
    """List rollouts, newest first."""
    items = client(server, token).pages("/rollouts", limit=limit)
    if json_out:
        emit_json(list(items))
    else:
        table(items, ROLLOUT_COLUMNS)


@app.command("show")
def show(rollout_id: Annotated[str, typer.Argument(help="rollout id")], json_out: JsonOpt = False,
         server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Show a rollout: status, reason, and each wave's devices per state."""
    doc = client(server, token).get(f"/rollouts/{rollout_id}")
    if json_out:
        emit_json(doc)
        return
    kv({k: v for k, v in doc.items() if k not in ("waves", "spec")})
    table(doc["waves"], WAVE_COLUMNS)


@app.command("devices")
def devices(rollout_id: Annotated[str, typer.Argument(help="rollout id")],
            limit: Annotated[int | None, typer.Option("--limit", min=1)] = None, json_out: JsonOpt = False,
            server: ServerOpt = None, token: TokenOpt = None) -> None:
    """A rollout's devices in its order: wave, state, attempt, deployment status, previous version."""
    items = client(server, token).pages(f"/rollouts/{rollout_id}/devices", limit=limit)
    if json_out:
        emit_json(list(items))
    else:
        table(items, DEVICE_COLUMNS)


def _wave_text(w: dict[str, Any], current: int) -> str:
    marker = "▶" if w["wave"] == current else " "
    busy = {k: v for k, v in w["states"].items() if k not in DONE}
    extra = " ".join(f"{k}={v}" for k, v in sorted(busy.items()))
    failed = w["states"].get("failed", 0)
    text = f"{marker} wave {w['wave']}" + (f" [red]{failed} failed[/]" if failed else "")
    return text + (f" {extra}" if extra else "")


@app.command("watch")
def watch(rollout_id: Annotated[str, typer.Argument(help="rollout id")],
          timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="stop watching after seconds")] = None,
          server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Live progress bars per wave until the rollout completes (exit 0), or is paused or aborted (exit 1,
    with the reason: a gate tripped, or an operator acted)."""
    c = client(server, token)
    console = Console(stderr=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    doc = c.get(f"/rollouts/{rollout_id}")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                        transient=False)
    tasks: dict[int, TaskID] = {w["wave"]: progress.add_task("", total=max(w["size"], 1)) for w in doc["waves"]}
    last_status = ""
    with Live(progress, console=console, refresh_per_second=4, transient=False, redirect_stdout=False,
              auto_refresh=console.is_terminal):
        while True:
            for w in doc["waves"]:
                done = sum(n for s, n in w["states"].items() if s in DONE)
                progress.update(tasks[w["wave"]], completed=done, total=max(w["size"], 1),
                                description=_wave_text(w, doc["current_wave"]))
            status = f"{doc['status']}" + (f": {doc['reason']}" if doc["reason"] else "")
            if status != last_status:
                progress.console.print(f"rollout {rollout_id} {status}")
                last_status = status
            if not console.is_terminal:
                progress.console.print(" | ".join(
                    f"wave {w['wave']} {sum(n for s, n in w['states'].items() if s in DONE)}/{w['size']}"
                    for w in doc["waves"]))
            if doc["status"] in STOPPED or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL)
            doc = c.get(f"/rollouts/{rollout_id}")
    if doc["status"] != "completed":
        raise typer.Exit(1)


def _act(action: str, rollout_id: str, json_out: bool, server: str | None, token: str | None,
         body: dict[str, Any] | None = None) -> None:
    doc = client(server, token).post(f"/rollouts/{rollout_id}/{action}", body or {})
    if json_out:
        emit_json(doc)
    else:
        print(f"rollout {rollout_id} {doc['status']}" + (f": {doc['reason']}" if doc["reason"] else ""))


@app.command("pause")
def pause(rollout_id: Annotated[str, typer.Argument(help="rollout id")], json_out: JsonOpt = False,
          server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Pause: no more devices are told (those under way finish)."""
    _act("pause", rollout_id, json_out, server, token)


@app.command("resume")
def resume(rollout_id: Annotated[str, typer.Argument(help="rollout id")], json_out: JsonOpt = False,
           server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Resume a paused rollout (the install gate accepts the failures seen so far)."""
    _act("resume", rollout_id, json_out, server, token)


@app.command("abort")
def abort(rollout_id: Annotated[str, typer.Argument(help="rollout id")],
          revert: Annotated[bool, typer.Option("--revert", help="roll the updated devices back")] = False,
          json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Abort: no more devices are told; with --revert the updated ones go back to their previous version."""
    _act("abort", rollout_id, json_out, server, token, {"revert": revert})
