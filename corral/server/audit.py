"""The tamper-evident audit log: a hash chain keyed with a secret outside the database.

Each entry stores ``hash = HMAC-SHA256(key, prev_hash || canonical_json(entry))`` and the
current head (last seq and hash) is kept in ``meta``. ``verify`` walks the chain and reports the
first break: an altered row (hash mismatch), a deleted row (seq gap or prev_hash mismatch) or a
truncated tail (head does not match the last row). Because the key lives in the data dir and not
in the database, someone with only database access cannot forge a consistent chain.

Entries are written in the same transaction as the change they record, so a change and its
audit entry commit or roll back together.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.server.store.models import AuditEntry, Meta

GENESIS = "0" * 64
HEAD_KEY = "audit_head"


def _canonical(seq: int, ts: float, actor: str, action: str, target: str, detail: dict[str, Any],
               request_id: str) -> bytes:
    doc = {"seq": seq, "ts": repr(ts), "actor": actor, "action": action, "target": target,
           "detail": detail, "request_id": request_id}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(key: bytes, prev_hash: str, canonical: bytes) -> str:
    return hmac.new(key, prev_hash.encode() + canonical, hashlib.sha256).hexdigest()


async def record(db: AsyncSession, key: bytes, *, actor: str, action: str, target: str = "",
                 detail: dict[str, Any] | None = None, request_id: str = "") -> AuditEntry:
    """Append an entry in the caller's transaction (the caller commits).

    Writers must be serialised until commit: on SQLite by the server's write lock
    (``ServerContext.writer``), on PostgreSQL by locking the head row FOR UPDATE here.
    """
    detail = json.loads(json.dumps(detail or {}, default=str))  # plain JSON, as it will read back
    if True:
        stmt = select(Meta).where(Meta.key == HEAD_KEY)
        if db.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        head = await db.scalar(stmt)
        if head is None:
            seq, prev = 0, GENESIS
            head = Meta(key=HEAD_KEY, value="")
            db.add(head)
        else:
            last_seq, prev = head.value.split(":", 1)
            seq = int(last_seq)
        seq += 1
        ts = time.time()
        digest = chain_hash(key, prev, _canonical(seq, ts, actor, action, target, detail, request_id))
        entry = AuditEntry(seq=seq, ts=ts, actor=actor, action=action, target=target, detail=detail,
                           request_id=request_id, prev_hash=prev, hash=digest)
        db.add(entry)
        head.value = f"{seq}:{digest}"
        await db.flush()
        return entry


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    problem: str = ""
    seq: int | None = None


async def verify(db: AsyncSession, key: bytes, batch: int = 5000) -> VerifyResult:
    prev, expected_seq, count = GENESIS, 1, 0
    last_seq = 0
    while True:
        rows = (
            await db.scalars(
                select(AuditEntry).where(AuditEntry.seq >= expected_seq).order_by(AuditEntry.seq).limit(batch)
            )
        ).all()
        if not rows:
            break
        for e in rows:
            if e.seq != expected_seq:
                return VerifyResult(False, count, f"entry {expected_seq} is missing (deleted)", expected_seq)
            if e.prev_hash != prev:
                return VerifyResult(False, count, f"entry {e.seq} does not link to its predecessor", e.seq)
            canon = _canonical(e.seq, e.ts, e.actor, e.action, e.target, e.detail, e.request_id)
            if not hmac.compare_digest(chain_hash(key, prev, canon), e.hash):
                return VerifyResult(False, count, f"entry {e.seq} was altered", e.seq)
            prev, expected_seq, last_seq = e.hash, e.seq + 1, e.seq
            count += 1
    head = await db.scalar(select(Meta).where(Meta.key == HEAD_KEY))
    if head is None:
        if count:
            return VerifyResult(False, count, "the chain head is missing", None)
        return VerifyResult(True, 0)
    head_seq, head_hash = head.value.split(":", 1)
    if int(head_seq) != last_seq or head_hash != prev:
        return VerifyResult(False, count, f"entries after {last_seq} are missing (log truncated)", last_seq + 1)
    return VerifyResult(True, count)
