"""The metric expression language: parsing (and its error columns), types, three-valued
evaluation, unparse round trips."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.core.expr import (
    AGGREGATES,
    KEYWORDS,
    MAX_DEPTH,
    MAX_LENGTH,
    And,
    BoolExpr,
    Call,
    Compare,
    Condition,
    Metric,
    Neg,
    Node,
    Not,
    Num,
    NumExpr,
    Or,
    Product,
    Ref,
    Sum,
    calls_used,
    evaluate,
    metrics_lookup,
    metrics_used,
    parse,
    parse_condition,
    parse_value,
    unparse,
    unparse_condition,
)
from corral.errors import ExpressionError, InvalidInput

CPU = Metric("cpu.percent")
TEMP = Metric("temp.cpu")


def gt(left: NumExpr, right: float) -> Compare:
    return Compare(left, ">", Num(right))


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

PARSE_CASES: list[tuple[str, Node]] = [
    ("cpu.percent > 90", gt(CPU, 90)),
    ("cpu.percent>=90.5", Compare(CPU, ">=", Num(90.5))),
    ("temp.cpu < -5", Compare(TEMP, "<", Num(-5))),
    ("temp.cpu <= - 5", Compare(TEMP, "<=", Num(-5))),  # unary minus folds into the literal
    ("app.queue_depth == 0", Compare(Metric("app.queue_depth"), "==", Num(0))),
    ("net.eth0.rx_bytes != 1e3", Compare(Metric("net.eth0.rx_bytes"), "!=", Num(1000))),
    ("x == 2.5E-2", Compare(Metric("x"), "==", Num(0.025))),
    ("x == 007", Compare(Metric("x"), "==", Num(7))),
    ("_private.0 > 1", gt(Metric("_private.0"), 1)),
    # Metrics that look like keywords or functions are just metrics.
    ("avg > 1", gt(Metric("avg"), 1)),
    ("fork > 1", gt(Metric("fork"), 1)),
    ("for.x > 1", gt(Metric("for.x"), 1)),
    ("x.and > 1", gt(Metric("x.and"), 1)),
    # Arithmetic: precedence, left associativity, n-ary nodes.
    ("a + b * c > 1", gt(Sum(Metric("a"), (("+", Product(Metric("b"), (("*", Metric("c")),))),)), 1)),
    ("a - b + c > 1", gt(Sum(Metric("a"), (("-", Metric("b")), ("+", Metric("c")))), 1)),
    ("(a - b) + c > 1", gt(Sum(Metric("a"), (("-", Metric("b")), ("+", Metric("c")))), 1)),
    ("a - (b + c) > 1", gt(Sum(Metric("a"), (("-", Sum(Metric("b"), (("+", Metric("c")),))),)), 1)),
    ("a / b * 100 > 1", gt(Product(Metric("a"), (("/", Metric("b")), ("*", Num(100)))), 1)),
    ("(a + b) * c > 1", gt(Product(Sum(Metric("a"), (("+", Metric("b")),)), (("*", Metric("c")),)), 1)),
    ("-a > 1", gt(Neg(Metric("a")), 1)),
    ("--a > 1", gt(Neg(Neg(Metric("a"))), 1)),
    ("--3 > 1", gt(Neg(Num(-3)), 1)),
    ("-(3) > 1", gt(Neg(Num(3)), 1)),
    ("2 -3 > 1", gt(Sum(Num(2), (("-", Num(3)),)), 1)),  # binary minus, not the literal -3
    ("2 - -3 > 1", gt(Sum(Num(2), (("-", Num(-3)),)), 1)),
    ("a * -b > 1", gt(Product(Metric("a"), (("*", Neg(Metric("b"))),)), 1)),
    ("1 < a + 1", Compare(Num(1), "<", Sum(Metric("a"), (("+", Num(1)),)))),
    # Boolean structure: or < and < not < comparison; and/or flatten.
    ("a > 1 or b > 1 and c > 1", Or((gt(Metric("a"), 1), And((gt(Metric("b"), 1), gt(Metric("c"), 1)))))),
    ("(a > 1 or b > 1) and c > 1", And((Or((gt(Metric("a"), 1), gt(Metric("b"), 1))), gt(Metric("c"), 1)))),
    ("a > 1 and (b > 1 and c > 1)", And((gt(Metric("a"), 1), gt(Metric("b"), 1), gt(Metric("c"), 1)))),
    ("not a > 1 and b > 1", And((Not(gt(Metric("a"), 1)), gt(Metric("b"), 1)))),
    ("not not a > 1", Not(Not(gt(Metric("a"), 1)))),
    ("not (a > 1 or b > 1)", Not(Or((gt(Metric("a"), 1), gt(Metric("b"), 1))))),
    ("((a > 1))", gt(Metric("a"), 1)),
    ("\ta>1\nand(b>1)", And((gt(Metric("a"), 1), gt(Metric("b"), 1)))),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_condition(text: str, expected: Node) -> None:
    condition = parse_condition(text)
    assert (condition.node, condition.for_s, condition.text) == (expected, 0.0, text)
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "for_s"),
    [
        ("x > 1 for 30s", 30.0),
        ("x > 1 for 5m", 300.0),
        ("x > 1 for 1h30m", 5400.0),
        ("x > 1 for 250ms", 0.25),
        ("x > 1 for 1.5h", 5400.0),
        ("x > 1 for 2d", 172800.0),
        ("x > 1 for 1w", 604800.0),
        ("x > 1 for 1m1s", 61.0),
        ("(x > 1 or y > 1) for 10s", 10.0),
        ("x > 1", 0.0),
    ],
)
def test_for_durations(text: str, for_s: float) -> None:
    assert parse_condition(text).for_s == for_s


def test_functions_are_allowed_per_caller() -> None:
    text = "avg(cpu.percent) - min( cpu.percent ) > 40 or p95(app.latency) > 0.5"
    node = parse_condition(text, AGGREGATES).node
    assert node == Or(
        (
            gt(Sum(Call("avg", "cpu.percent"), (("-", Call("min", "cpu.percent")),)), 40),
            gt(Call("p95", "app.latency"), 0.5),
        )
    )
    assert parse("count(x) > 1", frozenset({"count"})) == gt(Call("count", "x"), 1)
    # A caller may allow a function this module does not know: meaning is the lookup's job.
    assert parse("rate(x) > 1", frozenset({"rate"})) == gt(Call("rate", "x"), 1)


def test_parse_value() -> None:
    assert parse_value("mem.used / mem.total * 100") == Product(
        Metric("mem.used"), (("/", Metric("mem.total")), ("*", Num(100)))
    )
    assert parse_value("-3") == Num(-3)
    assert parse_value("avg(x)", AGGREGATES) == Call("avg", "x")


def test_invalid_function_sets_are_a_programming_error() -> None:
    for bad in ("and", "a.b", "1x", ""):
        with pytest.raises(ValueError):
            parse("x > 1", frozenset({bad}))


# (expression, column, a piece of the message, parse with). Columns are 1-based and point at
# the culprit.
ERROR_CASES: list[tuple[str, int, str, str]] = [
    ("", 1, "empty expression", "condition"),
    ("  \t ", 1, "empty expression", "condition"),
    ("cpu.percent > 90 & mem > 1", 18, "unexpected character '&' (use 'and')", "condition"),
    ("cpu.percent = 90", 13, "unexpected character '=' (use == to compare)", "condition"),
    ("cpu $ 1", 5, "unexpected character '$'", "condition"),
    ("cpu , 1", 5, "functions take one metric", "condition"),
    ("cpu.percent > .5", 15, "unexpected character '.' (write numbers with a leading digit", "condition"),
    ("cpu.percent > 9x", 16, "unexpected character 'x' in number", "condition"),
    ("cpu.percent > 1.", 16, "unexpected character '.' in number", "condition"),
    ("cpu.percent > 1e999", 15, "number out of range", "condition"),
    ("cpu.percent > " + "9" * 400, 15, "number out of range", "condition"),
    ("cpu.percent > 5m", 15, "unexpected 5m, expected a number, a metric or '(' (a duration only goes after 'for')",
     "condition"),
    ("cpu. > 1", 5, "expected a name after '.' in cpu.", "condition"),
    ("a..b > 1", 3, "expected a name after '.' in a..b", "condition"),
    ("a" * 129 + " > 1", 1, "metric name is longer than 128 characters", "condition"),
    ("cpu > ", 7, "unexpected end of expression, expected a number, a metric or '('", "condition"),
    ("cpu-", 5, "unexpected end of expression, expected a number, a metric or '('", "condition"),
    ("and", 1, "unexpected and, expected a number, a metric or '('", "condition"),
    ("cpu > 1 and", 12, "unexpected end of expression", "condition"),
    ("cpu > 1 2", 9, "unexpected 2, expected an operator, 'and', 'or', 'for' or the end of the expression",
     "condition"),
    ("cpu > 1 AND mem > 1", 9, "(keywords are lowercase: and)", "condition"),
    ("(cpu > 1", 9, "expected ')' to close '(' at column 1", "condition"),
    ("(cpu > 1 and (mem > 1)", 23, "expected ')' to close '(' at column 1", "condition"),
    ("cpu > 1)", 8, "unexpected ), expected an operator", "condition"),
    # The hold time.
    ("cpu.percent > 90 for", 21, "unexpected end of expression, expected a duration after 'for'", "condition"),
    ("cpu.percent > 90 for 5", 22, "a duration needs a unit (ms, s, m, h, d or w)", "condition"),
    ("cpu.percent > 90 for 5x", 23, "unexpected character 'x' in number (a duration needs a unit", "condition"),
    ("cpu.percent > 90 for 1h30", 24, "30 needs a unit", "condition"),
    ("cpu.percent > 90 for 1h30mx", 27, "unexpected character 'x' in duration", "condition"),
    ("cpu.percent > 90 for 0s", 22, "'for' needs a positive duration, not 0s", "condition"),
    ("cpu.percent > 90 for mem", 22, "unexpected mem, expected a duration after 'for'", "condition"),
    ("cpu.percent > 90 for 5m and mem > 1", 25, "expected the end of the expression after the duration",
     "condition"),
    ("(cpu > 1 for 5m)", 10, "expected ')' to close '(' at column 1", "condition"),
    ("cpu for 5m", 5, "'for' only goes after a condition", "value"),
    ("cpu > 1 for 5m", 9, "'for' only goes after a condition", "any"),
    # Types.
    ("cpu.percent", 1, "a condition must be true or false, but this is a number", "condition"),
    ("  (cpu + 1) for 5m", 3, "a condition must be true or false", "condition"),
    ("cpu > 1", 1, "expected a number, but this is a condition", "value"),
    ("cpu.percent and mem > 1", 1, "'and' joins conditions, but this is a number", "condition"),
    ("mem > 1 or cpu.percent", 12, "'or' joins conditions, but this is a number", "condition"),
    ("not cpu.percent", 5, "'not' takes a condition, but this is a number", "condition"),
    ("(cpu > 1) + 2 > 3", 1, "'+' needs numbers, but this is a condition", "condition"),
    ("2 * (cpu > 1) > 3", 5, "'*' needs numbers, but this is a condition", "condition"),
    ("-(cpu > 1) < 0", 2, "'-' needs a number, but this is a condition", "condition"),
    ("cpu >= (mem > 1)", 8, ">= compares numbers, but this is a condition", "condition"),
    ("(a > 1) == (b > 1)", 1, "== compares numbers, but this is a condition", "condition"),
    ("1 < cpu < 3", 9, "comparisons do not chain: join them with 'and'", "condition"),
    # Functions: allowed per caller; the name's column.
    ("avg(cpu.percent) > 1", 1, "aggregate avg() is not allowed here", "condition"),
    ("foo(cpu.percent) > 1", 1, "unknown function 'foo' (no functions are allowed here)", "condition"),
    ("x > 1 or max(cpu) > 1", 10, "aggregate max() is not allowed here (allowed here: avg)", "avg"),
    ("foo(cpu) > 1", 1, "unknown function 'foo' (allowed here: avg, count, max, min, p95, sum)", "aggregates"),
    ("cpu.percent(x) > 1", 1, "unknown function 'cpu.percent'", "aggregates"),
    ("avg(1) > 1", 5, "unexpected 1, expected a metric name in avg(...)", "aggregates"),
    ("avg() > 1", 5, "unexpected ), expected a metric name in avg(...)", "aggregates"),
    ("avg(max(x)) > 1", 5, "avg() takes a metric name, not a function call", "aggregates"),
    ("avg(x > 1", 7, "expected ')' to close '(' at column 4", "aggregates"),
    ("avg(x, y) > 1", 6, "unexpected character ','", "aggregates"),
]


def _parse_with(text: str, how: str) -> object:
    if how == "value":
        return parse_value(text)
    if how == "any":
        return parse(text)
    functions = {"condition": frozenset(), "avg": frozenset({"avg"}), "aggregates": AGGREGATES}[how]
    return parse_condition(text, functions)


@pytest.mark.parametrize(("text", "column", "message", "how"), ERROR_CASES)
def test_parse_error_column(text: str, column: int, message: str, how: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        _parse_with(text, how)
    err = caught.value
    assert err.column == column, err.message
    assert message in err.message
    assert err.expression == text
    assert err.detail == f"column {column}: {err.message}"
    assert err.code == "invalid_expression"
    assert isinstance(err, InvalidInput)


def test_length_limit() -> None:
    at_limit = "x > 1" + " " * (MAX_LENGTH - len("x > 1"))
    assert parse_condition(at_limit).node == gt(Metric("x"), 1)
    with pytest.raises(ExpressionError) as caught:
        parse_condition(at_limit + " ")
    assert caught.value.column == MAX_LENGTH + 1
    assert "longer than 4096" in caught.value.message


@pytest.mark.parametrize(
    ("opener", "closer", "core", "suffix", "levels"),
    [
        ("(", ")", "x > 1", "", 1),
        ("not ", "", "x > 1", "", 1),
        ("-", "", "x", " > 1", 1),
        ("not (", ")", "x > 1", "", 2),
        ("-(", ")", "x", " > 1", 2),
    ],
)
def test_depth_limit(opener: str, closer: str, core: str, suffix: str, levels: int) -> None:
    repeat = MAX_DEPTH // levels
    deepest = opener * repeat + core + closer * repeat + suffix
    node = parse_condition(deepest).node  # exactly MAX_DEPTH levels parse ...
    evaluate(node, {Metric("x"): 2.0})  # ... and evaluate and unparse without deep recursion
    assert parse(unparse(node)) == node
    too_deep = opener + deepest[: len(deepest) - len(suffix)] + closer + suffix
    with pytest.raises(ExpressionError) as caught:
        parse_condition(too_deep)
    # The culprit is the innermost opener: the 65th "(", "not" or "-".
    culprit = [m.start() for m in re.finditer(r"\(|not|-", too_deep)][MAX_DEPTH]
    assert caught.value.column == culprit + 1
    assert "nesting deeper than 64 levels" in caught.value.message


def test_long_flat_expressions_parse_fast_without_deep_recursion() -> None:
    # ~1000 operands: n-ary sums, products and and/or keep the AST shallow.
    text = ("x + " * 1000)[:MAX_LENGTH - 10] + "x > 1"
    started = time.perf_counter()
    condition = parse_condition(text)
    assert isinstance(condition.node, Compare) and isinstance(condition.node.left, Sum)
    assert len(condition.node.left.rest) > 900
    assert evaluate(condition.node, {Metric("x"): 1.0}) is True
    assert unparse(condition.node) == text
    assert time.perf_counter() - started < 0.5  # typically a few ms; catches quadratic blowups


def test_hand_built_nodes_are_checked() -> None:
    for bad_name in ("and", "a-b", "a.", "", "1a", "x" * 129):
        with pytest.raises(ValueError):
            Metric(bad_name)
    with pytest.raises(ValueError):
        Call("avg", "a b")
    with pytest.raises(ValueError):
        Call("not", "x")
    for bad_number in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            Num(bad_number)
    with pytest.raises(ValueError):
        Sum(Num(1), ())
    with pytest.raises(ValueError):
        Product(Num(1), ())
    with pytest.raises(ValueError):
        And((gt(CPU, 1),))
    with pytest.raises(ValueError):
        Or(())
    assert Num(3).value == 3.0 and isinstance(Num(3).value, float)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

VALUES: dict[Ref, float | None] = {
    Metric("cpu.percent"): 93.5,
    Metric("temp.cpu"): 70.0,
    Metric("zero"): 0.0,
    Metric("neg"): -2.0,
    Metric("big"): 1e308,
    Metric("nan"): math.nan,
    Metric("inf"): math.inf,
    Metric("none"): None,
    Call("avg", "cpu.percent"): 50.0,
}

EVALUATE_CASES: list[tuple[str, float | bool | None]] = [
    ("cpu.percent > 90", True),
    ("cpu.percent > 93.5", False),
    ("cpu.percent >= 93.5", True),
    ("cpu.percent == 93.5", True),
    ("cpu.percent != 93.5", False),
    ("cpu.percent < temp.cpu", False),
    ("cpu.percent <= 93.5", True),
    ("0.1 + 0.2 == 0.3", False),  # IEEE doubles, == is exact
    ("0.1 + 0.2 != 0.3", True),
    ("cpu.percent - temp.cpu", 23.5),
    ("2 + 3 * 4", 14.0),
    ("2 * 3 + 4 * 5", 26.0),
    ("2 - 3 - 4", -5.0),  # left to right
    ("2 - (3 - 4)", 3.0),
    ("8 / 2 / 2", 2.0),
    ("-2 * -3", 6.0),
    ("-neg", 2.0),
    ("--neg", -2.0),
    ("avg(cpu.percent) < cpu.percent", True),
    # Unknowns: missing, None, NaN and inf from the lookup; division by zero; overflow.
    ("gone", None),
    ("gone > 1", None),
    ("none > 1", None),
    ("nan > 1", None),
    ("nan != nan", None),
    ("inf > 1", None),
    ("-inf < 0", None),
    ("temp.cpu / zero", None),
    ("temp.cpu / -zero", None),
    ("zero / zero", None),
    ("gone * 0 == 0", None),  # unknown stays unknown, even times zero
    ("big * 10", None),
    ("big + big > 0", None),
    ("-big - big < 0", None),
    ("1e308 * 10 > 1", None),
    ("max(cpu.percent) > 1", None),  # a call the lookup does not know
    ("big / 0.5", None),
    ("big / 2", 5e307),
    # Kleene logic: a decided side wins over an unknown one.
    ("gone > 1 and cpu.percent < 0", False),
    ("gone > 1 and cpu.percent > 0", None),
    ("gone > 1 or cpu.percent > 0", True),
    ("gone > 1 or cpu.percent < 0", None),
    ("not gone > 1", None),
    ("not cpu.percent > 90", False),
    ("(gone > 1 or cpu.percent > 90) and temp.cpu < 80", True),
    ("cpu.percent > 90 and temp.cpu < 80 and zero == 0", True),
    ("cpu.percent < 90 or temp.cpu > 80 or zero != 0", False),
]


@pytest.mark.parametrize(("text", "expected"), EVALUATE_CASES)
def test_evaluate(text: str, expected: float | bool | None) -> None:
    node = parse(text, AGGREGATES)
    result = evaluate(node, VALUES)
    assert result == expected and type(result) is type(expected)
    # A callable lookup gives the same answer as a mapping.
    assert evaluate(node, VALUES.get) == result


_T, _F, _U = True, False, None
_KLEENE_VALUES = {_T: "t > 0", _F: "f > 0", _U: "u > 0"}  # t = 1, f = -1, u unknown


@pytest.mark.parametrize("a", [_T, _F, _U])
@pytest.mark.parametrize("b", [_T, _F, _U])
def test_three_valued_logic_truth_tables(a: bool | None, b: bool | None) -> None:
    lookup = metrics_lookup({"t": 1.0, "f": -1.0})
    left, right = _KLEENE_VALUES[a], _KLEENE_VALUES[b]
    want_and = False if _F in (a, b) else None if _U in (a, b) else True
    want_or = True if _T in (a, b) else None if _U in (a, b) else False
    assert evaluate(parse(f"{left} and {right}"), lookup) is want_and
    assert evaluate(parse(f"{left} or {right}"), lookup) is want_or
    assert evaluate(parse(f"not {left}"), lookup) is (None if a is None else not a)


def test_metrics_lookup_reads_names_and_knows_no_calls() -> None:
    lookup = metrics_lookup({"cpu.percent": 95.0})
    assert evaluate(parse("cpu.percent > 90"), lookup) is True
    assert evaluate(parse("mem > 90"), lookup) is None
    assert evaluate(parse("avg(cpu.percent) > 90", AGGREGATES), lookup) is None


def test_metrics_and_calls_used() -> None:
    node = parse("avg(cpu.percent) - cpu.percent > 1 and not (temp.cpu > 1 or p95(app.lat) / mem > 2)", AGGREGATES)
    assert metrics_used(node) == frozenset({"cpu.percent", "temp.cpu", "mem"})
    assert calls_used(node) == frozenset({("avg", "cpu.percent"), ("p95", "app.lat")})
    assert metrics_used(parse("1 > 2")) == frozenset()
    assert calls_used(parse("x > 2")) == frozenset()


# --------------------------------------------------------------------------------------------
# Unparse: canonical text that parses back to the same AST
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("(a)+(b)", "a + b"),
        ("a+b*c", "a + b * c"),
        ("(a+b)*c", "(a + b) * c"),
        ("a-(b-c)", "a - (b - c)"),
        ("(a-b)-c", "a - b - c"),
        ("a/(b*c)", "a / (b * c)"),
        ("(a*b)/c", "a * b / c"),
        ("- - a", "--a"),
        ("-(a+b)", "-(a + b)"),
        ("- 3", "-3"),
        ("-(3)", "-(3)"),
        ("-(-3)", "--3"),
        ("-0", "-0.0"),
        ("1.50", "1.5"),
        ("1E3", "1000"),
        ("007", "7"),
        ("1e20", "1e+20"),
        ("2.5e-7", "2.5e-07"),
        ("avg( cpu.percent )>1", "avg(cpu.percent) > 1"),
        ("not(a>1 and b>1)or c>1", "not (a > 1 and b > 1) or c > 1"),
        ("(a > 1 or b > 1) and c > 1", "(a > 1 or b > 1) and c > 1"),
        ("a > 1 or (b > 1 and c > 1)", "a > 1 or b > 1 and c > 1"),
        ("not (not a > 1)", "not not a > 1"),
        ("(a > 1 and b > 1) and c > 1", "a > 1 and b > 1 and c > 1"),
    ],
)
def test_unparse_is_canonical(text: str, canonical: str) -> None:
    node = parse(text, AGGREGATES)
    assert unparse(node) == canonical
    assert parse(canonical, AGGREGATES) == node


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("a>1 for 90s", "a > 1 for 1m30s"),
        ("a>1 for 3600s", "a > 1 for 1h"),
        ("a>1 for 1w", "a > 1 for 7d"),
        ("a>1 for 1d1s", "a > 1 for 1d1s"),
        ("a>1 for 1.5s", "a > 1 for 1.5s"),
        ("a>1 for 250ms", "a > 1 for 0.25s"),
        ("a>1 for 1ms", "a > 1 for 0.001s"),
        ("a>1", "a > 1"),
    ],
)
def test_unparse_condition(text: str, canonical: str) -> None:
    condition = parse_condition(text)
    assert unparse_condition(condition) == canonical
    again = parse_condition(canonical)
    assert (again.node, again.for_s) == (condition.node, condition.for_s)


_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}(\.[A-Za-z0-9_]{1,5}){0,2}", fullmatch=True).filter(
    lambda name: name not in KEYWORDS
)
_functions = st.sampled_from(sorted(AGGREGATES))
_floats = st.floats(allow_nan=False, allow_infinity=False)


def _sum(first: NumExpr, rest: tuple[tuple[Any, NumExpr], ...]) -> Sum:
    """A Sum as the parser builds it: a Sum on the left is spliced in."""
    return Sum(first.first, first.rest + rest) if isinstance(first, Sum) else Sum(first, rest)


def _product(first: NumExpr, rest: tuple[tuple[Any, NumExpr], ...]) -> Product:
    return Product(first.first, first.rest + rest) if isinstance(first, Product) else Product(first, rest)


def _and(operands: list[BoolExpr]) -> And:
    return And(tuple(x for o in operands for x in (o.operands if isinstance(o, And) else (o,))))


def _or(operands: list[BoolExpr]) -> Or:
    return Or(tuple(x for o in operands for x in (o.operands if isinstance(o, Or) else (o,))))


def _rest(ops: str, children: st.SearchStrategy[NumExpr]) -> st.SearchStrategy[tuple[tuple[str, NumExpr], ...]]:
    return st.lists(st.tuples(st.sampled_from(list(ops)), children), min_size=1, max_size=3).map(tuple)


numbers: st.SearchStrategy[NumExpr] = st.recursive(
    st.one_of(_floats.map(Num), _names.map(Metric), st.builds(Call, _functions, _names)),
    lambda children: st.one_of(
        children.map(Neg),
        st.builds(_sum, children, _rest("+-", children)),
        st.builds(_product, children, _rest("*/", children)),
    ),
    max_leaves=8,
)
conditions: st.SearchStrategy[BoolExpr] = st.recursive(
    st.builds(Compare, numbers, st.sampled_from([">", ">=", "<", "<=", "==", "!="]), numbers),
    lambda children: st.one_of(
        children.map(Not),
        st.lists(children, min_size=2, max_size=3).map(_and),
        st.lists(children, min_size=2, max_size=3).map(_or),
    ),
    max_leaves=5,
)
nodes: st.SearchStrategy[Node] = st.one_of(numbers, conditions)


@settings(max_examples=250)
@given(nodes)
def test_unparse_round_trips(node: Node) -> None:
    text = unparse(node)
    assert parse(text, AGGREGATES) == node
    assert unparse(parse(text, AGGREGATES)) == text


@given(conditions, st.one_of(st.just(0.0), st.integers(1, 10**12).map(float), st.floats(0, 1e9, exclude_min=True)))
def test_unparse_condition_round_trips(node: BoolExpr, for_s: float) -> None:
    text = unparse_condition(Condition(node, for_s, ""))
    again = parse_condition(text, AGGREGATES)
    assert again == Condition(node, for_s, text)


_lookup_values = st.one_of(st.none(), st.floats(), st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324]))


@settings(max_examples=250)
@given(nodes, st.data())
def test_evaluate_never_raises_and_is_well_typed(node: Node, data: st.DataObject) -> None:
    refs: set[Ref] = {Metric(name) for name in metrics_used(node)} | {Call(f, m) for f, m in calls_used(node)}
    lookup = {ref: data.draw(_lookup_values, label=str(ref)) for ref in sorted(refs, key=repr)}
    result = evaluate(node, lookup)
    if isinstance(node, Compare | Not | And | Or):
        assert result is None or isinstance(result, bool)
    else:
        assert result is None or (type(result) is float and math.isfinite(result))


@settings(max_examples=300)
@given(st.text(alphabet="ab.()+-*/<>=! 0123456789e smhdwfornt_,", max_size=40))
def test_parse_fails_only_with_an_expression_error_at_a_real_column(text: str) -> None:
    for how in ("condition", "value", "any"):
        try:
            _parse_with(text, how)
        except ExpressionError as err:
            assert 1 <= err.column <= len(text) + 1
