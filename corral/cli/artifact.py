"""``corral artifact``: upload (streamed, with a progress bar), list, show, delete, and the SBOM
component query ("which artifacts contain openssl")."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from corral.cli.common import JsonOpt, ServerOpt, TokenOpt, client
from corral.cli.output import emit_json, kv, table
from corral.errors import InvalidInput

app = typer.Typer(help="Artifacts: what devices install, signed into the TUF repository.", no_args_is_help=True)

CHUNK = 1 << 20
KINDS = ("app", "rootfs", "script", "agent")

ARTIFACT_COLUMNS: list[tuple[str, Any]] = [
    ("NAME", lambda a: a["name"]),
    ("VERSION", lambda a: a["version"]),
    ("KIND", lambda a: a["kind"]),
    ("HARDWARE", lambda a: a["hardware"]),
    ("SIZE", lambda a: a["size"]),
    ("SHA256", lambda a: a["sha256"][:12]),
    ("COMMIT", lambda a: (a["provenance"]["git_commit"] or "")[:12] or None),
    ("SBOM", lambda a: a["sbom"] and f"{a['sbom']['format']} ({a['sbom']['components']})"),
    ("CREATED", lambda a: a["created_at"]),
]


def split_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise InvalidInput(f"an artifact is NAME@VERSION, not {ref!r}")
    return name, version


def body(sbom: bytes, path: Path, progress: Progress) -> Iterator[bytes]:
    """The request body: the SBOM's bytes, then the file's, read a chunk at a time."""
    task = progress.add_task(path.name, total=len(sbom) + path.stat().st_size)
    if sbom:
        yield sbom
        progress.advance(task, len(sbom))
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk
            progress.advance(task, len(chunk))


@app.command("upload")
def upload(
    file: Annotated[Path, typer.Argument(help="the artifact file", exists=True, dir_okay=False, readable=True)],
    name: Annotated[str, typer.Option("--name", help="artifact name")],
    version: Annotated[str, typer.Option("--version", help="e.g. 1.2.0")],
    kind: Annotated[str, typer.Option("--kind", help="app, rootfs, script or agent")],
    hardware: Annotated[list[str] | None, typer.Option("--hardware", help="compatible device model (repeat)")] = None,
    sbom: Annotated[Path | None, typer.Option("--sbom", help="CycloneDX or SPDX JSON", exists=True,
                                              dir_okay=False, readable=True)] = None,
    commit: Annotated[str | None, typer.Option("--commit", help="git commit it was built from")] = None,
    build_url: Annotated[str | None, typer.Option("--build-url", help="the CI job that built it")] = None,
    build_time: Annotated[str | None, typer.Option("--build-time", help="ISO 8601, e.g. 2026-11-30T12:00:00Z")] = None,
    filename: Annotated[str | None, typer.Option("--filename", help="name devices store it under [FILE's]")] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Upload an artifact (streamed; a progress bar on a terminal). It is signed into the TUF repository."""
    if kind not in KINDS:  # the server says so too; this spares the upload
        raise InvalidInput(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    sbom_bytes = sbom.read_bytes() if sbom else b""
    params: dict[str, Any] = {"name": name, "version": version, "kind": kind, "hardware": hardware or [],
                              "filename": filename or file.name, "commit": commit, "build_url": build_url,
                              "build_time": build_time, "sbom_size": len(sbom_bytes)}
    size = len(sbom_bytes) + file.stat().st_size
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    c = client(server, token)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        doc = c.request("POST", "/artifacts", params={k: v for k, v in params.items() if v is not None},
                        content=body(sbom_bytes, file, progress),
                        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"uploaded {doc['name']}@{doc['version']} ({doc['size']} bytes, sha256 {doc['sha256']})\n")


@app.command("list")
def list_(
    name: Annotated[str | None, typer.Option("--name", help="only this name")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="only this kind")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1)] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """List artifacts, newest first."""
    items = client(server, token).pages("/artifacts", limit=limit, name=name, kind=kind)
    if json_out:
        emit_json(list(items))
    else:
        table(items, ARTIFACT_COLUMNS)


@app.command("show")
def show(ref: Annotated[str, typer.Argument(help="NAME@VERSION")], json_out: JsonOpt = False,
         server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Show an artifact: provenance, SBOM components, and its TUF target."""
    name, version = split_ref(ref)
    doc = client(server, token).get(f"/artifacts/{name}/{version}")
    if json_out:
        emit_json(doc)
        return
    kv({k: v for k, v in doc.items() if k != "components"})
    if doc.get("components"):
        table(doc["components"], [("COMPONENT", lambda c: c["name"]), ("VERSION", lambda c: c["version"]),
                                  ("TYPE", lambda c: c["type"]), ("PURL", lambda c: c["purl"])])


@app.command("delete")
def delete(ref: Annotated[str, typer.Argument(help="NAME@VERSION")], server: ServerOpt = None,
           token: TokenOpt = None) -> None:
    """Delete an artifact; its TUF target is withdrawn."""
    name, version = split_ref(ref)
    client(server, token).delete(f"/artifacts/{name}/{version}")
    sys.stderr.write(f"deleted {ref}\n")


@app.command("components")
def components(
    component: Annotated[str, typer.Argument(help="component name, e.g. openssl")],
    version: Annotated[str | None, typer.Option("--version", help="only this component version")] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Which artifacts contain a component (from their SBOMs)."""
    items = client(server, token).pages("/artifacts/components", name=component, version=version)
    if json_out:
        emit_json(list(items))
    else:
        table(items, [("ARTIFACT", lambda m: m["artifact"]), ("KIND", lambda m: m["kind"]),
                      ("COMPONENT", lambda m: m["component"]["name"]), ("VERSION", lambda m: m["component"]["version"]),
                      ("PURL", lambda m: m["component"]["purl"])])
