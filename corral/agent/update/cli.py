"""``corral tuf-client``: the command line of the TUF client, as the tuf-conformance suite calls it.

::

    corral tuf-client --metadata-dir DIR init ROOT_JSON
    corral tuf-client --metadata-dir DIR --metadata-url URL refresh
    corral tuf-client --metadata-dir DIR --metadata-url URL --target-name PATH \\
        --target-base-url URL --target-dir DIR download

Exit 0 only when the whole operation succeeded, 1 otherwise with one ``error: ...`` line on
stderr (2 for a usage error, as everywhere in the CLI). ``download`` prints the path of the
verified file. With ``CORRAL_TUF_TOKEN`` set, requests to the metadata and target origins carry
``Authorization: Bearer <token>`` (an environment variable, not an option: the agent passes the
device's credential without putting it in the process list).

``corral.cli.entry`` sends ``corral tuf-client ...`` here without loading the operator CLI, so
the process the agent starts for an update is quick to start and exits when it is done.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ENV_TOKEN = "CORRAL_TUF_TOKEN"


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral tuf-client",
                                     description="Verify and download updates with TUF (tuf-conformance client CLI).")
    parser.add_argument("--metadata-dir", type=Path, required=True, help="trusted metadata (root.json, ...)")
    parser.add_argument("--metadata-url", help="base URL of the repository's metadata")
    parser.add_argument("--target-name", help="TUF target path to download")
    parser.add_argument("--target-base-url", help="base URL of the repository's targets")
    parser.add_argument("--target-dir", type=Path, help="where verified targets are stored")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="store the trusted root (no network)")
    init.add_argument("trusted_root", type=Path, metavar="ROOT_JSON")
    commands.add_parser("refresh", help="update the trusted metadata (TUF client workflow)")
    commands.add_parser("download", help="refresh, then download and verify --target-name")
    return parser


REQUIRED = {
    "init": (),
    "refresh": ("metadata_url",),
    "download": ("metadata_url", "target_name", "target_base_url", "target_dir"),
}


def tuf_client_main(argv: list[str]) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)
    missing = [name for name in REQUIRED[args.command] if getattr(args, name) is None]
    if missing:
        parser.error(f"{args.command} needs " + ", ".join("--" + name.replace("_", "-") for name in missing))
    try:
        print_path = run(args)
    except Exception as e:  # one line, whatever failed: the caller decides by the exit status
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    if print_path is not None:
        print(print_path)
    return 0


def run(args: argparse.Namespace) -> Path | None:
    from corral.agent.update import tuf_client
    from corral.agent.update.fetcher import BearerAuth, HttpFetcher, no_auth

    if args.command == "init":
        tuf_client.init(args.metadata_dir, args.trusted_root)
        return None
    token = os.environ.get(ENV_TOKEN)
    urls = [url for url in (args.metadata_url, args.target_base_url) if url]
    fetcher = HttpFetcher(auth=BearerAuth(token, urls) if token else no_auth)
    try:
        client = tuf_client.TufClient(args.metadata_dir, args.metadata_url, fetcher)
        if args.command == "refresh":
            client.refresh()
            return None
        return client.download(args.target_name, args.target_base_url, args.target_dir)
    finally:
        fetcher.close()


def one_line(error: BaseException) -> str:
    """The error and its causes on one line (ours already name their cause)."""
    from corral.agent.update.fetcher import describe
    from corral.errors import CorralError

    line = ""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            text = f"{seen.strerror}: {seen.filename}" if seen.filename else seen.strerror
        else:
            text = describe(seen)
        if text not in line:
            line = f"{line}: {text}" if line else text
        if isinstance(seen, CorralError):
            break
        seen = seen.__cause__
    return line
