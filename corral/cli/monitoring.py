"""``corral metrics|event|rule|overview``: the monitoring side of the CLI (DESIGN §6, §8)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from corral.cli.common import JsonOpt, ServerOpt, TokenOpt, client
from corral.cli.output import console, emit_json, kv, table
from corral.errors import InvalidInput

metrics_app = typer.Typer(help="Device metrics: query, list names, latest values.", no_args_is_help=True)
event_app = typer.Typer(help="Device events (rules firing, processes killed, app events).", no_args_is_help=True)
rule_app = typer.Typer(help="On-device rules: threshold alerts and process allow-lists.", no_args_is_help=True)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"


def _series_label(key: dict[str, Any]) -> str:
    return ",".join(f"{k}={v or '(none)'}" for k, v in key.items()) or "all"


@metrics_app.command("query")
def metrics_query(
    metric: Annotated[str, typer.Option("--metric", help="e.g. cpu.percent")],
    device: Annotated[str | None, typer.Option("--device", help="one device")] = None,
    selector: Annotated[str | None, typer.Option("--selector", help="devices by selector")] = None,
    group: Annotated[str | None, typer.Option("--group", help="devices of a group")] = None,
    by: Annotated[str | None, typer.Option("--by", help="split by tag.KEY or device")] = None,
    agg: Annotated[str, typer.Option("--agg", help="avg, min, max, sum, count, p95")] = "avg",
    since: Annotated[str, typer.Option("--since", help="1h, an ISO time or @epoch")] = "1h",
    until: Annotated[str | None, typer.Option("--until")] = None,
    step: Annotated[str | None, typer.Option("--step", help="bucket width, e.g. 1m")] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Aggregate a metric per time bucket, for a device or a set of devices."""
    doc = client(server, token).get("/metrics/query", metric=metric, device=device, selector=selector,
                                    group=group, by=by, agg=agg, since=since, until=until, step=step)
    if json_out:
        emit_json(doc)
        return
    series = doc["series"]
    if not series:
        console.print(f"[dim]no data for {metric} in this range[/dim]")
        return
    shown = series[:8]
    times = sorted({t for s in shown for t, _ in s["points"]})
    cols: list[tuple[str, Any]] = [("TIME (UTC)", lambda r: r["t"])]
    for i, s in enumerate(shown):
        cols.append((_series_label(s["key"]), lambda r, i=i: r["v"][i]))
    values = [{t: v for t, v in s["points"]} for s in shown]
    import datetime as dt

    rows = [{"t": dt.datetime.fromtimestamp(t / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
             "v": [_fmt(vals.get(t)) for vals in values]} for t in times]
    console.print(f"[bold]{agg}({metric})[/bold] every {doc['step_s']:g} s, from {', '.join(doc['sources'])}",
                  highlight=False)
    table(rows, cols)
    if len(series) > len(shown):
        sys.stderr.write(f"({len(series) - len(shown)} more series: use --json)\n")


@metrics_app.command("list")
def metrics_list(device: Annotated[str | None, typer.Option("--device")] = None,
                 json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Metric names reported by the fleet (or by one device)."""
    doc = client(server, token).get("/metrics", device=device)
    if json_out:
        emit_json(doc)
    else:
        for name in doc["items"]:
            console.print(name, highlight=False)


@metrics_app.command("latest")
def metrics_latest(device_id: str, json_out: JsonOpt = False, server: ServerOpt = None,
                   token: TokenOpt = None) -> None:
    """A device's latest value of every metric."""
    doc = client(server, token).get(f"/devices/{device_id}/metrics")
    if json_out:
        emit_json(doc)
        return
    table([{"name": k, **v} for k, v in doc["metrics"].items()],
          [("METRIC", lambda r: r["name"]), ("VALUE", lambda r: _fmt(r["value"])), ("AT", lambda r: r["ts"])])
    if doc["dropped_batches"]:
        sys.stderr.write(f"the device's spool dropped {doc['dropped_batches']} batches when it was full\n")


EVENT_COLUMNS: list[tuple[str, Any]] = [
    ("TIME", lambda e: e["ts"]), ("DEVICE", lambda e: e["device_id"]), ("SEVERITY", lambda e: e["severity"]),
    ("SOURCE", lambda e: e["source"]), ("MESSAGE", lambda e: e["message"]),
]


@event_app.command("list")
def event_list(
    device: Annotated[str | None, typer.Option("--device")] = None,
    selector: Annotated[str | None, typer.Option("--selector")] = None,
    severity: Annotated[str | None, typer.Option("--severity", help="at least this severity")] = None,
    source: Annotated[str | None, typer.Option("--source", help="rule, allowlist, app, agent")] = None,
    since: Annotated[str | None, typer.Option("--since")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Device events, newest first."""
    items = list(client(server, token).pages("/events", limit=limit, device=device, selector=selector,
                                             severity=severity, source=source, since=since))
    if json_out:
        emit_json({"items": items})
    else:
        table(items, EVENT_COLUMNS)


RULE_COLUMNS: list[tuple[str, Any]] = [
    ("NAME", lambda r: r["name"]), ("KIND", lambda r: r["kind"]), ("ENABLED", lambda r: r["enabled"]),
    ("WHAT", lambda r: r["expr"] or f"{r['mode']}: {', '.join(r['allow'])}"),
    ("SEVERITY", lambda r: r["severity"]), ("SELECTOR", lambda r: r["selector"] or "(all)"),
]


@rule_app.command("create")
def rule_create(
    name: str,
    threshold: Annotated[str | None, typer.Option(
        "--threshold", help="alert when true, e.g. 'cpu.percent > 90 for 5m'")] = None,
    allow: Annotated[list[str] | None, typer.Option(
        "--allow", help="allow-list: executable glob (repeat)")] = None,
    scope: Annotated[list[str] | None, typer.Option(
        "--scope", help="allow-list: only watch executables matching this glob (repeat; default all)")] = None,
    mode: Annotated[str, typer.Option("--mode", help="allow-list: report, or enforce (kill, then report)")] = "report",
    severity: Annotated[str, typer.Option("--severity")] = "warning",
    selector: Annotated[str, typer.Option("--selector", help="devices that get the rule (default all)")] = "",
    disabled: Annotated[bool, typer.Option("--disabled", help="create it disabled")] = False,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Create a rule that devices evaluate locally (offline too)."""
    if (threshold is None) == (not allow):
        raise InvalidInput("give either --threshold EXPR or --allow GLOB (repeatable)")
    body: dict[str, Any] = {"name": name, "severity": severity, "selector": selector, "enabled": not disabled}
    if threshold is not None:
        body |= {"kind": "threshold", "expr": threshold}
    else:
        body |= {"kind": "allowlist", "allow": allow, "scope": scope or [], "mode": mode}
    doc = client(server, token).post("/rules", body)
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"rule {doc['name']} created ({doc['id']})\n")


@rule_app.command("list")
def rule_list(json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """On-device rules."""
    items = list(client(server, token).pages("/rules"))
    if json_out:
        emit_json({"items": items})
    else:
        table(items, RULE_COLUMNS)


@rule_app.command("show")
def rule_show(rule: str, json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """A rule, how many devices run it, and which refused it."""
    doc = client(server, token).get(f"/rules/{rule}")
    if json_out:
        emit_json(doc)
    else:
        kv(doc)


def _set_enabled(rule: str, enabled: bool, server: str | None, token: str | None) -> None:
    doc = client(server, token).patch(f"/rules/{rule}", {"enabled": enabled})
    sys.stderr.write(f"rule {doc['name']} {'enabled' if enabled else 'disabled'}\n")


@rule_app.command("enable")
def rule_enable(rule: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Enable a rule (devices get it)."""
    _set_enabled(rule, True, server, token)


@rule_app.command("disable")
def rule_disable(rule: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Disable a rule (devices drop it)."""
    _set_enabled(rule, False, server, token)


@rule_app.command("delete")
def rule_delete(rule: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Delete a rule (devices drop it)."""
    client(server, token).delete(f"/rules/{rule}")
    sys.stderr.write(f"rule {rule} deleted\n")


def overview(json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """The fleet at a glance: presence, versions, firing alerts."""
    doc = client(server, token).get("/overview")
    if json_out:
        emit_json(doc)
        return
    d = doc["devices"]
    console.print(f"[bold]devices[/bold]: {sum(d.values())} ({', '.join(f'{v} {k}' for k, v in d.items())})",
                  highlight=False)
    console.print(f"[bold]online[/bold]: {doc['online']}   [bold]offline[/bold]: {doc['offline']}", highlight=False)
    console.print(f"[bold]telemetry[/bold]: {doc['telemetry_points_last_minute']} points in the last minute",
                  highlight=False)
    for title, dist in (("agent versions", doc["agent_versions"]), ("os versions", doc["os_versions"])):
        console.print(f"[bold]{title}[/bold]: " + ", ".join(f"{k} ({v})" for k, v in dist.items()), highlight=False)
    firing = doc["firing_alerts"]
    console.print(f"[bold]firing alerts[/bold]: {len(firing)}", highlight=False)
    if firing:
        table(firing, [("ALERT", lambda a: a["alert"]), ("KEY", lambda a: a["key"] or "-"),
                       ("SEVERITY", lambda a: a["severity"]), ("SINCE", lambda a: a["since"]),
                       ("VALUE", lambda a: _fmt(a["value"]))])


alert_app = typer.Typer(help="Server-side alerts: thresholds over groups, offline devices, event rates.",
                        no_args_is_help=True)

ALERT_COLUMNS: list[tuple[str, Any]] = [
    ("NAME", lambda a: a["name"]), ("KIND", lambda a: a["kind"]), ("ENABLED", lambda a: a["enabled"]),
    ("FIRING", lambda a: a["firing"]), ("SEVERITY", lambda a: a["severity"]),
    ("WHAT", lambda a: _alert_what(a)), ("SELECTOR", lambda a: a["selector"] or "(all)"),
]


def _alert_what(a: dict[str, Any]) -> str:
    if a["kind"] == "threshold":
        return str(a["expr"]) + (f" by {a['by']}" if a["by"] else "")
    if a["kind"] == "offline":
        return f"offline > {a['for_s']:g} s"
    p = a["params"]
    return (f">= {p.get('count')} {p.get('min_severity')}+ events in {a['window_s']:g} s"
            + (f" from {p['source']}" if p.get("source") else "") + (f" by {a['by']}" if a["by"] else ""))


@alert_app.command("create")
def alert_create(
    name: str,
    threshold: Annotated[str | None, typer.Option(
        "--threshold", help="e.g. 'avg(cpu.percent) > 80 for 5m' (aggregates: avg min max sum count p95)")] = None,
    offline: Annotated[str | None, typer.Option("--offline", help="fire for a device offline this long, e.g. 10m")]
    = None,
    event_rate: Annotated[int | None, typer.Option(
        "--event-rate", min=1, help="fire at this many events (see --min-severity, --source) in --window")] = None,
    min_severity: Annotated[str, typer.Option("--min-severity")] = "error",
    source: Annotated[str | None, typer.Option("--source", help="event_rate: only events from this source")] = None,
    window: Annotated[str, typer.Option("--window", help="lookback for aggregates and event counts")] = "5m",
    by: Annotated[str | None, typer.Option("--by", help="one instance per value of tag.KEY")] = None,
    selector: Annotated[str, typer.Option("--selector", help="devices in scope (default all)")] = "",
    severity: Annotated[str, typer.Option("--severity")] = "warning",
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Create an alert; notifications go to webhooks subscribed to alert.*"""
    given = [x for x in (threshold, offline, event_rate) if x is not None]
    if len(given) != 1:
        raise InvalidInput("give exactly one of --threshold EXPR, --offline DURATION, --event-rate N")
    body: dict[str, Any] = {"name": name, "selector": selector, "severity": severity, "window": window, "by": by}
    if threshold is not None:
        body |= {"kind": "threshold", "expr": threshold}
    elif offline is not None:
        body |= {"kind": "offline", "for": offline}
    else:
        body |= {"kind": "event_rate", "count": event_rate, "min_severity": min_severity, "source": source}
    doc = client(server, token).post("/alerts", body)
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"alert {doc['name']} created ({doc['id']})\n")


@alert_app.command("list")
def alert_list(json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Alerts and how many instances fire."""
    items = list(client(server, token).pages("/alerts"))
    if json_out:
        emit_json({"items": items})
    else:
        table(items, ALERT_COLUMNS)


@alert_app.command("show")
def alert_show(alert: str, state: Annotated[str | None, typer.Option("--state", help="firing, pending, ...")]
               = None, json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """An alert and its instances (per device or tag value)."""
    doc = client(server, token).get(f"/alerts/{alert}", state=state)
    if json_out:
        emit_json(doc)
        return
    instances = doc.pop("instances") or []
    kv(doc)
    table(instances, [("KEY", lambda i: i["key"] or "(all)"), ("STATE", lambda i: i["state"]),
                      ("SINCE", lambda i: i["since"]), ("VALUE", lambda i: _fmt(i["value"])),
                      ("FIRED", lambda i: i["fired_at"]), ("RESOLVED", lambda i: i["resolved_at"])])


@alert_app.command("enable")
def alert_enable(alert: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Enable an alert."""
    client(server, token).patch(f"/alerts/{alert}", {"enabled": True})
    sys.stderr.write(f"alert {alert} enabled\n")


@alert_app.command("disable")
def alert_disable(alert: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Disable an alert (no evaluation, no notifications)."""
    client(server, token).patch(f"/alerts/{alert}", {"enabled": False})
    sys.stderr.write(f"alert {alert} disabled\n")


@alert_app.command("delete")
def alert_delete(alert: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Delete an alert and its instances."""
    client(server, token).delete(f"/alerts/{alert}")
    sys.stderr.write(f"alert {alert} deleted\n")
