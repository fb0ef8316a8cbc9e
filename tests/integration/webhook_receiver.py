"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 in a thread of the test process.

It records every request (headers and body bytes) and answers from a script of statuses, then
with a default. ``verified(secret)`` checks every recorded request with the standardwebhooks
library, exactly as a receiver in production would.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def msg_id(self) -> str:
        return self.headers.get("webhook-id", "")


class Receiver:
    def __init__(self, port: int = 0, script: list[int | tuple[int, bytes]] | None = None,
                 default: int | tuple[int, bytes] = 200) -> None:
        self.port = port
        self.script = list(script or [])
        self.default = default
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        self.open_gate = threading.Event()  # hold(): requests wait here before they are answered
        self.open_gate.set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.lock:
                    answer = receiver.script.pop(0) if receiver.script else receiver.default
                    status, text = answer if isinstance(answer, tuple) else (answer, b"")
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body, status))
                receiver.open_gate.wait(30)
                self.send_response(status)
                self.send_header("content-length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def hold(self) -> None:
        """Requests are recorded, then left waiting for an answer until ``release()``."""
        self.open_gate.clear()

    def release(self) -> None:
        self.open_gate.set()

    def set_default(self, answer: int | tuple[int, bytes]) -> None:
        with self.lock:
            self.default = answer

    def received(self, msg_id: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if msg_id is None or r.msg_id == msg_id]

    def verified(self, secret: str, msg_id: str | None = None) -> list[dict[str, Any]]:
        """Every request (for ``msg_id``), verified with the secret; raises if one does not verify."""
        wh = Webhook(secret)
        return [wh.verify(r.body, r.headers) for r in self.received(msg_id)]
