"""Nothing is missed, whatever the commit order of concurrent HQ transactions.

Log ids are drawn when a transaction writes, not when it commits, so a
reader that keeps "the highest id seen" skips a transaction that wrote early
and committed late.  These tests hold such transactions open across
catch-ups on purpose, then let many writers race while the branch catches
up again and again.
"""
from __future__ import annotations

import os
import random
import threading
import time

import psycopg
import pytest

from replicator import state
from replicator.stream import CATALOGS as STREAM
from tests.harness import assert_same, make_setup

SCHEMA = """
CREATE TABLE t1 (id int PRIMARY KEY, v int NOT NULL, note text);
CREATE TABLE t2 (id int PRIMARY KEY, v int NOT NULL, note text);
CREATE TABLE t3 (a int, b int, v int NOT NULL, PRIMARY KEY (a, b));
"""
TABLES = ["public.t1", "public.t2", "public.t3"]
CATALOGS = {"cat": {"label": "Cat", "default": True, "tables": TABLES}}


@pytest.fixture
def env(tmp_path, hq, branch_a):
    setup = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    branch = setup.add_branch("order", branch_a)
    branch.init()
    return hq, branch_a, branch


def ids(db, table: str = "t1") -> list[int]:
    return [r[0] for r in db.execute(f"SELECT id FROM {table} ORDER BY id")]


def log_id(hq, row_id: int) -> int:
    return hq.scalar("SELECT max(id) FROM replication.change_log WHERE row->>'id' = %s", (str(row_id),))


def write(hq, statement: str) -> None:
    hq.execute(statement)


# ------------------------------------------------------------------ deterministic

def test_early_writer_committing_late_is_not_skipped(env):
    """A takes the LOWEST log id, B and C commit after it; A commits after a catch-up."""
    hq, db, branch = env
    with hq.connect(autocommit=False) as a:
        a.execute("INSERT INTO t1 VALUES (1, 1, 'A')")
        write(hq, "INSERT INTO t1 VALUES (2, 2, 'B')")
        write(hq, "INSERT INTO t1 VALUES (3, 3, 'C')")
        a_id = a.execute("SELECT max(id) FROM replication.change_log WHERE row->>'id' = '1'").fetchone()[0]
        assert a_id < log_id(hq, 2) < log_id(hq, 3)             # the case that breaks id > last_id
        assert branch.run_once() == 0
        assert ids(db) == [2, 3]
        assert branch.run_once() == 0                          # a second catch-up while A is open
        assert ids(db) == [2, 3]
        a.commit()
    assert branch.run_once() == 0
    assert ids(db) == [1, 2, 3]
    assert_same(hq, db, "t1")


def test_open_transaction_writing_between_others(env):
    """A begins, B commits, A writes, C commits: catch up; then A commits and D commits."""
    hq, db, branch = env
    with hq.connect(autocommit=False) as a:
        a.execute("SELECT txid_current()")                     # A has an xid before B
        write(hq, "INSERT INTO t1 VALUES (2, 2, 'B')")
        a.execute("INSERT INTO t1 VALUES (1, 1, 'A')")
        a.execute("UPDATE t2 SET v = 0")                        # no rows: nothing logged
        write(hq, "INSERT INTO t1 VALUES (3, 3, 'C')")
        assert branch.run_once() == 0
        assert ids(db) == [2, 3]
        a.execute("INSERT INTO t2 VALUES (10, 10, 'A, later statement')")
        a.commit()
    write(hq, "INSERT INTO t1 VALUES (4, 4, 'D')")
    assert branch.run_once() == 0
    assert ids(db) == [1, 2, 3, 4]
    assert ids(db, "t2") == [10]
    assert_same(hq, db, "t1")
    assert_same(hq, db, "t2")


def test_open_transaction_that_rolls_back_never_arrives(env):
    hq, db, branch = env
    with hq.connect(autocommit=False) as a:
        a.execute("INSERT INTO t1 VALUES (1, 1, 'A')")
        write(hq, "INSERT INTO t1 VALUES (2, 2, 'B')")
        assert branch.run_once() == 0
        a.rollback()
    write(hq, "INSERT INTO t1 VALUES (3, 3, 'C')")
    assert branch.run_once() == 0
    assert ids(db) == [2, 3]
    assert_same(hq, db, "t1")


def test_many_open_transactions_commit_in_reverse_order(env):
    """Five transactions write in order 1..5, commit in order 5..1, with catch-ups in between."""
    hq, db, branch = env
    conns = [hq.connect(autocommit=False) for _ in range(5)]
    try:
        for i, c in enumerate(conns, start=1):
            c.execute("INSERT INTO t1 VALUES (%s, %s, 'open')", (i, i))
        for i in range(5, 0, -1):
            conns[i - 1].commit()
            assert branch.run_once() == 0
            assert ids(db) == list(range(i, 6))
    finally:
        for c in conns:
            c.close()
    assert_same(hq, db, "t1")


# ------------------------------------------------------------------ randomized

SEED = int(os.environ.get("REPLICATOR_TEST_SEED", "20240611"))
WRITERS = 8
DURATION = 15.0          # seconds of concurrent writing
KEYS = 150               # few keys: writers collide, wait on each other, deadlock, roll back


class Writer(threading.Thread):
    """Random transactions of 1..8 statements with pauses; commit or roll back at random."""

    def __init__(self, dsn: str, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.dsn, self.rng, self.stop = dsn, random.Random(seed), stop
        self.commits = self.rollbacks = self.errors = 0
        self.failure: BaseException | None = None

    def statement(self) -> tuple[str, tuple]:
        r, k = self.rng, self.rng.randrange(1, KEYS)
        table = r.choice(["t1", "t2"])
        kind = r.random()
        if kind < 0.3:
            return f"INSERT INTO {table} VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", \
                (k, r.randrange(1000), f"w{self.name}")
        if kind < 0.4:
            return f"INSERT INTO {table} VALUES (%s, %s, 'plain insert')", (k, r.randrange(1000))
        if kind < 0.6:
            return f"UPDATE {table} SET v = v + 1, note = %s WHERE id BETWEEN %s AND %s", \
                (f"range by {self.name}", k, k + r.randrange(5))
        if kind < 0.7:
            return f"DELETE FROM {table} WHERE id = %s", (k,)
        if kind < 0.75:
            return f"UPDATE {table} SET id = id + 1000 WHERE id = %s", (k,)     # key change
        if kind < 0.9:
            return "INSERT INTO t3 VALUES (%s, %s, 1) ON CONFLICT (a, b) DO UPDATE SET v = t3.v + 1", \
                (k % 10, k % 7)
        return "DELETE FROM t3 WHERE a = %s", (k % 10,)

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=False) as conn:
                conn.execute("SET lock_timeout = '2s'")
                conn.commit()
                while not self.stop.is_set():
                    self.transaction(conn)
        except BaseException as e:  # reported by the test, never swallowed
            self.failure = e

    def transaction(self, conn: psycopg.Connection) -> None:
        r = self.rng
        long = r.random() < 0.15                    # some stay open across several catch-ups
        try:
            for _ in range(r.randint(1, 8)):
                conn.execute(*self.statement())
                time.sleep(r.uniform(0.1, 0.4) if long else r.uniform(0, 0.02))
        except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected,
                psycopg.errors.LockNotAvailable):
            self.errors += 1
            conn.rollback()
            return
        if r.random() < 0.2:
            conn.rollback()
            self.rollbacks += 1
        else:
            conn.commit()
            self.commits += 1


def test_random_concurrent_writers_and_catch_ups(env):
    hq, db, branch = env
    master = random.Random(SEED)
    stop = threading.Event()
    writers = [Writer(hq.dsn, master.randrange(2**32), stop) for _ in range(WRITERS)]
    for w in writers:
        w.start()
    catch_ups = 0
    deadline = time.monotonic() + DURATION
    try:
        while time.monotonic() < deadline:
            assert branch.run_once() == 0
            catch_ups += 1
            time.sleep(master.uniform(0, 0.3))
    finally:
        stop.set()
        for w in writers:
            w.join(30)
    failures = [w.failure for w in writers if w.failure]
    assert not failures, f"seed {SEED}: a writer failed: {failures[0]!r}"
    commits = sum(w.commits for w in writers)
    summary = (f"seed {SEED}: {commits} commits, {sum(w.rollbacks for w in writers)} rollbacks, "
               f"{sum(w.errors for w in writers)} failed transactions, {catch_ups} catch-ups")
    print(summary)
    assert commits > 100 and catch_ups >= 10, summary

    assert branch.run_once() == 0
    try:
        for table in TABLES:
            assert_same(hq, db, table)
    except AssertionError as e:
        raise AssertionError(f"{summary}: {e}") from None
    with db.connect() as conn:
        pos = state.load_position(conn, STREAM)
    logged = hq.scalar("SELECT count(*) FROM replication.change_log")
    assert pos.applied_changes == logged, f"{summary}: applied {pos.applied_changes} of {logged} changes"
