"""The relational schema (SQLAlchemy 2). SQLite by default, PostgreSQL at scale.

Times are stored as float epoch seconds: portable across both engines, cheap to compare and
index, and rendered to ISO 8601 only at the API edge. Schema changes go through alembic
(``migrations/``); ``metadata`` here is what autogenerate compares against.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    # pending | accepted | rejected | decommissioned (DESIGN §2)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[float] = mapped_column(Double, index=True)
    updated_at: Mapped[float] = mapped_column(Double)
    admitted_at: Mapped[float | None] = mapped_column(Double)
    # no index: a boolean that is true for most devices makes SQLite pick it over the id order
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[float | None] = mapped_column(Double, index=True)
    # which server replica holds the live session (multi-replica presence)
    replica: Mapped[str | None] = mapped_column(String(64))
    inventory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    inventory_at: Mapped[float | None] = mapped_column(Double)
    enrollment_token_id: Mapped[str | None] = mapped_column(String(32))


class DeviceTag(Base):
    """Operator tags, one row per key: indexable by (key, value) for selector push-down."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))

    __table_args__ = (Index("ix_device_tags_key_value", "key", "value", "device_id"),)


class Group(Base):
    """A static group (explicit members) or a dynamic one (``selector`` is set)."""

    __tablename__ = "groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    selector: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Double)


class GroupMember(Base):
    __tablename__ = "group_members"

    group_name: Mapped[str] = mapped_column(
        String(64), ForeignKey("groups.name", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    groups: Mapped[list[Any]] = mapped_column(JSON, default=list)
    expires_at: Mapped[float | None] = mapped_column(Double)
    max_uses: Mapped[int | None] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Double)
    created_by: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | operator | viewer
    password_hash: Mapped[str | None] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    #: may open terminals, forwards and file transfers on devices (operators; admins always may)
    remote_access: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[float] = mapped_column(Double)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float | None] = mapped_column(Double)
    last_used_at: Mapped[float | None] = mapped_column(Double)


class AuditEntry(Base):
    """One link of the hash chain: ``hash = HMAC(key, prev_hash || canonical(entry))``."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[float] = mapped_column(Double, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(256), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    request_id: Mapped[str] = mapped_column(String(64), default="")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class Meta(Base):
    """Small key/value facts about this installation (audit chain head, ...)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class DeviceCommand(Base):
    __tablename__ = "device_commands"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("devices.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(64))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # queued -> sent -> acknowledged -> succeeded | failed ; queued|sent -> expired
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(64))


# --- monitoring (DESIGN §6) ---------------------------------------------------------------------
#
# Time series are stored the way a TSDB does it, in plain tables: a *series* is one metric of
# one device (a small integer id), and a point is (series, ts, value) with ts in epoch
# milliseconds. The point tables are clustered by (series, ts) -- WITHOUT ROWID on SQLite -- so
# a device's metric over a time range is one index range, and retention deletes per series.

_NO_ROWID = {"sqlite_with_rowid": False}


class MetricName(Base):
    __tablename__ = "metric_names"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(32), ForeignKey("devices.id", ondelete="CASCADE"))
    metric_id: Mapped[int] = mapped_column(Integer, ForeignKey("metric_names.id", ondelete="CASCADE"), index=True)

    __table_args__ = (Index("ix_series_device_metric", "device_id", "metric_id", unique=True),)


class Point(Base):
    """A raw point. No foreign key: retention and device deletion clean up by series.

    Clustered by (minute, series, ts), not (series, ts): a flush's points then land in the
    current minute's pages instead of one page per series, so ingestion does not slow down as
    history grows; one series' range is one index seek per minute (ADR 0006)."""

    __tablename__ = "points"

    #: ``ts // 60000``: the minute the point is in
    minute: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    series_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    value: Mapped[float] = mapped_column(Double)

    __table_args__ = (_NO_ROWID,)


class _Rollup:
    """count/sum/min/max of a series over one bucket (``bucket`` = its start, epoch ms)."""

    series_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column(Integer)
    sum: Mapped[float] = mapped_column(Double)
    min: Mapped[float] = mapped_column(Double)
    max: Mapped[float] = mapped_column(Double)


class Rollup1m(_Rollup, Base):
    __tablename__ = "rollup_1m"
    __table_args__ = (_NO_ROWID,)


class Rollup1h(_Rollup, Base):
    __tablename__ = "rollup_1h"
    __table_args__ = (_NO_ROWID,)


class TelemetryBatch(Base):
    """Receipt of one telemetry batch: the idempotency key (device, seq), and the time range it
    touched, which tells the rollup job which buckets to (re)compute -- late backfill included."""

    __tablename__ = "telemetry_batches"

    device_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    received_at: Mapped[float] = mapped_column(Double, index=True)
    min_ts: Mapped[int | None] = mapped_column(BigInteger)
    max_ts: Mapped[int | None] = mapped_column(BigInteger)
    points: Mapped[int] = mapped_column(Integer, default=0)
    events: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)


class DeviceTelemetry(Base):
    """Per-device telemetry facts that change rarely (the spool's drop counter)."""

    __tablename__ = "device_telemetry"

    device_id: Mapped[str] = mapped_column(String(32), ForeignKey("devices.id", ondelete="CASCADE"),
                                           primary_key=True)
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[float] = mapped_column(Double)


class DeviceEvent(Base):
    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(32), ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[int] = mapped_column(BigInteger, index=True)
    severity: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    attrs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[float] = mapped_column(Double)

    __table_args__ = (Index("ix_device_events_device_ts", "device_id", "ts"),)


class DeviceRule(Base):
    """An on-device rule and the devices it goes to (``selector``); see ``protocol.RuleSpec``."""

    __tablename__ = "device_rules"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # threshold | allowlist
    selector: Mapped[str] = mapped_column(Text, default="")
    expr: Mapped[str] = mapped_column(Text, default="")
    for_s: Mapped[float] = mapped_column(Double, default=0.0)
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    mode: Mapped[str] = mapped_column(String(16), default="report")
    allow: Mapped[list[Any]] = mapped_column(JSON, default=list)
    scope: Mapped[list[Any]] = mapped_column(JSON, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    created_by: Mapped[str] = mapped_column(String(64))


class DeviceRuleStatus(Base):
    """Which rule-set version a device has confirmed, and the rules it refused."""

    __tablename__ = "device_rule_status"

    device_id: Mapped[str] = mapped_column(String(32), ForeignKey("devices.id", ondelete="CASCADE"),
                                           primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    refused: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    acked_at: Mapped[float] = mapped_column(Double)


class Alert(Base):
    """A server-side alert rule. ``kind``: ``threshold`` (an aggregate expression over the
    devices ``selector`` picks, optionally per value of tag ``by_tag``), ``offline`` (a device
    offline longer than ``for_s``), ``event_rate`` (events at or above a severity in a window)."""

    __tablename__ = "alerts"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    selector: Mapped[str] = mapped_column(Text, default="")
    expr: Mapped[str] = mapped_column(Text, default="")
    by_tag: Mapped[str | None] = mapped_column(String(64))
    for_s: Mapped[float] = mapped_column(Double, default=0.0)
    window_s: Mapped[float] = mapped_column(Double, default=300.0)
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    created_by: Mapped[str] = mapped_column(String(64))


class AlertInstance(Base):
    """The state of one alert for one ``key`` (``""``, a tag value, or a device id)."""

    __tablename__ = "alert_instances"

    alert_id: Mapped[str] = mapped_column(String(16), ForeignKey("alerts.id", ondelete="CASCADE"),
                                          primary_key=True)
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # inactive | pending | firing
    since: Mapped[float] = mapped_column(Double)
    value: Mapped[float | None] = mapped_column(Double)
    fired_at: Mapped[float | None] = mapped_column(Double)
    resolved_at: Mapped[float | None] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)


class Webhook(Base):
    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[Any]] = mapped_column(JSON, default=list)  # event-type globs
    secret: Mapped[str] = mapped_column(String(128))  # whsec_<base64>
    description: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Double)
    created_by: Mapped[str] = mapped_column(String(64))


class WebhookDelivery(Base):
    """One message to one webhook and its delivery attempts (the delivery log)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the webhook-id header: msg_...
    webhook_id: Mapped[str] = mapped_column(String(16), ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Double)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Double)
    delivered_at: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook", "webhook_id", "created_at"),
    )


# --- updates: artifact store and TUF repository (corral.server.updates, ADR 0011) ---------------


class Artifact(Base):
    """An uploaded artifact. Its bytes live in the artifact folder under their sha256
    (content-addressed: two artifacts with the same bytes share a file); ``target_path`` is its
    TUF target name, ``NAME/VERSION/FILENAME``."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), index=True)  # app | rootfs | script | agent
    hardware: Mapped[list[Any]] = mapped_column(JSON, default=list)  # compatible device models
    filename: Mapped[str] = mapped_column(String(128))
    target_path: Mapped[str] = mapped_column(String(300), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    # build provenance
    git_commit: Mapped[str | None] = mapped_column(String(64))
    build_url: Mapped[str | None] = mapped_column(Text)
    build_time: Mapped[float | None] = mapped_column(Double)
    sbom_format: Mapped[str | None] = mapped_column(String(64))  # e.g. "CycloneDX 1.5", "SPDX-2.3"
    created_at: Mapped[float] = mapped_column(Double)
    created_by: Mapped[str] = mapped_column(String(64))

    __table_args__ = (UniqueConstraint("name", "version", name="uq_artifacts_name_version"),)


class ArtifactComponent(Base):
    """One component (package) of an artifact's SBOM; ``key`` is the lower-cased name, indexed
    for "which artifacts contain X"."""

    __tablename__ = "artifact_components"

    artifact_id: Mapped[int] = mapped_column(Integer, ForeignKey("artifacts.id", ondelete="CASCADE"),
                                             primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(String(256), index=True)
    name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str | None] = mapped_column(String(128))
    purl: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str | None] = mapped_column(String(32))


class TufMetadata(Base):
    """Signed TUF metadata, every kept version of every role, as served (``data`` is the JSON).
    In the database so that every server replica serves the same repository and a new version
    is published in the same transaction as the artifact rows it describes."""

    __tablename__ = "tuf_metadata"

    role: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    expires: Mapped[float] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)


# --- deployments (issue 4) ---------------------------------------------------------------------


class Deployment(Base):
    """An artifact deployed to a list of devices. ``status`` is ``queued`` until a device reports,
    then ``in-progress``; the summary the API shows (``succeeded`` when all did, ``failed`` when
    some failed or rolled back) is computed from the devices' statuses when read. The TUF URLs
    are the ones the operator's request reached the server by, and go to the devices as they are."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    artifact_id: Mapped[int] = mapped_column(Integer, ForeignKey("artifacts.id", ondelete="RESTRICT"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    metadata_url: Mapped[str] = mapped_column(Text)
    target_base_url: Mapped[str] = mapped_column(Text)
    health_timeout: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double, index=True)
    created_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[float] = mapped_column(Double)


class DeploymentDevice(Base):
    """One device's part of a deployment, as the device last reported it (``seq`` is the
    report's; a report with a ``seq`` not above it is stale and ignored)."""

    __tablename__ = "deployment_devices"

    deployment_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True)
    status: Mapped[str] = mapped_column(String(16))
    step: Mapped[str] = mapped_column(String(32), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    seq: Mapped[int] = mapped_column(Integer, default=0)
    running_version: Mapped[str] = mapped_column(String(64), default="")
    #: "delta", "full", or "" before the device's download ended
    download: Mapped[str] = mapped_column(String(8), default="", server_default="")
    #: a rollout tries a failed device again as attempt 2, 3...: the device sees the deployment id
    #: ``ID.N`` (a new deployment to it), and a report of an earlier attempt is ignored
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    updated_at: Mapped[float] = mapped_column(Double)


class Rollout(Base):
    """A staged rollout of an artifact to the devices a selector matches (ADR 0015). The devices'
    install statuses live in its deployment (``deployment_id``); what the planner needs besides
    (wave, attempts, schedule) in :class:`RolloutDevice`. ``spec`` is the request as given
    (waves, gates, pacing, seed, canary, include_new)."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(String(32), ForeignKey("deployments.id", ondelete="RESTRICT"),
                                               index=True)
    selector: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: running, paused, completed or aborted
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    #: the cumulative device count at the end of each wave
    sizes: Mapped[list[Any]] = mapped_column(JSON)
    #: the install gate's acknowledged (finished, failed) per wave, set by resume
    acknowledged: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: the health gate's last baseline median
    baseline: Mapped[float | None] = mapped_column(Double)
    #: deltas built and the rollout ready for the engine (set once after creation)
    prepared: Mapped[bool] = mapped_column(Boolean, default=False)
    #: over, and no device of it still installing or reverting: the engine leaves it alone
    settled: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[float] = mapped_column(Double, index=True)
    created_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[float] = mapped_column(Double)


class RolloutDevice(Base):
    """One device's part of a rollout, as the planner sees it (``corral.core.rollout_plan``)."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(String(32), ForeignKey("rollouts.id", ondelete="CASCADE"),
                                            primary_key=True)
    device_id: Mapped[str] = mapped_column(String(32), ForeignKey("devices.id", ondelete="CASCADE"),
                                           primary_key=True, index=True)
    #: the place in the rollout's seeded order; the wave follows from it
    position: Mapped[int] = mapped_column(Integer)
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[float | None] = mapped_column(Double)
    started_at: Mapped[float | None] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)
    reason: Mapped[str] = mapped_column(Text, default="")
    #: the version of the artifact's name the device ran when it was told (what a revert installs)
    previous_version: Mapped[str] = mapped_column(String(64), default="")
    #: the deployment that takes it back to previous_version, once reverting
    revert_deployment_id: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (Index("ix_rollout_devices_rollout_position", "rollout_id", "position"),)


class RemoteSession(Base):
    """A remote-access session (ADR 0016): who opened what on which device, when, how many bytes,
    how it ended. Kept after the device is gone (no foreign key): it is the audit trail."""

    __tablename__ = "remote_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(32), index=True)
    user_id: Mapped[int] = mapped_column(Integer)
    user_name: Mapped[str] = mapped_column(String(64))
    #: terminal, forward, upload or download
    kind: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: the operator's single-use token and the device's, as SHA-256 digests
    token_hash: Mapped[str] = mapped_column(String(64))
    device_token_hash: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Double)
    #: pending (token issued), connecting (token used), open, then closed, refused or ended
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    replica: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[float] = mapped_column(Double, index=True)
    opened_at: Mapped[float | None] = mapped_column(Double)
    closed_at: Mapped[float | None] = mapped_column(Double)
    bytes_to_device: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_from_device: Mapped[int] = mapped_column(BigInteger, default=0)
    #: the asciicast v2 file of a terminal session, under DATA_DIR/recordings
    recording: Mapped[str | None] = mapped_column(String(64))
