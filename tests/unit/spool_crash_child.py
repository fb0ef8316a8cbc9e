"""Helper for the spool crash test: appends batches to a DiskSpool until it is killed.

Usage: ``python spool_crash_child.py DIR FIRST_INDEX``. Prints ``SEQ INDEX`` for every batch, only
after ``append`` returned (so every printed seq must survive a SIGKILL). Batch ``i`` is
:func:`payload` ``(i)``: it names its index and has a size that varies up to 16 KiB, so a torn
write would show.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def payload(i: int) -> bytes:
    return f"{i}:".encode() + hashlib.sha256(str(i).encode()).digest() * (1 + i * 7919 % 512)


def main() -> None:
    from corral.agent.telemetry.spool import DiskSpool, SpoolLimits

    spool = DiskSpool(Path(sys.argv[1]), SpoolLimits(max_bytes=1 << 30, max_batches=10_000_000))
    i = int(sys.argv[2])
    while True:
        seq = spool.append(payload(i))
        sys.stdout.write(f"{seq} {i}\n")
        sys.stdout.flush()
        i += 1


if __name__ == "__main__":
    main()
