"""Remote access, the pure parts: what a session may reach, and how it is recorded (issue 6).

- :func:`parse_forward` reads ``corral forward``'s ``[BIND:]LPORT:HOST:RPORT``.
- :class:`TargetPolicy` is the agent's allow-list of forward targets (default: this device's
  loopback only) — checked on the device, whatever the server asked for.
- :func:`resolve_allowed` is the agent's check of a file-transfer path: absolute, inside one of
  the allowed directories once symlinks and ``..`` are resolved.
- :class:`Asciicast` writes a terminal session in asciicast v2 (a JSON header line, then one
  ``[time, "o" | "i" | "r", data]`` line per event), the format asciinema plays back.
"""

from __future__ import annotations

import codecs
import ipaddress
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from corral.errors import InvalidInput

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True)
class Forward:
    bind: str
    local_port: int
    host: str
    remote_port: int


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidInput(f"{what} must be a port number (1-65535), not {text!r}")
    return int(text)


def parse_forward(spec: str) -> Forward:
    """``LPORT:HOST:RPORT`` or ``BIND:LPORT:HOST:RPORT`` (an IPv6 host in brackets: ``[::1]``)."""
    parts: list[str] = []
    rest = spec
    while rest:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise InvalidInput(f"forward {spec!r}: unclosed [")
            parts.append(rest[1:end])
            rest = rest[end + 1:]
            if rest and not rest.startswith(":"):
                raise InvalidInput(f"forward {spec!r}: ':' expected after ]")
            rest = rest[1:]
        else:
            head, sep, rest = rest.partition(":")
            parts.append(head)
            if not sep:
                break
    if len(parts) == 3:
        parts.insert(0, "127.0.0.1")
    if len(parts) != 4 or not parts[0] or not parts[2]:
        raise InvalidInput(f"forward must be [BIND:]LPORT:HOST:RPORT (e.g. 8080:localhost:80), not {spec!r}")
    return Forward(parts[0], _port(parts[1], "the local port"), parts[2], _port(parts[3], "the remote port"))


@dataclass(frozen=True)
class TargetPolicy:
    """Which ``host:port`` a forward may reach from the device. Each ``allow`` entry is
    ``HOST:PORT`` or ``HOST:*``, where HOST is a name, an IPv4 address or network (``10.0.0.0/8``)
    or an IPv6 one in brackets (``[::1]``, ``[fd00::/8]``). The default: the loopback only."""

    allow: tuple[str, ...] = ("localhost:*", "127.0.0.0/8:*", "[::1]:*")

    def __post_init__(self) -> None:
        for entry in self.allow:
            parse_allow(entry)

    def allows(self, host: str, port: int) -> bool:
        return any(_host_matches(host, h) and p in ("*", str(port)) for h, p in map(parse_allow, self.allow))


def parse_allow(entry: str) -> tuple[str, str]:
    """``(host, port or "*")`` of an allow-list entry; :class:`InvalidInput` for a bad one."""
    if entry.startswith("["):
        host, sep, port = entry[1:].partition("]:")
    else:
        host, sep, port = entry.rpartition(":")
    if not sep or not host or not (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
        raise InvalidInput(f"forward target {entry!r} must be HOST:PORT or HOST:* (IPv6 in brackets)")
    if "/" in host:
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise InvalidInput(f"forward target {entry!r}: {host!r} is not a network") from None
    return host.lower(), port


def _host_matches(host: str, want: str) -> bool:
    h = host.strip("[]").lower()
    if "/" in want:
        try:
            return ipaddress.ip_address(h) in ipaddress.ip_network(want, strict=False)
        except ValueError:  # a name: only "localhost" is known to be on the loopback
            return h in LOOPBACK_NAMES and ipaddress.ip_network(want, strict=False).is_loopback
    if want in LOOPBACK_NAMES:
        return h in LOOPBACK_NAMES
    return h == want


def resolve_allowed(path: str, allowed: Sequence[Path]) -> Path:
    """The real path ``path`` names, if it is absolute and inside one of ``allowed`` (after
    resolving ``..`` and symlinks, so a link cannot lead out); :class:`InvalidInput` otherwise.
    The file itself need not exist (an upload's target)."""
    if not path or "\x00" in path:
        raise InvalidInput("a path is required")
    p = Path(path)
    if not p.is_absolute():
        raise InvalidInput(f"{path!r} is not an absolute path")
    real = Path(os.path.realpath(p))
    for root in allowed:
        r = Path(os.path.realpath(root))
        if real == r or r in real.parents:
            return real
    roots = ", ".join(str(a) for a in allowed) or "none"
    raise InvalidInput(f"{path!r} is outside the directories this device allows for file transfer ({roots})")


@dataclass
class Asciicast:
    """An asciicast v2 recording being written (one session; ``out`` a text file)."""

    out: IO[str]
    width: int
    height: int
    started: float
    env: dict[str, str] = field(default_factory=dict)
    title: str = ""
    #: output arrives in chunks that may split a UTF-8 character: decoded across chunks
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"), repr=False)

    def header(self) -> None:
        doc: dict[str, object] = {"version": 2, "width": self.width, "height": self.height,
                                  "timestamp": int(self.started)}
        if self.title:
            doc["title"] = self.title
        if self.env:
            doc["env"] = self.env
        self.out.write(json.dumps(doc) + "\n")

    def event(self, at: float, kind: str, data: str) -> None:
        self.out.write(json.dumps([round(at - self.started, 6), kind, data]) + "\n")

    def output(self, at: float, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self.event(at, "o", text)

    def resize(self, at: float, cols: int, rows: int) -> None:
        self.event(at, "r", f"{cols}x{rows}")


def read_asciicast(lines: Iterable[str]) -> tuple[dict[str, object], list[list[object]]]:
    """The header and events of a recording (for playback and tests)."""
    it = iter(lines)
    header = json.loads(next(it))
    if not isinstance(header, dict) or header.get("version") != 2:
        raise InvalidInput("not an asciicast v2 recording")
    return header, [json.loads(line) for line in it if line.strip()]
