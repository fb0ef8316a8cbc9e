"""Platforms: the real Linux inventory and the deterministic simulated device."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec
import pytest

import corral
from corral import protocol
from corral.agent.platform.linux import LinuxPlatform, parse_os_release, read_model, read_os_release
from corral.agent.platform.sim import SimPlatform


def test_parse_os_release() -> None:
    text = """
# comment
NAME="Debian GNU/Linux"
VERSION_ID="12"
ID=debian
PRETTY_NAME='Debian GNU/Linux 12 (bookworm)'
BROKEN="unterminated
"""
    rel = parse_os_release(text)
    assert rel["NAME"] == "Debian GNU/Linux"
    assert rel["VERSION_ID"] == "12"
    assert rel["ID"] == "debian"
    assert rel["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)"
    assert rel["BROKEN"] == "unterminated"


def test_os_release_and_model_fall_back(tmp_path: Path) -> None:
    assert read_os_release([tmp_path / "missing"]) == {}
    (tmp_path / "model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    assert read_model([tmp_path / "missing", tmp_path / "model"]) == "Raspberry Pi 4 Model B Rev 1.4"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux facts")
def test_linux_inventory_of_this_machine(tmp_path: Path) -> None:
    inv = LinuxPlatform(tmp_path).inventory()
    assert inv.agent_version == corral.__version__
    assert inv.software == {"corral-agent": corral.__version__}
    assert inv.kernel and inv.arch and inv.hostname and inv.os
    assert inv.disk_total_bytes and inv.disk_free_bytes is not None
    assert inv.disk_free_bytes <= inv.disk_total_bytes
    assert inv.memory_total_bytes and inv.memory_total_bytes > 0
    assert inv.boot_time and inv.boot_time > 0
    assert "127.0.0.1" not in inv.addresses and "::1" not in inv.addresses
    assert all("%" not in a for a in inv.addresses)
    # it travels: encodes and decodes through the wire codec
    codec = protocol.Codec()
    assert codec.expect(codec.encode(inv), protocol.Inventory)[1] == inv


def test_linux_reboot_runs_the_configured_command(tmp_path: Path) -> None:
    marker = tmp_path / "rebooted"
    platform = LinuxPlatform(tmp_path, [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"], reboot_grace=0.0)
    asyncio.run(platform.reboot())
    assert marker.exists()


def test_linux_reboot_failure_is_reported(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('not allowed', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exited with 3: not allowed"):
        asyncio.run(LinuxPlatform(tmp_path, cmd, reboot_grace=0.0).reboot())


def test_sim_devices_are_deterministic_per_seed_and_index() -> None:
    a = SimPlatform(42, seed=1, models=["rpi4", "imx8mm"]).inventory()
    b = SimPlatform(42, seed=1, models=["rpi4", "imx8mm"]).inventory()
    assert msgspec.structs.replace(a, boot_time=0.0) == msgspec.structs.replace(b, boot_time=0.0)
    assert a.hostname == "sim-0042"
    assert a.model in ("rpi4", "imx8mm")
    assert a.addresses == ["10.0.0.42"]
    assert a.attributes == {"simulated": True}
    fleet = [SimPlatform(i, seed=1, models=["rpi4", "imx8mm"]).model for i in range(200)]
    assert set(fleet) == {"rpi4", "imx8mm"}  # the fleet is mixed
    other_seed = [SimPlatform(i, seed=2, models=["rpi4", "imx8mm"]).model for i in range(200)]
    assert fleet != other_seed


def test_sim_unknown_model_gets_a_generic_profile() -> None:
    inv = SimPlatform(0, models=["my-board"]).inventory()
    assert inv.model == "my-board" and inv.arch and inv.os


def test_sim_reboot_updates_boot_time() -> None:
    p = SimPlatform(0, boot_delay=(0.0, 0.0))
    before = p.inventory().boot_time
    asyncio.run(p.reboot())
    assert p.reboots == 1
    assert p.inventory().boot_time > before  # type: ignore[operator]
