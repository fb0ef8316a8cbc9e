"""Webhook event globs, URLs and secrets (the pure parts of corral.server.webhooks)."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook as StandardWebhook

from corral.errors import InvalidInput
from corral.server.config import WebhookSettings
from corral.server.webhooks import (
    event_matches,
    mask_secret,
    matches_any,
    new_message_id,
    new_secret,
    payload_for,
    validate_event_glob,
    validate_event_type,
    validate_events,
    validate_secret,
    validate_url,
)

SETTINGS = WebhookSettings(retry_scale=1.0)


@pytest.mark.parametrize(("glob", "event", "expected"), [
    ("*", "alert.firing", True),
    ("*", "webhook.test", True),
    ("*", "x", True),
    ("alert.*", "alert.firing", True),
    ("alert.*", "alert.resolved", True),
    ("alert.*", "alert.firing.again", True),  # a trailing * takes one or more segments
    ("alert.*", "alert", False),
    ("alert.*", "alerts.firing", False),
    ("alert.*", "device.rule_action", False),
    ("alert.firing", "alert.firing", True),
    ("alert.firing", "alert.firing.x", False),
    ("alert.firing", "alert.resolved", False),
    ("*.failed", "rollout.failed", True),
    ("*.failed", "rollout.started", False),
    ("*.failed", "a.b.failed", False),  # an inner * is exactly one segment
    ("device.*.x", "device.a.x", True),
    ("device.*.x", "device.a.b.x", False),
    ("rollout.*", "rollout.started", True),
])
def test_event_globs(glob: str, event: str, expected: bool) -> None:
    validate_event_glob(glob)
    validate_event_type(event)
    assert event_matches(glob, event) is expected


def test_any_of_a_webhooks_globs() -> None:
    assert matches_any(["device.rule_action", "alert.*"], "alert.resolved")
    assert not matches_any(["device.rule_action", "alert.firing"], "alert.resolved")
    assert not matches_any([], "alert.firing")
    assert not matches_any([None, 3], "alert.firing")  # junk in the JSON column is no match


_name = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)


@given(st.lists(_name, min_size=1, max_size=5))
def test_star_matches_every_event_and_each_event_matches_itself(parts: list[str]) -> None:
    event = ".".join(parts)
    assert event_matches("*", event)
    assert event_matches(event, event)
    assert event_matches(parts[0] + ".*", event) is (len(parts) > 1)


@pytest.mark.parametrize("glob", ["", "Alert.*", "alert..firing", "al*rt", "alert.**", "alert.", ".alert",
                                  "alert.*.", "alert firing", "alert/firing", "1alert", "a" * 65, "alert.fir-ing"])
def test_bad_globs_are_refused(glob: str) -> None:
    with pytest.raises(InvalidInput):
        validate_event_glob(glob)


@pytest.mark.parametrize("event", ["", "Alert.firing", "alert.*", "alert..x", "a" * 65, "alert.firing "])
def test_bad_event_types_are_refused(event: str) -> None:
    with pytest.raises(InvalidInput):
        validate_event_type(event)


def test_a_webhooks_globs() -> None:
    assert validate_events(["alert.*", "alert.*", "*"], SETTINGS) == ["alert.*", "*"]
    with pytest.raises(InvalidInput, match="at least one"):
        validate_events([], SETTINGS)
    with pytest.raises(InvalidInput, match="at most"):
        validate_events([f"e{i}" for i in range(SETTINGS.max_events + 1)], SETTINGS)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook",
    "https://hooks.example.com/services/T000/B000/XXXX?x=1",
    "https://[::1]:9/x",
    " https://example.com/padded ",
])
def test_good_urls(url: str) -> None:
    assert validate_url(url, SETTINGS) == url.strip()


@pytest.mark.parametrize(("url", "reason"), [
    ("", "empty"),
    ("ftp://example.com/x", "http"),
    ("javascript:alert(1)", "http"),
    ("file:///etc/passwd", "http"),
    ("example.com/hook", "http"),
    ("http://", "host"),
    ("http:///path", "host"),
    ("https://user:pw@example.com/x", "password"),
    ("https://user@example.com/x", "password"),
    ("http://example.com:99999/", "port"),
    ("http://example.com:abc/", "port"),
    ("http://exa mple.com/", "spaces"),
    ("http://example.com/\x00", "control"),
    ("http://example.com/#frag", "fragment"),
    ("http://example.com/" + "a" * 3000, "longer"),
])
def test_bad_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        validate_url(url, SETTINGS)


def test_generated_secrets_follow_the_spec_and_sign() -> None:
    s1, s2 = new_secret(), new_secret()
    assert s1 != s2 and s1.startswith("whsec_")
    assert len(base64.b64decode(s1[6:])) == 24
    assert validate_secret(s1) == s1
    msg_id = new_message_id()
    assert msg_id.startswith("msg_") and len(msg_id) <= 40
    now = dt.datetime.now(dt.UTC)
    body = '{"type":"webhook.test"}'
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": StandardWebhook(s1).sign(msg_id, now, body)}
    assert StandardWebhook(s1).verify(body, headers) == {"type": "webhook.test"}


@pytest.mark.parametrize("n", [24, 32, 64])
def test_given_secrets_of_24_to_64_bytes_are_accepted(n: int) -> None:
    b64 = base64.b64encode(bytes(range(n))).decode()
    assert validate_secret("whsec_" + b64)
    assert validate_secret("whsec_" + b64.rstrip("="))  # unpadded, as the library accepts it


@pytest.mark.parametrize("secret", [
    "", "abc", "whsec_", "whsec_!!!!notbase64!!!!", "whsec " + base64.b64encode(bytes(32)).decode(),
    "whsec_" + base64.b64encode(bytes(8)).decode(), "whsec_" + base64.b64encode(bytes(23)).decode(),
    "whsec_" + base64.b64encode(bytes(65)).decode(), base64.b64encode(bytes(32)).decode(),
])
def test_bad_secrets_are_refused(secret: str) -> None:
    with pytest.raises(InvalidInput, match="secret"):
        validate_secret(secret)


def test_masked_secrets_cannot_sign() -> None:
    s = new_secret()
    masked = mask_secret(s)
    assert masked.startswith("whsec_****") and s not in masked and len(masked) < len(s) // 2


def test_payload_shape() -> None:
    p = payload_for("alert.firing", {"alert": "hot"}, 1_700_000_000.5)
    assert p == {"type": "alert.firing", "timestamp": "2023-11-14T22:13:20.500Z", "data": {"alert": "hot"}}
