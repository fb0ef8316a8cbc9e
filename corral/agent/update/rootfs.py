"""The rootfs installer: an image written to the inactive partition, a bootloader environment
that tries the new one once, and falls back on its own when it does not come up.

The A/B scheme is U-Boot's boot counter as Mender uses it (GRUB setups script the same): the
bootloader environment holds

- ``active_slot``: the partition the bootloader boots (Mender: ``mender_boot_part``);
- ``upgrade_available``: 1 while that slot is on trial, 0 once it is committed;
- ``boot_count``: boots of the slot on trial (incremented by the bootloader only while
  ``upgrade_available`` is 1, so a committed system never writes the environment at boot);
- ``boot_limit``: when a boot would make ``boot_count`` exceed it, the bootloader boots the
  other slot instead and clears the trial (U-Boot's ``bootlimit``/``altbootcmd``).

:func:`boot` is that bootloader logic as a pure function: what a real bootloader script does,
what the simulated device runs at its simulated reboot (:class:`SimBootloader`), and what the tests
check. Here the environment is a file of ``key=value`` lines replaced atomically (write, fsync,
rename): on a device, the file a bootloader reads (GRUB's ``grubenv``-like file, or a U-Boot
environment through ``fw_setenv``) is a platform integration left to the board's image.

The flow's actions:

- ``check``: the image (raw, or zstd/gzip-compressed) fits the partition, where its size is
  known up front; otherwise the write stops at the partition's end.
- ``install(image, slot)``: refused for the booted slot. Streams the image into the slot's
  partition (a block device, or a file in tests) in 64 KiB chunks and fsyncs it. The slot's
  entry in ``rootfs-slots.json`` (version, SHA-256) is removed before and written after, so a
  crash mid-write leaves a slot that ``switch`` refuses.
- ``switch(slot)``: arm one trial of ``slot``: ``active_slot=slot, upgrade_available=1,
  boot_count=0`` (left as it is if that trial is already armed).
- ``restart``: reboot (a platform action).
- ``health(slot)``: the booted slot is ``slot`` and still on trial (the update runner adds "the
  agent reconnected"). A fallback by the bootloader shows here as the other slot booted.
- ``commit``: ``upgrade_available=0, boot_count=0`` (only when the trial slot is the booted one).
- ``rollback(slot)``: ``active_slot=slot, upgrade_available=0``, and a reboot when another slot
  is running.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from corral.agent.update.installers import (
    CHUNK,
    GZIP_MAGIC,
    SLOTS,
    ZSTD_MAGIC,
    ArtifactRefused,
    Checked,
    HealthResult,
    InstallError,
    disk_full_as_error,
    open_decompressed,
    other_slot,
)
from corral.fileio import atomic_write


@dataclass(frozen=True)
class BootEnv:
    active_slot: str = "a"
    upgrade_available: bool = False
    boot_count: int = 0
    boot_limit: int = 3


def boot(env: BootEnv) -> tuple[str, BootEnv]:
    """One boot: the slot the bootloader starts and the environment it leaves (pure)."""
    if not env.upgrade_available:
        return env.active_slot, env
    count = env.boot_count + 1
    if count > env.boot_limit:  # the trial slot never came up to commit: the other one
        fallback = other_slot(env.active_slot)
        return fallback, BootEnv(fallback, False, 0, env.boot_limit)
    return env.active_slot, replace(env, boot_count=count)


def parse_bootenv(text: str) -> BootEnv:
    """``key=value`` lines (unknown keys ignored: the bootloader may keep its own there)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values[key.strip()] = value.strip()
    try:
        env = BootEnv(values.get("active_slot", "a"), values.get("upgrade_available", "0") == "1",
                      int(values.get("boot_count", "0")), int(values.get("boot_limit", "3")))
    except ValueError as e:
        raise InstallError(f"bootloader environment: {e}") from None
    if env.active_slot not in SLOTS or env.boot_count < 0 or env.boot_limit < 1:
        raise InstallError(f"bootloader environment is not valid: {env}")
    return env


def format_bootenv(env: BootEnv) -> bytes:
    return (f"active_slot={env.active_slot}\nupgrade_available={int(env.upgrade_available)}\n"
            f"boot_count={env.boot_count}\nboot_limit={env.boot_limit}\n").encode()


def read_bootenv(path: Path, boot_limit: int = 3) -> BootEnv:
    try:
        return parse_bootenv(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return BootEnv(boot_limit=boot_limit)


def write_bootenv(path: Path, env: BootEnv) -> None:
    atomic_write(path, format_bootenv(env), 0o644)


@dataclass(frozen=True)
class RootfsConfig:
    partitions: dict[str, Path]  # slot → block device, or a file in tests
    bootenv: Path
    state_dir: Path  # holds rootfs-slots.json
    #: bytes a partition holds; None: its size (a block device's, a file's current length)
    partition_size: int | None = None
    boot_limit: int = 3
    chunk: int = field(default=CHUNK)


class SimBootloader:
    """The simulated device's bootloader: a reboot runs :func:`boot` on the environment file and
    records the slot it booted (what ``/proc/cmdline`` tells on a real device)."""

    def __init__(self, bootenv: Path, booted_file: Path, boot_limit: int = 3) -> None:
        self.bootenv, self.booted_file, self.boot_limit = bootenv, booted_file, boot_limit
        if not booted_file.exists():  # a device that has never rebooted runs what the env says
            atomic_write(booted_file, read_bootenv(bootenv, boot_limit).active_slot.encode(), 0o644)

    def reboot(self) -> str:
        slot, env = boot(read_bootenv(self.bootenv, self.boot_limit))
        write_bootenv(self.bootenv, env)
        atomic_write(self.booted_file, slot.encode(), 0o644)
        return slot

    def booted_slot(self) -> str:
        return self.booted_file.read_text().strip()


class RootfsInstaller:
    def __init__(self, config: RootfsConfig, *, version: str | None, booted_slot: Callable[[], str],
                 reboot: Callable[[], object]) -> None:
        self.config = config
        self.version = version
        self.booted_slot = booted_slot
        self.reboot = reboot
        self.slots_file = config.state_dir / "rootfs-slots.json"

    # --- the slots' contents ---

    def slots(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.slots_file.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}  # unreadable: no slot counts as installed; the booted one still boots
        return {k: v for k, v in data.items() if k in SLOTS and isinstance(v, dict)}

    def _set_slot(self, slot: str, entry: dict[str, str] | None) -> None:
        slots = self.slots()
        if entry is None:
            slots.pop(slot, None)
        else:
            slots[slot] = entry
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.slots_file, json.dumps(slots, sort_keys=True).encode(), 0o644)

    def _partition(self, slot: str) -> Path:
        try:
            return self.config.partitions[slot]
        except KeyError:
            raise InstallError(f"no partition configured for slot {slot!r}") from None

    def _capacity(self, path: Path) -> int:
        if self.config.partition_size is not None:
            return self.config.partition_size
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)  # a block device's size, or a file's
        finally:
            os.close(fd)

    def env(self) -> BootEnv:
        return read_bootenv(self.config.bootenv, self.config.boot_limit)

    # --- the flow's actions ---

    def check(self, artifact: Path) -> Checked:
        size = _known_size(artifact)
        slot = other_slot(self.booted_slot())
        capacity = self._capacity(self._partition(slot))
        if size is not None and size > capacity:
            raise ArtifactRefused(f"rootfs image of {size} bytes does not fit the {capacity}-byte partition")
        return Checked(self.version, None, size or 0)

    def install(self, artifact: Path, slot: str | None) -> None:
        if slot is None or slot == self.booted_slot():
            raise InstallError(f"slot {slot} is the running rootfs (or none): refusing to write it")
        target = self._partition(slot)
        capacity = self._capacity(target)
        self._set_slot(slot, None)
        digest = hashlib.sha256()
        written = 0
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise InstallError(f"cannot open partition {target}: {e.strerror or e}") from None
        try:
            with open_decompressed(artifact, allow_raw=True) as src, disk_full_as_error(target):
                while chunk := src.read(self.config.chunk):
                    written += len(chunk)
                    if written > capacity:
                        raise InstallError(f"rootfs image is larger than the {capacity}-byte partition {target}")
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
        finally:
            os.close(fd)
        self._set_slot(slot, {"version": self.version or "", "sha256": digest.hexdigest(), "size": str(written)})

    def switch(self, slot: str | None) -> None:
        if slot is None or slot not in self.slots():
            raise InstallError(f"slot {slot} holds no complete rootfs image")
        env = self.env()
        if env.active_slot == slot and (env.upgrade_available or self.booted_slot() == slot):
            return  # armed already (or committed and running): a repeat changes nothing
        write_bootenv(self.config.bootenv, BootEnv(slot, True, 0, self.config.boot_limit))

    def restart(self, slot: str | None) -> None:
        self.reboot()

    def health(self, slot: str | None, deadline: float) -> HealthResult:
        booted, env = self.booted_slot(), self.env()
        if booted != slot:
            return HealthResult(False, f"booted slot {booted}, not {slot} (the bootloader fell back)")
        if not env.upgrade_available or env.active_slot != slot:
            return HealthResult(False, f"slot {slot} is not on trial in the bootloader environment")
        return HealthResult(True)

    def commit(self) -> None:
        env, booted = self.env(), self.booted_slot()
        if env.active_slot != booted:
            raise InstallError(f"cannot commit slot {env.active_slot}: slot {booted} is the one running")
        if env.upgrade_available or env.boot_count:
            write_bootenv(self.config.bootenv, replace(env, upgrade_available=False, boot_count=0))

    def rollback(self, slot: str | None) -> None:
        if slot is None:
            raise InstallError("a rootfs rollback needs the previous slot")
        env = self.env()
        wanted = BootEnv(slot, False, 0, self.config.boot_limit)
        if env != wanted:
            write_bootenv(self.config.bootenv, wanted)
        if self.booted_slot() != slot:
            self.reboot()

    def cleanup(self) -> None:
        """Nothing: the inactive partition keeps what it holds until the next install."""

    def running_slot(self) -> str | None:
        return self.booted_slot()

    def running_version(self) -> str | None:
        return self.slots().get(self.booted_slot(), {}).get("version") or None


def _known_size(artifact: Path) -> int | None:
    """The image's size once decompressed, where the file says it (raw; zstd with the content
    size in its frame header); None otherwise (gzip's trailer holds it only modulo 4 GiB)."""
    with artifact.open("rb") as f:
        head = f.read(18)
    if head.startswith(ZSTD_MAGIC):
        import zstandard

        with contextlib.suppress(zstandard.ZstdError):
            size = zstandard.frame_content_size(head)
            return size if size >= 0 else None
        return None
    if head.startswith(GZIP_MAGIC):
        return None
    return artifact.stat().st_size
