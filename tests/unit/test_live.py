"""The console's live streams (corral.server.live): the state first, then only changes, ending at
the deadline or when the browser goes away."""

from __future__ import annotations

import asyncio
import json

from corral.server.live import RETRY_MS, changes, event


def parse(chunks: list[bytes]) -> list[object]:
    return [json.loads(c.decode().split("data: ", 1)[1]) for c in chunks if c.startswith(b"event: ")]


def test_only_changes_are_sent_and_the_stream_ends_when_the_browser_leaves() -> None:
    states = iter([{"n": 1}, {"n": 1}, {"n": 2}, {"n": 2}, {"n": 3}])
    seen: list[bytes] = []
    polls = {"n": 0}

    async def snapshot() -> object:
        return next(states)

    async def gone() -> bool:
        polls["n"] += 1
        return polls["n"] > 5

    async def go() -> None:
        async for chunk in changes(snapshot, 0, 60, gone):
            seen.append(chunk)

    asyncio.run(go())
    assert seen[0] == f"retry: {RETRY_MS}\n\n".encode()
    assert parse(seen) == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_a_stream_ends_at_its_deadline() -> None:
    async def snapshot() -> object:
        return {"same": True}

    async def here() -> bool:
        return False

    async def go() -> list[bytes]:
        return [c async for c in changes(snapshot, 0.01, 0.05, here)]

    assert parse(asyncio.run(go())) == [{"same": True}]


def test_an_event_is_one_line_of_json() -> None:
    assert event({"a": "x\ny"}, "rollout") == b'event: rollout\ndata: {"a":"x\\ny"}\n\n'


def test_a_stream_ends_when_its_viewer_is_no_longer_allowed() -> None:
    answers = iter([True, True, False])
    states = iter([{"n": 1}, {"n": 2}, {"n": 3}])

    async def snapshot() -> object:
        return next(states)

    async def here() -> bool:
        return False

    async def allowed() -> bool:
        return next(answers)

    async def go() -> list[bytes]:
        return [c async for c in changes(snapshot, 0, 60, here, allowed)]

    assert parse(asyncio.run(go())) == [{"n": 1}, {"n": 2}]
