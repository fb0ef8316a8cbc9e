"""The ``corral`` console script: the agent and its TUF client get lean paths, everything else the
full CLI."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        from corral.agent.cli import agent_main

        sys.exit(agent_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "tuf-client":
        from corral.agent.update.cli import tuf_client_main

        sys.exit(tuf_client_main(sys.argv[2:]))
    from corral.cli.main import main as cli_main

    cli_main()
