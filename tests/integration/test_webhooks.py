"""Webhooks end to end: real server processes on both engines, a real receiver on loopback that
verifies every request with the standardwebhooks library, retries, restarts, roles and bad input."""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook as StandardWebhook
from standardwebhooks import WebhookVerificationError

from corral.core.retry import MAX_ATTEMPTS
from tests.conftest import ServerProc, free_port, server_on, wait_until
from tests.integration.test_registry_api import audit_head, make_user
from tests.integration.webhook_receiver import Receiver

SCALE_ENV = "CORRAL_WEBHOOK_RETRY_SCALE"


def _start(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           scale: str) -> Iterator[ServerProc]:
    # the testing knob: the whole ~24 h retry schedule runs in seconds (the env var reaches the
    # server process, and again when a test restarts it)
    monkeypatch.setenv(SCALE_ENV, scale)
    yield from server_on(request.param, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def hook_server(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                ) -> Iterator[ServerProc]:
    """A server whose retry schedule is scaled by 0.001 (about 85 s in all, first retry after 5 ms)."""
    yield from _start(request, tmp_path, monkeypatch, "0.001")


@pytest.fixture(params=["sqlite", "postgresql"])
def quick_giveup_server(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        ) -> Iterator[ServerProc]:
    """Scaled by 0.0001: a delivery that never succeeds is given up after about 9 s."""
    yield from _start(request, tmp_path, monkeypatch, "0.0001")


def create_hook(s: ServerProc, url: str, events: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    r = s.api("POST", "/webhooks", json={"url": url, "events": events or ["alert.*"], **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def deliveries(s: ServerProc, hook_id: str, **params: Any) -> list[dict[str, Any]]:
    r = s.api("GET", f"/webhooks/{hook_id}/deliveries", params=params)
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


def delivery(s: ServerProc, hook_id: str, msg_id: str) -> dict[str, Any]:
    [d] = [d for d in deliveries(s, hook_id) if d["id"] == msg_id]
    return d


def send_test(s: ServerProc, hook_id: str) -> str:
    r = s.api("POST", f"/webhooks/{hook_id}/test")
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def wait_status(s: ServerProc, hook_id: str, msg_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    return dict(wait_until(lambda: (d := delivery(s, hook_id, msg_id))["status"] == status and d,
                           timeout=timeout, what=f"delivery {msg_id} to be {status}"))


def cli_json(s: ServerProc, *args: str) -> Any:
    r = s.cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_create_by_cli_and_api_and_a_signed_test_event(hook_server: ServerProc, receiver: Receiver) -> None:
    s = hook_server
    made = cli_json(s, "webhook", "create", receiver.url, "--event", "alert.*", "-e", "device.rule_action",
                    "--description", "ops pager")
    secret = made["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert made["events"] == ["alert.*", "device.rule_action"] and made["enabled"] is True
    given = "whsec_" + base64.b64encode(b"k" * 32).decode()
    api_hook = create_hook(s, receiver.url, ["*"], secret=given, description="everything")
    assert api_hook["secret"] == given

    # `corral webhook test` queues a webhook.test event; it arrives signed with the webhook's secret
    r = s.cli("webhook", "test", made["id"])
    assert r.returncode == 0, r.stderr
    assert "webhook.test" in r.stderr
    [d] = wait_until(lambda: deliveries(s, made["id"], status="delivered"), what="the test delivery")
    [req] = receiver.received(d["id"])
    [payload] = receiver.verified(secret, d["id"])
    assert payload["type"] == "webhook.test" and payload["data"]["webhook_id"] == made["id"]
    assert payload["timestamp"].endswith("Z")
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"].startswith("corral/")
    assert req.headers["webhook-id"] == d["id"] and d["id"].startswith("msg_")
    assert req.headers["webhook-signature"].startswith("v1,")
    with pytest.raises(WebhookVerificationError):  # the signature means something
        StandardWebhook(given).verify(req.body, req.headers)
    assert d["attempts"] == 1 and d["last_status"] == 200 and d["last_error"] is None and d["delivered_at"]
    logged = cli_json(s, "webhook", "deliveries", made["id"])
    assert [x["id"] for x in logged] == [d["id"]] and logged[0]["status"] == "delivered"

    # the API's test event goes to the other webhook, signed with the secret given at creation
    msg = send_test(s, api_hook["id"])
    wait_status(s, api_hook["id"], msg, "delivered")
    assert receiver.verified(given, msg)[0]["type"] == "webhook.test"

    # the secret is returned by create only: never by list, show, the table or the audit log
    shown = [s.cli("webhook", "list", "--json").stdout, s.cli("webhook", "list").stdout,
             s.cli("webhook", "show", made["id"], "--json").stdout, s.cli("webhook", "show", made["id"]).stdout,
             s.api("GET", "/webhooks").text, s.api("GET", f"/webhooks/{api_hook['id']}").text,
             s.cli("audit", "list", "--json").stdout]
    for text in shown:
        assert secret not in text and given not in text and given[6:] not in text and secret[6:] not in text
    listed = {h["id"]: h for h in cli_json(s, "webhook", "list")}
    assert set(listed) == {made["id"], api_hook["id"]}
    assert listed[made["id"]]["secret"].startswith("whsec_****")
    assert listed[made["id"]]["description"] == "ops pager"
    actions = [e["action"] for e in cli_json(s, "audit", "list", "--action", "webhook.")]
    assert actions.count("webhook.create") == 2 and actions.count("webhook.test") == 2

    # disable: a test is refused (exit 1, one line); enable again: it works
    r = s.cli("webhook", "disable", made["id"])
    assert r.returncode == 0 and "disabled" in r.stderr
    assert cli_json(s, "webhook", "show", made["id"])["enabled"] is False
    r = s.cli("webhook", "test", made["id"])
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert s.cli("webhook", "enable", made["id"]).returncode == 0
    msg = send_test(s, made["id"])
    wait_status(s, made["id"], msg, "delivered")

    # delete: gone from the list, and show is a one-line error
    r = s.cli("webhook", "delete", made["id"])
    assert r.returncode == 0, r.stderr
    assert [h["id"] for h in cli_json(s, "webhook", "list")] == [api_hook["id"]]
    r = s.cli("webhook", "show", made["id"])
    assert r.returncode == 1 and "no webhook" in r.stderr
    assert s.api("GET", f"/webhooks/{made['id']}/deliveries").status_code == 404


def test_a_refused_message_is_retried_until_accepted(hook_server: ServerProc) -> None:
    s = hook_server
    receiver = Receiver(script=[(500, b"database is down\n"), 500, 200]).start()
    try:
        hook = create_hook(s, receiver.url)
        msg = send_test(s, hook["id"])
        d = wait_status(s, hook["id"], msg, "delivered")
        assert d["attempts"] == 3 and d["last_status"] == 200 and d["last_error"] is None
        got = receiver.received(msg)
        assert [r.answered for r in got] == [500, 500, 200]
        assert len(receiver.verified(hook["secret"], msg)) == 3  # every attempt signed, same webhook-id

        # nothing more is sent for it: a later message is delivered, and still only three for the first
        later = send_test(s, hook["id"])
        wait_status(s, hook["id"], later, "delivered")
        assert len(receiver.received(msg)) == 3 and len(receiver.received(later)) == 1
        assert [x["id"] for x in deliveries(s, hook["id"])] == [later, msg]  # newest first
    finally:
        receiver.stop()


def test_a_delivery_survives_a_server_crash_while_the_receiver_is_down(hook_server: ServerProc) -> None:
    s = hook_server
    port = free_port()
    receiver = Receiver(port=port)  # not listening yet: connections are refused
    hook = create_hook(s, receiver.url)
    msg = send_test(s, hook["id"])
    d = wait_until(lambda: (x := delivery(s, hook["id"], msg))["attempts"] >= 2 and x,
                   what="failed attempts to be recorded")
    assert d["status"] == "pending" and d["last_status"] is None and d["last_error"]

    s.stop(signal.SIGKILL)  # no chance to hand anything back
    s.restart()
    receiver.start()
    try:
        d = wait_status(s, hook["id"], msg, "delivered", timeout=90)
        [payload] = receiver.verified(hook["secret"], msg)
        assert payload["type"] == "webhook.test"
        assert d["last_status"] == 200 and d["attempts"] > 2
    finally:
        receiver.stop()


def test_a_delivery_that_keeps_failing_is_given_up_and_can_be_retried(quick_giveup_server: ServerProc,
                                                                         receiver: Receiver) -> None:
    s = quick_giveup_server
    receiver.set_default((503, b"down for maintenance " + b"x" * 5000))
    hook = create_hook(s, receiver.url)
    msg = send_test(s, hook["id"])
    d = wait_status(s, hook["id"], msg, "failed", timeout=90)
    assert d["attempts"] == MAX_ATTEMPTS and d["last_status"] == 503 and d["next_attempt_at"] is None
    assert d["last_error"].startswith("HTTP 503: down for maintenance") and len(d["last_error"]) <= 500
    assert len(receiver.verified(hook["secret"], msg)) == MAX_ATTEMPTS
    assert [x["id"] for x in cli_json(s, "webhook", "deliveries", hook["id"], "--status", "failed")] == [msg]
    assert cli_json(s, "webhook", "deliveries", hook["id"], "--status", "pending") == []

    # an admin retries it once the receiver is back: one more attempt
    receiver.set_default(200)
    r = s.cli("webhook", "retry", msg)
    assert r.returncode == 0, r.stderr
    d = wait_status(s, hook["id"], msg, "delivered")
    assert d["attempts"] == MAX_ATTEMPTS + 1 and d["last_status"] == 200
    assert len(receiver.verified(hook["secret"], msg)) == MAX_ATTEMPTS + 1
    # only a failed delivery can be retried
    r = s.cli("webhook", "retry", msg)
    assert r.returncode == 1 and "only a failed delivery" in r.stderr
    assert s.api("POST", f"/webhooks/deliveries/{msg}/retry").status_code == 409


BAD_CREATES: list[tuple[dict[str, Any], str]] = [
    ({"url": "ftp://example.com/x"}, "url"),
    ({"url": "javascript:alert(1)"}, "url"),
    ({"url": "http://"}, "host"),
    ({"url": "https://user:pw@example.com/x"}, "password"),
    ({"url": "http://example.com:99999/x"}, "port"),
    ({"url": "http://exa mple.com/"}, "url"),
    ({"url": "http://example.com/" + "a" * 3000}, "url"),
    ({"url": ""}, "url"),
    ({"events": []}, "events"),
    ({"events": [""]}, "glob"),
    ({"events": ["Alert.*"]}, "glob"),
    ({"events": ["alert..firing"]}, "glob"),
    ({"events": ["al*rt"]}, "glob"),
    ({"events": ["alert.**"]}, "glob"),
    ({"events": [f"e{i}" for i in range(33)]}, "at most"),
    ({"secret": "abc"}, "secret"),
    ({"secret": "whsec_"}, "secret"),
    ({"secret": "whsec_!!!!notbase64!!!!"}, "secret"),
    ({"secret": "whsec_" + base64.b64encode(b"short").decode()}, "secret"),
    ({"secret": "whsec_" + base64.b64encode(bytes(100)).decode()}, "secret"),
    ({"description": "d" * 1001}, "description"),
]


def test_bad_input_wrong_roles_and_unknown_ids_change_nothing(any_server: ServerProc, receiver: Receiver) -> None:
    s = any_server
    hook = create_hook(s, receiver.url)
    viewer = make_user(s, "vera", "viewer")
    operator = make_user(s, "otto", "operator")
    before = (s.api("GET", "/webhooks").json(), audit_head(s))

    for change, reason in BAD_CREATES:
        body = {"url": receiver.url, "events": ["alert.*"], **change}
        r = s.api("POST", "/webhooks", json=body)
        assert r.status_code == 400, (change, r.text)
        assert r.json()["error"] == "invalid_input" and reason in r.json()["detail"], (change, r.text)
    patches: list[dict[str, Any]] = [{}, {"url": "gopher://x"}, {"events": ["bad glob"]}, {"events": []},
                                     {"enabled": "maybe"}]
    for patch in patches:
        r = s.api("PATCH", f"/webhooks/{hook['id']}", json=patch)
        assert r.status_code == 400, (patch, r.text)
    assert s.api("GET", f"/webhooks/{hook['id']}/deliveries", params={"status": "bogus"}).status_code == 400

    # mutations are for admins; reads for operators and admins
    mutations: list[tuple[str, str, Any]] = [("POST", "/webhooks", {"url": receiver.url, "events": ["*"]}),
                 ("PATCH", f"/webhooks/{hook['id']}", {"enabled": False}),
                 ("DELETE", f"/webhooks/{hook['id']}", None),
                 ("POST", f"/webhooks/{hook['id']}/test", None),
                 ("POST", "/webhooks/deliveries/msg_nope/retry", None)]
    for token in (viewer, operator):
        for method, path, body in mutations:
            r = s.api(method, path, token=token, json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"] == "forbidden"
    assert s.api("GET", "/webhooks", token=viewer).status_code == 403
    assert s.api("GET", f"/webhooks/{hook['id']}/deliveries", token=viewer).status_code == 403
    assert s.api("GET", "/webhooks", token=operator).status_code == 200
    assert s.api("GET", f"/webhooks/{hook['id']}/deliveries", token=operator).status_code == 200

    unknown: list[tuple[str, str, Any]] = [
        ("GET", "/webhooks/wh_nope", None), ("PATCH", "/webhooks/wh_nope", {"enabled": True}),
        ("DELETE", "/webhooks/wh_nope", None), ("GET", "/webhooks/wh_nope/deliveries", None),
        ("POST", "/webhooks/wh_nope/test", None), ("POST", "/webhooks/deliveries/msg_nope/retry", None)]
    for method, path, body in unknown:
        r = s.api(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"] == "not_found"

    # the CLI: one line on stderr, exit 1 (usage errors: 2)
    for args in [("webhook", "create", "ftp://example.com/x", "--event", "alert.*"),
                 ("webhook", "create", receiver.url),
                 ("webhook", "create", receiver.url, "--event", "Bad Glob"),
                 ("webhook", "show", "wh_nope"), ("webhook", "delete", "wh_nope"),
                 ("webhook", "deliveries", "wh_nope"), ("webhook", "retry", "msg_nope")]:
        p = s.cli(*args)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, (args, p.stderr)
    p = s.cli("webhook", "create", receiver.url, "--event", "alert.*", token=operator)
    assert p.returncode == 1 and "admin" in p.stderr
    assert s.cli("webhook", "show").returncode == 2

    assert (s.api("GET", "/webhooks").json(), audit_head(s)) == before
    assert deliveries(s, hook["id"]) == [] and receiver.received() == []


def test_patch_changes_url_events_and_description(shared_server: ServerProc, receiver: Receiver) -> None:
    s = shared_server
    hook = create_hook(s, "https://old.example.com/x?token=abc")
    r = s.api("PATCH", f"/webhooks/{hook['id']}",
              json={"url": receiver.url, "events": ["rollout.*", "rollout.*", "*.failed"], "description": "new"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["url"], doc["events"], doc["description"]) == (receiver.url, ["rollout.*", "*.failed"], "new")
    assert doc["secret"] != hook["secret"] and doc["secret"].startswith("whsec_****")
    msg = send_test(s, hook["id"])
    wait_until(lambda: receiver.received(msg), what="the test event at the new URL")
    assert receiver.verified(hook["secret"], msg)  # the secret did not change
    # the audit log keeps the URL's origin, not its path or query (those can be credentials)
    entries = s.api("GET", "/audit", params={"target": hook["id"]}).json()["items"]
    text = json.dumps(entries)
    assert "token=abc" not in text and "https://old.example.com" in text


def test_cli_takes_a_secret_on_stdin(shared_server: ServerProc, receiver: Receiver) -> None:
    s = shared_server
    given = "whsec_" + base64.b64encode(b"s" * 24).decode()
    r = s.cli("webhook", "create", receiver.url, "--events", "alert.firing,alert.resolved", "--secret-stdin",
              "--json", input=given + "\n")
    assert r.returncode == 0, r.stderr
    hook = json.loads(r.stdout)
    assert hook["secret"] == given and hook["events"] == ["alert.firing", "alert.resolved"]
    r = s.cli("webhook", "test", hook["id"], "--json")
    msg = json.loads(r.stdout)["id"]
    wait_until(lambda: receiver.received(msg), what="the test event")
    assert receiver.verified(given, msg)[0]["data"]["webhook_id"] == hook["id"]
    r = s.cli("webhook", "create", receiver.url, "--event", "*", "--secret-stdin", input="not-a-secret\n")
    assert r.returncode == 1 and "secret" in r.stderr and "not-a-secret" not in r.stderr
