"""Selector push-down against real databases: the SQL picks exactly the devices ``evaluate`` picks.

Random fleets (tags, nested inventory with strings / numbers / bools / nulls / lists, groups,
presence, admission status) and random selectors, on SQLite and on PostgreSQL. Values come from
small pools full of edge cases (case, ``%``/``_``/``*``/``?``/``[``/``\\`` for the glob and LIKE
escaping, numbers-as-strings, non-ASCII for ordering) so that selectors hit and miss often.

The PostgreSQL database is created per run with an ICU ``en-US`` default collation when the
server has ICU: there ``"a" < "B"``, unlike code-point order, which proves the push-down does
not depend on the database's collation.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from corral.selectors import (
    And,
    Bool,
    Compare,
    CompareOp,
    DeviceView,
    Exists,
    Field,
    In,
    Match,
    Node,
    Not,
    Num,
    Or,
    Str,
    evaluate,
    parse,
    unparse,
)
from corral.server.store.db import create_engine
from corral.server.store.models import Base, Device, DeviceTag, Group, GroupMember
from corral.server.store.selector_sql import to_sql

POSTGRES_URL = os.environ.get("CORRAL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
# Examples per engine; raise it for a soak run (the rarer traps need a few thousand to turn up).
EXAMPLES = int(os.environ.get("CORRAL_SELECTOR_EXAMPLES", "200"))

# --------------------------------------------------------------------------------------------
# Value pools. Each example draws a small sub-pool and builds both its fleet and its selectors
# from it, so selectors hit, miss and nearly-miss real values ("a%b" against "axb") all the time,
# while across examples every value gets its turn.
# --------------------------------------------------------------------------------------------

# Clusters of values that are easy to confuse; an example uses one or two clusters.
STRING_CLUSTERS = [
    ["berlin", "Berlin", "b", "B", "Ärger"],  # case, and an order that collations disagree on
    ["a%b", "a_b", "axb", "a*b", "a?b"],  # LIKE and glob metacharacters as plain characters
    ["[x]", "x", "[", "back\\slash", "\\"],  # GLOB character classes, the LIKE escape character
    ["2.0", "10", "9", "1.9.2", "true", "false"],  # strings that look like numbers or bools
    ["", "é", "z", "😀", "quote'\"", "line\nbreak"],  # empty, non-ASCII, quotes, newline
]
NUMBER_CLUSTERS: list[list[int | float]] = [
    [0, 1, -1, 3, 10],
    [2.5, 0.125, -3.75, 0.1],  # exact in binary, or short in decimal
    [1e-07, 1e10, -1e10],
    [2**53 - 1, 2**53, 2**53 + 1],  # 2**53 + 1 equals 2**53 as doubles (the documented semantics)
    [2**62, 2**63 - 1, -(2**63)],  # int64 edges
]
STRINGS = [v for cluster in STRING_CLUSTERS for v in cluster]
TAG_KEYS = ["site", "env", "a-b", "0"]
ATTR_KEYS = ["os_version", "software", "demo", "n", "x-y", "0"]
GROUPS = ["canary", "berlin-east", "b_x", "B%"]
STATUSES = ["pending", "accepted", "rejected", "decommissioned"]
GLOB_PIECES = ["*", "?", "b", "B", "e", "a", "%", "_", "[", "]", "x", "\\", "é", "1", "."]
ID_ALPHABET = "abAB09-_é"


@dataclass(frozen=True)
class Pools:
    strings: list[str]
    numbers: list[int | float]
    tag_keys: list[str]
    attr_keys: list[str]


def _clusters(clusters: list[list[Any]]) -> st.SearchStrategy[list[Any]]:
    picked = st.lists(st.sampled_from(clusters), min_size=1, max_size=2, unique_by=id)
    return picked.map(lambda chosen: [v for cluster in chosen for v in cluster])


def _subset(values: list[Any], most: int) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=most, unique=True)


pools = st.builds(
    Pools, _clusters(STRING_CLUSTERS), _clusters(NUMBER_CLUSTERS), _subset(TAG_KEYS, 2), _subset(ATTR_KEYS, 2)
)


@dataclass(frozen=True)
class FakeDevice:
    id: str
    status: str
    online: bool
    tags: dict[str, str]
    inventory: dict[str, Any]
    groups: frozenset[str]

    def view(self) -> DeviceView:
        return DeviceView(self.id, self.status, self.online, self.tags, self.inventory, self.groups)


def fleets(pool: Pools) -> st.SearchStrategy[list[FakeDevice]]:
    strings = st.sampled_from(pool.strings)
    attr_keys = st.sampled_from(pool.attr_keys)
    scalars = st.one_of(strings, st.sampled_from(pool.numbers), st.booleans(), st.none())
    containers = st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=2), st.dictionaries(attr_keys, inner, max_size=3)),
        max_leaves=4,
    )
    # st.recursive alone mostly yields containers; selectors mostly compare scalars.
    json_values = st.one_of(scalars, containers)
    device = st.builds(
        FakeDevice,
        id=st.text(ID_ALPHABET, min_size=1, max_size=6),
        status=st.sampled_from(STATUSES),
        online=st.booleans(),
        tags=st.dictionaries(st.sampled_from(pool.tag_keys), strings, max_size=2),
        inventory=st.dictionaries(attr_keys, json_values, max_size=3),
        groups=st.frozensets(st.sampled_from(GROUPS), max_size=2),
    )
    return st.lists(device, min_size=1, max_size=8, unique_by=lambda d: d.id)


# --------------------------------------------------------------------------------------------
# Selectors: well-typed ASTs over the same pools (they also go through unparse + parse).
# --------------------------------------------------------------------------------------------

ops: st.SearchStrategy[CompareOp] = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
eq_ops: st.SearchStrategy[CompareOp] = st.sampled_from(["==", "!="])
statuses = st.sampled_from(STATUSES).map(Str)
groups = st.sampled_from(GROUPS)


def _tuples(values: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(values, max_size=3).map(tuple)


@st.composite
def _globs(draw: st.DrawFn, values: st.SearchStrategy[str]) -> str:
    """A random pattern, or a real value with wildcards punched in (likely to nearly match)."""
    if draw(st.booleans()):
        return "".join(draw(st.lists(st.sampled_from(GLOB_PIECES), max_size=5)))
    chars = [ch if (pick := draw(st.sampled_from("kkk?*"))) == "k" else pick for ch in draw(values)]
    if draw(st.booleans()):
        chars.insert(draw(st.integers(0, len(chars))), "*")
    return "".join(chars)


def _json_items(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) inside a JSON object; lists have no keys, so paths stop there."""
    if not isinstance(value, dict):
        return []
    found = []
    for key, inner in value.items():
        found += [((*prefix, key), inner), *_json_items(inner, (*prefix, key))]
    return found


@st.composite
def _anchored_leaves(draw: st.DrawFn, pool: Pools, anchors: list[tuple[Field, Any]]) -> Node:
    """A test on a field a device really has, against its value or a confusable neighbour."""
    fld, value = draw(st.sampled_from(anchors))
    literals: list[st.SearchStrategy[Any]] = [st.sampled_from(pool.strings).map(Str)]
    if isinstance(value, str):
        literals.append(st.just(Str(value)))
    if fld.kind == "attr":  # tags hold strings only; attrs take any literal type
        literals.append(st.sampled_from(pool.numbers).map(Num))
        if isinstance(value, int | float) and not isinstance(value, bool):
            literals.append(st.just(Num(value)))
    list_items = st.one_of(literals)
    if fld.kind == "attr":
        literals.append(st.booleans().map(Bool))
    literal = draw(st.one_of(literals))
    if isinstance(literal, Bool):
        return Compare(fld, draw(eq_ops), literal)
    shape = draw(st.sampled_from(["compare", "in", "match"] if isinstance(literal, Str) else ["compare", "in"]))
    if shape == "compare":
        return Compare(fld, draw(ops), literal)
    if shape == "match":
        return Match(fld, draw(_globs(st.just(literal.value))))
    return In(fld, (literal, *draw(_tuples(list_items))), draw(st.booleans()))


def selectors(pool: Pools, fleet: list[FakeDevice]) -> st.SearchStrategy[Node]:
    strings = st.sampled_from(pool.strings)
    ids = st.one_of(st.sampled_from([d.id for d in fleet] or ["x"]), st.text(ID_ALPHABET, max_size=6))
    tag_fields = st.sampled_from(pool.tag_keys).map(lambda key: Field("tag", (key,)))
    attr_paths = st.lists(st.sampled_from(pool.attr_keys), min_size=1, max_size=3)
    attr_fields = attr_paths.map(lambda path: Field("attr", tuple(path)))
    anchors = [(Field("tag", (k,)), v) for d in fleet for k, v in d.tags.items()]
    anchors += [(Field("attr", path), v) for d in fleet for path, v in _json_items(d.inventory)]
    attr_literals = st.one_of(strings.map(Str), st.sampled_from(pool.numbers).map(Num))
    group_field = st.just(Field("group"))

    def string_leaves(fld: st.SearchStrategy[Field], values: st.SearchStrategy[str]) -> st.SearchStrategy[Node]:
        return st.one_of(
            st.builds(Compare, fld, ops, values.map(Str)),
            st.builds(Match, fld, _globs(values)),
            st.builds(In, fld, _tuples(values.map(Str)), st.booleans()),
        )

    leaves: st.SearchStrategy[Node] = st.one_of(
        st.builds(Compare, st.just(Field("online")), eq_ops, st.booleans().map(Bool)),
        st.builds(Compare, st.just(Field("status")), eq_ops, statuses),
        st.builds(In, st.just(Field("status")), _tuples(statuses), st.booleans()),
        string_leaves(st.just(Field("id")), ids),
        string_leaves(tag_fields, strings),
        st.builds(Compare, group_field, eq_ops, groups.map(Str)),
        st.builds(Match, group_field, _globs(groups)),
        st.builds(In, group_field, _tuples(groups.map(Str)), st.booleans()),
        st.builds(Compare, attr_fields, ops, attr_literals),
        st.builds(Compare, attr_fields, eq_ops, st.booleans().map(Bool)),
        st.builds(Match, attr_fields, _globs(strings)),
        st.builds(In, attr_fields, _tuples(attr_literals), st.booleans()),
        st.builds(Exists, st.one_of(tag_fields, attr_fields)),
    )
    if anchors:
        leaves = st.one_of(leaves, _anchored_leaves(pool, anchors))
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            children.map(Not),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
            st.lists(children, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs))),
        ),
        max_leaves=6,
    ).map(lambda node: parse(unparse(node)))  # canonical, and proof the parser accepts it


# --------------------------------------------------------------------------------------------
# The check, shared by both engines
# --------------------------------------------------------------------------------------------


async def _create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(insert(Group), [{"name": g, "created_at": 0.0} for g in GROUPS])


async def _insert_fleet(conn: AsyncConnection, fleet: list[FakeDevice]) -> None:
    if not fleet:
        return
    await conn.execute(
        insert(Device),
        [
            {
                "id": d.id,
                "public_key": hashlib.sha256(d.id.encode()).digest(),
                "status": d.status,
                "online": d.online,
                "inventory": d.inventory,
                "created_at": 0.0,
                "updated_at": 0.0,
            }
            for d in fleet
        ],
    )
    tags = [{"device_id": d.id, "key": k, "value": v} for d in fleet for k, v in d.tags.items()]
    if tags:
        await conn.execute(insert(DeviceTag), tags)
    members = [{"device_id": d.id, "group_name": g} for d in fleet for g in d.groups]
    if members:
        await conn.execute(insert(GroupMember), members)


async def _check(engine: AsyncEngine, fleet: list[FakeDevice], nodes: list[Node]) -> None:
    """Insert ``fleet``, compare SQL and Python for each selector, leave the tables empty."""
    async with engine.connect() as conn:
        transaction = await conn.begin()
        try:
            await _insert_fleet(conn, fleet)
            for node in nodes:
                expected = {d.id for d in fleet if evaluate(node, d.view())}
                statement = select(Device.id).where(to_sql(node))
                actual = set((await conn.scalars(statement)).all())
                assert actual == expected, (
                    f"selector {unparse(node)!r} on {conn.dialect.name}: SQL picked {sorted(actual)}, "
                    f"evaluate picked {sorted(expected)}\n"
                    f"SQL: {statement.compile(dialect=conn.dialect)}"
                )
        finally:
            await transaction.rollback()


def _run_property(runner: asyncio.Runner, engine: AsyncEngine) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def push_down_matches_evaluate(data: st.DataObject) -> None:
        pool = data.draw(pools, label="pools")
        fleet = data.draw(fleets(pool), label="fleet")
        nodes = data.draw(st.lists(selectors(pool, fleet), min_size=1, max_size=6), label="selectors")
        runner.run(_check(engine, fleet, nodes))

    push_down_matches_evaluate()


# Hand-picked cases that name each trap the push-down must avoid; the property test then
# roams around them.
FIXED_FLEET = [
    FakeDevice("dev-a", "accepted", True, {"site": "berlin", "env": "a%b"}, {
        "os_version": "1.9.2", "n": 3, "x-y": "10", "software": {"demo": "1.2.0"}, "0": [1, 2],
        "demo": True,
    }, frozenset({"canary"})),
    FakeDevice("dev-B", "pending", False, {"site": "Berlin", "env": "axb"}, {
        "os_version": "2.0", "n": "3", "x-y": 9, "software": None, "demo": False,
    }, frozenset({"b_x"})),
    FakeDevice("dev-c", "rejected", True, {"site": "z", "0": "[x]"}, {
        "os_version": 2, "n": 2.5, "0": {"0": "back\\slash"}, "big": 2**53,
    }, frozenset()),
    FakeDevice("dev-d", "decommissioned", False, {"0": "x"}, {
        "demo": "true", "big": 2**53 + 1,
    }, frozenset({"B%"})),
]  # fmt: skip
FIXED_SELECTORS = [
    'tag.site == "berlin" and attr.os_version < "2.0" and online',
    'tag.site < "a"',  # code-point order: "Berlin" < "a" < "berlin", whatever the collation
    'tag.site > "Berlin"',
    'id < "dev-a"',
    'tag.site ~ "?erlin"',
    'tag.site ~ "b*"',  # case-sensitive
    'tag.env ~ "a%b"',  # % is literal, not LIKE's wildcard
    'tag.env ~ "a_b"',  # _ is literal too
    'tag.env ~ "a?b"',
    'tag.0 ~ "[x]"',  # [ is literal, not SQLite's character class (which would match "x")
    'attr.0.0 ~ "back\\\\*"',
    "attr.n > 2",  # "3" (a string) is not a number
    'attr.n == "3"',
    "attr.n != 3",
    'attr.x-y < "2"',
    "attr.x-y < 10",
    "attr.os_version >= 2",
    'attr.os_version in ["2.0", 2]',
    "exists(attr.0.0)",  # "0" is an object key, not an array index
    "exists(attr.0)",
    "exists(attr.software)",  # JSON null counts as missing
    "not exists(attr.software.demo)",
    "attr.demo == true",  # the string "true" is not true
    "attr.demo != true",
    "attr.demo == false",
    "attr.big == 9007199254740992",  # 2**53 + 1 and 2**53 are the same double
    "attr.big > 9007199254740992",
    'group ~ "B%"',
    'group == "canary" or group ~ "b_*"',
    'group != "canary"',
    'group not in ["canary", "b_x"]',
    'status in ["pending", "rejected"] and not online',
    'not (tag.missing == "x") and tag.missing != "x" and tag.missing not in ["x"]',
    "attr.missing.deeper < 1 or not attr.missing.deeper >= 1",
]


def _run_all(runner: asyncio.Runner, engine: AsyncEngine) -> None:
    runner.run(_create_schema(engine))
    runner.run(_check(engine, FIXED_FLEET, [parse(text) for text in FIXED_SELECTORS]))
    _run_property(runner, engine)


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


def test_push_down_matches_evaluate_on_sqlite(tmp_path: Path) -> None:
    with asyncio.Runner() as runner:
        engine = create_engine(f"sqlite:///{tmp_path / 'selectors.db'}")
        try:
            _run_all(runner, engine)
        finally:
            runner.run(engine.dispose())


async def _postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used, or None when it answers."""
    try:
        admin = await asyncpg.connect(POSTGRES_URL, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {POSTGRES_URL} does not answer ({exc!r})"
    await admin.close()
    return None


async def _as_admin(sql: str) -> None:
    admin = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


async def _create_database(name: str) -> None:
    try:
        # ICU en-US orders "a" < "B"; the push-down must not care (see the module docstring).
        await _as_admin(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' "
            "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    except asyncpg.PostgresError:  # no ICU, or an older server: the default collation then
        await _as_admin(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")


@pytest.mark.postgres
def test_push_down_matches_evaluate_on_postgresql() -> None:
    name = f"corral_sel_{secrets.token_hex(6)}"  # unique: other test runs may share the server
    with asyncio.Runner() as runner:
        problem = runner.run(_postgres_problem())
        if problem is not None:
            if os.environ.get("CI"):
                pytest.fail(f"{problem}; CI is set, so PostgreSQL is required")
            pytest.skip(f"{problem}; start it or point CORRAL_TEST_POSTGRES_URL at one")
        runner.run(_create_database(name))
        try:
            engine = create_engine(make_url(POSTGRES_URL).set(database=name).render_as_string(False))
            try:
                _run_all(runner, engine)
            finally:
                runner.run(engine.dispose())
        finally:
            runner.run(_as_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def test_statement_cache_keeps_literals_apart(tmp_path: Path) -> None:
    """Same selector shape, different literals: the per-dialect construct must not share SQL."""

    async def scenario(engine: AsyncEngine) -> list[set[str]]:
        await _create_schema(engine)
        async with engine.begin() as conn:
            await _insert_fleet(conn, FIXED_FLEET)
            results = []
            for text in ['tag.site ~ "b*"', 'tag.site ~ "B*"', "attr.n > 2", "attr.n > 3", "attr.n < 3"]:
                results.append(set((await conn.scalars(select(Device.id).where(to_sql(parse(text))))).all()))
            await conn.execute(delete(Device))
            return results

    with asyncio.Runner() as runner:
        engine = create_engine(f"sqlite:///{tmp_path / 'cache.db'}")
        try:
            results = runner.run(scenario(engine))
        finally:
            runner.run(engine.dispose())
    assert results == [{"dev-a"}, {"dev-B"}, {"dev-a", "dev-c"}, set(), {"dev-c"}]
