"""The device protocol: the shared vocabulary of server, gateway and agent (DESIGN §3).

One WebSocket per device, subprotocol ``corral.v1``. Every frame is an :class:`Envelope`
``{type, id, ts, body}`` (plus ``sid`` for multiplexed sessions). Binary frames are msgpack,
text frames JSON; both decode to the same structs, and unknown fields are ignored so that an
old agent keeps working with a newer server.

The handshake, in order::

    server → challenge {nonce, server_time}
    device → hello     {device_id, public_key, signature, agent_version, enroll_token?}
    server → welcome   {device_id, status, heartbeat_interval, session_id}    (or closes)
    device → inventory {...}            then, for the life of the socket:
    device → heartbeat {seq}            server → heartbeat_ack {seq, server_time}
    server → command   {name, args}     device → command_ack, then command_result
    server → status    {status}         (a pending device was accepted)
    device → telemetry {seq, series, events, dropped}   server → telemetry_ack {seq, ...}
    server → rules     {version, rules}                 device → rules_ack {version, refused}
    server → deploy    {deployment_id, artifact, tuf}   device → deployment_status {deployment_id, seq, ...}
                                                        server → deployment_ack {deployment_id, seq}

Deployments are at-least-once both ways: the server sends ``deploy`` again on every connect while
the device's status is not final (the agent ignores a deployment it already has a record of, and
re-sends that record's status), and the agent re-sends its last ``deployment_status`` after a
reconnect until the ``deployment_ack`` for that ``seq`` (or a later one) arrives. The server keeps
a report only if its ``seq`` is newer than the one it holds: duplicates and stale reports are
acked and ignored.

Telemetry is at-least-once (DESIGN §3): the agent spools every batch on disk under a per-device
sequence number and deletes it only after the ``telemetry_ack`` for that ``seq``; the server
ingests idempotently by (device, seq), so a batch sent twice is stored once.

The signature proves possession of the device key: Ed25519 over :func:`hello_signing_payload`,
which binds the server's one-time nonce, the protocol version and the identity claimed.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from enum import IntEnum
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import msgspec

PROTOCOL = "corral.v1"
NONCE_BYTES = 32
DEVICE_ID_HEX_CHARS = 32

AdmissionStatus = Literal["pending", "accepted", "rejected", "decommissioned"]

#: A deployment's status on one device, in the manner of AWS IoT Jobs. The server holds
#: ``queued`` until the device starts; the agent then reports ``in-progress`` with its current
#: step, and exactly one final status. ``corral.core.update_flow`` decides which, and when.
DeploymentStatus = Literal["queued", "in-progress", "succeeded", "failed", "rolled-back"]
#: The changes of status a deployment may make on one device; a final status has none.
DEPLOYMENT_STATUS_NEXT: Mapping[DeploymentStatus, frozenset[DeploymentStatus]] = MappingProxyType({
    "queued": frozenset({"in-progress", "failed"}),  # failed: cancelled before it started
    "in-progress": frozenset({"in-progress", "succeeded", "failed", "rolled-back"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "rolled-back": frozenset(),
})


class CloseCode(IntEnum):
    """WebSocket close codes the hub uses. 4xxx are ours (RFC 6455 private range)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    TOO_BIG = 1009
    SERVER_SHUTDOWN = 4000
    MALFORMED = 4400
    AUTH_FAILED = 4401  # bad signature, wrong or used-up enrollment token, unknown key
    REFUSED = 4403  # rejected or decommissioned: the agent must not retry
    TIMEOUT = 4408  # handshake or heartbeat timeout
    REPLACED = 4409  # the same device connected again elsewhere
    RATE_LIMITED = 4429


#: Close codes after which an agent must stop trying: the server will never accept this key.
PERMANENT_CLOSE_CODES = frozenset({CloseCode.REFUSED})


def device_id_for(public_key: bytes) -> str:
    """A device's ID is a stable fingerprint of its raw Ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()[:DEVICE_ID_HEX_CHARS]


def hello_signing_payload(nonce: bytes, device_id: str, public_key: bytes) -> bytes:
    """The exact bytes a device signs to answer a challenge."""
    return b"".join(
        [PROTOCOL.encode(), b"/hello\x00", nonce, b"\x00", device_id.encode(), b"\x00", public_key]
    )


# --- envelope ---------------------------------------------------------------------------------


class Envelope(msgspec.Struct, omit_defaults=True):
    type: str
    body: msgspec.Raw = msgspec.Raw(b"")
    id: str | None = None
    ts: float = 0.0
    sid: str | None = None


# --- bodies -----------------------------------------------------------------------------------


class Challenge(msgspec.Struct, omit_defaults=True):
    nonce: bytes
    server_time: float
    protocol: str = PROTOCOL


class Hello(msgspec.Struct, omit_defaults=True):
    device_id: str
    public_key: bytes
    signature: bytes
    agent_version: str = ""
    enroll_token: str | None = None


class Welcome(msgspec.Struct, omit_defaults=True):
    device_id: str
    status: AdmissionStatus
    heartbeat_interval: float
    session_id: str


class Status(msgspec.Struct, omit_defaults=True):
    status: AdmissionStatus


class Inventory(msgspec.Struct, omit_defaults=True):
    """What a device reports about itself. Every field ends up under ``attr.`` in selectors."""

    os: str = ""
    os_version: str = ""
    kernel: str = ""
    arch: str = ""
    hostname: str = ""
    agent_version: str = ""
    model: str = ""
    software: dict[str, str] = {}
    addresses: list[str] = []
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    memory_total_bytes: int | None = None
    boot_time: float | None = None
    attributes: dict[str, str | int | float | bool] = {}


class Heartbeat(msgspec.Struct, omit_defaults=True):
    seq: int = 0


class HeartbeatAck(msgspec.Struct, omit_defaults=True):
    seq: int
    server_time: float


class Command(msgspec.Struct, omit_defaults=True):
    name: str
    args: dict[str, Any] = {}


class CommandAck(msgspec.Struct, omit_defaults=True):
    pass


class CommandResult(msgspec.Struct, omit_defaults=True):
    ok: bool
    result: Any = None
    error: str | None = None


class Error(msgspec.Struct, omit_defaults=True):
    code: str
    message: str


# --- telemetry ----------------------------------------------------------------------------------

#: metric names: dot-separated segments of letters, digits and ``_`` (``cpu.percent``,
#: ``net.eth0.rx_bytes_per_s``, ``app.queue_depth``); no ``-`` so that expressions can subtract
METRIC_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
METRIC_NAME_MAX = 128


def valid_metric_name(name: str) -> bool:
    return len(name) <= METRIC_NAME_MAX and METRIC_NAME_RE.fullmatch(name) is not None


#: event severities, least to most severe
SEVERITIES = ("debug", "info", "warning", "error", "critical")
Severity = Literal["debug", "info", "warning", "error", "critical"]


class MetricSeries(msgspec.Struct, array_like=True):
    """The points of one metric in a batch, columnar: ``ts`` (epoch milliseconds) and
    ``values`` have the same length. Columnar and array-like because a batch is mostly this."""

    name: str
    ts: list[int]
    values: list[float]


class Event(msgspec.Struct, omit_defaults=True):
    """Something that happened on the device: a rule fired, a process was killed, an app said so."""

    ts: int  # epoch milliseconds
    severity: Severity
    source: str  # "rule", "allowlist", "app", "agent", ...
    message: str
    attrs: dict[str, str | int | float | bool] = {}


class Telemetry(msgspec.Struct, omit_defaults=True):
    seq: int  # per device, increasing; the idempotency key with the device id
    series: list[MetricSeries] = []
    events: list[Event] = []
    #: batches the device's spool has dropped since its state dir was created (full spool)
    dropped: int = 0


class TelemetryAck(msgspec.Struct, omit_defaults=True):
    """The batch is stored (or was already): the agent may delete it from its spool.

    ``rejected`` counts points or events the server refused (bad name, NaN, a timestamp out of
    range), with one ``reason``; they are dropped, not retried."""

    seq: int
    duplicate: bool = False
    rejected: int = 0
    reason: str = ""


class RuleSpec(msgspec.Struct, omit_defaults=True):
    """An on-device rule (DESIGN §6). ``kind`` ``threshold``: ``expr`` over local metrics, held
    ``for_s`` seconds, raises an event of ``severity`` (and one when it clears).
    ``kind`` ``allowlist``: processes whose executable matches none of ``allow`` (globs) are
    reported (``mode`` ``report``) or killed, then reported (``enforce``); ``scope`` (globs, empty =
    every process) limits which executables the allow-list watches."""

    id: str
    name: str
    kind: Literal["threshold", "allowlist"]
    expr: str = ""
    for_s: float = 0.0
    severity: Severity = "warning"
    mode: Literal["report", "enforce"] = "report"
    allow: list[str] = []
    scope: list[str] = []


class Rules(msgspec.Struct, omit_defaults=True):
    """The complete rule set for this device; replaces whatever the device had."""

    version: str
    rules: list[RuleSpec] = []


class RulesAck(msgspec.Struct, omit_defaults=True):
    version: str
    #: rule id -> why the device refused it (e.g. it would kill the agent or PID 1)
    refused: dict[str, str] = {}


class DeltaOffer(msgspec.Struct, omit_defaults=True):
    """A delta the device may download instead of the full artifact (ADR 0014): the TUF target
    ``target_name`` rebuilds the artifact from the bytes of ``base_version``, whose file has
    ``base_sha256``. A device that does not hold that file downloads the full artifact."""

    target_name: str
    base_version: str
    base_sha256: str


class Deploy(msgspec.Struct, omit_defaults=True):
    """Install an artifact (issue 4). The bytes are fetched and verified with ``corral tuf-client``
    from ``metadata_url``/``target_base_url`` (ADR 0010/0011); ``health_timeout`` (seconds), when
    set, overrides the artifact's own ``[health] timeout``; ``delta``, when the server built one
    from the version this device runs, is the cheaper way to the same verified bytes."""

    deployment_id: str
    name: str
    version: str
    kind: Literal["app", "rootfs", "script", "agent"]
    target_name: str
    metadata_url: str
    target_base_url: str
    sha256: str = ""
    size: int = 0
    health_timeout: float | None = None
    delta: DeltaOffer | None = None


class DeploymentReport(msgspec.Struct, omit_defaults=True):
    """A deployment's status on this device; ``seq`` grows with every step (ADR 0009)."""

    deployment_id: str
    seq: int
    status: DeploymentStatus
    step: str = ""
    reason: str = ""
    #: the version of the artifact's name running now ("" when none)
    running_version: str = ""
    #: how the artifact arrived: "delta" (rebuilt from the running version's bytes), "full", or
    #: "" before the download ended
    download: Literal["", "delta", "full"] = ""


class DeploymentAck(msgspec.Struct, omit_defaults=True):
    """The server holds the report of ``seq`` (or a newer one): the agent may stop re-sending it."""

    deployment_id: str
    seq: int


class SessionOpen(msgspec.Struct, omit_defaults=True):
    """Open a remote-access session (issue 6, ADR 0016): connect a WebSocket to ``relay_url``
    with ``Authorization: Bearer <token>`` (single-use, valid for seconds) and run ``kind`` over
    it. ``params``: terminal ``{cols, rows}``; forward ``{host, port}``; upload ``{path, size,
    sha256, mode}``; download ``{path}``. The device checks everything against its own ``[remote]``
    config: the server asking is necessary, not sufficient."""

    session_id: str
    kind: Literal["terminal", "forward", "upload", "download"]
    relay_url: str
    token: str
    user: str = ""
    params: dict[str, Any] = {}


class SessionRefused(msgspec.Struct, omit_defaults=True):
    """The device will not run a session (a feature turned off, a target not allowed, a limit)."""

    session_id: str
    reason: str


MessageBody = (
    Challenge | Hello | Welcome | Status | Inventory | Heartbeat | HeartbeatAck | Command | CommandAck
    | CommandResult | Error | Telemetry | TelemetryAck | Rules | RulesAck | Deploy | DeploymentReport
    | DeploymentAck | SessionOpen | SessionRefused
)

#: type name on the wire -> body struct
MESSAGE_TYPES: dict[str, type[msgspec.Struct]] = {
    "challenge": Challenge,
    "hello": Hello,
    "welcome": Welcome,
    "status": Status,
    "inventory": Inventory,
    "heartbeat": Heartbeat,
    "heartbeat_ack": HeartbeatAck,
    "command": Command,
    "command_ack": CommandAck,
    "command_result": CommandResult,
    "error": Error,
    "telemetry": Telemetry,
    "telemetry_ack": TelemetryAck,
    "rules": Rules,
    "rules_ack": RulesAck,
    "deploy": Deploy,
    "deployment_status": DeploymentReport,
    "deployment_ack": DeploymentAck,
    "session_open": SessionOpen,
    "session_refused": SessionRefused,
}
TYPE_NAMES: dict[type[msgspec.Struct], str] = {v: k for k, v in MESSAGE_TYPES.items()}

T = TypeVar("T", bound=msgspec.Struct)


class Codec:
    """Encodes and decodes frames. Binary frames are msgpack, text frames JSON.

    Decoding is two-step: the envelope first (cheap, the body stays raw), then the body into
    the struct its ``type`` names. A malformed frame raises :class:`msgspec.DecodeError` or
    :class:`msgspec.ValidationError`; callers turn that into a close.
    """

    def __init__(self) -> None:
        self._mp_env = msgspec.msgpack.Decoder(Envelope)
        self._js_env = msgspec.json.Decoder(Envelope)
        self._mp_enc = msgspec.msgpack.Encoder()
        self._js_enc = msgspec.json.Encoder()
        self._mp_bodies = {t: msgspec.msgpack.Decoder(c) for t, c in MESSAGE_TYPES.items()}
        self._js_bodies = {t: msgspec.json.Decoder(c) for t, c in MESSAGE_TYPES.items()}

    def encode(self, body: msgspec.Struct, *, id: str | None = None, sid: str | None = None,
               binary: bool = True) -> bytes:
        type_name = TYPE_NAMES[type(body)]
        enc = self._mp_enc if binary else self._js_enc
        env = Envelope(type=type_name, body=msgspec.Raw(enc.encode(body)), id=id, ts=time.time(), sid=sid)
        return enc.encode(env)

    def decode_envelope(self, frame: bytes | str) -> Envelope:
        if isinstance(frame, str):
            return self._js_env.decode(frame.encode())
        return self._mp_env.decode(frame)

    def decode_body(self, env: Envelope, binary: bool = True) -> msgspec.Struct:
        """Decode the body of a known message type; unknown types raise ValidationError."""
        table = self._mp_bodies if binary else self._js_bodies
        dec = table.get(env.type)
        if dec is None:
            raise msgspec.ValidationError(f"unknown message type {env.type!r}")
        raw = bytes(env.body) or (b"\x80" if binary else b"{}")
        result: msgspec.Struct = dec.decode(raw)
        return result

    def decode(self, frame: bytes | str) -> tuple[Envelope, msgspec.Struct]:
        env = self.decode_envelope(frame)
        return env, self.decode_body(env, binary=not isinstance(frame, str))

    def expect(self, frame: bytes | str, kind: type[T]) -> tuple[Envelope, T]:
        env, body = self.decode(frame)
        if not isinstance(body, kind):
            raise msgspec.ValidationError(f"expected {TYPE_NAMES[kind]!r}, got {env.type!r}")
        return env, body
