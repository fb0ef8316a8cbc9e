"""``corral webhook ...``: webhooks that receive event notifications, and their delivery log."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from corral.cli.common import JsonOpt, ServerOpt, TokenOpt, client
from corral.cli.output import emit_json, kv, table
from corral.errors import InvalidInput

app = typer.Typer(help="Webhooks: signed event notifications (Standard Webhooks) and their delivery log.",
                  no_args_is_help=True)


def split_events(values: list[str]) -> list[str]:
    """``--event a.* --event b.x`` and ``--events a.*,b.x`` both work."""
    return [e.strip() for v in values for e in v.split(",") if e.strip()]


WEBHOOK_COLUMNS: list[tuple[str, Any]] = [
    ("ID", lambda h: h["id"]),
    ("URL", lambda h: h["url"]),
    ("EVENTS", lambda h: h["events"]),
    ("ENABLED", lambda h: h["enabled"]),
    ("DESCRIPTION", lambda h: h["description"]),
]

DELIVERY_COLUMNS: list[tuple[str, Any]] = [
    ("ID", lambda d: d["id"]),
    ("EVENT", lambda d: d["event_type"]),
    ("STATUS", lambda d: d["status"]),
    ("ATTEMPTS", lambda d: d["attempts"]),
    ("HTTP", lambda d: d["last_status"]),
    ("CREATED", lambda d: d["created_at"]),
    ("DELIVERED", lambda d: d["delivered_at"]),
    ("NEXT ATTEMPT", lambda d: d["next_attempt_at"]),
    ("LAST ERROR", lambda d: d["last_error"]),
]


@app.command("create")
def webhook_create(
    url: Annotated[str, typer.Argument(help="http:// or https:// URL that receives the POSTs")],
    event: Annotated[list[str] | None, typer.Option(
        "--event", "--events", "-e", help="event-type glob, e.g. 'alert.*' or '*' (repeat, or comma-separate)")] = None,
    description: Annotated[str, typer.Option("--description")] = "",
    secret_stdin: Annotated[bool, typer.Option(
        "--secret-stdin", help="read the whsec_... signing secret from stdin (default: generated)")] = False,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Create a webhook; its signing secret is shown this once."""
    events = split_events(event or [])
    if not events:
        raise InvalidInput("give at least one --event, e.g. --event 'alert.*' (or '*' for every event)")
    body: dict[str, Any] = {"url": url, "events": events, "description": description}
    if secret_stdin:
        body["secret"] = sys.stdin.readline().strip()
    doc = client(server, token).post("/webhooks", body)
    if json_out:
        emit_json(doc)
        return
    kv(doc)
    sys.stderr.write("the secret is shown only now: receivers need it to verify the webhook-signature header\n")


@app.command("list")
def webhook_list(json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """List webhooks (secrets masked)."""
    items = list(client(server, token).pages("/webhooks"))
    if json_out:
        emit_json(items)
    else:
        table(items, WEBHOOK_COLUMNS)


@app.command("show")
def webhook_show(webhook_id: str, json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Show a webhook (secret masked)."""
    doc = client(server, token).get(f"/webhooks/{webhook_id}")
    if json_out:
        emit_json(doc)
    else:
        kv(doc)


def _set_enabled(webhook_id: str, enabled: bool, json_out: bool, server: str | None, token: str | None) -> None:
    doc = client(server, token).patch(f"/webhooks/{webhook_id}", {"enabled": enabled})
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"{doc['id']}: {'enabled' if doc['enabled'] else 'disabled'}\n")


@app.command("enable")
def webhook_enable(webhook_id: str, json_out: JsonOpt = False, server: ServerOpt = None,
                   token: TokenOpt = None) -> None:
    """Enable a webhook: deliveries that waited while it was disabled go out."""
    _set_enabled(webhook_id, True, json_out, server, token)


@app.command("disable")
def webhook_disable(webhook_id: str, json_out: JsonOpt = False, server: ServerOpt = None,
                    token: TokenOpt = None) -> None:
    """Disable a webhook: no new events are queued for it, and queued ones wait."""
    _set_enabled(webhook_id, False, json_out, server, token)


@app.command("delete")
def webhook_delete(webhook_id: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Delete a webhook and its delivery log."""
    client(server, token).delete(f"/webhooks/{webhook_id}")
    sys.stderr.write(f"deleted webhook {webhook_id}\n")


@app.command("deliveries")
def webhook_deliveries(
    webhook_id: str,
    status: Annotated[str | None, typer.Option("--status", help="pending, delivered or failed")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 100,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """A webhook's delivery log, newest first."""
    items = client(server, token).pages(f"/webhooks/{webhook_id}/deliveries", limit=limit, status=status)
    if json_out:
        emit_json(list(items))
    else:
        table(items, DELIVERY_COLUMNS)


@app.command("test")
def webhook_test(webhook_id: str, json_out: JsonOpt = False, server: ServerOpt = None,
                 token: TokenOpt = None) -> None:
    """Send a webhook.test event to a webhook."""
    doc = client(server, token).post(f"/webhooks/{webhook_id}/test")
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"queued {doc['event_type']} as {doc['id']}: see 'corral webhook deliveries {webhook_id}'\n")


@app.command("retry")
def webhook_retry(delivery_id: str, json_out: JsonOpt = False, server: ServerOpt = None,
                  token: TokenOpt = None) -> None:
    """Send a failed delivery once more."""
    doc = client(server, token).post(f"/webhooks/deliveries/{delivery_id}/retry")
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"{doc['id']}: queued again\n")
