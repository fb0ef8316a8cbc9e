"""The agent's typed configuration: a TOML file, overridden by command-line flags.

Every limit and timeout the agent uses lives here (DESIGN §10), not as literals in the code.
A complete example with comments is ``packaging/agent.example.toml``::

    server = "https://corral.example.com"
    enroll_token = "..."                 # or enroll_token_file = "/etc/corral/enroll-token"
    state_dir = "/var/lib/corral-agent"

    [backoff]
    base = 1.0
    cap = 300.0

    [attributes]
    site = "berlin"

Loading goes: file (``tomllib``) → flags replace the keys they set → one validation pass. Any
problem (missing file, TOML syntax, unknown key, wrong type, out-of-range value) raises
:class:`corral.errors.InvalidInput` with a one-line message naming the key.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from corral.errors import InvalidInput

DEFAULT_STATE_DIR = Path("/var/lib/corral-agent")
DEFAULT_CONFIG_FILE = Path("/etc/corral/agent.toml")
DEVICE_CONNECT_PATH = "/device/v1/connect"

AttributeValue = str | int | float | bool


class BackoffConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Reconnect backoff (see :mod:`corral.core.backoff`), in seconds."""

    base: float = 1.0
    cap: float = 300.0
    #: a session that stayed up this long resets the backoff to the shortest window
    reset_after: float = 60.0


class TelemetryConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Metrics, events and the store-and-forward spool (DESIGN §6)."""

    enabled: bool = True
    #: seconds between collections (each one batch)
    interval: float = 10.0
    #: batches sent and not yet acknowledged, at most
    send_window: int = 8
    #: the spool under <state_dir>/spool: the oldest batches are dropped (and counted) beyond these
    spool_max_bytes: int = 64 * 1024 * 1024
    spool_max_batches: int = 100_000
    #: UNIX socket for application metrics (docs/app-metrics.md): "auto" = <state_dir>/metrics.sock,
    #: "" = off, or a path
    metrics_socket: str = "auto"


class RulesConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """On-device rules pushed by the server."""

    enabled: bool = True
    #: allow-list rules in ``enforce`` mode kill processes; false refuses such rules
    enforce: bool = True


class RootfsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[update.rootfs]``: the A/B partitions a ``rootfs`` artifact is written to (ADR 0012).
    Without ``partition_a`` and ``partition_b`` the device refuses rootfs deployments."""

    #: the two root partitions (block devices; files in tests)
    partition_a: Path | None = None
    partition_b: Path | None = None
    #: the bootloader environment file: active_slot, upgrade_available, boot_count, boot_limit
    bootenv: Path = Path("/boot/corral-env")
    #: a file holding the slot that booted (a or b), written by the boot scripts; without it the
    #: kernel command line's ``corral.slot=`` is read from /proc/cmdline
    booted_slot_file: Path | None = None
    #: boots of a slot on trial before the bootloader falls back to the other one
    boot_limit: int = 3


class UpdateConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[update]``: how the agent installs deployments (issue 4, ADR 0012)."""

    #: whether the agent accepts deployments at all
    enabled: bool = True
    #: where app bundles are installed (A/B slots per app); default STATE_DIR/apps
    apps_dir: Path | None = None
    #: the TUF root.json the device trusts, as provisioned (``corral tuf-client init``); without
    #: it the agent trusts the server's first root on its first update (trust on first use)
    tuf_root: Path | None = None
    #: how long a new version may take to become healthy, unless the artifact or deployment says
    health_timeout: float = 300.0
    #: how often a health check is tried within that time
    health_interval: float = 0.5
    #: bytes kept free on the apps file system
    reserve_bytes: int = 16 * 1024 * 1024
    #: how long an app gets to exit after SIGTERM before SIGKILL
    stop_timeout: float = 10.0
    #: how long one ``corral tuf-client download`` (or applying a delta) may take
    download_timeout: float = 3600.0
    #: keep the file of each installed artifact, so that the next version can arrive as a delta
    #: from it (ADR 0014); costs one artifact's size on disk per artifact name
    keep_delta_base: bool = True
    #: the agent's own A/B directory (self-update, ADR 0012); default: CORRAL_AGENT_ROOT, which the
    #: watchdog sets. Without either, the device refuses agent deployments
    agent_root: Path | None = None
    #: how long a new agent has to reconnect and confirm before the watchdog restores the old one
    agent_confirm_timeout: float = 300.0
    #: where update modules live (``script`` artifacts that name a module type)
    modules_dir: Path = Path("/usr/share/corral/modules")
    #: how long one update-module hook may run
    hook_timeout: float = 3600.0
    rootfs: RootfsConfig = msgspec.field(default_factory=RootfsConfig)


class RemoteConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[remote]``: terminals, port forwarding and file transfer to this device (issue 6)."""

    #: each feature can be turned off: the device then refuses such sessions
    terminal: bool = True
    forward: bool = True
    files: bool = True
    #: the terminal's shell: an absolute path, which must be listed in /etc/shells
    shell: str = "/bin/sh"
    #: run the shell as this user (the agent must run as root); default: the agent's own user
    user: str | None = None
    #: terminals open at the same time, at most
    max_sessions: int = 4
    #: seconds without input or output after which a terminal is closed
    idle_timeout: float = 900.0
    #: forward targets, ``HOST:PORT`` or ``HOST:*`` (a name, an address, a network; IPv6 in
    #: brackets); default: this device's loopback only (``localhost``, 127.0.0.0/8, ::1)
    allow: tuple[str, ...] | None = None
    #: how long connecting to a forward target may take
    connect_timeout: float = 10.0
    #: the directories files may be copied to and from (absolute); when the config is loaded, the
    #: default becomes STATE_DIR/files (without any, file transfer is refused)
    dirs: tuple[Path, ...] | None = None
    #: the largest file copied either way
    max_file_bytes: int = 64 * 1024 * 1024
    #: bytes per binary frame (terminal output, forwarded data, file contents)
    chunk_bytes: int = 32 * 1024


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    #: the Corral server (or gateway): http(s)://host[:port][/prefix]; ws(s):// also accepted
    server: str
    #: holds the device key and state; created 0700
    state_dir: Path = DEFAULT_STATE_DIR
    #: presented until the device is accepted; without one the device enrolls as ``pending``
    enroll_token: str | None = None
    #: read the token from this file instead (keeps it out of the config and the process list)
    enroll_token_file: Path | None = None
    #: TCP + TLS + WebSocket opening handshake, and separately the Corral handshake
    connect_timeout: float = 10.0
    #: how long to wait for the server's close frame when the agent closes
    close_timeout: float = 2.0
    #: no frame from the server for this many heartbeat intervals → reconnect
    heartbeat_timeout_factor: float = 2.5
    #: the largest frame accepted from the server (bytes)
    max_frame_bytes: int = 1024 * 1024
    #: "auto" (HTTPS_PROXY / ALL_PROXY / NO_PROXY from the environment), "none", or a proxy URL
    #: (http://, https://, socks5h:// with python-socks installed)
    proxy: str = "auto"
    #: permessage-deflate; off by default: frames are small and zlib state costs ~100 KiB/socket
    compression: bool = False
    #: what the ``reboot`` command runs on a real device
    reboot_command: tuple[str, ...] = ("systemctl", "reboot")
    #: replaces the detected hardware model in the inventory
    model: str | None = None
    #: extra inventory attributes (merged over the detected ones), e.g. site = "berlin"
    attributes: dict[str, AttributeValue] = {}
    backoff: BackoffConfig = msgspec.field(default_factory=BackoffConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    rules: RulesConfig = msgspec.field(default_factory=RulesConfig)
    update: UpdateConfig = msgspec.field(default_factory=UpdateConfig)
    remote: RemoteConfig = msgspec.field(default_factory=RemoteConfig)
    log_level: str = "info"

    @property
    def metrics_socket_path(self) -> Path | None:
        sock = self.telemetry.metrics_socket
        if not sock:
            return None
        return self.state_dir / "metrics.sock" if sock == "auto" else Path(sock)

    @property
    def apps_dir(self) -> Path:
        return self.update.apps_dir if self.update.apps_dir is not None else self.state_dir / "apps"

    @property
    def device_url(self) -> str:
        """The device WebSocket endpoint derived from :attr:`server`."""
        return device_ws_url(self.server)

    def token(self) -> str | None:
        """The enrollment token, reading :attr:`enroll_token_file` if that is how it is given."""
        if self.enroll_token:
            return self.enroll_token
        if self.enroll_token_file is not None:
            try:
                text = self.enroll_token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise InvalidInput(f"enroll_token_file {self.enroll_token_file}: {exc.strerror or exc}") from None
            return text or None
        return None


_LOG_LEVELS = ("debug", "info", "warning", "error")


def device_ws_url(server: str) -> str:
    """``https://host/prefix`` → ``wss://host/prefix/device/v1/connect``."""
    parts = urlsplit(server.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise InvalidInput(f"server URL {server!r} must look like https://host[:port]")
    path = parts.path.rstrip("/")
    if not path.endswith(DEVICE_CONNECT_PATH):
        path += DEVICE_CONNECT_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Path and isinstance(obj, str | Path):
        return Path(obj)
    raise ValueError(f"Expected a path string, got {type(obj).__name__}")


def _validate(cfg: AgentConfig) -> None:
    device_ws_url(cfg.server)  # raises with a clear message
    b = cfg.backoff
    checks: list[tuple[bool, str]] = [
        (cfg.connect_timeout > 0, f"connect_timeout must be > 0, got {cfg.connect_timeout}"),
        (cfg.close_timeout > 0, f"close_timeout must be > 0, got {cfg.close_timeout}"),
        (
            cfg.heartbeat_timeout_factor > 1,
            f"heartbeat_timeout_factor must be > 1, got {cfg.heartbeat_timeout_factor}",
        ),
        (cfg.max_frame_bytes >= 1024, f"max_frame_bytes must be >= 1024, got {cfg.max_frame_bytes}"),
        (len(cfg.reboot_command) > 0 and all(cfg.reboot_command), "reboot_command must not be empty"),
        (b.base > 0, f"backoff.base must be > 0, got {b.base}"),
        (b.cap >= b.base, f"backoff.cap must be >= backoff.base ({b.base}), got {b.cap}"),
        (b.reset_after >= 0, f"backoff.reset_after must be >= 0, got {b.reset_after}"),
        (cfg.log_level in _LOG_LEVELS, f"log_level must be one of {', '.join(_LOG_LEVELS)}"),
        (
            cfg.proxy in ("auto", "none") or "://" in cfg.proxy,
            f'proxy must be "auto", "none" or a proxy URL, got {cfg.proxy!r}',
        ),
        (
            cfg.enroll_token is None or cfg.enroll_token_file is None,
            "give enroll_token or enroll_token_file, not both",
        ),
        (cfg.telemetry.interval >= 0.01, f"telemetry.interval must be >= 0.01, got {cfg.telemetry.interval}"),
        (1 <= cfg.telemetry.send_window <= 1024, "telemetry.send_window must be between 1 and 1024"),
        (cfg.telemetry.spool_max_bytes >= 64 * 1024, "telemetry.spool_max_bytes must be at least 65536"),
        (cfg.telemetry.spool_max_batches >= 1, "telemetry.spool_max_batches must be at least 1"),
        (cfg.update.health_timeout > 0, f"update.health_timeout must be > 0, got {cfg.update.health_timeout}"),
        (cfg.update.health_interval > 0, f"update.health_interval must be > 0, got {cfg.update.health_interval}"),
        (cfg.update.reserve_bytes >= 0, f"update.reserve_bytes must be >= 0, got {cfg.update.reserve_bytes}"),
        (cfg.update.stop_timeout > 0, f"update.stop_timeout must be > 0, got {cfg.update.stop_timeout}"),
        (cfg.update.download_timeout > 0, f"update.download_timeout must be > 0, got {cfg.update.download_timeout}"),
        (cfg.update.agent_confirm_timeout > 0, "update.agent_confirm_timeout must be > 0"),
        (cfg.update.hook_timeout > 0, f"update.hook_timeout must be > 0, got {cfg.update.hook_timeout}"),
        (cfg.update.rootfs.boot_limit >= 1, "update.rootfs.boot_limit must be at least 1"),
        ((cfg.update.rootfs.partition_a is None) == (cfg.update.rootfs.partition_b is None),
         "update.rootfs needs both partition_a and partition_b, or neither"),
        (cfg.update.rootfs.partition_a is None or cfg.update.rootfs.partition_a != cfg.update.rootfs.partition_b,
         "update.rootfs.partition_a and partition_b must differ"),
        *_remote_checks(cfg.remote),
    ]
    numbers = {
        "connect_timeout": cfg.connect_timeout,
        "close_timeout": cfg.close_timeout,
        "heartbeat_timeout_factor": cfg.heartbeat_timeout_factor,
        "backoff.base": b.base,
        "backoff.cap": b.cap,
        "backoff.reset_after": b.reset_after,
        "telemetry.interval": cfg.telemetry.interval,
        "update.health_timeout": cfg.update.health_timeout,
        "update.health_interval": cfg.update.health_interval,
        "update.stop_timeout": cfg.update.stop_timeout,
        "update.download_timeout": cfg.update.download_timeout,
        "update.agent_confirm_timeout": cfg.update.agent_confirm_timeout,
        "update.hook_timeout": cfg.update.hook_timeout,
        "remote.idle_timeout": cfg.remote.idle_timeout,
        "remote.connect_timeout": cfg.remote.connect_timeout,
    }
    checks += [(math.isfinite(v), f"{k} must be a finite number, got {v}") for k, v in numbers.items()]
    for ok, message in checks:
        if not ok:
            raise InvalidInput(f"invalid agent config: {message}")


def _remote_checks(r: RemoteConfig) -> list[tuple[bool, str]]:
    checks = [
        (r.shell.startswith("/"), f"remote.shell must be an absolute path, got {r.shell!r}"),
        (r.user is None or (r.user != "" and r.user.strip() == r.user),
         f"remote.user must be a user name, got {r.user!r}"),
        (1 <= r.max_sessions <= 1000, f"remote.max_sessions must be between 1 and 1000, got {r.max_sessions}"),
        (r.idle_timeout > 0, f"remote.idle_timeout must be > 0, got {r.idle_timeout}"),
        (r.connect_timeout > 0, f"remote.connect_timeout must be > 0, got {r.connect_timeout}"),
        (r.max_file_bytes >= 0, f"remote.max_file_bytes must be >= 0, got {r.max_file_bytes}"),
        (1024 <= r.chunk_bytes <= 256 * 1024,  # the relay's largest message (ADR 0016)
         f"remote.chunk_bytes must be between 1024 and 262144, got {r.chunk_bytes}"),
    ]
    checks += [(d.is_absolute(), f"remote.dirs must be absolute paths, got {str(d)!r}") for d in r.dirs or ()]
    if r.allow is not None:
        # only a configured list costs the import (the agent's start-up stays without it: ADR 0007)
        from corral.core.remote import parse_allow

        for entry in r.allow:
            try:
                parse_allow(entry)
            except InvalidInput as exc:
                checks.append((False, f"remote.allow: {exc.detail}"))
    return checks


def config_from_dict(data: dict[str, Any]) -> AgentConfig:
    """Validate a mapping (as read from TOML) into an :class:`AgentConfig`."""
    if not data.get("server"):
        raise InvalidInput("no server URL: pass --server or set `server` in the config file")
    try:
        cfg = msgspec.convert(data, AgentConfig, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid agent config: {exc}") from None
    cfg = msgspec.structs.replace(cfg, log_level=cfg.log_level.lower())
    if cfg.remote.dirs is None:
        files = (cfg.state_dir / "files").absolute()
        cfg = msgspec.structs.replace(cfg, remote=msgspec.structs.replace(cfg.remote, dirs=(files,)))
    _validate(cfg)
    return cfg


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InvalidInput(f"config file {path}: not found") from None
    except OSError as exc:
        raise InvalidInput(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"config file {path}: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"config file {path}: not UTF-8 text") from None


def load_config(
    path: Path | str | None = None,
    *,
    server: str | None = None,
    enroll_token: str | None = None,
    state_dir: Path | str | None = None,
    tuf_root: Path | str | None = None,
    **overrides: Any,
) -> AgentConfig:
    """Read the TOML file (if any), let flags that were given replace its keys, validate.

    ``overrides`` are further top-level keys (``None`` values are ignored), so the CLI can
    pass every flag straight through.
    """
    data: dict[str, Any] = dict(read_config_file(Path(path))) if path is not None else {}
    flags: dict[str, Any] = {"server": server, "enroll_token": enroll_token, **overrides}
    if state_dir is not None:
        flags["state_dir"] = str(state_dir)
    if tuf_root is not None:
        data["update"] = {**data.get("update", {}), "tuf_root": str(tuf_root)}
    for key, value in flags.items():
        if value is not None:
            data[key] = value
    if data.get("enroll_token") and "enroll_token_file" in data and enroll_token is not None:
        # a token on the command line wins over a token file named in the config
        del data["enroll_token_file"]
    return config_from_dict(data)
