"""SIGKILL at any instant neither loses nor double-applies anything.

A large backlog is queued on HQ, then the real `replicator run` process is
started and SIGKILLed again and again at random moments (while it imports,
connects, reads, or holds a half-applied chunk open on the branch), with HQ
writing more in between.  At the end a catch-up must leave the branch equal
to HQ, and the position must have counted every change exactly once.
"""
from __future__ import annotations

import os
import random
import subprocess
import time

import pytest

from replicator import state
from replicator.stream import CATALOGS as STREAM
from tests.harness import assert_same, make_setup

SCHEMA = """
CREATE TABLE a (id int PRIMARY KEY, v int NOT NULL, note text, updated timestamptz);
CREATE TABLE b (id int PRIMARY KEY, grp int NOT NULL, payload jsonb, tags text[]);
"""
TABLES = ["public.a", "public.b"]
CATALOGS = {"crash": {"label": "Crash", "default": True, "tables": TABLES}}

# One transaction of ~1000 changes on table a or b: 400 inserts, 500 updates (of recent
# rows, so many rows change twice), 100 deletes, and a few primary-key changes.  Every
# tenth transaction updates 1,600 rows of a instead of 500: a bulk statement, whose
# images are logged 1,000 to a log row, so chunks and kills also fall inside those.
CHURN = """
CREATE PROCEDURE churn(first int, n int) LANGUAGE plpgsql AS $$
DECLARE
    base int;
BEGIN
    FOR i IN first .. first + n - 1 LOOP
        base := (i / 2) * 400;
        IF i % 2 = 0 THEN
            INSERT INTO a SELECT base + g, g, md5((base + g)::text), now() FROM generate_series(1, 400) g;
            UPDATE a SET v = v + 1, note = note || '+', updated = now()
             WHERE id BETWEEN base - CASE WHEN i % 10 = 0 THEN 1600 ELSE 500 END AND base - 1;
            DELETE FROM a WHERE id BETWEEN base - 800 AND base - 701;
            UPDATE a SET id = id + 10000000 WHERE id BETWEEN base - 1000 AND base - 996;
        ELSE
            INSERT INTO b SELECT base + g, g % 7, jsonb_build_object('i', i, 'g', g), ARRAY[i::text, 'x']
              FROM generate_series(1, 400) g;
            UPDATE b SET grp = grp + 1, payload = payload || jsonb_build_object('u', i)
             WHERE id BETWEEN base - 500 AND base - 1;
            DELETE FROM b WHERE id BETWEEN base - 800 AND base - 701;
            UPDATE b SET id = id + 10000000 WHERE id BETWEEN base - 1000 AND base - 996;
        END IF;
        COMMIT;
    END LOOP;
END $$;
"""
SEED = int(os.environ.get("REPLICATOR_TEST_SEED", "20240611"))
TRANSACTIONS = 200       # x ~1000 changes
KILLS = 24


def app_backends(monitor, pid: int) -> list[bool]:
    """For each branch backend of replicator process `pid`: does it hold uncommitted writes?"""
    return [r[0] for r in monitor.execute(
        "SELECT backend_xid IS NOT NULL FROM pg_stat_activity WHERE application_name = %s",
        (f"replicator run crash pid {pid}",))]


def applied(monitor) -> int:
    return monitor.execute("SELECT applied_changes FROM replication.position").fetchone()[0]


def logged_changes(hq) -> int:
    """Changes in HQ's log: a bulk statement's log row holds many."""
    return hq.scalar("SELECT sum(coalesce(cardinality(rows), 1)) FROM replication.change_log")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_at_random_moments_during_a_large_catch_up(tmp_path, hq, branch_a):
    rng = random.Random(SEED)
    setup = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    branch = setup.add_branch("crash", branch_a, batch_rows=2000)
    branch.init()
    hq.execute(CHURN)
    hq.execute("CALL churn(0, %s)", (TRANSACTIONS,))
    queued = logged_changes(hq)
    assert queued > 190_000 and hq.scalar("SELECT count(*) FROM replication.change_log WHERE rows IS NOT NULL") > 20

    kills = mid_apply = in_window = in_backlog = 0
    least_backlog = None
    moments = {"starting": 0, "connected": 0, "applying": 0}
    next_txn = TRANSACTIONS
    log = tmp_path / "replicator.log"
    with branch_a.connect() as monitor:
        last_applied = applied(monitor)
        while kills < KILLS:
            # HQ keeps writing between kills, and the catch-up stays larger than a run can apply
            # before its kill (about 10 ms per 2000-change chunk here), so kills land mid-apply
            logged = logged_changes(hq)
            more = 50 if logged - last_applied < 100_000 else 1 if kills % 4 == 3 else 0
            if more:
                hq.execute("CALL churn(%s, %s)", (next_txn, more))
                next_txn += more
                logged = logged_changes(hq)
            backlog = logged - last_applied
            least_backlog = backlog if least_backlog is None else min(least_backlog, backlog)
            with open(log, "ab") as out:
                proc = branch.popen("run", stdout=out, stderr=subprocess.STDOUT)
            try:
                # The delay counts from the start (importing, connecting), from its branch
                # connection (loading, reading the window), or from its first write.
                moment = rng.choices(list(moments), weights=[2, 3, 5])[0]
                if moment == "connected":
                    wait_until(lambda: app_backends(monitor, proc.pid) or proc.poll() is not None, 60,
                               "the replicator to connect to the branch")
                elif moment == "applying":
                    wait_until(lambda: any(app_backends(monitor, proc.pid)) or applied(monitor) > last_applied
                               or proc.poll() is not None, 60, "the replicator to start applying")
                moments[moment] += 1
                time.sleep(rng.choice([0, rng.uniform(0.05, 0.6)]) if moment == "starting"
                           else rng.uniform(0.05, 0.6))
                assert proc.poll() is None, f"replicator exited by itself with {proc.returncode}; see {log}"
                holding = app_backends(monitor, proc.pid)
                proc.kill()
            finally:
                proc.kill()
                proc.wait()
            kills += 1
            mid_apply += any(holding)
            in_backlog += last_applied < queued
            # The killed backend ends once it notices; a new run would meanwhile find the lock held.
            wait_until(lambda: not app_backends(monitor, proc.pid), 20, "the killed replicator's backend to end")

            pos = state.load_position(monitor, STREAM)
            assert pos.applied_changes >= last_applied, "the position went backwards"
            assert (pos.window_snapshot is None) == (pos.window_last_id == 0), pos
            in_window += pos.window_snapshot is not None
            last_applied = pos.applied_changes

    print(f"{kills} kills, each run started with at least {least_backlog} changes to catch up "
          f"({in_backlog} runs inside the initial {queued}); delays counted from {moments}: {mid_apply} kills "
          f"with a half-applied chunk open on the branch, {in_window} left the position inside a window")
    assert mid_apply >= 5, f"only {mid_apply} of {kills} kills hit an open apply transaction"
    assert in_window >= 5, f"only {in_window} of {kills} kills left a window half applied"

    assert branch.run_once() == 0
    for table in TABLES:
        assert_same(hq, branch_a, table)
    with branch_a.connect() as conn:
        pos = state.load_position(conn, STREAM)
    total = logged_changes(hq)
    assert pos.applied_changes == total, f"applied {pos.applied_changes} changes, HQ logged {total}"
    assert pos.window_snapshot is None and pos.window_last_id == 0
    assert branch_a.scalar("SELECT count(*) FROM a") > 30_000
