"""Small pure pieces: durations, the wire codec, bus subjects, error mapping."""

from __future__ import annotations

import msgspec
import pytest

from corral import protocol as p
from corral.core.durations import parse_duration
from corral.errors import CorralError, InvalidInput, NotFound, SelectorError
from corral.server.api.errors import status_for
from corral.server.bus import subject_matches


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("24h", 86400), ("7d", 604800), ("1h30m", 5400), ("2w", 1209600),
    ("90", 90), ("0.5", 0.5), ("250ms", 0.25), (" 1H ", 3600),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "5x", "1h 30m", "-5s", "0", "nan", "inf", "5m3", "m5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_duration(text)


def test_codec_round_trips_binary_and_json() -> None:
    c = p.Codec()
    cmd = p.Command(name="ping", args={"a": 1})
    for binary in (True, False):
        frame = c.encode(cmd, id="c1", binary=binary)
        env, body = c.decode(frame if binary else frame.decode())
        assert env.type == "command" and env.id == "c1" and body == cmd


def test_codec_ignores_unknown_fields_for_forward_compatibility() -> None:
    c = p.Codec()
    frame = b'{"type":"heartbeat","body":{"seq":3,"future":"field"},"ts":1,"extra":true}'
    _, body = c.decode(frame.decode())
    assert body == p.Heartbeat(seq=3)


@pytest.mark.parametrize("frame", [b"\xc1", b'{"type":1}', b'{"type":"nope","body":{}}',
                                   b'{"type":"hello","body":{"device_id":5}}'])
def test_codec_rejects_malformed(frame: bytes) -> None:
    c = p.Codec()
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        c.decode(frame if frame.startswith(b"\xc1") else frame.decode())


def test_device_id_is_a_stable_fingerprint() -> None:
    assert p.device_id_for(b"\x01" * 32) == p.device_id_for(b"\x01" * 32)
    assert p.device_id_for(b"\x01" * 32) != p.device_id_for(b"\x02" * 32)
    assert len(p.device_id_for(b"\x01" * 32)) == p.DEVICE_ID_HEX_CHARS


def test_signing_payload_binds_nonce_identity_and_key() -> None:
    base = p.hello_signing_payload(b"n" * 32, "id", b"k" * 32)
    assert base != p.hello_signing_payload(b"m" * 32, "id", b"k" * 32)
    assert base != p.hello_signing_payload(b"n" * 32, "id2", b"k" * 32)
    assert base != p.hello_signing_payload(b"n" * 32, "id", b"j" * 32)


@pytest.mark.parametrize(("pattern", "subject", "match"), [
    ("device.*.command", "device.abc.command", True),
    ("device.*.command", "device.abc.close", False),
    ("device.*.command", "device.abc.command.x", False),
    ("device.>", "device.abc.command", True),
    ("command.*.done", "command.1.done", True),
])
def test_subjects(pattern: str, subject: str, match: bool) -> None:
    assert subject_matches(pattern, subject) is match


def test_error_mapping() -> None:
    assert status_for(SelectorError("bad", 3)) == 400
    assert status_for(NotFound("x")) == 404
    assert status_for(CorralError("x")) == 500
    assert SelectorError("bad", 3).detail == "column 3: bad"
