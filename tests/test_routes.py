"""Routes on HQ's change log (migration 012, replicator/routes.py).

A filtered catalog's log rows carry their store; a branch login's probe and window look
only at rows without a route and at its own, so what a poll costs HQ no longer grows with
the other stores' changes.  The tests count the log rows PostgreSQL examines (EXPLAIN
ANALYZE) as the branch's own login, and check that no change is lost when a route is
added, changed or removed while writers write.
"""
from __future__ import annotations

import threading
import time

import psycopg
import pytest
import yaml

from harness import Branch
from replicator import config, reader
from replicator.capture import install
from replicator.hq import add_branch, role_name
from replicator.reader import LogReader, current_snapshot
from replicator.schema import branch_params, source_tables
from test_catalogs import FILTERED, assert_own_rows, pos  # noqa: F401  (fixture)


def examined(conn: psycopg.Connection, query, params: dict) -> int:
    """Log rows the statement looked at: returned by a scan of change_log, or removed by its
    filter (the row-level policy's too) or its recheck, over all loops."""
    plan = conn.execute(psycopg.sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + (
        psycopg.sql.SQL(query) if isinstance(query, str) else query), params).fetchone()[0][0]["Plan"]
    total, todo = 0, [plan]
    while todo:
        node = todo.pop()
        todo.extend(node.get("Plans", []))
        if node.get("Relation Name") == "change_log":
            total += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
                      + node.get("Rows Removed by Index Recheck", 0)) * node.get("Actual Loops", 1)
    return total


def fetched(conn: psycopg.Connection, query: str, params: dict) -> int:
    """Log rows a statement read from the table, functions' statements included (this
    transaction's statistics)."""
    with conn.transaction():
        conn.execute(query, params).fetchall()
        return conn.execute("SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM "
                            "pg_stat_xact_user_tables WHERE relid = 'replication.change_log'::regclass").fetchone()[0]


def stock_id(hq) -> int:
    return hq.scalar("SELECT id FROM replication.tables WHERE table_name = 'stock'")


@pytest.mark.parametrize("analyzed", [False, True], ids=["before-analyze", "after-analyze"])
def test_a_branch_looks_only_at_its_own_stores_log_rows(pos, branch_a, branch_b, analyzed):
    """after-analyze: the statistics autovacuum gathers on a busy log (few routes, each of
    many rows) once made the planner read the window's whole range off change_log_xid, in
    the probe's generic plans and in the window's query alike (sql/capture/functions/probe.sql)."""
    a = pos.register(pos.branch_db(branch_a), 1, catalogs=FILTERED)
    b = pos.register(pos.branch_db(branch_b), 2, catalogs=FILTERED)
    a.init()
    b.init()
    tid = stock_id(pos.hq)
    assert pos.hq.execute("SELECT route_column, route_param, route_type, route_capture FROM replication.tables "
                          "WHERE id = %s", (tid,)) == [("store_id", "store_id", "int4", "store_id")]

    before = current_snapshot(pos.hq.connect())
    per_pass = pos.hq.scalar("SELECT count(*) FROM stock WHERE store_id = 2")
    for _ in range(-(-3000 // per_pass)):
        pos.hq.execute("UPDATE stock SET quantity = quantity + 1 WHERE store_id = 2")
    others = pos.hq.scalar("SELECT count(*) FROM replication.change_log WHERE route = %s", (f"{tid}:2",))
    assert others >= 3000
    if analyzed:
        pos.hq.execute("ANALYZE replication.change_log")

    with pos.connect_as(a) as conn_a, pos.connect_as(b) as conn_b:
        assert f"{tid}:1" in conn_a.execute("SELECT replication.branch_routes()").fetchone()[0]
        tables = source_tables(conn_a, ["stock"])
        params = {"prev": before, "tables": [tid]}
        # the probe: nothing for A in thousands of B's rows, and it looks at almost none of
        # them; the same question asked without routes reads every one
        assert conn_a.execute(reader.PROBE, params).fetchone()[1] is False
        assert fetched(conn_a, reader.PROBE, params) < 50
        assert fetched(conn_a, reader.PROBE_ALL, params) >= others
        assert conn_b.execute(reader.PROBE, params).fetchone()[1] is True

        # the window: A's one change among them, and again only its own rows looked at
        item = pos.hq.scalar("SELECT min(item_id) FROM stock WHERE store_id = 1")
        pos.hq.execute("UPDATE stock SET quantity = quantity + 1 WHERE store_id = 1 AND item_id = %s", (item,))
        cur = current_snapshot(conn_a)
        window = LogReader(tables, branch_params(conn_a, a.name))
        rows = [r for chunk in window.window(conn_a, before, cur) for r in chunk]
        assert [r[2] for r in rows] == ["U"] and f"{item}" in rows[0][3]
        late, _, routes = window._late_and_arrays(conn_a, before, cur)
        assert f"{tid}:1" in routes
        window_params = {"prev": before, "cur": cur, "late": late, "after": 0, "tables": [tid], "routes": routes}
        assert examined(conn_a, window.plain_query, window_params) < 50
    # the measure is real: a session that is no branch login (no routes) looks at every row
    with pos.hq.connect() as admin:
        assert admin.execute("SELECT replication.branch_routes()").fetchone()[0] is None
        assert examined(admin, window.query_for(arrays=False, routed=False), window_params) >= others

    # a row moving between stores has no route: both branches look at it, each as its filter says
    moved = pos.hq.scalar("SELECT min(item_id) FROM stock s WHERE store_id = 2 AND NOT EXISTS "
                          "(SELECT FROM stock t WHERE t.store_id = 1 AND t.item_id = s.item_id)")
    at = pos.hq.scalar("SELECT max(id) FROM replication.change_log")
    pos.hq.execute("UPDATE stock SET store_id = 1 WHERE store_id = 2 AND item_id = %s", (moved,))
    assert pos.hq.execute("SELECT op, route FROM replication.change_log WHERE id > %s ORDER BY id", (at,)) \
        == [("D", None), ("U", None)]
    pos.hq.execute("DELETE FROM stock WHERE store_id = 2 AND item_id = (SELECT max(item_id) FROM stock "
                   "WHERE store_id = 2)")
    gone = pos.hq.scalar("SELECT max(item_id) FROM stock WHERE store_id = 1")
    pos.hq.execute("DELETE FROM stock WHERE store_id = 1 AND item_id = %s", (gone,))
    pos.hq.execute("INSERT INTO stock (store_id, item_id, quantity) VALUES (1, %s, 5)", (gone,))
    assert pos.hq.execute("SELECT op::text, route FROM replication.change_log WHERE id > %s AND op IN ('I', 'D') "
                          "AND route IS NOT NULL ORDER BY id", (at,)) \
        == [("D", f"{tid}:2"), ("D", f"{tid}:1"), ("I", f"{tid}:1")]
    assert a.run_once() == 0 and b.run_once() == 0
    assert_own_rows(pos.hq, a, 1)
    assert_own_rows(pos.hq, b, 2)


ROUTE_SCHEMA = """
CREATE TABLE shelves (id int PRIMARY KEY, store_id int NOT NULL, backup_store int NOT NULL, qty int NOT NULL);
INSERT INTO shelves SELECT i, 1 + i % 2, 2 - i % 2, 0 FROM generate_series(1, 20) i;
"""


def shelves_yaml(tmp_path, flt: str | None):
    path = tmp_path / "hq-shelves.yaml"
    table = {"label": "Shelves", "tables": ["public.shelves"]}
    if flt:
        table["filter"] = flt
    path.write_text(yaml.safe_dump({"dsn": "${REPLICATOR_HQ_DSN}", "catalogs": {"shelves": table}}))
    return config.load_hq(path)


def test_a_route_change_loses_no_change_of_a_writer_that_ran_the_old_capture(hq, branch_a, tmp_path, monkeypatch):
    """hq.yaml moves the shelves' filter from store_id to backup_store while a writer's
    transaction, which logged its change under the old route, is still open.  Install
    waits for it (the table lock), then takes the routes away: the branch of store 1 gets
    the change, which the new filter passes and the old route would have hidden."""
    monkeypatch.setenv("REPLICATOR_HQ_DSN", hq.dsn)
    hq.execute(ROUTE_SCHEMA)
    branch_a.execute(ROUTE_SCHEMA.split(";")[0])
    name = f"shelf-1-{time.monotonic_ns() % 100000}"
    try:
        with hq.connect() as conn:
            install(conn, shelves_yaml(tmp_path, "store_id = :store"))
            add_branch(conn, shelves_yaml(tmp_path, "store_id = :store"), name, {"store": "1"}, "pw")
        tid = hq.scalar("SELECT id FROM replication.tables WHERE table_name = 'shelves'")
        path = tmp_path / "branch.yaml"
        path.write_text(yaml.safe_dump({"branch": name, "source": {"dsn": hq.cluster.dsn(hq.name, role_name(name), "pw")},
                                        "target": {"dsn": branch_a.dsn}, "catalogs": ["shelves"]}))
        br = Branch(name, branch_a, path)
        br.init()
        assert branch_a.scalar("SELECT count(*) FROM shelves WHERE store_id <> 1") == 0

        # shelf 3 is store 2's, backed up by store 1: its change is routed to store 2
        writer = psycopg.connect(hq.dsn)
        writer.execute("UPDATE shelves SET qty = 42 WHERE id = 3")
        assert writer.execute("SELECT route FROM replication.change_log WHERE table_id = %s ORDER BY id DESC "
                              "LIMIT 1", (tid,)).fetchone()[0] == f"{tid}:2"
        done = threading.Event()

        def reinstall():
            with hq.connect() as conn:
                install(conn, shelves_yaml(tmp_path, "backup_store = :store"))
            done.set()

        t = threading.Thread(target=reinstall)
        t.start()
        time.sleep(1.5)
        assert not done.is_set(), "install must wait for the writer that ran the old capture"
        writer.commit()
        writer.close()
        t.join(60)
        assert done.is_set()
        assert hq.execute("SELECT route_column, route_capture FROM replication.tables WHERE id = %s",
                          (tid,)) == [("backup_store", "backup_store")]
        with psycopg.connect(hq.cluster.dsn(hq.name, role_name(name), "pw")) as login:   # still closed to it
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                login.execute("SELECT * FROM public.shelves")
        assert hq.scalar("SELECT count(*) FROM replication.change_log WHERE table_id = %s AND route IS NOT NULL",
                         (tid,)) == 0
        hq.execute("UPDATE shelves SET qty = 7 WHERE id = 5")     # store 2's, backed up by 1: routed anew
        assert hq.scalar("SELECT route FROM replication.change_log WHERE table_id = %s ORDER BY id DESC LIMIT 1",
                         (tid,)) == f"{tid}:1"
        assert br.run_once() == 0
        assert branch_a.execute("SELECT id, qty FROM shelves WHERE id IN (3, 5) ORDER BY id") == [(3, 42), (5, 7)]

        # no route at all (a filter without an equality) takes the routes away the same way
        with hq.connect() as conn:
            install(conn, shelves_yaml(tmp_path, "backup_store = :store OR qty < 0"))
        assert hq.execute("SELECT route_column, route_capture FROM replication.tables WHERE id = %s",
                          (tid,)) == [(None, None)]
        assert hq.scalar("SELECT count(*) FROM replication.change_log WHERE table_id = %s AND route IS NOT NULL",
                         (tid,)) == 0
        hq.execute("UPDATE shelves SET qty = 8 WHERE id = 7")
        assert br.run_once() == 0
        assert branch_a.scalar("SELECT qty FROM shelves WHERE id = 7") == 8
    finally:
        with hq.connect() as conn:
            if conn.execute("SELECT FROM pg_roles WHERE rolname = %s", (role_name(name),)).fetchone():
                conn.execute(psycopg.sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(
                    psycopg.sql.Identifier(role_name(name))))


@pytest.mark.parametrize("column_type, value, param", [
    ("bigint", "9000000000", "09000000000"),
    ("text", "Tienda Centro", "Tienda Centro"),
    ("uuid", "0e9f7a52-3d5c-4c1e-9a51-1b0f6c1a2b3c", "0E9F7A52-3D5C-4C1E-9A51-1B0F6C1A2B3C"),
])
def test_a_route_matches_its_parameter_as_the_filter_compares_it(hq, tmp_path, monkeypatch, column_type, value,
                                                                  param):
    """A route is the column's text; the branch's is its parameter cast to the column's type,
    so a parameter spelled otherwise (leading zero, upper-case uuid) still finds its rows."""
    monkeypatch.setenv("REPLICATOR_HQ_DSN", hq.dsn)
    hq.execute(f"CREATE TABLE shelves (id int PRIMARY KEY, store_id {column_type} NOT NULL, backup_store int "
               "NOT NULL DEFAULT 0, qty int NOT NULL DEFAULT 0)")
    name = f"typed-{column_type}-{time.monotonic_ns() % 100000}"
    cfg = shelves_yaml(tmp_path, "store_id = :store")
    try:
        with hq.connect() as conn:
            install(conn, cfg)
            add_branch(conn, cfg, name, {"store": param}, "pw")
        hq.execute("INSERT INTO shelves (id, store_id) VALUES (1, %s)", (value,))
        tid = hq.scalar("SELECT id FROM replication.tables WHERE table_name = 'shelves'")
        with psycopg.connect(hq.cluster.dsn(hq.name, role_name(name), "pw"), autocommit=True) as conn:
            (routes,) = conn.execute("SELECT replication.branch_routes()").fetchone()
            assert routes == [hq.scalar("SELECT route FROM replication.change_log WHERE table_id = %s", (tid,))]
            assert conn.execute("SELECT count(*) FROM replication.change_log").fetchone()[0] == 1
    finally:
        with hq.connect() as conn:
            if conn.execute("SELECT FROM pg_roles WHERE rolname = %s", (role_name(name),)).fetchone():
                conn.execute(psycopg.sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(
                    psycopg.sql.Identifier(role_name(name))))
