"""Typed server configuration: every limit and timeout in one place (DESIGN §3, §10)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from corral.core.ingest import IngestLimits
from corral.errors import InvalidInput
from corral.server.store.db import sqlite_url_for


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 1 << 20  # a device frame larger than this closes the socket (1009)
    max_tag_key_len: int = 64
    max_tag_value_len: int = 256
    max_tags_per_device: int = 64
    max_group_name_len: int = 64
    max_selector_len: int = 4096
    max_body_bytes: int = 1 << 20  # REST request bodies
    default_page_size: int = 50
    max_page_size: int = 1000
    max_inventory_bytes: int = 64 << 10
    max_command_args_bytes: int = 16 << 10
    # handshakes in progress at once; more are closed with 4429 and retry with backoff
    max_concurrent_handshakes: int = 256


@dataclass(frozen=True)
class Timeouts:
    hello: float = 10.0  # a device must answer the challenge within this
    heartbeat_interval: float = 15.0  # told to devices in `welcome`
    # a session that sent nothing for this many heartbeat intervals is closed and marked offline
    heartbeat_grace_intervals: float = 2.0
    presence_flush: float = 30.0  # how often last_seen of live sessions is written (in small chunks)
    command_default_ttl: float = 3600.0  # a queued command for an offline device expires after this
    command_wait_max: float = 60.0  # the longest a REST caller may wait for a command result
    decommission_close: float = 5.0  # the live session of a decommissioned device closes within this
    session_token_ttl: float = 60.0  # a remote-access session's single-use token is valid this long
    session_device_connect: float = 15.0  # the device must connect its end of a session within this


@dataclass(frozen=True)
class Retention:
    """How long monitoring data is kept (DESIGN §6)."""

    raw_s: float = 7 * 86400.0
    rollup_1m_s: float = 30 * 86400.0
    rollup_1h_s: float = 400 * 86400.0
    events_s: float = 30 * 86400.0


@dataclass(frozen=True)
class Monitoring:
    ingest: IngestLimits = field(default_factory=IngestLimits)
    retention: Retention = field(default_factory=Retention)
    max_series_per_device: int = 2000
    rollup_interval: float = 60.0  # how often new data is rolled up into 1-minute/1-hour buckets
    prune_interval: float = 3600.0
    alert_interval: float = 15.0  # how often server-side alerts are evaluated
    max_query_rows: int = 2_000_000  # a metrics query reading more is refused: narrow it
    max_query_series: int = 500  # result series (e.g. --by device) per query
    #: concurrent telemetry flush transactions on PostgreSQL (SQLite has one writer: always 1);
    #: while one waits on the database, the next can already be sending its rows
    postgres_flushers: int = 3


#: Testing knob: multiplies every webhook retry delay (e.g. 0.01 runs the ~24 h schedule in ~15 min).
WEBHOOK_RETRY_SCALE_ENV = "CORRAL_WEBHOOK_RETRY_SCALE"


def _webhook_retry_scale() -> float:
    raw = os.environ.get(WEBHOOK_RETRY_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        scale = float(raw)
    except ValueError:
        scale = 0.0
    if not 0 < scale < float("inf"):
        raise InvalidInput(f"{WEBHOOK_RETRY_SCALE_ENV} must be a positive number, not {raw!r}")
    return scale


@dataclass(frozen=True)
class WebhookSettings:
    """Limits and timeouts of webhook notifications (corral.server.webhooks)."""

    max_url_len: int = 2048
    max_events: int = 32  # event-type globs per webhook
    max_event_len: int = 64
    max_description_len: int = 1000
    max_in_flight: int = 8  # deliveries being sent at once, per server replica
    connect_timeout: float = 5.0
    request_timeout: float = 15.0  # one attempt, connect to last response byte read
    # a claimed attempt is not claimed again (by any replica) for this long: more than
    # request_timeout, so only a replica that died mid-attempt leaves one to be retried
    claim_lease: float = 60.0
    poll_interval: float = 5.0  # look for due deliveries at least this often (other replicas, retries)
    max_error_len: int = 500  # last_error is truncated to this
    response_excerpt_bytes: int = 200  # of a non-2xx response body, kept in last_error
    retry_scale: float = field(default_factory=_webhook_retry_scale)  # see corral.core.retry
    log_retention: float = 30 * 86400.0  # delivered and failed deliveries are deleted after this
    prune_interval: float = 3600.0

    def __post_init__(self) -> None:
        if not self.claim_lease > self.request_timeout + self.connect_timeout:
            raise ValueError("webhook claim_lease must exceed connect_timeout + request_timeout")
        if not self.retry_scale > 0:
            raise ValueError("webhook retry_scale must be > 0")


DAY = 86400.0


@dataclass(frozen=True)
class Updates:
    """The artifact store and the TUF repository (``corral.server.updates``, ADR 0011)."""

    artifact_dir: Path | None = None  # None: DATA_DIR/artifacts (shared storage with several replicas)
    max_artifact_bytes: int = 4 << 30  # an upload over this is refused with 413 and nothing is kept
    max_sbom_bytes: int = 16 << 20  # a CycloneDX/SPDX JSON document, held in memory while parsed
    max_sbom_components: int = 100_000
    # How long each role's metadata is valid after it is signed. The online roles (targets,
    # snapshot, timestamp) are re-signed by the server; root only while its key is on the server.
    root_expiry: float = 365 * DAY
    targets_expiry: float = 365 * DAY
    snapshot_expiry: float = 7 * DAY
    timestamp_expiry: float = 1 * DAY
    resign_interval: float = 3600.0  # how often the job looks for metadata close to its expiry
    # a role is re-signed once less than this fraction of its validity period remains
    resign_margin: float = 0.5
    # superseded versions of N.targets.json / N.snapshot.json kept for clients in mid-refresh
    keep_versions: int = 16
    # When a deployment is created, build a delta from each version its devices run (ADR 0014);
    # a delta over delta_max_ratio of the full artifact is not published
    build_deltas: bool = True
    delta_max_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.resign_margin < 1:
            raise ValueError("updates resign_margin must be between 0 and 1")
        if self.resign_interval >= self.timestamp_expiry * self.resign_margin:
            raise ValueError("updates resign_interval must be shorter than the timestamp's re-sign margin")
        if not 0 < self.delta_max_ratio <= 1:
            raise ValueError("updates delta_max_ratio must be in (0, 1]")
        if self.keep_versions < 1 or self.max_artifact_bytes < 1:
            raise ValueError("updates keep_versions and max_artifact_bytes must be positive")


@dataclass(frozen=True)
class Rollouts:
    """The rollout engine (``corral.server.updates.rollout_engine``, ADR 0015)."""

    interval: float = 1.0  # every open rollout is stepped at least this often
    min_gap: float = 0.2  # and at most this often when a device report kicks the engine
    health_every: float = 5.0  # how often a health gate's metrics are read
    health_step_ms: int = 10_000  # the buckets of a device's mean

    def __post_init__(self) -> None:
        if not (self.interval > 0 and self.min_gap >= 0 and self.health_every > 0 and self.health_step_ms >= 1000):
            raise ValueError("rollouts interval and health_every must be > 0, min_gap >= 0, health_step_ms >= 1000")


@dataclass(frozen=True)
class RemoteAccess:
    """The relay of remote-access sessions (``corral.server.relay_worker``, ADR 0016)."""

    # The relay worker's niceness above the server's: when both want a core, devices' telemetry
    # and the API go first and bulk bytes wait (0 to treat them alike).
    relay_nice: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.relay_nice <= 19:
            raise ValueError("remote relay_nice must be in 0..19")


@dataclass(frozen=True)
class WebProxy:
    """The device web-UI proxy's limits and timeouts (``corral.server.proxy``, ADR 0018)."""

    #: an idle upstream connection is kept this long for the next request of the same grant
    idle_seconds: float = 15.0
    #: idle upstream connections kept per grant (a browser opens about six per host)
    max_idle: int = 6
    #: a grant (its capability URL) unused this long is forgotten: open the page from the console again
    grant_idle_seconds: float = 30 * 60
    #: and at the latest this long after it was made
    grant_max_seconds: float = 12 * 3600
    #: the largest WebSocket message relayed either way (a larger one closes with 1009)
    max_ws_message: int = 4 << 20
    #: the device's connection and the app's answer to a WebSocket upgrade, at most
    ws_handshake_seconds: float = 30.0
    #: cookies the device may keep per grant, and their size each
    max_cookies: int = 50
    max_cookie_bytes: int = 4096


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path = Path("corral-data")
    host: str = "127.0.0.1"
    port: int = 8080
    db_url: str = ""  # empty: SQLite under data_dir
    bus_url: str = ""  # empty: in-process bus
    # Without an enrollment token, an unknown device waits in `pending` for an operator.
    # Set False to refuse tokenless devices outright (nothing is recorded for them).
    allow_pending: bool = True
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    monitoring: Monitoring = field(default_factory=Monitoring)
    updates: Updates = field(default_factory=Updates)
    rollouts: Rollouts = field(default_factory=Rollouts)
    remote: RemoteAccess = field(default_factory=RemoteAccess)
    proxy: WebProxy = field(default_factory=WebProxy)

    @property
    def artifact_dir(self) -> Path:
        return self.updates.artifact_dir or self.data_dir / "artifacts"

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url_for(self.data_dir)

    @property
    def public_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"
