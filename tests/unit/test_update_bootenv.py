"""The bootloader's A/B logic (U-Boot's bootcount/bootlimit/altbootcmd, as Mender uses it), pure."""

from __future__ import annotations

import pytest

from corral.agent.update.installers import InstallError
from corral.agent.update.rootfs import BootEnv, boot, format_bootenv, parse_bootenv


def test_a_committed_system_boots_its_slot_and_writes_nothing() -> None:
    env = BootEnv("b", False, 0, 3)
    assert boot(env) == ("b", env)


def test_a_trial_counts_boots_then_falls_back_past_the_limit() -> None:
    env = BootEnv("b", True, 0, 3)
    booted = []
    for _ in range(5):
        slot, env = boot(env)
        booted.append((slot, env.boot_count, env.upgrade_available))
    assert booted == [("b", 1, True), ("b", 2, True), ("b", 3, True), ("a", 0, False), ("a", 0, False)]
    assert env == BootEnv("a", False, 0, 3)


def test_a_limit_of_one_is_a_single_try() -> None:
    slot, env = boot(BootEnv("a", True, 0, 1))
    assert (slot, env) == ("a", BootEnv("a", True, 1, 1))
    assert boot(env) == ("b", BootEnv("b", False, 0, 1))


def test_the_environment_file_round_trips_and_ignores_other_keys() -> None:
    env = BootEnv("b", True, 2, 5)
    assert parse_bootenv(format_bootenv(env).decode()) == env
    assert parse_bootenv("# grub\nbootdelay=3\nactive_slot=b\n") == BootEnv("b", False, 0, 3)
    assert parse_bootenv("") == BootEnv()


@pytest.mark.parametrize("text", ["active_slot=c", "boot_count=x", "boot_count=-1", "boot_limit=0"])
def test_a_bad_environment_is_an_error(text: str) -> None:
    with pytest.raises(InstallError, match="bootloader environment"):
        parse_bootenv(text)
