"""`replicator verify` and `verify --repair` against real HQ and branch databases.

The world: the sample POS chain on HQ, one branch (store 1) that keeps items,
stock (filtered to its store), users (password_hash excluded), customers
(streamed, never copied: "not initialized"), policies and currencies.
Differences are made by writing to the branch as a superuser in replica
mode, which is what a careless local fix or a bug would do.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import replicator.verify as verify_mod
from harness import make_setup
from replicator import sample, sample_changes
from replicator.hq import role_name
from replicator.verify import repair, verify
from replicator.verify_report import format_report
from soak import Daemon, HQWriter, hq_catalogs, wait_caught_up

TESTS = Path(__file__).resolve().parent
CATALOGS = ["items", "stock", "users", "customers", "policies", "currencies"]


@pytest.fixture
def world(tmp_path, hq, branch_a):
    """An initialized, caught-up branch of store 1 (customers streamed without a copy)."""
    with hq.connect() as conn:
        sample.load_schema(conn)
        sample.generate(conn, "small")
    with branch_a.connect() as conn:
        sample.load_schema(conn)
    setup = make_setup(tmp_path, hq, hq_catalogs())
    b = setup.add_branch(f"v-{uuid.uuid4().hex[:8]}", branch_a, catalogs=CATALOGS, params={"store_id": 1})
    b.init()
    with hq.connect() as conn:
        sample_changes.random_changes(conn, 200, random.Random(5))
    b.run_once()
    yield b
    try:
        role = sql.Identifier(role_name(b.name))
        hq.execute(sql.SQL("DROP OWNED BY {}").format(role))
        hq.execute(sql.SQL("DROP ROLE {}").format(role))
    except psycopg.Error:
        pass


def on_branch(b, *statements: str) -> None:
    """Write to the branch behind the replicator's back (replica mode passes the read-only guard)."""
    with b.db.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        for s in statements:
            conn.execute(s)


def damage(b) -> None:
    """One of each kind of difference, plus changes verify must ignore."""
    on_branch(b,
              "DELETE FROM items WHERE id = 5",                                       # missing
              "INSERT INTO stock (store_id, item_id, quantity) VALUES (2, 3, 10)",     # extra (other store)
              "UPDATE stock SET quantity = quantity + 1 WHERE store_id = 1 AND item_id = 4",  # different
              "UPDATE item_barcodes SET is_primary = NOT is_primary WHERE barcode = "
              "(SELECT min(barcode) FROM item_barcodes)",                             # different, text key
              "UPDATE users SET password_hash = 'local' WHERE id = 1")                # excluded: ignored


def by_table(report: dict) -> dict:
    return {t["table"]: t for t in report["tables"]}


# ------------------------------------------------------------ equal / different

def test_equal_branch_exits_0_and_names_uninitialized_tables(world):
    done = world.cli("verify")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("public.items") and "equal (" in line for line in lines), done.stdout
    assert any(line.startswith("public.customers") and "not initialized" in line for line in lines)
    assert lines[-1].startswith(f"branch {world.name} equals HQ (8 tables compared")


def test_differences_are_listed_by_kind_and_key(world):
    damage(world)
    barcode = world.db.scalar("SELECT min(barcode) FROM item_barcodes")
    done = world.cli("verify", "--json", "--wait", "0")
    assert done.returncode == 1, done.stderr
    report = by_table(json.loads(done.stdout))
    assert report["public.items"]["missing"] == [{"id": 5}]
    assert report["public.stock"]["extra"] == [{"store_id": 2, "item_id": 3}]
    assert report["public.stock"]["different"] == [{"store_id": 1, "item_id": 4}]
    assert report["public.item_barcodes"]["different"] == [{"barcode": barcode}]
    assert report["public.users"]["status"] == "equal"          # password_hash is not compared
    assert report["public.customers"]["status"] == "not initialized"
    assert {t for t, r in report.items() if r["status"] == "different"} == \
        {"public.items", "public.stock", "public.item_barcodes"}
    text = world.cli("verify", "--wait", "0")
    assert text.returncode == 1
    assert "public.stock                 DIFFERENT: 1 extra on the branch, 1 different" in text.stdout
    assert "    missing: id=5" in text.stdout
    assert text.stdout.splitlines()[-1] == "differences in 3 of 8 tables"


def test_named_catalogs_and_bad_names(world):
    damage(world)
    done = world.cli("verify", "policies", "users")
    assert done.returncode == 0, done.stdout + done.stderr
    assert {line.split()[0] for line in done.stdout.splitlines()[:-1]} == {"public.price_policies", "public.users"}
    bad = world.cli("verify", "nosuch")
    assert bad.returncode == 2 and "unknown catalog nosuch" in bad.stderr and "Traceback" not in bad.stderr
    outside = world.cli("verify", "kits")
    assert outside.returncode == 2 and "kits is not selected" in outside.stderr


def test_output_settings_of_either_server_do_not_matter(world, hq):
    """Rows print through fixed session settings: other defaults on HQ are no false alarm."""
    hq.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = 'Asia/Tokyo'").format(sql.Identifier(hq.name)))
    hq.execute(sql.SQL("ALTER DATABASE {} SET DateStyle = 'SQL, DMY'").format(sql.Identifier(hq.name)))
    world.db.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = 'America/Mexico_City'").format(
        sql.Identifier(world.db.name)))
    world.db.execute(sql.SQL("ALTER DATABASE {} SET extra_float_digits = -3").format(
        sql.Identifier(world.db.name)))
    assert verify(world.cfg).equal


def test_md5_fallback_finds_the_same_differences(world, monkeypatch):
    """Servers that hash text differently (byte order) fall back to md5 on both sides."""
    monkeypatch.setattr(verify_mod, "HASH", "md5")      # as if the servers' probe hashes differed
    assert verify(world.cfg).equal
    damage(world)
    report = verify(world.cfg, wait=0)
    got = {t.table: (t.missing, t.extra, t.different) for t in report.tables if t.status == "different"}
    assert got["public.items"] == (['{"id": 5}'], [], [])
    assert got["public.stock"] == ([], ['{"item_id": 3, "store_id": 2}'], ['{"item_id": 4, "store_id": 1}'])


def test_branch_without_position_is_a_clear_error(tmp_path, hq, branch_b):
    with hq.connect() as conn:
        sample.load_schema(conn)
    with branch_b.connect() as conn:
        sample.load_schema(conn)
    setup = make_setup(tmp_path, hq, hq_catalogs())
    b = setup.add_branch(f"v-{uuid.uuid4().hex[:8]}", branch_b, catalogs=["items"], params={"store_id": 1})
    try:
        done = b.cli("verify")
        assert done.returncode == 1
        assert done.stderr.strip().startswith(f"error: branch {b.name} has no position yet; run `replicator init")
    finally:
        hq.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role_name(b.name))))
        hq.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role_name(b.name))))


# ------------------------------------------------------------ in flight

def test_branch_behind_without_replicator_reports_pending(world, hq):
    hq.execute("UPDATE items SET cost = cost + 1 WHERE id <= 10")
    hq.execute("UPDATE stock SET store_id = 2 WHERE store_id = 1 AND item_id = "
               "(SELECT min(item_id) FROM stock s WHERE s.store_id = 1 AND NOT EXISTS "
               " (SELECT FROM stock o WHERE o.store_id = 2 AND o.item_id = s.item_id))")   # leaves the filter
    started = time.monotonic()
    report = verify(world.cfg, wait=30)
    assert time.monotonic() - started < 10, "no replicator is running: verify must not wait for it"
    assert not report.equal and not report.replicator_running
    items = next(t for t in report.tables if t.table == "public.items")
    stock = next(t for t in report.tables if t.table == "public.stock")
    assert items.pending == [f'{{"id": {i}}}' for i in range(1, 11)] and not items.different
    assert len(stock.pending) == 1 and not stock.extra
    text = "\n".join(format_report(report))
    assert "10 not yet applied" in text and "(the replicator is not running)" in text, text
    fixed = repair(world.cfg, report)
    assert fixed.repaired == {} and fixed.left_to_stream == {"public.items": 10, "public.stock": 1}
    world.run_once()
    assert verify(world.cfg).equal


def test_no_false_alarms_while_hq_writes_and_the_replicator_applies(world, hq, tmp_path):
    """Verify again and again for 6 s of steady load, part of it with an HQ transaction held open."""
    daemon = Daemon(world, tmp_path / "run.log")
    writer = HQWriter(hq.dsn, seed=11, rate=150)
    writer.start()
    reports = []
    try:
        wait_caught_up(hq, world, 30, daemon)
        started = time.monotonic()
        with hq.connect(autocommit=False) as long_txn:
            long_txn.execute("UPDATE currencies SET name = name || '*' WHERE code = 'USD'")
            while time.monotonic() - started < 3:
                reports.append(verify(world.cfg, wait=30))
            long_txn.commit()
        while time.monotonic() - started < 6:
            reports.append(verify(world.cfg, wait=30))
    finally:
        writer.stop()
        daemon.stop()
    assert writer.transactions > 300 and len(reports) >= 4
    for r in reports:
        assert r.equal, "\n".join(format_report(r))
        assert r.replicator_running


# ------------------------------------------------------------ repair

def test_repair_recopies_only_the_differing_rows(world):
    damage(world)
    untouched = world.db.scalar("SELECT xmin::text FROM items WHERE id = 6")
    done = world.cli("verify", "--repair")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "repaired public.items: 1 rows re-copied from HQ" in out
    assert "repaired public.stock: 2 rows re-copied from HQ" in out
    assert "repaired public.item_barcodes: 1 rows re-copied from HQ" in out
    assert out.splitlines()[-1].startswith(f"branch {world.name} equals HQ")
    assert world.db.scalar("SELECT xmin::text FROM items WHERE id = 6") == untouched
    assert world.db.scalar("SELECT count(*) FROM stock WHERE store_id = 2") == 0
    # the read-only guard is still in place for local users
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        world.db.execute("DELETE FROM items WHERE id = 7")


def test_repair_json_while_the_replicator_runs(world, hq, tmp_path):
    """Repair takes the position lock; the running replicator waits, then goes on."""
    daemon = Daemon(world, tmp_path / "run.log")
    writer = HQWriter(hq.dsn, seed=12, rate=100)
    writer.start()
    try:
        wait_caught_up(hq, world, 30, daemon)
        on_branch(world, "UPDATE currencies SET name = 'Euro (local)' WHERE code = 'EUR'",
                  "DELETE FROM currencies WHERE code = 'JPY'")
        done = world.cli("verify", "--repair", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        doc = json.loads(done.stdout)
        assert doc["equal"] and doc["repair"]["repaired"] == {"public.currencies": 2}
        assert world.db.scalar("SELECT name FROM currencies WHERE code = 'EUR'") == \
            hq.scalar("SELECT name FROM currencies WHERE code = 'EUR'")
        hq.execute("INSERT INTO currencies (code, name, symbol) VALUES ('ZZR', 'Marcador', 'Z')")
        deadline = time.monotonic() + 15      # the replicator went on after waiting for the repair
        while not world.db.scalar("SELECT count(*) FROM currencies WHERE code = 'ZZR'"):
            assert daemon.alive() and time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
    finally:
        writer.stop()
        daemon.stop()


# ------------------------------------------------------------ soak

@pytest.mark.slow
def test_soak_short():
    """The soak script end to end, shortened: faults, two branches, verify equal."""
    done = subprocess.run([sys.executable, str(TESTS / "soak.py"), "--minutes", "0.5", "--seed", "7"],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "RESULT: PASS" in done.stdout
    assert "faults injected: 0" not in done.stdout
    assert "store-001: applied" in done.stdout and "verify: equal" in done.stdout
