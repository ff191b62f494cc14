"""Through PgBouncer in transaction pooling (issue 20, point 2): two branches whose HQ DSN
points at a real PgBouncer init, run, verify and report status, with their consecutive
transactions landing on different server connections, so nothing may rely on session
state on HQ (session SETs, prepared statements, advisory locks, LISTEN)."""
from __future__ import annotations

import time
import uuid

import psycopg
import pytest
import yaml
from psycopg import sql

from harness import Branch, make_setup, table_rows
from replicator.hq import add_branch
from replicator.bench.pgbouncer import PgBouncer
from test_daemon import daemon, wait_until

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(12,2));
CREATE TABLE stock (store_id int, item_id int, qty int NOT NULL, PRIMARY KEY (store_id, item_id));
"""
CATALOGS = {"items": {"label": "Items", "default": True, "tables": ["public.items"]},
            "stock": {"label": "Stock", "default": True, "tables": ["public.stock"],
                      "filter": "store_id = :store_id"}}


@pytest.fixture
def pooled(tmp_path, hq, branch_a, branch_b):
    """Two branches (stores 1 and 2) whose HQ connections go through one PgBouncer."""
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a, branch_b])
    hq.execute("INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 100) g;"
               "INSERT INTO stock SELECT s, i, 10 FROM generate_series(1, 2) s, generate_series(1, 100) i")
    names = {f"pool-{uuid.uuid4().hex[:6]}": (branch_a, 1), f"pool-{uuid.uuid4().hex[:6]}": (branch_b, 2)}
    users = {}
    with hq.connect() as conn:
        for name, (_db, store) in names.items():
            password = uuid.uuid4().hex
            reg = add_branch(conn, s.hq_cfg, name, {"store_id": str(store)}, password=password)
            users[reg.role] = password
    bouncer = PgBouncer(hq.cluster.port, users).start()
    branches = []
    for (name, (db, store)), role in zip(names.items(), users):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"branch": name, "source": {"dsn": bouncer.dsn(hq.name, role)},
                                        "target": {"dsn": db.dsn}, "poll_interval": "50ms"}))
        branches.append((Branch(name, db, path), store))
    try:
        yield hq, bouncer, branches
    finally:
        bouncer.stop()
        for role in users:
            try:
                hq.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                hq.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
            except psycopg.Error:
                pass


def _same(hq, b: Branch, store: int) -> bool:
    return (table_rows(hq, "items") == table_rows(b.db, "items")
            and table_rows(hq, "stock", where=f"store_id = {store}") == table_rows(b.db, "stock"))


def test_branches_replicate_through_pgbouncer_in_transaction_pooling(pooled):
    hq, bouncer, branches = pooled
    for b, _ in branches:
        r = b.cli("init")
        assert r.returncode == 0, r.stderr + bouncer.log()[-2000:]
    a, b_ = branches
    with daemon(a[0]) as da, daemon(b_[0]) as db_:
        da.wait_for("replicating 2 tables")
        db_.wait_for("replicating 2 tables")
        for i in range(30):          # many small transactions: many probes, windows and acks
            hq.execute("UPDATE items SET price = price + 1 WHERE id = %s", (i + 1,))
            hq.execute("UPDATE stock SET qty = qty - 1 WHERE item_id = %s", (i + 1,))
            if i % 10 == 0:
                hq.execute("INSERT INTO items SELECT g, 'bulk ' || g, 1 FROM generate_series(%s::int, %s::int) g",
                           (1000 + i * 100, 1000 + i * 100 + 99))
            time.sleep(0.05)
        hq.execute("UPDATE items SET id = id + 100000 WHERE id <= 5")
        for (br, store), d in zip(branches, (da, db_)):
            try:
                wait_until(lambda: _same(hq, br, store), 30, f"{br.name} equals HQ through PgBouncer")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{d.log[-3000:]}\n{bouncer.log()[-2000:]}") from None
        # while both run: status and verify share the pools with the running replicators
        for br, _ in branches:
            r = br.cli("status")
            assert r.returncode == 0 and "catalogs are up to date" in r.stdout, r.stdout + r.stderr
            r = br.cli("verify")
            assert r.returncode == 0, r.stdout + r.stderr
        served = hq.scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = ANY(%s)", (list(bouncer.users),))
        assert served <= 2 * len(bouncer.users), served          # the pools' server connections, no more
        assert da.signal() < 5 and db_.signal() < 5
    for d in (da, db_):
        assert d.proc.returncode == 0, d.log
        assert "Traceback" not in d.log and "prepared statement" not in d.log, d.log
