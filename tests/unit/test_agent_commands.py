"""Built-in agent commands, with a stub host (no network)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from corral import protocol
from corral.agent.commands import (
    BUILTIN_COMMANDS,
    CommandFailed,
    CommandHost,
    CommandRegistry,
    builtin_commands,
)


class StubHost:
    def __init__(self) -> None:
        self.inventories_sent = 0
        self.reboot_requested = False

    async def send_inventory(self) -> None:
        self.inventories_sent += 1

    def request_reboot(self) -> None:
        self.reboot_requested = True


def run(registry: CommandRegistry, host: StubHost, name: str, **args: Any) -> protocol.CommandResult:
    return asyncio.run(registry.run(host, protocol.Command(name=name, args=args)))


def test_builtin_names() -> None:
    assert BUILTIN_COMMANDS.names() == ["ping", "reboot", "refresh-inventory"]


def test_ping() -> None:
    before = time.time()
    res = run(BUILTIN_COMMANDS, StubHost(), "ping")
    assert res.ok is True and res.error is None
    assert res.result["pong"] is True
    assert res.result["time"] >= before


def test_refresh_inventory_sends_the_inventory_again() -> None:
    host = StubHost()
    res = run(BUILTIN_COMMANDS, host, "refresh-inventory")
    assert (res.ok, res.result) == (True, {})
    assert host.inventories_sent == 1


def test_reboot_answers_then_asks_for_the_reboot() -> None:
    host = StubHost()
    res = run(BUILTIN_COMMANDS, host, "reboot")
    assert (res.ok, res.result) == (True, {"rebooting": True})
    assert host.reboot_requested is True


def test_unknown_command() -> None:
    res = run(BUILTIN_COMMANDS, StubHost(), "format-disk")
    assert (res.ok, res.error) == (False, "unknown command format-disk")


def test_handler_failures_become_one_line_errors(caplog: pytest.LogCaptureFixture) -> None:
    reg = builtin_commands()

    @reg.command("expected")
    async def expected(host: CommandHost, args: dict[str, Any]) -> None:
        raise CommandFailed("no such file:\n  /x")

    @reg.command("buggy")
    async def buggy(host: CommandHost, args: dict[str, Any]) -> None:
        raise KeyError(args["missing"])

    @reg.command("echo")
    async def echo(host: CommandHost, args: dict[str, Any]) -> dict[str, Any]:
        return args

    assert run(reg, StubHost(), "expected").error == "no such file: /x"
    res = run(reg, StubHost(), "buggy")
    assert res.ok is False and res.error == "KeyError: 'missing'"
    assert "command buggy failed" in caplog.text
    assert run(reg, StubHost(), "echo", a=1).result == {"a": 1}
    assert "echo" not in BUILTIN_COMMANDS  # a new registry does not change the shared one


def test_duplicate_registration_is_refused() -> None:
    reg = builtin_commands()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("ping", reg._handlers["ping"])
