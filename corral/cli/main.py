"""The ``corral`` command line (DESIGN §8): noun-verb, ``--json`` on every list and show,
errors on stderr in one line with exit code 1, usage errors exit 2."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli import config as cli_config
from corral.cli import monitoring
from corral.cli import remote as remote_cli
from corral.cli.artifact import app as artifact_app
from corral.cli.client import Client
from corral.cli.common import JsonOpt, ServerOpt, TokenOpt, client, parse_kv
from corral.cli.deploy import app as deployment_app
from corral.cli.deploy import deploy as deploy_command
from corral.cli.output import emit_json, kv, table
from corral.cli.rollout import app as rollout_app
from corral.cli.webhook import app as webhook_app
from corral.errors import CorralError, InvalidInput

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Corral: open-source IoT fleet management.")



def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"--bind must be HOST:PORT, not {bind!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


# --- server ---------------------------------------------------------------------------------

server_app = typer.Typer(help="Run the server, or initialize its data dir.", invoke_without_command=True)
app.add_typer(server_app, name="server")

DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="where the database and keys live")]
DbOpt = Annotated[str | None, typer.Option("--db", help="database URL (default: SQLite in the data dir)")]


def _server_config(data_dir: Path, db: str | None, bind: str = "127.0.0.1:8080", bus: str | None = None,
                   heartbeat: float | None = None, allow_pending: bool = True,
                   max_handshakes: int | None = None, rollup_interval: float | None = None,
                   alert_interval: float | None = None, artifact_dir: Path | None = None,
                   max_artifact_bytes: int | None = None, session_token_ttl: float | None = None) -> Any:
    from corral.server.config import Limits, Monitoring, ServerConfig, Timeouts, Updates
    from corral.server.main import saved_db_url

    host, port = parse_bind(bind)
    timeouts = Timeouts()
    if heartbeat is not None:
        if heartbeat <= 0:
            raise InvalidInput("--heartbeat-interval must be positive")
        timeouts = Timeouts(heartbeat_interval=heartbeat, presence_flush=min(timeouts.presence_flush, heartbeat))
    if session_token_ttl is not None:
        if session_token_ttl <= 0:
            raise InvalidInput("--session-token-ttl must be positive")
        timeouts = dataclasses.replace(timeouts, session_token_ttl=session_token_ttl)
    limits = Limits(max_concurrent_handshakes=max_handshakes) if max_handshakes else Limits()
    monitoring = Monitoring()
    for flag, value in (("--rollup-interval", rollup_interval), ("--alert-interval", alert_interval)):
        if value is not None and value <= 0:
            raise InvalidInput(f"{flag} must be positive")
    if rollup_interval is not None:
        monitoring = dataclasses.replace(monitoring, rollup_interval=rollup_interval)
    if alert_interval is not None:
        monitoring = dataclasses.replace(monitoring, alert_interval=alert_interval)
    updates = Updates(artifact_dir=artifact_dir)
    if max_artifact_bytes is not None:
        updates = dataclasses.replace(updates, max_artifact_bytes=max_artifact_bytes)
    return ServerConfig(data_dir=data_dir, host=host, port=port, db_url=db or saved_db_url(data_dir) or "",
                        bus_url=bus or "", timeouts=timeouts, allow_pending=allow_pending, limits=limits,
                        monitoring=monitoring, updates=updates)


@server_app.callback()
def server(
    ctx: typer.Context,
    data_dir: DataDirOpt = Path("corral-data"),
    bind: Annotated[str, typer.Option("--bind", help="HOST:PORT to listen on")] = "127.0.0.1:8080",
    db: DbOpt = None,
    bus: Annotated[str | None, typer.Option("--bus", help="nats://HOST:PORT to share state between replicas")] = None,
    heartbeat_interval: Annotated[float | None, typer.Option(help="seconds between device heartbeats")] = None,
    allow_pending: Annotated[bool, typer.Option(help="let devices without a token wait for acceptance")] = True,
    max_handshakes: Annotated[int | None, typer.Option(min=1, help="device handshakes at once (more: 4429)")] = None,
    rollup_interval: Annotated[float | None, typer.Option(help="seconds between metric rollup runs (60)")] = None,
    alert_interval: Annotated[float | None, typer.Option(help="seconds between alert evaluations (15)")] = None,
    artifact_dir: Annotated[Path | None, typer.Option(
        "--artifact-dir", help="where artifacts are stored (DATA_DIR/artifacts; shared by replicas)")] = None,
    max_artifact_bytes: Annotated[int | None, typer.Option(min=1, help="largest artifact upload (4 GiB)")] = None,
    session_token_ttl: Annotated[float | None, typer.Option(
        help="seconds a remote-access session's token is valid (60)")] = None,
) -> None:
    """Initialize the data dir if needed, then run the server."""
    if ctx.invoked_subcommand is not None:
        return
    from corral.server.main import init, serve

    cfg = _server_config(data_dir, db, bind, bus, heartbeat_interval, allow_pending, max_handshakes,
                         rollup_interval, alert_interval, artifact_dir, max_artifact_bytes, session_token_ttl)
    creds = init(cfg)
    if creds is not None:
        sys.stderr.write(
            f"initialized {data_dir}: admin user {creds['admin_user']!r}, password {creds['admin_password']}\n"
            f"API token: {creds['api_token']}\n"
        )
    sys.stderr.write(f"corral server on {cfg.public_url}\n")
    serve(cfg)


@server_app.command("init")
def server_init(
    data_dir: DataDirOpt = Path("corral-data"),
    db: DbOpt = None,
    admin_user: Annotated[str, typer.Option("--admin-user")] = "admin",
    json_out: JsonOpt = False,
) -> None:
    """Create the database, keys and the first admin; print the admin's credentials once."""
    from corral.server.main import init_strict

    creds = init_strict(_server_config(data_dir, db), admin_user)
    if json_out:
        emit_json(creds)
    else:
        kv(creds)


@server_app.command("export-root-key")
def server_export_root_key(
    out: Annotated[Path, typer.Option("--out", help="file to write the TUF root key to (must not exist)")],
    data_dir: DataDirOpt = Path("corral-data"),
    remove: Annotated[bool, typer.Option("--remove", help="then delete it from the data dir (offline root)")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Export the TUF root key for offline storage (ADR 0011); --remove takes it off the server."""
    from corral.server.updates.tuf_repo import export_root_key

    doc = export_root_key(data_dir, out, remove)
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"root key {doc['keyid']} written to {out}"
                         + (" and removed from the server\n" if remove else "\n"))


# --- login ----------------------------------------------------------------------------------


@app.command()
def login(
    server: Annotated[str, typer.Option("--server", help="server URL")],
    user: Annotated[str, typer.Option("--user", help="user name")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
) -> None:
    """Log in and store an API token in the user's config dir."""
    password = (sys.stdin.readline().rstrip("\r\n") if password_stdin
                else typer.prompt("password", hide_input=True))
    c = Client(server)
    try:
        tok = c.post("/auth/login", {"user": user, "password": password, "token_name": "cli"})
    finally:
        c.close()
    path = cli_config.save(cli_config.CliConfig(server=server.rstrip("/"), token=tok["token"]))
    sys.stderr.write(f"logged in as {tok['user']} ({tok['role']}); token stored in {path}\n")


# --- enrollment tokens ------------------------------------------------------------------------

token_app = typer.Typer(help="Enrollment tokens that admit devices.", no_args_is_help=True)
app.add_typer(token_app, name="enrollment-token")


@token_app.command("create")
def token_create(
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE given to enrolled devices")] = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="static group they join")] = None,
    expires: Annotated[str | None, typer.Option("--expires", help="e.g. 24h")] = None,
    max_uses: Annotated[int | None, typer.Option("--max-uses", min=1)] = None,
    description: Annotated[str, typer.Option("--description")] = "",
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Create an enrollment token (the secret is shown once)."""
    body = {"tags": parse_kv(tag or []), "groups": group or [], "expires": expires, "max_uses": max_uses,
            "description": description}
    doc = client(server, token).post("/enrollment-tokens", body)
    if json_out:
        emit_json(doc)
    else:
        kv(doc)


@token_app.command("list")
def token_list(json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """List enrollment tokens."""
    items = list(client(server, token).pages("/enrollment-tokens"))
    if json_out:
        emit_json(items)
        return
    table(items, [("ID", lambda t: t["id"]), ("TAGS", lambda t: t["tags"]), ("GROUPS", lambda t: t["groups"]),
                  ("USES", lambda t: f"{t['uses']}/{t['max_uses'] or '∞'}"), ("EXPIRES", lambda t: t["expires_at"]),
                  ("REVOKED", lambda t: t["revoked"])])


@token_app.command("revoke")
def token_revoke(token_id: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Revoke an enrollment token."""
    client(server, token).delete(f"/enrollment-tokens/{token_id}")
    sys.stderr.write(f"revoked {token_id}\n")


# --- agent and simulator ----------------------------------------------------------------------


@app.command()
def agent(
    server: Annotated[str | None, typer.Option("--server", help="server URL")] = None,
    enroll_token: Annotated[str | None, typer.Option("--enroll-token", help="enrollment token")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="key and state (0700)")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="TOML config file")] = None,
    tuf_root: Annotated[Path | None, typer.Option("--tuf-root", help="the trusted TUF root.json")] = None,
) -> None:
    """Run the device agent."""
    from corral.agent.main import main_agent

    raise typer.Exit(main_agent(server=server, enroll_token=enroll_token, state_dir=state_dir,
                                config_file=config_file, tuf_root=tuf_root))


@app.command()
def sim(
    server: Annotated[str, typer.Option("--server", help="server URL")],
    devices: Annotated[int, typer.Option("--devices", min=1, max=100000, help="number of simulated devices")],
    enroll_token: Annotated[list[str] | None, typer.Option("--enroll-token", help="repeat to spread devices")] = None,
    state_dir: Annotated[Path, typer.Option("--state-dir")] = Path("corral-sim"),
    models: Annotated[str, typer.Option("--models", help="hardware models, comma-separated")] = "rpi4,imx8mm",
    seed: Annotated[int, typer.Option("--seed")] = 1,
    telemetry_interval: Annotated[float | None, typer.Option(
        "--telemetry-interval", help="seconds between metric collections (default 10; 0 turns telemetry off)")] = None,
    update_time: Annotated[str, typer.Option(
        "--update-time", metavar="MIN-MAX", help="seconds a simulated update takes (uniform in the range)")] = "1-3",
    update_fail_rate: Annotated[float, typer.Option(
        "--update-fail-rate", min=0.0, max=1.0, help="probability that a simulated update fails")] = 0.0,
    bad_marker: Annotated[str, typer.Option(
        "--bad-marker", help='a version containing this text is a "bad" release: more CPU, app.crashes > 0 '
                             '(empty: none)')] = "bad",
    bad_cpu_delta: Annotated[float, typer.Option(
        "--bad-cpu-delta", min=0.0, max=100.0, help="CPU percentage points a bad release adds")] = 30.0,
) -> None:
    """Run N simulated devices (real agents with simulated platform effects) in one process."""
    from corral.sim.runner import main_sim
    from corral.sim.updates import SimUpdateSettings, parse_time_range

    model_list = [m.strip() for m in models.split(",") if m.strip()]
    if not model_list:
        raise InvalidInput("--models needs at least one model")
    updates = SimUpdateSettings(duration=parse_time_range(update_time), fail_rate=update_fail_rate,
                                bad_marker=bad_marker, bad_cpu_delta=bad_cpu_delta)
    raise typer.Exit(main_sim(server=server, enroll_tokens=enroll_token or [], devices=devices,
                              state_dir=state_dir, models=model_list, seed=seed,
                              telemetry_interval=telemetry_interval, updates=updates))


# --- devices --------------------------------------------------------------------------------

device_app = typer.Typer(help="The device registry.", no_args_is_help=True)
app.add_typer(device_app, name="device")

DEVICE_COLUMNS: list[tuple[str, Any]] = [
    ("ID", lambda d: d["id"]),
    ("STATUS", lambda d: d["status"]),
    ("ONLINE", lambda d: d["online"]),
    ("HOSTNAME", lambda d: d["inventory"].get("hostname")),
    ("MODEL", lambda d: d["inventory"].get("model")),
    ("TAGS", lambda d: d["tags"]),
    ("LAST SEEN", lambda d: d["last_seen"]),
]


@device_app.command("list")
def device_list(
    selector: Annotated[str | None, typer.Option("--selector", "-s", help="e.g. 'tag.site == \"berlin\"'")] = None,
    status: Annotated[str | None, typer.Option("--status")] = None,
    sort: Annotated[str, typer.Option("--sort", help="id, created_at, last_seen, name, version; -X descends")] = "id",
    limit: Annotated[int | None, typer.Option("--limit", min=1)] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """List devices, optionally filtered by a selector."""
    items = client(server, token).pages("/devices", limit=limit, selector=selector, status=status, sort=sort)
    if json_out:
        emit_json(list(items))
    else:
        table(items, DEVICE_COLUMNS)


@device_app.command("show")
def device_show(device_id: str, json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Show a device: status, presence, tags, groups and inventory."""
    doc = client(server, token).get(f"/devices/{device_id}")
    if json_out:
        emit_json(doc)
    else:
        kv(doc)


@device_app.command("tag")
def device_tag(
    device_id: str,
    tags: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE ...")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="tag key to remove")] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Set (KEY=VALUE) or remove (--remove KEY) a device's tags."""
    if not tags and not remove:
        raise InvalidInput("give KEY=VALUE tags to set or --remove KEY")
    body = {"set": parse_kv(tags or []), "remove": remove or []}
    doc = client(server, token).patch(f"/devices/{device_id}/tags", body)
    if json_out:
        emit_json(doc)
    else:
        kv({"id": doc["id"], "tags": doc["tags"]})


def _admission(verb: str, device_id: str, json_out: bool, server: str | None, token: str | None) -> None:
    doc = client(server, token).post(f"/devices/{device_id}/{verb}")
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"{doc['id']}: {doc['status']}\n")


@device_app.command("accept")
def device_accept(device_id: str, json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Accept a pending device."""
    _admission("accept", device_id, json_out, server, token)


@device_app.command("reject")
def device_reject(device_id: str, json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Reject a pending device."""
    _admission("reject", device_id, json_out, server, token)


@device_app.command("decommission")
def device_decommission(device_id: str, json_out: JsonOpt = False, server: ServerOpt = None,
                        token: TokenOpt = None) -> None:
    """Decommission a device: its session closes and its key can never connect again."""
    _admission("decommission", device_id, json_out, server, token)


@device_app.command("preauthorize")
def device_preauthorize(
    public_key: Annotated[str, typer.Argument(help="base64 raw Ed25519 public key, or @FILE")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE")] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Pre-authorize a device by its public key: it is accepted when it first connects."""
    if public_key.startswith("@"):
        public_key = Path(public_key[1:]).read_text().strip()
    doc = client(server, token).post("/devices/preauthorize", {"public_key": public_key, "tags": parse_kv(tag or [])})
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"pre-authorized {doc['id']}\n")


@device_app.command("command")
def device_command(
    device_id: str,
    name: Annotated[str, typer.Argument(help="ping, refresh-inventory, reboot")],
    arg: Annotated[list[str] | None, typer.Option("--arg", help="KEY=VALUE")] = None,
    wait: Annotated[float, typer.Option("--wait", help="seconds to wait for the result")] = 10.0,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Send a command to a device and wait for its result."""
    doc = client(server, token).post(f"/devices/{device_id}/commands",
                                     {"name": name, "args": parse_kv(arg or [], "arg"), "wait": wait})
    if json_out:
        emit_json(doc)
    else:
        kv(doc)
    if doc["status"] == "failed":
        raise typer.Exit(1)


# --- groups ----------------------------------------------------------------------------------

group_app = typer.Typer(help="Static and dynamic device groups.", no_args_is_help=True)
app.add_typer(group_app, name="group")


@group_app.command("create")
def group_create(
    name: str,
    selector: Annotated[str | None, typer.Option("--selector", "-s", help="makes it a dynamic group")] = None,
    description: Annotated[str, typer.Option("--description")] = "",
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Create a static group, or a dynamic one with --selector."""
    doc = client(server, token).post("/groups", {"name": name, "selector": selector, "description": description})
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"created {doc['kind']} group {doc['name']} ({doc['size']} devices)\n")


@group_app.command("add")
def group_add(name: str, device_ids: list[str], json_out: JsonOpt = False, server: ServerOpt = None,
              token: TokenOpt = None) -> None:
    """Add devices to a static group."""
    doc = client(server, token).post(f"/groups/{name}/members", {"device_ids": device_ids})
    if json_out:
        emit_json(doc)
    else:
        sys.stderr.write(f"{doc['name']}: {doc['size']} devices\n")


@group_app.command("remove")
def group_remove(name: str, device_id: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Remove a device from a static group."""
    doc = client(server, token).delete(f"/groups/{name}/members/{device_id}")
    sys.stderr.write(f"{doc['name']}: {doc['size']} devices\n")


@group_app.command("delete")
def group_delete(name: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Delete a group (its devices are not affected)."""
    client(server, token).delete(f"/groups/{name}")
    sys.stderr.write(f"deleted group {name}\n")


@group_app.command("list")
def group_list(json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """List groups."""
    items = list(client(server, token).pages("/groups"))
    if json_out:
        emit_json(items)
        return
    table(items, [("NAME", lambda g: g["name"]), ("KIND", lambda g: g["kind"]), ("SIZE", lambda g: g["size"]),
                  ("SELECTOR", lambda g: g["selector"])])


@group_app.command("show")
def group_show(
    name: str,
    limit: Annotated[int, typer.Option("--limit", min=1, help="members to list")] = 1000,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Show a group and its members."""
    c = client(server, token)
    doc = c.get(f"/groups/{name}")
    members = list(c.pages(f"/groups/{name}/devices", limit=limit))
    if json_out:
        emit_json({**doc, "devices": members})
        return
    kv(doc)
    table(members, DEVICE_COLUMNS)


# --- users ----------------------------------------------------------------------------------

user_app = typer.Typer(help="Operators and their roles (admin only).", no_args_is_help=True)
app.add_typer(user_app, name="user")


@user_app.command("create")
def user_create(
    name: str,
    role: Annotated[str, typer.Option("--role", help="admin, operator or viewer")] = "viewer",
    remote_access: Annotated[bool, typer.Option(
        "--remote-access", help="may open terminals, forwards and file transfers (operators)")] = False,
    password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Create a user; without --password-stdin a random password is generated and printed."""
    import secrets

    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else secrets.token_urlsafe(15)
    doc = client(server, token).post("/users", {"name": name, "role": role, "password": password,
                                                "remote_access": remote_access})
    if not password_stdin:
        doc["password"] = password
    if json_out:
        emit_json(doc)
    else:
        kv(doc)


@user_app.command("update")
def user_update(
    name: str,
    role: Annotated[str | None, typer.Option("--role", help="admin, operator or viewer")] = None,
    remote_access: Annotated[bool | None, typer.Option(
        "--remote-access/--no-remote-access", help="the remote-access permission")] = None,
    disabled: Annotated[bool | None, typer.Option("--disable/--enable")] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Change a user's role, remote-access permission or disabled flag."""
    body = {k: v for k, v in {"role": role, "remote_access": remote_access, "disabled": disabled}.items()
            if v is not None}
    if not body:
        raise InvalidInput("nothing to change: give --role, --remote-access/--no-remote-access or --disable/--enable")
    doc = client(server, token).patch(f"/users/{name}", body)
    if json_out:
        emit_json(doc)
    else:
        kv(doc)


@user_app.command("list")
def user_list(json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """List users."""
    items = list(client(server, token).pages("/users"))
    if json_out:
        emit_json(items)
        return
    table(items, [("NAME", lambda u: u["name"]), ("ROLE", lambda u: u["role"]), ("DISABLED", lambda u: u["disabled"])])


@user_app.command("token")
def user_token(
    name: Annotated[str, typer.Option("--name", help="a label for the token")] = "",
    expires: Annotated[str | None, typer.Option("--expires")] = None,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """Create an API token for yourself (for CI jobs)."""
    doc = client(server, token).post("/auth/tokens", {"name": name, "expires": expires})
    if json_out:
        emit_json(doc)
    else:
        sys.stdout.write(doc["token"] + "\n")


# --- audit ----------------------------------------------------------------------------------

audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(webhook_app, name="webhook")
app.add_typer(artifact_app, name="artifact")
app.add_typer(deployment_app, name="deployment")
app.add_typer(rollout_app, name="rollout")
app.command("terminal")(remote_cli.terminal)
app.command("forward")(remote_cli.forward)
app.command("cp")(remote_cli.cp)
app.add_typer(remote_cli.session_app, name="session")
app.command("deploy")(deploy_command)


@audit_app.command("list")
def audit_list(
    action: Annotated[str | None, typer.Option("--action", help="prefix, e.g. device.")] = None,
    actor: Annotated[str | None, typer.Option("--actor")] = None,
    target: Annotated[str | None, typer.Option("--target")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 100,
    json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None,
) -> None:
    """List audit entries, newest first."""
    items = client(server, token).pages("/audit", limit=limit, action=action, actor=actor, target=target)
    if json_out:
        emit_json(list(items))
        return
    table(items, [("SEQ", lambda e: e["seq"]), ("TIME", lambda e: e["ts"]), ("ACTOR", lambda e: e["actor"]),
                  ("ACTION", lambda e: e["action"]), ("TARGET", lambda e: e["target"])])


@audit_app.command("verify")
def audit_verify(json_out: JsonOpt = False, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Verify the audit hash chain; exit 1 if an entry was altered or deleted."""
    doc = client(server, token).get("/audit/verify")
    if json_out:
        emit_json(doc)
    elif doc["ok"]:
        sys.stderr.write(f"audit log intact: {doc['entries']} entries\n")
    if not doc["ok"]:
        if not json_out:
            sys.stderr.write(f"error: audit log broken: {doc['problem']}\n")
        raise typer.Exit(1)


# --- monitoring -------------------------------------------------------------------------------

app.add_typer(monitoring.metrics_app, name="metrics")
app.add_typer(monitoring.event_app, name="event")
app.add_typer(monitoring.rule_app, name="rule")
app.add_typer(monitoring.alert_app, name="alert")
app.command("overview")(monitoring.overview)


def main() -> None:
    try:
        app()
    except CorralError as e:
        sys.stderr.write(f"error: {e.detail}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
