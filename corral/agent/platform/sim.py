"""A simulated device for ``corral sim``: deterministic inventory, simulated reboot.

Each device's inventory is derived from ``(seed, index)`` only, so re-running the simulator with
the same seed reports the same fleet (hostnames ``sim-0000``, ``sim-0001``, ..., a model from
the given list, an OS version, memory and disk sizes). A reboot waits a few seconds (the
"boot") and updates the boot time; the agent closes and re-opens its connection around it as it
would on real hardware. Objects are small (``__slots__``, shared strings): the simulator runs
tens of thousands of them in one process.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import corral
from corral import protocol

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


class SimPlatform:
    """One simulated device."""

    __slots__ = (
        "_boot_delay",
        "_rng",
        "boot_time",
        "disk_free",
        "disk_total",
        "index",
        "memory",
        "model",
        "os_version",
        "reboots",
    )

    def __init__(
        self,
        index: int,
        seed: int = 0,
        models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
        *,
        boot_delay: tuple[float, float] = (2.0, 5.0),
        rng: random.Random | None = None,
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
