"""Reads from a hot standby (issue 20, point 1): a branch whose HQ DSN lists the primary and
a real streaming standby (pg_basebackup -R) reads its windows and copies there and reports
its position to the primary; a standby that pauses replay only delays changes, and one that
goes away costs one log line: reads fall back to the primary, nothing is lost."""
from __future__ import annotations

import time

import pytest
import yaml

from harness import assert_same, make_setup
from servers import standby_of
from test_daemon import daemon, wait_until

SCHEMA = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(12,2));"
CATALOGS = {"items": {"label": "Items", "default": True, "tables": ["public.items"]}}


@pytest.fixture
def standby_world(tmp_path, scratch_cluster, branch_a):
    primary = scratch_cluster
    hq = primary.create_database("hq_standby")
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    hq.execute("INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 500) g")
    standby = standby_of(primary)
    try:
        replica = standby.database("hq_standby")
        wait_until(lambda: replica.scalar("SELECT count(*) FROM items") == 500, 20, "the standby replays")
        b = s.add_branch("reads-standby", branch_a, poll_interval="50ms")
        doc = yaml.safe_load(b.path.read_text())
        doc["source"]["dsn"] = (f"postgresql://postgres@{primary.host}:{primary.port},"
                                f"{standby.host}:{standby.port}/hq_standby")
        b.path.write_text(yaml.safe_dump(doc))
        yield hq, replica, standby, b
    finally:
        standby.cleanup()


def _backends(db, app: str) -> int:
    return db.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (app + "%",))


def test_windows_come_from_the_standby_and_reports_go_to_the_primary(standby_world, branch_a):
    hq, replica, standby, b = standby_world
    r = b.cli("init")
    assert r.returncode == 0, r.stderr
    assert_same(hq, branch_a, "items")
    with daemon(b) as d:
        d.wait_for("reading HQ's log from a hot standby")
        d.wait_for("replicating 1 tables")
        assert _backends(replica, "replicator run") == 1 and _backends(hq, "replicator run") == 1
        hq.execute("UPDATE items SET price = price + 1 WHERE id <= 100")
        hq.execute("UPDATE items SET id = id + 1000 WHERE id <= 3")
        wait_until(lambda: hq.execute("SELECT (i.*)::text FROM items i ORDER BY id")
                   == branch_a.execute("SELECT (i.*)::text FROM items i ORDER BY id"), 15, "changes via the standby")
        reported = hq.scalar("SELECT acked_at FROM replication.branches WHERE name = 'reads-standby'")
        assert reported is not None                                   # written on the primary

        # replay paused: the branch waits for the standby; resumed: the change arrives
        replica.execute("SELECT pg_wal_replay_pause()")
        hq.execute("INSERT INTO items VALUES (9001, 'while replay pauses', 1)")
        time.sleep(1.5)
        assert branch_a.scalar("SELECT count(*) FROM items WHERE id = 9001") == 0
        replica.execute("SELECT pg_wal_replay_resume()")
        wait_until(lambda: branch_a.scalar("SELECT count(*) FROM items WHERE id = 9001") == 1, 15,
                   "the change once replay resumes")

        # the standby goes away: one line, then reads from the primary
        standby.stop("immediate")
        hq.execute("INSERT INTO items VALUES (9002, 'standby gone', 2)")
        wait_until(lambda: branch_a.scalar("SELECT count(*) FROM items WHERE id = 9002") == 1, 40,
                   "the change read from the primary")
        assert d.count("lost connection to HQ") == 1, d.log
        assert d.signal() < 5
    assert d.proc.returncode == 0 and "Traceback" not in d.log, d.log
    assert_same(hq, branch_a, "items")
    r = b.cli("verify")                       # the standby is down: verify reads the primary
    assert r.returncode == 0, r.stdout + r.stderr
