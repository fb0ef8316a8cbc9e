"""Simulated system metrics for ``corral sim``: the names of a real device, no psutil.

Every simulated device gets its own character from its seed — baseline offsets, how busy its
network is, the phases and periods of its load curves — and each metric is a baseline plus a sum
of three sines (periods of hours, half an hour and minutes) of the wall clock. So values are

- deterministic: the same seed and time give the same values, in any process;
- smooth: a 10 s step moves ``cpu.percent`` by a few points at most (no sawtooth from a random
  generator that restarted), and devices are not in lockstep;
- plausible: ``cpu.percent`` in 0–100 with load and temperature following it, memory and disk
  consistent with the device's sizes, ``uptime.seconds`` growing until the simulated device's
  next (periodic) reboot, unless the caller passes the real ``boot_time``;
- cheap: the per-device parameters are computed once (:class:`SimMetricSource`, cached per seed
  by :func:`sim_metrics`), then a sample is a dozen ``sin`` calls and a dict — a few microseconds,
  for 10,000 devices every 10 s.

:class:`SimProfile` moves the fleet's baselines, so that a benchmark or a demo can simulate a
regression ("the new build uses 30 points more CPU") on the devices that installed it.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

GIB = 1024**3
TAU = 2 * math.pi
#: the simulated device reboots on its own this often (when the caller does not give a boot time)
SIM_REBOOT_PERIOD = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class SimProfile:
    """Fleet-wide baselines; each device adds its own offsets around them."""

    cpu_base: float = 20.0  # percent
    cpu_amplitude: float = 12.0  # percent points, peak deviation from the base
    mem_base: float = 40.0  # percent
    mem_amplitude: float = 6.0
    disk_base: float = 45.0  # percent of the root filesystem (when the caller does not give it)
    net_rx_base: float = 40_000.0  # bytes/s
    net_tx_base: float = 8_000.0
    temp_base: float = 42.0  # °C when idle
    proc_base: float = 110.0
    cores: int = 4


DEFAULT_PROFILE = SimProfile()


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


class SimMetricSource:
    """One simulated device's metric curves, derived once from its seed."""

    __slots__ = (
        "boot_phase",
        "cpu_off",
        "disk_off",
        "freqs",
        "mem_off",
        "net_scale",
        "phases",
        "proc_off",
        "temp_off",
    )

    def __init__(self, seed: str) -> None:
        draw = random.Random(f"corral-simmetrics:{seed}")
        self.cpu_off = draw.uniform(-8.0, 8.0)
        self.mem_off = draw.uniform(-12.0, 12.0)
        self.disk_off = draw.uniform(-20.0, 20.0)
        self.temp_off = draw.uniform(-4.0, 4.0)
        self.proc_off = draw.uniform(-25.0, 25.0)
        self.net_scale = math.exp(draw.uniform(-1.0, 1.0))  # some devices talk a lot more than others
        self.boot_phase = draw.uniform(0.0, SIM_REBOOT_PERIOD)
        # three curves (cpu, memory, network) × three periods, each period ±25 % per device
        self.freqs = tuple(TAU / (period * draw.uniform(0.75, 1.25)) for period in (4 * 3600.0, 1800.0, 240.0) * 3)
        self.phases = tuple(draw.uniform(0.0, TAU) for _ in range(9))

    def sample(
        self,
        now: float,
        profile: SimProfile = DEFAULT_PROFILE,
        *,
        memory_bytes: int = 2 * GIB,
        disk_bytes: int = 16 * GIB,
        disk_used: float | None = None,
        boot_time: float | None = None,
    ) -> dict[str, float]:
        """The metrics at wall-clock ``now``. ``disk_used`` (0–1) pins the root filesystem's fill
        level; ``boot_time`` makes ``uptime.seconds`` ``now - boot_time``."""
        pr, f, p, sin = profile, self.freqs, self.phases, math.sin
        # three curves in [-1, 1]: cpu, memory, network (written out: this runs 1000s of times a second)
        cpu_wave = 0.5 * sin(now * f[0] + p[0]) + 0.3 * sin(now * f[1] + p[1]) + 0.2 * sin(now * f[2] + p[2])
        mem_wave = 0.5 * sin(now * f[3] + p[3]) + 0.3 * sin(now * f[4] + p[4]) + 0.2 * sin(now * f[5] + p[5])
        net_wave = 0.5 * sin(now * f[6] + p[6]) + 0.3 * sin(now * f[7] + p[7]) + 0.2 * sin(now * f[8] + p[8])
        cpu_mean = _clamp(pr.cpu_base + self.cpu_off, 0.0, 100.0)
        cpu = _clamp(cpu_mean + pr.cpu_amplitude * cpu_wave, 0.0, 100.0)
        mem = _clamp(pr.mem_base + self.mem_off + pr.mem_amplitude * mem_wave, 1.0, 99.0)
        mem_used = memory_bytes * mem / 100.0
        # a disk fills up slowly; a day-long wobble of half a point keeps the line alive
        base = 100.0 * disk_used if disk_used is not None else pr.disk_base + self.disk_off
        disk = _clamp(base + 0.5 * sin(now * (TAU / 86400.0) + p[0]), 0.5, 99.5)
        net = 1.0 + 0.8 * net_wave
        rx = pr.net_rx_base * self.net_scale * net
        tx = pr.net_tx_base * self.net_scale * net
        load = max(1, pr.cores) * 1.1 / 100.0
        # without a real boot time the device "reboots" every SIM_REBOOT_PERIOD, at its own phase
        uptime = (now + self.boot_phase) % SIM_REBOOT_PERIOD if boot_time is None else max(0.0, now - boot_time)
        return {
            "cpu.percent": cpu,
            "mem.percent": mem,
            "mem.used_bytes": float(int(mem_used)),
            "mem.available_bytes": float(int(memory_bytes - mem_used)),
            "swap.percent": _clamp((mem - 85.0) * 3.0, 0.0, 100.0),
            "disk.root.percent": disk,
            "disk.root.free_bytes": float(int(disk_bytes * (100.0 - disk) / 100.0)),
            "net.eth0.rx_bytes_per_s": rx,
            "net.eth0.tx_bytes_per_s": tx,
            "net.rx_bytes_per_s": rx,
            "net.tx_bytes_per_s": tx,
            # the load averages follow the CPU, the longer ones closer to its mean
            "load.1": load * cpu,
            "load.5": load * (cpu_mean + 0.5 * (cpu - cpu_mean)),
            "load.15": load * (cpu_mean + 0.2 * (cpu - cpu_mean)),
            "temp.cpu": pr.temp_base + self.temp_off + 0.3 * cpu,
            "uptime.seconds": uptime,
            "proc.count": float(max(1, int(pr.proc_base + self.proc_off + 6.0 * cpu_wave))),
        }


@functools.lru_cache(maxsize=65536)
def source_for(rng_seed: str) -> SimMetricSource:
    return SimMetricSource(rng_seed)


def sim_metrics(
    rng_seed: str,
    now: float,
    profile: SimProfile = DEFAULT_PROFILE,
    *,
    memory_bytes: int = 2 * GIB,
    disk_bytes: int = 16 * GIB,
    disk_used: float | None = None,
    boot_time: float | None = None,
) -> dict[str, float]:
    """The simulated device ``rng_seed``'s metrics at wall-clock time ``now`` (seconds)."""
    return source_for(rng_seed).sample(
        now, profile, memory_bytes=memory_bytes, disk_bytes=disk_bytes, disk_used=disk_used, boot_time=boot_time
    )
