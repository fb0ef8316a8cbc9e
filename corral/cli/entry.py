"""The ``corral`` console script: the agent gets a lean path, everything else the full CLI."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        from corral.agent.cli import agent_main

        sys.exit(agent_main(sys.argv[2:]))
    from corral.cli.main import main as cli_main

    cli_main()
