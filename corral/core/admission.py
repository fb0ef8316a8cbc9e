"""Who may connect: the admission decision for a device that proved possession of its key.

Pure: the hub gathers the facts (the device's current admission status, if any; what the
enrollment token it presented is worth; the server's policy) and acts on the decision.

    known status     token          decision
    ---------------  -------------  ------------------------------------------------------
    decommissioned   any            refuse (permanent: that key never comes back)
    rejected         any            refuse (permanent)
    accepted         any            connect (a token is ignored and not consumed)
    pending          valid          accept now (token consumed, its tags/groups applied)
    pending          none/invalid   stay pending (an invalid token changes nothing)
    unknown          valid          enroll: create as accepted (token consumed)
    unknown          invalid        auth_failed: nothing is recorded
    unknown          none           create as pending, or auth_failed if pending is disabled
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

TokenVerdict = Literal["none", "valid", "invalid", "expired", "used_up", "revoked"]


class Action(Enum):
    CONNECT = "connect"  # known and accepted: welcome
    ENROLL = "enroll"  # new device with a valid token: create accepted
    ACCEPT_PENDING = "accept_pending"  # pending device with a valid token: promote
    CREATE_PENDING = "create_pending"  # new device without a token: create pending
    STAY_PENDING = "stay_pending"  # pending device: welcome as pending
    REFUSE = "refuse"  # rejected / decommissioned: close, permanent
    AUTH_FAILED = "auth_failed"  # bad token or tokenless when pending is disabled: close


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""

    @property
    def consumes_token(self) -> bool:
        return self.action in (Action.ENROLL, Action.ACCEPT_PENDING)

    @property
    def status(self) -> str | None:
        """The admission status the device has after this decision (None: not recorded)."""
        return {
            Action.CONNECT: "accepted",
            Action.ENROLL: "accepted",
            Action.ACCEPT_PENDING: "accepted",
            Action.CREATE_PENDING: "pending",
            Action.STAY_PENDING: "pending",
        }.get(self.action)


_TOKEN_REASONS: dict[TokenVerdict, str] = {
    "invalid": "enrollment token is not valid",
    "expired": "enrollment token has expired",
    "used_up": "enrollment token has no uses left",
    "revoked": "enrollment token was revoked",
}


def decide(known_status: str | None, token: TokenVerdict, allow_pending: bool) -> Decision:
    if known_status in ("decommissioned", "rejected"):
        return Decision(Action.REFUSE, f"device is {known_status}")
    if known_status == "accepted":
        return Decision(Action.CONNECT)
    if known_status == "pending":
        if token == "valid":
            return Decision(Action.ACCEPT_PENDING)
        return Decision(Action.STAY_PENDING, _TOKEN_REASONS.get(token, ""))
    if known_status is not None:
        return Decision(Action.AUTH_FAILED, f"device has an unknown status {known_status!r}")
    if token == "valid":
        return Decision(Action.ENROLL)
    if token != "none":
        return Decision(Action.AUTH_FAILED, _TOKEN_REASONS[token])
    if allow_pending:
        return Decision(Action.CREATE_PENDING)
    return Decision(Action.AUTH_FAILED, "unknown device and no enrollment token")
