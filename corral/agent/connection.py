"""The agent's connection loop: connect, prove identity, stay connected, obey commands.

One :class:`Agent` drives one device's WebSocket (DESIGN §3)::

    loop:
        connect {server}/device/v1/connect  (subprotocol corral.v1, binary msgpack frames)
        ← challenge   → hello (signed nonce, enrollment token until accepted)   ← welcome
        → inventory
        loop: → heartbeat every heartbeat_interval; ← heartbeat_ack / status / command ...
        on close: refused (4403) → stop for good; otherwise wait a backoff delay and reconnect

Design points:

* **One task per agent.** Heartbeats are sent from the receive loop, which waits for the next
  frame with a deadline (the next heartbeat, or the silence limit), so an idle agent costs one
  suspended task and its socket. That is what lets ``corral sim`` run 10,000 agents in a process.
  Only commands get a short-lived task each, so a slow handler never delays heartbeats.
* **Full-jitter backoff** (:mod:`corral.core.backoff`) between attempts; the first attempt after
  start or after a long-lived session is immediate / short, repeated failures widen the window.
* **Silence detection**: no frame at all from the server for ``heartbeat_timeout_factor``
  times ``heartbeat_interval`` (a dead NAT mapping, a half-open TCP connection) → close and reconnect.
  WebSocket pings are off: the heartbeat already does that job.
* **Decisions separate from the socket**: :func:`build_hello`, :func:`close_action` and the
  command registry are plain functions/objects, tested without a network.
* **Stopping** is cancellation: the task closes its socket with 1001 (going away) and ends.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import random
from typing import Any, Protocol

import msgspec

import corral
from corral import protocol
from corral.agent.commands import BUILTIN_COMMANDS, CommandRegistry
from corral.agent.config import AgentConfig, device_ws_url
from corral.agent.identity import AgentState, Identity, StateStore
from corral.agent.platform.base import Platform
from corral.agent.telemetry.pump import TelemetryPump
from corral.agent.transport import (
    ConnectionClosed,
    HandshakeError,
    InvalidStatus,
    WebSocket,
    connect,
    proxy_from_environment,
)
from corral.core.backoff import Backoff, BackoffPolicy

log = logging.getLogger("corral.agent")

CloseCode = protocol.CloseCode

#: shared by every agent of a process: the codec holds no per-connection state
_CODEC = protocol.Codec()

#: heartbeat intervals a server may ask for are clamped to this range (seconds)
MIN_HEARTBEAT_INTERVAL = 0.01
MAX_HEARTBEAT_INTERVAL = 3600.0

#: server → agent message types the receive loop acts on; anything else is ignored (newer server)
_HANDLED_TYPES = frozenset({"command", "status", "heartbeat_ack", "error", "welcome", "challenge", "telemetry_ack",
                            "rules", "deploy", "deployment_ack", "session_open"})


class RuleHost(Protocol):
    """Receives the server's rule sets (see :mod:`corral.agent.rules`)."""

    async def apply(self, rules: protocol.Rules) -> protocol.RulesAck: ...


class Outcome(enum.Enum):
    """Why :meth:`Agent.run` returned (it otherwise runs until cancelled)."""

    REFUSED = "refused"
    #: :meth:`Agent.request_exit` was called: the process exits with ``Agent.exit_code``
    EXIT = "exit"


class CloseAction(enum.Enum):
    RECONNECT = "reconnect"
    STOP = "stop"


_CLOSE_MESSAGES: dict[int, str] = {
    CloseCode.NORMAL: "the server closed the connection",
    CloseCode.GOING_AWAY: "the server went away",
    CloseCode.TOO_BIG: "a frame was too large for the server",
    CloseCode.SERVER_SHUTDOWN: "the server is shutting down",
    CloseCode.MALFORMED: "the server could not understand this agent",
    CloseCode.AUTH_FAILED: ("authentication failed (wrong, expired or used-up enrollment token, or unknown key)"),
    CloseCode.REFUSED: "refused by the server: the device was rejected or decommissioned",
    CloseCode.TIMEOUT: "the server timed the session out",
    CloseCode.REPLACED: "replaced by another connection of this device",
    CloseCode.RATE_LIMITED: "rate limited by the server",
}


#: server close codes worth a warning (someone should look) rather than an info line
_NOTEWORTHY_CLOSES = frozenset(
    {CloseCode.TOO_BIG, CloseCode.MALFORMED, CloseCode.AUTH_FAILED, CloseCode.REPLACED, CloseCode.RATE_LIMITED}
)


def _close_reason(text: str) -> str:
    """A close frame's reason is limited to 123 bytes of UTF-8."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


def close_action(code: int | None) -> tuple[CloseAction, str]:
    """What the agent does after the server closed with ``code`` (``None``: no close frame)."""
    if code is not None and code in protocol.PERMANENT_CLOSE_CODES:
        return CloseAction.STOP, _CLOSE_MESSAGES.get(code, f"refused (close code {code})")
    if code is None:
        return CloseAction.RECONNECT, "connection lost"
    return CloseAction.RECONNECT, _CLOSE_MESSAGES.get(code, f"closed with code {code}")


@functools.cache
def connect_target(server: str, proxy: str) -> tuple[str, str | None]:
    """(device WebSocket URL, proxy URL or None) for a server and the ``proxy`` setting.

    Resolved once per process: looking the proxy up in the environment on every attempt costs
    more than the rest of a reconnect when the simulator runs thousands of agents.
    """
    url = device_ws_url(server)
    if proxy == "none":
        return url, None
    if proxy == "auto":
        return url, proxy_from_environment(url)
    return url, proxy


def build_hello(
    identity: Identity,
    challenge: protocol.Challenge,
    enroll_token: str | None,
    agent_version: str = corral.__version__,
) -> protocol.Hello:
    """Answer a challenge: sign (nonce, device id, public key) with the device key."""
    payload = protocol.hello_signing_payload(challenge.nonce, identity.device_id, identity.public_key_raw)
    return protocol.Hello(
        device_id=identity.device_id,
        public_key=identity.public_key_raw,
        signature=identity.sign(payload),
        agent_version=agent_version,
        enroll_token=enroll_token or None,
    )


class _SessionEnd(Exception):
    """The agent itself ends the session (silence, malformed frame, refusal in a welcome)."""

    def __init__(self, code: int, reason: str, action: CloseAction = CloseAction.RECONNECT) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.action = action


class Agent:
    """One device's connection to the server. :meth:`run` until it returns or is cancelled.

    Observable state (read by the simulator's summary): :attr:`connected`, :attr:`status`,
    :attr:`last_close_code`, :attr:`sessions`.
    """

    __slots__ = (
        "_auth_failed",
        "_exit",
        "_reboot_requested",
        "_remote_limit",
        "_sessions",
        "_tasks",
        "_token",
        "_ws",
        "backoff",
        "commands",
        "config",
        "connected",
        "exit_code",
        "identity",
        "last_close_code",
        "platform",
        "rules",
        "sessions",
        "status",
        "store",
        "telemetry",
        "updates",
    )

    def __init__(
        self,
        config: AgentConfig,
        identity: Identity,
        platform: Platform,
        *,
        store: StateStore | None = None,
        commands: CommandRegistry = BUILTIN_COMMANDS,
        rng: random.Random | None = None,
        enroll_token: str | None = None,
        telemetry: TelemetryPump | None = None,
        rules: RuleHost | None = None,
    ) -> None:
        self.config = config
        self.telemetry = telemetry
        self.rules = rules
        self.identity = identity
        self.platform = platform
        self.store = store
        self.commands = commands
        b = config.backoff
        self.backoff = Backoff(BackoffPolicy(b.base, b.cap, b.reset_after), rng)
        self._token = enroll_token if enroll_token is not None else config.enroll_token
        self._ws: WebSocket | None = None
        self._tasks: set[asyncio.Task[None]] | None = None
        self._reboot_requested = False
        self._auth_failed = False
        self.connected = False
        self.status: str | None = store.state.status if store is not None else None
        self.last_close_code: int | None = None
        #: sessions established (welcomes received) since start
        self.sessions = 0
        #: the update runner (corral.agent.update.runner), created on the first deployment or at
        #: start when one is on disk (ADR 0007: the update code is not loaded before)
        self.updates: Any = None
        #: set by :meth:`request_exit`: the code the process exits with (75: to the watchdog)
        self.exit_code: int | None = None
        self._exit = asyncio.Event()
        self._sessions: set[asyncio.Task[None]] | None = None
        self._remote_limit: Any = None

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> Outcome:
        """Connect and stay connected, reconnecting with backoff; returns only when refused.

        Telemetry is collected (and spooled) all along, connected or not."""
        collector = None
        if self.telemetry is not None:
            collector = asyncio.get_running_loop().create_task(self.telemetry.run())
        main = asyncio.ensure_future(self._run())
        exiting = asyncio.ensure_future(self._exit.wait())
        try:
            await asyncio.wait({main, exiting}, return_when=asyncio.FIRST_COMPLETED)
            if exiting.done():
                return Outcome.EXIT
            return main.result()
        finally:
            sessions = list(self._sessions or ())
            for t in (main, exiting, *sessions):
                t.cancel()
            await asyncio.gather(main, exiting, *sessions, return_exceptions=True)
            if collector is not None:
                collector.cancel()
                await asyncio.gather(collector, return_exceptions=True)

    async def _run(self) -> Outcome:
        loop = asyncio.get_running_loop()
        while True:
            action, why = await self._connect_once()
            self.backoff.disconnected(loop.time())
            if action is CloseAction.STOP:
                log.info("device %s: %s", self.identity.device_id, why)  # the caller reports it
                return Outcome.REFUSED
            if self._reboot_requested:
                self._reboot_requested = False
                await self._reboot()
                self.backoff.reset()
                continue  # a freshly booted device connects at once
            delay = self.backoff.next_delay()
            # 4409 repeating usually means two devices share one key (a cloned disk image)
            level = logging.WARNING if self.last_close_code in _NOTEWORTHY_CLOSES else logging.INFO
            log.log(level, "device %s: %s; reconnecting in %.1f s", self._tag, why, delay)
            await asyncio.sleep(delay)

    @property
    def _tag(self) -> str:
        return self.identity.device_id[:12]

    def _hello_token(self) -> str | None:
        """The enrollment token goes with hello until the server has accepted this device
        (and again after an auth failure, e.g. a server that lost its database)."""
        if not self._token:
            return None
        enrolled = self.store.state.enrolled if self.store is not None else self.status == "accepted"
        return None if enrolled and not self._auth_failed else self._token

    async def _connect_once(self) -> tuple[CloseAction, str]:
        cfg = self.config
        url, proxy = connect_target(cfg.server, cfg.proxy)
        try:
            async with connect(
                url,
                proxy=proxy,
                subprotocol=protocol.PROTOCOL,
                max_size=cfg.max_frame_bytes,
                open_timeout=cfg.connect_timeout,
                close_timeout=cfg.close_timeout,
                compression=cfg.compression,
                user_agent=f"corral-agent/{corral.__version__}",
            ) as ws:
                self._ws = ws
                try:
                    await self._session(ws)
                except _SessionEnd as end:
                    self.last_close_code = None
                    await ws.close(end.code, _close_reason(end.reason))
                    return end.action, end.reason
                except asyncio.CancelledError:
                    await ws.close(CloseCode.GOING_AWAY, "agent stopping")
                    raise
                finally:
                    self.connected = False
                    self._ws = None
                    if self.telemetry is not None:
                        self.telemetry.detach()
                    if self.updates is not None:
                        self.updates.detach()
                    await self._cancel_tasks()
        except ConnectionClosed as exc:
            if exc.failure is not None:  # this agent failed the connection (the server's close code is moot)
                self.last_close_code = exc.sent
                return CloseAction.RECONNECT, f"closed the connection ({exc.sent}): {exc.failure}"
            code = exc.code
            self.last_close_code = code
            self._auth_failed = code == CloseCode.AUTH_FAILED
            return close_action(code)
        except InvalidStatus as exc:
            return CloseAction.RECONNECT, f"{url} answered HTTP {exc.status_code}"
        except TimeoutError:  # (a subclass of OSError: first)
            return CloseAction.RECONNECT, f"timed out connecting to {url}"
        except (OSError, HandshakeError) as exc:
            return CloseAction.RECONNECT, f"cannot connect to {url}: {exc}"
        except Exception:  # a bug must not kill a device's only way home
            log.exception("device %s: unexpected error in the connection", self._tag)
            return CloseAction.RECONNECT, "internal error"
        return CloseAction.RECONNECT, "connection ended"

    async def _session(self, ws: WebSocket) -> None:
        welcome, sent_token = await self._handshake(ws)
        loop = asyncio.get_running_loop()
        if welcome.status in ("rejected", "decommissioned"):
            # servers close with 4403 instead; a welcome saying so means the same
            _, why = close_action(CloseCode.REFUSED)
            raise _SessionEnd(CloseCode.NORMAL, why, CloseAction.STOP)
        if welcome.status == "pending" and self._token and not sent_token:
            # Accepted once, so the token was held back -- but this server does not know the
            # device (a new database): enroll again with the token instead of waiting for an
            # operator. The state now says "not enrolled", so the next hello carries it.
            await self._set_status("pending")
            raise _SessionEnd(CloseCode.NORMAL, "the server no longer knows this device; enrolling again")
        self.connected = True
        self.sessions += 1
        self.last_close_code = None
        self._auth_failed = False
        self.backoff.connected(loop.time())
        await self._set_status(welcome.status)
        log.info(
            "device %s: connected to %s (%s, session %s)",
            self._tag,
            self.config.server,
            welcome.status,
            welcome.session_id,
        )
        await self.send_inventory()
        if welcome.status == "accepted":
            await self._attach_telemetry()
            if self.updates is not None:
                await self.updates.attach(self._send_report)
        interval = min(max(welcome.heartbeat_interval, MIN_HEARTBEAT_INTERVAL), MAX_HEARTBEAT_INTERVAL)
        await self._serve(ws, interval)

    async def _handshake(self, ws: WebSocket) -> tuple[protocol.Welcome, bool]:
        """challenge → hello → welcome; returns the welcome and whether hello carried the token."""
        async with asyncio.timeout(self.config.connect_timeout):
            _, challenge = self._decode(await ws.recv())
            if not isinstance(challenge, protocol.Challenge):
                raise _SessionEnd(CloseCode.MALFORMED, "expected a challenge")
            if challenge.protocol != protocol.PROTOCOL:
                log.warning("device %s: server speaks %s", self._tag, challenge.protocol)
            token = self._hello_token()
            hello = build_hello(self.identity, challenge, token)
            await ws.send(_CODEC.encode(hello))
            while True:
                _, body = self._decode(await ws.recv())
                if isinstance(body, protocol.Welcome):
                    if body.device_id and body.device_id != self.identity.device_id:
                        log.warning("device %s: server welcomed %s", self._tag, body.device_id)
                    return body, token is not None
                if isinstance(body, protocol.Error):
                    log.warning("device %s: server error %s: %s", self._tag, body.code, body.message)

    def _decode(self, frame: bytes | str) -> tuple[str | None, msgspec.Struct | None]:
        """Decode a frame into (envelope id, body); body ``None`` for a type this agent does not
        know (a newer server). A malformed frame ends the session."""
        try:
            env = _CODEC.decode_envelope(frame)
            if env.type not in _HANDLED_TYPES:
                log.debug("device %s: ignoring %r frame", self._tag, env.type)
                return env.id, None
            return env.id, _CODEC.decode_body(env, binary=not isinstance(frame, str))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _SessionEnd(CloseCode.MALFORMED, f"malformed frame from the server: {exc}") from None

    async def _serve(self, ws: WebSocket, interval: float) -> None:
        """Receive frames and send heartbeats until the connection ends."""
        loop = asyncio.get_running_loop()
        silence_limit = interval * self.config.heartbeat_timeout_factor
        last_rx = loop.time()
        next_beat = last_rx + interval
        seq = 0
        while True:
            now = loop.time()
            if now >= next_beat:
                seq += 1
                await ws.send(_CODEC.encode(protocol.Heartbeat(seq=seq)))
                next_beat += interval
                if next_beat <= now:  # after a stall: no burst of missed beats
                    next_beat = now + interval
            silent_at = last_rx + silence_limit
            try:
                async with asyncio.timeout_at(min(next_beat, silent_at)):
                    frame = await ws.recv()
            except TimeoutError:
                if loop.time() < silent_at:
                    continue  # time for a heartbeat
                # Silent too long -- or this process was too busy to read (a loaded simulator):
                # one short last chance before blaming the server.
                try:
                    async with asyncio.timeout(min(interval, 1.0)):
                        frame = await ws.recv()
                except TimeoutError:
                    raise _SessionEnd(
                        CloseCode.TIMEOUT, f"no frame from the server for {silence_limit:.1f} s"
                    ) from None
            last_rx = loop.time()
            envelope_id, body = self._decode(frame)
            if isinstance(body, protocol.Command):
                self._on_command(envelope_id, body)
            elif isinstance(body, protocol.TelemetryAck):
                if self.telemetry is not None:
                    await self.telemetry.on_ack(body)
            elif isinstance(body, protocol.Rules):
                await self._apply_rules(ws, body)
            elif isinstance(body, protocol.Status):
                await self._set_status(body.status)
                log.info("device %s: status is now %s", self._tag, body.status)
                if body.status == "accepted":
                    await self._attach_telemetry()
                    if self.updates is not None:  # a runner started before (apps on disk, or simulated)
                        await self.updates.attach(self._send_report)
            elif isinstance(body, protocol.Deploy):
                await self._on_deploy(body)
            elif isinstance(body, protocol.DeploymentAck):
                if self.updates is not None:
                    self.updates.on_ack(body)
            elif isinstance(body, protocol.SessionOpen):
                self._start_session(body)
            elif isinstance(body, protocol.Error):
                log.warning("device %s: server error %s: %s", self._tag, body.code, body.message)

    # --- remote-access sessions (ADR 0016) -------------------------------------------------------

    def _start_session(self, msg: protocol.SessionOpen) -> None:
        """Run the session on a task of its own (it outlives a reconnect of this connection: it has
        its own socket)."""

        async def refuse(reason: str) -> None:
            ws = self._ws
            if ws is not None:
                await ws.send(_CODEC.encode(protocol.SessionRefused(session_id=msg.session_id, reason=reason)))

        async def run() -> None:
            from corral.agent.sessions import run_session  # ADR 0007: only when a session comes

            if self._remote_limit is None:
                from corral.agent.remote import SessionLimit

                self._remote_limit = SessionLimit(self.config.remote.max_sessions)
            try:
                await run_session(self.config, msg, refuse, self._remote_limit)
            except Exception:
                log.exception("device %s: session %s failed", self._tag, msg.session_id)

        if self._sessions is None:
            self._sessions = set()
        task = asyncio.get_running_loop().create_task(run())
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    # --- deployments ----------------------------------------------------------------------------

    async def _send_report(self, report: protocol.DeploymentReport) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        await ws.send(_CODEC.encode(report))

    async def _on_deploy(self, msg: protocol.Deploy) -> None:
        if not self.config.update.enabled:
            await self._send_report(protocol.DeploymentReport(
                deployment_id=msg.deployment_id, seq=1, status="failed", step="idle",
                reason="updates are disabled on this device ([update] enabled = false)"))
            return
        try:
            runner = self.updates
            if runner is None:
                runner = await self.start_updates()
                await runner.attach(self._send_report)
            await runner.on_deploy(msg)
        except (ConnectionClosed, ConnectionError):
            raise
        except Exception as exc:  # e.g. the apps folder cannot be written: say so, stay connected
            log.exception("device %s: deployment %s cannot start", self._tag, msg.deployment_id)
            await self._send_report(protocol.DeploymentReport(
                deployment_id=msg.deployment_id, seq=1, status="failed", step="idle",
                reason=f"the agent cannot run updates: {type(exc).__name__}: {exc}"[:500]))

    # --- telemetry and rules ------------------------------------------------------------------

    async def _attach_telemetry(self) -> None:
        if self.telemetry is not None and self._ws is not None:
            await self.telemetry.attach(self._send_telemetry)

    async def _send_telemetry(self, batch: protocol.Telemetry) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        await ws.send(_CODEC.encode(batch))

    async def _apply_rules(self, ws: WebSocket, rules: protocol.Rules) -> None:
        """Rules come only from the authenticated server session (this socket), never from
        local input; the host validates, persists and acknowledges them."""
        if self.rules is None:
            ack = protocol.RulesAck(version=rules.version,
                                    refused={r.id: "rules are disabled on this device" for r in rules.rules})
        else:
            ack = await self.rules.apply(rules)
        await ws.send(_CODEC.encode(ack))

    # --- state --------------------------------------------------------------------------------

    async def _set_status(self, status: str) -> None:
        self.status = status
        store = self.store
        if store is None:
            return
        changes: dict[str, Any] = {"status": status, "device_id": self.identity.device_id}
        if status == "accepted":
            changes["enrolled"] = True
        elif status == "pending" and self._token:
            # a server that forgot us (new database): present the token again next time
            changes["enrolled"] = False
        new: AgentState = msgspec.structs.replace(store.state, **changes)
        if new != store.state:
            store.state = new  # in memory first; the (fsync'd) write happens off the event loop
            try:
                await asyncio.to_thread(store.save, new)
            except OSError as exc:  # e.g. a full disk: worth a warning, not a disconnect
                log.warning("device %s: cannot write %s: %s", self._tag, store.path, exc)

    # --- commands -----------------------------------------------------------------------------

    def _on_command(self, envelope_id: str | None, command: protocol.Command) -> None:
        if self._tasks is None:
            self._tasks = set()
        task = asyncio.get_running_loop().create_task(self._run_command(envelope_id, command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_command(self, envelope_id: str | None, command: protocol.Command) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            await ws.send(_CODEC.encode(protocol.CommandAck(), id=envelope_id))
            result = await self.commands.run(self, command)
            try:
                frame = _CODEC.encode(result, id=envelope_id)
            except (TypeError, msgspec.EncodeError) as exc:  # a handler returned something odd
                failed = protocol.CommandResult(ok=False, error=f"result cannot be encoded: {exc}")
                frame = _CODEC.encode(failed, id=envelope_id)
            await ws.send(frame)
            if self._reboot_requested:
                log.info("device %s: rebooting on request of the server", self._tag)
                await ws.close(CloseCode.GOING_AWAY, "rebooting")
        except ConnectionClosed:
            pass  # the receive loop sees the close and handles it
        except Exception:  # never leave an unretrieved task exception behind
            log.exception("device %s: command %s failed", self._tag, command.name)

    async def _cancel_tasks(self) -> None:
        tasks = self._tasks
        if not tasks:
            return
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = None

    # CommandHost interface

    async def send_inventory(self) -> None:
        ws = self._ws
        if ws is None:
            return
        inv = self.platform.inventory()
        cfg = self.config
        if cfg.model:
            inv.model = cfg.model
        if cfg.attributes:
            inv.attributes = {**inv.attributes, **cfg.attributes}
        if self.updates is not None:  # the installed apps' versions (ADR 0012)
            installed = await asyncio.to_thread(self.updates.inventory)
            inv.software = {**inv.software, **installed}
        await ws.send(_CODEC.encode(inv))

    async def start_updates(self) -> Any:
        """Load and start the update runner (ADR 0007: only when a deployment comes, or when one
        is on disk at start)."""
        from corral.agent.update.runner import UpdateRunner

        runner = UpdateRunner(self.config, on_finished=self.send_inventory, exit_agent=self.request_exit)
        await runner.start()
        self.updates = runner
        return runner

    def request_exit(self, code: int) -> None:
        """Stop the agent and exit the process with ``code`` (the update runner's hand-over)."""
        self.exit_code = code
        self._exit.set()

    def request_reboot(self) -> None:
        self._reboot_requested = True

    async def _reboot(self) -> None:
        try:
            await self.platform.reboot()
        except Exception as exc:
            log.error("device %s: reboot failed: %s", self._tag, exc)
