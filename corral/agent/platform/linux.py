"""The real platform: inventory from /etc/os-release, psutil and the kernel; reboot via a command;
system metrics (:class:`~corral.agent.telemetry.collectors.SystemCollector`), the process list and
SIGKILL for the monitoring and enforcement rules."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import platform as pyplatform
import shlex
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import psutil

import corral
from corral import protocol
from corral.agent.platform.base import ProcessInfo, refuse_kill
from corral.agent.telemetry.collectors import SystemCollector

log = logging.getLogger("corral.agent.platform")

OS_RELEASE_FILES = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
MODEL_FILES = (
    Path("/proc/device-tree/model"),  # ARM boards: "Raspberry Pi 4 Model B Rev 1.4"
    Path("/sys/firmware/devicetree/base/model"),
    Path("/sys/class/dmi/id/product_name"),  # x86
)
PROCESS_ATTRS = ["pid", "exe", "name", "username", "create_time"]
CREATE_TIME_TOLERANCE = 1.0  # seconds


def parse_os_release(text: str) -> dict[str, str]:
    """Parse os-release(5): KEY=value lines, values optionally shell-quoted."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            parts = shlex.split(value)
        except ValueError:
            parts = [value.strip("\"'")]
        out[key.strip()] = parts[0] if parts else ""
    return out


def read_os_release(files: Sequence[Path] = OS_RELEASE_FILES) -> dict[str, str]:
    for path in files:
        try:
            return parse_os_release(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return {}


def read_model(files: Sequence[Path] = MODEL_FILES) -> str:
    for path in files:
        try:
            text = path.read_bytes().replace(b"\x00", b"").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if text:
            return text
    return ""


def network_addresses() -> list[str]:
    """Addresses of the non-loopback interfaces (link-local ones are of no use to an operator)."""
    stats = psutil.net_if_stats()
    out: list[str] = []
    for name, addrs in psutil.net_if_addrs().items():
        st = stats.get(name)
        if st is not None and "loopback" in getattr(st, "flags", "").split(","):
            continue
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ip = ipaddress.ip_address(a.address.split("%", 1)[0])
            except ValueError:
                continue
            if ip.is_loopback or ip.is_link_local:
                continue
            out.append(str(ip))
    return out


class LinuxPlatform:
    """The real device. ``state_dir`` is where disk space is measured (the agent's filesystem)."""

    def __init__(
        self,
        state_dir: Path,
        reboot_command: Sequence[str] = ("systemctl", "reboot"),
        *,
        reboot_grace: float = 120.0,
    ) -> None:
        self.state_dir = state_dir
        self.reboot_command = tuple(reboot_command)
        #: how long reboot() waits for the system to go down before giving up and returning
        self.reboot_grace = reboot_grace
        # made now so that the first metrics() call already has a CPU interval to report
        self._collector = SystemCollector()

    def inventory(self) -> protocol.Inventory:
        rel = read_os_release()
        version = corral.__version__
        uname = pyplatform.uname()
        disk_free = disk_total = None
        with contextlib.suppress(OSError):
            usage = psutil.disk_usage(str(self.state_dir if self.state_dir.exists() else "/"))
            disk_free, disk_total = usage.free, usage.total
        boot_time: float | None = None
        with contextlib.suppress(OSError, RuntimeError):
            boot_time = psutil.boot_time()
        try:
            addresses = network_addresses()
        except OSError:
            addresses = []
        return protocol.Inventory(
            os=rel.get("NAME") or uname.system,
            os_version=rel.get("VERSION_ID") or rel.get("VERSION") or "",
            kernel=uname.release,
            arch=uname.machine,
            hostname=socket.gethostname(),
            agent_version=version,
            model=read_model(),
            software={"corral-agent": version},
            addresses=addresses,
            disk_free_bytes=disk_free,
            disk_total_bytes=disk_total,
            memory_total_bytes=psutil.virtual_memory().total,
            boot_time=boot_time,
        )

    async def reboot(self) -> None:
        log.warning("rebooting: running %s", shlex.join(self.reboot_command))
        proc = await asyncio.create_subprocess_exec(
            *self.reboot_command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LC_ALL": "C"},
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            detail = err.decode("utf-8", "replace").strip().splitlines()
            raise RuntimeError(f"reboot command exited with {proc.returncode}" + (f": {detail[-1]}" if detail else ""))
        # The system is going down and will stop us; if it has not after the grace period,
        # return so that the agent reconnects rather than staying silent forever.
        await asyncio.sleep(self.reboot_grace)
        log.error("the system did not reboot within %.0f s; reconnecting", self.reboot_grace)

    def metrics(self) -> dict[str, float]:
        return self._collector.collect()

    def processes(self) -> list[ProcessInfo]:
        out: list[ProcessInfo] = []
        # ad_value: a field we may not read (another user's exe) comes back None instead of raising
        for proc in psutil.process_iter(PROCESS_ATTRS, ad_value=None):
            try:
                info = proc.info
                out.append(
                    ProcessInfo(
                        pid=int(info["pid"]),
                        exe=info.get("exe") or "",
                        name=info.get("name") or "",
                        username=info.get("username") or "",
                        create_time=float(info.get("create_time") or 0.0),
                    )
                )
            except (psutil.Error, KeyError, TypeError, ValueError):
                continue  # it exited while we looked, or psutil could not make sense of it
        return out

    def kill(self, pid: int, create_time: float | None = None) -> bool:
        refuse_kill(pid, os.getpid())
        # A pidfd pins the process: once the create_time check below passes, the signal cannot
        # hit another process that took over the PID in between. Without pidfds (kernel < 5.3),
        # the check still narrows that window to microseconds.
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except (AttributeError, OSError):
            pidfd = None
        try:
            if create_time is not None and not same_process(pid, create_time):
                return False
            try:
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
            return True
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def protected(self) -> tuple[str, str | None, frozenset[int]]:
        pids = {1, os.getpid()}
        me = psutil.Process()
        try:
            agent_exe = me.exe()
        except psutil.Error:
            agent_exe = ""
        with contextlib.suppress(psutil.Error):
            pids.update(p.pid for p in me.parents())
        try:
            pid1_exe: str | None = psutil.Process(1).exe() or None
        except psutil.Error:
            pid1_exe = None  # not ours to inspect (no privileges, some containers)
        return agent_exe, pid1_exe, frozenset(pids)


def same_process(pid: int, create_time: float) -> bool:
    """Whether ``pid`` is still the process that started at ``create_time``. The tolerance covers
    psutil's wall-clock conversion (boot time in whole seconds); PIDs are not reused that fast."""
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < CREATE_TIME_TOLERANCE
    except psutil.Error:
        return False
