"""The error hierarchy shared by the server, the agent and the CLI.

Code raises these; the HTTP API maps them to status codes in exactly one place
(``corral.server.api.errors``) and renders ``{error, detail, request_id}``. The CLI prints
``error: <detail>`` on one line and exits 1.

    CorralError
    ├── InvalidInput          bad request body, query or argument (400)
    │   ├── SelectorError     a selector that does not parse; carries the 1-based column
    │   └── ExpressionError   a metric expression (rule, alert, health gate) that does not
    │                         parse or type-check; carries the 1-based column
    ├── Unauthorized          missing or wrong credentials (401)
    ├── Forbidden             authenticated, but the role does not allow it (403)
    ├── NotFound              no such device, group, token, user ... (404)
    ├── Conflict              the name exists, or the state does not allow it (409)
    ├── PayloadTooLarge       over a configured size limit (413)
    ├── DeviceUnavailable     the device is not connected, or did not answer in time (503/504)
    └── ProtocolError         a device spoke the wire protocol wrongly (closes the socket)
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error Corral raises on purpose. ``code`` is the stable machine name."""

    code = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(CorralError):
    code = "invalid_input"


class SelectorError(InvalidInput):
    """A selector expression that does not parse or type-check; ``column`` is 1-based."""

    code = "invalid_selector"

    def __init__(self, message: str, column: int, expression: str = "") -> None:
        super().__init__(f"column {column}: {message}")
        self.message = message
        self.column = column
        self.expression = expression


class ExpressionError(InvalidInput):
    """A metric expression (``corral.core.expr``) that does not parse or type-check.

    Shaped like :class:`SelectorError`: ``column`` is 1-based, ``detail`` reads
    ``column N: message``.
    """

    code = "invalid_expression"

    def __init__(self, message: str, column: int, expression: str = "") -> None:
        super().__init__(f"column {column}: {message}")
        self.message = message
        self.column = column
        self.expression = expression


class Unauthorized(CorralError):
    code = "unauthorized"


class Forbidden(CorralError):
    code = "forbidden"


class NotFound(CorralError):
    code = "not_found"


class Conflict(CorralError):
    code = "conflict"


class PayloadTooLarge(CorralError):
    code = "payload_too_large"


class DeviceUnavailable(CorralError):
    code = "device_unavailable"


class ProtocolError(CorralError):
    """The peer broke the device protocol. ``close_code`` is the WebSocket close code to use."""

    code = "protocol_error"

    def __init__(self, detail: str, close_code: int = 4400) -> None:
        super().__init__(detail)
        self.close_code = close_code
