"""Remote access, the pure parts: forward specs, the forward target allow-list, file-transfer paths
(traversal and symlinks), asciicast v2 recordings."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from corral.core.remote import (
    Asciicast,
    Forward,
    TargetPolicy,
    parse_allow,
    parse_forward,
    read_asciicast,
    resolve_allowed,
)
from corral.errors import InvalidInput


@pytest.mark.parametrize(("spec", "forward"), [
    ("8080:localhost:80", Forward("127.0.0.1", 8080, "localhost", 80)),
    ("0.0.0.0:8080:10.0.0.5:443", Forward("0.0.0.0", 8080, "10.0.0.5", 443)),
    ("8080:[::1]:80", Forward("127.0.0.1", 8080, "::1", 80)),
    ("[::1]:2222:localhost:22", Forward("::1", 2222, "localhost", 22)),
])
def test_forward_specs(spec: str, forward: Forward) -> None:
    assert parse_forward(spec) == forward


@pytest.mark.parametrize("spec", ["", "8080", "8080:localhost", "x:localhost:80", "8080:localhost:0",
                                  "8080:localhost:70000", "8080::80", "8080:[::1:80", "a:b:c:d:e"])
def test_bad_forward_specs(spec: str) -> None:
    with pytest.raises(InvalidInput):
        parse_forward(spec)


@pytest.mark.parametrize(("host", "port", "allowed"), [
    ("localhost", 80, True),
    ("127.0.0.1", 8080, True),
    ("127.1.2.3", 22, True),
    ("::1", 22, True),
    ("[::1]", 22, True),
    ("10.0.0.5", 80, False),
    ("example.com", 80, False),
    ("169.254.169.254", 80, False),
])
def test_the_default_policy_allows_the_loopback_only(host: str, port: int, allowed: bool) -> None:
    assert TargetPolicy().allows(host, port) is allowed


def test_a_policy_with_networks_names_and_ports() -> None:
    policy = TargetPolicy(("10.0.0.0/24:80", "printer.lan:631", "[fd00::/8]:*"))
    assert policy.allows("10.0.0.9", 80) and not policy.allows("10.0.0.9", 81)
    assert not policy.allows("10.0.1.9", 80)
    assert policy.allows("printer.lan", 631) and not policy.allows("printer.lan", 80)
    assert policy.allows("fd00::1", 5000) and not policy.allows("fe80::1", 5000)
    assert not policy.allows("localhost", 80)  # the loopback only when listed


@pytest.mark.parametrize("entry", ["localhost", "localhost:", ":80", "host:port", "10.0.0.0/33:80", "[::1]",
                                   "host:70000"])
def test_bad_policy_entries(entry: str) -> None:
    with pytest.raises(InvalidInput):
        parse_allow(entry)
    with pytest.raises(InvalidInput):
        TargetPolicy((entry,))


def test_transfer_paths_stay_inside_the_allowed_directories(tmp_path: Path) -> None:
    allowed = tmp_path / "data"
    (allowed / "sub").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    assert resolve_allowed(str(allowed / "sub" / "new.txt"), [allowed]) == (allowed / "sub" / "new.txt").resolve()
    assert resolve_allowed(str(allowed), [allowed]) == allowed.resolve()
    for bad in [str(allowed / ".." / "secret" / "x"), str(allowed / "escape" / "x"), "relative/x", "",
                str(outside), "/etc/passwd", str(allowed) + "-sibling/x", "a\x00b"]:
        with pytest.raises(InvalidInput):
            resolve_allowed(bad, [allowed])
    with pytest.raises(InvalidInput, match="outside the directories"):
        resolve_allowed(str(allowed / "x"), [])


def test_an_asciicast_v2_recording_round_trips() -> None:
    out = io.StringIO()
    cast = Asciicast(out, 80, 24, started=1000.0, env={"SHELL": "/bin/sh"}, title="device d1")
    cast.header()
    cast.output(1000.5, b"$ echo hi\r\nhi\r\n")
    cast.resize(1001.25, 100, 30)
    cast.output(1002.0, "é".encode()[:1])  # a character split across two chunks is kept whole
    cast.output(1002.5, "é".encode()[1:] + b"!")
    header, events = read_asciicast(out.getvalue().splitlines())
    assert header == {"version": 2, "width": 80, "height": 24, "timestamp": 1000, "title": "device d1",
                      "env": {"SHELL": "/bin/sh"}}
    assert events[:2] == [[0.5, "o", "$ echo hi\r\nhi\r\n"], [1.25, "r", "100x30"]]
    assert events[2:] == [[2.5, "o", "é!"]]
    with pytest.raises(InvalidInput):
        read_asciicast(['{"version": 1}'])
