"""Capture on HQ: idempotent install, refusals, and HQ writes that never fail
because of replication (DDL on captured tables, unusual session settings)."""
from __future__ import annotations

import pytest

from replicator.errors import ConfigError
from tests.harness import assert_same, make_setup

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text, doc json, price float8, tags text[]);
CREATE TABLE nokey (a int);
"""
CATALOGS = {"items": {"label": "Items", "default": True, "tables": ["items"]}}


def _trigger_oids(db):
    return db.execute("SELECT oid FROM pg_trigger WHERE tgname LIKE 'replicator_capture_%' ORDER BY oid")


def test_install_twice_changes_nothing(tmp_path, hq):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    before = _trigger_oids(hq)
    report = s.install()
    assert not report.changed and report.unchanged == ["public.items"]
    assert _trigger_oids(hq) == before


def test_table_added_to_catalog_gets_its_trigger(tmp_path, hq):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA + "CREATE TABLE prices (id int PRIMARY KEY, p numeric);")
    s.hq_path.write_text(s.hq_path.read_text().replace("- items", "- items\n    - prices"))
    report = s.install()
    assert report.attached == ["public.prices"]
    hq.execute("INSERT INTO prices VALUES (1, 2.5)")
    assert hq.scalar("SELECT count(*) FROM replication.change_log") == 1


def test_table_without_primary_key_is_refused_by_name(tmp_path, hq):
    hq.execute(SCHEMA)
    cats = {"odd": {"label": "Odd", "tables": ["nokey"]}}
    with pytest.raises(ConfigError, match=r"table public\.nokey has no primary key"):
        make_setup(tmp_path, hq, cats)
    assert hq.scalar("SELECT to_regclass('replication.change_log')") is None


def test_ddl_on_a_captured_table_keeps_hq_writes_working(tmp_path, hq, branch_a):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    a = s.add_branch("a", branch_a)
    a.init()
    # doc (json) and price (float8) are named in the capture function: drop and rename them
    hq.execute("ALTER TABLE items DROP COLUMN doc")
    hq.execute("ALTER TABLE items RENAME COLUMN price TO cost")
    hq.execute("INSERT INTO items VALUES (1, 'x', 1.5, '{a}')")
    branch_a.execute("ALTER TABLE items DROP COLUMN doc")
    branch_a.execute("ALTER TABLE items RENAME COLUMN price TO cost")
    a.run_once()
    assert_same(hq, branch_a, "items")


def test_unusual_writer_settings_do_not_change_values(tmp_path, hq, branch_a):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    a = s.add_branch("a", branch_a)
    a.init()
    with hq.connect() as conn:
        conn.execute("SET extra_float_digits = 0")
        conn.execute("SET DateStyle = 'SQL, DMY'")
        conn.execute("INSERT INTO items VALUES (1, 'x', '{\"b\": 1, \"a\": [1, 2]}', 0.1::float8 + 0.2::float8, '{q}')")
        # the session's own settings are restored after the capture trigger
        assert conn.execute("SHOW extra_float_digits").fetchone()[0] == "0"
        assert conn.execute("SHOW DateStyle").fetchone()[0] == "SQL, DMY"
    a.run_once()
    assert_same(hq, branch_a, "items")
    assert branch_a.scalar("SELECT price = 0.1::float8 + 0.2::float8 FROM items") is True
