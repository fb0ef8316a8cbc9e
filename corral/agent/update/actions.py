"""One update-flow action performed by an installer, and the event it ends in.

The update runner's loop (ADR 0009) is ``step`` → persist → report → perform each action →
``step`` with the event. :func:`perform` is the last part for the actions an installer carries
out; the runner does ``DOWNLOAD`` (``corral tuf-client``) and the first half of ``VERIFY`` (TUF)
itself, then calls :func:`verify` for the second half (the installer's ``check``).

An action's failure is an event, not an exception: an installer error's ``detail`` becomes the
event's reason, which the flow puts into the reported status. Anything else (a bug, an
``OSError`` the installer did not expect) is reported the same way with its type, so a
deployment never hangs on an exception.

A restart by reboot or agent hand-over ends in no event: the process that would send it is
gone, and the start that finds the record *is* the event (``resume``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from corral.agent.update.installers import Checked, Installer
from corral.core.update_flow import Action, ActionKind, Event, EventKind
from corral.errors import CorralError

log = logging.getLogger("corral.agent.update")

_OUTCOMES: dict[ActionKind, tuple[EventKind, EventKind]] = {
    ActionKind.INSTALL: (EventKind.INSTALLED, EventKind.INSTALL_FAILED),
    ActionKind.SWITCH: (EventKind.SWITCHED, EventKind.SWITCH_FAILED),
    ActionKind.RESTART: (EventKind.RESTARTED, EventKind.RESTART_FAILED),
    ActionKind.START_HEALTH_CHECK: (EventKind.HEALTHY, EventKind.UNHEALTHY),
    ActionKind.COMMIT: (EventKind.COMMITTED, EventKind.COMMIT_FAILED),
    ActionKind.ROLLBACK: (EventKind.ROLLED_BACK, EventKind.ROLLBACK_FAILED),
}


def _reason(e: Exception) -> str:
    if isinstance(e, CorralError):
        return e.detail
    log.exception("update action failed unexpectedly")
    return f"{type(e).__name__}: {e}"


def verify(installer: Installer, artifact: Path,
           clock: Callable[[], float] = time.time) -> tuple[Event, Checked | None]:
    """The installer's half of ``VERIFY``: ``verified`` with what it learnt, or ``verify_failed``."""
    try:
        checked = installer.check(artifact)
    except Exception as e:
        return Event(EventKind.VERIFY_FAILED, clock(), _reason(e)), None
    return Event(EventKind.VERIFIED, clock()), checked


def perform(installer: Installer, action: Action, artifact: Path,
            clock: Callable[[], float] = time.time) -> Event | None:
    """Carry out ``action``; the event it ends in, or None (``CLEANUP``; a restart by reboot or
    agent hand-over, whose event is the resume)."""
    kind = action.kind
    if kind in (ActionKind.DOWNLOAD, ActionKind.VERIFY):
        raise ValueError(f"{kind} is the update runner's, not an installer's")
    try:
        if kind is ActionKind.INSTALL:
            installer.install(artifact, action.slot)
        elif kind is ActionKind.SWITCH:
            installer.switch(action.slot)
        elif kind is ActionKind.RESTART:
            installer.restart(action.slot)
            if action.restart in ("reboot", "agent"):
                return None
        elif kind is ActionKind.START_HEALTH_CHECK:
            assert action.deadline is not None
            result = installer.health(action.slot, action.deadline)
            return Event(EventKind.HEALTHY if result.healthy else EventKind.UNHEALTHY, clock(), result.reason)
        elif kind is ActionKind.COMMIT:
            installer.commit()
        elif kind is ActionKind.ROLLBACK:
            installer.rollback(action.slot)
        elif kind is ActionKind.CLEANUP:
            installer.cleanup()
            return None
    except Exception as e:
        if kind is ActionKind.CLEANUP:  # the deployment has ended: its outcome stands
            log.warning("update cleanup failed: %s", _reason(e))
            return None
        return Event(_OUTCOMES[kind][1], clock(), _reason(e))
    return Event(_OUTCOMES[kind][0], clock())
