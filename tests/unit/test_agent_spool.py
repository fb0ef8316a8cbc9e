"""The telemetry spool: ordering, acks, bounds with the dropped counter, restarts, corruption and
crashes (a real process SIGKILLed mid-append)."""

from __future__ import annotations

import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.agent.telemetry import spool as spool_mod
from corral.agent.telemetry.spool import (
    HEADER,
    META_FILE,
    SEQ_RESERVE,
    DiskSpool,
    MemorySpool,
    Spool,
    SpoolError,
    SpoolLimits,
    initial_seq,
)
from tests.conftest import wait_until
from tests.unit.spool_crash_child import payload

MakeSpool = Callable[..., DiskSpool | MemorySpool]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def batch_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.batch"))


@pytest.fixture(params=["disk", "memory"])
def make_spool(request: pytest.FixtureRequest, tmp_path: Path) -> MakeSpool:
    """Either implementation, over the same directory each time it is called (disk)."""

    def make(limits: SpoolLimits | None = None, clock: Callable[[], float] = time.time) -> DiskSpool | MemorySpool:
        if request.param == "disk":
            return DiskSpool(tmp_path / "spool", limits or SpoolLimits(), clock=clock)
        return MemorySpool(limits or SpoolLimits(), clock=clock)

    return make


def test_both_implement_the_protocol(tmp_path: Path) -> None:
    spools: list[Spool] = [DiskSpool(tmp_path / "s", SpoolLimits()), MemorySpool(SpoolLimits())]
    for s in spools:
        assert (s.count, s.bytes_used, s.dropped) == (0, 0, 0)


# --- shared behaviour ---------------------------------------------------------------------------


def test_a_new_spool_starts_at_the_clock_in_ms_times_1000(make_spool: MakeSpool) -> None:
    s = make_spool(clock=lambda: 1_700_000_000.1234)
    assert s.append(b"a") == 1_700_000_000_123_000
    assert s.append(b"b") == 1_700_000_000_123_001
    assert initial_seq(1_700_000_000.1234) == 1_700_000_000_123_000


def test_batches_come_back_oldest_first_with_their_payloads(make_spool: MakeSpool) -> None:
    s = make_spool()
    seqs = [s.append(f"batch {i}".encode()) for i in range(10)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    assert s.pending(limit=100) == [(q, f"batch {i}".encode()) for i, q in enumerate(seqs)]
    assert s.count == 10
    assert s.bytes_used == sum(len(f"batch {i}") for i in range(10))


def test_pending_after_and_limit(make_spool: MakeSpool) -> None:
    s = make_spool()
    seqs = [s.append(bytes([i])) for i in range(10)]
    assert [q for q, _ in s.pending()] == seqs  # default: from the start
    assert [q for q, _ in s.pending(limit=3)] == seqs[:3]
    assert [q for q, _ in s.pending(after=seqs[3], limit=3)] == seqs[4:7]
    assert [q for q, _ in s.pending(after=seqs[3] + 0)] == seqs[4:]
    assert s.pending(after=seqs[-1]) == []
    assert s.pending(limit=0) == []
    s.ack(seqs[5])
    assert [q for q, _ in s.pending(after=seqs[3], limit=3)] == [seqs[4], seqs[6], seqs[7]]


def test_ack_deletes_only_that_batch_and_tolerates_repeats(make_spool: MakeSpool) -> None:
    s = make_spool()
    a, b, c = s.append(b"aa"), s.append(b"bbb"), s.append(b"c")
    s.ack(b)
    assert s.pending() == [(a, b"aa"), (c, b"c")]
    assert (s.count, s.bytes_used) == (2, 3)
    s.ack(b)  # already gone
    s.ack(12345)  # never existed
    s.ack(a)
    s.ack(c)
    assert (s.count, s.bytes_used, s.pending()) == (0, 0, [])
    assert s.dropped == 0  # acked is not dropped
    assert s.append(b"d") > c


def test_over_max_bytes_the_oldest_are_dropped_and_counted(make_spool: MakeSpool) -> None:
    s = make_spool(SpoolLimits(max_bytes=100, max_batches=1000))
    seqs = [s.append(bytes(30)) for _ in range(3)]  # 90 bytes
    assert s.dropped == 0
    newest = s.append(bytes(30))  # 120 > 100: the oldest goes
    assert [q for q, _ in s.pending()] == [*seqs[1:], newest]
    assert (s.dropped, s.count, s.bytes_used) == (1, 3, 90)
    big = s.append(bytes(75))  # needs 65 more bytes: three batches go
    assert [q for q, _ in s.pending()] == [big]
    assert (s.dropped, s.count, s.bytes_used) == (4, 1, 75)
    exact = s.append(bytes(100))  # exactly the budget: everything else goes
    assert s.pending() == [(exact, bytes(100))]
    assert s.dropped == 5


def test_over_max_batches_the_oldest_are_dropped_and_counted(make_spool: MakeSpool) -> None:
    s = make_spool(SpoolLimits(max_bytes=10_000, max_batches=3))
    seqs = [s.append(bytes([i])) for i in range(7)]
    assert [q for q, _ in s.pending()] == seqs[-3:]
    assert (s.dropped, s.count, s.bytes_used) == (4, 3, 3)


def test_a_batch_larger_than_the_spool_is_refused_and_changes_nothing(make_spool: MakeSpool) -> None:
    s = make_spool(SpoolLimits(max_bytes=100, max_batches=10))
    a = s.append(bytes(50))
    with pytest.raises(SpoolError, match="101 bytes"):
        s.append(bytes(101))
    assert s.pending() == [(a, bytes(50))]
    assert (s.dropped, s.count) == (0, 1)
    assert s.append(b"x") == a + 1  # no seq was used up


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        SpoolLimits(max_bytes=0)
    with pytest.raises(ValueError, match="max_batches"):
        SpoolLimits(max_batches=0)
    assert SpoolLimits() == SpoolLimits(max_bytes=64 * 1024 * 1024, max_batches=100_000)


def test_concurrent_appends_from_threads_get_distinct_seqs(make_spool: MakeSpool) -> None:
    s = make_spool()
    got: list[int] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(25):
            seq = s.append(f"{k}/{i}".encode())
            with lock:
                got.append(seq)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 100 and s.count == 100
    pending = s.pending(limit=1000)
    assert [q for q, _ in pending] == sorted(got)
    for k in range(4):  # each thread's batches kept its own order
        mine = [p for _, p in pending if p.startswith(f"{k}/".encode())]
        assert mine == [f"{k}/{i}".encode() for i in range(25)]


# --- on disk ------------------------------------------------------------------------------------


def test_files_and_directory_are_private(tmp_path: Path) -> None:
    d = tmp_path / "state" / "spool"
    s = DiskSpool(d, SpoolLimits(max_bytes=10, max_batches=10))
    s.append(b"0123456789")
    s.append(b"x")  # drops: writes the meta file
    assert mode(d) == 0o700
    assert [mode(p) for p in d.iterdir()] == [0o600, 0o600]
    assert sorted(p.name for p in d.iterdir()) == sorted([batch_files(d)[0].name, META_FILE])
    d.chmod(0o755)
    DiskSpool(d, SpoolLimits())
    assert mode(d) == 0o700  # tightened


def test_one_file_per_batch_named_by_seq(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = DiskSpool(d, SpoolLimits())
    seq = s.append(b"hello")
    (f,) = batch_files(d)
    assert f.name == f"{seq:020d}.batch"
    data = f.read_bytes()
    assert data[HEADER.size :] == b"hello" and data[:4] == b"CSPL"


def test_reopen_keeps_batches_seq_and_dropped(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = DiskSpool(d, SpoolLimits(max_bytes=1000, max_batches=3))
    seqs = [s.append(f"b{i}".encode()) for i in range(5)]
    s.ack(seqs[3])
    before = s.pending()
    again = DiskSpool(d, SpoolLimits(max_bytes=1000, max_batches=3))
    assert again.pending() == before == [(seqs[2], b"b2"), (seqs[4], b"b4")]
    assert (again.dropped, again.count, again.bytes_used) == (2, 2, 4)
    assert again.append(b"next") == seqs[4] + 1


def test_seq_never_goes_back_after_the_spool_was_emptied(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = DiskSpool(d, SpoolLimits())
    seqs = [s.append(b"x") for _ in range(3)]
    for q in seqs:
        s.ack(q)
    assert batch_files(d) == []
    # a clock that went back (a device without RTC) must not matter either
    again = DiskSpool(d, SpoolLimits(), clock=lambda: 0.0)
    nxt = again.append(b"y")
    assert seqs[-1] < nxt <= seqs[-1] + 1 + SEQ_RESERVE
    again.ack(nxt)
    third = DiskSpool(d, SpoolLimits(), clock=lambda: 0.0)
    assert third.append(b"z") > nxt


def test_emptying_acks_do_not_rewrite_the_meta_file_each_time(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = DiskSpool(d, SpoolLimits())
    s.ack(s.append(b"first"))
    meta = (d / META_FILE).read_bytes()
    stamp = (d / META_FILE).stat().st_ino
    for _ in range(20):  # the online steady state: append, send, ack
        s.ack(s.append(b"x"))
    assert (d / META_FILE).read_bytes() == meta and (d / META_FILE).stat().st_ino == stamp
    last = s.append(b"kept")
    # a restart continues after the reserved block, never inside it
    assert last < DiskSpool(d, SpoolLimits()).append(b"after restart") <= last + SEQ_RESERVE


def test_a_recreated_spool_directory_starts_above_the_old_seqs(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    old = DiskSpool(d, SpoolLimits(), clock=lambda: 1_700_000_000.0)
    used = [old.append(b"x") for _ in range(50)]
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    new = DiskSpool(d, SpoolLimits(), clock=lambda: 1_700_000_000.001)  # one millisecond later
    assert new.append(b"y") > max(used)


def test_leftover_temp_and_corrupt_files_are_removed_and_counted(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = DiskSpool(d, SpoolLimits())
    seqs = [s.append(f"payload {i}".encode()) for i in range(5)]
    files = batch_files(d)
    # bit rot in the payload, a bad magic, a truncated file: three kinds of damage
    data = bytearray(files[1].read_bytes())
    data[-1] ^= 0xFF
    files[1].write_bytes(bytes(data))
    files[2].write_bytes(b"XXXX" + files[2].read_bytes()[4:])
    files[4].write_bytes(files[4].read_bytes()[:7])  # the newest one
    (d / f".{files[0].name}.abc123.tmp").write_bytes(b"half a batch")
    (d / "README").write_text("not ours")  # unknown files are left alone

    again = DiskSpool(d, SpoolLimits())
    assert again.pending() == [(seqs[0], b"payload 0"), (seqs[3], b"payload 3")]
    assert again.dropped == 3
    assert sorted(p.name for p in d.iterdir()) == sorted([files[0].name, files[3].name, META_FILE, "README"])
    # the corrupt newest batch's seq is not handed out again
    assert again.append(b"new") > seqs[4]
    assert DiskSpool(d, SpoolLimits()).dropped == 3  # persisted


def test_a_batch_damaged_after_open_is_dropped_when_read(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = DiskSpool(d, SpoolLimits())
    a, b, c = (s.append(bytes([i]) * 10) for i in range(3))
    batch_files(d)[1].write_bytes(b"garbage")
    assert s.pending() == [(a, bytes(10)), (c, bytes([2]) * 10)]
    assert (s.dropped, s.count, s.bytes_used) == (1, 2, 20)
    assert DiskSpool(d, SpoolLimits()).dropped == 1
    assert b not in dict(s.pending())


def test_an_unreadable_meta_file_falls_back_to_the_clock(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = DiskSpool(d, SpoolLimits(), clock=lambda: 1_700_000_000.0)
    s.ack(s.append(b"x"))
    (d / META_FILE).write_text("{not json")
    again = DiskSpool(d, SpoolLimits(), clock=lambda: 1_800_000_000.0)
    assert again.append(b"y") == initial_seq(1_800_000_000.0)


def test_a_failed_write_raises_spool_error_and_uses_no_seq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "spool"
    s = DiskSpool(d, SpoolLimits())
    first = s.append(b"a")

    def full_disk(path: Path, data: bytes, mode: int = 0o600) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_mod, "atomic_write", full_disk)
    with pytest.raises(SpoolError, match="No space left"):
        s.append(b"b")
    monkeypatch.undo()
    assert s.append(b"c") == first + 1
    assert s.pending() == [(first, b"a"), (first + 1, b"c")]


# --- crashes ---------------------------------------------------------------------------------


CHILD = Path(__file__).with_name("spool_crash_child.py")


def run_and_kill(cmd: list[str], wait_first_line: bool, delay: float) -> list[bytes]:
    """Start ``cmd``, SIGKILL it ``delay`` seconds after (its first line of) output; its stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[bytes] = []
    reader = threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        if wait_first_line:
            wait_until(lambda: lines or proc.poll() is not None, timeout=60, what="the child's first batch")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return lines


def test_sigkill_at_random_moments_loses_nothing_that_append_returned(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    rng = random.Random()
    printed: dict[int, int] = {}  # seq -> batch index, in the order the children printed them
    order: list[int] = []
    for run in range(6):
        lines = run_and_kill(
            [sys.executable, str(CHILD), str(d), str(run * 1_000_000)],
            # mostly mid-append; sometimes perhaps while it opens the spool
            wait_first_line=run % 3 != 2,
            delay=rng.uniform(0.0, 0.3),
        )
        for line in lines:
            if not line.endswith(b"\n"):
                continue  # cut off by the kill: append returned but the line did not make it
            seq, index = map(int, line.split())
            assert seq not in printed, f"seq {seq} was handed out twice"
            printed[seq] = index
            order.append(seq)
    assert printed, "no child got to append anything"
    assert order == sorted(order)  # increasing across restarts too

    s = DiskSpool(d, SpoolLimits(max_bytes=1 << 30, max_batches=10_000_000))
    stored = dict(s.pending(limit=10_000_000))
    assert s.dropped == 0, "a corrupt (half-written) batch was found"
    for seq, index in printed.items():
        assert stored.get(seq) == payload(index), f"batch {seq} lost or damaged"
    for seq, data in stored.items():  # batches whose print the kill prevented: still whole
        index = int(data.split(b":", 1)[0])
        assert data == payload(index)
        assert printed.get(seq, index) == index
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
