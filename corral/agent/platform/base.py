"""The seam between the agent and the operating system.

Everything the agent does to or reads from the device goes through a :class:`Platform`:
:class:`~corral.agent.platform.linux.LinuxPlatform` on a real device,
:class:`~corral.agent.platform.sim.SimPlatform` in ``corral sim``. The connection, identity and
command code above this seam is the same in both (DESIGN §1: the simulator is the real agent).

Besides the inventory and reboot, the seam carries what monitoring reads and enforcement does
(DESIGN §6): one collection of system metrics (:meth:`Platform.metrics`, the names documented in
:mod:`corral.agent.telemetry.collectors`), the process list (:meth:`Platform.processes`, for the
allow-list rule), what must never be killed (:meth:`Platform.protected`) and killing a process
(:meth:`Platform.kill`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from corral import protocol


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """One running process, as the allow-list rule sees it."""

    pid: int
    #: absolute path of the executable; empty for kernel threads and processes we may not inspect
    exe: str
    name: str
    username: str
    #: when it started, epoch seconds
    create_time: float


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

    def metrics(self) -> dict[str, float]:
        """One collection of system metrics, ``{name: value}``; blocking (call it in a thread).

        Rates are computed between two calls, so the first call reports none of them."""
        ...

    def processes(self) -> list[ProcessInfo]:
        """The processes running now; blocking. Processes that exit while the list is being
        read are left out, not reported as errors."""
        ...

    def kill(self, pid: int, create_time: float | None = None) -> bool:
        """Kill ``pid`` (SIGKILL on a real device); True if it was signalled.

        False when there is no such process, or, with ``create_time`` (from :class:`ProcessInfo`),
        when ``pid`` now names a different process (the one listed exited and its PID was reused):
        an enforcement rule must never kill a process it did not judge. One the agent may not kill
        raises PermissionError; PID 1, the agent's own PID and PIDs below 1 raise ValueError
        (:func:`refuse_kill`)."""
        ...

    def protected(self) -> tuple[str, str | None, frozenset[int]]:
        """``(agent_exe, pid1_exe, pids)``: the agent's own executable (for a Python agent, the
        interpreter), PID 1's executable (None when it cannot be read), and the PIDs no rule may
        touch: the agent, its ancestors and PID 1."""
        ...


def refuse_kill(pid: int, agent_pid: int) -> None:
    """Raise ValueError for PIDs no rule may kill: 0 and negatives (``kill(2)`` would signal a
    process group, or every process), init, and the agent itself."""
    if pid <= 1 or pid == agent_pid:
        raise ValueError(f"refusing to kill PID {pid}")
