"""System metrics: on this real machine, and through a psutil stand-in for the awkward cases
(counter resets, failing sensors, pseudo filesystems); the simulator's metrics (deterministic, in
range, smooth, shiftable); and the platform seam that serves both (metrics, processes, kill)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from corral.agent.platform.base import ProcessInfo
from corral.agent.platform.linux import LinuxPlatform
from corral.agent.platform.sim import SIM_AGENT_PID, SimPlatform
from corral.agent.telemetry.collectors import SystemCollector, mount_segment, segment
from corral.agent.telemetry.simmetrics import GIB, SimProfile, sim_metrics
from corral.protocol import valid_metric_name

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux facts")


@linux_only
def test_real_machine_names_are_valid_and_values_sane() -> None:
    c = SystemCollector()
    time.sleep(0.1)  # some CPU ticks (10 ms each) since the collector primed itself
    first = c.collect(now=100.0)
    second = c.collect(now=101.0)
    for sample in (first, second):
        assert all(valid_metric_name(k) for k in sample), sample
        assert all(isinstance(v, float) for v in sample.values())
    m = second
    for pct in ("mem.percent", "swap.percent", "disk.root.percent"):
        assert 0.0 <= m[pct] <= 100.0
    assert 0.0 <= first["cpu.percent"] <= 100.0  # primed at construction: there on the first call
    assert m["mem.used_bytes"] > 0 and m["mem.available_bytes"] > 0
    assert m["disk.root.free_bytes"] >= 0
    assert min(m["load.1"], m["load.5"], m["load.15"]) >= 0
    assert m["uptime.seconds"] > 0
    assert m["proc.count"] >= 1
    assert not any(k.startswith("temp.") for k in m) or all(-50 < m[k] < 200 for k in m if k.startswith("temp."))
    # rates need two samples: none on the first call, all there on the second
    assert not any(k.startswith("net.") for k in first)
    assert "net.rx_bytes_per_s" in m and "net.tx_bytes_per_s" in m
    assert all(m[k] >= 0 for k in m if k.startswith("net."))
    assert "net.lo.rx_bytes_per_s" not in m  # loopback is not reported


def test_segments() -> None:
    assert mount_segment("/") == "root"
    assert mount_segment("/var/lib") == "var_lib"
    assert mount_segment("/mnt/data-1") == "mnt_data_1"
    assert mount_segment("/media/usb stick") == "media_usb_stick"
    assert segment("br-1a2b") == "br_1a2b"
    assert segment("wlan0") == "wlan0"
    assert segment("é") == ""
    assert len(segment("x" * 500)) <= 48


# --- a psutil stand-in ------------------------------------------------------------------------

CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")
Nic = namedtuple("Nic", "bytes_recv bytes_sent")
NicStats = namedtuple("NicStats", "isup flags")
Part = namedtuple("Part", "device mountpoint fstype opts")
Usage = namedtuple("Usage", "total used free percent")
Mem = namedtuple("Mem", "total available percent used")
Swap = namedtuple("Swap", "percent")
Temp = namedtuple("Temp", "label current high critical")


class FakePs:
    """Just enough of psutil, with values a test sets."""

    def __init__(self) -> None:
        self.cpu = CpuTimes(100, 0, 50, 800, 10, 0, 0, 0, 0, 0)
        self.nics: dict[str, Nic] = {"lo": Nic(10**9, 10**9), "eth0": Nic(1000, 500), "wlan-0": Nic(0, 0)}
        self.parts = [
            Part("/dev/sda1", "/", "ext4", "rw"),
            Part("/dev/sda2", "/var/lib", "ext4", "rw"),
            Part("/dev/loop3", "/snap/core/1", "squashfs", "ro"),
            Part("/dev/sda2", "/srv/bind", "ext4", "rw"),  # a bind mount of /var/lib's filesystem
        ]
        self.temps: Any = {"coretemp": [Temp("Core 0", 51.0, 80, 100), Temp("Core 1", 55.5, 80, 100)],
                           "nvme-pci": [Temp("", float("nan"), None, None)]}
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def cpu_times(self) -> CpuTimes:
        return self.cpu

    def virtual_memory(self) -> Mem:
        return Mem(8 * 2**30, 6 * 2**30, 25.0, 2 * 2**30)

    def swap_memory(self) -> Swap:
        return Swap(1.5)

    def disk_partitions(self, all: bool = False) -> list[Part]:
        self._count("disk_partitions")
        return self.parts

    def disk_usage(self, path: str) -> Usage:
        return Usage(100, 40, 60, 40.0)

    def net_if_stats(self) -> dict[str, NicStats]:
        return {"lo": NicStats(True, "up,loopback,running"), "eth0": NicStats(True, "up,broadcast")}

    def net_io_counters(self, pernic: bool = False, nowrap: bool = True) -> dict[str, Nic]:
        assert pernic and not nowrap
        return dict(self.nics)

    def getloadavg(self) -> tuple[float, float, float]:
        return (0.5, 0.25, 0.125)

    def sensors_temperatures(self) -> Any:
        self._count("sensors_temperatures")
        return self.temps

    def boot_time(self) -> float:
        return 0.0

    def pids(self) -> list[int]:
        return [1, 2, 3]


def test_values_from_the_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.path.isdir", lambda p: True)
    ps = FakePs()
    c = SystemCollector(ps=ps)
    ps.cpu = CpuTimes(160, 0, 70, 820, 10, 0, 0, 0, 0, 0)  # 80 busy of 100
    m = c.collect(now=0.0)
    assert m["cpu.percent"] == 80.0
    assert (m["mem.percent"], m["mem.used_bytes"], m["swap.percent"]) == (25.0, 2.0 * 2**30, 1.5)
    assert m["disk.root.percent"] == 40.0 and m["disk.var_lib.free_bytes"] == 60.0
    assert not any(k.startswith(("disk.snap", "disk.srv")) for k in m)  # squashfs and bind mount skipped
    assert (m["load.1"], m["load.5"], m["load.15"]) == (0.5, 0.25, 0.125)
    assert m["temp.coretemp"] == 55.5  # the hottest reading of the chip
    assert not any(k.startswith("temp.nvme") for k in m)  # NaN readings are no value
    assert m["proc.count"] == 3.0

    ps.nics = {"lo": Nic(2 * 10**9, 2 * 10**9), "eth0": Nic(3000, 1500), "wlan-0": Nic(100, 0)}
    m = c.collect(now=10.0)
    assert m["net.eth0.rx_bytes_per_s"] == 200.0 and m["net.eth0.tx_bytes_per_s"] == 100.0
    assert m["net.wlan_0.rx_bytes_per_s"] == 10.0
    assert (m["net.rx_bytes_per_s"], m["net.tx_bytes_per_s"]) == (210.0, 100.0)
    assert not any(k.startswith("net.lo.") for k in m)
    assert "cpu.percent" not in m  # no CPU time passed at all: no value rather than 0/0


def test_a_counter_reset_gives_no_value_never_a_negative_one() -> None:
    ps = FakePs()
    c = SystemCollector(ps=ps)
    c.collect(now=0.0)
    ps.nics = {"eth0": Nic(500, 600), "wlan-0": Nic(50, 50)}  # eth0 re-created: rx went down
    m = c.collect(now=10.0)
    assert "net.eth0.rx_bytes_per_s" not in m and "net.eth0.tx_bytes_per_s" not in m
    assert m["net.wlan_0.rx_bytes_per_s"] == 5.0
    assert "net.rx_bytes_per_s" not in m  # a total that silently lacks eth0 would be wrong
    ps.nics = {"eth0": Nic(1500, 700), "wlan-0": Nic(50, 50), "usb0": Nic(7, 7)}
    m = c.collect(now=20.0)
    assert m["net.eth0.rx_bytes_per_s"] == 100.0
    assert "net.usb0.rx_bytes_per_s" not in m  # new: no previous sample yet
    assert m["net.rx_bytes_per_s"] == 100.0
    assert all(v >= 0 for k, v in m.items() if k.startswith("net."))
    # the clock did not move (or went back): no division by zero, no rates
    assert not any(k.startswith("net.") for k in c.collect(now=20.0))


def test_a_failing_group_is_skipped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    ps = FakePs()

    def broken() -> Any:
        raise OSError("sensor driver fell over")

    def no_load() -> tuple[float, float, float]:
        return (1 / 0, 0.0, 0.0)

    ps.sensors_temperatures = broken  # type: ignore[method-assign]
    ps.getloadavg = no_load  # type: ignore[method-assign]
    c = SystemCollector(ps=ps)
    with caplog.at_level(logging.DEBUG, logger="corral.agent.telemetry.collectors"):
        for t in range(3):
            m = c.collect(now=float(t))
    assert "mem.percent" in m and "proc.count" in m
    assert not any(k.startswith(("temp.", "load.")) for k in m)
    assert caplog.text.count("sensor driver fell over") == 1
    assert caplog.text.count("ZeroDivisionError") == 1


def test_mounts_and_sensors_are_not_rescanned_every_call() -> None:
    ps = FakePs()
    ps.temps = {}  # a machine without sensors
    c = SystemCollector(ps=ps, refresh_interval=300.0)
    for t in range(0, 300, 10):
        c.collect(now=float(t))
    assert ps.calls == {"disk_partitions": 1, "sensors_temperatures": 1}
    c.collect(now=300.0)  # the refresh interval passed: look again
    assert ps.calls == {"disk_partitions": 2, "sensors_temperatures": 2}


def test_root_is_reported_even_when_it_is_an_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.path.isdir", lambda p: True)
    ps = FakePs()
    ps.parts = [Part("overlay", "/", "overlay", "rw"), Part("/dev/vdb", "/data", "ext4", "rw")]
    m = SystemCollector(ps=ps).collect(now=0.0)
    assert "disk.root.percent" in m and "disk.data.percent" in m


def test_non_finite_values_never_leave_the_collector() -> None:
    ps = FakePs()
    ps.getloadavg = lambda: (float("nan"), float("inf"), 0.5)  # type: ignore[method-assign]
    m = SystemCollector(ps=ps).collect(now=0.0)
    assert "load.1" not in m and "load.5" not in m and m["load.15"] == 0.5


# --- simulated metrics ------------------------------------------------------------------------

T0 = 1_750_000_000.0
NAMES = {
    "cpu.percent", "mem.percent", "mem.used_bytes", "mem.available_bytes", "swap.percent",
    "disk.root.percent", "disk.root.free_bytes", "net.eth0.rx_bytes_per_s", "net.eth0.tx_bytes_per_s",
    "net.rx_bytes_per_s", "net.tx_bytes_per_s", "load.1", "load.5", "load.15", "temp.cpu",
    "uptime.seconds", "proc.count",
}


def test_same_seed_and_time_same_values_other_seed_other_values() -> None:
    a = sim_metrics("1:42", T0)
    assert a == sim_metrics("1:42", T0)
    assert set(a) == NAMES and all(valid_metric_name(k) for k in a)
    assert all(isinstance(v, float) and math.isfinite(v) for v in a.values())
    assert a != sim_metrics("1:43", T0)
    # devices are not in lockstep: a fleet spreads out
    cpus = {round(sim_metrics(f"1:{i}", T0)["cpu.percent"]) for i in range(200)}
    assert len(cpus) > 15


def test_values_stay_in_range_over_a_day_for_many_devices() -> None:
    mem = 4 * GIB
    for i in range(40):
        for step in range(0, 86400, 997):
            m = sim_metrics(f"r:{i}", T0 + step, memory_bytes=mem, disk_bytes=32 * GIB)
            for pct in ("cpu.percent", "mem.percent", "swap.percent", "disk.root.percent"):
                assert 0.0 <= m[pct] <= 100.0, (pct, m[pct])
            assert m["mem.used_bytes"] + m["mem.available_bytes"] <= mem
            assert 0 <= m["disk.root.free_bytes"] <= 32 * GIB
            assert m["net.rx_bytes_per_s"] >= 0 and m["net.tx_bytes_per_s"] >= 0
            assert m["net.rx_bytes_per_s"] == m["net.eth0.rx_bytes_per_s"]
            assert 0 <= m["load.1"] <= 4 * 1.1 and m["load.15"] >= 0
            assert 20.0 < m["temp.cpu"] < 90.0
            assert 0 <= m["uptime.seconds"] <= 30 * 86400
            assert m["proc.count"] >= 1 and m["proc.count"] == int(m["proc.count"])


def test_values_change_smoothly_between_10_s_samples() -> None:
    for i in range(20):
        prev = sim_metrics(f"s:{i}", T0)
        moved = 0.0
        for step in range(10, 3600, 10):
            cur = sim_metrics(f"s:{i}", T0 + step)
            assert abs(cur["cpu.percent"] - prev["cpu.percent"]) < 5.0
            assert abs(cur["mem.percent"] - prev["mem.percent"]) < 2.0
            assert abs(cur["disk.root.percent"] - prev["disk.root.percent"]) < 0.1
            assert abs(cur["temp.cpu"] - prev["temp.cpu"]) < 2.0
            # uptime grows by the step, or starts again at the device's simulated reboot
            up = cur["uptime.seconds"]
            assert math.isclose(up - prev["uptime.seconds"], 10.0, abs_tol=1e-3) or up < 10.0
            moved += abs(cur["cpu.percent"] - prev["cpu.percent"])
            prev = cur
        assert moved > 5.0  # but it does move


def test_a_profile_shifts_the_baseline() -> None:
    normal = SimProfile()
    regressed = SimProfile(cpu_base=normal.cpu_base + 40)
    for i in range(20):
        for step in range(0, 3600, 300):
            a = sim_metrics(f"p:{i}", T0 + step, normal)
            b = sim_metrics(f"p:{i}", T0 + step, regressed)
            assert b["cpu.percent"] >= a["cpu.percent"]
            assert b["temp.cpu"] >= a["temp.cpu"]
    mean = sum(sim_metrics(f"p:{i}", T0, regressed)["cpu.percent"] for i in range(100)) / 100
    assert mean > normal.cpu_base + 25


def test_given_boot_time_and_disk_fill_are_used() -> None:
    m = sim_metrics("b:1", T0, boot_time=T0 - 3600.0, disk_used=0.9, disk_bytes=10 * GIB)
    assert m["uptime.seconds"] == 3600.0
    assert abs(m["disk.root.percent"] - 90.0) <= 0.5
    assert abs(m["disk.root.free_bytes"] - GIB) <= 0.006 * 10 * GIB


# --- the platform seam --------------------------------------------------------------------------


@linux_only
def test_linux_platform_metrics_processes_and_kill(tmp_path: Path) -> None:
    platform = LinuxPlatform(tmp_path)
    m = platform.metrics()
    assert "mem.percent" in m and all(valid_metric_name(k) for k in m)

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        procs = {p.pid: p for p in platform.processes()}
        me = procs[os.getpid()]
        assert os.path.realpath(me.exe) == os.path.realpath(sys.executable)
        assert me.name and me.username and me.create_time > 0
        assert child.pid in procs
        assert all(isinstance(p, ProcessInfo) and isinstance(p.exe, str) for p in procs.values())
        listed = procs[child.pid]
        # the PID now names another process (reused): it is left alone
        assert platform.kill(child.pid, listed.create_time - 3600) is False
        assert child.poll() is None
        assert platform.kill(child.pid, listed.create_time) is True
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    assert platform.kill(4_194_304 + 4321) is False  # above any pid_max: no such process is no error
    for pid in (0, -1, 1, os.getpid()):
        with pytest.raises(ValueError, match="refusing"):
            platform.kill(pid)
    agent_exe, _pid1_exe, pids = platform.protected()
    assert os.path.realpath(agent_exe) == os.path.realpath(sys.executable)
    assert {1, os.getpid(), os.getppid()} <= pids


def test_sim_platform_metrics_follow_the_device() -> None:
    p = SimPlatform(7, seed=3, boot_delay=(0.0, 0.0))
    m = p.metrics()
    assert set(m) == NAMES
    assert m["uptime.seconds"] == pytest.approx(time.time() - p.boot_time, abs=5)
    assert m["mem.used_bytes"] + m["mem.available_bytes"] <= p.memory
    assert abs(m["disk.root.percent"] - 100 * (1 - p.disk_free / p.disk_total)) <= 0.5
    base = p.metrics()["cpu.percent"]
    p.metrics_profile = SimProfile(cpu_base=95.0, cpu_amplitude=0.0)
    assert p.metrics()["cpu.percent"] >= base and p.metrics()["cpu.percent"] >= 85.0
    asyncio.run(p.reboot())
    assert p.metrics()["uptime.seconds"] < 5


def test_sim_platform_processes_spawn_and_kill() -> None:
    p = SimPlatform(1, boot_delay=(0.0, 0.0))
    base = p.processes()
    assert {1, SIM_AGENT_PID} <= {q.pid for q in base}
    assert any(q.exe == "" for q in base)  # a kernel thread
    pid = p.spawn("/tmp/miner", "miner", username="nobody")
    spawned = {q.pid: q for q in p.processes()}[pid]
    assert (spawned.exe, spawned.name, spawned.username) == ("/tmp/miner", "miner", "nobody")
    assert p.spawn("/usr/bin/other") == pid + 1
    assert p.kill(pid, spawned.create_time + 1) is False  # not the process that was listed
    assert p.kill(pid, spawned.create_time) is True
    assert pid not in {q.pid for q in p.processes()}
    assert p.kill(pid) is False  # already gone: no error
    agent_exe, pid1_exe, pids = p.protected()
    assert pids == {1, SIM_AGENT_PID} and pid1_exe == "/sbin/init"
    assert agent_exe == {q.pid: q for q in base}[SIM_AGENT_PID].exe
    for refused in (0, 1, SIM_AGENT_PID):
        with pytest.raises(ValueError, match="refusing"):
            p.kill(refused)
    asyncio.run(p.reboot())
    assert [q.pid for q in p.processes()] == [q.pid for q in base]  # a reboot starts afresh
