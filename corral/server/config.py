"""Typed server configuration: every limit and timeout in one place (DESIGN §3, §10)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

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

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url_for(self.data_dir)

    @property
    def public_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"
