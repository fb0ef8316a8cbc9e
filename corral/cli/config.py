"""Where the CLI finds its server and token: flag, then environment, then the config file
written by ``corral login`` (``$XDG_CONFIG_HOME/corral/config.toml``, mode 0600)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from corral.errors import CorralError


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "corral" / "config.toml"


@dataclass
class CliConfig:
    server: str = ""
    token: str = ""


def load() -> CliConfig:
    path = config_path()
    if not path.exists():
        return CliConfig()
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CorralError(f"cannot read {path}: {e}") from e
    return CliConfig(server=str(doc.get("server", "")), token=str(doc.get("token", "")))


def save(cfg: CliConfig) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(tomli_w.dumps({"server": cfg.server, "token": cfg.token}))
    os.replace(tmp, path)
    return path


def resolve(server: str | None, token: str | None) -> CliConfig:
    saved = load()
    return CliConfig(
        server=(server or os.environ.get("CORRAL_SERVER") or saved.server or "").rstrip("/"),
        token=token or os.environ.get("CORRAL_TOKEN") or saved.token or "",
    )
