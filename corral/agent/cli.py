"""``corral agent`` without the rest of the CLI.

The agent runs for months on devices with little memory, so its command line is parsed with
argparse and never imports the operator CLI's stack (typer, click, rich, httpx): that alone is
about a fifth of an idle agent's memory. ``corral.cli.entry`` sends ``corral agent ...`` here;
the options are the same as DESIGN §8 lists, and ``corral agent --help`` documents them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def agent_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="corral agent", description="Run the device agent.")
    parser.add_argument("--server", help="server URL")
    parser.add_argument("--enroll-token", help="enrollment token")
    parser.add_argument("--state-dir", type=Path, help="key and state (0700)")
    parser.add_argument("--config", type=Path, dest="config_file", help="TOML config file")
    args = parser.parse_args(argv)  # a usage error exits 2, as everywhere in the CLI
    from corral.agent.main import main_agent

    return main_agent(server=args.server, enroll_token=args.enroll_token, state_dir=args.state_dir,
                      config_file=args.config_file)
