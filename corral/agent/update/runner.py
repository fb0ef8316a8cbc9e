"""The update runner: one deployment at a time through the update flow (ADR 0009, ADR 0012).

The agent imports this module only when a ``deploy`` message arrives or when it starts with an
update record (or installed apps) on disk (ADR 0007). The loop is ADR 0009's:
``step`` → persist the record atomically → report its status → perform the actions →
``step`` with the event each ended in. The blocking work (``corral tuf-client`` as a
subprocess, extraction, health checks) runs in one thread of the runner's own, so the agent's
event loop keeps its heartbeats and telemetry going.

On disk, under ``STATE_DIR/update``: ``job`` (the ``deploy`` message, written first), ``record``
(the :class:`UpdateRecord`), ``download`` (how the artifact arrived: ``delta`` or ``full``),
``finished`` (the final reports of the last deployments, so a ``deploy`` sent again after the
end is answered with its outcome), ``tuf/`` (the client's trusted metadata), ``downloads/``,
``deltas/`` and ``bases/NAME/SHA256`` (the file of the version of NAME last committed).

Deltas (ADR 0014): when the ``deploy`` message offers one from a version whose file is in
``bases/``, the runner downloads the delta (a TUF target of its own, verified by ``corral
tuf-client``), rebuilds the artifact from it in a short-lived ``python -m corral.delta apply``
process, then runs the usual ``corral tuf-client download`` of the artifact, which finds the
rebuilt file, checks it against the signed hashes and downloads nothing. If any of that fails,
the full artifact is downloaded as if no delta had been offered.

Reports are at-least-once: the last one is re-sent after every reconnect until the server's
``deployment_ack`` for its ``seq`` (or a later one) arrives.

Trust: the TUF root is the one provisioned in ``[update] tuf_root``; without it, the root the
server serves as ``1.root.json`` is trusted on the first update (trust on first use, logged as
a warning) and every later root must be signed by it (TUF's root rotation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import quote

import msgspec

from corral import protocol
from corral.agent.config import AgentConfig
from corral.agent.update import kinds
from corral.agent.update.actions import perform, verify
from corral.agent.update.app_bundle import AppConfig
from corral.agent.update.installers import ArtifactRefused, Installer, InstallError
from corral.agent.update.supervisor import Supervisor, installed_apps
from corral.core import update_flow as flow
from corral.core.update_flow import ActionKind, Event, EventKind, UpdateLimits, UpdateRecord
from corral.fileio import atomic_write, fsync_dir

log = logging.getLogger("corral.agent.update")

FINISHED_KEPT = 50
#: Fault injection, for the crash tests only: a comma-separated list of points where the agent
#: SIGKILLs itself — ``persisted:STATE`` (the record in STATE is on disk, its actions not begun)
#: or ``performed:ACTION`` (the action's side effect done, the event it ended in not persisted).
#: Together they are every place a power cut can fall between two steps of the flow.
CRASH_AT_ENV = "CORRAL_UPDATE_CRASH_AT"

T = TypeVar("T")
Send = Callable[[protocol.DeploymentReport], Awaitable[None]]


class _Finished(msgspec.Struct):
    reports: list[protocol.DeploymentReport] = []


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _tail(text: str, limit: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[-limit:]


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


class UpdateRunner:
    """``on_finished`` is awaited after a deployment ends (the agent re-sends its inventory, which
    lists the installed apps' versions)."""

    def __init__(self, config: AgentConfig, on_finished: Callable[[], Awaitable[None]] | None = None,
                 exit_agent: Callable[[int], None] | None = None) -> None:
        u = config.update
        self.config = config
        self.dir = config.state_dir / "update"
        self.apps_dir = config.apps_dir
        self.limits = UpdateLimits(health_timeout=u.health_timeout)
        self.supervisor = Supervisor(self.apps_dir, stop_timeout=u.stop_timeout)
        self.app_config = AppConfig(self.apps_dir, reserve=u.reserve_bytes, health_interval=u.health_interval)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="corral-update")
        self._send: Send | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._queue: list[protocol.Deploy] = []
        self._last: protocol.DeploymentReport | None = None
        self._acked: tuple[str, int] | None = None
        self._current: str | None = None
        self._checked_timeout: float | None = None
        self._download_kind: Literal["", "delta", "full"] = ""
        self._on_finished = on_finished
        self._crash_at = frozenset(filter(None, os.environ.get(CRASH_AT_ENV, "").split(",")))
        self._exit_agent = exit_agent
        self._platform = kinds.Platform(request_agent_restart=self._hand_over, reboot=self._reboot)
        self._job: protocol.Deploy | None = None
        self._connected = threading.Event()  # a session with the server is up (attach/detach)
        self.installed = kinds.Installed(self.dir / "installed.json")

    # --- files ----------------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.dir / "record"

    @property
    def job_path(self) -> Path:
        return self.dir / "job"

    @property
    def download_kind_path(self) -> Path:
        return self.dir / "download"

    def _persist(self, record: UpdateRecord) -> None:
        atomic_write(self.record_path, flow.encode(record))

    def _load(self) -> tuple[protocol.Deploy, UpdateRecord] | None:
        try:
            job = msgspec.json.decode(self.job_path.read_bytes(), type=protocol.Deploy)
            record = flow.decode(self.record_path.read_bytes())
        except FileNotFoundError:
            return None
        return job, record

    def _finished(self) -> list[protocol.DeploymentReport]:
        try:
            return msgspec.json.decode((self.dir / "finished").read_bytes(), type=_Finished).reports
        except (FileNotFoundError, msgspec.DecodeError):
            return []

    def _finish(self, report: protocol.DeploymentReport) -> None:
        """Remember the outcome, then drop the record and the download: the deployment is over."""
        kept = [r for r in self._finished() if r.deployment_id != report.deployment_id][-(FINISHED_KEPT - 1):]
        atomic_write(self.dir / "finished", msgspec.json.encode(_Finished([*kept, report])))
        for p in (self.record_path, self.job_path, self.download_kind_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for folder in (self.dir / "downloads", self.dir / "deltas"):
            if folder.is_dir():
                for f in folder.iterdir():
                    with contextlib.suppress(OSError):
                        f.unlink()
        self._download_kind = ""

    def _base_dir(self, name: str) -> Path:
        return self.dir / "bases" / quote(name, "")

    def _keep_base(self, job: protocol.Deploy, artifact: Path | None) -> None:
        """The committed artifact's file becomes the base of ``job.name``'s next delta, replacing
        the one before (named by its sha256, so a crash in between leaves two candidate files,
        never a file under the wrong name; the next keep removes the other)."""
        if not self.config.update.keep_delta_base or artifact is None or not artifact.is_file() \
                or not _is_sha256(job.sha256):
            return
        folder = self._base_dir(job.name)
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(artifact, folder / job.sha256)
        fsync_dir(folder)
        for f in folder.iterdir():
            if f.name != job.sha256:
                with contextlib.suppress(OSError):
                    f.unlink()

    # --- the agent's side ---------------------------------------------------------------------

    async def start(self) -> None:
        """At agent start: start (or adopt) the installed apps, then resume a deployment that a
        crash or restart interrupted (ADR 0012 step 6)."""
        self._loop = asyncio.get_running_loop()
        await self._in_thread(self._start_apps)
        found = await self._in_thread(self._load)
        if found is not None:
            job, record = found
            self._current = job.deployment_id
            self._task = self._loop.create_task(self._drive(job, record, resumed=True))

    def _start_apps(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.supervisor.start_all()

    async def attach(self, send: Send) -> None:
        """Connected: re-send the last report unless the server has acked it."""
        self._send = send
        self._connected.set()
        last = self._last
        if last is not None and self._acked != (last.deployment_id, last.seq):
            await self._try_send(last)

    def detach(self) -> None:
        self._send = None
        self._connected.clear()

    def _reconnected(self, deadline: float | None) -> bool:
        """Wait (in the runner's thread) until the agent has a session with the server, at most
        until ``deadline``: part of the health check after a reboot or an agent hand-over."""
        return self._connected.wait(max((deadline or time.time()) - time.time(), 0.0))

    # --- restarts the installers ask for ---------------------------------------------------------

    def _hand_over(self) -> None:
        """Agent self-update: the record says ``restarting`` (persisted before the action): exit
        with 75 so that the watchdog starts the agent of the new slot."""
        if self._exit_agent is None or self._loop is None:
            raise InstallError("this agent cannot hand over to a new one (not run by `corral agent`)")
        from corral.agent.update.watchdog import EXIT_RESTART

        log.warning("handing over to the new agent (exit %d to the watchdog)", EXIT_RESTART)
        self._loop.call_soon_threadsafe(self._exit_agent, EXIT_RESTART)

    def _reboot(self) -> None:
        """Rootfs: run the reboot command; the device goes down and the agent with it, and the
        agent that starts next finds the record in ``restarting``."""
        command = self.config.reboot_command
        log.warning("rebooting into the new root partition: %s", " ".join(command))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InstallError(f"the reboot command {command[0]} failed: {e}") from None
        if done.returncode != 0:
            raise InstallError(f"the reboot command exited with {done.returncode}: {_tail(done.stderr + done.stdout)}")

    def on_ack(self, ack: protocol.DeploymentAck) -> None:
        last = self._last
        if last is not None and ack.deployment_id == last.deployment_id and ack.seq >= last.seq:
            self._acked = (ack.deployment_id, ack.seq)

    async def on_deploy(self, msg: protocol.Deploy) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if msg.deployment_id == self._current:
            if self._last is not None and self._last.deployment_id == msg.deployment_id:
                await self._try_send(self._last)  # told again: it has not heard from us
            return
        if any(q.deployment_id == msg.deployment_id for q in self._queue):
            return
        done = [r for r in await self._in_thread(self._finished) if r.deployment_id == msg.deployment_id]
        if done:
            self._last = done[-1]
            await self._try_send(done[-1])
            return
        if self._task is not None and not self._task.done():
            self._queue.append(msg)  # one deployment at a time
            return
        self._begin(msg)

    def _begin(self, msg: protocol.Deploy) -> None:
        assert self._loop is not None
        self._current = msg.deployment_id
        self._task = self._loop.create_task(self._drive(msg, None, resumed=False))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def inventory(self) -> dict[str, str]:
        """The inventory's ``software`` entries of what this device installed: ``KIND.NAME`` →
        version (the apps from their slots, the other kinds as last committed)."""
        return {**self.installed.read(), **{kinds.key("app", k): v for k, v in installed_apps(self.apps_dir).items()}}

    # --- reports ------------------------------------------------------------------------------

    async def _try_send(self, report: protocol.DeploymentReport) -> None:
        send = self._send
        if send is None:
            return  # re-sent at the next attach
        try:
            await send(report)
        except Exception as e:  # disconnected meanwhile: re-sent at the next attach
            log.info("deployment %s: report not sent (%s)", report.deployment_id, e)

    def _report_from_thread(self, report: protocol.DeploymentReport) -> None:
        loop = self._loop
        assert loop is not None

        def go() -> None:
            self._last = report
            loop.create_task(self._try_send(report))

        loop.call_soon_threadsafe(go)

    def _report(self, record: UpdateRecord, installer: Installer | None) -> protocol.DeploymentReport:
        running = ""
        job = self._job
        if installer is not None and job is not None:
            with contextlib.suppress(Exception):
                running = kinds.running_version(installer, self.installed.read(), job)
        s = record.status
        return protocol.DeploymentReport(deployment_id=record.deployment_id, seq=record.seq, status=s.status,
                                         step=s.step, reason=s.reason, running_version=running,
                                         download=self._download_kind)

    # --- the flow -----------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _drive(self, job: protocol.Deploy, record: UpdateRecord | None, resumed: bool) -> None:
        try:
            await self._in_thread(self._run, job, record, resumed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deployment %s: the update runner failed", job.deployment_id)
        finally:
            self._current = None
            self._task = None
            if self._queue:
                self._begin(self._queue.pop(0))
        if self._on_finished is not None and self._send is not None:
            try:
                await self._on_finished()
            except Exception as e:  # disconnected: the inventory goes with the next connect
                log.info("inventory not sent after deployment %s: %s", job.deployment_id, e)

    def _refuse(self, job: protocol.Deploy, reason: str) -> None:
        """A deployment this device cannot take: failed at once, nothing changed."""
        report = protocol.DeploymentReport(deployment_id=job.deployment_id, seq=1, status="failed", step="idle",
                                           reason=reason)
        self._finish(report)
        self._report_from_thread(report)
        log.warning("deployment %s refused: %s", job.deployment_id, reason)

    def _run(self, job: protocol.Deploy, record: UpdateRecord | None, resumed: bool) -> None:
        """The whole deployment, in the runner's thread."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._job = job
        try:
            installer = kinds.make_installer(self.config, job, self.supervisor, self.app_config, self._platform)
        except ArtifactRefused as e:
            if record is None:
                self._refuse(job, e.detail)
                return
            raise  # a deployment under way whose kind the config no longer allows: kept for a person
        artifact: Path | None = None
        if record is None:
            try:
                where = kinds.slots(installer, self.installed.read(), job)
            except ArtifactRefused as e:
                self._refuse(job, e.detail)
                return
            record = flow.new_record(
                job.deployment_id, flow.Artifact(job.name, job.version, job.kind),
                target_slot=where.target, previous_slot=where.previous, previous_version=where.previous_version,
                health_timeout=job.health_timeout, limits=self.limits)
            atomic_write(self.job_path, msgspec.json.encode(job))
            record, actions = self._advance(record, Event(EventKind.START, time.time()), installer)
        else:
            with contextlib.suppress(FileNotFoundError, ValueError):
                kind = self.download_kind_path.read_text()
                self._download_kind = kind if kind in ("delta", "full") else ""  # type: ignore[assignment]
            now = time.time()
            undone = kinds.verdict(installer, record, now)
            if undone is not None:  # the watchdog or the bootloader went back already: say why
                log.warning("deployment %s: %s", job.deployment_id, undone.reason)
                record, actions = flow.step(record, undone, self.limits)
            else:
                record, actions = flow.resume(record, now, self.limits,
                                              restarted=kinds.restarted(installer, record))
            self._persist(record)
            self._report_from_thread(self._report(record, installer))
            artifact = self._downloaded(job)
        while True:
            events: list[Event] = []
            for action in actions:
                if action.kind is ActionKind.DOWNLOAD:
                    event, artifact = self._download(job)
                elif action.kind is ActionKind.VERIFY:
                    if artifact is None:
                        artifact = self._downloaded(job)
                    event = self._verify(job, installer, artifact, record)
                    if event.kind is EventKind.VERIFIED and self._checked_timeout is not None \
                            and job.health_timeout is None:  # the artifact's own wins (ADR 0012)
                        record = msgspec.structs.replace(record, health_timeout=self._checked_timeout)
                elif action.kind is ActionKind.START_HEALTH_CHECK and kinds.needs_reconnect(job.kind) \
                        and not self._reconnected(action.deadline):
                    event = Event(EventKind.UNHEALTHY, time.time(), "the agent did not reconnect to the server "
                                  f"within the health timeout ({record.health_timeout:g}s)")
                else:
                    if artifact is None:
                        artifact = self._downloaded(job)
                    found = perform(installer, action, artifact if artifact is not None else Path("/nonexistent"))
                    if found is None:
                        self._crash_point(f"performed:{action.kind}")
                        continue
                    event = found
                self._crash_point(f"performed:{action.kind}")
                events.append(event)
            if not events:
                break
            for event in events:
                if event.kind is EventKind.COMMITTED:  # before the record says so: reported with it
                    self.installed.committed(job.kind, job.name, job.version)
                record, actions = self._advance(record, event, installer)
        if record.final:
            if record.state is flow.State.COMMITTED:
                self._keep_base(job, artifact if artifact is not None else self._downloaded(job))
            report = self._report(record, installer)
            self._finish(report)
            self._report_from_thread(report)
            log.info("deployment %s: %s %s", job.deployment_id, record.status.status, record.status.reason)

    def _advance(self, record: UpdateRecord, event: Event,
                 installer: Installer) -> tuple[UpdateRecord, tuple[flow.Action, ...]]:
        record, actions = flow.step(record, event, self.limits)
        self._persist(record)  # before any action (ADR 0009)
        self._crash_point(f"persisted:{record.state}")
        self._report_from_thread(self._report(record, installer))
        return record, actions

    def _crash_point(self, point: str) -> None:
        if point in self._crash_at:
            log.warning("crash injected at %s (%s)", point, CRASH_AT_ENV)
            os.kill(os.getpid(), signal.SIGKILL)

    def _verify(self, job: protocol.Deploy, installer: Installer, artifact: Path | None,
                record: UpdateRecord) -> Event:
        self._checked_timeout = None
        if artifact is None:
            return Event(EventKind.VERIFY_FAILED, time.time(), "the downloaded artifact is gone")
        event, checked = verify(installer, artifact)
        if checked is not None:
            self._checked_timeout = checked.health_timeout
        return event

    # --- corral tuf-client ---------------------------------------------------------------------

    def _tuf(self, job: protocol.Deploy, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "corral", "tuf-client", "--metadata-dir", str(self.dir / "tuf"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=self.config.update.download_timeout,
                              check=False, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})

    def _trust(self, job: protocol.Deploy) -> str | None:
        """Initialise the TUF client once: the provisioned root, else trust on first use."""
        meta = self.dir / "tuf"
        if (meta / "root.json").exists():
            return None
        meta.mkdir(parents=True, exist_ok=True)
        root = self.config.update.tuf_root
        if root is None:
            import urllib.request

            url = job.metadata_url.rstrip("/") + "/1.root.json"
            if not url.startswith(("http://", "https://")):  # never file:// or another scheme urllib knows
                return f"cannot trust the TUF root: metadata URL {job.metadata_url!r} is not http(s)"
            log.warning("no [update] tuf_root provisioned: trusting %s on first use", url)
            root = self.dir / "root-tofu.json"
            with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 (http(s) URL from the server)
                atomic_write(root, r.read())
        done = self._tuf(job, "init", str(root))
        return None if done.returncode == 0 else f"cannot trust the TUF root: {_tail(done.stderr)}"

    def _downloaded(self, job: protocol.Deploy) -> Path | None:
        path = self.dir / "downloads" / quote(job.target_name, "")
        return path if path.exists() else None

    def _download(self, job: protocol.Deploy) -> tuple[Event, Path | None]:
        try:
            why = self._trust(job)
        except OSError as e:
            why = f"cannot fetch the TUF root: {e}"
        if why is not None:
            return Event(EventKind.DOWNLOAD_FAILED, time.time(), why), None
        downloads = self.dir / "downloads"
        downloads.mkdir(exist_ok=True)
        rebuilt = self._rebuild_from_delta(job, downloads / quote(job.target_name, ""))
        try:
            done = self._tuf_download(job, job.target_name, downloads)
        except subprocess.TimeoutExpired:
            return Event(EventKind.DOWNLOAD_FAILED, time.time(), "the download timed out"), None
        if done.returncode != 0:
            return Event(EventKind.DOWNLOAD_FAILED, time.time(), _tail(done.stderr) or "corral tuf-client failed"), None
        artifact = Path(done.stdout.strip().splitlines()[-1])
        # the client replaces a file it finds wrong: the same inode is the rebuilt file, verified
        via_delta = rebuilt is not None and _inode(artifact) == rebuilt
        if rebuilt is not None and not via_delta:
            log.warning("deployment %s: the file rebuilt from the delta did not verify; downloaded in full",
                        job.deployment_id)
        self._download_kind = "delta" if via_delta else "full"
        atomic_write(self.download_kind_path, self._download_kind.encode())
        return Event(EventKind.DOWNLOADED, time.time()), artifact

    def _tuf_download(self, job: protocol.Deploy, target_name: str, into: Path) -> subprocess.CompletedProcess[str]:
        return self._tuf(job, "--metadata-url", job.metadata_url, "--target-name", target_name,
                         "--target-base-url", job.target_base_url, "--target-dir", str(into), "download")

    def _rebuild_from_delta(self, job: protocol.Deploy, out: Path) -> int | None:
        """Rebuild the artifact into ``out`` from the offered delta and the base file kept from
        the running version; the rebuilt file's inode, or None (no delta offered, no base, or
        any failure: logged, and the caller downloads the full artifact)."""
        offer = job.delta
        if offer is None or not _is_sha256(offer.base_sha256) or not job.size:
            return None
        base = self._base_dir(job.name) / offer.base_sha256
        if not base.is_file():
            log.info("deployment %s: no file of %s@%s kept; downloading the full artifact", job.deployment_id,
                     job.name, offer.base_version)
            return None
        deltas = self.dir / "deltas"
        deltas.mkdir(exist_ok=True)
        try:
            done = self._tuf_download(job, offer.target_name, deltas)
            if done.returncode != 0:
                log.warning("deployment %s: delta not downloaded (%s); downloading the full artifact",
                            job.deployment_id, _tail(done.stderr))
                return None
            delta = Path(done.stdout.strip().splitlines()[-1])
            applied = subprocess.run(
                [sys.executable, "-m", "corral.delta", "apply", str(base), str(delta), str(out),
                 "--sha256", job.sha256, "--length", str(job.size)],
                capture_output=True, text=True, timeout=self.config.update.download_timeout, check=False,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            delta.unlink(missing_ok=True)
        except (subprocess.TimeoutExpired, OSError) as e:
            log.warning("deployment %s: delta not applied (%s); downloading the full artifact", job.deployment_id, e)
            return None
        if applied.returncode != 0:
            log.warning("deployment %s: delta not applied (%s); downloading the full artifact", job.deployment_id,
                        _tail(applied.stderr))
            return None
        log.info("deployment %s: %s@%s rebuilt from the delta from %s", job.deployment_id, job.name, job.version,
                 offer.base_version)
        return _inode(out)
