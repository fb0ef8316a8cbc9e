"""The telemetry spool: store-and-forward for batches the server has not acknowledged (DESIGN §3, §6).

Telemetry is at-least-once. The agent's pump uses a spool like this::

    seq = spool.append(batch_bytes)                   # stored (fsync'd) before it returns
    for seq, batch_bytes in spool.pending(after=last_sent_seq):   # oldest first
        send(seq, batch_bytes)
    # on telemetry_ack {seq}:
    spool.ack(seq)                                    # now, and only now, the batch is gone

A batch stays in the spool until its ``ack``: a crash, a reboot or a week offline replays it with
its original timestamps (backfill). The server ingests idempotently by (device, seq), so sending a
batch twice is harmless; *reusing* a seq for different data is not (the server would drop the new
batch as a duplicate). Hence the sequence rule: seqs handed out by one spool only ever increase,
across restarts and even after every batch was acknowledged, and a brand-new spool starts at
``now_ms * 1000``, so a spool directory that is deleted and recreated still starts above every seq
the old one used (unless the old one averaged more than a million batches a second, or the clock
went backwards between the two).

The spool is bounded by :class:`SpoolLimits` (bytes of payload *and* number of batches). When a new
batch would not fit, the oldest batches are dropped first and counted in :attr:`Spool.dropped`,
which the agent reports to the server with every batch (``Telemetry.dropped``): nothing is lost
silently. A single batch larger than the whole byte budget is refused with :class:`SpoolError`.

:class:`DiskSpool` (a real device) keeps one file per batch, named by its zero-padded seq::

    <dir>/00001718035200000000.batch    header (magic "CSPL", crc32, length) + payload
    <dir>/spool.meta                    {"last_seq": ..., "dropped": ...}, only when needed

Each batch file is written to a temp file, fsync'd, renamed into place and the directory fsync'd
(:func:`corral.agent.identity.atomic_write`), so a SIGKILL or power cut never leaves half a batch
visible. At open, leftover temp files are removed, and a batch whose header or crc does not check
out is deleted and counted as dropped. The meta file is rewritten (atomically) only when the
batch files alone would no longer tell the truth: when the newest batch is deleted (an ack that
empties the spool, say — otherwise a restart would hand its seq out again; it then reserves the
next :data:`SEQ_RESERVE` seqs, so a restart may skip up to that many) and when the dropped counter
changes. Deletes are not fsync'd: a batch that comes back after a power cut is sent again
and the server deduplicates it. The byte budget counts payload bytes; on disk each batch also takes
a 12-byte header and its filesystem's block rounding.

:class:`MemorySpool` has the same semantics without the disk (``corral sim`` runs thousands of
agents in one process, which must not fsync). Both keep an in-memory index (seq → size), so no
call lists the directory after open. All methods are synchronous and may block on the disk: the
agent calls them through :func:`asyncio.to_thread`, and one lock per spool makes that safe.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from corral.agent.identity import ensure_private_dir
from corral.fileio import atomic_write

log = logging.getLogger("corral.agent.telemetry.spool")

MIB = 1024 * 1024
MAGIC = b"CSPL"
#: magic, crc32 of the payload, payload length
HEADER = struct.Struct(">4sII")
META_FILE = "spool.meta"
BATCH_SUFFIX = ".batch"
SEQ_DIGITS = 20  # a 64-bit seq in decimal
#: how far ahead of the newest seq the meta file reserves when it has to be written for the seq
SEQ_RESERVE = 1024
_BATCH_RE = re.compile(rf"(\d{{{SEQ_DIGITS}}})\.batch")
FILE_MODE = 0o600

Clock = Callable[[], float]


class SpoolError(Exception):
    """A batch could not be stored: larger than the spool, or the disk failed."""


@dataclass(frozen=True)
class SpoolLimits:
    """Both bounds apply; whichever is reached first makes the spool drop its oldest batches."""

    #: payload bytes kept at most
    max_bytes: int = 64 * MIB
    #: batches kept at most
    max_batches: int = 100_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {self.max_batches}")


class Spool(Protocol):
    def append(self, payload: bytes) -> int:
        """Store ``payload`` under the next seq and return it (durably stored when this returns)."""
        ...

    def pending(self, after: int = 0, limit: int = 64) -> list[tuple[int, bytes]]:
        """Up to ``limit`` stored batches with a seq greater than ``after``, oldest first."""
        ...

    def ack(self, seq: int) -> None:
        """Delete the batch ``seq``; nothing happens if it is already gone."""
        ...

    @property
    def dropped(self) -> int:
        """Batches dropped because the spool was full (or found corrupt), ever, for this spool."""
        ...

    @property
    def count(self) -> int: ...

    @property
    def bytes_used(self) -> int: ...


def initial_seq(now: float) -> int:
    """Where a brand-new spool starts: the time in milliseconds, times 1000."""
    return int(now * 1000) * 1000


class _IndexedSpool:
    """What both spools share: the index, the bounds, the seq counter and the lock.

    Subclasses store the bytes (:meth:`_write`, :meth:`_read`, :meth:`_delete`) and may persist
    the counters (:meth:`_before_forget`). Every method here runs under ``self._lock``.
    """

    def __init__(self, limits: SpoolLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._seqs: list[int] = []  # ascending; appends always go at the end
        self._sizes: dict[int, int] = {}
        self._bytes = 0
        self._dropped = 0
        self._last = 0  # the last seq handed out
        self._full = False  # the last append had to drop

    # -- storage hooks ---------------------------------------------------------------------

    def _write(self, seq: int, payload: bytes) -> None:
        raise NotImplementedError

    def _read(self, seq: int) -> bytes | None:
        """The payload, or None when it is gone or unreadable (it is then dropped)."""
        raise NotImplementedError

    def _delete(self, seq: int) -> None:
        raise NotImplementedError

    def _before_forget(self, seqs: list[int], dropped: int) -> None:
        """Called before ``seqs`` are deleted, ``dropped`` being the new dropped counter."""

    # -- the interface -----------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        payload = bytes(payload)
        size = len(payload)
        if size > self.limits.max_bytes:
            raise SpoolError(f"a batch of {size} bytes does not fit in the spool ({self.limits.max_bytes} bytes)")
        with self._lock:
            victims = self._victims(size)
            if victims:
                self._forget(victims, dropped=True)
                # once per episode: an agent offline for a week would otherwise say it every interval
                if not self._full:
                    log.warning(
                        "telemetry spool full (limits: %d batches, %d bytes): dropping the oldest batches",
                        self.limits.max_batches,
                        self.limits.max_bytes,
                    )
                self._full = True
            else:
                self._full = False
            seq = self._last + 1
            try:
                self._write(seq, payload)
            except OSError as exc:
                raise SpoolError(f"cannot store telemetry batch {seq}: {exc.strerror or exc}") from exc
            self._last = seq
            self._seqs.append(seq)
            self._sizes[seq] = size
            self._bytes += size
            return seq

    def pending(self, after: int = 0, limit: int = 64) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        if limit <= 0:
            return out
        with self._lock:
            bad: list[int] = []
            i = bisect.bisect_right(self._seqs, after)
            while i < len(self._seqs) and len(out) < limit:
                seq = self._seqs[i]
                data = self._read(seq)
                if data is None:
                    bad.append(seq)
                else:
                    out.append((seq, data))
                i += 1
            if bad:
                log.warning("telemetry spool: dropped %d unreadable batch(es)", len(bad))
                self._forget(bad, dropped=True)
        return out

    def ack(self, seq: int) -> None:
        with self._lock:
            if seq in self._sizes:
                self._forget([seq], dropped=False)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def count(self) -> int:
        return len(self._seqs)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    # -- internals -----------------------------------------------------------------------------

    def _victims(self, incoming: int) -> list[int]:
        """The oldest batches that must go so that one more of ``incoming`` bytes fits."""
        lim = self.limits
        n, used, k = len(self._seqs), self._bytes, 0
        while k < n and (n - k + 1 > lim.max_batches or used + incoming > lim.max_bytes):
            used -= self._sizes[self._seqs[k]]
            k += 1
        return self._seqs[:k]

    def _forget(self, seqs: list[int], *, dropped: bool) -> None:
        new_dropped = self._dropped + (len(seqs) if dropped else 0)
        try:
            self._before_forget(seqs, new_dropped)
        except OSError as exc:
            raise SpoolError(f"cannot update the telemetry spool: {exc.strerror or exc}") from exc
        self._dropped = new_dropped
        for seq in seqs:
            self._delete(seq)
            i = bisect.bisect_left(self._seqs, seq)
            if i < len(self._seqs) and self._seqs[i] == seq:
                del self._seqs[i]
            self._bytes -= self._sizes.pop(seq, 0)


class MemorySpool(_IndexedSpool):
    """The spool in memory: same bounds, seqs and counters, nothing survives the process."""

    def __init__(self, limits: SpoolLimits | None = None, *, clock: Clock = time.time) -> None:
        super().__init__(limits or SpoolLimits())
        self._data: dict[int, bytes] = {}
        self._last = initial_seq(clock()) - 1

    def _write(self, seq: int, payload: bytes) -> None:
        self._data[seq] = payload

    def _read(self, seq: int) -> bytes | None:
        return self._data.get(seq)

    def _delete(self, seq: int) -> None:
        self._data.pop(seq, None)


class _Meta(msgspec.Struct, omit_defaults=True):
    last_seq: int = 0
    dropped: int = 0


class DiskSpool(_IndexedSpool):
    """The spool in a directory (0700), one fsync'd file (0600) per batch."""

    def __init__(self, directory: Path, limits: SpoolLimits | None = None, *, clock: Clock = time.time) -> None:
        super().__init__(limits or SpoolLimits())
        self.directory = Path(directory)
        self._meta_path = self.directory / META_FILE
        self._reserved = 0  # last_seq as the meta file has it: no seq up to it may be handed out again
        ensure_private_dir(self.directory)
        self._open(clock)

    # -- open --------------------------------------------------------------------------------------

    def _open(self, clock: Clock) -> None:
        meta, meta_ok = self._read_meta()
        good: list[tuple[int, int]] = []
        bad: list[int] = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp"):
                # a write that a crash interrupted before its rename: it was never appended
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            m = _BATCH_RE.fullmatch(name)
            if m is None:
                continue
            seq = int(m[1])
            payload = self._read(seq)
            if payload is None:
                bad.append(seq)
            else:
                good.append((seq, len(payload)))
        good.sort()
        # Corrupt files count for the seq too: the server may have seen theirs.
        highest = max([s for s, _ in good] + bad, default=0)
        self._dropped = meta.dropped
        self._reserved = meta.last_seq
        if not meta_ok:
            # The meta file was unreadable: what it said is lost, so also never go below the clock.
            self._last = max(highest, meta.last_seq, initial_seq(clock()) - 1)
        elif highest or meta.last_seq:
            self._last = max(highest, meta.last_seq)
        else:
            self._last = initial_seq(clock()) - 1
        self._seqs = [s for s, _ in good]
        self._sizes = dict(good)
        self._bytes = sum(self._sizes.values())
        if bad:
            log.warning("telemetry spool %s: deleted %d corrupt batch file(s)", self.directory, len(bad))
            new_dropped = self._dropped + len(bad)
            self._save_meta(max(self._last, self._reserved), new_dropped)
            self._dropped = new_dropped
            for seq in bad:
                self._delete(seq)

    def _read_meta(self) -> tuple[_Meta, bool]:
        try:
            data = self._meta_path.read_bytes()
        except FileNotFoundError:
            return _Meta(), True
        except OSError as exc:
            log.warning("cannot read %s (%s); sequence numbers restart from the clock", self._meta_path, exc)
            return _Meta(), False
        try:
            return msgspec.json.decode(data, type=_Meta), True
        except msgspec.DecodeError as exc:
            log.warning("ignoring unreadable %s (%s); sequence numbers restart from the clock", self._meta_path, exc)
            return _Meta(), False

    def _save_meta(self, last_seq: int, dropped: int) -> None:
        atomic_write(self._meta_path, msgspec.json.encode(_Meta(last_seq=last_seq, dropped=dropped)) + b"\n")
        self._reserved = last_seq

    # -- storage hooks -------------------------------------------------------------------------

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:0{SEQ_DIGITS}d}{BATCH_SUFFIX}"

    def _write(self, seq: int, payload: bytes) -> None:
        header = HEADER.pack(MAGIC, zlib.crc32(payload), len(payload))
        atomic_write(self._path(seq), header + payload, FILE_MODE)

    def _read(self, seq: int) -> bytes | None:
        try:
            data = self._path(seq).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SpoolError(f"cannot read telemetry batch {seq}: {exc.strerror or exc}") from exc
        if len(data) < HEADER.size:
            return None
        magic, crc, length = HEADER.unpack_from(data)
        payload = data[HEADER.size :]
        if magic != MAGIC or length != len(payload) or zlib.crc32(payload) != crc:
            return None
        return payload

    def _delete(self, seq: int) -> None:
        try:
            os.unlink(self._path(seq))
        except FileNotFoundError:
            pass
        except OSError as exc:
            # it comes back after a restart and is sent again: harmless, the server deduplicates
            log.warning("cannot delete telemetry batch %d: %s", seq, exc.strerror or exc)

    def _before_forget(self, seqs: list[int], dropped: int) -> None:
        # Deleting the newest batch would let a restart hand its seq out again, so the meta file
        # must cover it first. It reserves a block ahead: an agent that is online empties its
        # spool on nearly every ack, and should not pay a second fsync'd write for each batch.
        if self._last in seqs and self._reserved < self._last:
            self._save_meta(self._last + SEQ_RESERVE, dropped)
        elif dropped != self._dropped:
            self._save_meta(max(self._last, self._reserved), dropped)
