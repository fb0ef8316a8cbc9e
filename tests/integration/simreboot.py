"""The simulated device's reboot command, for the rootfs tests: ``simreboot.py BOOTENV BOOTED``.

A reboot is two things to the agent: the bootloader runs (:class:`SimBootloader` applies the
boot-counter logic to the environment file and records the slot it booted), and every process
dies at once, as in a power cut. So this kills its parent, the agent that ran it, with SIGKILL;
the test plays init and starts the agent again."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from corral.agent.update.rootfs import SimBootloader

if __name__ == "__main__":
    bootenv, booted = Path(sys.argv[1]), Path(sys.argv[2])
    SimBootloader(bootenv, booted).reboot()
    os.kill(os.getppid(), signal.SIGKILL)
