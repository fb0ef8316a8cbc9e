"""``corral deploy NAME@VERSION --device ID...`` and ``corral deployment list|show`` (DESIGN §8)."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from corral.cli.common import JsonOpt, ServerOpt, TokenOpt, client
from corral.cli.output import emit_json, kv, table

app = typer.Typer(help="Deployments: an artifact to a list of devices, with each device's status.",
                  no_args_is_help=True)

FINAL = ("succeeded", "failed", "rolled-back")
POLL = 1.0

DEPLOYMENT_COLUMNS: list[tuple[str, Any]] = [
    ("ID", lambda d: d["id"]),
    ("ARTIFACT", lambda d: d["artifact"]),
    ("STATUS", lambda d: d["status"]),
    ("DEVICES", lambda d: " ".join(f"{k}={v}" for k, v in sorted(d["counts"].items()))),
    ("CREATED", lambda d: d["created_at"]),
    ("BY", lambda d: d["created_by"]),
]
DEVICE_COLUMNS: list[tuple[str, Any]] = [
    ("DEVICE", lambda r: r["device_id"]),
    ("STATUS", lambda r: r["status"]),
    ("STEP", lambda r: r["step"]),
    ("RUNNING", lambda r: r["running_version"]),
    ("DOWNLOAD", lambda r: r.get("download", "")),
    ("REASON", lambda r: r["reason"]),
]


def progress_line(doc: dict[str, Any]) -> str:
    counts = " ".join(f"{k}={v}" for k, v in sorted(doc["counts"].items()))
    def one(r: dict[str, Any]) -> str:
        return f"{r['device_id'][:8]} {r['status']}" + (f" ({r['step']})" if r["status"] == "in-progress" else "")

    steps = ", ".join(one(r) for r in doc["devices"][:5])
    return f"{doc['id']} {doc['status']}: {counts}  {steps}"


def wait_for(c: Any, dep_id: str, timeout: float | None) -> dict[str, Any]:
    """Poll until every device's status is final (or ``timeout``); progress on stderr."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    while True:
        doc: dict[str, Any] = c.get(f"/deployments/{dep_id}")
        line = progress_line(doc)
        if line != last:
            sys.stderr.write(line + "\n")
            last = line
        if all(r["status"] in FINAL for r in doc["devices"]):
            return doc
        if deadline is not None and time.monotonic() >= deadline:
            return doc
        time.sleep(POLL)


def deploy(
    ref: Annotated[str, typer.Argument(help="the artifact, NAME@VERSION")],
    device: Annotated[list[str], typer.Option("--device", help="a device id (repeat)")],
    health_timeout: Annotated[float | None, typer.Option(
        "--health-timeout", min=0.001, help="seconds; overrides the artifact's own health timeout")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait until every device is done, showing progress")] = False,
    wait_timeout: Annotated[float | None, typer.Option(
        "--wait-timeout", min=0, help="give up waiting after this many seconds")] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Deploy an artifact to devices; prints the deployment id ({id} with --json). With --wait, exit 1
    unless every device succeeded."""
    c = client(server, token)
    body: dict[str, Any] = {"artifact": ref, "devices": device}
    if health_timeout is not None:
        body["health_timeout"] = health_timeout
    doc = c.post("/deployments", body)
    if wait:
        done = wait_for(c, doc["id"], wait_timeout)
        if json_out:
            emit_json(done)
        else:
            table(done["devices"], DEVICE_COLUMNS)
        if not all(r["status"] == "succeeded" for r in done["devices"]):
            raise typer.Exit(1)
        return
    if json_out:
        emit_json(doc)
    else:
        print(doc["id"])


@app.command("list")
def list_(limit: Annotated[int | None, typer.Option("--limit", min=1)] = None, json_out: JsonOpt = False,
          server: ServerOpt = None, token: TokenOpt = None) -> None:
    """List deployments, newest first."""
    items = client(server, token).pages("/deployments", limit=limit)
    if json_out:
        emit_json(list(items))
    else:
        table(items, DEPLOYMENT_COLUMNS)


@app.command("show")
def show(dep_id: Annotated[str, typer.Argument(help="deployment id")], json_out: JsonOpt = False,
         server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Show a deployment and each device's status (step, reason, the version it runs)."""
    doc = client(server, token).get(f"/deployments/{dep_id}")
    if json_out:
        emit_json(doc)
        return
    kv({k: v for k, v in doc.items() if k != "devices"})
    table(doc["devices"], DEVICE_COLUMNS)
