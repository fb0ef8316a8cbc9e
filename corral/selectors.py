"""The selector language: one small expression language that picks devices (DESIGN §7).

Groups, rollout targets, device listing, alert scopes and on-device rules all select devices with
it, for example::

    tag.site == "berlin" and attr.os_version < "2.0" and online

The workflow is ``parse`` (text → an immutable AST, or a ``SelectorError`` that names the exact
1-based column) and then either ``evaluate`` (AST + one ``DeviceView`` → bool, pure Python) or
``corral.server.store.selector_sql.to_sql`` (AST → a SQL ``WHERE`` clause). Both give the same
answer for every device; an integration test holds them to it on SQLite and PostgreSQL.
``unparse`` renders the canonical text of an AST (``parse(unparse(node)) == node``) and
``fields_used`` lists the fields an expression reads (so a caller knows, e.g., whether it
depends on presence).

Fields
    ``id``            device id (string)
    ``status``        admission status: ``pending``, ``accepted``, ``rejected``, ``decommissioned``
    ``online``        presence (true/false); the bare word ``online`` means ``online == true``
    ``tag.KEY``       operator tag (string value)
    ``attr.PATH``     device inventory, a JSON object; ``PATH`` is ``KEY(.KEY)*`` into nested objects
    ``group``         static group membership: ``group == "g"``, ``group in [..]``, ``group ~ "g*"``

Semantics (one rule per operator, so the SQL push-down can match them exactly)
    * ``==, <, <=, >, >=`` with a string literal compare strings by code point; with a number
      literal compare numerically as 64-bit floats (a value that is not a JSON number — a string
      ``"3"`` included — gives false); ``true``/``false`` only go with ``==`` and ``!=``.
    * A missing tag or attr (or one whose JSON type does not fit) makes ``==, <, <=, >, >=, ~, in``
      false. ``a != b`` is exactly ``not (a == b)`` and ``x not in [..]`` is ``not (x in [..])``,
      so a missing field makes them true.
    * ``x ~ "pattern"`` is a case-sensitive glob over the whole string value: ``*`` matches any
      run of characters (newlines too), ``?`` exactly one; every other character is literal.
    * ``exists(tag.K)`` / ``exists(attr.P)``: the tag is set / the attr is present and not JSON null.
    * ``group`` tests membership: ``group == "g"`` is "member of g", ``group ~ "p*"`` is "member of
      some group matching p*", ``group != "g"`` is "not a member of g".

Type rules are checked while parsing, so a selector that could never match for a type reason
(``tag.site > true``, ``online < 3``, ``status == "acepted"``) is an error, not an empty result.
Tag values are strings, so ``tag.floor == 3`` is an error too (write ``tag.floor == "3"``).

The parser is a hand-written tokenizer plus recursive descent; there is no ``eval``. Input is
bounded (``MAX_LENGTH`` characters, ``MAX_DEPTH`` levels of parentheses/``not``) so a hostile
selector costs at most linear parse time and bounded recursion.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, assert_never

from corral.core.glob import glob_match
from corral.errors import SelectorError

__all__ = [
    "ADMISSION_STATUSES",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "And",
    "Bool",
    "Compare",
    "CompareOp",
    "DeviceView",
    "Exists",
    "Field",
    "FieldKind",
    "In",
    "Match",
    "Node",
    "Not",
    "Num",
    "Or",
    "Str",
    "Value",
    "evaluate",
    "fields_used",
    "glob_match",
    "parse",
    "unparse",
]

MAX_LENGTH: Final = 4096
MAX_DEPTH: Final = 64
ADMISSION_STATUSES: Final = frozenset({"pending", "accepted", "rejected", "decommissioned"})

# One key of a tag or one step of an attr path. Kept to characters that need no quoting in a
# JSON path or in the text form, so keys travel through SQL and URLs untouched.
_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")

# --------------------------------------------------------------------------------------------
# AST: frozen dataclasses, compared by value (tests and caches rely on that).
# --------------------------------------------------------------------------------------------

FieldKind: TypeAlias = Literal["id", "status", "online", "group", "tag", "attr"]
CompareOp: TypeAlias = Literal["==", "!=", "<", "<=", ">", ">="]

# Fields without a key; a mapping so the text narrows to the Literal type.
_SIMPLE_FIELDS: Final[Mapping[str, FieldKind]] = {
    "id": "id",
    "status": "status",
    "online": "online",
    "group": "group",
}
_COMPARE_OPS: Final[Mapping[str, CompareOp]] = {op: op for op in ("==", "!=", "<", "<=", ">", ">=")}


@dataclass(frozen=True, slots=True)
class Field:
    """A field reference. ``path`` is ``(KEY,)`` for a tag, the key path for an attr, else ``()``."""

    kind: FieldKind
    path: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Guard hand-built ASTs too: keys end up in SQL JSON paths and in unparsed text.
        if self.kind in _SIMPLE_FIELDS:
            ok = not self.path
        elif self.kind == "tag":
            ok = len(self.path) == 1
        else:
            ok = len(self.path) >= 1
        if not ok or not all(_KEY_RE.fullmatch(part) for part in self.path):
            raise ValueError(f"invalid selector field {self.kind!r} with path {self.path!r}")

    @property
    def name(self) -> str:
        """The field as written in a selector, e.g. ``tag.site`` or ``attr.software.demo``."""
        return ".".join((self.kind, *self.path))


@dataclass(frozen=True, slots=True)
class Str:
    """A string literal."""

    value: str


@dataclass(frozen=True, slots=True)
class Num:
    """A number literal; ``int`` or ``float`` only so ``unparse`` keeps ``3`` and ``3.0`` apart."""

    value: int | float


@dataclass(frozen=True, slots=True)
class Bool:
    """``true`` or ``false``."""

    value: bool


Value: TypeAlias = Str | Num | Bool


@dataclass(frozen=True, slots=True)
class Compare:
    """``field OP value``; a bare ``online`` parses to ``Compare(online, "==", Bool(True))``."""

    field: Field
    op: CompareOp
    value: Value


@dataclass(frozen=True, slots=True)
class Match:
    """``field ~ "glob"``."""

    field: Field
    pattern: str


@dataclass(frozen=True, slots=True)
class In:
    """``field in [..]`` or, with ``negated``, ``field not in [..]``."""

    field: Field
    values: tuple[Value, ...]
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Exists:
    """``exists(tag.K)`` or ``exists(attr.P)``."""

    field: Field


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    """Two or more operands; the parser flattens nested ``and`` so the AST is canonical."""

    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """Two or more operands; the parser flattens nested ``or`` so the AST is canonical."""

    operands: tuple[Node, ...]


Node: TypeAlias = Compare | Match | In | Exists | Not | And | Or


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

TokenKind: TypeAlias = Literal["name", "string", "number", "op", "(", ")", "[", "]", ",", "end"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: TokenKind
    text: str  # the source text (for "string": the decoded value)
    column: int  # 1-based column of the first character
    number: int | float = 0


# A name is a head word plus dotted parts. Parts may be empty here so that ``tag.`` or
# ``attr.a..b`` reach the parser, which reports the exact column of the missing key.
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]*)*")
_NUMBER_RE: Final = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_SPACE: Final = frozenset(" \t\r\n")
_DIGITS: Final = frozenset("0123456789")  # str.isdigit() would accept non-ASCII digits
_OPERATORS: Final = ("==", "!=", "<=", ">=", "<", ">", "~")  # two-character ones first
_PUNCTUATION: Final[Mapping[str, TokenKind]] = {"(": "(", ")": ")", "[": "[", "]": "]", ",": ","}
_ESCAPES: Final = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
# Hints for characters people bring from other languages.
_CHAR_HINTS: Final = {
    "=": " (use == to compare)",
    "!": " (use 'not' or !=)",
    "&": " (use 'and')",
    "|": " (use 'or')",
}


def _tokenize(expr: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        col = i + 1
        if ch in _SPACE:
            i += 1
        elif ch in _PUNCTUATION:
            tokens.append(_Token(_PUNCTUATION[ch], ch, col))
            i += 1
        elif ch == '"' or ch == "'":
            value, i = _read_string(expr, i)
            tokens.append(_Token("string", value, col))
        elif ch in _DIGITS or (ch == "-" and expr[i + 1 : i + 2] in _DIGITS):
            tokens.append(_read_number(expr, i))
            i += len(tokens[-1].text)
        elif (m := _NAME_RE.match(expr, i)) is not None:
            tokens.append(_Token("name", m.group(), col))
            i = m.end()
        else:
            op = next((o for o in _OPERATORS if expr.startswith(o, i)), None)
            if op is None:
                raise SelectorError(f"unexpected character {ch!r}{_CHAR_HINTS.get(ch, '')}", col, expr)
            tokens.append(_Token("op", op, col))
            i += len(op)
    tokens.append(_Token("end", "", n + 1))
    return tokens


def _read_string(expr: str, start: int) -> tuple[str, int]:
    """Decode the string literal opening at ``start``; return it and the index after it."""
    quote = expr[start]
    out: list[str] = []
    i, n = start + 1, len(expr)
    while i < n:
        ch = expr[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\":
            esc = expr[i + 1 : i + 2]
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
                i += 2
                continue
            if esc == "u":
                digits = expr[i + 2 : i + 6]
                if len(digits) == 4 and all(c in "0123456789abcdefABCDEF" for c in digits):
                    code = int(digits, 16)
                    # NUL and lone surrogates cannot be stored (PostgreSQL text, UTF-8), so a
                    # literal holding one could never match; refuse it up front.
                    if code != 0 and not 0xD800 <= code <= 0xDFFF:
                        out.append(chr(code))
                        i += 6
                        continue
                message = "invalid \\u escape (want 4 hex digits, not NUL or a surrogate)"
                raise SelectorError(message, i + 1, expr)
            if not esc:
                break
            raise SelectorError(f"unknown escape \\{esc} in string", i + 1, expr)
        if ch == "\0" or "\ud800" <= ch <= "\udfff":
            raise SelectorError(f"character {ch!r} is not allowed in a string", i + 1, expr)
        out.append(ch)
        i += 1
    raise SelectorError("unterminated string", start + 1, expr)


def _read_number(expr: str, start: int) -> _Token:
    m = _NUMBER_RE.match(expr, start)
    assert m is not None  # the caller saw a digit (or '-' and a digit)
    end = m.end()
    if end < len(expr) and (expr[end].isalnum() or expr[end] in "_."):
        raise SelectorError(f"unexpected character {expr[end]!r} in number", end + 1, expr)
    text = m.group()
    value: int | float = float(text) if (m.group(1) or m.group(2)) else int(text)
    try:
        finite = math.isfinite(float(value))
    except OverflowError:  # an int literal too large for a float
        finite = False
    if not finite:
        raise SelectorError("number out of range", start + 1, expr)
    return _Token("number", text, start + 1, value)


# --------------------------------------------------------------------------------------------
# Parser: recursive descent, one method per precedence level (or < and < not < comparison).
# --------------------------------------------------------------------------------------------

_KEYWORDS: Final = frozenset({"and", "or", "not", "in", "true", "false", "exists"})
_FIELD_HINTS: Final = {"tags": "tag", "attrs": "attr", "attribute": "attr", "groups": "group"}
_OP_ORDER: Final = ("==", "!=", "<", "<=", ">", ">=", "~", "in")
_ALL_OPS: Final = frozenset(_OP_ORDER)
# Which operators each field supports ("in" stands for both "in" and "not in").
_OPS_BY_KIND: Final[Mapping[FieldKind, frozenset[str]]] = {
    "id": _ALL_OPS,
    "tag": _ALL_OPS,
    "attr": _ALL_OPS,
    "status": frozenset({"==", "!=", "in"}),
    "group": frozenset({"==", "!=", "~", "in"}),
    "online": frozenset({"==", "!="}),
}


def parse(expr: str) -> Node:
    """Parse a selector. Raises ``SelectorError`` with the 1-based column of the offending spot."""
    if len(expr) > MAX_LENGTH:
        raise SelectorError(f"selector is longer than {MAX_LENGTH} characters", MAX_LENGTH + 1, expr)
    if not expr.strip():
        raise SelectorError("empty selector", 1, expr)
    return _Parser(expr, _tokenize(expr)).parse()


class _Parser:
    def __init__(self, expr: str, tokens: list[_Token]) -> None:
        self.expr = expr
        self.tokens = tokens
        self.pos = 0

    # -- helpers ------------------------------------------------------------------------------

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        tok = self.tokens[self.pos]
        if tok.kind != "end":
            self.pos += 1
        return tok

    def at_keyword(self, word: str, ahead: int = 0) -> bool:
        tok = self.peek(ahead)
        return tok.kind == "name" and tok.text == word

    def error(self, message: str, column: int) -> SelectorError:
        return SelectorError(message, column, self.expr)

    def unexpected(self, tok: _Token, wanted: str) -> SelectorError:
        if tok.kind == "end":
            return self.error(f"unexpected end of selector, expected {wanted}", tok.column)
        shown = repr(tok.text) if tok.kind == "string" else tok.text
        return self.error(f"unexpected {shown}, expected {wanted}", tok.column)

    def expect_close(self, kind: Literal[")", "]"], opener: _Token) -> None:
        tok = self.peek()
        if tok.kind != kind:
            what = f"'{kind}' to close '{opener.text}' at column {opener.column}"
            raise self.unexpected(tok, what)
        self.take()

    def nest(self, tok: _Token, depth: int) -> int:
        if depth >= MAX_DEPTH:
            raise self.error(f"nesting deeper than {MAX_DEPTH} levels", tok.column)
        return depth + 1

    # -- grammar ------------------------------------------------------------------------------

    def parse(self) -> Node:
        node = self.parse_or(0)
        tok = self.peek()
        if tok.kind != "end":
            raise self.unexpected(tok, "'and', 'or' or the end of the selector")
        return node

    def parse_or(self, depth: int) -> Node:
        operands = [self.parse_and(depth)]
        while self.at_keyword("or"):
            self.take()
            operands.append(self.parse_and(depth))
        return _flatten(Or, operands)

    def parse_and(self, depth: int) -> Node:
        operands = [self.parse_not(depth)]
        while self.at_keyword("and"):
            self.take()
            operands.append(self.parse_not(depth))
        return _flatten(And, operands)

    def parse_not(self, depth: int) -> Node:
        if self.at_keyword("not"):
            tok = self.take()
            return Not(self.parse_not(self.nest(tok, depth)))
        return self.parse_primary(depth)

    def parse_primary(self, depth: int) -> Node:
        tok = self.peek()
        if tok.kind == "(":
            self.take()
            inner = self.parse_or(self.nest(tok, depth))
            self.expect_close(")", tok)
            return inner
        if tok.kind == "name" and tok.text == "exists":
            return self.parse_exists()
        if tok.kind == "name" and tok.text not in _KEYWORDS:
            return self.parse_predicate()
        raise self.unexpected(tok, "a field, 'not', 'exists(' or '('")

    def parse_exists(self) -> Node:
        self.take()
        opener = self.peek()
        if opener.kind != "(":
            raise self.unexpected(opener, "'(' after 'exists'")
        self.take()
        tok = self.peek()
        if tok.kind != "name" or tok.text in _KEYWORDS:
            raise self.unexpected(tok, "tag.KEY or attr.PATH")
        fld = self.parse_field(self.take())
        if fld.kind not in ("tag", "attr"):
            raise self.error(f"exists() takes tag.KEY or attr.PATH, not {fld.name}", tok.column)
        self.expect_close(")", opener)
        return Exists(fld)

    def parse_predicate(self) -> Node:
        field_tok = self.take()
        fld = self.parse_field(field_tok)
        tok = self.peek()
        if tok.kind == "op":
            self.take()
            lit_tok = self.peek()
            value = self.parse_literal()
            # The operand's type first: "online < 3" is about the 3, "online < true" about the <.
            if tok.text == "~":
                if not isinstance(value, Str):
                    raise self.error('~ needs a quoted glob pattern, e.g. "berlin-*"', lit_tok.column)
                self.check_operator(fld, tok, "~")
                return Match(fld, value.value)
            self.check_literal(fld, tok.text, value, lit_tok)
            self.check_operator(fld, tok, tok.text)
            return Compare(fld, _COMPARE_OPS[tok.text], value)
        if self.at_keyword("in") or (self.at_keyword("not") and self.at_keyword("in", 1)):
            negated = self.take().text == "not"
            in_tok = self.take() if negated else tok
            self.check_operator(fld, in_tok, "in")
            return In(fld, self.parse_list(fld), negated)
        if self.at_keyword("not"):
            raise self.unexpected(self.peek(1), f"'in' after 'not' (as in: {fld.name} not in [...])")
        if fld.kind == "online":
            return Compare(fld, "==", Bool(True))
        hint = f"; use exists({fld.name}) to test presence" if fld.kind in ("tag", "attr") else ""
        raise self.unexpected(tok, f"an operator after {fld.name} (==, !=, <, <=, >, >=, ~, in){hint}")

    def parse_field(self, tok: _Token) -> Field:
        parts = tok.text.split(".")
        head = parts[0]
        # Column of each dot, for pointing at a bad key exactly.
        dots = [tok.column + m.start() for m in re.finditer(r"\.", tok.text)]
        for part, dot in zip(parts[1:], dots, strict=True):
            if not part:
                raise self.error(f"expected a key after '.' in {tok.text}", dot + 1)
        if head in _SIMPLE_FIELDS:
            if len(parts) > 1:
                raise self.error(f"{head} has no sub-fields", dots[0])
            return Field(_SIMPLE_FIELDS[head])
        if head == "tag":
            if len(parts) == 1:
                raise self.error("tag needs a key, e.g. tag.site", tok.column)
            if len(parts) > 2:
                raise self.error("tag keys cannot contain '.'", dots[1])
            return Field("tag", (parts[1],))
        if head == "attr":
            if len(parts) == 1:
                raise self.error("attr needs a path, e.g. attr.os_version", tok.column)
            return Field("attr", tuple(parts[1:]))
        hint = ""
        if head.lower() in _KEYWORDS:
            hint = f" (keywords are lowercase: {head.lower()})"
        elif head in _FIELD_HINTS:
            hint = f" (did you mean {_FIELD_HINTS[head]}?)"
        raise self.error(
            f"unknown field {tok.text!r}{hint}; fields are id, status, online, group, tag.KEY, attr.PATH",
            tok.column,
        )

    def parse_literal(self) -> Value:
        tok = self.peek()
        value: Value
        if tok.kind == "string":
            value = Str(tok.text)
        elif tok.kind == "number":
            value = Num(tok.number)
        elif tok.kind == "name" and tok.text in ("true", "false"):
            value = Bool(tok.text == "true")
        else:
            raise self.unexpected(tok, "a value (a quoted string, a number, true or false)")
        self.take()
        return value

    def parse_list(self, fld: Field) -> tuple[Value, ...]:
        opener = self.peek()
        if opener.kind != "[":
            raise self.unexpected(opener, "'[' to start a list")
        self.take()
        values: list[Value] = []
        if self.peek().kind != "]":
            while True:
                lit_tok = self.peek()
                value = self.parse_literal()
                if isinstance(value, Bool):
                    raise self.error("true/false can only be compared with == or !=", lit_tok.column)
                self.check_literal(fld, "==", value, lit_tok)
                values.append(value)
                if self.peek().kind != ",":
                    break
                self.take()
        self.expect_close("]", opener)
        return tuple(values)

    # -- type rules ---------------------------------------------------------------------------

    def check_operator(self, fld: Field, tok: _Token, op: str) -> None:
        allowed = _OPS_BY_KIND[fld.kind]
        if op not in allowed:
            listed = ", ".join(o if o != "in" else "in, not in" for o in _OP_ORDER if o in allowed)
            raise self.error(f"{op} is not supported for {fld.name} (use {listed})", tok.column)

    def check_literal(self, fld: Field, op: str, value: Value, tok: _Token) -> None:
        """Refuse comparisons that could never be true because of the value's type."""
        if fld.kind == "online":
            if not isinstance(value, Bool):
                raise self.error("online is true or false: compare it with true or false", tok.column)
        elif fld.kind == "attr":
            if isinstance(value, Bool) and op not in ("==", "!="):
                raise self.error("true/false can only be compared with == or !=", tok.column)
        elif not isinstance(value, Str):
            example = f'{fld.name} {op} "{tok.text}"'
            raise self.error(f"{fld.name} is a string: quote the value, e.g. {example}", tok.column)
        elif fld.kind == "status" and value.value not in ADMISSION_STATUSES:
            known = ", ".join(sorted(ADMISSION_STATUSES))
            raise self.error(f"unknown status {value.value!r} (one of {known})", tok.column)


def _flatten(kind: type[And] | type[Or], operands: list[Node]) -> Node:
    """Build an n-ary And/Or, splicing in operands of the same kind (from parentheses)."""
    if len(operands) == 1:
        return operands[0]
    flat: list[Node] = []
    for operand in operands:
        if isinstance(operand, kind):
            flat.extend(operand.operands)
        else:
            flat.append(operand)
    return kind(tuple(flat))




# --------------------------------------------------------------------------------------------
# Evaluation (pure): the reference semantics that the SQL push-down must reproduce.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    """What a selector can see of one device."""

    id: str
    status: str
    online: bool
    tags: Mapping[str, str] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)  # the inventory, nested JSON
    groups: frozenset[str] = frozenset()


class _Missing:
    """The value of a tag or attr that is not there."""


_MISSING: Final = _Missing()

_ORDERING: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    "==": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def evaluate(node: Node, device: DeviceView) -> bool:
    """Whether ``device`` matches ``node``."""
    if isinstance(node, And):
        return all(evaluate(operand, device) for operand in node.operands)
    if isinstance(node, Or):
        return any(evaluate(operand, device) for operand in node.operands)
    if isinstance(node, Not):
        return not evaluate(node.operand, device)
    if isinstance(node, Compare):
        if node.op == "!=":
            return not _test(device, node.field, lambda v: _compare(v, "==", node.value))
        op = node.op
        return _test(device, node.field, lambda v: _compare(v, op, node.value))
    if isinstance(node, Match):
        return _test(device, node.field, lambda v: isinstance(v, str) and glob_match(node.pattern, v))
    if isinstance(node, In):
        found = _test(device, node.field, lambda v: any(_compare(v, "==", lit) for lit in node.values))
        return found != node.negated
    if isinstance(node, Exists):
        return any(v is not None for v in _values(device, node.field))
    assert_never(node)


def _test(device: DeviceView, fld: Field, predicate: Callable[[Any], bool]) -> bool:
    # ``group`` is the only multi-valued field: it holds when any membership satisfies it.
    return any(predicate(value) for value in _values(device, fld))


def _values(device: DeviceView, fld: Field) -> Iterator[Any]:
    """The field's values: one for most fields, none when missing, one per group for ``group``."""
    if fld.kind == "id":
        yield device.id
    elif fld.kind == "status":
        yield device.status
    elif fld.kind == "online":
        yield device.online
    elif fld.kind == "group":
        yield from device.groups
    elif fld.kind == "tag":
        value = device.tags.get(fld.path[0], _MISSING)
        if value is not _MISSING:
            yield value
    elif fld.kind == "attr":
        current: Any = device.attrs
        for part in fld.path:
            # Only objects have keys: a list, scalar or null on the way means "missing".
            if not isinstance(current, Mapping) or part not in current:
                return
            current = current[part]
        yield current
    else:
        assert_never(fld.kind)


def _compare(value: Any, op: str, literal: Value) -> bool:
    """``value OP literal`` for OP in ==, <, <=, >, >= (``!=`` is handled as ``not ==``)."""
    if isinstance(literal, Str):
        return isinstance(value, str) and _ORDERING[op](value, literal.value)
    if isinstance(literal, Num):
        number = _as_number(value)
        return number is not None and _ORDERING[op](number, float(literal.value))
    if isinstance(literal, Bool):
        return op == "==" and isinstance(value, bool) and value is literal.value
    assert_never(literal)


def _as_number(value: Any) -> float | None:
    # bool is an int subclass in Python, but JSON true is not a number.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond float range
        return math.inf if value > 0 else -math.inf


def fields_used(node: Node) -> set[str]:
    """Names of the fields ``node`` reads, as written (``online``, ``tag.site``, ``attr.a.b``)."""
    if isinstance(node, And | Or):
        return set().union(*(fields_used(operand) for operand in node.operands))
    if isinstance(node, Not):
        return fields_used(node.operand)
    if isinstance(node, Compare | Match | In | Exists):
        return {node.field.name}
    assert_never(node)


# --------------------------------------------------------------------------------------------
# Unparse: the canonical text form.
# --------------------------------------------------------------------------------------------

_OR_LEVEL, _AND_LEVEL, _NOT_LEVEL, _ATOM_LEVEL = range(4)


def unparse(node: Node) -> str:
    """Canonical text for ``node``: minimal parentheses, double quotes, single spaces.

    ``parse(unparse(node)) == node`` for any canonical AST (what ``parse`` returns) within the
    length and depth limits.
    """
    return _unparse(node, _OR_LEVEL)


def _unparse(node: Node, context: int) -> str:
    level: int
    if isinstance(node, Or):
        level, text = _OR_LEVEL, " or ".join(_unparse(o, _OR_LEVEL + 1) for o in node.operands)
    elif isinstance(node, And):
        level, text = _AND_LEVEL, " and ".join(_unparse(o, _AND_LEVEL + 1) for o in node.operands)
    elif isinstance(node, Not):
        level, text = _NOT_LEVEL, "not " + _unparse(node.operand, _NOT_LEVEL)
    else:
        level, text = _ATOM_LEVEL, _unparse_atom(node)
    return f"({text})" if level < context else text


def _unparse_atom(node: Compare | Match | In | Exists) -> str:
    name = node.field.name
    if isinstance(node, Compare):
        if node.field.kind == "online" and node.op == "==" and node.value == Bool(True):
            return name
        return f"{name} {node.op} {_unparse_value(node.value)}"
    if isinstance(node, Match):
        return f"{name} ~ {_quote(node.pattern)}"
    if isinstance(node, In):
        items = ", ".join(_unparse_value(v) for v in node.values)
        return f"{name} {'not in' if node.negated else 'in'} [{items}]"
    if isinstance(node, Exists):
        return f"exists({name})"
    assert_never(node)


def _unparse_value(value: Value) -> str:
    if isinstance(value, Str):
        return _quote(value.value)
    if isinstance(value, Bool):
        return "true" if value.value else "false"
    if isinstance(value, Num):
        if isinstance(value.value, float):
            if not math.isfinite(value.value):
                raise ValueError(f"a selector number must be finite, not {value.value!r}")
            return repr(value.value)  # shortest text that reads back to the same float
        return str(value.value)
    assert_never(value)


_QUOTE_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(text: str) -> str:
    out = []
    for ch in text:
        if ch in _QUOTE_ESCAPES:
            out.append(_QUOTE_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
