"""Simulated updates for ``corral sim``: deployments taken without installing anything.

A simulated device must not run the real update runner (:mod:`corral.agent.update.runner`): it
forks ``corral tuf-client`` per update and writes files, and the simulator runs thousands of
devices in one process. :class:`SimUpdater` stands in for it as the agent's ``updates`` object
(``attach``, ``detach``, ``on_ack``, ``on_deploy``, ``inventory``, ``close``) and speaks the same
protocol, so rollouts can be tested and benchmarked against a large simulated fleet:

* a ``deploy`` is reported ``in-progress`` (step ``downloading``, seq 1), ``in-progress``
  (``installing``, seq 2), then, after a random time (:attr:`SimUpdateSettings.duration`, drawn
  from the fleet's one generator), ``succeeded`` (``committed``, ``running_version`` the new
  version) or, with probability :attr:`SimUpdateSettings.fail_rate`, ``failed`` (``failed``,
  ``running_version`` the one installed before);
* reports are at-least-once: the last one is re-sent on every ``attach`` until a
  ``deployment_ack`` for its seq (or a later one) arrives;
* a ``deploy`` for the running deployment re-sends its last report; for a finished one (the last
  :data:`FINISHED_KEPT` are remembered) it is answered with the final report again; one
  deployment runs at a time, the others wait in order; deployment ids are opaque (a retry
  attempt, ``ID.2``, is a deployment of its own);
* after a success the device's installed version of ``KIND.NAME`` is the new one: it is listed
  by :meth:`SimUpdater.inventory` (merged into the inventory's ``software``), and the agent
  re-sends its inventory when a deployment ends (``on_finished``, as with the real runner);
* a device whose installed versions contain :attr:`SimUpdateSettings.bad_marker` (``1.3.0-bad``)
  runs a "bad release": :class:`~corral.agent.platform.sim.SimPlatform` asks
  :meth:`SimUpdater.regression` and reports more CPU and a few ``app.crashes`` per interval.

Cheap per device: ``__slots__``, the settings and the generator shared by the fleet, the
containers made on first use, and one asyncio task only while a deployment runs.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from corral import protocol
from corral.errors import InvalidInput

log = logging.getLogger("corral.sim.updates")

Send = Callable[[protocol.DeploymentReport], Awaitable[None]]

#: the final reports kept per device, to answer a ``deploy`` sent again after its end (as the real runner)
FINISHED_KEPT = 50
FAILURE_REASON = "simulated install failure"


@dataclass(frozen=True, slots=True)
class SimUpdateSettings:
    """How the simulated devices take deployments (one object for the whole fleet)."""

    #: seconds from ``deploy`` to the final report: uniform in [min, max]
    duration: tuple[float, float] = (1.0, 3.0)
    #: probability that a deployment fails (0–1)
    fail_rate: float = 0.0
    #: a version containing this text is a bad release (empty: none is)
    bad_marker: str = "bad"
    #: CPU percentage points a bad release adds (the result capped at 100)
    bad_cpu_delta: float = 30.0

    def __post_init__(self) -> None:
        lo, hi = self.duration
        if not 0 <= lo <= hi:
            raise InvalidInput(f"the update time must be MIN-MAX seconds with 0 <= MIN <= MAX, got {lo:g}-{hi:g}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise InvalidInput(f"the update failure rate must be in 0..1, got {self.fail_rate:g}")
        if not 0.0 <= self.bad_cpu_delta <= 100.0:
            raise InvalidInput(f"the bad-release CPU delta must be in 0..100, got {self.bad_cpu_delta:g}")


DEFAULT_UPDATE_SETTINGS = SimUpdateSettings()


def parse_time_range(text: str) -> tuple[float, float]:
    """``"1-3"`` → (1.0, 3.0); ``"2"`` → (2.0, 2.0). Seconds, not negative."""
    lo, sep, hi = text.strip().partition("-")
    try:
        low = float(lo)
        high = float(hi) if sep else low
    except ValueError:
        raise InvalidInput(f"--update-time must be MIN-MAX seconds (e.g. 1-3), not {text!r}") from None
    if not 0 <= low <= high < float("inf"):
        raise InvalidInput(f"--update-time must be MIN-MAX seconds with 0 <= MIN <= MAX, not {text!r}")
    return low, high


def software_key(kind: str, name: str) -> str:
    """The inventory's ``software`` key of an artifact (the real runner's ``kinds.key``, not
    imported: that module loads the installers)."""
    return f"{kind}.{name}"


class SimUpdater:
    """One simulated device's updates: the agent's ``updates`` object (see the module docstring).

    ``on_finished`` is awaited after each deployment ends, while connected (the agent passes
    ``send_inventory``); ``rng`` is the fleet's shared generator.
    """

    __slots__ = (
        "_acked",
        "_bad",
        "_current",
        "_finished",
        "_installed",
        "_last",
        "_queue",
        "_rng",
        "_send",
        "_task",
        "on_finished",
        "settings",
    )

    def __init__(self, settings: SimUpdateSettings = DEFAULT_UPDATE_SETTINGS, rng: random.Random | None = None,
                 on_finished: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.on_finished = on_finished
        self._rng = rng if rng is not None else random.Random()
        self._send: Send | None = None
        #: KIND.NAME -> version; replaced (never changed in place), as inventory() runs in a thread
        self._installed: dict[str, str] | None = None
        self._bad = False
        #: the last report sent, and whether the server acked it
        self._last: protocol.DeploymentReport | None = None
        self._acked = False
        self._current: protocol.Deploy | None = None
        self._task: asyncio.Task[None] | None = None
        self._queue: list[protocol.Deploy] | None = None
        #: deployment id -> final report, oldest first
        self._finished: dict[str, protocol.DeploymentReport] | None = None

    # --- the agent's side -----------------------------------------------------------------------

    async def attach(self, send: Send) -> None:
        """Connected: re-send the last report unless the server has acked it."""
        self._send = send
        last = self._last
        if last is not None and not self._acked:
            await self._try_send(last)

    def detach(self) -> None:
        self._send = None

    def on_ack(self, ack: protocol.DeploymentAck) -> None:
        last = self._last
        if last is not None and ack.deployment_id == last.deployment_id and ack.seq >= last.seq:
            self._acked = True

    async def on_deploy(self, msg: protocol.Deploy) -> None:
        dep_id = msg.deployment_id
        current = self._current
        if current is not None and current.deployment_id == dep_id:
            last = self._last
            if last is not None and last.deployment_id == dep_id:
                await self._try_send(last)  # told again: it has not heard from us
            return
        if self._queue is not None and any(q.deployment_id == dep_id for q in self._queue):
            return
        done = self._finished.get(dep_id) if self._finished is not None else None
        if done is not None:
            if current is None:  # the running deployment's own report keeps priority for re-sending
                self._remember(done)
            await self._try_send(done)
            return
        if current is not None:
            if self._queue is None:
                self._queue = []
            self._queue.append(msg)  # one deployment at a time
            return
        self._begin(msg)

    def inventory(self) -> dict[str, str]:
        """``KIND.NAME`` → version of what this device installed (merged into the inventory's
        ``software``). Called on a worker thread by the agent: reads one reference."""
        installed = self._installed
        return dict(installed) if installed else {}

    async def close(self) -> None:
        self._queue = None  # nothing starts after the running one is cancelled
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._current = self._task = None  # (a task cancelled before it ran has not cleared them)

    # --- what the platform and the simulator read -------------------------------------------------

    @property
    def running(self) -> str | None:
        """The id of the deployment under way, if any."""
        return self._current.deployment_id if self._current is not None else None

    @property
    def queued(self) -> list[str]:
        return [q.deployment_id for q in self._queue] if self._queue else []

    def regression(self) -> float | None:
        """The CPU points a bad release adds while one is installed; None when none is."""
        return self.settings.bad_cpu_delta if self._bad else None

    def install(self, kind: str, name: str, version: str) -> None:
        """Make ``version`` the installed one of ``KIND.NAME`` (what a success does; also to give
        a simulated device a starting version)."""
        self._installed = {**(self._installed or {}), software_key(kind, name): version}
        marker = self.settings.bad_marker
        self._bad = bool(marker) and any(marker in v for v in self._installed.values())

    # --- a deployment ---------------------------------------------------------------------------

    def _begin(self, msg: protocol.Deploy) -> None:
        """Start ``msg``; its first report is the last one from now on (a ``deploy`` sent again
        before the task has run is answered with it)."""
        old = (self._installed or {}).get(software_key(msg.kind, msg.name), "")
        first = protocol.DeploymentReport(deployment_id=msg.deployment_id, seq=1, status="in-progress",
                                          step="downloading", running_version=old)
        self._current = msg
        self._remember(first)
        self._task = asyncio.get_running_loop().create_task(self._drive(msg, first))

    def _remember(self, report: protocol.DeploymentReport) -> None:
        self._last = report
        self._acked = False

    async def _report(self, report: protocol.DeploymentReport) -> None:
        self._remember(report)
        await self._try_send(report)

    async def _try_send(self, report: protocol.DeploymentReport) -> None:
        send = self._send
        if send is None:
            return  # re-sent at the next attach
        try:
            await send(report)
        except Exception as e:  # disconnected meanwhile: re-sent at the next attach
            log.debug("deployment %s: report not sent (%s)", report.deployment_id, e)

    async def _drive(self, job: protocol.Deploy, first: protocol.DeploymentReport) -> None:
        try:
            await self._run(job, first)
        finally:
            self._current = None
            self._task = None
            if self._queue:
                self._begin(self._queue.pop(0))
            if not self._queue:
                self._queue = None
        if self.on_finished is not None and self._send is not None:
            try:
                await self.on_finished()
            except Exception as e:  # disconnected: the inventory goes with the next connect
                log.debug("inventory not sent after deployment %s: %s", job.deployment_id, e)

    async def _run(self, job: protocol.Deploy, first: protocol.DeploymentReport) -> None:
        s, rng = self.settings, self._rng
        lo, hi = s.duration
        total = rng.uniform(lo, hi) if hi > 0 else 0.0
        fails = s.fail_rate > 0 and rng.random() < s.fail_rate
        dep_id, old = job.deployment_id, first.running_version
        await self._try_send(first)
        await asyncio.sleep(total / 2)
        await self._report(protocol.DeploymentReport(deployment_id=dep_id, seq=2, status="in-progress",
                                                     step="installing", running_version=old, download="full"))
        await asyncio.sleep(total / 2)
        if fails:
            final = protocol.DeploymentReport(deployment_id=dep_id, seq=3, status="failed", step="failed",
                                              reason=FAILURE_REASON, running_version=old, download="full")
        else:
            self.install(job.kind, job.name, job.version)
            final = protocol.DeploymentReport(deployment_id=dep_id, seq=3, status="succeeded", step="committed",
                                              running_version=job.version, download="full")
        finished = self._finished if self._finished is not None else {}
        finished.pop(dep_id, None)
        finished[dep_id] = final
        while len(finished) > FINISHED_KEPT:
            del finished[next(iter(finished))]
        self._finished = finished
        await self._report(final)
