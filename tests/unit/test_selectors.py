"""The selector language: parsing (and its error columns), evaluation, unparse round trips."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import SelectorError
from corral.selectors import (
    ADMISSION_STATUSES,
    MAX_DEPTH,
    MAX_LENGTH,
    And,
    Bool,
    Compare,
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
    fields_used,
    glob_match,
    parse,
    unparse,
)

ONLINE = Compare(Field("online"), "==", Bool(True))


def tag(key: str) -> Field:
    return Field("tag", (key,))


def attr(path: str) -> Field:
    return Field("attr", tuple(path.split(".")))


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

PARSE_CASES: list[tuple[str, Node]] = [
    (
        'tag.site == "berlin" and attr.os_version < "2.0" and online',
        And(
            (
                Compare(tag("site"), "==", Str("berlin")),
                Compare(attr("os_version"), "<", Str("2.0")),
                ONLINE,
            )
        ),
    ),
    ("online", ONLINE),
    ("online == false", Compare(Field("online"), "==", Bool(False))),
    ("online != true", Compare(Field("online"), "!=", Bool(True))),
    ("not online", Not(ONLINE)),
    ("not not online", Not(Not(ONLINE))),
    ('id == "dev-1"', Compare(Field("id"), "==", Str("dev-1"))),
    ("id >= 'a'", Compare(Field("id"), ">=", Str("a"))),
    ('status == "accepted"', Compare(Field("status"), "==", Str("accepted"))),
    ('status in ["pending", "rejected"]', In(Field("status"), (Str("pending"), Str("rejected")))),
    ('group == "canary"', Compare(Field("group"), "==", Str("canary"))),
    ('group != "canary"', Compare(Field("group"), "!=", Str("canary"))),
    ('group in ["a", "b"]', In(Field("group"), (Str("a"), Str("b")))),
    ('group not in ["a"]', In(Field("group"), (Str("a"),), negated=True)),
    ('group ~ "berlin-*"', Match(Field("group"), "berlin-*")),
    ('tag.my-key_2 ~ "a?c*"', Match(tag("my-key_2"), "a?c*")),
    ("attr.disk_free_bytes > 1000000", Compare(attr("disk_free_bytes"), ">", Num(1000000))),
    ("attr.temp <= -3.5", Compare(attr("temp"), "<=", Num(-3.5))),
    ("attr.n == 1e3", Compare(attr("n"), "==", Num(1000.0))),
    ("attr.n == 2.5E-2", Compare(attr("n"), "==", Num(0.025))),
    ("attr.n == -0", Compare(attr("n"), "==", Num(0))),
    ('attr.software.demo == "1.2.0"', Compare(attr("software.demo"), "==", Str("1.2.0"))),
    ("attr.secure_boot == true", Compare(attr("secure_boot"), "==", Bool(True))),
    ("attr.secure_boot != false", Compare(attr("secure_boot"), "!=", Bool(False))),
    ('attr.x in [1, "a", 2.5]', In(attr("x"), (Num(1), Str("a"), Num(2.5)))),
    ("attr.x not in []", In(attr("x"), (), negated=True)),
    ("attr.0.a-b == 1", Compare(attr("0.a-b"), "==", Num(1))),
    ("exists(tag.site)", Exists(tag("site"))),
    ("exists( attr.software.demo )", Exists(attr("software.demo"))),
    # Precedence: or < and < not < comparison.
    (
        "online or exists(tag.a) and exists(tag.b)",
        Or((ONLINE, And((Exists(tag("a")), Exists(tag("b")))))),
    ),
    (
        "(online or exists(tag.a)) and exists(tag.b)",
        And((Or((ONLINE, Exists(tag("a")))), Exists(tag("b")))),
    ),
    ('not tag.a == "x" and online', And((Not(Compare(tag("a"), "==", Str("x"))), ONLINE))),
    ("not (online and exists(tag.a))", Not(And((ONLINE, Exists(tag("a")))))),
    # Nested and/or flatten into one n-ary node; redundant parentheses disappear.
    (
        "(online and exists(tag.a)) and (exists(tag.b) and exists(tag.c))",
        And((ONLINE, Exists(tag("a")), Exists(tag("b")), Exists(tag("c")))),
    ),
    ("((online))", ONLINE),
    # Whitespace of every kind, or none at all where tokens are unambiguous.
    ('\ttag.a==\n"x"and(online)', And((Compare(tag("a"), "==", Str("x")), ONLINE))),
    ("attr.n==-3", Compare(attr("n"), "==", Num(-3))),
    # String escapes, both quote styles.
    (r'tag.a == "q\"uote\\ \n\t\r"', Compare(tag("a"), "==", Str('q"uote\\ \n\t\r'))),
    (r"tag.a == 'it\'s'", Compare(tag("a"), "==", Str("it's"))),
    (r"tag.a == '\u00e9'", Compare(tag("a"), "==", Str("é"))),
    ('tag.a == "é 😀"', Compare(tag("a"), "==", Str("é 😀"))),
    ("tag.a == ''", Compare(tag("a"), "==", Str(""))),
    # Keywords are only keywords in full; as tag keys they are ordinary names.
    ('tag.and == "or"', Compare(tag("and"), "==", Str("or"))),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse(text: str, expected: Node) -> None:
    assert parse(text) == expected


# (expression, column, a piece of the message). Columns are 1-based and point at the culprit.
ERROR_CASES: list[tuple[str, int, str]] = [
    ("", 1, "empty selector"),
    ("   ", 1, "empty selector"),
    ("online & online", 8, "unexpected character '&' (use 'and')"),
    ("tag.a = 'x'", 7, "unexpected character '='"),
    ("online $", 8, "unexpected character '$'"),
    ("attr.x == 1.", 12, "unexpected character '.' in number"),
    ("attr.x == 12abc", 13, "unexpected character 'a' in number"),
    ("attr.x == - 3", 11, "unexpected character '-'"),
    ('tag.a == "abc', 10, "unterminated string"),
    ("tag.a == 'abc\\'", 10, "unterminated string"),
    ('tag.a == "a\\qb"', 12, "unknown escape \\q"),
    ('tag.a == "\\u12"', 11, "invalid \\u escape"),
    ('tag.a == "\\u0000"', 11, "invalid \\u escape"),
    ('tag.a == "\\ud800"', 11, "invalid \\u escape"),
    ('tag.a == "a\x00"', 12, "is not allowed in a string"),
    ("attr.x == 1e999", 11, "number out of range"),
    ("attr.x == " + "9" * 400, 11, "number out of range"),
    ("online online", 8, "unexpected online, expected 'and', 'or'"),
    ("online and", 11, "unexpected end of selector, expected a field"),
    ("and online", 1, "unexpected and, expected a field"),
    ('tag.a == "x" "y"', 14, "unexpected 'y'"),
    ("tag.a ==", 9, "unexpected end of selector, expected a value"),
    ("tag.a == )", 10, "unexpected ), expected a value"),
    ("tag.a", 6, "expected an operator after tag.a"),
    ("tag.a and online", 7, "use exists(tag.a)"),
    ("online not online", 12, "expected 'in' after 'not'"),
    ("(online", 8, "expected ')' to close '(' at column 1"),
    ("(online and (online)", 21, "expected ')' to close '(' at column 1"),
    ("exists(tag.a", 13, "expected ')' to close '(' at column 7"),
    ("exists tag.a", 8, "expected '(' after 'exists'"),
    ("exists()", 8, "expected tag.KEY or attr.PATH"),
    ("exists(online)", 8, "exists() takes tag.KEY or attr.PATH"),
    ('tag.a in ["x", "y"', 19, "expected ']' to close '[' at column 10"),
    ('tag.a in ["x" "y"]', 15, "expected ']' to close '['"),
    ('tag.a in "x"', 10, "expected '[' to start a list"),
    ("foo == 1", 1, "unknown field 'foo'"),
    ("AND", 1, "keywords are lowercase: and"),
    ('tags.site == "x"', 1, "did you mean tag?"),
    ('tag == "x"', 1, "tag needs a key"),
    ('tag.a.b == "x"', 6, "tag keys cannot contain '.'"),
    ('tag. == "x"', 5, "expected a key after '.'"),
    ("attr.a..b == 1", 8, "expected a key after '.'"),
    ("attr == 1", 1, "attr needs a path"),
    ('id.x == "a"', 3, "id has no sub-fields"),
    # Wrong operand types point at the operand ...
    ("online < 3", 10, "online is true or false"),
    ('online == "yes"', 11, "online is true or false"),
    ("tag.site > true", 12, 'tag.site is a string: quote the value, e.g. tag.site > "true"'),
    ("tag.floor == 3", 14, 'e.g. tag.floor == "3"'),
    ("id == 7", 7, "id is a string"),
    ("group == 1", 10, "group is a string"),
    ("attr.secure_boot > false", 20, "true/false can only be compared with == or !="),
    ("attr.x in [1, true]", 15, "true/false can only be compared with == or !="),
    ('tag.a in ["x", 2]', 16, "tag.a is a string"),
    ("tag.a ~ 3", 9, "~ needs a quoted glob pattern"),
    ('status == "acepted"', 11, "unknown status 'acepted'"),
    ('status in ["pending", "gone"]', 23, "unknown status 'gone'"),
    # ... operators a field does not support point at the operator.
    ("online < true", 8, "< is not supported for online (use ==, !=)"),
    ('online ~ "t*"', 8, "~ is not supported for online"),
    ("online in [true]", 8, "in is not supported for online"),
    ('status < "pending"', 8, "< is not supported for status (use ==, !=, in, not in)"),
    ('status ~ "p*"', 8, "~ is not supported for status"),
    ('group >= "a"', 7, ">= is not supported for group (use ==, !=, ~, in, not in)"),
]


@pytest.mark.parametrize(("text", "column", "message"), ERROR_CASES)
def test_parse_error_column(text: str, column: int, message: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse(text)
    err = caught.value
    assert err.column == column, err.message
    assert message in err.message
    assert err.expression == text
    assert err.detail == f"column {column}: {err.message}"
    assert err.code == "invalid_selector"


def test_length_limit() -> None:
    at_limit = "online" + " " * (MAX_LENGTH - len("online"))
    assert parse(at_limit) == ONLINE
    with pytest.raises(SelectorError) as caught:
        parse(at_limit + " ")
    assert caught.value.column == MAX_LENGTH + 1
    assert "longer than 4096" in caught.value.message


@pytest.mark.parametrize(("opener", "closer"), [("(", ")"), ("not ", ""), ("not (", ")")])
def test_depth_limit(opener: str, closer: str) -> None:
    repeat = MAX_DEPTH // len(opener.split())  # "not (" opens two levels at once
    deepest = opener * repeat + "online" + closer * repeat
    parse(deepest)  # exactly MAX_DEPTH levels parse
    too_deep = opener + deepest + closer
    with pytest.raises(SelectorError) as caught:
        parse(too_deep)
    # The culprit is the innermost opener: the 65th "(" or "not".
    culprit = [m.start() for m in re.finditer(r"\(|not", too_deep)][MAX_DEPTH]
    assert caught.value.column == culprit + 1
    assert "nesting deeper than 64" in caught.value.message


def test_long_flat_expressions_parse_fast_without_deep_recursion() -> None:
    # ~800 terms: n-ary and/or keep the AST (and evaluate/unparse recursion) shallow.
    text = " or ".join(["online and exists(tag.a)"] * 160)[:MAX_LENGTH].rsplit(" or ", 1)[0]
    started = time.perf_counter()
    node = parse(text)
    elapsed = time.perf_counter() - started
    assert isinstance(node, Or) and len(node.operands) > 100
    assert elapsed < 0.5  # typically ~5 ms; a generous bound that still catches quadratic blowups
    assert unparse(node) == text


def test_field_rejects_invalid_hand_built_paths() -> None:
    with pytest.raises(ValueError):
        Field("tag", ("a", "b"))
    with pytest.raises(ValueError):
        Field("attr", ('a"b',))
    with pytest.raises(ValueError):
        Field("online", ("x",))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

BERLIN = DeviceView(
    id="dev-0001",
    status="accepted",
    online=True,
    tags={"site": "berlin", "floor": "3", "empty": ""},
    attrs={
        "os_version": "1.9.2",
        "model": "rpi4",
        "arch": "aarch64",
        "software": {"demo": "1.2.0"},
        "disk_free_bytes": 5_000_000_000,
        "ratio": 0.5,
        "count": 3,
        "secure_boot": True,
        "note": None,
        "list": [1, 2],
        "numeric_string": "42",
        "pattern": "a*b?c",
    },
    groups=frozenset({"canary", "berlin-east"}),
)

EVALUATE_CASES: list[tuple[str, bool]] = [
    ('tag.site == "berlin" and attr.os_version < "2.0" and online', True),
    ("online", True),
    ("not online", False),
    ("online == false", False),
    ('id == "dev-0001"', True),
    ('id < "dev-1"', True),
    ('id ~ "dev-*"', True),
    ('id ~ "DEV-*"', False),  # globs are case-sensitive
    ('status == "accepted"', True),
    ('status != "accepted"', False),
    ('status in ["pending", "accepted"]', True),
    ('status not in ["pending", "accepted"]', False),
    # Tags compare as strings ...
    ('tag.floor == "3"', True),
    ('tag.floor < "10"', False),  # "3" > "10" as strings: numbers in tags are not numbers
    ('tag.site ~ "ber*"', True),
    ('tag.site ~ "ber?in"', True),
    ('tag.site ~ "ber"', False),  # the whole value must match
    ('tag.site ~ "*"', True),
    ('tag.empty == ""', True),
    ('tag.empty ~ "*"', True),
    ('tag.empty ~ "?"', False),
    ('tag.site in ["paris", "berlin"]', True),
    # ... and a missing tag makes ==, <, ~, in false but !=, not in true.
    ('tag.missing == "x"', False),
    ('tag.missing < "x"', False),
    ('tag.missing ~ "*"', False),
    ('tag.missing in ["x"]', False),
    ('tag.missing != "x"', True),
    ('tag.missing not in ["x"]', True),
    ("exists(tag.site)", True),
    ("exists(tag.empty)", True),
    ("exists(tag.missing)", False),
    # Attrs: strings compare as strings, numbers as numbers; mismatched types never match.
    ('attr.model == "rpi4"', True),
    ('attr.software.demo == "1.2.0"', True),
    ('attr.software.demo ~ "1.2.*"', True),
    ("attr.disk_free_bytes > 1000000000", True),
    ("attr.disk_free_bytes > 5e9", False),
    ("attr.disk_free_bytes >= 5e9", True),
    ("attr.ratio == 0.5", True),
    ("attr.count == 3.0", True),  # 3 and 3.0 are the same number
    ("attr.count in [1, 2, 3]", True),
    ('attr.count == "3"', False),
    ("attr.numeric_string == 42", False),  # a string is not a number, even if it looks like one
    ('attr.numeric_string == "42"', True),
    ("attr.numeric_string > 1", False),
    ("attr.numeric_string != 42", True),
    ("attr.model < 3", False),
    ("attr.model > 3", False),
    ("attr.secure_boot == true", True),
    ("attr.secure_boot != true", False),
    ("attr.secure_boot == 1", False),  # JSON true is not the number 1
    ("attr.count == true", False),
    ('attr.pattern ~ "a*b?c"', True),  # * and ? in the value are just characters
    ('attr.pattern ~ "a\\\\*"', False),  # no escapes in globs: "\\" is a literal backslash
    # A null, a list, a missing key or a path through a non-object all count as missing.
    ("exists(attr.note)", False),
    ("attr.note == 0", False),
    ("exists(attr.list)", True),
    ("exists(attr.list.0)", False),
    ("exists(attr.model.x)", False),
    ("exists(attr.software.demo)", True),
    ("exists(attr.software.missing)", False),
    ("attr.missing == 1", False),
    ("attr.missing != 1", True),
    ("attr.missing not in [1]", True),
    ("not attr.missing > 1", True),
    # Groups test membership.
    ('group == "canary"', True),
    ('group == "other"', False),
    ('group != "canary"', False),
    ('group != "other"', True),
    ('group in ["other", "berlin-east"]', True),
    ('group not in ["other", "berlin-east"]', False),
    ('group ~ "berlin-*"', True),
    ('group ~ "paris-*"', False),
    # Boolean structure.
    ('online and tag.site == "paris"', False),
    ('online or tag.site == "paris"', True),
    ('not (online and tag.site == "paris")', True),
    ('tag.site == "paris" or tag.site == "berlin" and online', True),
]


@pytest.mark.parametrize(("text", "expected"), EVALUATE_CASES)
def test_evaluate(text: str, expected: bool) -> None:
    assert evaluate(parse(text), BERLIN) is expected


def test_evaluate_a_bare_device() -> None:
    bare = DeviceView(id="x", status="pending", online=False)
    assert evaluate(parse('tag.site != "berlin" and not exists(attr.model)'), bare)
    assert not evaluate(parse('group ~ "*"'), bare)
    assert evaluate(parse('group != "canary"'), bare)


def test_evaluate_huge_json_integer_does_not_crash() -> None:
    device = DeviceView(id="x", status="accepted", online=True, attrs={"n": 10**400})
    assert evaluate(parse("attr.n > 1e300"), device)
    assert not evaluate(parse("attr.n < 0"), device)


def test_fields_used() -> None:
    node = parse('tag.site == "b" and (online or attr.software.demo ~ "1*") and not group in ["g"]')
    assert fields_used(node) == {"tag.site", "online", "attr.software.demo", "group"}
    node = parse("exists(tag.a) or id == 'x' or status != 'pending'")
    assert fields_used(node) == {"tag.a", "id", "status"}


# --------------------------------------------------------------------------------------------
# Glob matching
# --------------------------------------------------------------------------------------------


def _glob_reference(pattern: str, text: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None


@given(st.text("ab*?\n", max_size=8), st.text("ab*?\n", max_size=10))
def test_glob_match_agrees_with_a_regex_translation(pattern: str, text: str) -> None:
    assert glob_match(pattern, text) == _glob_reference(pattern, text)


def test_glob_match_is_not_exponential() -> None:
    started = time.perf_counter()
    assert not glob_match("*a" * 30 + "*b", "a" * 250)
    assert time.perf_counter() - started < 0.5


# --------------------------------------------------------------------------------------------
# Unparse: canonical text that parses back to the same AST
# --------------------------------------------------------------------------------------------

_keys = st.from_regex(r"[A-Za-z0-9_-]{1,6}", fullmatch=True)
_strings = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=8)
_numbers = st.one_of(
    st.integers(-(10**300), 10**300).map(Num),
    st.floats(allow_nan=False, allow_infinity=False).map(Num),
)
_ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
_eq_ops = st.sampled_from(["==", "!="])


def _tuples(values: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(values, max_size=3).map(tuple)


def _string_field_leaves(fld: st.SearchStrategy[Field], values: st.SearchStrategy[str]) -> Any:
    strs = values.map(Str)
    return st.one_of(
        st.builds(Compare, fld, _ops, strs),
        st.builds(Match, fld, _strings),
        st.builds(In, fld, _tuples(strs), st.booleans()),
    )


def _leaves() -> st.SearchStrategy[Node]:
    tags = _keys.map(lambda k: Field("tag", (k,)))
    attrs = st.lists(_keys, min_size=1, max_size=3).map(lambda p: Field("attr", tuple(p)))
    statuses = st.sampled_from(sorted(ADMISSION_STATUSES))
    group = st.just(Field("group"))
    return st.one_of(
        st.builds(Compare, st.just(Field("online")), _eq_ops, st.booleans().map(Bool)),
        _string_field_leaves(st.just(Field("id")), _strings),
        _string_field_leaves(tags, _strings),
        st.builds(Compare, st.just(Field("status")), _eq_ops, statuses.map(Str)),
        st.builds(In, st.just(Field("status")), _tuples(statuses.map(Str)), st.booleans()),
        st.builds(Compare, group, _eq_ops, _strings.map(Str)),
        st.builds(Match, group, _strings),
        st.builds(In, group, _tuples(_strings.map(Str)), st.booleans()),
        st.builds(Compare, attrs, _ops, st.one_of(_strings.map(Str), _numbers)),
        st.builds(Compare, attrs, _eq_ops, st.booleans().map(Bool)),
        st.builds(Match, attrs, _strings),
        st.builds(In, attrs, _tuples(st.one_of(_strings.map(Str), _numbers)), st.booleans()),
        st.builds(Exists, st.one_of(tags, attrs)),
    )


def _canonical_and(operands: list[Node]) -> Node:
    """And/Or as the parser builds them: operands of the same kind are spliced in."""
    return And(tuple(x for o in operands for x in (o.operands if isinstance(o, And) else (o,))))


def _canonical_or(operands: list[Node]) -> Node:
    return Or(tuple(x for o in operands for x in (o.operands if isinstance(o, Or) else (o,))))


canonical_nodes: st.SearchStrategy[Node] = st.recursive(
    _leaves(),
    lambda children: st.one_of(
        children.map(Not),
        st.lists(children, min_size=2, max_size=3).map(_canonical_and),
        st.lists(children, min_size=2, max_size=3).map(_canonical_or),
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(canonical_nodes)
def test_unparse_round_trips(node: Node) -> None:
    text = unparse(node)
    assert parse(text) == node
    assert unparse(parse(text)) == text


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("(online)and(not(online))", "online and not online"),
        ("online == true", "online"),
        ("(tag.a == 'x')", 'tag.a == "x"'),
        ("attr.n == 1E3", "attr.n == 1000.0"),
        ("attr.n == 007", "attr.n == 7"),
        ("not (online or online) and online", "not (online or online) and online"),
        ("(online or online) and online", "(online or online) and online"),
        ("online or (online and online)", "online or online and online"),
        ("tag.a == '\\u0001\"'", 'tag.a == "\\u0001\\""'),
    ],
)
def test_unparse_canonical_form(text: str, canonical: str) -> None:
    assert unparse(parse(text)) == canonical


def test_unparse_refuses_non_finite_numbers() -> None:
    with pytest.raises(ValueError):
        unparse(Compare(attr("x"), "<", Num(float("inf"))))


# Text the tokenizer must survive: the selector alphabet plus a few troublemakers.
_SELECTOR_CHARS = "abdegilnorstuxy.()[],=!<>~\"'\\*?- 019e\t\n"
_SELECTOR_WORDS = ["tag.", "attr.", "online", " and ", " or ", "not ", "in ", "exists("]
_SELECTOR_ALPHABET = st.sampled_from([*_SELECTOR_CHARS, *_SELECTOR_WORDS])


@settings(max_examples=500)
@given(st.lists(_SELECTOR_ALPHABET, max_size=30).map("".join) | st.text(max_size=40))
def test_parse_either_succeeds_or_names_a_column(text: str) -> None:
    try:
        node = parse(text)
    except SelectorError as err:
        assert 1 <= err.column <= len(text) + 1
        return
    canonical = unparse(node)
    assert parse(canonical) == node
