"""Capture on HQ: idempotent install, refusals, and HQ writes that never fail
because of replication (DDL on captured tables, unusual session settings)."""
from __future__ import annotations

import pytest

from replicator.db import migrations, repeatables
from replicator.errors import ConfigError
import yaml

from tests.harness import FUNCTIONS_IN_MIGRATIONS, Branch, Setup, assert_same, make_setup, migrations_at

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


def test_ddl_that_changes_nothing_capture_reads_recreates_nothing(tmp_path, hq):
    """The event trigger runs with its own search_path; the signature that decides whether
    capture is re-created must not depend on it, or the first DDL after an install re-creates
    the triggers (re-enabling any a DBA disabled) and the next install does it again, each
    time under a lock on a busy table."""
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    before = _trigger_oids(hq)
    hq.execute("ALTER TABLE items ALTER COLUMN name SET STATISTICS 200")
    assert _trigger_oids(hq) == before
    hq.execute("ALTER TABLE items DISABLE TRIGGER replicator_capture_upd")
    assert hq.scalar("SELECT tgenabled FROM pg_trigger WHERE tgname = 'replicator_capture_upd'") == "D"
    hq.execute("ALTER TABLE items ENABLE TRIGGER replicator_capture_upd")
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


def _install_release_at(hq, version: int) -> None:
    """HQ as a release that shipped migrations up to `version` left it: those migrations and
    that release's registry calls (retire_others took two arguments before migration 006)."""
    # releases then kept versions without a side (sql/versions.sql adds it on upgrade)
    hq.execute("CREATE SCHEMA replication; CREATE TABLE replication.versions (version int PRIMARY KEY, "
               "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
    for v, name, text in migrations_at(FUNCTIONS_IN_MIGRATIONS, "capture"):
        if v <= version:
            hq.execute(text)
            hq.execute("INSERT INTO replication.versions (version, name) VALUES (%s, %s)", (v, name))
    hq.execute("SELECT replication.define_catalog('items', 'Items', true)")
    hq.execute("SELECT replication.attach_table('items', 'public', 'items', NULL, '{}'::text[])")
    hq.execute("SELECT replication.retire_others('{items}'::text[], '{public.items}'::text[])")


def test_upgrade_from_migration_001_regenerates_capture_without_notify(tmp_path, hq, branch_a):
    """An HQ installed before migrations 002-006: a newer branch refuses it with one line and
    touches nothing; `hq install` applies them and rebuilds every capture."""
    hq.execute(SCHEMA)
    branch_a.execute(SCHEMA)
    _install_release_at(hq, 1)
    hq_path = tmp_path / "hq.yaml"
    hq_path.write_text(yaml.safe_dump({"dsn": hq.dsn, "catalogs": CATALOGS}))
    s = Setup(hq, tmp_path, hq_path)
    assert "pg_notify" in _capture_source(hq) and "n.* IS NULL" in _capture_source(hq)
    branch_a.execute("INSERT INTO items (id, name) VALUES (7, 'local')")
    doc = {"branch": "a", "source": {"dsn": hq.dsn}, "target": {"dsn": branch_a.dsn}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(doc))
    a = Branch("a", branch_a, tmp_path / "a.yaml")
    r = a.cli("init")
    assert r.returncode == 1 and r.stderr == ("error: HQ replication schema is out of date (missing migrations "
                                              f"{[v for v, _, _ in migrations('capture')][1:]}); run `replicator hq install -c hq.yaml`\n"), r.stderr
    assert branch_a.execute("SELECT id, name FROM items") == [(7, "local")]
    assert branch_a.scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'replicat%'") == 0
    report = s.install()
    assert report.migrations == ["005_bulk_chunks", "006_hq_first", "007_branch_rows", "009_set_aside_counts",
                                 "010_uploads", "011_purges", "012_routes", "015_repeatables", "016_log_without_op_check",
                                 *(name for name, _ in repeatables("capture"))]
    assert report.attached == ["public.items"]
    source = _capture_source(hq)
    assert "notify" not in source and "n.* IS NULL" not in source and "enable_mergejoin" in source
    assert "array_agg" in source and hq.scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'replicator_key_change' AND tgrelid = 'items'::regclass") == 1
    with hq.connect() as listener, hq.connect() as writer:
        listener.execute("LISTEN replicator")
        writer.execute("INSERT INTO items (id) VALUES (1)")
        writer.execute("INSERT INTO items (id) VALUES (2)")
        assert list(listener.notifies(timeout=0.5)) == []
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
    run their own copies, planned without JIT (the UPDATE's with no join at all, since
    migration 005), and the session's settings stay as they were.  jit_above_cost = 10 makes
    any bulk plan JIT."""
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
                assert "Join" not in plans[bulk] and "Join" in plans[single], plans
    with hq.connect() as conn:   # a session that turned merge joins off keeps them off
        conn.execute("SET enable_mergejoin = off")
        conn.execute(statements["UPDATE"][0])
        assert conn.execute("SHOW enable_mergejoin").fetchone() == ("off",)


def test_bulk_statements_log_their_images_a_thousand_to_a_log_row(tmp_path, hq):
    """Statements of 1,000 rows or more log arrays of the images the small ones log (NULLs
    as values); a bulk UPDATE logs every row it updated, changed or not, after the delete of
    a moved key (the row trigger's); a filtered table's bulk UPDATE logs row by row, with
    old images and without the unchanged rows."""
    cats = dict(CATALOGS, stock={"label": "Stock", "tables": ["stock"], "filter": "store = :store"})
    make_setup(tmp_path, hq, cats, SCHEMA + "CREATE TABLE stock (id int PRIMARY KEY, store int, qty int);")

    def images(op: str) -> list[tuple]:
        return hq.execute("SELECT (r ->> 'id')::int, r ->> 'name' FROM replication.change_log l, "
                          "unnest(l.rows) r WHERE l.op = %s ORDER BY 1", (op.lower(),))

    hq.execute("INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(1, 1500) g")
    assert hq.execute("SELECT cardinality(rows), row FROM replication.change_log ORDER BY 1") == \
        [(500, None), (1000, None)]
    assert images("I") == [(i, f"n{i}") for i in range(1, 1501)]
    hq.execute("TRUNCATE replication.change_log")
    hq.execute("UPDATE items SET id = CASE id WHEN 1 THEN 5000 ELSE id END, "
               "name = CASE WHEN id % 500 = 0 THEN NULL WHEN id % 2 = 0 THEN name || 'x' ELSE name END")
    first = hq.execute("SELECT op, (row ->> 'id')::int, row ->> 'name' FROM replication.change_log ORDER BY id LIMIT 1")
    assert first == [("D", 1, "n1")]
    assert hq.scalar("SELECT count(*) FROM replication.change_log WHERE rows IS NULL") == 1
    assert images("U") == [(i, None if i % 500 == 0 else f"n{i}x" if i % 2 == 0 else f"n{i}") for i in range(2, 1501)] \
        + [(5000, "n1")]
    hq.execute("TRUNCATE replication.change_log")
    hq.execute("DELETE FROM items WHERE id > 100")
    assert [i for i, _ in images("D")] == list(range(101, 1501)) + [5000]

    hq.execute("INSERT INTO stock SELECT g, g % 3, 0 FROM generate_series(1, 1500) g")
    assert hq.scalar("SELECT count(*) FROM replication.change_log WHERE op = 'I' AND table_id = "
                     "(SELECT id FROM replication.tables WHERE table_name = 'stock')") == 1500
    hq.execute("TRUNCATE replication.change_log")
    hq.execute("UPDATE stock SET qty = CASE WHEN id % 2 = 0 THEN 1 ELSE 0 END")
    logged = hq.execute("SELECT op, (row ->> 'id')::int, (old_row ->> 'qty')::int, rows FROM replication.change_log "
                        "ORDER BY 2")
    assert logged == [("U", i, 0, None) for i in range(2, 1501, 2)]


def test_bulk_statements_replicate_in_chunks_of_any_size(tmp_path, hq, branch_a):
    """Bulk INSERT, UPDATE (with moved keys, and rows moving in and out of a branch's filter)
    and DELETE reach the branch whole when its chunks (batch_rows = 300) are smaller than a
    log row of 1,000 images: a chunk grows to the end of its last log row."""
    cats = dict(CATALOGS, stock={"label": "Stock", "default": True, "tables": ["stock"],
                                 "filter": "store = :store"})
    s = make_setup(tmp_path, hq, cats, SCHEMA + "CREATE TABLE stock (id int PRIMARY KEY, store int, qty int);",
                   [branch_a])
    a = s.add_branch("a", branch_a, params={"store": 1}, batch_rows=300)
    a.init()
    hq.execute("INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(1, 2500) g")
    hq.execute("INSERT INTO stock SELECT g, g % 3, 0 FROM generate_series(1, 3000) g")
    a.run_once()
    hq.execute("UPDATE items SET id = CASE WHEN id <= 1200 THEN id + 10000 ELSE id END, name = name || 'x'")
    hq.execute("UPDATE stock SET store = (store + 1) % 3, qty = qty + 1")
    hq.execute("DELETE FROM items WHERE id BETWEEN 1300 AND 2450")
    hq.execute("DELETE FROM stock WHERE id > 1800")
    assert hq.scalar("SELECT count(*) FROM replication.change_log WHERE rows IS NOT NULL") >= 6
    a.run_once()
    assert_same(hq, branch_a, "items")
    assert_same(hq, branch_a, "stock", hq_where="store = 1")
    assert branch_a.scalar("SELECT count(*) FROM stock") == 600


def test_a_filter_applies_to_each_image_of_a_bulk_log_row(tmp_path, hq, branch_a):
    """Images that bulk statements logged in arrays while a table had no filter are filtered
    one by one by the stream once it has one."""
    cats = dict(CATALOGS, stock={"label": "Stock", "default": True, "tables": ["stock"],
                                 "filter": "store = :store"})
    s = make_setup(tmp_path, hq, cats, SCHEMA + "CREATE TABLE stock (id int PRIMARY KEY, store int, qty int);",
                   [branch_a])
    a = s.add_branch("a", branch_a, params={"store": 1})
    a.init()
    filtered = s.hq_path.read_text()
    s.hq_path.write_text(filtered.replace("filter: store = :store", "filter: null"))
    s.install()
    hq.execute("INSERT INTO stock SELECT g, g % 3, 0 FROM generate_series(1, 3000) g")
    hq.execute("UPDATE stock SET store = (store + 1) % 3, qty = qty + 1")
    hq.execute("INSERT INTO stock SELECT g, g % 3, 0 FROM generate_series(3001, 4500) g")
    assert hq.scalar("SELECT count(*) FROM replication.change_log WHERE rows IS NOT NULL") == 8
    s.hq_path.write_text(filtered)
    s.install()
    a.run_once()
    assert_same(hq, branch_a, "stock", hq_where="store = 1")
    assert branch_a.scalar("SELECT count(*) FROM stock") == 1500


def _capture_source(db) -> str:
    return db.scalar("SELECT prosrc FROM pg_proc WHERE proname LIKE 'capture\\_%' "
                     "AND pronamespace = 'replication'::regnamespace")


def test_an_operation_the_reader_does_not_know_stops_the_branch_by_name(tmp_path, hq, branch_a):
    """The log has no CHECK on op (it cost every captured statement a parse of its
    expression); the reader refuses an op it does not know, in one line, applying nothing."""
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    a = s.add_branch("a", branch_a)
    a.init()
    hq.execute("INSERT INTO items VALUES (1, 'x', NULL, 1.5, '{a}')")
    hq.execute("""INSERT INTO replication.change_log (table_id, op, row)
                  SELECT id, 'X', '{"id": 2}' FROM replication.tables WHERE table_name = 'items'""")
    r = a.cli("run", "--once")
    assert r.returncode == 1, r.stderr
    assert "operation this replicator does not know ('X')" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert branch_a.scalar("SELECT count(*) FROM items") == 0
