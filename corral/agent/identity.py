"""The device's identity and its small persistent state, both in the state dir (DESIGN §2).

On first start the agent generates an Ed25519 key pair and writes the private key to
``<state_dir>/device.key`` (PKCS#8 PEM, RFC 8410, mode 0600, directory 0700). The device ID is a
fingerprint of the public key (:func:`corral.protocol.device_id_for`), so it is stable for as
long as the key file exists, and the private key never leaves the device.

Files are written atomically: a temp file in the same directory, ``fsync``, then a rename (or,
for the key, a hard link, which fails instead of replacing a key another process created at the
same moment), then an ``fsync`` of the directory. A power cut leaves the old file or the new
one, never half of one. Permissions that are too open are warned about and tightened.

``state.json`` keeps what the agent learnt from the server (enrolled or not, last admission
status) so that a restarted agent knows whether it still needs to present its enrollment token.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import stat
from pathlib import Path

import msgspec
from nacl.signing import SigningKey

from corral import protocol
from corral.errors import InvalidInput
from corral.fileio import atomic_write, fsync_dir, write_temp

log = logging.getLogger("corral.agent.identity")

KEY_FILE = "device.key"
STATE_FILE = "state.json"
DIR_MODE = 0o700
FILE_MODE = 0o600


# Signing is PyNaCl (libsodium), not ``cryptography``: on the device the agent's resident memory
# is the budget, and importing ``cryptography`` maps its own OpenSSL (measured: +8.0 MB RSS, against
# +1.5 MB for PyNaCl). The key file keeps the standard format, which is one fixed DER prefix and
# the 32-byte seed for an Ed25519 key (RFC 8410 §7), so keys written by either library load.
_PKCS8_ED25519_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


def key_to_pem(key: SigningKey) -> bytes:
    b64 = base64.b64encode(_PKCS8_ED25519_PREFIX + bytes(key)).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return b"\n".join([_PEM_BEGIN, *(line.encode() for line in lines), _PEM_END, b""])


class KeyFormatError(ValueError):
    pass


def key_from_pem(data: bytes) -> SigningKey:
    """The Ed25519 key of a PKCS#8 PEM file; :class:`KeyFormatError` says what is wrong."""
    text = data.strip()
    if b"-----BEGIN " in text and b" PRIVATE KEY-----" in text and not text.startswith(_PEM_BEGIN):
        # BEGIN EC / RSA / OPENSSH / ENCRYPTED PRIVATE KEY: another algorithm, format or a passphrase
        raise KeyFormatError("not an unencrypted PKCS#8 Ed25519 key (BEGIN PRIVATE KEY)")
    if not (text.startswith(_PEM_BEGIN) and text.endswith(_PEM_END)):
        raise KeyFormatError("not a readable PEM private key")
    try:
        der = base64.b64decode(b"".join(text[len(_PEM_BEGIN):-len(_PEM_END)].split()), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("not a readable PEM private key") from None
    seed = der[len(_PKCS8_ED25519_PREFIX):]
    if der.startswith(_PKCS8_ED25519_PREFIX) and len(seed) == 32:
        return SigningKey(seed)
    if der[:1] == b"\x30":
        raise KeyFormatError("not an Ed25519 key")  # a DER structure, some other algorithm
    raise KeyFormatError("not a readable PEM private key")


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (0700) or tighten an existing one that others can read."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("state dir %s had mode %o; setting it to %o", path, mode, DIR_MODE)
            path.chmod(DIR_MODE)
    except OSError as exc:
        raise InvalidInput(f"state dir {path}: {exc.strerror or exc}") from None


def _create_exclusive(path: Path, data: bytes, mode: int = FILE_MODE) -> bool:
    """Atomically create ``path`` unless it exists; False if another writer got there first."""
    tmp = write_temp(path, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:
        # filesystems without hard links: fall back to rename (last writer wins)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def _tighten_file(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s had mode %o; setting it to %o", path, mode, FILE_MODE)
        path.chmod(FILE_MODE)


class Identity:
    """The device key: :attr:`public_key_raw`, :attr:`device_id` and :meth:`sign`."""

    __slots__ = ("_key", "device_id", "key_path", "public_key_raw")

    def __init__(self, key: SigningKey, key_path: Path | None = None) -> None:
        self._key = key
        self.key_path = key_path
        self.public_key_raw: bytes = bytes(key.verify_key)
        self.device_id: str = protocol.device_id_for(self.public_key_raw)

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload).signature

    @classmethod
    def generate(cls) -> Identity:
        """A fresh in-memory identity (tests)."""
        return cls(SigningKey.generate())

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Identity:
        """Load ``state_dir/device.key``, generating it (and the dir) on first start."""
        ensure_private_dir(state_dir)
        path = state_dir / KEY_FILE
        if not path.exists():
            key = SigningKey.generate()
            try:
                created = _create_exclusive(path, key_to_pem(key))
            except OSError as exc:
                raise InvalidInput(f"cannot write device key {path}: {exc.strerror or exc}") from None
            if created:
                log.info("generated a new device key in %s", path)
                return cls(key, path)
            # another process created it first: use theirs, so there is only one identity
        return cls(cls._read_key(path), path)

    @staticmethod
    def _read_key(path: Path) -> SigningKey:
        try:
            _tighten_file(path)
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read device key {path}: {exc.strerror or exc}") from None
        try:
            return key_from_pem(data)
        except KeyFormatError as exc:
            # never replace it silently: that would change the device's identity
            raise InvalidInput(f"device key {path} is {exc}; move it away to make a new identity") from None


class AgentState(msgspec.Struct, omit_defaults=True):
    """What the agent remembers between runs."""

    device_id: str = ""
    #: the server accepted this device once: stop presenting the enrollment token
    enrolled: bool = False
    #: last admission status the server reported
    status: str | None = None


class StateStore:
    """``state_dir/state.json``, read once and rewritten (atomically) only when it changes."""

    __slots__ = ("path", "state")

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self.state = self._load()

    def _load(self) -> AgentState:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        except OSError as exc:
            log.warning("cannot read %s (%s); starting with empty state", self.path, exc.strerror or exc)
            return AgentState()
        try:
            return msgspec.json.decode(data, type=AgentState)
        except msgspec.DecodeError as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return AgentState()

    def save(self, state: AgentState) -> None:
        """Write ``state`` (atomically, fsync'd) and keep it as the current state."""
        atomic_write(self.path, msgspec.json.encode(state) + b"\n")
        self.state = state

    def update(self, **changes: object) -> bool:
        """Apply ``changes``; write the file only if anything differs. Returns whether it wrote."""
        new = msgspec.structs.replace(self.state, **changes)
        if new == self.state:
            return False
        self.save(new)
        return True
