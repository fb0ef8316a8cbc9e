"""``corral agent``: run one device's agent until stopped.

:func:`run_agent` is the async entry point (tests, embedding); :func:`main_agent` is what the
CLI calls: it loads the config (file + flags), sets up logging, installs SIGTERM/SIGINT
handlers, runs on uvloop when installed, and returns the process exit code:

    0   stopped by a signal (or the ``stop`` event)
    1   a permanent error, printed on stderr in one line: the server refused this device
        (rejected or decommissioned) or the configuration is invalid; restarting will not help
    70  an internal error (a bug; the traceback is logged); a service manager should restart
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from corral.agent.config import AgentConfig, load_config
from corral.agent.connection import Agent, Outcome
from corral.agent.identity import Identity, StateStore
from corral.agent.platform.base import Platform
from corral.agent.rules import AgentRules
from corral.agent.telemetry.localsock import AppMetrics, serve_local_socket
from corral.agent.telemetry.pump import TelemetryPump
from corral.agent.telemetry.spool import DiskSpool, SpoolError, SpoolLimits
from corral.errors import CorralError, InvalidInput

log = logging.getLogger("corral.agent")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERNAL = 70  # EX_SOFTWARE

T = TypeVar("T")


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _load_identity(state_dir: Path) -> tuple[Identity, StateStore]:
    return Identity.load_or_create(state_dir), StateStore(state_dir)


async def run_agent(config: AgentConfig, platform: Platform | None = None, stop: asyncio.Event | None = None) -> int:
    """Run the agent until ``stop`` is set (→ 0) or the server refuses the device (→ 1)."""
    try:
        identity, store = await asyncio.to_thread(_load_identity, config.state_dir)
        token = config.token()
    except CorralError as exc:
        _error(exc.detail)
        return EXIT_ERROR
    if platform is None:
        from corral.agent.platform.linux import LinuxPlatform

        platform = LinuxPlatform(config.state_dir, config.reboot_command)
    try:
        pump, rules, local = await _telemetry(config, platform, identity.device_id[:12])
    except CorralError as exc:
        _error(exc.detail)
        return EXIT_ERROR
    agent = Agent(config, identity, platform, store=store, enroll_token=token, telemetry=pump, rules=rules)
    agent.updates = await _updates(config, agent)
    log.info("device %s (agent %s) connecting to %s", identity.device_id, _version(), config.device_url)
    try:
        return await _run(agent, identity.device_id, stop)
    finally:
        if local is not None:
            local.close()
        if agent.updates is not None:
            await agent.updates.close()


def _has_update_state(config: AgentConfig) -> bool:
    """Whether this device has installed apps or a deployment under way: only then is the update
    code loaded at start (ADR 0007), to start the apps and resume the deployment."""
    if not config.update.enabled:
        return False
    if (config.state_dir / "update" / "record").exists():
        return True
    try:
        return any(config.apps_dir.iterdir())
    except OSError:
        return False


async def _updates(config: AgentConfig, agent: Agent) -> Any:
    if not await asyncio.to_thread(_has_update_state, config):
        return None
    return await agent.start_updates()


async def _telemetry(config: AgentConfig, platform: Platform,
                     tag: str) -> tuple[TelemetryPump | None, AgentRules, asyncio.AbstractServer | None]:
    """The telemetry pump (disk spool, rules, the local metrics socket) for a real device."""
    rules = AgentRules(platform, config.rules, config.state_dir, tag)
    await asyncio.to_thread(rules.load)
    t = config.telemetry
    if not t.enabled:
        return None, rules, None
    try:
        spool = await asyncio.to_thread(DiskSpool, config.state_dir / "spool",
                                        SpoolLimits(max_bytes=t.spool_max_bytes, max_batches=t.spool_max_batches))
    except (OSError, SpoolError) as e:
        raise InvalidInput(f"cannot open the telemetry spool in {config.state_dir / 'spool'}: {e}") from None
    app = AppMetrics()
    local = None
    sock = config.metrics_socket_path
    if sock is not None:
        try:
            local = await serve_local_socket(sock, app)
        except OSError as e:  # metrics from apps are a nicety: the agent runs without them
            log.warning("cannot open the metrics socket %s: %s", sock, e)
    pump = TelemetryPump(platform, spool, interval=t.interval, send_window=t.send_window, rules=rules, app=app,
                         blocking_spool=True, tag=tag)
    return pump, rules, local


async def _run(agent: Agent, identity_id: str, stop: asyncio.Event | None) -> int:
    if stop is None:
        outcome = await agent.run()
    else:
        task = asyncio.create_task(agent.run())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stopper):
                t.cancel()
            await asyncio.gather(task, stopper, return_exceptions=True)
        if task.cancelled():
            log.info("device %s: agent stopped", identity_id)
            return EXIT_OK
        outcome = task.result()
    if outcome is Outcome.REFUSED:
        _error(f"device {identity_id} was refused by the server (rejected or decommissioned); not retrying")
        return EXIT_ERROR
    if outcome is Outcome.EXIT and agent.exit_code is not None:
        log.info("device %s: agent exits with %d", identity_id, agent.exit_code)
        return agent.exit_code
    return EXIT_OK


def _version() -> str:
    import corral

    return corral.__version__


def setup_logging(level: str = "info") -> None:
    """Log to stderr unless the embedding program configured logging already."""
    root = logging.getLogger()
    if not root.handlers:
        # under systemd the journal stamps each line already
        fmt = "%(levelname)s %(name)s: %(message)s"
        if not os.environ.get("JOURNAL_STREAM"):
            fmt = "%(asctime)s " + fmt
        logging.basicConfig(stream=sys.stderr, format=fmt)
    logging.getLogger("corral").setLevel(level.upper())


def run_until_signalled(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]], fast_loop: bool = True) -> T:
    """Run ``main(stop)`` with SIGTERM/SIGINT setting ``stop``, on uvloop when installed and
    ``fast_loop`` (the simulator's thousands of sockets; one agent's single socket does not
    need it, and saves the memory)."""

    async def wrapper() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            return await main(stop)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if fast_loop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(wrapper())


def main_agent(
    config: AgentConfig | None = None,
    *,
    config_file: Path | str | None = None,
    server: str | None = None,
    enroll_token: str | None = None,
    state_dir: Path | str | None = None,
    tuf_root: Path | str | None = None,
) -> int:
    """The ``corral agent`` command: already-parsed flags in, exit code out.

    Pass a ready ``config``, or the flags (``config_file`` is read first, flags override it).
    """
    try:
        if config is None:
            config = load_config(config_file, server=server, enroll_token=enroll_token, state_dir=state_dir,
                                 tuf_root=tuf_root)
    except CorralError as exc:
        _error(exc.detail)
        return EXIT_ERROR
    setup_logging(config.log_level)
    cfg = config

    async def agent(stop: asyncio.Event) -> int:
        # One worker thread for the agent's blocking calls (the key and state files, the spool's
        # fsync'd writes): they come one at a time, and every extra thread keeps a stack and a
        # malloc arena of its own for the life of the process (ADR 0007).
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1, thread_name_prefix="corral-agent"))
        return await run_agent(cfg, stop=stop)

    try:
        return run_until_signalled(agent, fast_loop=False)
    except Exception:
        log.exception("the agent crashed")
        return EXIT_INTERNAL
