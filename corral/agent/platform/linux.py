"""The real platform: inventory from /etc/os-release, psutil and the kernel; reboot via a command."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import platform as pyplatform
import shlex
import socket
from collections.abc import Sequence
from pathlib import Path

import psutil

import corral
from corral import protocol

log = logging.getLogger("corral.agent.platform")

OS_RELEASE_FILES = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
MODEL_FILES = (
    Path("/proc/device-tree/model"),  # ARM boards: "Raspberry Pi 4 Model B Rev 1.4"
    Path("/sys/firmware/devicetree/base/model"),
    Path("/sys/class/dmi/id/product_name"),  # x86
)


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
