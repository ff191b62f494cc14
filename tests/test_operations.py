"""Every kind of change made on HQ arrives on the branch with the same effect.

Each scenario writes on HQ (real SQL, as an application would), catches the
branch up with `run --once` and compares every replicated table row for row
(text forms).  Several scenarios are built to hit the set-based apply where
it is weakest: many changes of one key inside a window, primary keys that
move, TRUNCATE as a barrier, foreign keys, and a unique constraint that only
holds in HQ's statement order (the row-by-row fallback).
"""
from __future__ import annotations

import logging

import psycopg
import pytest

from replicator import state
from replicator.session import Session
from replicator.reader import current_snapshot
from replicator.stream import CATALOGS as STREAM
from tests.harness import assert_same, make_setup

SCHEMA = """
CREATE TABLE parent (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE child (id int PRIMARY KEY,
                    parent_id int NOT NULL REFERENCES parent (id) ON DELETE CASCADE,
                    note text);
CREATE TABLE item (id int PRIMARY KEY, code text NOT NULL UNIQUE, qty int, note text);
CREATE TABLE pair (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE secret (id int PRIMARY KEY, v text);
"""
# One statement may move many primary keys at once only when HQ checks the key
# at the end of the statement; a branch needs a plain key (ON CONFLICT arbiter).
HQ_ONLY = "CREATE TABLE ring (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, v text UNIQUE DEFERRABLE INITIALLY IMMEDIATE)"
BRANCH_ONLY = "CREATE TABLE ring (id int PRIMARY KEY, v text UNIQUE)"

MAIN = ["public.parent", "public.child", "public.item", "public.pair", "public.ring"]
CATALOGS = {
    "main": {"label": "Main", "default": True, "tables": MAIN},
    "other": {"label": "Other", "default": False, "tables": ["public.secret"]},
}


class Env:
    def __init__(self, hq, branch_db, branch):
        self.hq, self.db, self.branch = hq, branch_db, branch

    def sync(self) -> int:
        """Catch up, then HQ and branch must be identical; unselected tables stay empty."""
        before = state_position(self.db).applied_changes
        assert self.branch.run_once() == 0
        for table in MAIN:
            assert_same(self.hq, self.db, table)
        assert self.db.scalar("SELECT count(*) FROM secret") == 0
        pos = state_position(self.db)
        assert pos.window_snapshot is None and pos.window_last_id == 0
        return pos.applied_changes - before

    def log_count(self) -> int:
        return self.hq.scalar("SELECT count(*) FROM replication.change_log")

    def hq_run(self, *statements: str) -> None:
        """Run statements in one HQ transaction."""
        with self.hq.connect(autocommit=False) as conn:
            for s in statements:
                conn.execute(s)


def state_position(db) -> state.Position:
    with db.connect() as conn:
        return state.load_position(conn, STREAM)


def make_env(tmp_path, hq, branch_db, **branch_kw) -> Env:
    hq.execute(HQ_ONLY)
    branch_db.execute(BRANCH_ONLY)
    setup = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_db])
    b = setup.add_branch("ops", branch_db, catalogs=["main"], **branch_kw)
    b.init()
    return Env(hq, branch_db, b)


@pytest.fixture
def env(tmp_path, hq, branch_a) -> Env:
    return make_env(tmp_path, hq, branch_a)


def seed(env: Env, n: int = 20) -> None:
    env.hq.execute(f"INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, {n}) g")
    env.hq.execute(f"INSERT INTO child SELECT g, g, 'c' || g FROM generate_series(1, {n}) g")
    env.hq.execute(f"INSERT INTO item SELECT g, 'code-' || g, g * 10, NULL FROM generate_series(1, {n}) g")
    env.hq.execute(f"INSERT INTO pair SELECT g, 'k' || (g % 3), 'v' || g FROM generate_series(1, {n}) g")
    env.hq.execute(f"INSERT INTO ring SELECT g, 'r' || g FROM generate_series(1, {n}) g")


# ------------------------------------------------------------------ basics

def test_insert_update_delete(env):
    seed(env)
    assert env.sync() == 5 * 20
    assert env.db.scalar("SELECT count(*) FROM item") == 20
    env.hq.execute("UPDATE item SET qty = qty + 1, note = 'n' || id WHERE id % 2 = 0")
    env.hq.execute("DELETE FROM item WHERE id > 15")
    env.hq.execute("UPDATE pair SET v = upper(v) WHERE b = 'k1'")
    env.hq.execute("DELETE FROM pair WHERE a = 3")
    env.hq.execute("INSERT INTO item VALUES (100, 'new', NULL, 'fresh')")
    env.sync()
    assert env.db.scalar("SELECT note FROM item WHERE id = 100") == "fresh"
    assert env.db.scalar("SELECT count(*) FROM item WHERE id > 15 AND id < 100") == 0


def test_no_op_update_logs_nothing(env):
    seed(env)
    env.sync()
    before = env.log_count()
    env.hq.execute("UPDATE item SET qty = qty, note = note")
    env.hq.execute("UPDATE pair SET v = v WHERE a < 10")
    assert env.log_count() == before
    env.hq.execute("UPDATE item SET qty = qty + 0 WHERE id = 1")   # still the same row image
    assert env.log_count() == before
    env.hq.execute("UPDATE item SET qty = -1 WHERE id = 1")
    assert env.log_count() == before + 1
    env.sync()


def test_primary_key_change_shift_and_swap(env):
    seed(env, 0)
    # Inserted in descending order so that HQ's seq scan moves the highest key first.
    env.hq.execute("INSERT INTO item SELECT g, 'code-' || g, g, NULL FROM generate_series(500, 1, -1) g")
    env.hq.execute("INSERT INTO pair VALUES (1, 'x', 'one'), (2, 'y', 'two')")
    env.hq.execute("INSERT INTO ring SELECT g, 'r' || g FROM generate_series(1, 300) g")
    env.sync()

    env.hq.execute("UPDATE item SET id = id + 1")                 # every key moves up by one
    env.hq.execute("UPDATE ring SET id = id + 1")                 # deferrable key on HQ
    env.hq.execute("UPDATE pair SET b = 'z' WHERE a = 1")        # one column of a composite key
    env.sync()
    assert env.db.scalar("SELECT min(id) FROM item") == 2
    assert env.db.scalar("SELECT count(*) FROM ring") == 300

    # A swap of two keys: in three statements on a plain key, in one on a deferrable key.
    env.hq_run("UPDATE item SET id = -1 WHERE id = 2",
               "UPDATE item SET id = 2 WHERE id = 3",
               "UPDATE item SET id = 3 WHERE id = -1")
    env.hq.execute("UPDATE ring SET id = CASE id WHEN 2 THEN 3 ELSE 2 END WHERE id IN (2, 3)")
    env.hq.execute("UPDATE ring SET id = 302 - id")               # reverse all keys in one statement
    env.hq.execute("UPDATE pair SET (a, b) = (2, 'x') WHERE a = 1")    # both key columns at once
    env.sync()
    assert env.db.scalar("SELECT code FROM item WHERE id = 2") == "code-2"


def test_primary_key_moves_back_and_forth_in_one_window(env):
    seed(env)
    env.sync()
    env.hq.execute("UPDATE item SET id = 1000 WHERE id = 1")
    env.hq.execute("UPDATE item SET id = 1 WHERE id = 1000")
    env.hq.execute("UPDATE item SET id = 2000, note = 'moved' WHERE id = 2")
    env.hq.execute("INSERT INTO item VALUES (2, 'code-2b', 0, 're-used key')")
    env.hq_run("DELETE FROM child WHERE parent_id > 15", "UPDATE parent SET id = id + 100 WHERE id > 15")
    env.sync()


# ------------------------------------------------------------------ one key, many changes

def test_row_updated_many_times_in_one_window(env):
    seed(env)
    env.sync()
    for i in range(60):
        env.hq.execute("UPDATE item SET qty = %s, note = %s WHERE id = 7", (i, f"step {i}"))
    env.hq_run(*[f"UPDATE item SET qty = qty + 1 WHERE id = 8" for _ in range(40)])
    env.sync()
    assert env.db.scalar("SELECT qty FROM item WHERE id = 7") == 59
    assert env.db.scalar("SELECT qty FROM item WHERE id = 8") == 120


def test_delete_then_reinsert_same_key_in_one_window(env):
    seed(env)
    env.sync()
    env.hq.execute("DELETE FROM item WHERE id = 5")
    env.hq.execute("INSERT INTO item VALUES (5, 'code-5', -5, 'again')")
    env.hq_run("DELETE FROM item WHERE id = 6", "INSERT INTO item VALUES (6, 'code-6', -6, 'same xact')")
    # insert, delete, insert, delete: the key must end up absent
    env.hq.execute("INSERT INTO item VALUES (300, 'c300', 1, NULL)")
    env.hq.execute("DELETE FROM item WHERE id = 300")
    env.hq.execute("INSERT INTO item VALUES (300, 'c300', 2, NULL)")
    env.hq.execute("DELETE FROM item WHERE id = 300")
    # delete and re-insert the whole table's worth of keys
    env.hq_run("DELETE FROM pair", "INSERT INTO pair VALUES (1, 'k1', 'back')")
    env.sync()
    assert env.db.scalar("SELECT note FROM item WHERE id = 5") == "again"
    assert env.db.scalar("SELECT count(*) FROM item WHERE id = 300") == 0


def test_insert_of_a_key_the_branch_already_has_is_repaired(env, caplog):
    """HQ inserts are applied with a plain INSERT (the key cannot exist on an in-step branch);
    a branch that holds the key anyway (a row left behind, say after HQ lost transactions in
    a crash) ends equal to HQ, through the delete + insert path."""
    seed(env, 3)
    env.sync()
    caplog.set_level(logging.INFO, logger="replicator.apply")
    with env.db.connect() as conn:      # the replicator's own bypass of the read-only guard
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO item VALUES (7, 'stale', 70, 'left behind')")
    env.hq.execute("INSERT INTO item VALUES (7, 'code-7', 7, 'from HQ'), (8, 'code-8', 8, NULL)")
    env.sync()
    assert env.db.execute("SELECT id, code, note FROM item WHERE id > 6 ORDER BY id") == \
        [(7, "code-7", "from HQ"), (8, "code-8", None)]
    assert any("re-applying" in r.getMessage() for r in caplog.records)
    assert_same(env.hq, env.db, "item")


# ------------------------------------------------------------------ TRUNCATE

def test_truncate_replayed(env):
    seed(env)
    env.sync()
    env.hq.execute("TRUNCATE pair")
    env.sync()
    assert env.db.scalar("SELECT count(*) FROM pair") == 0

    # TRUNCATE followed by inserts (and preceded by updates) in one window and one transaction
    env.hq.execute("INSERT INTO pair VALUES (1, 'a', 'before')")
    env.hq_run("UPDATE pair SET v = 'changed'", "TRUNCATE pair",
               "INSERT INTO pair VALUES (2, 'b', 'after'), (1, 'a', 'after too')")
    env.hq.execute("INSERT INTO pair VALUES (3, 'c', 'later')")
    env.sync()
    assert env.db.scalar("SELECT count(*) FROM pair") == 3


def test_truncate_of_table_referenced_by_foreign_key(env):
    seed(env)
    env.sync()
    # parent is referenced by child: HQ needs CASCADE, the branch cannot TRUNCATE it either
    env.hq.execute("TRUNCATE parent CASCADE")
    env.sync()
    assert env.db.scalar("SELECT count(*) FROM parent") == 0
    assert env.db.scalar("SELECT count(*) FROM child") == 0

    env.hq_run("INSERT INTO parent VALUES (1, 'p1'), (2, 'p2')", "INSERT INTO child VALUES (1, 1, 'c')")
    env.hq_run("TRUNCATE child, parent", "INSERT INTO parent VALUES (3, 'p3')",
               "INSERT INTO child VALUES (7, 3, 'after truncate')")
    env.hq.execute("TRUNCATE child")
    env.hq.execute("INSERT INTO child VALUES (8, 3, 'only child')")
    env.sync()
    assert env.db.scalar("SELECT count(*) FROM child") == 1


# ------------------------------------------------------------------ foreign keys

def test_parent_and_child_rows(env):
    env.hq_run("INSERT INTO parent VALUES (1, 'p1')", "INSERT INTO child VALUES (1, 1, 'c1')")
    env.sync()
    # child first, then parent, in one window (separate transactions)
    env.hq.execute("INSERT INTO parent VALUES (2, 'p2')")
    env.hq.execute("INSERT INTO child VALUES (2, 2, 'c2'), (3, 2, 'c3')")
    # parent and child inserted, then the parent deleted (cascading to its children), one window
    env.hq.execute("INSERT INTO parent VALUES (4, 'p4')")
    env.hq.execute("INSERT INTO child VALUES (4, 4, 'c4')")
    env.hq.execute("DELETE FROM parent WHERE id = 4")
    # a child moves to another parent, then its old parent goes
    env.hq.execute("UPDATE child SET parent_id = 2 WHERE id = 1")
    env.hq.execute("DELETE FROM parent WHERE id = 1")
    # parent deleted with its child in one transaction, then re-created with new children
    env.hq_run("DELETE FROM child WHERE parent_id = 2", "DELETE FROM parent WHERE id = 2",
               "INSERT INTO parent VALUES (2, 'p2 again')", "INSERT INTO child VALUES (9, 2, 'c9')")
    env.sync()
    assert env.db.execute("SELECT id, parent_id FROM child ORDER BY id") == [(9, 2)]
    orphans = env.db.scalar("SELECT count(*) FROM child c WHERE NOT EXISTS "
                            "(SELECT FROM parent p WHERE p.id = c.parent_id)")
    assert orphans == 0


# ------------------------------------------------------------------ unique constraints

def test_unique_value_swapped_between_rows(env, caplog):
    """Set-based, the reduced chunk upserts row 2 (code-1) before row 1 moves off code-1."""
    seed(env, 3)
    env.sync()
    caplog.set_level(logging.INFO, logger="replicator.apply")
    env.hq_run("UPDATE item SET code = 'tmp' WHERE id = 1",
               "UPDATE item SET code = 'code-1' WHERE id = 2",
               "UPDATE item SET code = 'code-2' WHERE id = 1")
    env.sync()
    assert env.db.execute("SELECT id, code FROM item ORDER BY id")[:2] == [(1, "code-2"), (2, "code-1")]
    assert any("re-applying" in r.getMessage() for r in caplog.records), \
        "the swap should have needed the fallback of the set-based apply"
    # the same swap in separate transactions, plus a value handed along a chain of rows
    env.hq.execute("UPDATE item SET code = 'tmp' WHERE id = 3")
    env.hq.execute("UPDATE item SET code = 'code-3' WHERE id = 1")
    env.hq.execute("UPDATE item SET code = 'code-2' WHERE id = 3")
    env.hq.execute("DELETE FROM item WHERE id = 2")
    env.hq.execute("INSERT INTO item VALUES (4, 'code-1', 0, 'takes a freed value')")
    env.sync()


# ------------------------------------------------------------------ transactions

def test_multi_statement_transactions_and_savepoints(env):
    seed(env, 5)
    env.sync()
    before = env.log_count()
    with env.hq.connect(autocommit=False) as conn:
        conn.execute("INSERT INTO item VALUES (10, 'kept-1', 1, NULL)")
        conn.execute("SAVEPOINT s1")
        conn.execute("INSERT INTO item VALUES (11, 'rolled-back', 1, NULL)")
        conn.execute("UPDATE item SET note = 'rolled back' WHERE id = 1")
        conn.execute("DELETE FROM item WHERE id = 2")
        conn.execute("ROLLBACK TO SAVEPOINT s1")
        conn.execute("UPDATE item SET note = 'kept' WHERE id = 3")
        with conn.transaction():                 # psycopg savepoint, released
            conn.execute("INSERT INTO item VALUES (12, 'kept-2', 1, NULL)")
        try:
            with conn.transaction():             # psycopg savepoint, rolled back by an error
                conn.execute("INSERT INTO item VALUES (13, 'rolled-back-2', 1, NULL)")
                conn.execute("INSERT INTO item VALUES (14, 'kept-1', 1, NULL)")   # unique violation
        except psycopg.errors.UniqueViolation:
            pass
        conn.execute("INSERT INTO pair VALUES (9, 'z', 'same transaction')")
    # rolled-back subtransactions leave nothing in the log
    rows = env.hq.execute("SELECT row->>'id' FROM replication.change_log ORDER BY id OFFSET %s", (before,))
    assert sorted(r[0] for r in rows if r[0] is not None) == ["10", "12", "3"]
    env.sync()
    assert env.db.scalar("SELECT count(*) FROM item WHERE id IN (11, 13, 14)") == 0
    assert env.db.scalar("SELECT count(*) FROM item WHERE id = 2") == 1
    assert env.db.scalar("SELECT note FROM item WHERE id = 1") is None

    # a rolled-back top-level transaction never arrives
    with env.hq.connect(autocommit=False) as conn:
        conn.execute("INSERT INTO item VALUES (20, 'never', 1, NULL)")
        conn.rollback()
    env.sync()
    assert env.db.scalar("SELECT count(*) FROM item WHERE id = 20") == 0


def test_insert_on_conflict_do_update(env):
    seed(env, 5)
    env.sync()
    env.hq.execute("""INSERT INTO item VALUES (1, 'code-1', 111, 'upserted'), (6, 'code-6', 6, 'inserted')
                      ON CONFLICT (id) DO UPDATE SET qty = EXCLUDED.qty, note = EXCLUDED.note""")
    env.hq.execute("""INSERT INTO item VALUES (2, 'code-2', 2, 'ignored') ON CONFLICT DO NOTHING""")
    env.hq.execute("""INSERT INTO pair VALUES (1, 'k1', 'upd'), (100, 'new', 'ins')
                      ON CONFLICT (a, b) DO UPDATE SET v = EXCLUDED.v || '!'""")
    # an upsert that changes nothing still must not diverge
    env.hq.execute("""INSERT INTO item VALUES (3, 'code-3', 30, NULL)
                      ON CONFLICT (id) DO UPDATE SET qty = EXCLUDED.qty""")
    env.sync()
    assert env.db.scalar("SELECT note FROM item WHERE id = 1") == "upserted"
    assert env.db.scalar("SELECT v FROM pair WHERE a = 1 AND b = 'k1'") == "upd!"


# ------------------------------------------------------------------ selection

def test_unselected_catalog_never_reaches_the_branch(env):
    seed(env, 5)
    env.hq.execute("INSERT INTO secret SELECT g, 's' || g FROM generate_series(1, 50) g")
    env.hq.execute("UPDATE secret SET v = 'x' WHERE id < 10")
    env.hq.execute("DELETE FROM secret WHERE id > 40")
    env.hq.execute("TRUNCATE secret")
    env.hq.execute("INSERT INTO secret VALUES (1, 'again')")
    secret_id = env.hq.scalar("SELECT id FROM replication.tables WHERE table_name = 'secret'")
    assert env.hq.scalar("SELECT count(*) FROM replication.change_log WHERE table_id = %s", (secret_id,)) > 50

    # the reader filters on HQ: not one row of the unselected table crosses the network
    session = Session(env.branch.cfg)
    session.open()
    try:
        pos = state.load_position(session.target, STREAM)
        cur = current_snapshot(session.source)
        rows = [r for chunk in session.reader.window(session.source, pos.snapshot, cur) for r in chunk]
    finally:
        session.close()
    assert rows, "the window should hold the main catalog's changes"
    assert {r[1] for r in rows} == set(env.hq.scalar(
        "SELECT array_agg(DISTINCT table_id) FROM replication.change_log WHERE table_id <> %s", (secret_id,)))
    assert secret_id not in {r[1] for r in rows}

    env.sync()            # also asserts the branch's secret table is still empty


# ------------------------------------------------------------------ chunk boundaries

def test_everything_again_with_tiny_chunks(tmp_path, hq, branch_b, caplog):
    """batch_rows=3: windows are applied in many chunks that cut transactions and statements."""
    caplog.set_level(logging.INFO, logger="replicator.session")
    env = make_env(tmp_path, hq, branch_b, batch_rows=3)
    seed(env, 30)
    env.hq.execute("UPDATE item SET id = id + 1000 WHERE id > 25")
    env.hq_run("UPDATE item SET code = 'tmp' WHERE id = 1",
               "UPDATE item SET code = 'code-1' WHERE id = 2",
               "UPDATE item SET code = 'code-2' WHERE id = 1")
    for i in range(10):
        env.hq.execute("UPDATE item SET qty = %s WHERE id = 3", (i,))
    env.hq_run("DELETE FROM item WHERE id = 4", "INSERT INTO item VALUES (4, 'code-4', 44, 'back')")
    env.hq_run("TRUNCATE pair", "INSERT INTO pair VALUES (1, 'a', 'x'), (2, 'b', 'y')")
    env.hq.execute("DELETE FROM parent WHERE id > 20")          # cascades to child
    env.hq.execute("UPDATE ring SET v = 'r' || (31 - id)")   # unique v moves along rows across chunks
    env.hq.execute("UPDATE ring SET id = 31 - id")   # every key moves: deletes of the old keys, then upserts
    applied = env.sync()
    assert any("together with the next chunk" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records][-60:]
    assert applied > 100
    pos = state_position(env.db)
    assert pos.applied_changes == env.log_count()
