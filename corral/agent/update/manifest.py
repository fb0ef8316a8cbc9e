"""``corral-app.toml``, an app bundle's manifest (DESIGN §4, a stable contract), read strictly.

A key the contract does not name, a wrong type, an empty value, a name that is not a plain
directory name or a timeout that is not a duration is refused (:class:`ArtifactRefused`) with a
message that says which. Separate from :mod:`.bundle` because the app supervisor reads the
active slot's manifest at every agent start, without the archive code (``tarfile``, ``zstandard``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.agent.update.installers import ArtifactRefused
from corral.core.durations import parse_duration
from corral.errors import InvalidInput

MANIFEST = "corral-app.toml"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RunSpec:
    command: str


@dataclass(frozen=True)
class HealthSpec:
    command: str | None
    http: str | None
    timeout: float | None  # None: the update limits' health_timeout


@dataclass(frozen=True)
class AppManifest:
    name: str
    version: str
    run: RunSpec | None
    health: HealthSpec | None


def _table(data: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ArtifactRefused(f"{MANIFEST}: unknown key {where}{unknown[0]!r} "
                              f"(allowed: {', '.join(sorted(allowed))})")


def _text(data: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise ArtifactRefused(f"{MANIFEST}: {where}{key} is missing")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ArtifactRefused(f"{MANIFEST}: {where}{key} must be a non-empty string, not {value!r}")
    if any(ord(c) < 32 for c in value):
        raise ArtifactRefused(f"{MANIFEST}: {where}{key} must not contain control characters")
    return value


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is not None and not isinstance(value, dict):
        raise ArtifactRefused(f"{MANIFEST}: [{key}] must be a table")
    return value


def parse_manifest(text: bytes) -> AppManifest:
    """The manifest in ``text``; :class:`ArtifactRefused` says what is wrong with a bad one."""
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactRefused(f"{MANIFEST}: not UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ArtifactRefused(f"{MANIFEST}: not valid TOML: {e}") from None
    _table(data, "", {"name", "version", "run", "health"})
    name = _text(data, "name", "", required=True)
    assert name is not None
    if not _NAME.fullmatch(name):
        raise ArtifactRefused(f"{MANIFEST}: name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    version = _text(data, "version", "", required=True)
    assert version is not None
    if len(version) > 128:
        raise ArtifactRefused(f"{MANIFEST}: version is longer than 128 characters")
    run = None
    if (section := _section(data, "run")) is not None:
        _table(section, "run.", {"command"})
        command = _text(section, "command", "run.", required=True)
        assert command is not None
        run = RunSpec(command)
    health = None
    if (section := _section(data, "health")) is not None:
        _table(section, "health.", {"command", "http", "timeout"})
        http = _text(section, "http", "health.")
        if http is not None and not http.startswith("http://"):
            raise ArtifactRefused(f"{MANIFEST}: health.http must be an http:// URL, not {http!r}")
        check = _text(section, "command", "health.")
        if check is None and http is None:
            raise ArtifactRefused(f"{MANIFEST}: [health] needs a command or an http URL")
        timeout_text = _text(section, "timeout", "health.")
        try:
            timeout = parse_duration(timeout_text) if timeout_text is not None else None
        except InvalidInput as e:
            raise ArtifactRefused(f"{MANIFEST}: health.timeout: {e.detail}") from None
        health = HealthSpec(check, http, timeout)
    return AppManifest(name, version, run, health)


def read_manifest(slot_dir: Path) -> AppManifest:
    """The manifest of an extracted bundle (a slot directory)."""
    try:
        return parse_manifest((slot_dir / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise ArtifactRefused(f"{slot_dir}: no {MANIFEST} (an empty slot?)") from None
