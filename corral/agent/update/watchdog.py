"""The agent's watchdog: runs the agent from its active slot and restores the old agent when a
new one does not come back.

On a device the service manager runs the watchdog, not the agent::

    python -m corral.agent.update.watchdog ROOT [AGENT ARGS...]

``ROOT`` is the agent's A/B directory (:mod:`.self_update` writes it)::

    ROOT/slots/a/, ROOT/slots/b/   agent bundles (corral-app.toml named "corral-agent", whose
                                   [run] command starts the agent)
    ROOT/current -> slots/a        the active slot
    ROOT/trial.json                {"slot", "previous", "timeout"}: the active slot is on trial
    ROOT/rollback.json             {"slot", "reason"}: what the watchdog last undid

The loop: start the active slot's ``[run] command`` with the extra ``AGENT ARGS``, its slot in
``CORRAL_AGENT_SLOT``, in the slot's directory. When it exits:

- with :data:`EXIT_RESTART` (75): start the (possibly new) active slot at once: this is how an
  agent hands over to the one it just switched to, and how a rollback restarts the old one;
- with 0 or 1 (stopped, or a permanent error such as a refused device): the watchdog exits with
  the same code; with anything else (a crash): start it again after ``restart_delay``.

While ``trial.json`` names the running slot, the agent is on trial: it must delete that file
(the update flow's commit, after it reconnected to the server and passed its health check) within
``timeout`` seconds. If the time passes, or the agent exits while still on trial, the watchdog
kills it (its process group), points ``current`` back to ``previous``, deletes ``trial.json``,
writes ``rollback.json`` with the reason, and starts the old agent, which then finds its update
record and the watchdog's verdict and reports the rollback.

SIGTERM/SIGINT to the watchdog are passed to the agent; the watchdog exits when it has.
The watchdog imports only the small parts of the update package (no psutil, no archives): it is
one more resident process, and costs the interpreter's memory (~10 MB RSS).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from corral.agent.update.installers import active_slot, kill_group, point_current
from corral.agent.update.manifest import read_manifest
from corral.fileio import atomic_write

EXIT_RESTART = 75  # EX_TEMPFAIL: "start me (or the new me) again"
TRIAL = "trial.json"
ROLLBACK = "rollback.json"


@dataclass(frozen=True)
class Trial:
    slot: str
    previous: str
    timeout: float


def read_trial(root: Path) -> Trial | None:
    try:
        data = json.loads((root / TRIAL).read_bytes())
        return Trial(str(data["slot"]), str(data["previous"]), float(data["timeout"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def write_trial(root: Path, trial: Trial) -> None:
    atomic_write(root / TRIAL, json.dumps(vars(trial)).encode(), 0o644)


def read_rollback(root: Path) -> dict[str, str] | None:
    try:
        data = json.loads((root / ROLLBACK).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else None


class Watchdog:
    def __init__(self, root: Path, args: list[str], *, poll: float = 0.2, restart_delay: float = 1.0) -> None:
        self.root, self.args, self.poll, self.restart_delay = root, args, poll, restart_delay
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None

    def _signalled(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    def _start(self, slot: str) -> subprocess.Popen[bytes]:
        slot_dir = self.root / "slots" / slot
        manifest = read_manifest(slot_dir)
        if manifest.run is None:
            raise SystemExit(f"error: agent slot {slot} has no [run] command")
        argv = [*shlex.split(manifest.run.command), *self.args]
        env = {**os.environ, "CORRAL_AGENT_SLOT": slot, "CORRAL_AGENT_ROOT": str(self.root)}
        return subprocess.Popen(argv, cwd=slot_dir, env=env, start_new_session=True)

    def _undo(self, trial: Trial, reason: str) -> None:
        if self.child is not None and self.child.poll() is None:
            kill_group(self.child.pid)
            self.child.wait()
        point_current(self.root, trial.previous)
        atomic_write(self.root / ROLLBACK, json.dumps({"slot": trial.slot, "reason": reason}).encode(), 0o644)
        (self.root / TRIAL).unlink(missing_ok=True)
        print(f"corral watchdog: agent slot {trial.slot} {reason}: back to slot {trial.previous}",
              file=sys.stderr, flush=True)

    def _on_trial(self, slot: str) -> Trial | None:
        trial = read_trial(self.root)
        return trial if trial is not None and trial.slot == slot else None

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._signalled)
        while True:
            slot = active_slot(self.root)
            if slot is None:
                print(f"error: no agent installed in {self.root} (no 'current' link)", file=sys.stderr)
                return 1
            trial = self._on_trial(slot)
            self.child = self._start(slot)
            deadline = time.monotonic() + trial.timeout if trial else None
            while self.child.poll() is None:
                if deadline is not None and self._on_trial(slot) is None:
                    deadline = None  # committed: no longer on trial
                if deadline is not None and time.monotonic() > deadline and not self.stopping:
                    assert trial is not None
                    self._undo(trial, f"did not confirm within {trial.timeout:g}s")
                    break
                time.sleep(self.poll)
            code = self.child.wait()
            if self.stopping:
                return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
            trial = self._on_trial(slot)
            if trial is not None:
                self._undo(trial, f"exited with {code} while on trial")
                continue
            if code == EXIT_RESTART or active_slot(self.root) != slot:
                continue
            if code in (0, 1):
                return code
            time.sleep(self.restart_delay)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m corral.agent.update.watchdog ROOT [AGENT ARGS...]", file=sys.stderr)
        return 2
    return Watchdog(Path(args[0]), args[1:]).run()


if __name__ == "__main__":
    sys.exit(main())
