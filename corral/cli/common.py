"""What every CLI command module shares: the connection options and an authenticated client."""

from __future__ import annotations

from typing import Annotated

import typer

from corral.cli import config as cli_config
from corral.cli.client import Client
from corral.errors import CorralError, InvalidInput

ServerOpt = Annotated[str | None, typer.Option("--server", help="server URL [env CORRAL_SERVER]")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="API token [env CORRAL_TOKEN]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document")]


def client(server: str | None, token: str | None) -> Client:
    cfg = cli_config.resolve(server, token)
    if not cfg.token:
        raise CorralError("not logged in: run 'corral login --server URL --user NAME' or pass --token")
    return Client(cfg.server, cfg.token)


def parse_kv(items: list[str], what: str = "tag") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InvalidInput(f"{what} must be KEY=VALUE, not {item!r}")
        out[k] = v
    return out
