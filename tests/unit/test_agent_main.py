"""main_agent: the process the CLI runs — config errors, signals, exit codes."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from corral import protocol
from corral.agent import cli
from corral.agent.main import main_agent
from tests.unit.test_agent_connection import GUARD, FakeHub

ROOT = Path(__file__).resolve().parents[2]


def test_invalid_config_is_exit_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_agent(config_file=tmp_path / "missing.toml", server="https://x") == 1
    assert main_agent(server="ftp://x") == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: config file {tmp_path / 'missing.toml'}: not found",
        "error: server URL 'ftp://x' must look like https://host[:port]",
    ]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_real_agent_process_stops_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('enroll_token = "good-token"\nproxy = "none"\n[attributes]\nsite = "lab"\n')

    async def scenario() -> tuple[int, str]:
        async with FakeHub() as hub:
            code = (
                "import sys; from corral.agent.main import main_agent; "
                f"sys.exit(main_agent(config_file={str(config)!r}, server={hub.url!r}, "
                f"state_dir={str(tmp_path / 'state')!r}))"
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, cwd=ROOT, stderr=asyncio.subprocess.PIPE
            )
            try:
                _, _, _, inv = await hub.next("inventory")
                assert inv.attributes["site"] == "lab"
                assert inv.agent_version  # a real LinuxPlatform inventory
                proc.send_signal(sig)
                _, err = await asyncio.wait_for(proc.communicate(), GUARD)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            _, _, _, close_code = await hub.next("closed")
            assert close_code == protocol.CloseCode.GOING_AWAY
            assert proc.returncode is not None
            return proc.returncode, err.decode()

    rc, err = asyncio.run(scenario())
    assert rc == 0, err
    assert "Traceback" not in err


def test_the_agent_process_leaves_out_what_it_does_not_need() -> None:
    """ADR 0007: every module is paid for on every device. The agent's modules, as ``corral
    agent`` loads them, import no operator CLI, no ``websockets``, no rules engine (until a rule
    set arrives), no ``tempfile``/``shutil`` (bz2, lzma) nor ``urllib.request``, and a valid
    command line is read without ``argparse``."""
    import subprocess

    code = ("import sys; import corral.cli.entry, corral.agent.cli, corral.agent.main, corral.agent.platform.linux; "
            "corral.agent.cli.parse_args(['--server', 'https://s', '--state-dir=/var/lib/corral']); "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split())
    unwanted = {"websockets", "corral.core.expr", "corral.core.rules", "tempfile", "shutil", "urllib.request",
                "typer", "httpx", "rich", "cryptography", "argparse"}
    assert loaded & unwanted == set()
    assert {"corral.agent.transport", "wsproto"} <= loaded


ACCEPTED = [
    [],
    ["--server", "https://s", "--enroll-token", "t", "--state-dir", "/d", "--config", "c.toml"],
    ["--serv=https://s", "--state=d", "--enroll-token="],  # unique prefixes, --opt=value, an empty value
    ["--server", "https://a", "--server", "https://b"],  # the last one wins
    ["--enroll-token", "-1"],  # a value that looks like an option: argparse decides (accepts this one)
]


@pytest.mark.parametrize("argv", ACCEPTED)
def test_the_agent_command_line_is_read_as_argparse_reads_it(argv: list[str]) -> None:
    assert cli.parse_args(argv) == vars(cli.argument_parser().parse_args(argv))


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--foo"], ["--s", "x"], ["--server"], ["x"],
                                  ["--server", "-x"], ["--config", "c", "extra"], ["--"], ["--server", "s", "--"]])
def test_help_and_usage_errors_are_argparses_own(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ours:
        cli.parse_args(argv)
    ours_out = capsys.readouterr()
    with pytest.raises(SystemExit) as theirs:
        cli.argument_parser().parse_args(argv)
    assert (ours.value.code, ours_out) == (theirs.value.code, capsys.readouterr())
    assert ours.value.code == (0 if argv[0] in ("-h", "--help") else 2)
