"""`replicator check`: what an admin sees, and the exit code, for each way a branch can be (not) ready.

Every case runs the real command in a subprocess: the text on stdout/stderr and
the exit code are the product here.
"""
from __future__ import annotations

import re

from harness import Branch
from test_catalogs import ALL_CATALOGS, bare_pos, pos  # noqa: F401  (fixtures)
from replicator.db import describe, migrations
from replicator.hq import role_name


def check(branch: Branch):
    r = branch.cli("check")
    assert "Traceback" not in r.stderr, r.stderr
    return r


def problems(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line]


def test_ready_branch_before_and_after_init(pos, branch_a):
    b = pos.register(pos.branch_db(branch_a), 1, catalogs=["items", "stock", "kits"])
    role = role_name(b.name)
    r = check(b)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0] == "connection OK"
    assert re.fullmatch(rf"HQ: +PostgreSQL 1\d\.\d+ at {role}@127\.0\.0\.1:{pos.hq.cluster.port}/{pos.hq.name}",
                        lines[1]), lines[1]
    assert re.fullmatch(rf"branch: PostgreSQL 1\d\.\d+ at postgres@127\.0\.0\.1:\d+/{b.db.name}", lines[2]), lines[2]
    newest = max(version for version, _, _ in migrations("capture"))
    assert lines[3] == f"capture installed on HQ: yes (replication schema version {newest})"
    assert lines[4] == f"branch {b.name} registered on HQ: yes (parameters: store_id=1)"
    assert lines[5] == "catalogs offered by HQ (* = selected):"
    offered = lines[6:6 + len(ALL_CATALOGS)]
    assert [line[4:].split()[0] for line in offered] == ALL_CATALOGS
    assert sorted(line.split()[1] for line in offered if line.startswith("  * ")) == ["items", "kits", "stock"]
    assert "  * items            Artículos  (default)" in offered
    assert "  * kits             Kits" in offered
    assert "    payment_methods  Formas de pago" in offered
    assert "    customers        Clientes  (default)" in offered
    assert lines[6 + len(ALL_CATALOGS):] == ["branch initialized: no (next step: `replicator init`)"]

    b.init()
    r = check(b)
    assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "branch initialized: yes (catalogs copied: items, kits, stock)"


def test_missing_table_mismatch_and_missing_grant_each_on_its_own_line(pos, branch_a):
    db = pos.branch_db(branch_a)
    b = pos.register(db, 1, catalogs=["items", "kits", "taxes"])
    db.execute("DROP TABLE kit_components")
    db.execute("ALTER TABLE taxes ALTER name TYPE varchar(50)")
    columns = ", ".join(f'"{c}"' for (c,) in pos.hq.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'item_barcodes'::regclass AND attnum > 0 "
        "AND NOT attisdropped"))
    pos.hq.execute(f"REVOKE SELECT ({columns}) ON item_barcodes FROM replicator_catalog_items")
    r = check(b)
    assert r.returncode == 1
    assert "connection OK" in r.stdout and "  * kits " in r.stdout
    assert problems(r) == [   # in HQ's registry order
        "problem: schema mismatch on public.taxes.name: type is character varying(50) on the branch "
        "but text on HQ; change the branch column to text",
        "problem: table public.kit_components (catalog kits) is missing on the branch "
        "(create it, or `replicator init --create-missing`)",
        "problem: HQ login cannot read public.item_barcodes: permission denied for table item_barcodes; "
        "re-run `replicator hq install` and `replicator hq add-branch` on HQ",
    ]


def test_connection_problems_have_plain_messages(pos, branch_a):
    db = pos.branch_db(branch_a)
    b = pos.register(db, 1, catalogs=["items"])
    role = role_name(b.name)
    cases = {
        "wrong password": (pos.role_dsn(role, "not-the-password"),
                           "wrong or missing password; check PGPASSWORD, ~/.pgpass or the ${VAR} in the DSN"),
        "nothing listening": (f"postgresql://{role}@127.0.0.1:1/{pos.hq.name}",
                              "nothing is listening there (connection refused); "
                              "is PostgreSQL running and the host/port right?"),
        "unknown host": (f"postgresql://{role}@no-such-host.invalid/{pos.hq.name}",
                         "unknown host name; check the host in the DSN"),
        "TLS refused": (b.cfg.source_dsn + "?sslmode=require",
                        "the server does not accept TLS connections, but the DSN requires TLS (sslmode); "
                        "enable ssl on the server or change sslmode in the DSN"),
    }
    for case, (dsn, message) in cases.items():
        r = check(pos.write_branch(b.name, db, dsn, ["items"]))
        assert r.returncode == 1, (case, r.stdout, r.stderr)
        assert r.stdout == "", case
        assert problems(r) == [f"problem: cannot connect to HQ: {describe(dsn)}: {message}"], case
        assert "not-the-password" not in r.stderr

    # the branch side is checked as well, in the same run
    bad = pos.write_branch(b.name, db, pos.role_dsn(role, "not-the-password"), ["items"])
    bad.path.write_text(bad.path.read_text().replace(db.name, "no_such_db"))
    r = check(bad)
    assert r.returncode == 1
    assert len(problems(r)) == 2
    assert "cannot connect to branch: postgres@" in problems(r)[1]
    assert 'database "no_such_db" does not exist; create it or fix dbname in the DSN' in problems(r)[1]


def test_unregistered_branch_and_wrong_login(pos, branch_a):
    db = pos.branch_db(branch_a)
    registered = pos.register(db, 1, catalogs=["items"])
    # a name HQ does not know, reached with the HQ admin's own login
    stranger = pos.write_branch("store-999", db, pos.hq.dsn, ["items"])
    # a registered name, but reached with another branch's login
    other = pos.register(db, 2, catalogs=["items"])
    impostor = pos.write_branch(other.name, db, registered.cfg.source_dsn, ["items"])
    for b in (stranger, impostor):
        r = check(b)
        assert r.returncode == 1
        assert "connection OK" in r.stdout
        assert f"problem: {b.path}:1: branch: branch {b.name} is not registered on HQ (or not for this " \
               f"login); fix the name here or run on HQ: replicator hq add-branch -c hq.yaml {b.name}" \
               in problems(r), r.stderr


def test_capture_not_installed(bare_pos, branch_a):
    r = check(bare_pos.write_branch("store-1", bare_pos.branch_db(branch_a), bare_pos.hq.dsn, ["items"]))
    assert r.returncode == 1
    assert r.stdout.splitlines()[0] == "connection OK"
    assert problems(r) == ["problem: capture is not installed on HQ: HQ has no replication schema; "
                           "run `replicator hq install -c hq.yaml`"]
