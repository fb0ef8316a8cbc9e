"""A simulated device for ``corral sim``: deterministic inventory and metrics, simulated reboot and processes.

Each device's inventory is derived from ``(seed, index)`` only, so re-running the simulator with
the same seed reports the same fleet (hostnames ``sim-0000``, ``sim-0001``, ..., a model from
the given list, an OS version, memory and disk sizes). A reboot waits a few seconds (the
"boot") and updates the boot time; the agent closes and re-opens its connection around it as it
would on real hardware. Objects are small (``__slots__``, shared strings, the metric curves and
process table made on first use): the simulator runs tens of thousands of them in one process.

Metrics come from :mod:`corral.agent.telemetry.simmetrics`, keyed by ``(seed, index)``, with
the device's own memory and disk sizes and boot time; set :attr:`SimPlatform.metrics_profile` to
shift them (a benchmark simulating a regression). With :attr:`SimPlatform.software` set (the
simulator sets each device's :class:`corral.sim.updates.SimUpdater`), the metrics follow what the
device installed: ``app.crashes`` is 0 per interval, and while a "bad" release is installed it is
1–3 and ``cpu.percent`` is higher (capped at 100), the regression a rollout's health gate should
catch.

The process table starts with a few system processes and the agent; :meth:`SimPlatform.spawn`
adds one (an "untrusted" process for the allow-list rule to find), :meth:`SimPlatform.kill`
removes it, and a reboot starts it afresh.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Protocol

import corral
from corral import protocol
from corral.agent.platform.base import ProcessInfo, refuse_kill
from corral.agent.telemetry.simmetrics import DEFAULT_PROFILE, SimMetricSource, SimProfile

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class ModelProfile:
    os: str
    os_versions: tuple[str, ...]
    kernel: str
    arch: str
    memory_gib: tuple[int, ...]
    disk_gib: tuple[int, ...]


MODEL_PROFILES: dict[str, ModelProfile] = {
    "rpi4": ModelProfile("Raspberry Pi OS", ("11", "12"), "6.6.31-v8+", "aarch64", (2, 4, 8), (16, 32, 64)),
    "rpi3": ModelProfile("Raspberry Pi OS", ("11",), "6.1.21-v7+", "armv7l", (1,), (8, 16)),
    "imx8mm": ModelProfile("Poky (Yocto Project)", ("4.0.12", "4.0.15"), "5.15.71-imx", "aarch64", (2, 4), (8, 16)),
    "jetson-nano": ModelProfile("Ubuntu", ("20.04", "22.04"), "4.9.337-tegra", "aarch64", (4,), (32, 64)),
    "x86-gateway": ModelProfile("Debian GNU/Linux", ("11", "12"), "6.1.0-21-amd64", "x86_64", (8, 16), (128, 256)),
}
DEFAULT_MODELS: tuple[str, ...] = ("rpi4", "imx8mm")
_GENERIC = ModelProfile("Linux", ("1.0",), "6.1.0", "aarch64", (1, 2), (8, 16))


def sim_hostname(index: int) -> str:
    return f"sim-{index:04d}"


#: the simulated agent's own PID (never killed) and executable
SIM_AGENT_PID = 611
SIM_AGENT_EXE = "/usr/bin/python3"
#: (pid, exe, name, username, seconds after boot) of the processes every simulated device starts with
BASE_PROCESSES: tuple[tuple[int, str, str, str, float], ...] = (
    (1, "/sbin/init", "systemd", "root", 0.0),
    (2, "", "kthreadd", "root", 0.0),
    (212, "/lib/systemd/systemd-journald", "systemd-journal", "root", 1.5),
    (498, "/usr/sbin/sshd", "sshd", "root", 3.0),
    (SIM_AGENT_PID, SIM_AGENT_EXE, "corral", "root", 4.0),
    (733, "/opt/app/bin/app", "app", "app", 5.0),
)
FIRST_SPAWNED_PID = 1000


class SimSoftware(Protocol):
    """What a simulated device installed, as its metrics see it (:class:`corral.sim.updates.SimUpdater`)."""

    def regression(self) -> float | None:
        """The CPU percentage points a bad release installed on the device adds; None: none is."""
        ...


class SimPlatform:
    """One simulated device."""

    __slots__ = (
        "_boot_delay",
        "_metrics",
        "_next_pid",
        "_procs",
        "_rng",
        "_seed",
        "boot_time",
        "disk_free",
        "disk_total",
        "index",
        "memory",
        "metrics_profile",
        "model",
        "os_version",
        "reboots",
        "software",
    )

    def __init__(
        self,
        index: int,
        seed: int = 0,
        models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
        *,
        boot_delay: tuple[float, float] = (2.0, 5.0),
        rng: random.Random | None = None,
        metrics_profile: SimProfile = DEFAULT_PROFILE,
    ) -> None:
        if not models:
            raise ValueError("at least one model is needed")
        # A throwaway generator seeded by (seed, index) makes the device the same on every run.
        draw = random.Random(f"corral-sim:{seed}:{index}")
        self.index = index
        self.model: str = models[draw.randrange(len(models))]
        prof = MODEL_PROFILES.get(self.model, _GENERIC)
        self.os_version: str = draw.choice(prof.os_versions)
        self.memory: int = draw.choice(prof.memory_gib) * GIB
        self.disk_total: int = draw.choice(prof.disk_gib) * GIB
        self.disk_free: int = int(self.disk_total * draw.uniform(0.2, 0.9))
        self.boot_time: float = time.time() - draw.uniform(60, 30 * 86400)
        self.reboots = 0
        self._boot_delay = boot_delay
        # shared by all simulated devices when the simulator passes one in (no per-device state)
        self._rng = rng if rng is not None else draw
        #: the baselines of this device's metrics; replace it to simulate a change in behaviour
        self.metrics_profile = metrics_profile
        self._metrics: SimMetricSource | None = None
        self._procs: dict[int, ProcessInfo] | None = None
        self._next_pid = FIRST_SPAWNED_PID
        self._seed = seed
        #: the device's installed software (its updater): adds ``app.crashes`` and the regression of a bad release
        self.software: SimSoftware | None = None

    @property
    def hostname(self) -> str:
        return sim_hostname(self.index)

    def inventory(self) -> protocol.Inventory:
        prof = MODEL_PROFILES.get(self.model, _GENERIC)
        i = self.index
        version = corral.__version__
        return protocol.Inventory(
            os=prof.os,
            os_version=self.os_version,
            kernel=prof.kernel,
            arch=prof.arch,
            hostname=self.hostname,
            agent_version=version,
            model=self.model,
            software={"corral-agent": version},
            addresses=[f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"],
            disk_free_bytes=self.disk_free,
            disk_total_bytes=self.disk_total,
            memory_total_bytes=self.memory,
            boot_time=self.boot_time,
            attributes={"simulated": True},
        )

    async def reboot(self) -> None:
        lo, hi = self._boot_delay
        await asyncio.sleep(self._rng.uniform(lo, hi) if hi > 0 else 0)
        self.boot_time = time.time()
        self.reboots += 1
        self._procs = None  # what ran before the reboot is gone
        self._next_pid = FIRST_SPAWNED_PID

    # -- monitoring ---------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        if self._metrics is None:
            self._metrics = SimMetricSource(f"{self._seed}:{self.index}")
        sample = self._metrics.sample(
            time.time(),
            self.metrics_profile,
            memory_bytes=self.memory,
            disk_bytes=self.disk_total,
            disk_used=1.0 - self.disk_free / self.disk_total if self.disk_total else None,
            boot_time=self.boot_time,
        )
        software = self.software
        if software is not None:
            cpu_delta = software.regression()
            if cpu_delta is None:
                # reported on healthy versions too: a health gate compares against this baseline
                sample["app.crashes"] = 0.0
            else:
                sample["cpu.percent"] = min(100.0, sample["cpu.percent"] + cpu_delta)
                sample["app.crashes"] = float(self._rng.randint(1, 3))
        return sample

    def _table(self) -> dict[int, ProcessInfo]:
        if self._procs is None:
            self._procs = {
                pid: ProcessInfo(pid=pid, exe=exe, name=name, username=user, create_time=self.boot_time + after)
                for pid, exe, name, user, after in BASE_PROCESSES
            }
        return self._procs

    def processes(self) -> list[ProcessInfo]:
        return list(self._table().values())

    def spawn(self, exe: str, name: str = "", username: str = "root") -> int:
        """Start a simulated process; returns its PID."""
        pid = self._next_pid
        self._next_pid += 1
        self._table()[pid] = ProcessInfo(
            pid=pid, exe=exe, name=name or exe.rsplit("/", 1)[-1], username=username, create_time=time.time()
        )
        return pid

    def kill(self, pid: int, create_time: float | None = None) -> bool:
        refuse_kill(pid, SIM_AGENT_PID)
        table = self._table()
        proc = table.get(pid)
        if proc is None or (create_time is not None and proc.create_time != create_time):
            return False
        del table[pid]
        return True

    def protected(self) -> tuple[str, str | None, frozenset[int]]:
        return SIM_AGENT_EXE, "/sbin/init", frozenset({1, SIM_AGENT_PID})
