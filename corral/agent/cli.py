"""``corral agent`` without the rest of the CLI.

The agent runs for months on devices with little memory, so its command line never imports the
operator CLI's stack (typer, click, rich, httpx): that alone is about a fifth of an idle agent's
memory. ``corral.cli.entry`` sends ``corral agent ...`` here; the options are the ones DESIGN §8
lists, and ``corral agent --help`` documents them.

argparse is the authority on the command line, but it costs every agent ~0.4 MB of RSS for as
long as it runs (ADR 0007), to parse four options once. So :func:`parse_args` reads a command
line with the standard library's small ``getopt`` when argparse would accept it as it is (known
options, each with its value, a unique prefix of one, ``--opt=value``), and hands anything else
to argparse (``--help``, an unknown, ambiguous or incomplete option, an extra argument, ``--``, a
value that looks like an option): its usage, messages and exit status (2) are the user's answer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

#: (flag, destination, help, type) of every option
OPTIONS: tuple[tuple[str, str, str, Callable[[str], Any]], ...] = (
    ("--server", "server", "server URL", str),
    ("--enroll-token", "enroll_token", "enrollment token", str),
    ("--state-dir", "state_dir", "key and state (0700)", Path),
    ("--config", "config_file", "TOML config file", Path),
    ("--tuf-root", "tuf_root", "the trusted TUF root.json ([update] tuf_root)", Path),
)


def argument_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog="corral agent", description="Run the device agent.")
    for flag, dest, text, kind in OPTIONS:
        parser.add_argument(flag, dest=dest, type=kind, help=text)
    return parser


def parse_args(argv: list[str]) -> dict[str, Any]:
    """The options of ``argv`` by destination (``None`` when absent), as argparse would give
    them; a usage error exits 2 with argparse's message, as everywhere in the CLI."""
    import getopt

    try:
        opts, rest = getopt.getopt(argv, "", [flag[2:] + "=" for flag, *_ in OPTIONS])
    except getopt.GetoptError:
        opts, rest = [], argv
    if rest or "--" in argv or any(value.startswith("-") for _, value in opts):
        return vars(argument_parser().parse_args(argv))
    by_flag = {flag: (dest, kind) for flag, dest, _, kind in OPTIONS}
    args: dict[str, Any] = {dest: None for _, dest, _, _ in OPTIONS}
    for flag, value in opts:  # the last one wins, as in argparse
        dest, kind = by_flag[flag]
        args[dest] = kind(value)
    return args


def agent_main(argv: list[str]) -> int:
    args = parse_args(argv)
    from corral.agent.main import main_agent

    return main_agent(server=args["server"], enroll_token=args["enroll_token"], state_dir=args["state_dir"],
                      config_file=args["config_file"], tuf_root=args["tuf_root"])
