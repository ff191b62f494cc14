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


def test_upgrade_from_migration_001_regenerates_capture_with_the_notify_setting(tmp_path, hq, branch_a,
                                                                               monkeypatch):
    """An HQ installed before migrations 002-004: a newer branch refuses it with one line and
    touches nothing; `hq install` applies them and rebuilds every capture."""
    from replicator import db
    every = db.migrations("hq")
    monkeypatch.setattr(db, "migrations", lambda kind: [m for m in every if m[0] == 1])
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    a = s.add_branch("a", branch_a)
    assert "replicator.notify" not in _capture_source(hq) and "n.* IS NULL" in _capture_source(hq)
    monkeypatch.setattr(db, "migrations", lambda kind: every)
    branch_a.execute("INSERT INTO items (id, name) VALUES (7, 'local')")
    r = a.cli("init")
    assert r.returncode == 1 and r.stderr == ("error: HQ replication schema is out of date (missing migrations [2, 3, 4]); "
                                              "run `replicator hq install -c hq.yaml`\n"), r.stderr
    assert branch_a.execute("SELECT id, name FROM items") == [(7, "local")]
    assert branch_a.scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'replicat%'") == 0
    report = s.install()
    assert report.migrations == ["002_notify_setting", "003_lean_capture", "004_stable_plans"]
    assert report.attached == ["public.items"]
    source = _capture_source(hq)
    assert "replicator.notify" in source and "n.* IS NULL" not in source and "enable_mergejoin" in source
    with hq.connect() as listener, hq.connect() as writer:
        listener.execute("LISTEN replicator")
        writer.execute("SET replicator.notify = off")
        writer.execute("INSERT INTO items (id) VALUES (1)")
        assert list(listener.notifies(timeout=0.5)) == []
        writer.execute("RESET replicator.notify")
        writer.execute("INSERT INTO items (id) VALUES (2)")
        assert len(list(listener.notifies(timeout=2, stop_after=1))) == 1
    assert hq.scalar("SELECT count(*) FROM replication.change_log") == 2


def test_update_logs_changed_rows_only_and_a_key_move_as_delete_plus_upsert(tmp_path, hq):
    """The UPDATE statement pairs old and new rows: unchanged rows write nothing, NULLs count
    as values, and a row whose key moved is a delete of the old key and an upsert of the new."""
    make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    hq.execute("INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(1, 5) g")

    def logged(statement: str) -> list[tuple]:
        hq.execute("TRUNCATE replication.change_log")
        hq.execute(statement)
        return sorted(hq.execute("SELECT op, (row ->> 'id')::int, row ->> 'name' FROM replication.change_log"))

    assert logged("UPDATE items SET name = name") == []
    assert logged("UPDATE items SET name = CASE id WHEN 2 THEN 'two' ELSE name END") == [("U", 2, "two")]
    assert logged("UPDATE items SET name = NULL WHERE id = 4") == [("U", 4, None)]
    assert logged("UPDATE items SET name = NULL WHERE id = 4") == []
    assert logged("UPDATE items SET id = id + 10 WHERE id = 3") == [("D", 3, "n3"), ("U", 13, "n3")]
    assert logged("UPDATE items SET id = id + 100, name = CASE id WHEN 1 THEN 'one' ELSE name END "
                  "WHERE id IN (1, 2)") == [("D", 1, "n1"), ("D", 2, "two"), ("U", 101, "one"), ("U", 102, "two")]


def _capture_plans(conn, statement: str) -> list[str]:
    """The plans of the capture statements that `statement` runs (auto_explain, nested)."""
    plans: list[str] = []
    conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
    for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                    "SET auto_explain.log_nested_statements = on", "SET client_min_messages = log"):
        conn.execute(setting)
    plans.clear()
    conn.execute(statement)
    return [p for p in plans if "INSERT INTO replication.change_log" in p]


def test_capture_plans_do_not_depend_on_what_the_session_ran_first(tmp_path, hq):
    """A session plans each capture statement once and keeps the plan: a bulk statement first
    in a session must not leave a bulk plan (JIT compiled on every run) to later single-row
    ones, nor a single-row one a one-row plan to bulk ones.  Statements of 1,000 rows or more
    run their own copies, planned without JIT (the UPDATE's with a hash join), and the
    session's settings stay as they were.  jit_above_cost = 10 makes any bulk plan JIT."""
    make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    hq.execute("INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(1, 200000) g")
    hq.execute("VACUUM ANALYZE items")
    statements = {   # op: (bulk, single-row)
        "UPDATE": ("UPDATE items SET name = name || 'x'", "UPDATE items SET name = 'one' WHERE id = 1"),
        "INSERT": ("INSERT INTO items (id) SELECT generate_series(300001, 302000)", "INSERT INTO items (id) VALUES (0)"),
        "DELETE": ("DELETE FROM items WHERE id > 300000", "DELETE FROM items WHERE id = 0"),
    }
    for op, (bulk, single) in statements.items():
        for first, then in ((bulk, single), (single, bulk)):
            hq.execute("DELETE FROM items WHERE id = 0 OR id > 300000")
            if op == "DELETE":
                hq.execute("INSERT INTO items (id) SELECT generate_series(300001, 302000) UNION ALL SELECT 0")
            with hq.connect() as conn:
                conn.execute("SET jit = on; SET jit_above_cost = 10; SET enable_mergejoin = on")
                plans = dict(zip((first, then), _capture_plans(conn, first) + _capture_plans(conn, then)))
                assert conn.execute("SELECT current_setting('jit'), current_setting('enable_mergejoin')").fetchone() \
                    == ("on", "on")
            assert len(plans) == 2 and "JIT:" not in plans[bulk] and "JIT:" not in plans[single], (op, plans)
            assert "rows=1 " in plans[single], (op, plans)
            if op == "UPDATE":
                assert "Hash Full Join" in plans[bulk], plans
    with hq.connect() as conn:   # a session that turned merge joins off keeps them off
        conn.execute("SET enable_mergejoin = off")
        conn.execute(statements["UPDATE"][0])
        assert conn.execute("SHOW enable_mergejoin").fetchone() == ("off",)


def test_bulk_update_logs_like_a_small_one(tmp_path, hq):
    """The copies of the capture statements for 1,000 rows or more write what the small ones
    write: changed rows, NULLs as values, a moved key as delete plus upsert, no no-ops."""
    make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    hq.execute("INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(1, 1500) g")
    hq.execute("UPDATE items SET id = CASE id WHEN 1 THEN 5000 ELSE id END, "
               "name = CASE WHEN id % 500 = 0 THEN NULL WHEN id % 2 = 0 THEN name || 'x' ELSE name END")
    logged = hq.execute("SELECT op, (row ->> 'id')::int, row ->> 'name' FROM replication.change_log "
                        "WHERE op <> 'I' ORDER BY 2, 1")
    changed = [("U", i, None if i % 500 == 0 else f"n{i}x") for i in range(2, 1501, 2)]
    assert logged == [("D", 1, "n1")] + changed + [("U", 5000, "n1")]
    assert hq.scalar("SELECT count(*) FROM replication.change_log WHERE op = 'I'") == 1500
    hq.execute("TRUNCATE replication.change_log")
    hq.execute("DELETE FROM items WHERE id > 100")
    assert hq.scalar("SELECT count(*) FROM replication.change_log WHERE op = 'D'") == 1401   # 101-1500, 5000


def _capture_source(db) -> str:
    return db.scalar("SELECT prosrc FROM pg_proc WHERE proname LIKE 'capture\\_%' "
                     "AND pronamespace = 'replication'::regnamespace")
