"""The metric expression language: on-device rules, server alerts and rollout health gates.

One small language answers "is this device (or group) in a bad state?" everywhere Corral
watches metrics, for example::

    cpu.percent > 90 and temp.cpu >= 80 for 5m           an on-device threshold rule
    avg(cpu.percent) - min(cpu.percent) > 40              a server alert over aggregates
    mem.used / mem.total * 100                            a value (a graph, a health-gate metric)

The workflow is ``parse_condition`` (text → a :class:`Condition`: a boolean AST plus its
``for`` hold time) or ``parse_value`` (text → a numeric AST), each raising an
``ExpressionError`` that names the exact 1-based column; then ``evaluate`` (AST + a lookup of
the current metric values → ``bool``/``float``, or ``None`` for unknown). ``unparse`` renders
the canonical text of an AST (``parse(unparse(node)) == node``); ``metrics_used`` and
``calls_used`` list what an expression reads, so a caller knows what to collect or query.

Grammar (keywords are lowercase)::

    condition := or_expr [ 'for' DURATION ]            DURATION: 30s, 5m, 1h30m, 250ms, 2d
    or_expr   := and_expr ('or' and_expr)*
    and_expr  := not_expr ('and' not_expr)*
    not_expr  := 'not' not_expr | cmp
    cmp       := sum [ ('>' | '>=' | '<' | '<=' | '==' | '!=') sum ]
    sum       := term (('+' | '-') term)*
    term      := unary (('*' | '/') unary)*
    unary     := '-' unary | atom
    atom      := NUMBER | METRIC | FUNC '(' METRIC ')' | '(' or_expr ')'

``METRIC`` is a metric name as the protocol defines it (``protocol.valid_metric_name``: dotted
segments of letters, digits and ``_``, such as ``cpu.percent`` or ``net.eth0.rx_bytes``; ``-``
is always minus). ``and``, ``or``, ``not`` and ``for`` are keywords, so a metric cannot be
called that. ``FUNC`` is one of the names the caller allows (``functions=``): on-device rules
allow none, server alerts allow the aggregates in :data:`AGGREGATES`. What a function *means*
is up to the caller's lookup; this module only checks that it is allowed. ``NUMBER`` is
``1``, ``2.5`` or ``1e-3``; a leading ``-`` is the unary minus, folded into the literal (``-3``
is ``Num(-3.0)``). Comparisons do not chain (``a < b < c`` is an error: write ``a < b and
b < c``).

Types are checked while parsing: a comparison is a condition (true/false), ``and``/``or``/
``not`` take conditions, arithmetic and comparisons take numbers, and ``parse_condition``
wants a condition as a whole (``parse_value`` a number). So ``cpu.percent and temp.cpu > 80``
is an error at column 1, not an expression that is never true.

Semantics
    * Numbers are IEEE doubles; ``==`` and ``!=`` are exact. ``a - b + c`` is ``(a - b) + c``.
    * A value the lookup does not know (``None``), a NaN or infinite value, a division by zero,
      and an overflow to infinity all make the result *unknown* (``None``), which propagates:
      arithmetic with an unknown is unknown, and so is a comparison with an unknown side.
    * ``and``/``or``/``not`` use three-valued (Kleene) logic: ``false and unknown`` is false,
      ``true or unknown`` is true, ``true and unknown``, ``false or unknown`` and ``not
      unknown`` are unknown. A caller decides what unknown means (a rule keeps its state).
    * ``for 5m`` is not evaluated here: it is the hold time (``Condition.for_s``) that the
      state machines in ``corral.core.rules`` and ``corral.core.alerting`` apply.

The parser is a hand-written tokenizer plus recursive descent; there is no ``eval``. Input is
bounded (``MAX_LENGTH`` characters, ``MAX_DEPTH`` levels of parentheses, ``not`` and unary
minus), and sums, products and ``and``/``or`` are n-ary nodes, so a hostile expression costs
linear parse time and bounded recursion in the parser, ``evaluate`` and ``unparse``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal, NamedTuple, TypeAlias, assert_never

from corral.core.durations import parse_duration
from corral.errors import ExpressionError, InvalidInput
from corral.protocol import METRIC_NAME_MAX, valid_metric_name

__all__ = [
    "AGGREGATES",
    "KEYWORDS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "AddOp",
    "And",
    "BoolExpr",
    "Call",
    "Compare",
    "CompareOp",
    "Condition",
    "Lookup",
    "Metric",
    "MulOp",
    "Neg",
    "Node",
    "Not",
    "Num",
    "NumExpr",
    "Or",
    "Product",
    "Ref",
    "Sum",
    "calls_used",
    "evaluate",
    "metrics_lookup",
    "metrics_used",
    "parse",
    "parse_condition",
    "parse_value",
    "unparse",
    "unparse_condition",
]

MAX_LENGTH: Final = 4096
MAX_DEPTH: Final = 64
KEYWORDS: Final = frozenset({"and", "or", "not", "for"})
#: The aggregates the server understands over a time window (alerts, health gates).
AGGREGATES: Final = frozenset({"avg", "min", "max", "sum", "count", "p95"})

_FUNC_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# --------------------------------------------------------------------------------------------
# AST: frozen dataclasses, compared by value (tests and caches rely on that).
# --------------------------------------------------------------------------------------------

CompareOp: TypeAlias = Literal[">", ">=", "<", "<=", "==", "!="]
AddOp: TypeAlias = Literal["+", "-"]
MulOp: TypeAlias = Literal["*", "/"]

_COMPARE_OPS: Final[Mapping[str, CompareOp]] = {op: op for op in (">", ">=", "<", "<=", "==", "!=")}
_ADD_OPS: Final[Mapping[str, AddOp]] = {"+": "+", "-": "-"}
_MUL_OPS: Final[Mapping[str, MulOp]] = {"*": "*", "/": "/"}


@dataclass(frozen=True, slots=True)
class Num:
    """A number literal, always a finite float (``Num(3)`` stores ``3.0``)."""

    value: float

    def __post_init__(self) -> None:
        value = float(self.value)
        if not math.isfinite(value):
            raise ValueError(f"an expression number must be finite, not {self.value!r}")
        object.__setattr__(self, "value", value)


@dataclass(frozen=True, slots=True)
class Metric:
    """The current value of one metric, e.g. ``cpu.percent``."""

    name: str

    def __post_init__(self) -> None:
        _check_metric_name(self.name)


@dataclass(frozen=True, slots=True)
class Call:
    """``func(metric)``, e.g. ``avg(cpu.percent)``; what it computes is the lookup's business."""

    func: str
    metric: str

    def __post_init__(self) -> None:
        if not _FUNC_NAME_RE.fullmatch(self.func) or self.func in KEYWORDS:
            raise ValueError(f"invalid function name {self.func!r}")
        _check_metric_name(self.metric)


@dataclass(frozen=True, slots=True)
class Neg:
    """Unary minus of anything but a literal (``-3`` is ``Num(-3.0)``, ``-x`` is ``Neg(x)``)."""

    operand: NumExpr


@dataclass(frozen=True, slots=True)
class Sum:
    """``first (op operand)*`` with ``+``/``-``, evaluated left to right.

    ``a - b + c`` is ``Sum(a, (("-", b), ("+", c)))``. The parser splices a parenthesised sum
    on the left (``(a + b) + c`` is ``a + b + c``: same order, same rounding) but not on the
    right (``a - (b + c)`` keeps its parentheses), so ``first`` is never a ``Sum``.
    """

    first: NumExpr
    rest: tuple[tuple[AddOp, NumExpr], ...]

    def __post_init__(self) -> None:
        if not self.rest:
            raise ValueError("a Sum needs at least one '+' or '-' operand")


@dataclass(frozen=True, slots=True)
class Product:
    """``first (op operand)*`` with ``*``/``/``; like :class:`Sum`, ``first`` is never a ``Product``."""

    first: NumExpr
    rest: tuple[tuple[MulOp, NumExpr], ...]

    def __post_init__(self) -> None:
        if not self.rest:
            raise ValueError("a Product needs at least one '*' or '/' operand")


@dataclass(frozen=True, slots=True)
class Compare:
    """``left OP right`` over numbers: a condition."""

    left: NumExpr
    op: CompareOp
    right: NumExpr


@dataclass(frozen=True, slots=True)
class Not:
    operand: BoolExpr


@dataclass(frozen=True, slots=True)
class And:
    """Two or more operands; the parser flattens nested ``and`` so the AST is canonical."""

    operands: tuple[BoolExpr, ...]

    def __post_init__(self) -> None:
        if len(self.operands) < 2:
            raise ValueError("an And needs two or more operands")


@dataclass(frozen=True, slots=True)
class Or:
    """Two or more operands; the parser flattens nested ``or`` so the AST is canonical."""

    operands: tuple[BoolExpr, ...]

    def __post_init__(self) -> None:
        if len(self.operands) < 2:
            raise ValueError("an Or needs two or more operands")


NumExpr: TypeAlias = Num | Metric | Call | Neg | Sum | Product
BoolExpr: TypeAlias = Compare | Not | And | Or
Node: TypeAlias = NumExpr | BoolExpr
#: What a lookup resolves: a metric's value, or an aggregate's.
Ref: TypeAlias = Metric | Call


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition: the boolean AST, the ``for`` hold time (0 without ``for``), the text."""

    node: BoolExpr
    for_s: float
    text: str


def _check_metric_name(name: str) -> None:
    # Guard hand-built ASTs too: a name the parser could not read back would break unparse.
    if not valid_metric_name(name) or name in KEYWORDS:
        raise ValueError(f"invalid metric name {name!r} in an expression")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

TokenKind: TypeAlias = Literal["name", "number", "duration", "cmp", "+", "-", "*", "/", "(", ")", "end"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: TokenKind
    text: str
    column: int  # 1-based column of the first character
    number: float = 0.0


# A name is a head word plus dotted parts. Parts may be empty here so that ``cpu.`` or
# ``a..b`` reach the parser, which reports the exact column of the missing part.
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]*)*")
_NUMBER_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# A duration is one or more number+unit parts with no space: the units of durations.py.
_DURATION_RE: Final = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d|w))+")
_DURATION_PART_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d|w)")
_PLAIN_NUMBER_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")
# The run of characters a number must not run into (ASCII only: a stray "é" stops here and
# is reported by the check after the number).
_WORD_RE: Final = re.compile(r"[0-9A-Za-z_.]*")
_AFTER_FOR_RE: Final = re.compile(r"(?<![A-Za-z0-9_.])for[ \t\r\n]+$")
_SPACE: Final = frozenset(" \t\r\n")
_DIGITS: Final = frozenset("0123456789")  # str.isdigit() would accept non-ASCII digits
_CMP_OPERATORS: Final = ("==", "!=", "<=", ">=", "<", ">")  # two-character ones first
_PUNCTUATION: Final[Mapping[str, TokenKind]] = {"(": "(", ")": ")", "+": "+", "-": "-", "*": "*", "/": "/"}
_UNITS_HINT: Final = "ms, s, m, h, d or w"
# Hints for characters people bring from other languages.
_CHAR_HINTS: Final = {
    "=": " (use == to compare)",
    "!": " (use 'not' or !=)",
    "&": " (use 'and')",
    "|": " (use 'or')",
    ".": " (write numbers with a leading digit, e.g. 0.5)",
    ",": " (functions take one metric, e.g. avg(cpu.percent))",
    "%": " (there is no modulo operator)",
    "^": " (there is no power operator)",
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
        elif ch in _DIGITS:
            tokens.append(_read_number(expr, i))
            i += len(tokens[-1].text)
        elif (m := _NAME_RE.match(expr, i)) is not None:
            tokens.append(_Token("name", m.group(), col))
            i = m.end()
        else:
            op = next((o for o in _CMP_OPERATORS if expr.startswith(o, i)), None)
            if op is None:
                raise ExpressionError(f"unexpected character {ch!r}{_CHAR_HINTS.get(ch, '')}", col, expr)
            tokens.append(_Token("cmp", op, col))
            i += len(op)
    tokens.append(_Token("end", "", n + 1))
    return tokens


def _read_number(expr: str, start: int) -> _Token:
    """A number (``2.5``, ``1e3``) or, when letters follow the digits, a duration (``1h30m``)."""
    m = _NUMBER_RE.match(expr, start)
    assert m is not None  # the caller saw a digit
    end = m.end()
    if end < len(expr) and (expr[end].isalnum() or expr[end] in "_."):
        word = _WORD_RE.match(expr, start)
        assert word is not None  # the pattern matches the empty string
        word_end = word.end()
        if _DURATION_RE.fullmatch(expr, start, word_end) and not expr[word_end : word_end + 1].isalnum():
            return _Token("duration", expr[start:word_end], start + 1)
        raise _number_error(expr, start, end, word_end)
    value = float(m.group())  # a literal too large for a double reads as inf, refused below
    if not math.isfinite(value):
        raise ExpressionError("number out of range", start + 1, expr)
    return _Token("number", m.group(), start + 1, value)


def _number_error(expr: str, start: int, number_end: int, word_end: int) -> ExpressionError:
    """Point at the first character that makes ``expr[start:word_end]`` neither a number nor a duration."""
    pos = start
    while (part := _DURATION_PART_RE.match(expr, pos, word_end)) is not None:
        pos = part.end()
    if pos == start:  # not even the first part is a duration: a number with junk after it
        ch = expr[number_end]
        after_for = _AFTER_FOR_RE.search(expr, 0, start) is not None
        hint = f" (a duration needs a unit: {_UNITS_HINT})" if after_for and ch.isalpha() else ""
        return ExpressionError(f"unexpected character {ch!r} in number{hint}", number_end + 1, expr)
    digits = _PLAIN_NUMBER_RE.match(expr, pos, word_end)
    if digits is not None and digits.end() == word_end and not expr[word_end : word_end + 1].isalnum():
        return ExpressionError(f"{digits.group()} needs a unit ({_UNITS_HINT}) in duration", pos + 1, expr)
    bad = digits.end() if digits is not None else pos
    return ExpressionError(
        f"unexpected character {expr[bad]!r} in duration (units: {_UNITS_HINT})", bad + 1, expr
    )


# --------------------------------------------------------------------------------------------
# Parser: recursive descent, one method per precedence level.
# --------------------------------------------------------------------------------------------


class _Parsed(NamedTuple):
    """A sub-expression and the column it starts at (where a type error about it points)."""

    node: Node
    column: int


_HOW_TO_COMPARE: Final = "compare it, e.g. cpu.percent > 90"


def parse(text: str, functions: frozenset[str] = frozenset()) -> Node:
    """Parse a number- or condition-valued expression without ``for``.

    ``functions`` are the function names allowed here. Raises ``ExpressionError`` with the
    1-based column of the offending spot.
    """
    node, _column, _for_s = _parse(text, functions, allow_for=False)
    return node


def parse_value(text: str, functions: frozenset[str] = frozenset()) -> NumExpr:
    """Parse a number-valued expression (``mem.used / mem.total * 100``)."""
    node, column, _for_s = _parse(text, functions, allow_for=False)
    if isinstance(node, Compare | Not | And | Or):
        raise ExpressionError("expected a number, but this is a condition (true or false)", column, text)
    return node


def parse_condition(text: str, functions: frozenset[str] = frozenset()) -> Condition:
    """Parse a condition with an optional ``for DURATION`` hold time."""
    node, column, for_s = _parse(text, functions, allow_for=True)
    if not isinstance(node, Compare | Not | And | Or):
        message = f"a condition must be true or false, but this is a number ({_HOW_TO_COMPARE})"
        raise ExpressionError(message, column, text)
    return Condition(node, for_s, text)


def _parse(text: str, functions: frozenset[str], *, allow_for: bool) -> tuple[Node, int, float]:
    for func in functions:
        if not _FUNC_NAME_RE.fullmatch(func) or func in KEYWORDS:
            raise ValueError(f"invalid function name {func!r}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is longer than {MAX_LENGTH} characters", MAX_LENGTH + 1, text)
    if not text.strip():
        raise ExpressionError("empty expression", 1, text)
    return _Parser(text, _tokenize(text), functions).parse(allow_for)


class _Parser:
    def __init__(self, expr: str, tokens: list[_Token], functions: frozenset[str]) -> None:
        self.expr = expr
        self.tokens = tokens
        self.functions = functions
        self.pos = 0

    # -- helpers ------------------------------------------------------------------------------

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        tok = self.tokens[self.pos]
        if tok.kind != "end":
            self.pos += 1
        return tok

    def at_keyword(self, word: str) -> bool:
        tok = self.peek()
        return tok.kind == "name" and tok.text == word

    def error(self, message: str, column: int) -> ExpressionError:
        return ExpressionError(message, column, self.expr)

    def unexpected(self, tok: _Token, wanted: str) -> ExpressionError:
        if tok.kind == "end":
            return self.error(f"unexpected end of expression, expected {wanted}", tok.column)
        hint = ""
        if tok.kind == "name" and tok.text.lower() in KEYWORDS and tok.text not in KEYWORDS:
            hint = f" (keywords are lowercase: {tok.text.lower()})"
        elif tok.kind == "duration":
            hint = " (a duration only goes after 'for')"
        return self.error(f"unexpected {tok.text}, expected {wanted}{hint}", tok.column)

    def expect_close(self, opener: _Token) -> None:
        tok = self.peek()
        if tok.kind != ")":
            raise self.unexpected(tok, f"')' to close '(' at column {opener.column}")
        self.take()

    def nest(self, tok: _Token, depth: int) -> int:
        if depth >= MAX_DEPTH:
            raise self.error(f"nesting deeper than {MAX_DEPTH} levels", tok.column)
        return depth + 1

    # -- type rules ---------------------------------------------------------------------------

    def need_bool(self, parsed: _Parsed, message: str) -> BoolExpr:
        node = parsed.node
        if isinstance(node, Compare | Not | And | Or):
            return node
        raise self.error(f"{message}, but this is a number ({_HOW_TO_COMPARE})", parsed.column)

    def need_number(self, parsed: _Parsed, message: str) -> NumExpr:
        node = parsed.node
        if isinstance(node, Compare | Not | And | Or):
            raise self.error(f"{message}, but this is a condition (true or false)", parsed.column)
        return node

    # -- grammar ------------------------------------------------------------------------------

    def parse(self, allow_for: bool) -> tuple[Node, int, float]:
        parsed = self.parse_or(0)
        for_s = 0.0
        tok = self.peek()
        if self.at_keyword("for"):
            if not allow_for:
                raise self.error("'for' only goes after a condition (a rule or an alert), not here", tok.column)
            self.take()
            for_s = self.parse_duration()
            tok = self.peek()
            if tok.kind != "end":
                raise self.unexpected(tok, "the end of the expression after the duration")
        elif tok.kind != "end":
            ends = "'for' or the end of the expression" if allow_for else "the end of the expression"
            raise self.unexpected(tok, f"an operator, 'and', 'or', {ends}")
        return parsed.node, parsed.column, for_s

    def parse_duration(self) -> float:
        tok = self.peek()
        example = "e.g. for 30s, for 5m, for 1h30m"
        if tok.kind == "number":
            raise self.error(f"a duration needs a unit ({_UNITS_HINT}), {example}", tok.column)
        if tok.kind != "duration":
            raise self.unexpected(tok, f"a duration after 'for' ({example})")
        self.take()
        try:
            # One definition of duration units and arithmetic: durations.py (it refuses 0 and
            # values that overflow to infinity).
            return parse_duration(tok.text)
        except InvalidInput:
            raise self.error(f"'for' needs a positive duration, not {tok.text}", tok.column) from None

    def parse_or(self, depth: int) -> _Parsed:
        first = self.parse_and(depth)
        if not self.at_keyword("or"):
            return first
        operands = [self.need_bool(first, "'or' joins conditions")]
        while self.at_keyword("or"):
            self.take()
            operands.append(self.need_bool(self.parse_and(depth), "'or' joins conditions"))
        return _Parsed(_flatten(Or, operands), first.column)

    def parse_and(self, depth: int) -> _Parsed:
        first = self.parse_not(depth)
        if not self.at_keyword("and"):
            return first
        operands = [self.need_bool(first, "'and' joins conditions")]
        while self.at_keyword("and"):
            self.take()
            operands.append(self.need_bool(self.parse_not(depth), "'and' joins conditions"))
        return _Parsed(_flatten(And, operands), first.column)

    def parse_not(self, depth: int) -> _Parsed:
        if self.at_keyword("not"):
            tok = self.take()
            operand = self.parse_not(self.nest(tok, depth))
            return _Parsed(Not(self.need_bool(operand, "'not' takes a condition")), tok.column)
        return self.parse_compare(depth)

    def parse_compare(self, depth: int) -> _Parsed:
        left = self.parse_sum(depth)
        tok = self.peek()
        if tok.kind != "cmp":
            return left
        self.take()
        # The left side's type first: errors come in reading order.
        lhs = self.need_number(left, f"{tok.text} compares numbers")
        rhs = self.need_number(self.parse_sum(depth), f"{tok.text} compares numbers")
        after = self.peek()
        if after.kind == "cmp":
            raise self.error("comparisons do not chain: join them with 'and' (a < b and b < c)", after.column)
        return _Parsed(Compare(lhs, _COMPARE_OPS[tok.text], rhs), left.column)

    def parse_sum(self, depth: int) -> _Parsed:
        first = self.parse_term(depth)
        tok = self.peek()
        if tok.kind not in ("+", "-"):
            return first
        head = self.need_number(first, f"'{tok.text}' needs numbers")
        rest: list[tuple[AddOp, NumExpr]] = []
        while (tok := self.peek()).kind in ("+", "-"):
            self.take()
            operand = self.need_number(self.parse_term(depth), f"'{tok.text}' needs numbers")
            rest.append((_ADD_OPS[tok.text], operand))
        if isinstance(head, Sum):  # "(a + b) + c": same evaluation order as "a + b + c"
            return _Parsed(Sum(head.first, head.rest + tuple(rest)), first.column)
        return _Parsed(Sum(head, tuple(rest)), first.column)

    def parse_term(self, depth: int) -> _Parsed:
        first = self.parse_unary(depth)
        tok = self.peek()
        if tok.kind not in ("*", "/"):
            return first
        head = self.need_number(first, f"'{tok.text}' needs numbers")
        rest: list[tuple[MulOp, NumExpr]] = []
        while (tok := self.peek()).kind in ("*", "/"):
            self.take()
            operand = self.need_number(self.parse_unary(depth), f"'{tok.text}' needs numbers")
            rest.append((_MUL_OPS[tok.text], operand))
        if isinstance(head, Product):
            return _Parsed(Product(head.first, head.rest + tuple(rest)), first.column)
        return _Parsed(Product(head, tuple(rest)), first.column)

    def parse_unary(self, depth: int) -> _Parsed:
        tok = self.peek()
        if tok.kind != "-":
            return self.parse_atom(depth)
        self.take()
        literal = self.peek()
        if literal.kind == "number":  # "-3" is the literal -3.0, not Neg(3.0)
            self.take()
            return _Parsed(Num(-literal.number), tok.column)
        operand = self.parse_unary(self.nest(tok, depth))
        return _Parsed(Neg(self.need_number(operand, "'-' needs a number")), tok.column)

    def parse_atom(self, depth: int) -> _Parsed:
        tok = self.peek()
        if tok.kind == "(":
            self.take()
            inner = self.parse_or(self.nest(tok, depth))
            self.expect_close(tok)
            return _Parsed(inner.node, tok.column)
        if tok.kind == "number":
            self.take()
            return _Parsed(Num(tok.number), tok.column)
        if tok.kind == "name" and tok.text not in KEYWORDS:
            if self.peek(1).kind == "(":
                return self.parse_call()
            self.take()
            return _Parsed(Metric(self.metric_name(tok)), tok.column)
        raise self.unexpected(tok, "a number, a metric or '('")

    def parse_call(self) -> _Parsed:
        name = self.take()
        opener = self.take()
        if name.text not in self.functions:
            allowed = ", ".join(sorted(self.functions))
            if name.text in AGGREGATES:
                listed = f" (allowed here: {allowed})" if allowed else ""
                raise self.error(f"aggregate {name.text}() is not allowed here{listed}", name.column)
            listed = f" (allowed here: {allowed})" if allowed else " (no functions are allowed here)"
            raise self.error(f"unknown function {name.text!r}{listed}", name.column)
        arg = self.peek()
        if arg.kind != "name" or arg.text in KEYWORDS:
            raise self.unexpected(arg, f"a metric name in {name.text}(...)")
        self.take()
        metric = self.metric_name(arg)
        if self.peek().kind == "(":
            raise self.error(f"{name.text}() takes a metric name, not a function call", arg.column)
        self.expect_close(opener)
        return _Parsed(Call(name.text, metric), name.column)

    def metric_name(self, tok: _Token) -> str:
        dots = [tok.column + m.start() for m in re.finditer(r"\.", tok.text)]
        for part, dot in zip(tok.text.split(".")[1:], dots, strict=True):
            if not part:
                raise self.error(f"expected a name after '.' in {tok.text}", dot + 1)
        if len(tok.text) > METRIC_NAME_MAX:
            raise self.error(f"metric name is longer than {METRIC_NAME_MAX} characters", tok.column)
        return tok.text


def _flatten(kind: type[And] | type[Or], operands: list[BoolExpr]) -> BoolExpr:
    """Build an n-ary And/Or, splicing in operands of the same kind (from parentheses)."""
    flat: list[BoolExpr] = []
    for operand in operands:
        if isinstance(operand, kind):
            flat.extend(operand.operands)
        else:
            flat.append(operand)
    return kind(tuple(flat))


# --------------------------------------------------------------------------------------------
# Evaluation (pure, three-valued)
# --------------------------------------------------------------------------------------------

#: Resolves a metric or an aggregate to its current value; ``None`` means unknown.
Lookup: TypeAlias = Callable[[Ref], float | None] | Mapping[Ref, float | None]
_Resolve: TypeAlias = Callable[[Ref], float | None]

_COMPARE: Final[Mapping[CompareOp, Callable[[float, float], bool]]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


def evaluate(node: Node, lookup: Lookup) -> float | bool | None:
    """The value of ``node``: a float for a number, a bool for a condition, ``None`` if unknown.

    ``lookup`` maps a :class:`Metric` or :class:`Call` node to its value (a mapping keyed by
    those nodes, or a callable). ``None``, NaN and ±inf from the lookup are unknown. Never
    raises for a well-typed AST (whatever the lookup returns), unless the lookup itself does.
    """
    resolve: _Resolve = lookup.get if isinstance(lookup, Mapping) else lookup
    if isinstance(node, Compare | Not | And | Or):
        return _truth(node, resolve)
    return _number(node, resolve)


def metrics_lookup(values: Mapping[str, float]) -> Callable[[Ref], float | None]:
    """A lookup over metric values by name (what the agent has); every ``Call`` is unknown."""

    def resolve(ref: Ref) -> float | None:
        return values.get(ref.name) if isinstance(ref, Metric) else None

    return resolve


def _known(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _number(node: NumExpr, resolve: _Resolve) -> float | None:
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Metric | Call):
        return _known(resolve(node))
    if isinstance(node, Neg):
        value = _number(node.operand, resolve)
        return None if value is None else -value
    if isinstance(node, Sum):
        total = _number(node.first, resolve)
        for add_op, operand in node.rest:
            value = _number(operand, resolve)
            if total is None or value is None:
                return None
            total = _known(total + value if add_op == "+" else total - value)  # overflow: unknown
        return total
    if isinstance(node, Product):
        result = _number(node.first, resolve)
        for mul_op, operand in node.rest:
            value = _number(operand, resolve)
            if result is None or value is None:
                return None
            if mul_op == "/":
                if value == 0.0:
                    return None
                result = _known(result / value)
            else:
                result = _known(result * value)
        return result
    assert_never(node)


def _truth(node: BoolExpr, resolve: _Resolve) -> bool | None:
    if isinstance(node, Compare):
        left = _number(node.left, resolve)
        right = _number(node.right, resolve)
        if left is None or right is None:
            return None
        return _COMPARE[node.op](left, right)
    if isinstance(node, Not):
        value = _truth(node.operand, resolve)
        return None if value is None else not value
    if isinstance(node, And):
        # Kleene: one false decides; otherwise any unknown makes the whole unknown.
        result: bool | None = True
        for operand in node.operands:
            value = _truth(operand, resolve)
            if value is False:
                return False
            if value is None:
                result = None
        return result
    if isinstance(node, Or):
        result = False
        for operand in node.operands:
            value = _truth(operand, resolve)
            if value is True:
                return True
            if value is None:
                result = None
        return result
    assert_never(node)


def _walk(node: Node) -> Iterator[Node]:
    yield node
    if isinstance(node, Neg | Not):
        yield from _walk(node.operand)
    elif isinstance(node, Sum | Product):
        yield from _walk(node.first)
        for _op, operand in node.rest:
            yield from _walk(operand)
    elif isinstance(node, Compare):
        yield from _walk(node.left)
        yield from _walk(node.right)
    elif isinstance(node, And | Or):
        for condition in node.operands:
            yield from _walk(condition)


def metrics_used(node: Node) -> frozenset[str]:
    """Metrics ``node`` reads directly (not those only inside a function call: see ``calls_used``)."""
    return frozenset(n.name for n in _walk(node) if isinstance(n, Metric))


def calls_used(node: Node) -> frozenset[tuple[str, str]]:
    """The ``(function, metric)`` pairs ``node`` calls, e.g. ``{("avg", "cpu.percent")}``."""
    return frozenset((n.func, n.metric) for n in _walk(node) if isinstance(n, Call))


# --------------------------------------------------------------------------------------------
# Unparse: the canonical text form.
# --------------------------------------------------------------------------------------------

_OR, _AND, _NOT, _CMP, _SUM, _PRODUCT, _UNARY, _ATOM = range(8)


def unparse(node: Node) -> str:
    """Canonical text for ``node``: minimal parentheses, single spaces around binary operators.

    ``parse(unparse(node), functions) == node`` for any canonical AST (what ``parse`` returns)
    within the length and depth limits, given the functions it calls.
    """
    return _unparse(node, _OR)


def unparse_condition(condition: Condition) -> str:
    """Canonical text for a condition, with ``for DURATION`` when it has a hold time."""
    text = unparse(condition.node)
    return f"{text} for {_format_duration(condition.for_s)}" if condition.for_s else text


def _unparse(node: Node, context: int) -> str:
    level: int
    if isinstance(node, Or):
        level, text = _OR, " or ".join(_unparse(o, _AND) for o in node.operands)
    elif isinstance(node, And):
        level, text = _AND, " and ".join(_unparse(o, _NOT) for o in node.operands)
    elif isinstance(node, Not):
        level, text = _NOT, "not " + _unparse(node.operand, _NOT)
    elif isinstance(node, Compare):
        level, text = _CMP, f"{_unparse(node.left, _SUM)} {node.op} {_unparse(node.right, _SUM)}"
    elif isinstance(node, Sum):
        parts = [_unparse(node.first, _SUM)] + [f"{op} {_unparse(o, _PRODUCT)}" for op, o in node.rest]
        level, text = _SUM, " ".join(parts)
    elif isinstance(node, Product):
        parts = [_unparse(node.first, _PRODUCT)] + [f"{op} {_unparse(o, _UNARY)}" for op, o in node.rest]
        level, text = _PRODUCT, " ".join(parts)
    elif isinstance(node, Neg):
        inner = _unparse(node.operand, _UNARY)
        # "-3" would read back as the literal -3.0; "-(3)" keeps Neg(Num(3.0)).
        level, text = _UNARY, "-" + (f"({inner})" if isinstance(node.operand, Num) and inner[0] != "-" else inner)
    elif isinstance(node, Num):
        level, text = _UNARY, _format_number(node.value)
    elif isinstance(node, Metric):
        level, text = _ATOM, node.name
    elif isinstance(node, Call):
        level, text = _ATOM, f"{node.func}({node.metric})"
    else:
        assert_never(node)
    return f"({text})" if level < context else text


def _format_number(value: float) -> str:
    """The shortest text that reads back to exactly ``value``; whole numbers without ``.0``."""
    negative_zero = value == 0.0 and math.copysign(1.0, value) < 0.0
    if value.is_integer() and abs(value) < 1e16 and not negative_zero:
        return str(int(value))
    return repr(value)  # "-0.0", "2.5", "1e+300": the tokenizer reads all of them back


def _format_duration(seconds: float) -> str:
    """``90`` → ``1m30s``; exact, so ``parse_duration`` reads back the same float."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"a hold time must be positive and finite, not {seconds!r}")
    if seconds.is_integer() and 0 < seconds < 2**53:
        rest = int(seconds)
        parts = []
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            count, rest = divmod(rest, size)
            if count:
                parts.append(f"{count}{unit}")
        return "".join(parts)
    # Plain decimal digits (durations have no exponent), exactly the shortest repr.
    return format(Decimal(repr(seconds)), "f") + "s"
