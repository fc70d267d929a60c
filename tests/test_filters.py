"""The `--where` language: canonical text round-trips for any condition, globs agree with a plain
component-by-component matcher, numbers and dates read back what wrote them, and each mistake is one
line that says what is allowed."""

from __future__ import annotations

import datetime as dt
from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.filters import (
    Condition,
    Filter,
    FilterError,
    check_condition,
    check_key,
    glob_regex,
    parse_condition,
    parse_date,
    parse_number,
    parse_where,
    typed,
    typed_values,
    value_type,
)
from pipeline.globs import glob_prefix

# Deterministic and quick: the same examples every run, a modest number of them.
quick = settings(derandomize=True, max_examples=150)

keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,8}", fullmatch=True)
# Values of any text, with the characters the grammar cares about made common.
values = st.text(
    alphabet=st.one_of(st.sampled_from(list(" \t,()=<>!\"'\\:*[]a1é€\n")), st.characters(exclude_categories=["Cs"])),
    max_size=12,
)

# Globs and paths over a small alphabet, so that matches are frequent.
glob_tokens = st.sampled_from(["a", "b", ".", "*", "?", "[ab]", "[!a]", "[a-b]", "[]a]", "]"])
glob_names = st.lists(glob_tokens, max_size=4).map("".join).filter(lambda c: "**" not in c)
glob_components = st.one_of(st.just("**"), glob_names)


@st.composite
def globs(draw: st.DrawFn) -> str:
    comps = draw(st.lists(glob_components, min_size=1, max_size=4))
    text = "/".join(comps)
    return ("/" + text) if draw(st.booleans()) else (text or "a")


path_names = st.text(alphabet="ab.]", max_size=3)
paths = st.lists(path_names, min_size=1, max_size=5).map(lambda comps: "/" + "/".join(comps))


@st.composite
def conditions(draw: st.DrawFn) -> Condition:
    op = draw(st.sampled_from(["=", "!=", "in", "not in", "<", "<=", ">", ">=", "glob"]))
    if op == "glob":
        return Condition("path", "glob", (draw(globs()),))
    count = draw(st.integers(1, 4)) if op in ("in", "not in") else 1
    return Condition(draw(keys), op, tuple(draw(values) for _ in range(count)))


def reference_match(glob: str, path: str) -> bool:
    """The glob's meaning, written plainly: components matched one by one with fnmatch, `**` any run
    of whole components (at the end, at least one: everything below), a relative glob after `**/`."""
    pattern = glob.split("/") if glob.startswith("/") else ["**", *glob.split("/")]

    def match(g: list[str], p: list[str]) -> bool:
        if not g:
            return not p
        if g[0] == "**":
            if len(g) == 1:
                return len(p) >= 1
            return any(match(g[1:], p[i:]) for i in range(len(p) + 1))
        return bool(p) and fnmatchcase(p[0], g[0]) and match(g[1:], p[1:])

    return match(pattern, path.split("/"))


@quick
@given(conditions())
def test_any_condition_reads_back_from_its_text(cond: Condition) -> None:
    assert parse_condition(str(cond)) == cond


@quick
@given(st.lists(conditions(), max_size=4))
def test_any_filter_reads_back_from_its_texts(conds: list[Condition]) -> None:
    f = Filter(tuple(conds))
    assert parse_where(f.texts()) == f
    assert bool(f) == bool(conds)


@quick
@given(keys, st.lists(values, min_size=1, max_size=3), st.sampled_from(["", " ", "  \t"]))
def test_spacing_and_single_quotes_do_not_change_the_meaning(key: str, vals: list[str], gap: str) -> None:
    single = ["'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in vals]
    listed = f"{gap}{key} in{gap}({gap}{(gap + ',' + gap).join(single)}{gap}){gap}"
    assert parse_condition(listed) == Condition(key, "in", tuple(vals))
    assert parse_condition(f"{gap}{key}{gap}<={gap}{single[0]}{gap}") == Condition(key, "<=", (vals[0],))


@quick
@given(globs(), paths)
def test_glob_regex_agrees_with_a_component_matcher(glob: str, path: str) -> None:
    assert bool(glob_regex(glob).fullmatch(path)) == reference_match(glob, path)


@quick
@given(globs(), paths)
def test_every_match_starts_with_the_glob_prefix(glob: str, path: str) -> None:
    prefix = glob_prefix(glob)
    if glob_regex(glob).fullmatch(path):
        assert path.startswith(prefix)
    if not glob.startswith("/"):
        assert prefix == ""


@quick
@given(st.lists(glob_names, min_size=1, max_size=4), paths)
def test_star_never_crosses_a_slash(names: list[str], path: str) -> None:
    glob = "/" + "/".join(names)  # no ** component
    if glob_regex(glob).fullmatch(path):
        assert path.count("/") == glob.count("/")


@quick
@given(st.lists(path_names, max_size=4))
def test_double_star_spans_any_number_of_whole_folders(middle: list[str]) -> None:
    path = "/".join(["/a", *middle, "b.jpg"])
    assert glob_regex("/a/**/b.jpg").fullmatch(path)
    assert glob_regex("/a/**").fullmatch(path)
    assert glob_regex("b.jpg").fullmatch(path)
    assert not glob_regex("/a/*/b.jpg").fullmatch(path) or len(middle) == 1


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("/a/**/b.jpg", "/a/b.jpg", True),
        ("/a/**/b.jpg", "/a/x/y/b.jpg", True),
        ("/a/**/b.jpg", "/ab.jpg", False),
        ("/a/**", "/a/x/y.png", True),
        ("/a/**", "/a", False),
        ("/a/**", "/ab/c", False),
        ("/a/*.jpg", "/a/x.jpg", True),
        ("/a/*.jpg", "/a/x/y.jpg", False),
        ("*.png", "/mnt/p/x.png", True),
        ("*.png", "/mnt/p/x.PNG", False),
        ("2019/**", "/mnt/photos/2019/06/x.jpg", True),
        ("2019/**", "/mnt/photos/2018/x.jpg", False),
        ("/a/?.jpg", "/a/x.jpg", True),
        ("/a/?.jpg", "/a/xy.jpg", False),
        ("/a/[!x]", "/a/y", True),
        ("/a/[!x]", "/a/x", False),
        ("/a/[x-z]b", "/a/yb", True),
        ("/a/[[]1]", "/a/[1]", True),
        ("/a[!b]c", "/a/c", False),
        ("/a[+-0]c", "/a/c", False),
        ("/a/b.jpg", "/a/b.jpg", True),
        ("/a/b.jpg", "/a/bxjpg", False),
    ],
)
def test_glob_examples(glob: str, path: str, matches: bool) -> None:
    assert bool(glob_regex(glob).fullmatch(path)) == matches
    assert bool(glob_regex(glob).match(path)) == matches  # anchored at the end too


def test_glob_prefix_examples() -> None:
    assert glob_prefix("/mnt/photos/2019/**") == "/mnt/photos/2019/"
    assert glob_prefix("/mnt/p/img[0-9].jpg") == "/mnt/p/img"
    assert glob_prefix("/mnt/p/a.jpg") == "/mnt/p/a.jpg"
    assert glob_prefix("photos/**") == ""


@quick
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_read_back(x: float) -> None:
    assert parse_number(repr(x)) == x
    assert value_type(repr(x)) == "number"


@quick
@given(st.integers(-(10**30), 10**30))
def test_integers_read_back(n: int) -> None:
    assert parse_number(str(n)) == float(n)
    assert parse_number(f" {n} ") == float(n)


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity", "1_000", "1,000", "0x10", "1e999", "", "12abc", "١٢", "."])
def test_not_numbers(text: str) -> None:
    assert parse_number(text) is None


datetimes = st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30))
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))


@quick
@given(datetimes, offsets)
def test_dates_read_back(moment: dt.datetime, zone: dt.timezone) -> None:
    aware = moment.replace(tzinfo=zone)
    assert parse_date(aware.isoformat()) == aware.timestamp()
    assert parse_date(aware.isoformat(sep=" ")) == aware.timestamp()
    utc = moment.replace(tzinfo=dt.timezone.utc)
    assert parse_date(moment.isoformat()) == utc.timestamp()  # naive means UTC
    whole = utc.replace(microsecond=0)
    assert parse_date(whole.isoformat().replace("+00:00", "Z")) == whole.timestamp()
    assert (
        parse_date(moment.date().isoformat())
        == dt.datetime.combine(moment.date(), dt.time(), dt.timezone.utc).timestamp()
    )
    assert value_type(moment.date().isoformat()) == "date"


def test_date_forms() -> None:
    assert parse_date("2019-06-01") == 1559347200.0
    assert parse_date("2019-06-01T12:30") == 1559347200.0 + 12.5 * 3600
    assert parse_date("2019-06-01 12:30:00+02:00") == 1559347200.0 + 10.5 * 3600
    assert parse_date("2019-06-01T12:30Z") == parse_date("2019-06-01T12:30")
    for bad in ["2019-13-01", "2019-02-30", "2019-6-1", "2019", "yesterday", "2019-06-01T25:00", "2019-06-01Z"]:
        assert parse_date(bad) is None, bad
    assert value_type("2019") == "number"
    assert value_type("shoes") == "string"


def test_typed_values() -> None:
    assert typed("12.5", "number", "price") == 12.5
    assert typed("2019-06-01", "date", "mtime") == 1559347200.0
    assert typed("Shoes", "string", "category") == "Shoes"
    assert typed_values(parse_condition("price in (1, 2.5)"), "number") == (1.0, 2.5)
    assert typed_values(parse_condition("path:/a/**"), "string") == ("/a/**",)
    check_condition(parse_condition("category in (a,b)"), "string")
    check_condition(parse_condition("price>=3"), "number")


def test_parse_where_combines_and_skips_blanks() -> None:
    f = parse_where(["category=shoes", " ", "price<100"])
    assert f.texts() == ["category=shoes", "price<100"]
    assert str(f) == "category=shoes AND price<100"
    assert f.keys() == ["category", "price"]
    assert not parse_where([])
    with pytest.raises(TypeError):
        parse_where("category=shoes")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty filter '': write key=value"),
        ("price~5", "price~5: unknown operator at '~5' after 'price'; use = != < <= > >= in (a,b)"),
        ("price==5", "price==5: unknown operator '=='; use = != <"),
        ("price 5", "price 5: unknown operator at '5' after 'price'"),
        ("price", "price: no operator after 'price'"),
        ("=shoes", "=shoes: '=shoes' does not start with a key"),
        ("title='red", "title='red: unclosed quote \"'red\"; end it with '"),
        ('title="red\\"', 'title="red\\": unclosed quote'),
        ("category in ()", "category in (): empty list after 'in'; give at least one value"),
        ("category in (a,)", "category in (a,): no value after ','"),
        ("category in (a b)", "category in (a b): expected , or ) at 'b)'"),
        ("category in (a", "category in (a: unclosed ( after 'in'"),
        ("category in a", "category in a: expected ( after 'in'"),
        ("category=shoes bags", "category=shoes bags: unexpected 'bags' after the value; quote a value"),
        ("category=", "category=: no value after '='"),
        ("category:*.jpg", "category:*.jpg: only path takes a glob"),
        ("path:/a/**.jpg", "path:/a/**.jpg: ** stands alone between slashes"),
        ("path:/a/[bc", "path:/a/[bc: unclosed [ in '[bc'"),
        ("path:/a/[z-a]", "path:/a/[z-a]: the range z-a in '[z-a]' runs backwards"),
        ("note=!x", "note=!x: unknown operator '=!'; a value that starts with ! is quoted"),
        ("a=1\nb=2", "'a=1\\nb=2': unexpected 'b=2' after the value"),
    ],
)
def test_malformed_expressions_say_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse_condition(text)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_type_errors_name_the_expression() -> None:
    with pytest.raises(FilterError, match=r"^category<x: category holds text; use = != in or not in$"):
        check_condition(parse_condition("category<x"), "string")
    with pytest.raises(FilterError, match=r"^price<abc: 'abc' is not a number; price holds numbers"):
        typed_values(parse_condition("price<abc"), "number")
    with pytest.raises(FilterError, match=r"^price: 'abc' is not a number"):
        typed("abc", "number", "price")
    with pytest.raises(FilterError, match=r"^mtime>=2019: '2019' is not a date; mtime holds dates such as 2019-06-01"):
        typed_values(parse_condition("mtime>=2019"), "date")
    with pytest.raises(FilterError, match=r"^colour=red: no field colour; did you mean color\? this index knows: "):
        check_key(parse_condition("colour=red"), {"color": "string", "price": "number"})
    assert check_key(parse_condition("price<3"), {"price": "number"}) == "number"


def test_conditions_built_by_hand_are_checked() -> None:
    with pytest.raises(FilterError, match="only path takes a glob"):
        Condition("category", "glob", ("*",))
    with pytest.raises(FilterError, match="give at least one value"):
        Condition("category", "in", ())
    with pytest.raises(FilterError, match="takes one value"):
        Condition("price", "<", ("1", "2"))
    with pytest.raises(FilterError, match="is not a key"):
        Condition("1price", "=", ("1",))
    with pytest.raises(FilterError, match=r"^path:/a/\*\*x: \*\* stands alone"):
        Condition("path", "glob", ("/a/**x",))
