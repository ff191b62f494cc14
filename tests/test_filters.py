"""Row filters: only plain predicates get in, and they mean the same on both paths.

Parse/validation tests need no server.  The tests at the bottom run rendered
SQL on a real PostgreSQL (the ``hq`` fixture) in both forms - plain columns for
the initial copy, ``jsonb`` row images for the change stream - and require the
same rows from each.
"""
from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from replicator.filters import (MAX_LENGTH, FilterError, RowFilter, jsonb_column,
                                parse_filter, render)

TABLE = "public.stock"
COLUMNS = {
    "store_id": "integer",
    "code": "text",
    "active": "boolean",
    "region": "character varying(40)",
    "qty": "numeric(14,3)",
    "updated_at": "timestamp with time zone",
    "tags": "integer[]",
    "Mixed": "text",
}


def parse(text: str) -> RowFilter:
    return parse_filter(TABLE, text, COLUMNS)


def rejected(text: str) -> FilterError:
    with pytest.raises(FilterError) as info:
        parse(text)
    return info.value


def as_text(flt: RowFilter, params: dict, column=sql.Identifier) -> str:
    return render(flt, params, column).as_string(None)


# ---------------------------------------------------------------------------
# Rejections: each hostile or broken template is refused, for a stated reason.
# ---------------------------------------------------------------------------

HOSTILE = [
    # statements and queries
    ("1=1; DROP TABLE x", "';' is not allowed"),
    (";", "';' is not allowed"),
    ("store_id = 1;", "';' is not allowed"),
    ("store_id IN (SELECT store_id FROM public.stores)", "subqueries"),
    ("EXISTS (SELECT 1 FROM public.users)", "subqueries"),
    ("store_id = 1 UNION SELECT password_hash FROM public.users", "subqueries"),
    ("WITH x AS (SELECT 1) SELECT * FROM x", "subqueries"),
    ("store_id = (SELECT max(id) FROM public.stores)", "subqueries"),
    # functions outside the allow-list, wherever they hide
    ("pg_sleep(1) IS NULL", "function pg_sleep() is not allowed"),
    ("updated_at < now()", "function current_timestamp() is not allowed"),
    ("random() < 0.5", "function rand() is not allowed"),
    ("current_user = code", "function current_user() is not allowed"),
    ("current_setting('x') = '1'", "function current_setting() is not allowed"),
    ("set_config('role', 'postgres', false) = 'x'", "function set_config() is not allowed"),
    ("store_id = :store_id OR pg_read_file('/etc/passwd') <> ''",
     "function pg_read_file() is not allowed"),
    ("store_id IN (1, pg_sleep(10))", "function pg_sleep() is not allowed"),
    ("coalesce(code, pg_sleep(1)::text) = ''", "function pg_sleep() is not allowed"),
    # columns
    ("nope = 1", "unknown column 'nope'"),
    ("other.id = 1", "column other.id refers to another table"),
    ("public.other.store_id = 1", "refers to another table"),
    ("db.public.stock.store_id = 1", "refers to another table"),
    ('"STORE_ID" = 1', "unknown column 'STORE_ID'"),
    ("tags = :t", "column 'tags' has type 'integer[]', which filters do not support"),
    ("stock.* IS NULL", "* is not allowed"),
    # comments, quoting, syntax
    ("store_id = 1 -- AND active", "comments"),
    ("store_id = 1 /* OR TRUE */", "comments"),
    ("-- store_id = 1", "comments"),
    ("code = 'abc", "could not parse"),
    ("code = 'it''s", "could not parse"),
    ("store_id = = 1", "could not parse"),
    ("store_id = :1", "could not parse"),
    # placeholders other than :name
    ("store_id = $1", "parameter $1 is not allowed; use :name"),
    ("store_id = ?", "placeholder '?' is not allowed"),
    ("store_id = %(store_id)s", "placeholder '%(store_id)s' is not allowed"),
    # not a predicate
    ("", "filter is empty"),
    ("   \n\t", "filter is empty"),
    ("store_id", "must be a condition"),
    ("1 + 1", "must be a condition"),
    (":store_id", "must be a condition"),
    ("store_id AND active", "each side of AND must be a condition"),
    ("NOT code", "the operand of NOT must be a condition"),
    ("store_id = 1 AS x", "alias"),
    # operators and forms outside the allow-list
    ("code || 'x' = 'ax'", "operator || is not allowed"),
    ("store_id % 2 = 0", "operator % is not allowed"),
    ("store_id IS DISTINCT FROM 1", "IS DISTINCT FROM is not allowed"),
    ("store_id = ANY(:ids)", "ANY is not allowed"),
    ("store_id BETWEEN SYMMETRIC 1 AND 9", "this form of BETWEEN"),
    ("trim(both 'x' from code) = ''", "this form of TRIM"),
    ("code LIKE 'a!%' ESCAPE '!'", "LIKE ... ESCAPE is not allowed"),
    ("store_id::regclass IS NULL", "CAST to"),
    ("store_id::int[] IS NULL", "CAST to"),
    ("code = E'\\x41'", "kind of string literal"),
    ("code = $$x$$", "kind of string literal"),
    ("store_id IN (store_id)", "IN (...) may only list literals and :placeholders"),
    ("NOT " * 80 + "active", "nested too deeply"),
    # size
    ("store_id = 1 OR " * 70 + "store_id = 2", f"at most {MAX_LENGTH}"),
]


@pytest.mark.parametrize(("text", "reason"), HOSTILE, ids=[t[:40] for t, _ in HOSTILE])
def test_hostile_or_broken_filters_are_rejected_with_a_reason(text, reason):
    err = rejected(text)
    assert reason in err.reason
    assert err.table == TABLE and err.text == text
    assert str(err) == f"filter for {TABLE} rejected: {err.reason} (filter: {text!r})"


def test_filter_error_is_a_config_error_with_exit_code_2():
    """The CLI maps it to 'bad config' and prints one line, no traceback."""
    from replicator.errors import ConfigError
    err = rejected("pg_sleep(1) IS NULL")
    assert isinstance(err, ConfigError) and err.exit_code == 2


def test_comment_markers_inside_string_literals_are_just_text():
    flt = parse("code = '-- not a comment' OR code = '/* nor this */'")
    assert as_text(flt, {}) == (
        "((\"code\" = '-- not a comment') OR (\"code\" = '/* nor this */'))")


def test_a_filter_at_the_length_limit_is_accepted():
    text = "store_id = 1" + " " * (MAX_LENGTH - len("store_id = 1"))
    assert len(text) == MAX_LENGTH
    parse(text)


# ---------------------------------------------------------------------------
# Accepted filters and how they render
# ---------------------------------------------------------------------------

VALID = [
    ("store_id = :store_id", {"store_id"},
     "(\"store_id\" = CAST('42' AS integer))"),
    ("store_id IN (:a, :b)", {"a", "b"},
     "(\"store_id\" IN (CAST('1' AS integer), CAST('2' AS integer)))"),
    ("active AND store_id = :store_id", {"store_id"},
     "(\"active\" AND (\"store_id\" = CAST('42' AS integer)))"),
    ("lower(code) LIKE 'a%'", set(),
     "(lower(\"code\") LIKE 'a%')"),
    ("store_id BETWEEN 1 AND :max", {"max"},
     "(\"store_id\" BETWEEN 1 AND CAST('9' AS integer))"),
    ("region IS NULL OR region = :region", {"region"},
     "((\"region\" IS NULL) OR (\"region\" = CAST('north' AS character varying)))"),
    ("NOT active OR qty >= 1.5", set(),
     "((NOT \"active\") OR (\"qty\" >= 1.5))"),
    ("stock.store_id = 1 AND public.stock.code <> 'x'", set(),
     "((\"store_id\" = 1) AND (\"code\" <> 'x'))"),
    ("Store_Id = -1", set(), "(\"store_id\" = (- 1))"),
    ('"Mixed" IS NOT NULL', set(), "(\"Mixed\" IS NOT NULL)"),
    ("store_id NOT IN (1, 2)", set(), "(NOT (\"store_id\" IN (1, 2)))"),
    ("code NOT ILIKE :pattern", {"pattern"},
     "(\"code\" NOT ILIKE CAST('a%' AS text))"),
    ("substr(code, 1, 2) = 'ab' AND length(trim(code)) > 0", set(),
     "((substring(\"code\" FROM 1 FOR 2) = 'ab') AND (length(trim(\"code\")) > 0))"),
    ("round(qty * 2 / 3 + 1 - abs(store_id), 1) < 10", set(),
     "(round(((((\"qty\" * 2) / 3) + 1) - abs(\"store_id\")), 1) < 10)"),
    ("coalesce(upper(region), 'NONE') = :region", {"region"},
     "(coalesce(upper(\"region\"), 'NONE') = 'north')"),
    ("CAST(code AS integer) = :n", {"n"},
     "(CAST(\"code\" AS integer) = CAST('3' AS integer))"),
    ("active IS TRUE AND updated_at >= '2024-01-01'", set(),
     "((\"active\" IS TRUE) AND (\"updated_at\" >= '2024-01-01'))"),
    ("code = 'it''s'", set(), "(\"code\" = 'it''s')"),
    ("CAST(code AS char(2)) = :n OR store_id IN (-:n)", {"n"},
     "((CAST(\"code\" AS character(2)) = CAST('3' AS bpchar)) OR "
     "(\"store_id\" IN ((- CAST('3' AS integer)))))"),
    ("TRUE", set(), "TRUE"),
]
PARAMS = {"store_id": "42", "a": "1", "b": 2, "max": "9", "region": "north",
          "pattern": "a%", "n": "3"}


@pytest.mark.parametrize(("text", "params", "expected"), VALID, ids=[v[0][:40] for v in VALID])
def test_valid_filters_parse_and_render(text, params, expected):
    flt = parse(text)
    assert flt.table == TABLE and flt.text == text
    assert flt.params == frozenset(params)
    assert as_text(flt, PARAMS) == expected


def test_parameters_are_cast_without_the_column_type_modifier():
    """CAST('1.0004' AS numeric(14,3)) would round to 1.000 and match the wrong rows."""
    flt = parse("qty = :q AND region = :r")
    assert as_text(flt, {"q": "1.0004", "r": "x"}) == (
        "((\"qty\" = CAST('1.0004' AS numeric)) AND "
        "(\"region\" = CAST('x' AS character varying)))")


def test_param_values_are_bound_literals_not_sql():
    flt = parse("code = :c")
    assert as_text(flt, {"c": "x' OR '1'='1"}) == "(\"code\" = CAST('x'' OR ''1''=''1' AS text))"


def test_non_string_param_values_are_sent_as_text():
    flt = parse("store_id = :s AND active = :a")
    assert as_text(flt, {"s": 42, "a": True}) == as_text(flt, {"s": "42", "a": "true"})


def test_missing_param_at_render_names_it():
    flt = parse("store_id = :store_id AND region = :region")
    with pytest.raises(FilterError) as info:
        render(flt, {"region": "north", "tienda": "42"}, sql.Identifier)
    assert "no value for parameter :store_id" in info.value.reason
    assert "this branch has: region, tienda" in info.value.reason


@pytest.mark.parametrize("value", [None, ["42"], {"x": 1}])
def test_unusable_param_value_is_rejected(value):
    flt = parse("store_id = :store_id")
    with pytest.raises(FilterError, match="parameter :store_id has"):
        render(flt, {"store_id": value}, sql.Identifier)


def test_extra_params_are_ignored():
    """A branch may carry parameters other catalogs' filters use."""
    flt = parse("store_id = :store_id")
    assert as_text(flt, {"store_id": "1", "region": "x"}) == as_text(flt, {"store_id": "1"})


def test_stream_and_copy_differ_only_in_column_expressions():
    flt = parse("store_id = :store_id AND (lower(code) LIKE :p OR qty BETWEEN 1 AND :q)")
    params = {"store_id": "7", "p": "a%", "q": "5"}
    copy = as_text(flt, params)
    stream = as_text(flt, params, jsonb_column(sql.Identifier("s", "row"), COLUMNS))
    for name, type_name in [("store_id", "integer"), ("code", "text"), ("qty", "numeric(14,3)")]:
        copy = copy.replace(f'"{name}"', f"((\"s\".\"row\") ->> '{name}')::{type_name}")
    assert copy == stream


def test_row_filter_is_a_hashable_value():
    assert parse("store_id = :s") == parse("store_id = :s")
    assert len({parse("store_id = :s"), parse("store_id = :s")}) == 1


# ---------------------------------------------------------------------------
# jsonb_column
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("type_name", "expected"), [
    ("integer", "integer"),
    ("numeric(14,3)", "numeric(14,3)"),
    ("character varying(40)", "character varying(40)"),
    ("timestamp(3) with time zone", "timestamp(3) with time zone"),
    ("double precision", "double precision"),
    ('"char"', '"char"'),
    ('"Mood"', '"Mood"'),
    ('sales."Mood"', 'sales."Mood"'),
])
def test_jsonb_column_casts_to_the_column_type(type_name, expected):
    column = jsonb_column(sql.Identifier("row"), {"c": type_name})
    assert column("c").as_string(None) == f"((\"row\") ->> 'c')::{expected}"


@pytest.mark.parametrize("type_name", [
    "integer[]", "integer; DROP TABLE x", "integer) OR (true", "text COLLATE x",
    "integer or true", "Integer", "",
])
def test_jsonb_column_refuses_types_outside_plain_syntax(type_name):
    column = jsonb_column(sql.Identifier("row"), {"c": type_name})
    with pytest.raises(ValueError):
        column("c")


def test_jsonb_column_unknown_name():
    with pytest.raises(KeyError):
        jsonb_column(sql.Identifier("row"), {"c": "text"})("d")


# ---------------------------------------------------------------------------
# On a real server: both forms select the same rows
# ---------------------------------------------------------------------------

STOCK_DDL = """
CREATE TABLE public.stock (
    store_id integer NOT NULL,
    code text NOT NULL,
    active boolean NOT NULL,
    region character varying(40),
    qty numeric(14,3) NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    "Mixed" text
);
INSERT INTO public.stock VALUES
    (1,  'abc',  true,  'north', 1.000, '2024-01-01 10:00+00', 'x'),
    (1,  'abd',  false, NULL,    2.500, '2024-02-01 10:00+00', NULL),
    (2,  'xyz',  true,  'south', 0.000, '2024-03-01 10:00+00', 'y'),
    (9,  'Abe',  true,  'north', 7.125, '2023-12-31 23:59+00', NULL),
    (10, 'a''q', true,  'east',  1.000, '2024-06-01 00:00+00', 'z'),
    (42, 'zz',   false, 'north', 3.333, '2024-01-15 12:00+00', NULL);
"""


def _columns(conn: psycopg.Connection) -> dict[str, str]:
    """The mapping the project builds from pg_catalog: name -> format_type()."""
    rows = conn.execute("""
        SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
        WHERE attrelid = 'public.stock'::regclass AND attnum > 0 AND NOT attisdropped
        ORDER BY attnum""").fetchall()
    return dict(rows)


def _counts(conn, text: str, params: dict) -> tuple[int, int]:
    """Rows selected by the copy form and by the change-stream form."""
    columns = _columns(conn)
    flt = parse_filter(TABLE, text, columns)
    copy = sql.SQL("SELECT count(*) FROM public.stock WHERE {}").format(
        render(flt, params, sql.Identifier))
    stream = sql.SQL("SELECT count(*) FROM (SELECT to_jsonb(t) AS row FROM public.stock t) s "
                     "WHERE {}").format(
        render(flt, params, jsonb_column(sql.Identifier("s", "row"), columns)))
    return conn.execute(copy).fetchone()[0], conn.execute(stream).fetchone()[0]


ON_SERVER = [
    ("store_id = :store_id", {"store_id": "1"}, 2),
    ("store_id = :store_id", {"store_id": 42}, 1),
    ("store_id IN (:a, :b)", {"a": "1", "b": "2"}, 3),
    ("active AND store_id = :store_id", {"store_id": "1"}, 1),
    ("lower(code) LIKE 'a%'", {}, 4),
    ("store_id BETWEEN 1 AND :max", {"max": "9"}, 4),
    ("region IS NULL OR region = :region", {"region": "north"}, 4),
    ("qty = :q", {"q": "1.0004"}, 0),          # no rounding through numeric(14,3)
    ("qty = :q", {"q": "1"}, 2),
    ("region = :r", {"r": "north" + "x" * 40}, 0),  # no truncation through varchar(40)
    ("updated_at >= :since", {"since": "2024-02-01 10:00+00"}, 3),
    ("updated_at < '2024-01-01'", {}, 1),
    ("code = :c", {"c": "a'q"}, 1),
    ("code = :c", {"c": "x' OR '1'='1"}, 0),
    ('"Mixed" IS NOT NULL AND NOT active = FALSE', {}, 3),
    ("round(qty * 2 / 3 + abs(store_id), 1) > 3 AND substr(code, 1, 1) <> 'z'", {}, 2),
    ("coalesce(region, 'none') = :r", {"r": "none"}, 1),
    ("CAST(store_id AS text) LIKE :p", {"p": "4%"}, 1),
    ("length(trim(code)) = 3 AND upper(code) <> 'ABE'", {}, 4),
    ("store_id NOT IN (1, 2) AND qty <> 0", {}, 3),
    ("store_id IN (-:s, :s, NULL)", {"s": "-2"}, 1),
    ("CAST(code AS char(2)) = :c", {"c": "abc"}, 0),  # the value is not cut to 2 characters
    ("CAST(code AS char(2)) = :c", {"c": "ab"}, 2),
]


@pytest.mark.parametrize(("text", "params", "expected"), ON_SERVER,
                         ids=[f"{t[:40]}-{i}" for i, (t, _, _) in enumerate(ON_SERVER)])
def test_copy_and_stream_forms_select_the_same_rows(hq, text, params, expected):
    with hq.connect() as conn:
        conn.execute(STOCK_DDL)
        copy, stream = _counts(conn, text, params)
    assert (copy, stream) == (expected, expected)


def test_param_value_cannot_inject_sql_into_an_integer_comparison(hq):
    """A value that is not an integer is a server error, never a wider filter."""
    with hq.connect() as conn:
        conn.execute(STOCK_DDL)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            _counts(conn, "store_id = :store_id", {"store_id": "1 OR 1=1"})


def test_numbers_and_strings_from_the_template_are_exact(hq):
    with hq.connect() as conn:
        conn.execute(STOCK_DDL)
        assert _counts(conn, "qty = 7.125", {}) == (1, 1)
        assert _counts(conn, "qty > 1e0", {}) == (3, 3)
        assert _counts(conn, "code = 'a''q'", {}) == (1, 1)
        assert _counts(conn, "qty = 12345678901234567890", {}) == (0, 0)
