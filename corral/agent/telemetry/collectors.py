"""System metrics of a real device, from psutil (DESIGN §6).

:meth:`SystemCollector.collect` returns one sample of every system metric as ``{name: value}``;
the agent calls it every collection interval (10 s by default) and stamps the values itself.
Names follow :func:`corral.protocol.valid_metric_name`::

    cpu.percent                      busy share of all CPUs since the previous call, 0–100
    mem.percent  mem.used_bytes  mem.available_bytes  swap.percent
    disk.<mount>.percent  disk.<mount>.free_bytes     real filesystems; / is "root",
                                                      /var/lib is "var_lib"
    net.<iface>.rx_bytes_per_s  net.<iface>.tx_bytes_per_s   per non-loopback interface
    net.rx_bytes_per_s  net.tx_bytes_per_s           totals of those
    load.1  load.5  load.15
    temp.<chip>                      hottest current reading of each sensor chip, where the
                                     platform has sensors ("temp.coretemp", "temp.cpu_thermal")
    uptime.seconds  proc.count

Rates and ``cpu.percent`` are deltas between two calls, so the first call has no network rates
(and ``cpu.percent`` covers the time since the collector was made). A counter that went down (an
interface that was re-created, a 32-bit driver counter that wrapped) gives no value for that
interval rather than a negative or made-up one, and the totals skip that interval too.

``cpu.percent`` is computed from :func:`psutil.cpu_times` deltas kept in the collector, the same
arithmetic as :func:`psutil.cpu_percent`, because psutil keeps the "previous call" of
``cpu_percent(interval=None)`` per *thread*, and the agent collects from whichever worker thread
:func:`asyncio.to_thread` picks.

It has to stay cheap on a small device: every group is a handful of reads from /proc or /sys, the
list of mounts and of loopback interfaces is re-read only every ``refresh_interval`` seconds, and
no process is looked at (``proc.count`` is the length of the PID list). A group that raises (a
sensor driver that errors, a mount that went away) is skipped — logged once at debug level — and
never fails the rest of the collection.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from corral.protocol import valid_metric_name

log = logging.getLogger("corral.agent.telemetry.collectors")

#: one group of metrics: adds its values to the dict; the float is the collection time
Group = Callable[[dict[str, float], float], None]

#: filesystems that hold no user data, or are always full (squashfs snaps), and are not reported
PSEUDO_FSTYPES = frozenset({
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts", "devtmpfs",
    "efivarfs", "fusectl", "hugetlbfs", "iso9660", "mqueue", "nsfs", "overlay", "proc", "pstore",
    "ramfs", "rpc_pipefs", "securityfs", "selinuxfs", "squashfs", "sysfs", "tmpfs", "tracefs",
})
PSEUDO_MOUNT_PREFIXES = ("/proc", "/sys", "/dev", "/snap")
SEGMENT_MAX = 48

_NOT_SEGMENT = re.compile(r"[^A-Za-z0-9_]+")


def segment(text: str) -> str:
    """``text`` as one metric-name segment: ``/var/lib`` → ``var_lib``, ``br-1a2b`` → ``br_1a2b``."""
    return _NOT_SEGMENT.sub("_", text).strip("_")[:SEGMENT_MAX]


def mount_segment(mountpoint: str) -> str:
    return "root" if mountpoint == "/" else segment(mountpoint)


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _cpu_total(t: Any) -> float:
    total = float(sum(t))
    # Linux counts guest time inside user and nice already
    return total - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _cpu_busy(t: Any) -> float:
    # iowait is idle time that Linux does not count in idle
    return _cpu_total(t) - float(t.idle) - float(getattr(t, "iowait", 0.0))


def _boottime_clock() -> float | None:
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:
        return None
    try:
        return time.clock_gettime(clock)
    except OSError:
        return None


class SystemCollector:
    """One device's system metrics. Not thread-safe: one caller at a time (any thread).

    ``ps`` is the psutil module; tests pass a stand-in with the same functions.
    """

    def __init__(self, *, ps: Any = psutil, refresh_interval: float = 300.0) -> None:
        self.ps = ps
        self.refresh_interval = refresh_interval
        self._failed: set[str] = set()  # groups whose failure was logged already
        self._mounts: list[tuple[str, str]] = []  # (segment, mountpoint)
        self._loopback: set[str] = set()
        self._refreshed_at: float | None = None
        self._net_prev: dict[str, tuple[int, int]] = {}
        self._net_prev_at: float | None = None
        self._boot_time: float | None = None
        self._cpu_prev: Any = None
        self._has_sensors = True  # until a call finds none; asked again at the next refresh
        # primes cpu.percent: the first collect() reports the CPU use since now
        self._run("cpu", self._prime_cpu, {}, 0.0)
        self._groups: list[tuple[str, Group]] = [
            ("cpu", self._cpu),
            ("memory", self._memory),
            ("disk", self._disk),
            ("network", self._network),
            ("load", self._load),
            ("temperature", self._temperature),
            ("uptime", self._uptime),
            ("processes", self._processes),
        ]

    def collect(self, now: float | None = None) -> dict[str, float]:
        """One sample of every metric. ``now`` (seconds, any clock that is consistent between
        calls; :func:`time.monotonic` by default) is what rates are divided by."""
        t = time.monotonic() if now is None else now
        out: dict[str, float] = {}
        if self._refreshed_at is None or not 0 <= t - self._refreshed_at < self.refresh_interval:
            self._refreshed_at = t
            self._has_sensors = True
            self._run("disk", self._refresh_mounts, out, t)
            self._run("network", self._refresh_interfaces, out, t)
        for group, fn in self._groups:
            self._run(group, fn, out, t)
        # a misbehaving source must not put NaN or a bad name on the wire
        return {k: v for k, v in out.items() if math.isfinite(v) and valid_metric_name(k)}

    def _run(self, group: str, fn: Group, out: dict[str, float], now: float) -> None:
        try:
            fn(out, now)
        except Exception as exc:
            if group not in self._failed:
                self._failed.add(group)
                log.debug("system metrics: skipping %s (%s: %s)", group, type(exc).__name__, exc)

    # -- groups -----------------------------------------------------------------------------------

    def _prime_cpu(self, _out: dict[str, float], _now: float) -> None:
        self._cpu_prev = self.ps.cpu_times()

    def _cpu(self, out: dict[str, float], _now: float) -> None:
        cur = self.ps.cpu_times()
        prev, self._cpu_prev = self._cpu_prev, cur
        if prev is None:
            return
        # a field that went backwards (it happens, on some kernels) counts as no time
        deltas = type(cur)(*(max(0.0, c - p) for c, p in zip(cur, prev, strict=True)))
        total = _cpu_total(deltas)
        if total > 0:
            out["cpu.percent"] = round(min(100.0, max(0.0, 100.0 * _cpu_busy(deltas) / total)), 2)

    def _memory(self, out: dict[str, float], _now: float) -> None:
        vm = self.ps.virtual_memory()
        out["mem.percent"] = float(vm.percent)
        out["mem.used_bytes"] = float(vm.used)
        out["mem.available_bytes"] = float(vm.available)
        out["swap.percent"] = float(self.ps.swap_memory().percent)

    def _refresh_mounts(self, _out: dict[str, float], _now: float) -> None:
        self._mounts = []
        taken: set[str] = set()
        seen_devices: set[str] = set()
        # "/" first so that it always gets "root", even in a container whose root is an overlay
        parts = sorted(self.ps.disk_partitions(all=False), key=lambda p: (p.mountpoint != "/", len(p.mountpoint)))
        if not any(p.mountpoint == "/" for p in parts):
            self._mounts.append(("root", "/"))
            taken.add("root")
        for p in parts:
            mp = p.mountpoint
            if mp != "/" and (p.fstype in PSEUDO_FSTYPES or _under(mp, PSEUDO_MOUNT_PREFIXES)):
                continue
            if mp != "/" and (p.device in seen_devices or not os.path.isdir(mp)):
                continue  # a bind mount of a filesystem already reported, or of a single file
            seg = mount_segment(mp)
            if not seg or seg in taken:
                continue
            taken.add(seg)
            seen_devices.add(p.device)
            self._mounts.append((seg, mp))

    def _disk(self, out: dict[str, float], _now: float) -> None:
        for seg, mp in self._mounts:
            try:
                usage = self.ps.disk_usage(mp)
            except OSError:
                continue  # unmounted since the last refresh
            out[f"disk.{seg}.percent"] = float(usage.percent)
            out[f"disk.{seg}.free_bytes"] = float(usage.free)

    def _refresh_interfaces(self, _out: dict[str, float], _now: float) -> None:
        stats = self.ps.net_if_stats()
        self._loopback = {
            name for name, st in stats.items() if name == "lo" or "loopback" in getattr(st, "flags", "").split(",")
        }

    def _network(self, out: dict[str, float], now: float) -> None:
        counters = self.ps.net_io_counters(pernic=True, nowrap=False)
        cur = {name: (c.bytes_recv, c.bytes_sent) for name, c in counters.items() if name not in self._loopback}
        prev, prev_at = self._net_prev, self._net_prev_at
        self._net_prev, self._net_prev_at = cur, now
        if prev_at is None or now <= prev_at:
            return
        dt = now - prev_at
        total_rx = total_tx = 0.0
        complete = True
        some = False
        taken: set[str] = set()
        for name, (rx, tx) in cur.items():
            before = prev.get(name)
            if before is None:
                continue  # new interface: its traffic before it appeared is unknown, not a reset
            if rx < before[0] or tx < before[1]:
                complete = False  # reset or wrap: no value, and no total that silently lacks it
                continue
            rx_rate, tx_rate = (rx - before[0]) / dt, (tx - before[1]) / dt
            total_rx += rx_rate
            total_tx += tx_rate
            some = True
            seg = segment(name)
            if seg and seg not in taken:
                taken.add(seg)
                out[f"net.{seg}.rx_bytes_per_s"] = round(rx_rate, 1)
                out[f"net.{seg}.tx_bytes_per_s"] = round(tx_rate, 1)
        if some and complete:
            out["net.rx_bytes_per_s"] = round(total_rx, 1)
            out["net.tx_bytes_per_s"] = round(total_tx, 1)

    def _load(self, out: dict[str, float], _now: float) -> None:
        one, five, fifteen = self.ps.getloadavg()
        out["load.1"], out["load.5"], out["load.15"] = float(one), float(five), float(fifteen)

    def _temperature(self, out: dict[str, float], _now: float) -> None:
        sensors = getattr(self.ps, "sensors_temperatures", None)
        if sensors is None or not self._has_sensors:
            return
        chips = sensors()
        if not chips:
            self._has_sensors = False  # most VMs and many boards: don't scan /sys every interval
            return
        for chip, readings in chips.items():
            values = _finite(r.current for r in readings)
            seg = segment(chip)
            if values and seg and f"temp.{seg}" not in out:
                out[f"temp.{seg}"] = max(values)

    def _uptime(self, out: dict[str, float], _now: float) -> None:
        up = _boottime_clock()
        if up is None:
            if self._boot_time is None:
                self._boot_time = float(self.ps.boot_time())
            up = time.time() - self._boot_time
        out["uptime.seconds"] = round(max(0.0, up), 1)

    def _processes(self, out: dict[str, float], _now: float) -> None:
        out["proc.count"] = float(len(self.ps.pids()))


def _finite(values: Iterable[Any]) -> list[float]:
    out: list[float] = []
    for v in values:
        if isinstance(v, int | float) and math.isfinite(v):
            out.append(float(v))
    return out
