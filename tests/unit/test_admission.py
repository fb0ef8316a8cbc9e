"""The admission decision table, row by row (core/admission.py)."""

from __future__ import annotations

import pytest

from corral.core.admission import Action, decide

ALL_TOKENS = ("none", "valid", "invalid", "expired", "used_up", "revoked")


@pytest.mark.parametrize(("known", "token", "allow_pending", "action", "status"), [
    # refused for good, whatever the token
    *[("decommissioned", t, ap, Action.REFUSE, None) for t in ALL_TOKENS for ap in (True, False)],
    *[("rejected", t, ap, Action.REFUSE, None) for t in ALL_TOKENS for ap in (True, False)],
    # accepted devices connect; a token is ignored (not consumed)
    *[("accepted", t, True, Action.CONNECT, "accepted") for t in ALL_TOKENS],
    # pending devices: a valid token promotes, anything else leaves them pending
    ("pending", "valid", True, Action.ACCEPT_PENDING, "accepted"),
    *[("pending", t, True, Action.STAY_PENDING, "pending") for t in ALL_TOKENS if t != "valid"],
    # unknown devices
    (None, "valid", True, Action.ENROLL, "accepted"),
    (None, "valid", False, Action.ENROLL, "accepted"),
    (None, "none", True, Action.CREATE_PENDING, "pending"),
    (None, "none", False, Action.AUTH_FAILED, None),
    *[(None, t, ap, Action.AUTH_FAILED, None) for t in ("invalid", "expired", "used_up", "revoked")
      for ap in (True, False)],
    ("weird", "valid", True, Action.AUTH_FAILED, None),
])
def test_decision_table(known: str | None, token: str, allow_pending: bool, action: Action,
                        status: str | None) -> None:
    d = decide(known, token, allow_pending)  # type: ignore[arg-type]
    assert d.action is action
    assert d.status == status
    assert d.consumes_token == (action in (Action.ENROLL, Action.ACCEPT_PENDING))
    if action in (Action.REFUSE, Action.AUTH_FAILED):
        assert d.reason


def test_refusal_reasons_name_the_token_problem() -> None:
    assert "expired" in decide(None, "expired", True).reason
    assert "no uses left" in decide(None, "used_up", True).reason
    assert "revoked" in decide(None, "revoked", True).reason
    assert "decommissioned" in decide("decommissioned", "none", True).reason
