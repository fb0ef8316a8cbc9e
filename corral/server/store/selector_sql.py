"""Selector push-down: compile a selector AST to a SQL condition over the ``devices`` table.

``to_sql(parse(text))`` is a boolean column expression for ``select(Device.id).where(...)`` (or a
count, an update ...). It selects exactly the devices for which ``corral.selectors.evaluate``
is true, on SQLite and on PostgreSQL; ``tests/integration/test_selector_sql.py`` checks that
with random devices and random selectors on both engines.

How each field becomes SQL:

* ``id``, ``status``, ``online``: the ``devices`` columns.
* ``tag.K``: ``devices.id IN (SELECT device_id FROM device_tags WHERE key = K AND <value test>)``,
  so the ``(key, value, device_id)`` index does the work.
* ``group``: ``devices.id IN (SELECT device_id FROM group_members ...)``.
* ``attr.P``: JSON extraction from ``devices.inventory``. The JSON type of the value is checked
  first (``json_type`` on SQLite, ``json_typeof`` on PostgreSQL) inside a ``CASE``, which is the
  one construct PostgreSQL promises not to evaluate out of order, so ``attr.x < 3`` on a string
  value is false instead of a cast error. Paths are walked one key at a time with ``->`` on
  PostgreSQL (``#>`` would treat ``0`` as an array index; the evaluator treats it as a key).

Three details keep SQL's answers equal to Python's:

* Every leaf is two-valued (never NULL): a missing JSON value goes to the ``ELSE false`` of the
  guard, so ``not (...)`` flips it like Python does, where NULL would stay NULL.
* String order is code-point order: PostgreSQL compares with ``COLLATE "C"`` (byte order of
  UTF-8, which is code-point order) whatever the database's collation; SQLite's default BINARY
  collation already is.
* Globs are case-sensitive: ``GLOB`` on SQLite (whose ``LIKE`` ignores ASCII case), ``LIKE``
  with ``%``, ``_`` and ``\\`` escaped on PostgreSQL.

The SQL differs per engine, but ``to_sql`` does not take a dialect: the few leaves that differ
are built for both engines and wrapped in ``_PerDialect``, which the compiler renders for the
engine the statement runs on. Only SQLite and PostgreSQL are supported.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, assert_never

from sqlalchemy import (
    JSON,
    Boolean,
    Double,
    SQLColumnExpression,
    String,
    and_,
    case,
    cast,
    collate,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from corral.selectors import And, Bool, Compare, Exists, Field, In, Match, Node, Not, Num, Or, Str, Value
from corral.server.store.models import Device, DeviceTag, GroupMember

__all__ = ["to_sql"]

_DialectName = Literal["sqlite", "postgresql"]
_StringTest = Callable[[SQLColumnExpression[str]], ColumnElement[bool]]

_ORDERING: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "==": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def to_sql(node: Node) -> ColumnElement[bool]:
    """A condition on ``devices`` that holds exactly when ``evaluate(node, device)`` would."""
    if isinstance(node, And):
        return and_(*(to_sql(operand) for operand in node.operands))
    if isinstance(node, Or):
        return or_(*(to_sql(operand) for operand in node.operands))
    if isinstance(node, Not):
        return not_(to_sql(node.operand))
    if isinstance(node, Compare):
        if node.op == "!=":
            return not_(_compare(node.field, "==", node.value))
        return _compare(node.field, node.op, node.value)
    if isinstance(node, Match):
        return _match(node.field, node.pattern)
    if isinstance(node, In):
        found = _in(node.field, node.values)
        return not_(found) if node.negated else found
    if isinstance(node, Exists):
        return _exists(node.field)
    assert_never(node)


# --------------------------------------------------------------------------------------------
# Leaves
# --------------------------------------------------------------------------------------------


def _compare(fld: Field, op: str, value: Value) -> ColumnElement[bool]:
    if fld.kind == "online":
        if op == "==" and isinstance(value, Bool):
            return Device.online.is_(true() if value.value else false())
        return false()  # online is a bool: no string, number or ordering test can hold
    if fld.kind == "attr":
        return _per_dialect(lambda d: _json_compare(d, _JsonValue(d, fld.path), op, value))
    if not isinstance(value, Str):
        return false()  # every other field holds strings
    if op == "==":
        # Plain equality needs no collation and keeps the (key, value) index usable.
        return _on_strings(fld, lambda column: column == value.value)
    return _on_strings(fld, lambda column: _per_dialect(lambda d: _order(d, column, op, value.value)))


def _match(fld: Field, pattern: str) -> ColumnElement[bool]:
    if fld.kind == "online":
        return false()
    if fld.kind == "attr":
        return _per_dialect(lambda d: _json_match(d, _JsonValue(d, fld.path), pattern))
    return _on_strings(fld, lambda column: _per_dialect(lambda d: _glob(d, column, pattern)))


def _in(fld: Field, values: tuple[Value, ...]) -> ColumnElement[bool]:
    if not values:
        return false()
    if fld.kind == "online":
        return or_(*(_compare(fld, "==", value) for value in values))
    if fld.kind == "attr":
        return _per_dialect(lambda d: _json_in(d, _JsonValue(d, fld.path), values))
    strings = [value.value for value in values if isinstance(value, Str)]
    if not strings:
        return false()
    return _on_strings(fld, lambda column: column.in_(strings))


def _exists(fld: Field) -> ColumnElement[bool]:
    if fld.kind == "tag":
        return _tag_exists(fld.path[0], None)
    if fld.kind == "attr":
        return _per_dialect(lambda d: _JsonValue(d, fld.path).is_present())
    if fld.kind == "group":
        return _group_exists(None)
    return true()  # id, status and online always have a value


def _on_strings(fld: Field, test: _StringTest) -> ColumnElement[bool]:
    """Apply ``test`` to a string-valued field: a column, or any row of a tag/group subquery."""
    if fld.kind == "id":
        return test(Device.id)
    if fld.kind == "status":
        return test(Device.status)
    if fld.kind == "tag":
        return _tag_exists(fld.path[0], test)
    if fld.kind == "group":
        return _group_exists(test)
    raise AssertionError(f"{fld.name} is not a string field")


def _tag_exists(key: str, test: _StringTest | None) -> ColumnElement[bool]:
    # An uncorrelated ``id IN (SELECT device_id ...)`` rather than a correlated EXISTS: the
    # planner can then drive the query from the (key, value, device_id) index and look devices
    # up by id, instead of scanning every device and probing per row. For a sparse selector over
    # 100k devices that is ~30x faster on SQLite; the result is the same (device_id is NOT NULL).
    conditions = [DeviceTag.key == key]
    if test is not None:
        conditions.append(test(DeviceTag.value))
    return Device.id.in_(select(DeviceTag.device_id).where(*conditions))


def _group_exists(test: _StringTest | None) -> ColumnElement[bool]:
    members = select(GroupMember.device_id)
    if test is not None:
        members = members.where(test(GroupMember.group_name))
    return Device.id.in_(members)


# --------------------------------------------------------------------------------------------
# What differs per engine: string order, globs, JSON access.
# --------------------------------------------------------------------------------------------


def _order(
    dialect: _DialectName, column: SQLColumnExpression[str], op: str, value: str
) -> ColumnElement[bool]:
    """``column OP value`` in code-point order."""
    if dialect == "postgresql":
        column = collate(column, "C")
    result: ColumnElement[bool] = _ORDERING[op](column, value)
    return result


def _glob(dialect: _DialectName, column: SQLColumnExpression[str], pattern: str) -> ColumnElement[bool]:
    result: ColumnElement[bool]
    if dialect == "sqlite":
        result = column.op("GLOB", is_comparison=True)(glob_to_sqlite(pattern))
    else:
        result = column.like(glob_to_like(pattern), escape="\\")
    return result


def glob_to_sqlite(pattern: str) -> str:
    """A selector glob as a SQLite GLOB pattern: only ``[`` is special there beyond ``*``/``?``."""
    return pattern.replace("[", "[[]")


def glob_to_like(pattern: str) -> str:
    """A selector glob as a LIKE pattern with ``\\`` as the escape character."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class _JsonValue:
    """The JSON value at ``path`` in ``devices.inventory``, read the way one engine can.

    The ``is_*`` checks are NULL when the path is missing; use them as ``_guarded`` conditions.
    ``text`` and ``number`` are only meaningful once the matching ``is_*`` check holds.
    """

    dialect: _DialectName
    path: tuple[str, ...]

    def _sqlite_path(self) -> ColumnElement[str]:
        # Keys are quoted, so '-' or an all-digit key ("0") is an object key, never an index.
        return literal("$" + "".join(f'."{part}"' for part in self.path), String)

    def _postgresql_walk(self, last: Literal["->", "->>"]) -> ColumnElement[Any]:
        # One "->" per key (not "#>"): on an array a text key gives NULL, as in the evaluator.
        element: ColumnElement[Any] = Device.__table__.c.inventory
        for i, part in enumerate(self.path):
            op = last if i == len(self.path) - 1 else "->"
            element = element.op(op, return_type=String if op == "->>" else JSON)(literal(part, String))
        return element

    def _type(self) -> ColumnElement[str]:
        """The engine's name for the JSON type at the path; NULL when missing."""
        if self.dialect == "sqlite":
            return func.json_type(Device.inventory, self._sqlite_path())
        return func.json_typeof(self._postgresql_walk("->"))

    @property
    def text(self) -> ColumnElement[str]:
        """A JSON string as SQL text (the unquoted value)."""
        if self.dialect == "sqlite":
            return func.json_extract(Device.inventory, self._sqlite_path(), type_=String)
        return self._postgresql_walk("->>")

    @property
    def number(self) -> ColumnElement[float]:
        # Both engines then compare 64-bit floats, as the evaluator does.
        return cast(self.text, Double)

    def is_string(self) -> ColumnElement[bool]:
        return self._type() == ("text" if self.dialect == "sqlite" else "string")

    def is_number(self) -> ColumnElement[bool]:
        if self.dialect == "sqlite":
            return self._type().in_(["integer", "real"])
        return self._type() == "number"

    def is_bool(self, value: bool) -> ColumnElement[bool]:
        word = "true" if value else "false"
        if self.dialect == "sqlite":
            return self._type() == word
        return and_(self._type() == "boolean", self.text == word)

    def is_present(self) -> ColumnElement[bool]:
        """Present and not JSON null; two-valued."""
        return func.coalesce(self._type(), "null") != "null"


def _guarded(check: ColumnElement[bool], test: ColumnElement[bool]) -> ColumnElement[bool]:
    """``test`` where ``check`` holds, else false: never NULL, and ``test`` runs only after ``check``."""
    result: ColumnElement[bool] = case((check, test), else_=false())
    return result


def _json_compare(dialect: _DialectName, value: _JsonValue, op: str, literal_: Value) -> ColumnElement[bool]:
    if isinstance(literal_, Str):
        if op == "==":
            return _guarded(value.is_string(), value.text == literal_.value)
        return _guarded(value.is_string(), _order(dialect, value.text, op, literal_.value))
    if isinstance(literal_, Num):
        number = literal(float(literal_.value), Double)
        return _guarded(value.is_number(), _ORDERING[op](value.number, number))
    if isinstance(literal_, Bool):
        return _guarded(value.is_bool(literal_.value), true()) if op == "==" else false()
    assert_never(literal_)


def _json_match(dialect: _DialectName, value: _JsonValue, pattern: str) -> ColumnElement[bool]:
    return _guarded(value.is_string(), _glob(dialect, value.text, pattern))


def _json_in(dialect: _DialectName, value: _JsonValue, values: tuple[Value, ...]) -> ColumnElement[bool]:
    strings = [v.value for v in values if isinstance(v, Str)]
    numbers = [float(v.value) for v in values if isinstance(v, Num)]
    tests = []
    if strings:
        tests.append(_guarded(value.is_string(), value.text.in_(strings)))
    if numbers:
        tests.append(_guarded(value.is_number(), value.number.in_(numbers)))
    tests.extend(_json_compare(dialect, value, "==", v) for v in values if isinstance(v, Bool))
    return or_(*tests) if tests else false()


# --------------------------------------------------------------------------------------------
# Rendering one of two expressions, picked by the dialect at compile time.
# --------------------------------------------------------------------------------------------


class _PerDialect(FunctionElement[bool]):
    """Renders its first argument on SQLite and its second on PostgreSQL.

    A ``FunctionElement`` because its whole state is its argument list, which SQLAlchemy's
    statement cache already keys on (``inherit_cache`` is then correct, not a guess).
    """

    type = Boolean()
    name = "corral_per_dialect"
    inherit_cache = True


def _per_dialect(build: Callable[[_DialectName], ColumnElement[bool]]) -> ColumnElement[bool]:
    return _PerDialect(build("sqlite"), build("postgresql"))


@compiles(_PerDialect)
def _compile_per_dialect(element: _PerDialect, compiler: SQLCompiler, **kw: Any) -> str:
    sqlite_expr, postgresql_expr = element.clauses.clauses
    name = compiler.dialect.name
    if name == "postgresql":
        chosen = postgresql_expr
    elif name in ("sqlite", "default"):  # "default" is str(statement), for reading only
        chosen = sqlite_expr
    else:
        raise CompileError(f"selectors push down to SQLite and PostgreSQL only, not {name}")
    return f"({compiler.process(chosen, **kw)})"
