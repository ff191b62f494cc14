"""Upgrade in place from the release at commit c842138 (HQ at capture migration 005, branch at
target migration 002): that release's own code, taken from this repository's history with
`git archive`, installs HQ, registers a store, initializes its branch and replicates; then
changes wait at HQ across the upgrade (small ones, bulk statements HQ logs as arrays, primary
keys that move).  `hq install` of this release goes first, the old replicator meets the
upgraded HQ, and this release's `run` upgrades the branch and applies everything exactly once.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import uuid

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from tests.harness import REPO, assert_same, replicator_cli

RELEASE = "c842138"
SCHEMA = """
CREATE TABLE public.items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
CREATE TABLE public.stock (store_id int, item_id int, qty int NOT NULL, PRIMARY KEY (store_id, item_id));
"""
FILL = """
INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 2000) g;
INSERT INTO stock SELECT s, i, 10 FROM generate_series(1, 3) s, generate_series(1, 200) i;
"""
CHANGES = [   # each a transaction; the bulk UPDATEs touch 1,000 rows or more of an unfiltered table
    "UPDATE items SET price = price + 1 WHERE id <= 1500",
    "UPDATE items SET name = 'renamed ' || id WHERE id % 97 = 0",
    "UPDATE items SET id = id + 100000 WHERE id <= 5",
    "DELETE FROM items WHERE id BETWEEN 1900 AND 1950",
    "INSERT INTO items SELECT g, 'new ' || g, 1 FROM generate_series(3000, 4200) g",
    "UPDATE stock SET qty = qty - 1 WHERE item_id % 7 = 0",
    "UPDATE stock SET item_id = item_id + 1000 WHERE item_id <= 3",
    "DELETE FROM stock WHERE item_id BETWEEN 150 AND 160",
]
AFTER = [     # captured by this release's functions, while the old replicator may still run
    "UPDATE items SET price = price * 2 WHERE id > 100",
    "UPDATE items SET id = id + 200000 WHERE id BETWEEN 6 AND 8",
    "INSERT INTO items SELECT g, 'newer ' || g, 2 FROM generate_series(5000, 6100) g",
    "UPDATE stock SET qty = 0, item_id = item_id + 2000 WHERE item_id BETWEEN 20 AND 22",
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The old release's package and SQL, from git history (a shallow clone lacks it: .ci/run
    fetches the whole history)."""
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{RELEASE}^{{commit}}"],
                           capture_output=True)
    assert found.returncode == 0, f"commit {RELEASE} is not in this clone's history (git fetch --unshallow)"
    tree = subprocess.run(["git", "-C", str(REPO), "archive", RELEASE, "replicator", "sql", "config"],
                          capture_output=True, check=True).stdout
    where = tmp_path_factory.mktemp(f"release-{RELEASE}")
    with tarfile.open(fileobj=io.BytesIO(tree)) as tar:
        tar.extractall(where, filter="data")
    return where


def old_cli(release, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The old release's `replicator`: its package comes first on the path, run from its tree."""
    return subprocess.run([sys.executable, "-m", "replicator", *args], cwd=release, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(release), **(env or {})})


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _apply(hq, statements) -> None:
    for stmt in statements:
        hq.execute(stmt)


@pytest.mark.parametrize("upgrader", ["run", "check"])
def test_upgrade_in_place_from_the_release_at_c842138(tmp_path, release, hq, branch_a, upgrader):
    """`upgrader`: the first command of this release on the branch, which brings its own
    objects up to date (run catches up too; check only reports)."""
    assert "aside" not in old_cli(release, "--help").stdout            # really the old code
    hq.execute(SCHEMA)
    branch_a.execute(SCHEMA)
    hq.execute(FILL)
    hq_yaml = tmp_path / "hq.yaml"
    hq_yaml.write_text(yaml.safe_dump({"dsn": hq.dsn, "retention": "7d", "catalogs": {
        "items": {"label": "Items", "default": True, "tables": ["public.items"]},
        "stock": {"label": "Stock", "default": True, "tables": ["public.stock"],    # that release's form
                  "filter": "store_id = :store_id"}}}))
    _ok(old_cli(release, "hq", "install", "-c", str(hq_yaml)))
    assert hq.scalar("SELECT max(version) FROM replication.versions") == 5

    # the store logs in as the role HQ registered for it, as in production
    store, password = f"up-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    printed = yaml.safe_load(_ok(old_cli(release, "hq", "add-branch", "-c", str(hq_yaml), store,
                                         "--param", "store_id=2", "--password-env", "PW",
                                         env={"PW": password})).stdout)
    role = conninfo_to_dict(printed["source"]["dsn"])["user"]
    branch_yaml = tmp_path / "branch.yaml"
    branch_yaml.write_text(yaml.safe_dump({"branch": store,
                                           "source": {"dsn": hq.cluster.dsn(hq.name, role, password)},
                                           "target": {"dsn": branch_a.dsn}}))
    cfg = ("-c", str(branch_yaml))
    _ok(old_cli(release, "init", *cfg))
    _apply(hq, CHANGES[:2])
    _ok(old_cli(release, "run", "--once", *cfg))
    assert_same(hq, branch_a, "items")
    assert_same(hq, branch_a, "stock", hq_where="store_id = 2")
    assert branch_a.scalar("SELECT max(version) FROM replication.versions") == 2

    _apply(hq, CHANGES)                         # waiting at HQ across the upgrade
    report = _ok(replicator_cli("hq", "install", "-c", str(hq_yaml)))
    assert "applied migration 009_set_aside_counts" in report.stdout
    _apply(hq, AFTER[:2])

    # the old replicator facing the upgraded HQ: keeps working, or stops with one line;
    # either way the branch holds HQ's rows as of some point, never damage
    before = branch_a.execute("SELECT (i.*)::text FROM items i ORDER BY id")
    r = old_cli(release, "run", "--once", *cfg)
    if r.returncode == 0:
        assert_same(hq, branch_a, "items")
        assert_same(hq, branch_a, "stock", hq_where="store_id = 2")
    else:
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert branch_a.execute("SELECT (i.*)::text FROM items i ORDER BY id") == before
    _apply(hq, AFTER[2:])
    r = replicator_cli("status", *cfg)          # a read says how to upgrade the branch, and touches nothing
    assert r.returncode == 1 and "missing target migrations [3, 4, 5]" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert branch_a.scalar("SELECT max(version) FROM replication.versions") == 2

    # this release on the branch: its own schema goes to target migration 005, then catch up
    if upgrader == "check":
        r = replicator_cli("check", *cfg)
        for m in ("004_streams", "005_units"):
            assert f"branch replication schema upgraded: target migration {m}" in r.stdout, r.stdout + r.stderr
        assert branch_a.execute("SELECT side, max(version) FROM replication.versions GROUP BY 1") == \
            [("target", 5)]
    r = replicator_cli("run", "--once", *cfg)
    assert r.returncode == 0, r.stderr
    assert branch_a.execute("SELECT side, max(version) FROM replication.versions GROUP BY 1") == [("target", 5)]
    assert_same(hq, branch_a, "items")
    assert_same(hq, branch_a, "stock", hq_where="store_id = 2")
    assert branch_a.scalar("SELECT stream FROM replication.position") == "catalogs"

    hq.execute("UPDATE items SET price = 0 WHERE id % 2 = 0")            # and on from there
    _ok(replicator_cli("run", "--once", *cfg))
    assert_same(hq, branch_a, "items")
    assert "catalogs are up to date" in _ok(replicator_cli("status", *cfg)).stdout
    _ok(replicator_cli("verify", *cfg))
