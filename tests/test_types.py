"""Values arrive exactly: every type, every awkward value, whatever the sessions' settings.

Rows are written on HQ by sessions with different time zones and output
settings (`extra_float_digits = 0`, `IntervalStyle = sql_standard`,
`DateStyle = 'SQL, DMY'`, `bytea_output = escape`), the replicator's branch
session has yet other settings, and HQ and branch are compared by the text
form of each row: byte for byte, both for rows copied by `init` and for rows
that travelled through the change log.
"""
from __future__ import annotations

from urllib.parse import quote

import pytest
import yaml

from replicator.schema import bind_target, source_tables
from tests.harness import assert_same, make_setup, table_rows

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'it''s "quoted", \\ really');
CREATE TYPE pricetag AS (amount numeric, currency text, rate float8);
CREATE TABLE typed (
    id int PRIMARY KEY,
    n numeric, f8 float8, f4 real,
    tstz timestamptz, ts timestamp, d date, t time, ttz timetz, iv interval,
    b bytea, txt text, vc varchar(40), ch char(6),
    ai int[], at text[], af float8[],
    jb jsonb, j json,
    u uuid, m mood, ip inet, net cidr, mac macaddr, bo boolean,
    tag pricetag, tr tstzrange, dr daterange, bits varbit, pt point,
    big text
);
-- a key whose text form depends on the writer's time zone
CREATE TABLE keyed (k text, at timestamptz, v int, PRIMARY KEY (k, at));
-- built-in types only: changes travel as binary records (with a dropped column in the middle)
CREATE TABLE plain (LIKE typed INCLUDING ALL);
ALTER TABLE plain DROP COLUMN m, DROP COLUMN tag;
"""
CATALOGS = {"typed": {"label": "Types", "default": True,
                      "tables": ["public.typed", "public.keyed", "public.plain"]}}
BUILTIN_ONLY = {"m", "tag"}

ALL_BYTES = "(SELECT decode(string_agg(lpad(to_hex(g), 2, '0'), ''), 'hex') FROM generate_series(0, 255) g)"
NASTY_TEXT = ("E'it''s \"quoted\" \\\\ back\\\\slash \\\\N \\\\. tab\\there\\nnew line\\r\\n"
              " emoji \U0001F600\U0001F1F2\U0001F1FD e\u0301 \\x01 \\u00e9'")

# (session settings, column -> SQL expression); every row is written once before
# init (copied) and once after (streamed), then the streamed copies are updated.
ROWS: list[tuple[dict, dict]] = [
    ({"TimeZone": "Asia/Kolkata"}, {
        "n": "'12345678901234567890.12345678901234567890'",
        "f8": "'1.7976931348623157e308'", "f4": "'3.4028235e38'",
        "tstz": "'1850-01-01 12:00:00'",                  # local mean time: offset with seconds
        "ts": "'2000-02-29 23:59:59.999999'", "d": "'2024-02-29'", "t": "'24:00:00'",
        "ttz": "'23:59:59.999999-15:59'", "iv": "'-1 year 2 mons -3 days 04:05:06.789'",
        "b": "'\\x005c27005c2200'::bytea", "txt": NASTY_TEXT, "vc": "'short'", "ch": "'ab'",
        "ai": "'{1,NULL,3}'",
        "at": "ARRAY['a\"b', 'c,d', NULL, 'NULL', '', E'back\\\\slash', '{}', ' spaced ', E'\\\\N']",
        "af": "'{-0,NaN,Infinity,1e-310,0.30000000000000004}'",
        "jb": """'{"big": 9007199254740993, "dec": 0.250, "s": "\\u00e9\\n\\"", "n": null,
                  "a": [1, "x", null, 1e-7, 100000000000000000000000000001]}'""",
        "j": """'{"b":1,  "a":2, "a":3, "big": 9007199254740993, "dec": 0.250}'""",
        "u": "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "m": "'it''s \"quoted\", \\ really'",
        "ip": "'::ffff:1.2.3.4/128'", "net": "'10.0.0.0/8'", "mac": "'08:00:2b:01:02:03'", "bo": "true",
        "tag": "ROW(12.30, 'MX,N \"peso\"', -0)::pricetag",
        "tr": "'[2020-01-01 00:00+05, infinity)'", "dr": "'[2020-01-02, 2020-02-01)'",
        "bits": "B'1010'", "pt": "'(1.5,-0)'",
    }),
    ({"TimeZone": "America/St_Johns", "extra_float_digits": "0", "IntervalStyle": "sql_standard",
      "DateStyle": "SQL, DMY", "bytea_output": "escape"}, {
        "n": "'NaN'", "f8": "0.1::float8 + 0.2", "f4": "'1.4e-45'",
        "tstz": "'2021-03-14 12:30:00.123456'", "ts": "'infinity'", "d": "'-infinity'",
        "t": "'00:00:00.000001'", "ttz": "'12:00+05:30'", "iv": "'-1 years -2 mons +3 days -04:05:06'",
        "b": ALL_BYTES, "txt": "'{\"not\": \"json\"}'", "vc": "''", "ch": "'abcdef'",
        "ai": "'{{1,2},{3,4}}'", "at": "'{}'", "af": "ARRAY[0.1::float8 + 0.2, 1e-300]",
        "jb": "'null'", "j": "'null'", "u": "'00000000-0000-0000-0000-000000000000'", "m": "'sad'",
        "ip": "'192.168.0.1/24'", "net": "'::/0'", "mac": "'ff:ff:ff:ff:ff:ff'", "bo": "false",
        "tag": "ROW('NaN', NULL, 0.1::float8 + 0.2)::pricetag", "tr": "'empty'",
        "dr": "'[2020-01-02, 2020-01-03)'", "bits": "B''", "pt": "point(0.1::float8 + 0.2, 1e-300)",
    }),
    ({"TimeZone": "Pacific/Kiritimati", "IntervalStyle": "iso_8601"}, {
        "n": "'Infinity'", "f8": "'-Infinity'", "f4": "'NaN'", "tstz": "'infinity'",
        "ts": "'0044-03-15 12:00:00 BC'", "d": "'0001-01-01 BC'", "t": "'23:59:59.999999'",
        "ttz": "'00:00+15:59'", "iv": "'178000000 years'",
        "b": "''::bytea", "txt": "E'\\\\'", "vc": "'\u00e9\u00e8'", "ch": "''",
        "ai": "'[0:2]={7,8,9}'", "at": "ARRAY[NULL]::text[]", "af": "'{{1.5},{-0}}'",
        "jb": "'\"just a string\"'", "j": "'  [1, 2 ]  '", "u": "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
        "m": "'ok'", "ip": "'2001:db8::1'", "net": "'2001:db8::/32'", "mac": "'00:00:00:00:00:00'",
        "bo": "NULL", "tag": "ROW(NULL, NULL, NULL)::pricetag",
        "tr": "'(,2020-06-01 12:00:00.5+00]'", "dr": "'(,)'", "bits": "B'1'", "pt": "'(-0,-0)'",
    }),
    ({"TimeZone": "UTC", "DateStyle": "German"}, {
        "n": "'-Infinity'", "f8": "'5e-324'", "f4": "'-0'", "tstz": "'-infinity'",
        "ts": "'294276-12-31 23:59:59.999999'", "d": "'5874897-12-31'", "t": "'12:34:56'",
        "ttz": "'00:00:00+00'", "iv": "'1 microsecond'", "b": "'\\x27'::bytea",
        "txt": "repeat(E'0123456789abcde\\\\', 65536)",           # 1 MiB, one backslash in 16
        "vc": "NULL", "ch": "NULL",
        "ai": "'{}'", "at": "ARRAY['\u00e9', '\U0001F600', E'tab\\there']", "af": "'{NULL}'",
        "jb": """'{"deep": {"deeper": [[[]]], "": ""}, "num": -0.0, "e": 1E+2}'""",
        "j": """'{"esc": "\\u00e9\\ud83d\\ude00", "num": -0.0, "e": 1E+2}'""",
        "u": "NULL", "m": "NULL", "ip": "NULL", "net": "NULL", "mac": "NULL", "bo": "NULL",
        "tag": "NULL", "tr": "NULL", "dr": "NULL", "bits": "NULL", "pt": "NULL",
        "big": "(SELECT string_agg(md5(g::text), E'\\n') FROM generate_series(1, 31000) g)",
    }),
    ({}, {}),                                               # NULL in every column
    ({"TimeZone": "Pacific/Chatham"}, {
        "n": "'1e-130'", "f8": "'-1.7976931348623157e308'", "f4": "'-3.4028235e38'",
        "tstz": "'4713-01-01 00:00:00+00 BC'", "ts": "'4713-01-01 00:00:00 BC'", "d": "'4713-01-01 BC'",
        "iv": "'-178000000 years'",
        "big": "repeat('\U0001F600', 262144)",               # 1 MiB of 4-byte characters
    }),
]


def _insert(hq, row_id: int, settings: dict, values: dict, table: str = "typed") -> None:
    cols = [c for c, v in values.items() if v is not None]
    with hq.connect() as conn:
        for name, value in settings.items():
            conn.execute(f"SELECT set_config('{name}', '{value}', false)")
        conn.execute(f"INSERT INTO {table} (id{''.join(', ' + c for c in cols)}) "
                     f"VALUES ({row_id}{''.join(', ' + values[c] for c in cols)})")


def _update_from(hq, target: int, source: int, settings: dict, table: str = "typed") -> None:
    """Copy another row's values over a streamed row (an UPDATE image of every type)."""
    cols = _non_key_columns(hq, table).split(", ")
    with hq.connect() as conn:
        for name, value in settings.items():
            conn.execute(f"SELECT set_config('{name}', '{value}', false)")
        conn.execute(f"UPDATE {table} t SET ({', '.join(cols)}) = (SELECT {', '.join('s.' + c for c in cols)} "
                     f"FROM {table} s WHERE s.id = {source}) WHERE t.id = {target}")


ODD_SETTINGS = ("-c TimeZone=Pacific/Chatham -c DateStyle=SQL,DMY -c IntervalStyle=sql_standard "
                "-c extra_float_digits=-15 -c bytea_output=escape")


def _odd_sessions(branch) -> None:
    """The replicator's sessions (branch, and HQ where records are built) run with settings
    unlike those of HQ's writers and of the comparing sessions."""
    doc = yaml.safe_load(branch.path.read_text())
    for side in ("source", "target"):
        doc[side]["dsn"] += "?options=" + quote(ODD_SETTINGS)
    branch.path.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.parametrize("table", ["typed", "plain"])
def test_every_type_arrives_exactly(tmp_path, hq, branch_a, table):
    """`typed` has an enum and a composite, so its changes travel as JSON; `plain` (built-in types
    only) as binary records built on HQ, with the branch's columns in another order."""
    setup = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    branch_a.execute("ALTER TABLE plain DROP COLUMN txt; ALTER TABLE plain ADD COLUMN txt text")
    branch = setup.add_branch("types", branch_a)
    _odd_sessions(branch)
    assert branch.cfg.target_dsn.endswith("bytea_output%3Descape")
    with hq.connect() as h, branch_a.connect() as b:
        tables = {t.name: t for t in source_tables(h, ["typed"])}
        bind_target(b, list(tables.values()))
    assert (tables[table].record_type is not None) == (table == "plain")
    rows = [(settings, {c: v for c, v in values.items() if table == "typed" or c not in BUILTIN_ONLY})
            for settings, values in ROWS]
    columns = "id, " + _non_key_columns(hq, table)

    for i, (settings, values) in enumerate(rows, start=1):
        _insert(hq, i, settings, values, table)
    branch.init()
    assert_same(hq, branch_a, table, columns)

    for i, (settings, values) in enumerate(rows, start=101):
        _insert(hq, i, settings, values, table)
    assert branch.run_once() == 0
    assert_same(hq, branch_a, table, columns)
    # the streamed rows equal the copied ones, value for value
    assert table_rows(branch_a, table, "id % 100 AS id, " + _non_key_columns(hq, table), "id > 100") == \
        table_rows(branch_a, table, columns, "id < 100")

    # update images of every type, written by sessions with other settings
    n = len(rows)
    for i in range(n):
        _update_from(hq, 101 + i, 1 + (i + 1) % n, rows[(i + 2) % n][0], table)
    hq.execute(f"DELETE FROM {table} WHERE id = 102")
    assert branch.run_once() == 0
    assert_same(hq, branch_a, table, columns)
    assert branch_a.scalar(f"SELECT length(big) FROM {table} WHERE id = 103") == 31000 * 33 - 1


def _non_key_columns(db, table: str = "typed") -> str:
    return ", ".join(r[0] for r in db.execute(
        f"SELECT attname FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attnum > 1 "
        "AND NOT attisdropped ORDER BY attnum"))


def test_key_written_from_different_time_zones(tmp_path, hq, branch_a):
    """One row of a timestamptz key changed by sessions in three zones, all in one window."""
    setup = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    branch = setup.add_branch("zones", branch_a)
    branch.init()

    def as_zone(zone: str, statement: str) -> None:
        with hq.connect() as conn:
            conn.execute(f"SET TIME ZONE '{zone}'")
            conn.execute(statement)

    as_zone("Asia/Kolkata", "INSERT INTO keyed VALUES ('a', '2020-01-01 00:00+00', 1), "
                            "('b', '2020-01-01 00:00+00', 1)")
    as_zone("America/St_Johns", "UPDATE keyed SET v = 2")
    as_zone("Pacific/Chatham", "DELETE FROM keyed WHERE k = 'a'")
    as_zone("UTC", "UPDATE keyed SET v = 3 WHERE k = 'b'")
    assert branch.run_once() == 0
    assert_same(hq, branch_a, "keyed")
    assert branch_a.execute("SELECT k, v FROM keyed") == [("b", 3)]


SETTLED_SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok');
CREATE DOMAIN day AS date;
CREATE TABLE settled (id int PRIMARY KEY, n numeric, d day, ts timestamp, tstz timestamptz, j json,
                      jb jsonb, u uuid, m mood, bo boolean, vc varchar(10), ch char(3), i8 bigint);
CREATE TABLE with_interval (id int PRIMARY KEY, iv interval);
CREATE TABLE with_bytea (id int PRIMARY KEY, b bytea);
CREATE TABLE with_time (id int PRIMARY KEY, t time);
"""
SETTLED = ["settled", "with_interval", "with_bytea", "with_time"]


def _has_settings_check(db, table: str) -> bool:
    source = db.scalar("SELECT p.prosrc FROM replication.tables t JOIN pg_proc p ON p.proname = 'capture_' || t.id "
                       "WHERE t.table_name = %s", (table,))
    return "current_setting('DateStyle')" in source


def test_settings_check_only_for_tables_whose_images_depend_on_settings(tmp_path, hq, branch_a):
    """Capture pins the writer's output settings only where a column's image depends on them;
    a table of integers, numerics, texts, dates, timestamps, json, uuids and enums skips the
    check, and its rows still arrive exactly from a session with every setting unusual."""
    cats = {"settled": {"label": "Settled", "default": True, "tables": SETTLED}}
    setup = make_setup(tmp_path, hq, cats, SETTLED_SCHEMA, [branch_a])
    assert [t for t in SETTLED if _has_settings_check(hq, t)] == ["with_interval", "with_bytea", "with_time"]
    branch = setup.add_branch("settled", branch_a)
    _odd_sessions(branch)
    branch.init()
    with hq.connect() as conn:
        for setting in ODD_SETTINGS.split("-c ")[1:]:
            name, value = setting.strip().split("=", 1)
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        conn.execute("""INSERT INTO settled VALUES
            (1, 1.50, '2024-02-29', '1999-12-31 23:59:59.5', '1850-01-01 12:00:00', '{"b": 1, "a": 2}',
             '{"x": [1.0, null]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'ok', true, 'v', 'c', 9007199254740993),
            (2, 'NaN', 'infinity', '-infinity', 'epoch', 'null', 'null', NULL, 'sad', false, '', '', -1)""")
        conn.execute("UPDATE settled SET d = d - 1, ts = ts + interval '1 day' WHERE id = 1")
        conn.execute("INSERT INTO with_interval VALUES (1, '-1 year 2 mons -3 days 04:05:06.789')")
        conn.execute("INSERT INTO with_bytea VALUES (1, '\\x005c27'::bytea)")
        conn.execute("INSERT INTO with_time VALUES (1, '23:59:59.999999')")
        assert conn.execute("SHOW DateStyle").fetchone()[0] == "SQL, DMY"
    assert branch.run_once() == 0
    for table in SETTLED:
        assert_same(hq, branch_a, table)
    assert branch_a.scalar("SELECT d::text FROM settled WHERE id = 1") == "2024-02-28"
    # a column added later whose image depends on a setting brings the check back
    hq.execute("ALTER TABLE settled ADD COLUMN f float8")
    assert _has_settings_check(hq, "settled")
