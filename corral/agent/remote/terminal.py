"""A terminal session: a shell on a PTY, streamed over a :class:`Channel`.

The shell (``[remote] shell``, which must be listed in /etc/shells) starts as a login shell in a
session of its own with the PTY as its controlling terminal, ``TERM=xterm-256color``, the window
size the client asked for, the home directory of its user as working directory and a clean
environment (``HOME``, ``USER``, ``LOGNAME``, ``SHELL``, ``PATH``, the locale and ``TZ`` of the
agent; nothing else of the agent's leaks into it). With ``[remote] user`` it runs as that user,
which needs an agent running as root.

On the channel:

- in: binary frames are keystrokes, written to the PTY; ``{"type": "resize", "cols", "rows"}``
  sets the window size (the shell's foreground job gets SIGWINCH); other messages are ignored.
- out: binary frames of PTY output (at most ``chunk_bytes`` each); when the shell exits, the
  output still in the PTY, then ``{"type": "exit", "code": N}`` (128 + the signal for a shell
  killed by one); ``{"type": "error", "message"}`` when the session is refused or closed for
  being idle.

**Not blocking the event loop.** The PTY master is non-blocking and read when
``loop.add_reader`` says it is readable; the next chunk is read only once ``send`` has returned,
so a slow client stops the reads, the PTY's buffer fills and the shell's writes block: nothing
is buffered in the agent beyond one chunk. The alternative, blocking reads in a thread, is
worse here: the agent has a single executor thread (ADR 0007), which one terminal's read would
occupy for as long as the shell is silent, and a thread per session costs a stack and a malloc
arena each. The shell's exit is noticed through a pidfd on the event loop (polled where the
kernel has none), not with a thread waiting in ``waitpid``.

Closing: when the channel is gone or the session is idle for ``idle_timeout`` seconds (no input
nor output), the shell's process group and the terminal's foreground process group get SIGHUP
(and SIGCONT), then SIGKILL after ``kill_grace`` seconds, and the shell is reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import pwd
import signal
import struct
import subprocess
import termios
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.agent.config import RemoteConfig
from corral.agent.remote.channel import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    Channel,
    ChannelClosed,
    control,
    finish,
    parse_control,
    refuse,
)

log = logging.getLogger("corral.agent.remote.terminal")

SHELLS_FILE = Path("/etc/shells")
TERM = "xterm-256color"
#: seconds between SIGHUP and SIGKILL when a session ends with the shell still running
KILL_GRACE = 2.0
#: after the shell exits, the PTY is read until it reports that no one holds the terminal any
#: more, or until no output came for this long (a background job may keep it open), and for
#: DRAIN_MAX seconds at the most (a background job may keep writing)
DRAIN_QUIET = 0.05
DRAIN_MAX = 2.0
#: the window size is two unsigned shorts
MAX_WINDOW = 65535
#: where the environment's PATH comes from when the agent has none
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: what the shell inherits from the agent's environment (the rest of it is the agent's business)
INHERITED_ENV = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ")


class SessionLimit:
    """At most ``max_sessions`` terminals at once (``[remote] max_sessions``): one per agent,
    shared by all its terminal sessions. A session over the limit is refused, not queued."""

    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self.active = 0

    def try_acquire(self) -> Slot | None:
        """A slot (give it back with :meth:`Slot.release`), or ``None`` when all are taken."""
        if self.active >= self.max_sessions:
            return None
        self.active += 1
        return Slot(self)


class Slot:
    """One session's place under a :class:`SessionLimit`; :meth:`release` is idempotent."""

    def __init__(self, limit: SessionLimit) -> None:
        self._limit: SessionLimit | None = limit

    def release(self) -> None:
        if self._limit is not None:
            self._limit.active -= 1
            self._limit = None


@dataclass(frozen=True)
class Account:
    """Whom the shell runs as; ``switch`` when that is not the agent's own user."""

    name: str
    uid: int
    gid: int
    home: str
    switch: bool


def shell_problem(shell: str, shells_file: Path = SHELLS_FILE) -> str | None:
    """Why ``shell`` may not be started (``None`` if it may): it must be listed in
    ``shells_file`` and be an executable file."""
    try:
        listed = {line.strip() for line in shells_file.read_text(encoding="utf-8", errors="replace").splitlines()}
    except OSError as e:
        return f"cannot read {shells_file} to check the shell {shell}: {e.strerror or e}"
    if shell not in listed:
        return f"the shell {shell} (remote.shell) is not listed in {shells_file}"
    if not (os.path.isfile(shell) and os.access(shell, os.X_OK)):
        return f"the shell {shell} (remote.shell) is not an executable file"
    return None


def account_for(user: str | None) -> Account | str:
    """The :class:`Account` the shell runs as, or why it cannot run as ``user``."""
    euid = os.geteuid()
    if user is None:
        try:
            pw = pwd.getpwuid(euid)
        except KeyError:  # a container user without a passwd entry
            return Account(os.environ.get("USER", str(euid)), euid, os.getegid(), os.environ.get("HOME", "/"), False)
        return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, False)
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return f"remote.user: there is no user {user!r} on this device"
    if pw.pw_uid == euid:
        return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, False)
    if euid != 0:
        return (f"remote.user = {user!r}: starting a shell as another user needs the agent to run as root "
                f"(it runs as uid {euid})")
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, True)


def window_ok(cols: object, rows: object) -> bool:
    return all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_WINDOW for n in (cols, rows))


def set_window(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def exit_code(returncode: int) -> int:
    """A shell's exit status as a shell reports it: 128 + N when signal N killed it."""
    return returncode if returncode >= 0 else 128 - returncode


def _take_controlling_terminal() -> None:  # runs in the child, between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _spawn(shell: str, account: Account, slave: int) -> subprocess.Popen[bytes]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(TERM=TERM, HOME=account.home, USER=account.name, LOGNAME=account.name, SHELL=shell)
    ids: dict[str, Any] = {}
    if account.switch:
        ids = {"user": account.uid, "group": account.gid,
               "extra_groups": os.getgrouplist(account.name, account.gid)}
    # A login shell ("-sh"), as sshd starts one. The child's session (start_new_session) and
    # its controlling terminal (TIOCSCTTY, which subprocess has no option for: the one line of
    # Python between fork and exec) make job control and ^C work in the shell.
    return subprocess.Popen(
        ["-" + os.path.basename(shell)], executable=shell, stdin=slave, stdout=slave, stderr=slave,
        cwd=account.home if os.path.isdir(account.home) else "/", env=env, start_new_session=True,
        preexec_fn=_take_controlling_terminal, **ids)


class _ExitWatch:
    """A future set to the shell's return code when it exits (and is reaped): a pidfd on the
    event loop, or polling where the kernel has no pidfd (Linux < 5.3)."""

    POLL = 0.2

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes]) -> None:
        self.loop = loop
        self.proc = proc
        self.future: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = None
        self._poller: asyncio.Task[None] | None = None
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self._poller = loop.create_task(self._poll())
        else:
            loop.add_reader(self._pidfd, self._exited)

    def _exited(self) -> None:
        self.close()
        if not self.future.done():
            self.future.set_result(self.proc.wait())

    async def _poll(self) -> None:
        while True:  # no pidfd: polling is all there is
            rc = self.proc.poll()
            if rc is not None:
                break
            await asyncio.sleep(self.POLL)
        if not self.future.done():
            self.future.set_result(rc)

    def close(self) -> None:
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._poller is not None and self._poller is not asyncio.current_task():
            self._poller.cancel()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Session:
    def __init__(self, ch: Channel, master: int, proc: subprocess.Popen[bytes], config: RemoteConfig,
                 kill_grace: float) -> None:
        self.ch = ch
        self.master = master
        self.proc = proc
        self.config = config
        self.kill_grace = kill_grace
        self.loop = asyncio.get_running_loop()
        self.exit = _ExitWatch(self.loop, proc)
        self.last_activity = self.loop.time()
        self._drain_until: float | None = None

    def touch(self) -> None:
        self.last_activity = self.loop.time()

    # --- PTY → channel

    async def output(self) -> None:
        """Until the PTY reports that no one holds the terminal (EIO), or, once the shell has
        exited, until it stays quiet for DRAIN_QUIET."""
        while True:
            try:
                data = os.read(self.master, self.config.chunk_bytes)
            except BlockingIOError:
                if not await self._readable():
                    return
                continue
            except OSError as e:
                if e.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            self.touch()
            await self.ch.send(data)
            if self.exit.future.done():
                if self._drain_until is None:
                    self._drain_until = self.loop.time() + DRAIN_MAX
                elif self.loop.time() > self._drain_until:
                    return
            # the PTY may always have more: let the rest of the agent run between chunks
            await asyncio.sleep(0)

    async def _readable(self) -> bool:
        fut: asyncio.Future[None] = self.loop.create_future()
        self.loop.add_reader(self.master, _wake, fut)
        try:
            if not self.exit.future.done():
                await asyncio.wait((fut, self.exit.future), return_when=asyncio.FIRST_COMPLETED)
            if not fut.done():
                await asyncio.wait((fut,), timeout=DRAIN_QUIET)
            return fut.done()
        finally:
            self.loop.remove_reader(self.master)
            fut.cancel()

    # --- channel → PTY

    async def input(self) -> None:
        """Until the channel is gone (:class:`ChannelClosed`)."""
        while True:
            msg = await self.ch.recv()
            self.touch()
            if isinstance(msg, bytes):
                await self._write(msg)
                continue
            ctl = parse_control(msg)
            if ctl is not None and ctl["type"] == "resize":
                cols, rows = ctl.get("cols"), ctl.get("rows")
                if window_ok(cols, rows):
                    assert isinstance(cols, int) and isinstance(rows, int)
                    set_window(self.master, cols, rows)
                else:
                    log.debug("terminal: ignoring a resize to %r x %r", cols, rows)

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                await self._writable()
                continue
            except OSError as e:
                if e.errno == errno.EIO:  # no one reads the terminal any more: the input is lost
                    return
                raise
            view = view[n:]

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        self.loop.add_writer(self.master, _wake, fut)
        try:
            await fut
        finally:
            self.loop.remove_writer(self.master)

    async def idle(self) -> None:
        """Returns after ``idle_timeout`` seconds without input or output."""
        while True:  # activity moves the deadline: sleep until the latest one
            left = self.last_activity + self.config.idle_timeout - self.loop.time()
            if left <= 0:
                return
            await asyncio.sleep(left)

    # --- the session

    async def run(self) -> int:
        out = asyncio.create_task(self.output())
        inp = asyncio.create_task(self.input())
        idle = asyncio.create_task(self.idle())
        waiting: set[asyncio.Future[Any]] = {out, inp, idle, self.exit.future}
        error: tuple[str, int] | None = None  # what the peer is told, and the close code
        try:
            while True:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if self.exit.future.done():
                    return await self._exited(out, inp, idle)
                if out in done and out.exception() is None:
                    waiting.discard(out)  # the shell closed the terminal; it may run on
                    continue
                if idle in done:
                    error = (f"the terminal was idle for {self.config.idle_timeout:g} s (remote.idle_timeout)",
                             CLOSE_NORMAL)
                    log.info("terminal: %s: closing it", error[0])
                else:
                    task = out if out in done else inp
                    exc = task.exception()
                    if not isinstance(exc, ChannelClosed):
                        log.error("terminal: the session failed", exc_info=exc)
                        error = (f"the terminal failed: {exc}", CLOSE_ERROR)
                break
        finally:
            for task in (out, inp, idle):
                task.cancel()
            await asyncio.gather(out, inp, idle, return_exceptions=True)
            await self._kill()
            self.exit.close()
        if error is not None:
            await refuse(self.ch, *error)
        else:
            await finish(self.ch, None)
        return exit_code(self.exit.future.result())

    async def _exited(self, out: asyncio.Task[None], inp: asyncio.Task[None], idle: asyncio.Task[None]) -> int:
        """The shell exited: the rest of its output, then ``exit`` (unless the client went away
        or stopped reading for ``idle_timeout``)."""
        code = exit_code(self.exit.future.result())
        await asyncio.wait((out, inp, idle), return_when=asyncio.FIRST_COMPLETED)
        drained = out.done() and out.exception() is None
        await finish(self.ch, control("exit", code=code) if drained else None)
        return code

    async def _kill(self) -> None:
        """SIGHUP (and SIGCONT) to the shell's process group and the terminal's foreground one,
        SIGKILL after ``kill_grace``; returns once the shell is reaped."""
        if self.exit.future.done():
            return
        groups = {self.proc.pid}
        with contextlib.suppress(OSError):
            groups.add(os.tcgetpgrp(self.master))
        for sig in (signal.SIGHUP, signal.SIGCONT):
            self._signal(groups, sig)
        await asyncio.wait((self.exit.future,), timeout=self.kill_grace)
        if not self.exit.future.done():
            log.warning("terminal: the shell (pid %d) outlived SIGHUP by %g s: SIGKILL", self.proc.pid,
                        self.kill_grace)
            self._signal(groups, signal.SIGKILL)
            await self.exit.future

    @staticmethod
    def _signal(groups: set[int], sig: int) -> None:
        for pgid in groups:
            if pgid > 0:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)


async def run_terminal(ch: Channel, cols: int, rows: int, config: RemoteConfig, *,
                       limit: SessionLimit | None = None, shells_file: Path = SHELLS_FILE,
                       kill_grace: float = KILL_GRACE) -> int:
    """Run a shell on a PTY of ``cols`` x ``rows`` over ``ch`` until it exits (its exit code is
    returned, after ``{"type": "exit"}`` was sent), the channel is gone or the session is idle
    (the shell is then killed and reaped; its code is returned). The channel is closed on
    return. :class:`~corral.agent.remote.channel.RemoteError` when the session is refused
    (terminals off, a bad window size, a shell not in /etc/shells, a user the agent cannot
    switch to, ``limit`` reached) or the shell cannot start; the peer got ``error`` first.

    ``limit``: the agent's :class:`SessionLimit`, for a slot held while the shell runs; ``None``
    when the caller took the session's slot itself (before opening the channel)."""
    if not config.terminal:
        raise await refuse(ch, "terminals are turned off on this device (remote.terminal = false)")
    if not window_ok(cols, rows):
        raise await refuse(ch, f"a terminal needs a window size of 1 to {MAX_WINDOW} columns and rows, "
                               f"not {cols!r} x {rows!r}")
    if (problem := shell_problem(config.shell, shells_file)) is not None:
        raise await refuse(ch, problem)
    account = account_for(config.user)
    if isinstance(account, str):
        raise await refuse(ch, account)
    slot = limit.try_acquire() if limit is not None else None
    if limit is not None and slot is None:
        raise await refuse(ch, f"this device has {limit.max_sessions} terminals open already (remote.max_sessions)")
    try:
        master, slave = os.openpty()
        try:
            set_window(master, cols, rows)
            if account.switch:  # the terminal belongs to its user, as login(1) has it
                os.fchown(slave, account.uid, -1)
                os.fchmod(slave, 0o620)
            try:
                proc = _spawn(config.shell, account, slave)
            except (OSError, subprocess.SubprocessError) as e:
                os.close(master)
                raise await refuse(ch, f"cannot start the shell {config.shell}: {getattr(e, 'strerror', None) or e}",
                                   CLOSE_ERROR) from None
        finally:
            os.close(slave)
        try:
            os.set_blocking(master, False)
            log.info("terminal: %s started as %s (pid %d), %dx%d", config.shell, account.name, proc.pid, cols, rows)
            code = await _Session(ch, master, proc, config, kill_grace).run()
            log.info("terminal: pid %d ended with %d", proc.pid, code)
            return code
        finally:
            os.close(master)
    finally:
        if slot is not None:
            slot.release()
