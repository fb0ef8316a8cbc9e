"""The seam between the agent and the operating system.

Everything the agent does to or reads from the device goes through a :class:`Platform`:
:class:`~corral.agent.platform.linux.LinuxPlatform` on a real device,
:class:`~corral.agent.platform.sim.SimPlatform` in ``corral sim``. The connection, identity and
command code above this seam is the same in both (DESIGN §1: the simulator is the real agent).
"""

from __future__ import annotations

from typing import Protocol

from corral import protocol


class Platform(Protocol):
    def inventory(self) -> protocol.Inventory:
        """What the device reports about itself; called on every (re)connect and on demand."""
        ...

    async def reboot(self) -> None:
        """Reboot the device.

        The agent has already answered the command and closed its connection when it calls
        this. On a real device the call normally never returns (the system goes down and stops
        the agent); when it returns, the agent reconnects. Raises if the reboot could not be
        started.
        """
        ...
