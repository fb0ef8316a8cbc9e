"""Device identity and state files: permissions, stability, atomic writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from corral import protocol
from corral.agent import identity as identity_mod
from corral.agent.identity import AgentState, Identity, StateStore
from corral.errors import InvalidInput
from corral.fileio import atomic_write


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_first_start_creates_a_private_key_in_a_private_dir(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    ident = Identity.load_or_create(state)
    key = state / "device.key"
    assert mode(state) == 0o700
    assert mode(key) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert len(ident.public_key_raw) == 32
    assert ident.device_id == protocol.device_id_for(ident.public_key_raw)
    assert sorted(p.name for p in state.iterdir()) == ["device.key"]  # no temp file left behind


def test_identity_is_stable_across_restarts(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path / "s")
    again = Identity.load_or_create(tmp_path / "s")
    assert again.device_id == first.device_id
    assert again.public_key_raw == first.public_key_raw
    other = Identity.load_or_create(tmp_path / "other")
    assert other.device_id != first.device_id


def test_signature_verifies_with_the_public_key(tmp_path: Path) -> None:
    ident = Identity.load_or_create(tmp_path / "s")
    payload = protocol.hello_signing_payload(b"n" * 32, ident.device_id, ident.public_key_raw)
    Ed25519PublicKey.from_public_bytes(ident.public_key_raw).verify(ident.sign(payload), payload)


def test_too_open_permissions_are_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "s"
    ident = Identity.load_or_create(state)
    state.chmod(0o755)
    (state / "device.key").chmod(0o644)
    again = Identity.load_or_create(state)
    assert again.device_id == ident.device_id
    assert mode(state) == 0o700
    assert mode(state / "device.key") == 0o600
    assert "mode 644" in caplog.text and "mode 755" in caplog.text


def test_a_corrupt_key_is_an_error_and_is_not_replaced(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (state / "device.key").write_bytes(b"garbage")
    (state / "device.key").chmod(0o600)
    with pytest.raises(InvalidInput, match=r"device\.key is not a readable PEM private key"):
        Identity.load_or_create(state)
    assert (state / "device.key").read_bytes() == b"garbage"


def test_a_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (state / "device.key").write_bytes(pem)
    with pytest.raises(InvalidInput, match="not an Ed25519 key"):
        Identity.load_or_create(state)


def test_a_key_written_by_cryptography_loads_and_ours_loads_there(tmp_path: Path) -> None:
    """The key file is plain PKCS#8 (RFC 8410): keys from earlier agents, which wrote it with
    the ``cryptography`` package, keep their identity, and ours are readable by other tools."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    theirs = Ed25519PrivateKey.generate()
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (state / "device.key").write_bytes(theirs.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (state / "device.key").chmod(0o600)
    ident = Identity.load_or_create(state)
    assert ident.public_key_raw == theirs.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ours = Identity.load_or_create(tmp_path / "o")
    loaded = serialization.load_pem_private_key((tmp_path / "o" / "device.key").read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert loaded.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == \
        ours.public_key_raw


@pytest.mark.parametrize("content", [
    b"-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",  # not base64
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",  # not DER
    b"-----BEGIN PRIVATE KEY-----\n",  # truncated
    b"",
])
def test_malformed_pem_is_refused_with_a_reason(tmp_path: Path, content: bytes) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (state / "device.key").write_bytes(content)
    with pytest.raises(InvalidInput, match="not a readable PEM private key"):
        Identity.load_or_create(state)
    assert (state / "device.key").read_bytes() == content


@pytest.mark.parametrize("label", [b"EC", b"RSA", b"OPENSSH", b"ENCRYPTED"])
def test_other_key_formats_are_refused_by_name(tmp_path: Path, label: bytes) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (state / "device.key").write_bytes(b"-----BEGIN %s PRIVATE KEY-----\nAAAA\n-----END %s PRIVATE KEY-----\n"
                                       % (label, label))
    with pytest.raises(InvalidInput, match=r"not an unencrypted PKCS#8 Ed25519 key"):
        Identity.load_or_create(state)


def test_creating_loses_to_a_key_created_concurrently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two agents starting at once on one state dir must end up with one identity."""
    state = tmp_path / "s"
    winner = Identity.load_or_create(tmp_path / "w")
    real_write_temp = identity_mod.write_temp

    def racing_write_temp(path: Path, data: bytes, mode: int) -> Path:
        # the other process finishes its key between our exists() check and our link()
        (state / "device.key").write_bytes((tmp_path / "w" / "device.key").read_bytes())
        (state / "device.key").chmod(0o600)
        return real_write_temp(path, data, mode)

    monkeypatch.setattr(identity_mod, "write_temp", racing_write_temp)
    ident = Identity.load_or_create(state)
    assert ident.device_id == winner.device_id
    assert sorted(p.name for p in state.iterdir()) == ["device.key"]


def test_atomic_write_keeps_the_old_content_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old")
    assert mode(target) == 0o600

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_state_store_round_trip_and_writes_only_on_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Identity.load_or_create(tmp_path)
    store = StateStore(tmp_path)
    assert store.state == AgentState()
    assert store.update(enrolled=True, status="accepted", device_id="abc") is True
    assert mode(tmp_path / "state.json") == 0o600
    assert json.loads((tmp_path / "state.json").read_text()) == {
        "device_id": "abc",
        "enrolled": True,
        "status": "accepted",
    }
    writes: list[Path] = []
    monkeypatch.setattr(identity_mod, "atomic_write", lambda p, d, m=0o600: writes.append(p))
    assert StateStore(tmp_path).update(status="accepted") is False
    assert writes == []
    assert StateStore(tmp_path).state.enrolled is True


def test_unreadable_state_starts_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state.json").write_text("{not json")
    assert StateStore(tmp_path).state == AgentState()
    assert "ignoring unreadable" in caplog.text
