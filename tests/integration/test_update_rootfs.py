"""The rootfs installer against file-backed partitions and the simulated bootloader: the image
streamed into the inactive partition, a trial boot that commits, a trial that never comes up and
falls back once the boot counter is spent, a rollback, and the refusals."""

from __future__ import annotations

import gzip
import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from corral.agent.update.installers import ArtifactRefused, DiskFull, InstallError
from corral.agent.update.rootfs import BootEnv, RootfsConfig, RootfsInstaller, SimBootloader, read_bootenv

PARTITION = 4 * 1024 * 1024


class Device:
    def __init__(self, root: Path, version: str = "2.0") -> None:
        self.root = root
        parts = {}
        for slot in "ab":
            p = root / f"part-{slot}.img"
            p.write_bytes(slot.encode() * PARTITION)
            parts[slot] = p
        self.config = RootfsConfig(parts, root / "bootenv", root / "state", boot_limit=2)
        self.loader = SimBootloader(self.config.bootenv, root / "booted", boot_limit=2)
        self.reboots = 0
        self.installer = RootfsInstaller(self.config, version=version, booted_slot=self.loader.booted_slot,
                                         reboot=self.reboot)

    def reboot(self) -> None:
        self.reboots += 1
        self.loader.reboot()


def image(path: Path, size: int, compression: str = "") -> tuple[Path, bytes]:
    data = os.urandom(size)
    if compression == "zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    elif compression == "gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("compression", ["", "zst", "gz"])
def test_a_trial_boot_that_comes_up_is_committed(tmp_path: Path, compression: str) -> None:
    dev = Device(tmp_path)
    artifact, data = image(tmp_path / "rootfs.img", 1_000_000, compression)
    assert dev.installer.running_slot() == "a"
    assert dev.installer.check(artifact).size in (1_000_000, 0)
    dev.installer.install(artifact, "b")
    written = dev.config.partitions["b"].read_bytes()
    assert written[:len(data)] == data and len(written) == PARTITION
    assert dev.config.partitions["a"].read_bytes() == b"a" * PARTITION  # the running one untouched
    assert dev.installer.slots()["b"]["sha256"] == hashlib.sha256(data).hexdigest()
    dev.installer.switch("b")
    dev.installer.switch("b")  # idempotent
    assert read_bootenv(dev.config.bootenv) == BootEnv("b", True, 0, 2)
    dev.installer.restart("b")
    assert dev.installer.running_slot() == "b"
    assert dev.installer.health("b", 0).healthy
    dev.installer.commit()
    dev.installer.commit()
    assert read_bootenv(dev.config.bootenv) == BootEnv("b", False, 0, 2)
    dev.reboot()
    assert dev.installer.running_slot() == "b"
    assert dev.installer.running_version() == "2.0"


def test_a_trial_that_never_comes_up_falls_back_when_the_counter_is_spent(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    dev.installer.install(image(tmp_path / "rootfs.img", 100_000)[0], "b")
    dev.installer.switch("b")
    dev.installer.restart("b")  # boot 1 of "b": it hangs before the agent could commit
    assert dev.loader.booted_slot() == "b"
    dev.reboot()  # boot 2 (the watchdog reset the board)
    assert dev.loader.booted_slot() == "b"
    dev.reboot()  # boot 3 > boot_limit 2: the bootloader boots "a" and clears the trial
    assert dev.loader.booted_slot() == "a"
    assert read_bootenv(dev.config.bootenv) == BootEnv("a", False, 0, 2)
    result = dev.installer.health("b", 0)
    assert not result.healthy and "fell back" in result.reason
    reboots = dev.reboots
    dev.installer.rollback("a")  # already where it should be: no reboot
    assert dev.reboots == reboots
    assert dev.installer.running_slot() == "a"


def test_a_rollback_after_an_unhealthy_trial_reboots_into_the_old_slot(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    dev.installer.install(image(tmp_path / "rootfs.img", 100_000)[0], "b")
    dev.installer.switch("b")
    dev.installer.restart("b")
    dev.installer.rollback("a")
    assert dev.loader.booted_slot() == "a"
    assert read_bootenv(dev.config.bootenv) == BootEnv("a", False, 0, 2)
    dev.installer.rollback("a")  # idempotent
    assert dev.reboots == 2


def test_refusals(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    artifact = image(tmp_path / "rootfs.img", 100_000)[0]
    with pytest.raises(InstallError, match="running rootfs"):
        dev.installer.install(artifact, "a")
    with pytest.raises(InstallError, match="no complete rootfs image"):
        dev.installer.switch("b")
    big = image(tmp_path / "big.img", PARTITION + 1)[0]
    with pytest.raises(ArtifactRefused, match="does not fit"):
        dev.installer.check(big)
    big_gz = image(tmp_path / "big.img.gz", PARTITION + 1, "gz")[0]
    dev.installer.check(big_gz)  # size unknown up front: the write stops at the partition's end
    with pytest.raises(InstallError, match="larger than"):
        dev.installer.install(big_gz, "b")
    assert "b" not in dev.installer.slots()
    with pytest.raises(InstallError, match="no complete rootfs image"):
        dev.installer.switch("b")
    dev.installer.install(artifact, "b")
    dev.installer.switch("b")
    with pytest.raises(InstallError, match="cannot commit slot b: slot a is the one running"):
        dev.installer.commit()  # armed, not rebooted yet


def test_the_image_streams_in_bounded_memory(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    artifact, _ = image(tmp_path / "rootfs.img.zst", PARTITION - 1, "zst")
    tracemalloc.start()
    try:
        dev.installer.install(artifact, "b")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak


@pytest.mark.skipif(not os.access("/dev/full", os.W_OK), reason="needs a writable /dev/full")
def test_a_real_enospc_is_disk_full(tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC: the install stops with DiskFull, the slot is
    not marked installed, and switching to it is refused."""
    dev = Device(tmp_path)
    config = RootfsConfig({"a": dev.config.partitions["a"], "b": Path("/dev/full")}, dev.config.bootenv,
                          dev.config.state_dir, partition_size=PARTITION, boot_limit=2)
    installer = RootfsInstaller(config, version="2", booted_slot=dev.loader.booted_slot, reboot=dev.reboot)
    with pytest.raises(DiskFull, match="disk full while writing /dev/full"):
        installer.install(image(tmp_path / "rootfs.img", 100_000)[0], "b")
    with pytest.raises(InstallError, match="no complete rootfs image"):
        installer.switch("b")
