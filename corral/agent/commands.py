"""Commands a server can send to an agent, and the built-in set.

The server sends ``command {name, args}``; the connection answers ``command_ack`` at once and
then ``command_result {ok, result, error}`` with what :meth:`CommandRegistry.run` returns. A
handler is ``async (host, args) -> result`` where ``result`` is anything msgpack can carry; it
reports failure by raising :class:`CommandFailed` (its message becomes ``error``). Any other
exception is a bug in the handler: logged with its traceback and reported as failed.

Built-ins:

``ping``               ``{"pong": true, "time": <epoch seconds>}``
``refresh-inventory``  re-sends the inventory; ``{}``
``reboot``             ``{"rebooting": true}``; after the result is sent the connection closes
                       and the platform reboots (a simulated device comes back a few seconds later)

Handlers reach the agent through the small :class:`CommandHost` interface, which keeps them
testable with a stub and keeps the registry stateless, so one registry serves every agent of a
simulator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from corral import protocol

log = logging.getLogger("corral.agent.commands")


class CommandHost(Protocol):
    """What a command handler may ask of the agent."""

    async def send_inventory(self) -> None:
        """Collect the inventory from the platform and send it to the server."""
        ...

    def request_reboot(self) -> None:
        """Reboot once the current command's result has been sent."""
        ...


Handler = Callable[[CommandHost, dict[str, Any]], Awaitable[Any]]


class CommandFailed(Exception):
    """Raised by a handler for an expected failure; the message is reported as ``error``."""


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class CommandRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        if name in self._handlers:
            raise ValueError(f"command {name!r} is already registered")
        self._handlers[name] = handler

    def command(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`."""

        def deco(handler: Handler) -> Handler:
            self.register(name, handler)
            return handler

        return deco

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    async def run(self, host: CommandHost, command: protocol.Command) -> protocol.CommandResult:
        handler = self._handlers.get(command.name)
        if handler is None:
            return protocol.CommandResult(ok=False, error=f"unknown command {command.name}")
        try:
            result = await handler(host, dict(command.args))
        except CommandFailed as exc:
            return protocol.CommandResult(ok=False, error=_one_line(str(exc)) or command.name + " failed")
        except Exception as exc:
            log.exception("command %s failed", command.name)
            return protocol.CommandResult(ok=False, error=_one_line(f"{type(exc).__name__}: {exc}"))
        return protocol.CommandResult(ok=True, result=result)


async def _ping(host: CommandHost, args: dict[str, Any]) -> dict[str, Any]:
    return {"pong": True, "time": time.time()}


async def _refresh_inventory(host: CommandHost, args: dict[str, Any]) -> dict[str, Any]:
    await host.send_inventory()
    return {}


async def _reboot(host: CommandHost, args: dict[str, Any]) -> dict[str, Any]:
    host.request_reboot()
    return {"rebooting": True}


def builtin_commands() -> CommandRegistry:
    """A new registry holding the built-in commands (add your own with :meth:`~CommandRegistry.register`)."""
    reg = CommandRegistry()
    reg.register("ping", _ping)
    reg.register("refresh-inventory", _refresh_inventory)
    reg.register("reboot", _reboot)
    return reg


#: the registry agents use unless given another; stateless, shared by all agents in a process
BUILTIN_COMMANDS = builtin_commands()
