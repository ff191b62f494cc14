"""One database holds both sides of replication: it is a target (a branch receiving catalogs
from HQ) and a capture source (an HQ for a branch of its own), as every branch will be once
its sales go up.  Both sides' objects live in schema `replication` without colliding, and each
side's migrations are recorded under its own side, so neither mistakes the other's versions.
"""
from __future__ import annotations

import pytest

from replicator import db as dbmod
from replicator.errors import ReplicatorError
from tests.harness import FUNCTIONS_IN_MIGRATIONS, assert_same, make_setup, migrations_at

TOP = "CREATE TABLE public.regions (id int PRIMARY KEY, name text NOT NULL);"
MID = "CREATE TABLE public.items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2));"


def _chain(tmp_path, hq, branch_a, branch_b, capture_first: bool):
    """hq -> branch_a (regions); branch_a -> branch_b (items).  capture_first: branch_a's
    capture is installed before it becomes a target, otherwise after."""
    (tmp_path / "top").mkdir()
    (tmp_path / "mid").mkdir()
    branch_a.execute(TOP + MID)
    branch_b.execute(MID)
    top = make_setup(tmp_path / "top", hq, {"regions": {"label": "Regions", "default": True,
                                                         "tables": ["public.regions"]}}, TOP)
    mid_cat = {"items": {"label": "Items", "default": True, "tables": ["public.items"]}}
    if capture_first:
        mid = make_setup(tmp_path / "mid", branch_a, mid_cat)
    a = top.add_branch("mid", branch_a)
    a.init()
    if not capture_first:
        mid = make_setup(tmp_path / "mid", branch_a, mid_cat)
    b = mid.add_branch("leaf", branch_b)
    b.init()
    return a, b


@pytest.mark.parametrize("capture_first", [False, True], ids=["target-then-capture", "capture-then-target"])
def test_one_database_is_a_target_and_a_capture_source(tmp_path, hq, branch_a, branch_b, capture_first):
    a, b = _chain(tmp_path, hq, branch_a, branch_b, capture_first)
    hq.execute("INSERT INTO regions SELECT g, 'region ' || g FROM generate_series(1, 20) g")
    branch_a.execute("INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 30) g")
    assert a.run_once() == 0 and b.run_once() == 0
    assert_same(hq, branch_a, "regions")
    assert_same(branch_a, branch_b, "items")

    hq.execute("UPDATE regions SET name = name || '!' WHERE id % 3 = 0; DELETE FROM regions WHERE id > 15")
    branch_a.execute("UPDATE items SET id = id + 100 WHERE id < 5; DELETE FROM items WHERE id = 20")
    assert a.run_once() == 0 and b.run_once() == 0
    assert_same(hq, branch_a, "regions")
    assert_same(branch_a, branch_b, "items")

    sides = branch_a.execute("SELECT side, count(*)::int FROM replication.versions GROUP BY 1 ORDER BY 1")
    assert sides == [("capture", len(dbmod.migrations("capture"))), ("target", len(dbmod.migrations("target")))]
    # the regions catalog stays read-only at branch_a; its own items are written there freely
    with pytest.raises(Exception, match="replicated from HQ and read-only here"):
        branch_a.execute("UPDATE regions SET name = 'local'")
    r = a.cli("status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "catalogs are up to date" in r.stdout
    r = b.cli("status")
    assert r.returncode == 0, r.stdout + r.stderr


OLD_BRANCH = """
CREATE SCHEMA replication;
CREATE TABLE replication.versions (version int PRIMARY KEY, name text NOT NULL,
                                   applied_at timestamptz NOT NULL DEFAULT now());
"""


def test_capture_beside_a_target_side_of_an_older_release_is_refused_with_one_line(tmp_path, branch_a):
    """A branch database a release before sides existed left (target migrations 001-003, its copy
    state still in replication.tables): installing capture there first would collide half-way,
    so `hq install` says to upgrade the target side first, and touches nothing."""
    branch_a.execute(OLD_BRANCH)
    for v, name, text in migrations_at(FUNCTIONS_IN_MIGRATIONS, "target"):
        if v <= 3:
            branch_a.execute(text.replace("replication.target_tables", "replication.tables"))
            branch_a.execute("INSERT INTO replication.versions VALUES (%s, %s)", (v, name))
    branch_a.execute(MID)
    before = branch_a.execute("SELECT * FROM replication.versions ORDER BY 1")
    with branch_a.connect() as conn, pytest.raises(ReplicatorError,
                                                   match=r"also holds replication's target side from an older "
                                                         r"release .* upgrade that side first: run `replicator init`"):
        dbmod.migrate(conn, "capture")
    assert branch_a.execute("SELECT * FROM replication.versions ORDER BY 1") == before
    assert branch_a.scalar("SELECT to_regclass('replication.change_log')") is None

    # the new release's target migrations upgrade it in place: renamed, keyed by stream
    with branch_a.connect() as conn:
        assert dbmod.migrate(conn, "target") == ["004_streams", "005_units", "functions/guard.sql"]
        dbmod.migrate(conn, "capture")
    assert branch_a.execute("SELECT side, version FROM replication.versions ORDER BY 1, 2")[-1] == \
        ("target", 5)
    assert branch_a.scalar("SELECT to_regclass('replication.target_tables')::text") == "replication.target_tables"
