"""Soak: HQ under mixed load, two branches, random faults, then `replicator verify`.

    .venv/bin/python tests/soak.py --minutes 10          # the full run
    .venv/bin/python tests/soak.py --minutes 0.5 --seed 7 # what CI runs

Starts its own clusters (HQ and two branches), loads the sample POS chain on
HQ, initializes store-001 and store-002 (each sees its own stock, registers
and devices through row filters), runs a real `replicator run` process per
branch behind a fault proxy, and keeps HQ busy with the sample's change mix
(prices, stock moves between stores, new customers, password changes...).
Meanwhile it injects a random fault every few seconds and measures how long
the branches take to catch up afterwards:

    cut, stall, cut mid-window      the network between a branch and HQ
    refuse                          HQ turns new connections away for a while
    hq-restart, branch-restart      pg_ctl restart -m immediate
    sigkill                         the replicator is SIGKILLed and restarted
    long-transaction                an HQ transaction stays open while others commit
    offline-backlog                 a replicator is stopped while HQ piles up changes

At the end it stops the load, waits for both branches and runs
`replicator verify` on each.  Exit 0 when both equal HQ and no replicator
died on its own.

This module is also the kit of the fault suite (tests/test_faults.py):
`build_world`, `Daemon`, `HQWriter`, `wait_caught_up`, `verify_cli`.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import yaml

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from faultproxy import FaultProxy  # noqa: E402
from harness import Branch, Setup, make_setup  # noqa: E402
from replicator import sample, sample_changes, state  # noqa: E402
from replicator.cluster import Cluster, Database  # noqa: E402
from replicator.reader import covers  # noqa: E402
from replicator.stream import CATALOGS as STREAM  # noqa: E402

log = logging.getLogger("soak")

HQ_YAML = REPO / "config" / "hq.yaml"
#: What the branches keep: filtered catalogs (stock, registers, devices), an excluded
#: column (users.password_hash), a composite key (stock), a text key (item_barcodes).
BRANCH_CATALOGS = ["items", "stock", "users", "customers", "policies", "currencies", "registers", "devices"]


def hq_catalogs() -> dict:
    return yaml.safe_load(HQ_YAML.read_text(encoding="utf-8"))["catalogs"]


# --------------------------------------------------------------------- world

@dataclass
class World:
    """HQ with the sample chain, branches registered (behind proxies when asked)."""

    setup: Setup
    hq: Database
    branches: dict[str, Branch] = field(default_factory=dict)
    proxies: dict[str, FaultProxy] = field(default_factory=dict)

    def close(self) -> None:
        for p in self.proxies.values():
            p.close()


def build_world(tmp: Path, hq: Database, branch_dbs: dict[str, tuple[Database, int]], size: str = "small",
                proxy: bool = True, **branch_yaml) -> World:
    """Sample chain on HQ (generated before capture, so the log starts empty), schema on
    every branch, capture installed, each branch registered with its store_id."""
    with hq.connect() as conn:
        sample.load_schema(conn)
        sample.generate(conn, size)
    for db, _ in branch_dbs.values():
        with db.connect() as conn:
            sample.load_schema(conn)
    setup = make_setup(tmp, hq, hq_catalogs())
    world = World(setup, hq)
    for name, (db, store) in branch_dbs.items():
        extra = dict(branch_yaml)
        if proxy:
            world.proxies[name] = FaultProxy(hq.cluster.port)
            extra["source"] = {"dsn": world.proxies[name].dsn(hq.dsn)}
        world.branches[name] = setup.add_branch(name, db, catalogs=BRANCH_CATALOGS,
                                                params={"store_id": store}, **extra)
    return world


def init_cli(branch: Branch, *args: str) -> subprocess.CompletedProcess:
    """`replicator init --include-customers` as a real process (customers are compared too)."""
    return branch.cli("init", "--include-customers", *args, timeout=300)


def verify_cli(branch: Branch, wait: float = 60) -> tuple[bool, dict, str]:
    """`replicator verify --json`: (equal, report, stderr)."""
    done = branch.cli("verify", "--json", "--wait", str(wait), timeout=300)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = {}
    return done.returncode == 0 and report.get("equal") is True, report, done.stderr


# --------------------------------------------------------------------- daemon

class Daemon:
    """`replicator run` as a real process; its log goes to a file."""

    def __init__(self, branch: Branch, log_path: Path):
        self.branch = branch
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.start()

    def start(self) -> None:
        with open(self.log_path, "a") as out:
            self.proc = self.branch.popen("run", stdout=subprocess.DEVNULL, stderr=out)
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, settle: bool = True) -> None:
        """SIGKILL: no cleanup, no last transaction, like a power cut of the process.

        With settle, also wait until the branch server has ended the dead process's
        session (it notices at its next read from the socket, so a statement in
        progress finishes first): until then that session still holds the
        replicator lock and a new `replicator run` refuses to start, which is why
        a supervisor restarts it after a delay."""
        if not self.alive():
            return
        pid = self.proc.pid
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if settle:
            self._wait_session_gone(pid)

    def _wait_session_gone(self, pid: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.branch.db.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name "
                                             "LIKE %s", (f"replicator run % pid {pid}",)):
                    return
            except psycopg.OperationalError:
                return    # the branch server is down: its sessions are gone too
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait: the daemon finishes its transaction and exits 0."""
        if not self.alive():
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(settle=False)
            return -9

    def log(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])

    def count(self, text: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except FileNotFoundError:
            return 0


# --------------------------------------------------------------------- HQ load

class HQWriter(threading.Thread):
    """HQ keeps working: the sample's mix of small transactions, reconnecting through outages."""

    def __init__(self, dsn: str, seed: int, rate: float = 50.0, batch: int = 5):
        super().__init__(daemon=True, name=f"hq-writer-{seed}")
        self.dsn, self.rng, self.rate, self.batch = dsn, random.Random(seed), rate, batch
        self.rows = self.transactions = self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                self.rows += sample_changes.random_changes(conn, self.batch, self.rng)
                self.transactions += self.batch
            except psycopg.Error:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                self.halt.wait(0.3)
                continue
            if self.rate:
                self.halt.wait(max(0.0, self.batch / self.rate - (time.monotonic() - started)))
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def bulk_changes(hq: Database, n: int) -> int:
    """About `n` changes for every branch, fast: whole-table UPDATEs of item_prices."""
    per = hq.scalar("SELECT count(*) FROM public.item_prices")
    done = 0
    with hq.connect() as conn:
        while done < n:
            try:
                conn.execute("UPDATE public.item_prices SET price = price + 0.01, updated_at = now()")
            except psycopg.errors.DeadlockDetected:
                continue    # a writer locked prices in another order; HQ rolled us back, go again
            done += per
    return done


# --------------------------------------------------------------------- waiting

def hq_snapshot(hq: Database, timeout: float = 60) -> str:
    return _retry(lambda: hq.scalar("SELECT pg_current_snapshot()::text"), timeout)


def caught_up(hq: Database, branch: Branch, target: str) -> bool:
    with branch.db.connect() as bconn:
        pos = state.load_position(bconn, STREAM)
    if pos is None or pos.window_snapshot is not None:
        return False
    with hq.connect() as hconn:
        return covers(hconn, pos.snapshot, target)


def wait_caught_up(hq: Database, branch: Branch, timeout: float = 120, daemon: Daemon | None = None,
                   target: str | None = None) -> float:
    """Seconds until the branch position covers HQ's snapshot now (or `target`)."""
    start = time.monotonic()
    target = target or hq_snapshot(hq)
    while True:
        try:
            if caught_up(hq, branch, target):
                return time.monotonic() - start
        except psycopg.OperationalError:
            pass    # a server is restarting: keep waiting
        if daemon is not None and not daemon.alive():
            raise AssertionError(f"replicator for {branch.name} exited {daemon.proc.returncode}:\n{daemon.log()}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{branch.name} did not catch up within {timeout} s"
                                 + (f":\n{daemon.log()}" if daemon else ""))
        time.sleep(0.1)


def _retry(fn, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def position(db: Database) -> state.Position:
    with db.connect() as conn:
        return state.load_position(conn, STREAM)


# --------------------------------------------------------------------- soak

@dataclass
class Soak:
    """The running soak: clusters, world, daemons, writers, and what happened."""

    hq_cluster: Cluster
    branch_clusters: dict[str, Cluster]
    world: World
    daemons: dict[str, Daemon]
    writers: list[HQWriter]
    rng: random.Random
    scale: float
    recoveries: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    unexpected_exits: list[str] = field(default_factory=list)

    @property
    def hq(self) -> Database:
        return self.world.hq

    def check_daemons(self) -> None:
        """A replicator that exits on its own is a finding; restart it (as systemd would)."""
        for name, d in self.daemons.items():
            if not d.alive():
                self.unexpected_exits.append(f"{name}: exit {d.proc.returncode}\n{d.log(15)}")
                log.warning("replicator %s exited on its own (%s); restarting", name, d.proc.returncode)
                d.start()

    # ---------------------------------------------------------- faults
    def fault_cut(self, name: str) -> str:
        n = self.world.proxies[name].cut()
        return f"cut {n} connections of {name}"

    def fault_stall(self, name: str) -> str:
        seconds = self.rng.uniform(1, 5)
        self.world.proxies[name].stall(seconds, wait=True)
        return f"stalled {name}'s link for {seconds:.1f} s"

    def fault_cut_mid_window(self, name: str) -> str:
        proxy = self.world.proxies[name]
        after = self.rng.randint(20_000, 300_000)
        proxy.cut_after(after)
        bulk_changes(self.hq, 8000)
        deadline = time.monotonic() + 15
        while proxy.armed and time.monotonic() < deadline:
            time.sleep(0.05)
        fired = not proxy.armed
        proxy.disarm()
        return f"{'cut' if fired else 'armed (not reached)'} {name}'s link after {after} bytes of a window"

    def fault_refuse(self, name: str) -> str:
        seconds = self.rng.uniform(2, 6)
        proxy = self.world.proxies[name]
        proxy.refuse(seconds)
        proxy.cut()
        time.sleep(seconds)
        return f"HQ refused {name}'s connections for {seconds:.1f} s"

    def fault_hq_restart(self, name: str) -> str:
        self.hq_cluster.restart(mode="immediate")
        return "HQ restarted (immediate)"

    def fault_branch_restart(self, name: str) -> str:
        self.branch_clusters[name].restart(mode="immediate")
        return f"{name}'s cluster restarted (immediate)"

    def fault_sigkill(self, name: str) -> str:
        d = self.daemons[name]
        d.kill()
        time.sleep(self.rng.uniform(0.1, 2))
        d.start()
        return f"SIGKILLed {name}'s replicator and started it again"

    def fault_long_transaction(self, name: str) -> str:
        seconds = self.rng.uniform(5, 20) * self.scale
        with self.hq.connect(autocommit=False) as conn:
            # rows the writers never touch: the others must not queue behind its locks
            conn.execute("UPDATE public.currencies SET decimals = CASE WHEN decimals = 2 THEN 3 ELSE 2 END "
                         "WHERE code = 'CAD'")
            conn.execute("INSERT INTO public.customers (code, name) VALUES ('L' || pg_current_xact_id()::text, "
                         "'Cliente de la transacción larga')")
            time.sleep(seconds)
            conn.commit()
        return f"HQ transaction held open {seconds:.1f} s while others committed"

    def fault_offline_backlog(self, name: str) -> str:
        d = self.daemons[name]
        d.stop()
        n = bulk_changes(self.hq, int(self.rng.uniform(10_000, 40_000) * self.scale))
        time.sleep(self.rng.uniform(1, 4))
        d.start()
        return f"{name} offline while HQ made {n} changes"

    FAULTS = ("cut", "stall", "cut_mid_window", "refuse", "hq_restart", "branch_restart", "sigkill",
              "long_transaction", "offline_backlog")

    def inject(self) -> None:
        """One random fault, then the time until every branch has HQ's changes made so far."""
        kind = self.rng.choice(self.FAULTS)
        name = self.rng.choice(sorted(self.daemons))
        started = time.monotonic()
        what = getattr(self, f"fault_{kind}")(name)
        ended = time.monotonic()
        target = hq_snapshot(self.hq)
        self.check_daemons()
        for b, branch in self.world.branches.items():
            wait_caught_up(self.hq, branch, timeout=180, target=target)
        recovered = time.monotonic() - ended
        self.recoveries[kind].append(recovered)
        log.info("fault %-16s %s (%.1f s); caught up %.1f s later", kind, what, ended - started, recovered)


def soak(minutes: float, seed: int, size: str, rate: float, base_dir: str | None, keep: bool = False) -> int:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="replicator-soak-", dir=base_dir))
    started = time.monotonic()
    clusters = []
    try:
        hq_cluster = Cluster("soak-hq", base_dir=base_dir).start()
        clusters.append(hq_cluster)
        branch_clusters = {}
        for name in ("store-001", "store-002"):
            branch_clusters[name] = Cluster(f"soak-{name}", base_dir=base_dir).start()
            clusters.append(branch_clusters[name])
        hq = hq_cluster.create_database("pos")
        dbs = {name: (c.create_database("pos"), i + 1) for i, (name, c) in enumerate(branch_clusters.items())}
        world = build_world(tmp, hq, dbs, size=size, batch_rows=2000)
        for b in world.branches.values():
            done = init_cli(b)
            if done.returncode != 0:
                raise SystemExit(f"init of {b.name} failed: {done.stderr}")
        daemons = {name: Daemon(b, tmp / f"{name}.log") for name, b in world.branches.items()}
        writers = [HQWriter(hq.dsn, seed * 100 + i, rate=rate / 2) for i in range(2)]
        for w in writers:
            w.start()
        s = Soak(hq_cluster, branch_clusters, world, daemons, writers, rng,
                 scale=min(1.0, max(0.25, minutes / 10)))
        deadline = time.monotonic() + minutes * 60
        pause = min(20.0, max(2.0, minutes * 60 / 8))
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 1.5) * pause / 2)
            if time.monotonic() >= deadline:
                break
            s.inject()
        for w in writers:
            w.stop()
        result = _finish(s, tmp, started)
        if result == 0 and not keep:
            shutil.rmtree(tmp, ignore_errors=True)    # logs are kept when something failed
        return result
    finally:
        for c in clusters:
            c.cleanup()


def _finish(s: Soak, tmp: Path, started: float) -> int:
    """Catch up, verify both branches, print the summary; 0 when all is well."""
    results = {}
    for name, b in s.world.branches.items():
        wait_caught_up(s.hq, b, timeout=300, daemon=s.daemons[name])
        results[name] = verify_cli(b)
    s.check_daemons()
    for d in s.daemons.values():
        d.stop()
    s.world.close()
    hq_txn = sum(w.transactions for w in s.writers)
    hq_rows = sum(w.rows for w in s.writers)
    print(f"soak: {(time.monotonic() - started) / 60:.1f} min; configs and replicator logs in {tmp}")
    print(f"HQ: {hq_txn:,} transactions changing {hq_rows:,} rows (writer retries through outages: "
          f"{sum(w.errors for w in s.writers)})")
    for name, (equal, report, err) in results.items():
        pos = position(s.world.branches[name].db)
        tables = [t for t in report.get("tables", []) if t["status"] != "not initialized"]
        verdict = "equal" if equal else f"DIFFERENT {[t['table'] for t in tables if t['status'] == 'different']} {err}"
        print(f"{name}: applied {pos.applied_changes:,} changes; verify: {verdict} ({len(tables)} tables)")
    total = sum(len(v) for v in s.recoveries.values())
    print(f"faults injected: {total}")
    for kind in Soak.FAULTS:
        times = s.recoveries.get(kind)
        if times:
            print(f"  {kind:<18} {len(times):>3}  caught up after: avg {statistics.mean(times):.1f} s, "
                  f"max {max(times):.1f} s")
    print(f"replicators that exited on their own: {len(s.unexpected_exits)}")
    for e in s.unexpected_exits:
        print("  " + e.replace("\n", "\n    "))
    ok = all(r[0] for r in results.values()) and not s.unexpected_exits
    print("RESULT: PASS" if ok else "RESULT: FAIL")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long HQ keeps changing (default 10)")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 10_000, help="random seed (printed)")
    ap.add_argument("--size", choices=["tiny", "small", "demo"], default="small", help="sample chain size")
    ap.add_argument("--rate", type=float, default=80.0, help="HQ transactions per second (default 80)")
    ap.add_argument("--base-dir", default=None, help="where clusters and logs go (default: temp dir)")
    ap.add_argument("--keep-logs", action="store_true", help="keep configs and replicator logs after a pass")
    ap.add_argument("-v", "--verbose", action="store_true", help="also log the replicator library")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        for name in ("replicator", "faultproxy"):
            logging.getLogger(name).setLevel(logging.WARNING)
    print(f"soak: {args.minutes} min, seed {args.seed}, size {args.size}, {args.rate} HQ transactions/s",
          flush=True)
    return soak(args.minutes, args.seed, args.size, args.rate, args.base_dir, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
