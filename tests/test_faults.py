"""Fault injection: each scenario breaks something real, then `replicator verify` proves
the branch equals HQ, with no manual step in between.

The replicator is always the real `replicator run` process (it must reconnect
by itself); network faults go through tests/faultproxy.py; server faults are
`pg_ctl restart -m immediate` on a private cluster, SIGKILL, a full
max_connections.  HQ holds the sample POS chain and keeps changing it.

Scale knobs (CI defaults; raise them for the full version):
    REPLICATOR_LONG_TXN_SECONDS   how long the HQ transaction stays open (20)
    REPLICATOR_BACKLOG            changes piled up while a branch is offline (100000)
"""
from __future__ import annotations

import json
import os
import random
import time
import uuid

import psycopg
import pytest
from psycopg import sql

from replicator import sample_changes, state
from replicator.cluster import Cluster
from replicator.hq import role_name
from replicator.stream import CATALOGS as STREAM
from soak import (Daemon, HQWriter, bulk_changes, build_world, hq_snapshot, init_cli, position, verify_cli,
                  wait_caught_up)

pytestmark = pytest.mark.slow

LONG_TXN_SECONDS = float(os.environ.get("REPLICATOR_LONG_TXN_SECONDS", "20"))
BACKLOG = int(os.environ.get("REPLICATOR_BACKLOG", "100000"))


class Kit:
    """What a scenario starts, stopped in reverse at the end whatever happened."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.worlds, self.daemons, self.writers = [], [], []

    def world(self, hq, branch_db, proxy: bool = True, **branch_yaml):
        name = f"f-{uuid.uuid4().hex[:8]}"
        w = build_world(self.tmp, hq, {name: (branch_db, 1)}, proxy=proxy, **branch_yaml)
        self.worlds.append(w)
        return w, w.branches[name]

    def daemon(self, branch) -> Daemon:
        d = Daemon(branch, self.tmp / f"{branch.name}-{len(self.daemons)}.log")
        self.daemons.append(d)
        return d

    def writer(self, dsn: str, seed: int, rate: float = 50) -> HQWriter:
        w = HQWriter(dsn, seed, rate=rate)
        w.start()
        self.writers.append(w)
        return w

    def close(self) -> None:
        for w in self.writers:
            w.stop()
        for d in self.daemons:
            d.kill(settle=False)
        for w in self.worlds:
            w.close()
            for name in w.branches:
                try:   # roles are cluster-wide; scratch clusters take theirs with them
                    w.hq.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role_name(name))))
                    w.hq.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role_name(name))))
                except psycopg.Error:
                    pass


@pytest.fixture
def kit(tmp_path):
    k = Kit(tmp_path)
    yield k
    k.close()


def assert_verified(branch, daemon: Daemon | None = None) -> dict:
    equal, report, err = verify_cli(branch)
    diffs = [t for t in report.get("tables", []) if t["status"] == "different"]
    assert equal, f"verify found differences: {json.dumps(diffs)[:3000]} {err}\n" + (daemon.log() if daemon else "")
    assert all(t["status"] != "not initialized" for t in report["tables"]), report
    return report


def wait_until(predicate, timeout: float, what: str, daemon: Daemon | None = None) -> float:
    start = time.monotonic()
    while not predicate():
        if daemon is not None:
            assert daemon.alive(), f"replicator exited while waiting for {what}:\n{daemon.log()}"
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s" + \
            (f"\n{daemon.log()}" if daemon else "")
        time.sleep(0.05)
    return time.monotonic() - start


def init_state_is_all_or_nothing(branch_db) -> None:
    """After a failed init, each table is either copied and recorded, or empty and unrecorded."""
    with branch_db.connect() as conn:
        states = state.table_states(conn, STREAM)
        for table in ("items", "item_prices", "item_barcodes", "stock", "users", "customers",
                      "price_policies", "currencies", "exchange_rates", "registers", "devices"):
            st = states.get(f"public.{table}")
            n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", table))).fetchone()[0]
            if st is None or st.initialized_at is None:
                assert n == 0, f"{table}: {n} rows but not recorded as initialized"
            else:
                assert n == st.rows_copied, f"{table}: {n} rows, {st.rows_copied} recorded"


def slow_apply(branch_db, seconds: float = 0.3) -> None:
    """Make each apply statement on item_prices sleep, so a fault can land inside an apply
    transaction for sure (ENABLE ALWAYS: fires in the replicator's replica mode too)."""
    branch_db.execute(f"""
        CREATE FUNCTION public.slow_apply() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
        CREATE TRIGGER slow_apply AFTER INSERT OR UPDATE OR DELETE ON public.item_prices
            FOR EACH STATEMENT EXECUTE FUNCTION public.slow_apply();
        ALTER TABLE public.item_prices ENABLE ALWAYS TRIGGER slow_apply;""")


def in_apply(branch_db) -> bool:
    """Is the replicator inside an apply transaction on the branch right now?"""
    try:
        return bool(branch_db.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'replicator run%' AND wait_event = 'PgSleep' AND xact_start IS NOT NULL"))
    except psycopg.OperationalError:
        return False


# ------------------------------------------------------------ network

def test_connection_cut_mid_window_refused_and_stalled_during_catch_up(kit, hq, branch_a):
    w, b = kit.world(hq, branch_a, batch_rows=1000)
    proxy = w.proxies[b.name]
    b.init(include_customers=True)
    backlog = bulk_changes(hq, 30_000)
    proxy.stall_after(400_000, 30)           # freeze inside the window, a few chunks applied
    d = kit.daemon(b)
    wait_until(lambda: not proxy.armed, 30, "the window to start", d)
    wait_until(lambda: position(branch_a).window_last_id > 0, 10, "a chunk applied", d)
    assert position(branch_a).window_snapshot is not None
    assert proxy.cut() >= 1                  # mid-window: the replicator's HQ connection reset
    proxy.resume()
    writer = kit.writer(hq.dsn, seed=1, rate=60)
    wait_until(lambda: d.count("reconnected") >= 1, 30, "reconnect after the cut", d)
    proxy.refuse(3)                          # HQ turns it away for a while...
    proxy.cut()
    time.sleep(3.5)
    assert proxy.refused >= 1
    proxy.stall(3, wait=True)                # ...and then the link hangs
    writer.stop()
    wait_caught_up(hq, b, 120, d)
    assert d.count("lost connection") >= 2 and d.count("reconnected") >= 2, d.log()
    assert position(branch_a).applied_changes >= backlog
    assert_verified(b, d)


@pytest.mark.parametrize("cut_after, catalogs_done", [(300_000, False), (800_000, True)],
                         ids=["in-first-catalog", "in-later-catalog"])
def test_connection_cut_during_init_then_init_again(kit, hq, branch_a, cut_after, catalogs_done):
    """Each catalog is one branch transaction: a cut loses only the catalog being copied."""
    w, b = kit.world(hq, branch_a)
    proxy = w.proxies[b.name]
    proxy.cut_after(cut_after)
    failed = init_cli(b)
    assert not proxy.armed, "the cut never fired: init copied less than expected"
    assert failed.returncode == 1, failed.stdout + failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in failed.stderr, failed.stderr
    assert "connection" in lines[-1].lower(), lines[-1]
    init_state_is_all_or_nothing(branch_a)
    with branch_a.connect() as conn:
        done = [t for t, st in state.table_states(conn, STREAM).items() if st.initialized_at is not None]
    assert bool(done) is catalogs_done, done
    again = init_cli(b)
    assert again.returncode == 0, again.stderr
    d = kit.daemon(b)
    writer = kit.writer(hq.dsn, seed=2, rate=60)
    time.sleep(2)
    writer.stop()
    wait_caught_up(hq, b, 60, d)
    assert_verified(b, d)


# ------------------------------------------------------------ servers

def test_hq_restarted_immediate_during_catch_up(kit, scratch_cluster, branch_a):
    hq = scratch_cluster.create_database("pos")
    w, b = kit.world(hq, branch_a, batch_rows=1000)
    proxy = w.proxies[b.name]
    b.init(include_customers=True)
    backlog = bulk_changes(hq, 30_000)
    proxy.stall_after(400_000, 30)           # hold the replicator inside the window...
    d = kit.daemon(b)
    writer = kit.writer(hq.dsn, seed=3, rate=60)
    wait_until(lambda: not proxy.armed, 30, "the window to start", d)
    wait_until(lambda: position(branch_a).window_last_id > 0, 10, "a chunk applied", d)
    scratch_cluster.restart(mode="immediate")   # ...while HQ crashes and recovers
    proxy.resume()
    time.sleep(2)
    writer.stop()
    assert writer.errors >= 1                 # HQ's own clients saw the crash too
    wait_caught_up(hq, b, 120, d)
    assert d.count("lost connection to HQ") >= 1, d.log()
    assert position(branch_a).applied_changes >= backlog
    assert_verified(b, d)


def test_branch_restarted_immediate_during_apply(kit, hq, scratch_cluster):
    branch_db = scratch_cluster.create_database("pos")
    w, b = kit.world(hq, branch_db, proxy=False, batch_rows=1000)
    b.init(include_customers=True)
    slow_apply(branch_db)
    bulk_changes(hq, 12_000)
    d = kit.daemon(b)
    writer = kit.writer(hq.dsn, seed=4, rate=60)
    wait_until(lambda: position(branch_db).window_last_id > 0, 30, "a chunk applied", d)
    wait_until(lambda: in_apply(branch_db), 10, "an apply transaction in progress", d)
    scratch_cluster.restart(mode="immediate")
    time.sleep(2)
    writer.stop()
    wait_caught_up(hq, b, 120, d)
    assert d.count("lost connection") >= 1 and d.count("reconnected") >= 1, d.log()
    assert_verified(b, d)


def test_hq_out_of_connections_for_a_while(kit, branch_a):
    """Every HQ slot taken (max_connections 20): the replicator retries until one frees up."""
    with Cluster("fault-hq-full", settings={"max_connections": 20}) as cluster:
        hq = cluster.create_database("pos")
        w, b = kit.world(hq, branch_a, proxy=False)
        b.init(include_customers=True)
        d = kit.daemon(b)
        wait_caught_up(hq, b, 30, d)
        held = _fill(hq)
        try:
            held[0].execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name LIKE 'replicator run%'")
            held += _fill(hq)                    # take the freed slots before it reconnects
            log_from = len(cluster.server_log())
            changed = sample_changes.random_changes(held[0], 300, random.Random(5))
            time.sleep(4)
            assert "too many clients already" in cluster.server_log()[log_from:], \
                "the replicator never tried to connect while HQ was full"
            assert d.alive(), d.log()
        finally:
            for conn in held:
                conn.close()
        assert changed > 0
        took = wait_caught_up(hq, b, 60, d)
        assert took < 30
        assert d.count("reconnected") >= 1, d.log()
        assert_verified(b, d)
        w.close()


def _fill(hq) -> list[psycopg.Connection]:
    """Open connections until HQ says it has no more."""
    held = []
    while True:
        try:
            held.append(psycopg.connect(hq.dsn, autocommit=True, connect_timeout=5))
        except psycopg.OperationalError as e:
            assert "too many clients" in str(e), e
            return held
        assert len(held) < 100, "max_connections is not being enforced"


# ------------------------------------------------------------ the replicator dies

def test_replicator_sigkilled_during_init_then_init_again(kit, hq, branch_a):
    w, b = kit.world(hq, branch_a)
    proxy = w.proxies[b.name]
    proxy.stall_after(300_000, 60)           # hold init inside its first COPY
    proc = b.popen("init", "--include-customers")
    try:
        wait_until(lambda: not proxy.armed, 60, "init to copy 300 kB")
        time.sleep(0.2)
        proc.kill()                          # SIGKILL
        proc.wait(10)
    finally:
        proxy.resume()
    wait_until(lambda: not branch_a.scalar("SELECT count(*) FROM pg_stat_activity "
                                           "WHERE application_name LIKE 'replicator init%'"),
               30, "the killed init's branch session to end")
    init_state_is_all_or_nothing(branch_a)
    assert position(branch_a) is None         # the first catalog never committed
    again = init_cli(b)
    assert again.returncode == 0, again.stderr
    d = kit.daemon(b)
    writer = kit.writer(hq.dsn, seed=6, rate=60)
    time.sleep(2)
    writer.stop()
    wait_caught_up(hq, b, 60, d)
    assert_verified(b, d)


def test_replicator_sigkilled_inside_a_window_applies_each_change_once(kit, hq, branch_a):
    """Killed inside an apply transaction of a half-applied window: the next run resumes at
    the last committed chunk; the position's change count proves nothing was applied twice."""
    w, b = kit.world(hq, branch_a, proxy=False, batch_rows=1000)
    b.init(include_customers=True)
    slow_apply(branch_a)
    backlog = bulk_changes(hq, 12_000)
    d = kit.daemon(b)
    wait_until(lambda: position(branch_a).window_last_id > 0, 30, "a chunk applied", d)
    wait_until(lambda: in_apply(branch_a), 10, "an apply transaction in progress", d)
    d.kill()                                 # SIGKILL inside the apply transaction
    mid = position(branch_a)
    assert mid.window_snapshot is not None and 0 < mid.applied_changes < backlog
    d.start()
    wait_caught_up(hq, b, 120, d)
    assert position(branch_a).applied_changes == backlog
    assert_verified(b, d)


# ------------------------------------------------------------ time

def test_long_hq_transaction_does_not_hold_back_the_others(kit, hq, branch_a):
    w, b = kit.world(hq, branch_a, proxy=False)
    b.init(include_customers=True)
    d = kit.daemon(b)
    wait_caught_up(hq, b, 30, d)
    long_txn = hq.connect(autocommit=False)
    try:
        opened = time.monotonic()
        # rows the sample's change mix never touches, so the others do not wait on its locks
        long_txn.execute("UPDATE currencies SET name = name || ' (larga)' WHERE code = 'CAD'")
        long_txn.execute("INSERT INTO customers (code, name) VALUES ('LONG-1', 'Transacción larga')")
        with hq.connect() as conn:
            rng = random.Random(8)
            others = 0
            while others < 3000 or time.monotonic() - opened < LONG_TXN_SECONDS / 2:
                sample_changes.random_changes(conn, 100, rng)
                others += 100
            conn.execute("INSERT INTO currencies (code, name, symbol) VALUES ('ZZZ', 'Marcador', 'Z')")
        committed = time.monotonic()
        lag = wait_until(lambda: branch_a.scalar("SELECT count(*) FROM currencies WHERE code = 'ZZZ'") == 1,
                         15, "the others to arrive while the long transaction is open", d)
        assert lag < 10, f"the {others} other transactions arrived {lag:.1f} s after their commit"
        assert not branch_a.scalar("SELECT count(*) FROM customers WHERE code = 'LONG-1'")
        assert_verified(b, d)                # the open transaction is no false alarm
        time.sleep(max(0.0, LONG_TXN_SECONDS - (time.monotonic() - opened)))
        long_txn.commit()
    finally:
        long_txn.close()
    late = wait_until(lambda: branch_a.scalar("SELECT count(*) FROM customers WHERE code = 'LONG-1'") == 1,
                      15, "the long transaction to arrive after its commit", d)
    assert late < 10 and committed < time.monotonic()
    assert_verified(b, d)


def test_branch_offline_for_a_large_backlog_then_back(kit, hq, branch_a):
    w, b = kit.world(hq, branch_a, proxy=False)
    b.init(include_customers=True)
    made = bulk_changes(hq, BACKLOG)
    with hq.connect() as conn:
        made += sample_changes.random_changes(conn, 500, random.Random(9))
    st = b.cli("status")
    assert st.returncode == 1 and "behind by" in st.stdout, st.stdout
    started = time.monotonic()
    d = kit.daemon(b)
    took = wait_caught_up(hq, b, 300, d)
    print(f"\nbranch back after {made:,} changes: caught up in {took:.1f} s "
          f"({made / max(took, 1e-3):,.0f} changes/s)")
    assert position(branch_a).applied_changes >= BACKLOG
    assert time.monotonic() - started < 300
    assert_verified(b, d)


def test_reconnects_after_an_hq_restart_are_spread(kit, scratch_cluster, branch_a_cluster, branch_b_cluster):
    """Eight branches lose HQ at the same moment (they probe every 50 ms, so each notices
    within a probe); once HQ is back their first new sessions must not arrive together.
    Without the jitter in the backoff they would retry on the same schedule and reconnect
    within a few tens of milliseconds of each other."""
    hq = scratch_cluster.create_database("pos")
    dbs = {}
    for i in range(8):
        cluster = branch_a_cluster if i % 2 == 0 else branch_b_cluster
        cluster.drop_database(f"spread{i}")
        dbs[f"spread-{i}-{uuid.uuid4().hex[:6]}"] = (cluster.create_database(f"spread{i}"), 1)
    w = build_world(kit.tmp, hq, dbs, proxy=False, poll_interval="50ms", idle_poll_interval="50ms")
    kit.worlds.append(w)
    try:
        _reconnect_spread(kit, scratch_cluster, hq, w)
    finally:
        for d in kit.daemons:
            d.kill(settle=False)
        for db, _ in dbs.values():
            db.cluster.drop_database(db.name)


def _first_sessions(hq) -> dict[str, float]:
    """Branch name -> start (epoch seconds) of its replicator's oldest session on HQ."""
    return {name: float(first) for name, first in hq.execute(
        "SELECT split_part(application_name, ' ', 3) AS b, extract(epoch FROM min(backend_start)) "
        "FROM pg_stat_activity WHERE application_name LIKE 'replicator run %%' GROUP BY b")}


def _reconnect_spread(kit, scratch_cluster, hq, w) -> None:
    branches = list(w.branches.values())
    for b in branches:
        b.init(include_customers=True)
    daemons = [kit.daemon(b) for b in branches]
    names = {b.name for b in branches}
    for d in daemons:
        wait_until(lambda: d.count("replicating 11 tables") == 1, 60, "every replicator to start", d)
    time.sleep(0.5)                             # into their polling loops
    scratch_cluster.stop(mode="fast")          # every branch session ends at once
    time.sleep(7)                               # past the first backoff step (0.5 s, then 1 s)
    scratch_cluster.start()
    firsts: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(firsts) < len(names):
        assert time.monotonic() < deadline, f"only {sorted(firsts)} reconnected:\n" + daemons[0].log()
        try:
            rows = _first_sessions(hq)
        except psycopg.OperationalError:
            rows = {}                           # still starting up
        for name, first in rows.items():
            if name in names:
                firsts.setdefault(name, first)
        time.sleep(0.02)
    spread = max(firsts.values()) - min(firsts.values())
    assert spread >= 0.25, f"eight branches reconnected within {spread:.3f} s of each other (lockstep)"
    assert bulk_changes(hq, 100) >= 100
    target = hq_snapshot(hq)                    # one target for all: their acks move HQ's snapshot
    for b, d in zip(branches, daemons):
        assert d.count("lost connection to HQ") == 1, d.log()
        wait_caught_up(hq, b, 60, d, target=target)
