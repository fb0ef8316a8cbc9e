"""Remote access on the device (issue 6): the three session kinds, each run over a
:class:`~corral.agent.remote.channel.Channel` (one WebSocket per session to the server's relay).

- :mod:`.terminal`: a shell on a PTY (:func:`~.terminal.run_terminal`, :class:`~.terminal.SessionLimit`);
- :mod:`.forward`: a TCP connection to an allowed target (:func:`~.forward.run_forward`);
- :mod:`.files`: a file copied to or from an allowed directory (:func:`~.files.run_upload`,
  :func:`~.files.run_download`).

None of this is imported when the agent starts (ADR 0007). The names above are importable from
this package, but each submodule loads only when one of its names is first used: an agent that
only ever copies files never loads the terminal's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.agent.remote.channel import Channel, ChannelClosed, RemoteError
    from corral.agent.remote.files import Transferred, run_download, run_upload
    from corral.agent.remote.forward import Relayed, run_forward
    from corral.agent.remote.terminal import SessionLimit, run_terminal

_EXPORTS = {
    "Channel": "channel", "ChannelClosed": "channel", "RemoteError": "channel",
    "Transferred": "files", "run_download": "files", "run_upload": "files",
    "Relayed": "forward", "run_forward": "forward",
    "SessionLimit": "terminal", "run_terminal": "terminal",
}

__all__ = ["Channel", "ChannelClosed", "Relayed", "RemoteError", "SessionLimit", "Transferred", "run_download",
           "run_forward", "run_terminal", "run_upload"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
