"""``corral sim``: N real agents in one process, for demos, benchmarks and scale tests.

Every simulated device is a real :class:`corral.agent.connection.Agent` — the same identity,
handshake, heartbeat, backoff and command code as on hardware — with a
:class:`~corral.agent.platform.sim.SimPlatform` in place of the operating system (DESIGN §1).

* **Identities persist**: device *i* keeps its key in ``state_dir/sim-000i/``, so running the
  simulator again brings back the same fleet (same device IDs, already enrolled).
* **Tokens round-robin**: device *i* presents ``enroll_tokens[i % len(enroll_tokens)]``
  (none: the devices enroll as pending).
* **Staggered start**: devices start as a Poisson process at ``start_rate`` per second, and
  no faster than the server answers (at most ``max_connecting`` started devices still waiting
  for their first answer), so 10,000 devices neither open 10,000 sockets in the same instant
  nor queue up past their handshake timeout on a slow server. Afterwards, reconnects are
  spread by the agents' own full-jitter backoff.
* **Deployments are simulated**: each device's ``agent.updates`` is a
  :class:`~corral.sim.updates.SimUpdater` (the real runner's protocol, no downloads or files),
  with the fleet's :class:`~corral.sim.updates.SimUpdateSettings`: how long an update takes,
  how often one fails, and which versions are "bad" releases (more CPU, ``app.crashes``).
* **Cheap per device**: one event loop, one task per device (plus its socket), no threads per
  device; the codec, command registry, config and random generator are shared. Key files are
  read and written on the default thread pool, never on the event loop.

A one-line summary goes to stderr every ``summary_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import msgspec

from corral.agent.config import AgentConfig, config_from_dict
from corral.agent.connection import Agent, Outcome
from corral.agent.identity import Identity, StateStore, ensure_private_dir
from corral.agent.platform.sim import DEFAULT_MODELS, SimPlatform, sim_hostname
from corral.agent.rules import AgentRules
from corral.agent.telemetry.pump import TelemetryPump
from corral.agent.telemetry.spool import MemorySpool, SpoolLimits
from corral.errors import CorralError, InvalidInput
from corral.protocol import CloseCode
from corral.sim.updates import DEFAULT_UPDATE_SETTINGS, SimUpdater, SimUpdateSettings

log = logging.getLogger("corral.sim")

DEFAULT_START_RATE = 500.0  # devices started per second
DEFAULT_MAX_CONNECTING = 200  # started devices still waiting for the server's first answer
DEFAULT_SUMMARY_INTERVAL = 10.0
DEFAULT_BOOT_DELAY = (2.0, 5.0)  # a simulated reboot takes this long (uniform), seconds
SIM_SPOOL_BYTES = 4 * 1024 * 1024  # per simulated device: a few hours offline at the default interval


def default_sim_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "corral" / "sim"


def _load_identity(state_dir: Path) -> tuple[Identity, StateStore]:
    return Identity.load_or_create(state_dir), StateStore(state_dir)


class SimFleet:
    """The running simulated devices and their counters."""

    def __init__(
        self,
        config: AgentConfig,
        enroll_tokens: Sequence[str],
        devices: int,
        state_dir: Path,
        models: Sequence[str],
        seed: int,
        boot_delay: tuple[float, float] = DEFAULT_BOOT_DELAY,
        updates: SimUpdateSettings = DEFAULT_UPDATE_SETTINGS,
    ) -> None:
        self.config = config
        self.tokens = list(enroll_tokens)
        self.devices = devices
        self.state_dir = state_dir
        self.models = tuple(models)
        self.seed = seed
        self.boot_delay = boot_delay
        self.update_settings = updates
        # one generator for every device's jitter (start, backoff, reboot); the event loop is
        # single-threaded, and a Random per device would cost ~2.5 KiB each
        self.rng = random.Random(seed)
        self.agents: list[Agent | None] = [None] * devices
        self.device_tasks: list[asyncio.Task[Outcome] | None] = [None] * devices
        self.tasks: set[asyncio.Task[Outcome]] = set()
        self.started = 0
        self.refused = 0
        self.failed = 0
        self.first_error: str | None = None
        self.all_ended = asyncio.Event()

    async def start(self, rate: float, max_connecting: int = 0) -> None:
        """Start the devices one by one with exponentially distributed gaps (mean 1/rate).

        With ``max_connecting`` > 0 the start is also closed-loop: a device starts only while
        fewer than that many started devices are still on their way to their first session, so
        a slow server sees connections as fast as it takes them, not a queue that outlives the
        agents' handshake timeout.
        """
        loop = asyncio.get_running_loop()
        at = loop.time()
        connecting: list[int] = []
        for i in range(self.devices):
            while 0 < max_connecting <= len(connecting):
                connecting = [j for j in connecting if self._still_connecting(j)]
                if len(connecting) < max_connecting:
                    break
                await asyncio.sleep(0.01)
                at = max(at, loop.time())  # the Poisson clock does not bank the waiting time
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(self._run_device(i), name=sim_hostname(i))
            self.device_tasks[i] = task
            self.tasks.add(task)
            task.add_done_callback(self._ended)
            self.started += 1
            connecting.append(i)
            at += self.rng.expovariate(rate)

    def _still_connecting(self, i: int) -> bool:
        """Started, not ended, and no answer from the server yet (neither welcome nor close)."""
        task = self.device_tasks[i]
        if task is None or task.done():
            return False
        agent = self.agents[i]
        return agent is None or (agent.sessions == 0 and agent.last_close_code is None)

    async def _run_device(self, i: int) -> Outcome:
        device_dir = self.state_dir / sim_hostname(i)
        identity, store = await asyncio.to_thread(_load_identity, device_dir)
        platform = SimPlatform(i, self.seed, self.models, boot_delay=self.boot_delay, rng=self.rng)
        token = self.tokens[i % len(self.tokens)] if self.tokens else None
        cfg = self.config
        tag = identity.device_id[:12]
        rules = AgentRules(platform, cfg.rules, device_dir, tag)
        await asyncio.to_thread(rules.load)
        pump = self._make_pump(i, platform, rules, tag) if cfg.telemetry.enabled else None
        agent = Agent(cfg, identity, platform, store=store, rng=self.rng, enroll_token=token, telemetry=pump,
                      rules=rules)
        updater = SimUpdater(self.update_settings, self.rng, on_finished=agent.send_inventory)
        agent.updates = platform.software = updater
        self.agents[i] = agent
        try:
            return await agent.run()
        finally:
            await updater.close()

    def _make_pump(self, i: int, platform: SimPlatform, rules: AgentRules, tag: str) -> TelemetryPump:
        """Device ``i``'s telemetry pump (a benchmark overrides this to time its batches)."""
        t = self.config.telemetry
        return TelemetryPump(platform, self._spool(), interval=t.interval, send_window=t.send_window, rules=rules,
                             blocking_spool=False, tag=tag)

    def _spool(self) -> MemorySpool:
        """The agent's spool semantics, in memory (thousands of simulated devices must not fsync)
        and bounded lower than a real device's."""
        t = self.config.telemetry
        return MemorySpool(SpoolLimits(max_bytes=min(t.spool_max_bytes, SIM_SPOOL_BYTES),
                                       max_batches=t.spool_max_batches))

    def _ended(self, task: asyncio.Task[Outcome]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.failed += 1
            if self.first_error is None:
                self.first_error = exc.detail if isinstance(exc, CorralError) else repr(exc)
                log.error("%s failed: %s", task.get_name(), self.first_error)
        elif task.result() is Outcome.REFUSED:
            self.refused += 1
        if self.refused + self.failed >= self.devices:
            self.all_ended.set()

    async def stop(self) -> None:
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def summary(self) -> str:
        connected = accepted = pending = auth_failed = 0
        for a in self.agents:
            if a is None:
                continue
            if a.connected:
                connected += 1
                if a.status == "accepted":
                    accepted += 1
                elif a.status == "pending":
                    pending += 1
            elif a.last_close_code == CloseCode.AUTH_FAILED:
                auth_failed += 1
        line = f"sim: {connected}/{self.devices} connected ({accepted} accepted, {pending} pending)"
        extras = [
            (self.devices - self.started, "not started"),
            (auth_failed, "auth failed"),
            (self.refused, "refused"),
            (self.failed, "failed"),
        ]
        more = ", ".join(f"{n} {what}" for n, what in extras if n)
        return f"{line}; {more}" if more else line


async def run_sim(
    server: str,
    enroll_tokens: list[str],
    devices: int,
    state_dir: Path,
    models: list[str],
    seed: int,
    stop: asyncio.Event | None = None,
    *,
    start_rate: float = DEFAULT_START_RATE,
    max_connecting: int = DEFAULT_MAX_CONNECTING,
    summary_interval: float = DEFAULT_SUMMARY_INTERVAL,
    boot_delay: tuple[float, float] = DEFAULT_BOOT_DELAY,
    config: AgentConfig | None = None,
    out: TextIO | None = None,
    telemetry_interval: float | None = None,
    updates: SimUpdateSettings = DEFAULT_UPDATE_SETTINGS,
) -> int:
    """Run ``devices`` simulated agents until ``stop`` is set (→ 0).

    Returns 1 (with a one-line error on stderr) if every device ended on its own — all
    refused by the server, or all failed to start. Invalid arguments raise
    :class:`~corral.errors.InvalidInput`. ``config`` replaces the agents' default settings
    (its ``server`` and ``state_dir`` are ignored in favour of the arguments); ``updates`` says how
    the devices take deployments.
    """
    if devices < 1:
        raise InvalidInput(f"--devices must be at least 1, got {devices}")
    if not start_rate > 0:
        raise InvalidInput(f"start rate must be > 0, got {start_rate}")
    if not summary_interval > 0:
        raise InvalidInput(f"summary interval must be > 0, got {summary_interval}")
    if max_connecting < 0:
        raise InvalidInput(f"max connecting must be >= 0 (0: no limit), got {max_connecting}")
    models = [m.strip() for m in models if m.strip()] or list(DEFAULT_MODELS)
    tokens = [t for t in enroll_tokens if t]
    cfg = config_from_dict({"server": server, "state_dir": str(state_dir)})  # validates the URL
    if config is not None:
        cfg = msgspec.structs.replace(config, server=cfg.server, state_dir=cfg.state_dir)
    if telemetry_interval is not None:
        if telemetry_interval < 0:
            raise InvalidInput(f"--telemetry-interval must be >= 0 (0: off), got {telemetry_interval}")
        tcfg = msgspec.structs.replace(cfg.telemetry, interval=telemetry_interval or cfg.telemetry.interval,
                                       enabled=telemetry_interval > 0)
        cfg = msgspec.structs.replace(cfg, telemetry=tcfg)
    await asyncio.to_thread(ensure_private_dir, state_dir)
    stream = out if out is not None else sys.stderr

    fleet = SimFleet(cfg, tokens, devices, state_dir, models, seed, boot_delay, updates)
    print(
        f"sim: starting {devices} devices against {server} (state in {state_dir}, seed {seed})",
        file=stream,
        flush=True,
    )

    async def report() -> None:
        while True:
            await asyncio.sleep(summary_interval)
            print(fleet.summary(), file=stream, flush=True)

    stop = stop if stop is not None else asyncio.Event()
    starter = asyncio.create_task(fleet.start(start_rate, max_connecting))
    reporter = asyncio.create_task(report())
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(fleet.all_ended.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        helpers = [starter, reporter, *waiters]
        for t in helpers:
            t.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        print(fleet.summary(), file=stream, flush=True)  # the fleet as it was, before stopping it
        await fleet.stop()
    if fleet.all_ended.is_set() and not stop.is_set():
        detail = f"{fleet.refused} refused, {fleet.failed} failed"
        if fleet.first_error:
            detail += f" (first error: {fleet.first_error})"
        print(f"error: all {devices} simulated devices stopped: {detail}", file=sys.stderr, flush=True)
        return 1
    return 0


def _raise_open_file_limit(wanted: int) -> None:
    """Each device holds a socket: lift the soft fd limit toward the hard one."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < wanted:
        log.warning("open-file limit is %d, below the %d needed; raise it (ulimit -n)", target, wanted)


def main_sim(
    server: str,
    enroll_tokens: list[str],
    devices: int,
    state_dir: Path | str | None = None,
    models: list[str] | None = None,
    seed: int = 0,
    *,
    start_rate: float = DEFAULT_START_RATE,
    max_connecting: int = DEFAULT_MAX_CONNECTING,
    summary_interval: float = DEFAULT_SUMMARY_INTERVAL,
    verbose: bool = False,
    telemetry_interval: float | None = None,
    updates: SimUpdateSettings = DEFAULT_UPDATE_SETTINGS,
) -> int:
    """The ``corral sim`` command: already-parsed flags in, exit code out (0, or 1 on error)."""
    from corral.agent.main import run_until_signalled, setup_logging

    setup_logging("info" if verbose else "warning")
    if not verbose:
        # thousands of devices repeating the same warning help nobody: the summary counts them
        logging.getLogger("corral.agent").setLevel(logging.ERROR)
    _raise_open_file_limit(devices + 256)
    path = Path(state_dir) if state_dir is not None else default_sim_state_dir()
    try:
        return run_until_signalled(
            lambda stop: run_sim(
                server,
                enroll_tokens,
                devices,
                path,
                list(models or DEFAULT_MODELS),
                seed,
                stop,
                start_rate=start_rate,
                max_connecting=max_connecting,
                summary_interval=summary_interval,
                telemetry_interval=telemetry_interval,
                updates=updates,
            )
        )
    except CorralError as exc:
        print(f"error: {exc.detail}", file=sys.stderr, flush=True)
        return 1
