"""Operators and their credentials.

Passwords are hashed with Argon2id (argon2-cffi). API tokens are random 256-bit secrets shown
once; only their SHA-256 is stored, so a leaked database does not leak usable tokens. Roles are
ordered: ``viewer`` < ``operator`` < ``admin``; an endpoint names the least role it needs.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from corral.errors import Conflict, InvalidInput, Unauthorized
from corral.server.store.models import ApiToken, User

ROLES = ("viewer", "operator", "admin")
ROLE_RANK = {r: i for i, r in enumerate(ROLES)}
TOKEN_PREFIX = "crl_"
USERNAME_MAX = 64

_hasher = PasswordHasher()


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from an API token on every request."""

    user_id: int
    name: str
    role: str
    token_id: str
    stale_last_used: bool = field(default=False, compare=False)
    #: the remote-access permission (terminals, forwards, file transfers); admins always have it
    remote_access: bool = False

    def has_role(self, least: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[least]

    @property
    def may_access_devices(self) -> bool:
        return self.role == "admin" or (self.role == "operator" and self.remote_access)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    if not stored_hash:
        return False
    try:
        return _hasher.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def csrf_token(session_token: str) -> str:
    """The console session's CSRF token: derived from the session's secret, so every replica
    computes the same one without storing it, and a page that shows it reveals nothing that
    authenticates (nor the digest the database keeps, which is a plain SHA-256)."""
    return hmac.new(session_token.encode(), b"corral console csrf", hashlib.sha256).hexdigest()


def csrf_token_ok(session_token: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(csrf_token(session_token), presented or "")


def origin_allowed(origin: str | None, host: str | None, public_url: str) -> bool:
    """Whether a browser's ``Origin`` is this server's own: the host it addressed (``Host``), or
    the configured public URL's origin (behind a proxy that terminates TLS). A missing or
    ``null`` origin is not ours."""
    if not origin or origin == "null":
        return False
    scheme, sep, netloc = origin.partition("://")
    if not sep or scheme not in ("http", "https"):
        return False
    if host and netloc.lower() == host.lower():
        return True
    return origin.rstrip("/").lower() == public_origin(public_url)


def public_origin(public_url: str) -> str:
    scheme, _, rest = public_url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}".lower()


def new_password() -> str:
    return secrets.token_urlsafe(18)


def validate_username(name: str) -> str:
    if not name or len(name) > USERNAME_MAX or not all(c.isalnum() or c in "._-@" for c in name):
        raise InvalidInput(f"user name must be 1-{USERNAME_MAX} characters of letters, digits and ._-@")
    return name


def validate_role(role: str) -> str:
    if role not in ROLE_RANK:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


async def create_user(db: AsyncSession, name: str, role: str, password: str | None) -> User:
    validate_username(name)
    validate_role(role)
    if password is not None and len(password) < 8:
        raise InvalidInput("password must be at least 8 characters")
    exists = await db.scalar(select(User.id).where(User.name == name))
    if exists is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(
        name=name,
        role=role,
        password_hash=hash_password(password) if password else None,
        created_at=time.time(),
    )
    db.add(user)
    await db.flush()
    return user


async def issue_token(db: AsyncSession, user: User, name: str = "", ttl: float | None = None) -> tuple[str, ApiToken]:
    """Create an API token for ``user``; returns the secret (shown once) and its row."""
    secret = new_token()
    now = time.time()
    row = ApiToken(
        id=secrets.token_hex(8),
        user_id=user.id,
        name=name[:128],
        token_hash=token_digest(secret),
        created_at=now,
        expires_at=now + ttl if ttl else None,
    )
    db.add(row)
    await db.flush()
    return secret, row


async def resolve_token(db: AsyncSession, token: str) -> Principal:
    """Map a presented API token to its principal, or raise Unauthorized."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        raise Unauthorized("invalid API token")
    row = (
        await db.execute(
            select(ApiToken, User)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_hash == token_digest(token))
        )
    ).first()
    if row is None:
        raise Unauthorized("invalid API token")
    tok, user = row
    now = time.time()
    if tok.expires_at is not None and tok.expires_at < now:
        raise Unauthorized("API token expired")
    if user.disabled:
        raise Unauthorized("user disabled")
    # last_used is advisory: the caller records it (through the writer) only when it is stale
    stale = tok.last_used_at is None or now - tok.last_used_at > 60
    return Principal(user_id=user.id, name=user.name, role=user.role, token_id=tok.id, stale_last_used=stale,
                     remote_access=user.remote_access)


def touch_statement(token_id: str) -> Any:
    return (update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=time.time())
            .execution_options(synchronize_session=False))


async def authenticate_password(db: AsyncSession, name: str, password: str) -> User:
    user = await db.scalar(select(User).where(User.name == name))
    # verify against a dummy hash when the user is unknown, so timing does not reveal names
    if user is None:
        verify_password(_dummy_hash(), password)
        raise Unauthorized("wrong user name or password")
    if user.disabled or not verify_password(user.password_hash, password):
        raise Unauthorized("wrong user name or password")
    return user


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash("corral-dummy-password")
