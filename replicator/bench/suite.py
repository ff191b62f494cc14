"""Benchmarks against PostgreSQL's own logical replication, a raw COPY pipe and no capture.

Every figure is a ratio against a baseline measured in the same run, on the same
machine, between the same throwaway clusters, because shared machines are noisy
and only ratios travel.  Run::

    python -m replicator.bench                 # the full suite (about half an hour on 2 cores)
    python -m replicator.bench --quick         # a smoke run at tiny sizes (CI)
    python -m replicator.bench --only catchup --runs 5 --markdown perf.md

Benchmarks (``--only`` names):

* ``catchup``: N mixed changes (40% insert, 50% update, 10% delete, ~1,000 rows per
  transaction) queued on HQ while the branch is stopped, then ``replicator run --once``
  (the real CLI, timed end to end, peak RSS from ``wait4``).  Baseline: a native
  subscription disabled during the same workload, then enabled and timed until the
  last transaction is visible on the subscriber (it applies in commit order).
* ``init``: ``replicator init`` of a 1,000,000-row table vs ``COPY ... TO STDOUT`` piped
  into ``COPY ... FROM STDIN`` with psycopg (binary and text; the faster one counts).
* ``capture``: pgbench single-row UPDATEs, 2 clients, with the capture triggers
  enabled vs disabled on the same table; one bulk UPDATE of every row likewise; on the
  durable HQ also 8 clients with 20 ``replicator run`` daemons connected and polling, and
  the HQ CPU each idle connected branch costs (its backend's schedstat).
* ``latency``: commit on HQ to visible on the branch at 50 single-row commits/s
  with ``replicator run`` running (polling every 250 ms), vs a native subscription.
* ``uploads``: sales up.  60,000 sales (a header and two lines each, one transaction per
  sale) queued at a branch while its ``replicator run`` is paused (SIGSTOP), then timed from
  SIGCONT until HQ holds the last sale (into HQ's tables through the branch's login,
  row-level security on); baseline: a native subscription at HQ to a publication on the
  branch, disabled during the same queue, timed from ENABLE.  Ten
  branches at once into one HQ likewise, against ten subscriptions into one HQ database,
  with HQ's CPU per branch.  And capture's cost for a sale (a header and three lines in one
  transaction) on a durable branch, pgbench with capture vs without.
* ``fanout``: K ``replicator run`` daemons against one HQ at 500 changes/s: each
  branch's lag p99, HQ CPU per branch; and the window query's plan and time with a
  small and a big change log (``EXPLAIN (ANALYZE, FORMAT JSON)`` of ``LogReader.plain_query``).
* ``fleet``: a thousand simulated branches (their own logins, through PgBouncer, the
  daemon's own queries on its schedule: fleet.py) on a durable HQ: HQ's CPU for
  polling while idle and while a pgbench writer changes stock, the writer's TPS with the
  fleet vs without, and the lag of every change the branches see.

The command exits 0 when every benchmark ran (whether or not targets are met; use
``--strict`` to fail on a missed target) and 1 when a benchmark could not run.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import yaml
from psycopg import sql

from .. import config
from ..capture import install
from ..cluster import Cluster, Database, find_bindir
from ..hq import add_branch
from ..initialize import initialize
from ..reader import LogReader, current_snapshot
from ..schema import source_tables
from ..session import IDLE_AFTER
from .fleet import bench_fleet
from .kit import (Result, cluster_cpu_seconds, limit_result, machine_line, markdown_table, median, percentile,
                  pgbench_tps, process_cpu_seconds, ratio_result, say, text_table)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = ("catchup", "init", "capture", "latency", "fanout", "restrict", "uploads", "fleet")

# Same settings for every cluster, so ours and the baselines see the same server.
# A large max_wal_size keeps checkpoints out of the timed parts of 1M-row runs.  The
# launcher waits wal_retrieve_retry_interval (default 5 s) before restarting a
# subscription's worker; lowered so native catch-up is timed from ENABLE, not from a timer.
SETTINGS = {"max_wal_size": "8GB", "checkpoint_timeout": "30min", "max_connections": 300,
            "max_replication_slots": 20, "max_wal_senders": 20, "autovacuum_naptime": "10s",
            "wal_retrieve_retry_interval": "100ms", "max_logical_replication_workers": 12,
            "max_worker_processes": 24}

SCHEMA = """
CREATE TABLE items (
    id         bigint PRIMARY KEY,
    sku        text NOT NULL,
    name       text NOT NULL,
    price      numeric(12,2) NOT NULL,
    updated_at timestamptz NOT NULL,
    active     boolean NOT NULL
)"""
# Deterministic row g: the same on every cluster, so the native baseline starts equal.
ROW_EXPR = """g, 'SKU-' || lpad(g::text, 10, '0'), 'Artículo ' || g || ' ' || md5(g::text),
       round((g %% 100000) / 100.0 + 1, 2), timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
       g %% 7 <> 0"""   # written for parameterized queries: %% is the modulo operator
FILL = "INSERT INTO items SELECT " + ROW_EXPR + " FROM generate_series(%s::bigint, %s::bigint) g"
CATALOGS = {"items": {"label": "Artículos", "default": True, "tables": ["public.items"]}}
CHECKSUM = "SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0) FROM items t"


# ============================================================== sizes

@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; --quick shrinks everything to a smoke run."""
    catchup_txns: int          # transactions of 1,000 changes each
    init_rows: int
    capture_rows: int
    pgbench_seconds: int
    latency_seconds: float
    latency_rate: int          # single-row commits per second
    fanout_branches: int
    fanout_seconds: float
    fanout_rate: int           # changes per second
    fanout_rows_per_txn: int
    log_small: int
    log_big: int
    restrict_items: int = 20_000   # items per store of the filtered table (20 stores)
    restrict_txns: int = 1000      # catch-up transactions, each updating 10 items in every store
    upload_sales: int = 60_000     # sales queued at one branch (and in all, over ten branches)
    fleet_branches: int = 1000     # simulated branches of the fleet benchmark (fleet.py)
    fleet_seconds: int = 20        # each phase


FULL = Sizes(catchup_txns=1000, init_rows=1_000_000, capture_rows=1_000_000, pgbench_seconds=20,
             latency_seconds=20, latency_rate=50, fanout_branches=50, fanout_seconds=120,
             fanout_rate=500, fanout_rows_per_txn=5, log_small=1_000, log_big=10_000_000)
QUICK = Sizes(catchup_txns=10, init_rows=20_000, capture_rows=20_000, pgbench_seconds=3,
              latency_seconds=3, latency_rate=50, fanout_branches=3, fanout_seconds=10,
              fanout_rate=500, fanout_rows_per_txn=5, log_small=1_000, log_big=100_000,
              restrict_items=500, restrict_txns=10, upload_sales=600,
              fleet_branches=40, fleet_seconds=4)


# ============================================================== processes

@dataclass
class Finished:
    seconds: float
    returncode: int
    peak_rss_mb: float
    cpu_seconds: float
    stdout: str
    stderr: str


def replicator_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "replicator", *args]


def start(cmd: list[str], logdir: Path, name: str) -> subprocess.Popen:
    """Start a process with output in files (no pipe to drain, so nothing can block)."""
    out = open(logdir / f"{name}.out", "w+")
    err = open(logdir / f"{name}.err", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    proc._bench_files = (out, err)  # type: ignore[attr-defined]
    proc._bench_started = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def reap(proc: subprocess.Popen, timeout: float | None = None) -> Finished:
    """Wait for `proc` with wait4: its own peak RSS and CPU, not every child's maximum."""
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if timer:
            timer.cancel()
    ended = time.perf_counter()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc._bench_files  # type: ignore[attr-defined]
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read())
        f.close()
    return Finished(ended - proc._bench_started, proc.returncode,  # type: ignore[attr-defined]
                    usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, *texts)


def run_timed(cmd: list[str], logdir: Path, name: str, timeout: float) -> Finished:
    done = reap(start(cmd, logdir, name), timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def stop(proc: subprocess.Popen, timeout: float = 30) -> Finished:
    """SIGTERM (the daemon finishes its transaction and exits 0), then reap."""
    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    return reap(proc, timeout)








# ============================================================== setup helpers

class Env:
    """The clusters, a work directory, and fresh databases on demand."""

    def __init__(self, workdir: Path, sizes: Sizes, runs: int):
        self.workdir = workdir
        self.sizes = sizes
        self.runs = runs
        self.hq = Cluster("bench-hq", settings=SETTINGS)
        # As an HQ runs in production: every commit flushed, full-page writes after checkpoints.
        self.hq_durable = Cluster("bench-hq-durable", settings={**SETTINGS, "fsync": True,
                                                                 "full_page_writes": True})
        self.branch = Cluster("bench-branch", settings=SETTINGS)
        self.branch2 = Cluster("bench-branch2", settings=SETTINGS)
        # A durable HQ with room for a backend per simulated branch (PgBouncer keeps a pool per login).
        self.fleet = Cluster("bench-fleet", settings={**SETTINGS, "fsync": True, "full_page_writes": True,
                                                      "max_connections": sizes.fleet_branches + 100})
        self._started: list[Cluster] = []

    def cluster(self, which: str) -> Cluster:
        c = getattr(self, which)
        if not c.is_running():
            c.start()
            self._started.append(c)
        return c

    def fresh(self, which: str, name: str) -> Database:
        c = self.cluster(which)
        c.drop_database(name)
        return c.create_database(name)

    def close(self) -> None:
        for c in self._started:
            c.cleanup()

    def cpu(self) -> dict[str, float]:
        """CPU-seconds used so far by each running cluster (HQ and branch sides of a run)."""
        return {c.name: cluster_cpu_seconds(c) for c in self._started if c.is_running()}

    def cpu_since(self, before: dict[str, float]) -> tuple[float, str]:
        """(total CPU-seconds of the clusters since `before`, a per-cluster breakdown)."""
        now = self.cpu()
        used = {name.removeprefix("bench-"): now[name] - before.get(name, 0) for name in now}
        text = ", ".join(f"{name} {secs:.1f} s" for name, secs in used.items() if secs >= 0.05)
        return sum(used.values()), text

    def checkpoint(self) -> None:
        """Flush dirty buffers on every cluster so no checkpoint lands in a timed part."""
        for c in self._started:
            c.database("postgres").execute("CHECKPOINT")


@dataclass
class Pair:
    """An HQ database with capture and one registered, initialized branch."""
    hq: Database
    branch: Database
    hq_yaml: Path
    branch_yaml: Path


def write_hq_yaml(path: Path, hq: Database) -> config.HQConfig:
    path.write_text(yaml.safe_dump({"dsn": hq.dsn, "retention": "7d", "catalogs": CATALOGS},
                                   sort_keys=False, allow_unicode=True))
    return config.load_hq(path)


def capture_db(env: Env, name: str, rows: int, which: str = "hq") -> tuple[Database, Path]:
    """HQ database `name` with `rows` items (loaded before capture, so not logged) and capture."""
    hq = env.fresh(which, name)
    hq.execute(SCHEMA)
    fill(hq, 1, rows)
    path = env.workdir / f"{name}.hq.yaml"
    cfg = write_hq_yaml(path, hq)
    with hq.connect() as conn:
        install(conn, cfg)
    return hq, path


BRANCH_PASSWORD = "bench-branch-login"


def register_branch(hq: Database, hq_yaml: Path, name: str, branch: Database, workdir: Path,
                    init: bool = True, catalogs: list[str] | None = None, params: dict | None = None) -> Path:
    """Register `name` on HQ, write its branch.yaml, optionally init it.  The branch logs in to
    HQ as its own role, as in production, so row-level security on the log is measured too."""
    cfg = config.load_hq(hq_yaml)
    with hq.connect() as conn:
        reg = add_branch(conn, cfg, name, params or {}, password=BRANCH_PASSWORD)
    path = workdir / f"{name}.branch.yaml"
    source = hq.cluster.dsn(hq.name, reg.role, BRANCH_PASSWORD)
    doc = {"branch": name, "source": {"dsn": source}, "target": {"dsn": branch.dsn}}
    if catalogs is not None:
        doc["catalogs"] = catalogs
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    if init:
        initialize(config.load_branch(path))
    return path


def make_pair(env: Env, name: str, base_rows: int, branch_cluster: str = "branch") -> Pair:
    hq, hq_yaml = capture_db(env, f"{name}_hq", base_rows)
    br = env.fresh(branch_cluster, f"{name}_br")
    br.execute(SCHEMA)
    path = register_branch(hq, hq_yaml, name.replace("_", "-"), br, env.workdir)
    return Pair(hq, br, hq_yaml, path)


def fill(db: Database, lo: int, hi: int) -> None:
    if hi >= lo:
        db.execute(FILL, (lo, hi))
        db.execute("VACUUM ANALYZE items")


def checksum(db: Database) -> tuple[int, int]:
    return tuple(db.execute(CHECKSUM)[0])


@dataclass
class Native:
    """A publication on `src` and a subscription on `dst` (copy_data = false)."""
    src: Database
    dst: Database
    sub: str

    tables: str = "items"

    def create(self) -> None:
        self.src.execute(f"CREATE PUBLICATION bench_pub FOR TABLE {self.tables}")   # bench's own names
        self.dst.execute(sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION bench_pub "
                                 "WITH (copy_data = false)").format(
            sql.Identifier(self.sub), sql.Literal(self.src.dsn)))

    def worker_running(self) -> bool:
        return bool(self.dst.scalar("SELECT count(*) FROM pg_stat_subscription WHERE subname = %s "
                                    "AND pid IS NOT NULL", (self.sub,)))

    def slot_active(self) -> bool:
        return bool(self.src.scalar("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                    (self.sub,)))

    def disable(self) -> None:
        self.dst.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(self.sub)))
        wait_for(lambda: not self.worker_running() and not self.slot_active(), 30,
                 "native subscription to stop")

    def enable(self) -> None:
        self.dst.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(self.sub)))

    def drop(self) -> None:
        self.dst.execute(sql.SQL("DROP SUBSCRIPTION IF EXISTS {}").format(sql.Identifier(self.sub)))


def make_native(env: Env, name: str, base_rows: int) -> Native:
    src = env.fresh("hq", f"{name}_src")
    dst = env.fresh("branch", f"{name}_dst")
    for db in (src, dst):
        db.execute(SCHEMA)
        fill(db, 1, base_rows)
    native = Native(src, dst, f"{name}_sub")
    native.create()
    return native


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# ============================================================== catch-up

@dataclass(frozen=True)
class Mixed:
    """The mixed workload: per transaction 400 inserts, 500 updates, 100 deletes.

    Deletes eat the first ids of the base rows in order; updates touch a disjoint
    region of base rows, 500 distinct ids per transaction; inserts add new ids.
    Deterministic, so the native baseline ends with byte-identical tables.
    """
    txns: int
    inserts: int = 400
    updates: int = 500
    deletes: int = 100

    @property
    def delete_region(self) -> int:
        return self.txns * self.deletes

    @property
    def update_span(self) -> int:
        span = max(10 * self.delete_region, 10_000) + 3
        while span % 199 == 0:   # 199 strides must not repeat an id inside one transaction
            span += 1
        return span

    @property
    def base_rows(self) -> int:
        return self.delete_region + self.update_span

    @property
    def changes(self) -> int:
        return self.txns * (self.inserts + self.updates + self.deletes)

    @property
    def last_id(self) -> int:
        return self.base_rows + self.txns * self.inserts

    @property
    def final_rows(self) -> int:
        return self.base_rows + self.txns * (self.inserts - self.deletes)

    def run(self, db: Database) -> float:
        """Write the workload, one transaction at a time; return seconds."""
        insert = "INSERT INTO items SELECT " + ROW_EXPR + " FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g"
        update = ("UPDATE items SET price = price + 1, updated_at = updated_at + interval '1 second', "
                  "active = NOT active WHERE id IN (SELECT %(base)s + (%(off)s + g * 199) %% %(span)s "
                  "FROM generate_series(0, %(n)s - 1) g)")
        delete = "DELETE FROM items WHERE id BETWEEN %(lo)s AND %(hi)s"
        started = time.perf_counter()
        with db.connect(autocommit=False) as conn:
            for t in range(self.txns):
                lo = self.base_rows + t * self.inserts + 1
                conn.execute(insert, {"lo": lo, "hi": lo + self.inserts - 1})
                conn.execute(update, {"base": self.delete_region + 1, "off": t * self.updates,
                                      "span": self.update_span, "n": self.updates})
                conn.execute(delete, {"lo": t * self.deletes + 1, "hi": (t + 1) * self.deletes})
                conn.commit()
        return time.perf_counter() - started


def catchup_ours(env: Env, work: Mixed, run: int) -> tuple[float, Finished, float]:
    """(changes/s, the finished `run --once`, CPU-seconds of replicator + both clusters)."""
    pair = make_pair(env, f"catchup{run}", work.base_rows)
    say("catch-up run %d: writing %d changes on HQ (branch stopped)", run, work.changes)
    secs = work.run(pair.hq)
    say("  workload written in %.1f s; replicator run --once ...", secs)
    env.checkpoint()
    cpu = env.cpu()
    done = run_timed(replicator_cmd("-q", "run", "--once", "-c", str(pair.branch_yaml)),
                     env.workdir, f"catchup{run}", timeout=3600)
    cpu_total, cpu_text = env.cpu_since(cpu)
    say("  CPU: replicator %.1f s, %s", done.cpu_seconds, cpu_text)
    check_equal(pair.hq, pair.branch, work.final_rows, "catch-up")
    env.hq.drop_database(pair.hq.name)
    env.branch.drop_database(pair.branch.name)
    return work.changes / done.seconds, done, cpu_total + done.cpu_seconds


def catchup_native(env: Env, work: Mixed, run: int) -> tuple[float, float]:
    """(changes/s, CPU-seconds of both clusters) for the native subscription's catch-up."""
    native = make_native(env, f"ncatchup{run}", work.base_rows)
    try:
        native.disable()
        say("catch-up run %d (native): writing %d changes on the publisher", run, work.changes)
        work.run(native.src)
        env.checkpoint()
        with native.dst.connect() as conn:
            probe = "SELECT EXISTS (SELECT FROM items WHERE id = %s)"
            cpu = env.cpu()
            started = time.perf_counter()
            native.enable()
            while not conn.execute(probe, (work.last_id,)).fetchone()[0]:
                if time.perf_counter() - started > 3600:
                    raise RuntimeError("native catch-up did not finish within an hour")
                time.sleep(0.005)
            seconds = time.perf_counter() - started
        cpu_total, cpu_text = env.cpu_since(cpu)
        say("  native CPU: %s", cpu_text)
        check_equal(native.src, native.dst, work.final_rows, "native catch-up")
        return work.changes / seconds, cpu_total
    finally:
        native.drop()
        env.hq.drop_database(native.src.name)
        env.branch.drop_database(native.dst.name)


def check_equal(a: Database, b: Database, rows: int, what: str) -> None:
    ca, cb = checksum(a), checksum(b)
    if ca != cb or ca[0] != rows:
        raise RuntimeError(f"{what}: tables differ after the run (source {ca}, target {cb}, "
                           f"expected {rows} rows)")


def bench_catchup(env: Env) -> list[Result]:
    work = Mixed(env.sizes.catchup_txns)
    ours, native, rss, cpu_ours, cpu_native = [], [], [], [], []
    for run in range(env.runs):
        rate, done, cpu = catchup_ours(env, work, run)
        ours.append(rate)
        rss.append(done.peak_rss_mb)
        cpu_ours.append(cpu)
        say("  ours: %.0f changes/s (%.1f s, peak RSS %.0f MB)", rate, work.changes / rate, done.peak_rss_mb)
        rate, cpu = catchup_native(env, work, run)
        native.append(rate)
        cpu_native.append(cpu)
        say("  native: %.0f changes/s", rate)
    note = (f"{work.changes:,} changes, median of {env.runs}; baseline: native logical replication; "
            f"CPU-seconds (all processes): ours {median(cpu_ours):.1f}, native {median(cpu_native):.1f}")
    return [ratio_result("catch-up apply", "rate", median(ours), median(native), "changes/s", 1.0, True,
                         note),
            limit_result("memory", "peak RSS during catch-up", max(rss), 150, "MB",
                         note=f"`replicator run --once` over {work.changes:,} changes (max of runs)")]


# ============================================================== initial copy

COPY_COLS = "id, sku, name, price, updated_at, active"


def copy_pipe(src: Database, dst: Database, binary: bool) -> float:
    """A raw baseline: COPY TO STDOUT streamed row by row through psycopg into COPY FROM STDIN,
    in one target transaction."""
    fmt = " (FORMAT binary)" if binary else ""
    started = time.perf_counter()
    with src.connect() as s, dst.connect(autocommit=False) as d:
        d.execute("TRUNCATE items")
        with s.cursor().copy(f"COPY items ({COPY_COLS}) TO STDOUT{fmt}") as cin, \
                d.cursor().copy(f"COPY items ({COPY_COLS}) FROM STDIN{fmt}") as cout:
            for data in cin:
                cout.write(data)
        d.commit()
    return time.perf_counter() - started


def psql_pipe(src: Database, dst: Database, binary: bool) -> float:
    """The rawest baseline: `psql -c 'COPY ... TO STDOUT' | psql -c 'COPY ... FROM STDIN'`,
    two C clients and an OS pipe, TRUNCATE and COPY in one target transaction."""
    fmt = "binary" if binary else "text"
    psql = str(find_bindir() / "psql")

    def args(db: Database) -> list[str]:
        c = db.cluster
        return [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", c.host, "-p", str(c.port), "-U", c.superuser,
                "-d", db.name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    started = time.perf_counter()
    out = subprocess.Popen([*args(src), "-c", f"COPY items ({COPY_COLS}) TO STDOUT (FORMAT {fmt})"],
                           stdout=subprocess.PIPE, env=env)
    into = subprocess.run([*args(dst), "-1", "-c", "TRUNCATE items",
                           "-c", f"COPY items ({COPY_COLS}) FROM STDIN (FORMAT {fmt})"],
                          stdin=out.stdout, capture_output=True, text=True, env=env)
    out.stdout.close()
    if out.wait() != 0 or into.returncode != 0:
        raise RuntimeError(f"psql COPY pipe failed: {into.stderr.strip()[-500:]}")
    return time.perf_counter() - started


def bench_init(env: Env) -> list[Result]:
    rows = env.sizes.init_rows
    say("initial copy: loading %d rows on HQ", rows)
    hq, hq_yaml = capture_db(env, "init_hq", rows)
    br = env.fresh("branch", "init_br")
    raw = env.fresh("branch", "init_raw")     # the pipe's target: a plain table, no branch guard
    hq.execute("VACUUM (ANALYZE) items")   # no autovacuum pass on HQ's table during the timed runs
    for db in (br, raw):
        db.execute(SCHEMA)
        # Autovacuum wakes on each freshly loaded target, and the next run's TRUNCATE then waits
        # deadlock_timeout (1 s) before cancelling it: that wait measured the clock, not the copy.
        db.execute("ALTER TABLE items SET (autovacuum_enabled = off)")
    path = register_branch(hq, hq_yaml, "init-bench", br, env.workdir, init=False)
    pipes = {"psql binary": lambda: psql_pipe(hq, raw, True), "psql text": lambda: psql_pipe(hq, raw, False),
             "psycopg binary": lambda: copy_pipe(hq, raw, True)}
    ours, base, rss, library, formats = [], [], [], [], {name: [] for name in pipes}
    try:
        for run in range(env.runs):
            env.checkpoint()
            done = run_timed(replicator_cmd("init", "--force", "-c", str(path)), env.workdir,
                             f"init{run}", timeout=3600)
            check_equal(hq, br, rows, "init")
            copied = re.search(r"copied public\.items: .* in ([0-9.]+) s", done.stdout + done.stderr)
            library.append(float(copied.group(1)) if copied else float("nan"))
            ours.append(done.seconds)
            rss.append(done.peak_rss_mb)
            timings = {}
            for name, pipe in pipes.items():
                env.checkpoint()
                timings[name] = pipe()
                check_equal(hq, raw, rows, name)
            base.append(min(timings.values()))
            for name, secs in timings.items():
                formats[name].append(secs)
            say("  run %d: init %.2f s end to end, copy phase %.2f s, RSS %.0f MB; pipes: %s", run, done.seconds,
                library[-1], done.peak_rss_mb, ", ".join(f"{n} {s:.2f} s" for n, s in timings.items()))
    finally:
        env.hq.drop_database(hq.name)
        env.branch.drop_database(br.name)
        env.branch.drop_database(raw.name)
    pipes_text = ", ".join(f"{n} {median(s):.2f} s" for n, s in formats.items())
    return [ratio_result("initial copy", "rate, end to end", rows / median(ours), rows / median(base), "rows/s",
                         0.9, True, f"{rows:,} rows; `replicator init` as a new process (start, checks, copy, "
                                    f"commit) vs the fastest raw pipe of each run ({pipes_text})"),
            ratio_result("initial copy", "rate, copy phase", rows / median(library), rows / median(base), "rows/s",
                         0.9, True, "HQ COPY into branch COPY as init logs it (connect, checks, TRUNCATE "
                                    "and COMMIT outside it) vs the same pipes"),
            limit_result("memory", "peak RSS of init", max(rss), 200, "MB", note="`replicator init` (max of runs)")]


# ============================================================== capture overhead

PGBENCH_SCRIPT = "\\set id random(1, :n)\nUPDATE items SET price = price + 1 WHERE id = :id;\n"





def set_capture(db: Database, on: bool | str) -> None:
    """on: capture's triggers; False: none; "floor": only the cheapest possible capture."""
    db.execute("ALTER TABLE items DISABLE TRIGGER USER")
    if on == "floor":
        db.execute("ALTER TABLE items ENABLE TRIGGER bench_floor")
    elif on:
        db.execute("ALTER TABLE items ENABLE TRIGGER USER; ALTER TABLE items DISABLE TRIGGER bench_floor")


# What a change log written by triggers costs at least: one empty log row per changed row
# (statement-level, from the transition table), with no image, no skip of no-op updates and
# no wake-up.
FLOOR_TRIGGER = """
CREATE FUNCTION bench_floor() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO replication.change_log (table_id, op) SELECT 0, 'U' FROM new_rows;
    RETURN NULL;
END$$;
CREATE TRIGGER bench_floor AFTER UPDATE ON items REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_floor();
"""


def settle(db: Database) -> None:
    """An empty log and a vacuumed, analyzed table, so every timed bulk UPDATE starts from
    the same state whatever ran before it: a pgbench run leaves up to a million log rows and
    dead tuples, and an autovacuum or autoanalyze landing inside the timed statement takes
    one of the two cores."""
    db.execute("TRUNCATE replication.change_log")
    db.execute("VACUUM ANALYZE items, replication.change_log")


def bulk_update(db: Database, logged: list[int] | None = None) -> float:
    """Seconds of one UPDATE of every item; `logged` gets the number of images it logged."""
    started = time.perf_counter()
    db.execute("UPDATE items SET price = price + 1")
    seconds = time.perf_counter() - started
    if logged is not None:
        logged.append(db.scalar("SELECT sum(coalesce(cardinality(rows), 1)) FROM replication.change_log"))
    settle(db)
    return seconds


def bench_capture(env: Env) -> list[Result]:
    """Capture overhead on two HQs: durable (fsync, full-page writes: how an HQ runs) and the
    suite's fast fsync=off cluster, where a commit costs nothing and the trigger's own work
    is all that shows (the worst case for the ratio)."""
    results = []
    for label, which in (("durable HQ", "hq_durable"), ("fsync off", "hq")):
        results += capture_overhead(env, label, which)
    return results


def capture_overhead(env: Env, label: str, which: str) -> list[Result]:
    rows, secs = env.sizes.capture_rows, env.sizes.pgbench_seconds
    say("capture overhead (%s): %d-row table", label, rows)
    hq, hq_yaml = capture_db(env, "capture_hq", rows, which)
    script = env.workdir / "update.sql"
    script.write_text(PGBENCH_SCRIPT)
    hq.execute(FLOOR_TRIGGER)
    modes = (False, True, "floor")
    tps = {m: [] for m in modes}
    bulk = {m: [] for m in modes}
    try:
        set_capture(hq, False)
        bulk_update(hq)                          # warm-up: the table reaches its steady size
        for run in range(env.runs):
            for on in (modes if run % 2 == 0 else modes[::-1]):   # alternate order
                set_capture(hq, on)
                env.checkpoint()
                tps[on].append(pgbench_tps(hq, script, rows, secs))
                settle(hq)
                env.checkpoint()
                bulk[on].append(bulk_update(hq))
                say("  run %d capture %s: %.0f TPS, bulk UPDATE %.2f s", run, {True: "on", False: "off"}.get(on, on),
                    tps[on][-1], bulk[on][-1])
        extra = concurrent_writers(env, hq, hq_yaml, script, rows, secs, label) if which == "hq_durable" else []
    finally:
        hq.cluster.drop_database(hq.name)
    note = f"pgbench -M prepared, 2 clients, {secs} s, {rows:,} rows; triggers on vs off"
    floor = (f"; floor (a trigger writing one empty log row per changed row, nothing else): "
             f"{median(tps['floor']) / median(tps[False]):.2f}× TPS, {median(bulk['floor']) / median(bulk[False]):.2f}× "
             "bulk time")
    return [ratio_result("capture on HQ", f"pgbench single-row UPDATE, {label}", median(tps[True]),
                         median(tps[False]), "TPS", 0.75, True, note + floor),
            ratio_result("capture on HQ", f"bulk UPDATE of {rows:,} rows, {label}", median(bulk[True]),
                         median(bulk[False]), "s", 2.0, False, "one statement; capture on vs off" + floor)] + extra


CONCURRENT_CLIENTS = 8
CONNECTED_BRANCHES = 20
PROBE_CATALOG = {"probe": {"label": "Probe", "default": False, "tables": ["public.bench_probe"]}}


@dataclass
class Fleet:
    """`replicator run` daemons of branches registered on one HQ database, polling it."""
    daemons: list[subprocess.Popen]
    branches: list[Database]

    def stop(self, env: Env) -> None:
        for d in self.daemons:
            if d.returncode is None:
                stop(d)
        for b in self.branches:
            b.cluster.drop_database(b.name)


def connect_fleet(env: Env, hq: Database, hq_yaml: Path, k: int, tag: str) -> Fleet:
    """K branches that receive only a small catalog HQ's writers never touch, so what they
    cost the writers is their presence (connections, polls, position reports), not the CPU
    of replicating on the same two cores."""
    hq.execute("CREATE TABLE IF NOT EXISTS bench_probe (id int PRIMARY KEY)")
    cfg_path = env.workdir / f"{tag}.fleet.hq.yaml"
    cfg_path.write_text(yaml.safe_dump({"dsn": hq.dsn, "retention": "7d", "catalogs": {**CATALOGS, **PROBE_CATALOG}},
                                       sort_keys=False, allow_unicode=True))
    with hq.connect() as conn:
        install(conn, config.load_hq(cfg_path))
    branches, daemons = [], []
    try:
        for n in range(k):
            db = env.fresh("branch", f"{tag}_br{n:02d}")
            db.execute("CREATE TABLE bench_probe (id int PRIMARY KEY)")
            branches.append(db)
            path = register_branch(hq, cfg_path, f"{tag}-{n:02d}", db, env.workdir, catalogs=["probe"])
            daemons.append(start(replicator_cmd("run", "-c", str(path)), env.workdir, f"{tag}{n:02d}"))
        hq.execute("INSERT INTO bench_probe VALUES (1)")
        wait_for(lambda: all(b.scalar("SELECT count(*) FROM bench_probe") == 1 for b in branches), 120,
                 "every fleet daemon to start", 0.25)
    except BaseException:
        Fleet(daemons, branches).stop(env)
        raise
    return Fleet(daemons, branches)


def backend_cpu_ns(pids: list[int]) -> int:
    """CPU time of processes in nanoseconds (schedstat: exact, where stat counts 10 ms ticks)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def idle_branch_cost(env: Env, hq: Database, seconds: float) -> Result:
    """HQ CPU that connected, idle branches cost: their backends' CPU while HQ commits
    100 transactions a second to a table they do not receive (so every poll sees a new
    snapshot, the realistic case), per branch and second.  Measured from IDLE_AFTER seconds
    after their last change (connect_fleet's), when they probe every idle_poll_interval:
    before that they still probe every poll_interval, as a branch that just received a
    change does; after QUIET_AFTER they probe half as often again."""
    pids = [r[0] for r in hq.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND application_name LIKE 'replicator run %%'")]
    hq.execute("CREATE TABLE IF NOT EXISTS bench_other (i bigint)")
    stop_writer = threading.Event()

    def writer() -> None:
        with hq.connect() as conn:
            i = 0
            while not stop_writer.is_set():
                conn.execute("INSERT INTO bench_other VALUES (%s)", (i,))
                i += 1
                stop_writer.wait(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(IDLE_AFTER + 1)
        before, t0 = backend_cpu_ns(pids), time.perf_counter()
        time.sleep(seconds)
        used, elapsed = backend_cpu_ns(pids) - before, time.perf_counter() - t0
    finally:
        stop_writer.set()
        thread.join(5)
    per = used / 1e6 / elapsed / max(len(pids), 1)
    return limit_result("wake-ups", "HQ CPU per idle connected branch", per, 0.5, "ms/s",
                        note=f"{len(pids)} branch backends over {elapsed:.0f} s, from {IDLE_AFTER:.0f} s after their "
                             "last change, while HQ commits 100 txns/s to another table; /proc/PID/schedstat of "
                             "their HQ backends")


def concurrent_writers(env: Env, hq: Database, hq_yaml: Path, script: Path, rows: int, secs: int,
                       label: str) -> list[Result]:
    """Many writers on a durable HQ with branches connected.  Capture used to NOTIFY the
    branches, and PostgreSQL serializes notifying commits (one lock through the commit's WAL
    flush): 0.09x with 20 branches listening.  Now branches poll, and nothing in a writer's
    transaction depends on them."""
    fleet = connect_fleet(env, hq, hq_yaml, CONNECTED_BRANCHES if env.sizes.pgbench_seconds > 5 else 3, "writers")
    modes = ("off", "on")
    tps: dict[str, list[float]] = {m: [] for m in modes}
    try:
        idle = idle_branch_cost(env, hq, 20 if env.sizes.pgbench_seconds > 5 else 3)
        for run in range(env.runs):
            for mode in (modes if run % 2 == 0 else modes[::-1]):
                set_capture(hq, mode == "on")
                env.checkpoint()
                tps[mode].append(pgbench_tps(hq, script, rows, secs, CONCURRENT_CLIENTS))
                say("  run %d, %d clients, %d branches, capture %s: %.0f TPS", run, CONCURRENT_CLIENTS,
                    len(fleet.daemons), mode, tps[mode][-1])
    finally:
        fleet.stop(env)
    off, on = (median(tps[m]) for m in modes)
    return [ratio_result("capture on HQ", f"pgbench single-row UPDATE, {CONCURRENT_CLIENTS} clients, "
                         f"branches connected, {label}", on, off, "TPS", 0.75, True,
                         f"{len(fleet.daemons)} `replicator run` daemons polling this HQ in both modes; "
                         "capture on vs off"),
            idle]


# ============================================================== latency

class Prober:
    """A writer committing single-row inserts at a fixed rate on one side, a reader
    polling the other side every 2 ms; latency = first seen - commit returned."""

    def __init__(self, src: Database, dst: Database, first_id: int, rate: int, seconds: float):
        self.src, self.dst = src, dst
        self.ids = range(first_id, first_id + int(rate * seconds))
        self.rate = rate
        self.committed: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self.done = threading.Event()

    def write(self) -> None:
        insert = "INSERT INTO items SELECT " + ROW_EXPR + " FROM (SELECT %s::bigint AS g) s"
        with self.src.connect() as conn:
            start = time.perf_counter()
            for n, i in enumerate(self.ids):
                delay = start + n / self.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                conn.execute(insert, (i,))
                self.committed[i] = time.perf_counter()
        self.done.set()

    def read(self, timeout: float) -> None:
        last = self.ids.start - 1
        deadline = None
        with self.dst.connect() as conn:
            while last < self.ids.stop - 1:
                got = conn.execute("SELECT id FROM items WHERE id > %s AND id < %s ORDER BY id",
                                   (last, self.ids.stop)).fetchall()
                now = time.perf_counter()
                for (i,) in got:
                    self.seen[i] = now
                    last = max(last, i)
                if self.done.is_set():
                    deadline = deadline or now + timeout
                    if now > deadline:
                        break
                time.sleep(0.002)

    def run(self, timeout: float = 30) -> list[float]:
        reader = threading.Thread(target=self.read, args=(timeout,), daemon=True)
        reader.start()
        self.write()
        reader.join(timeout + 5)
        missing = [i for i in self.ids if i not in self.seen]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(self.ids)} rows never arrived (e.g. id {missing[0]})")
        return [max(0.0, self.seen[i] - self.committed[i]) * 1000 for i in self.ids]


def arrived(db: Database, row_id: int) -> Callable[[], bool]:
    return lambda: bool(db.scalar("SELECT count(*) FROM items WHERE id = %s", (row_id,)))


def latency_ours(env: Env, run: int) -> list[float]:
    s = env.sizes
    pair = make_pair(env, f"latency{run}", 1000)
    daemon = start(replicator_cmd("run", "-c", str(pair.branch_yaml)), env.workdir, f"latency{run}")
    try:
        pair.hq.execute(FILL, (10_000, 10_000))             # warm-up: the daemon is listening
        wait_for(arrived(pair.branch, 10_000), 60, "the replicator daemon to start")
        return Prober(pair.hq, pair.branch, 100_000, s.latency_rate, s.latency_seconds).run()
    finally:
        finished = stop(daemon)
        if finished.returncode != 0:
            log.warning("replicator run exited %d: %s", finished.returncode, finished.stderr[-500:])
        env.hq.drop_database(pair.hq.name)
        env.branch.drop_database(pair.branch.name)


def latency_native(env: Env, run: int) -> list[float]:
    s = env.sizes
    native = make_native(env, f"nlatency{run}", 1000)
    try:
        native.src.execute(FILL, (10_000, 10_000))
        wait_for(arrived(native.dst, 10_000), 60, "the native subscription to start")
        return Prober(native.src, native.dst, 100_000, s.latency_rate, s.latency_seconds).run()
    finally:
        native.drop()
        env.hq.drop_database(native.src.name)
        env.branch.drop_database(native.dst.name)


def bench_latency(env: Env) -> list[Result]:
    s = env.sizes
    p50, p99, n50, n99 = [], [], [], []
    for run in range(env.runs):
        ours = latency_ours(env, run)
        native = latency_native(env, run)
        p50.append(percentile(ours, 50))
        p99.append(percentile(ours, 99))
        n50.append(percentile(native, 50))
        n99.append(percentile(native, 99))
        say("  latency run %d: ours p50 %.1f ms p99 %.1f ms; native p50 %.1f ms p99 %.1f ms",
            run, p50[-1], p99[-1], n50[-1], n99[-1])
    note = f"{s.latency_rate} commits/s for {s.latency_seconds:g} s; baseline: native logical replication"
    note += "; branches poll every 250 ms (no NOTIFY)"
    return [limit_result("latency", "commit to visible, p50", median(p50), 300, "ms", median(n50), note),
            limit_result("latency", "commit to visible, p99", median(p99), 1000, "ms", median(n99), note)]


# ============================================================== fan-out

class LagSampler:
    """Samples every branch's lag: the age of the oldest HQ commit not yet visible there.

    One writer commits transactions of consecutive ids in id order, so a branch
    whose max(id) is M has every transaction up to M and none after.
    """

    def __init__(self, branches: list[Database], every: float = 0.25):
        self.branches = branches
        self.every = every
        self.last_ids: list[int] = []       # last id of each committed txn, in commit order
        self.commit_times: list[float] = []  # appended before last_ids, so never shorter
        self.samples: list[list[float]] = [[] for _ in branches]
        self.stop = threading.Event()

    def committed(self, last_id: int, at: float) -> None:
        self.commit_times.append(at)
        self.last_ids.append(last_id)

    def lag(self, max_id: int, now: float) -> float:
        n = len(self.last_ids)
        k = bisect.bisect_right(self.last_ids, max_id, 0, n)
        return 0.0 if k >= n else now - self.commit_times[k]

    def run(self) -> None:
        conns = [b.connect() for b in self.branches]
        try:
            while not self.stop.is_set():
                for n, conn in enumerate(conns):
                    max_id = conn.execute("SELECT coalesce(max(id), 0) FROM items").fetchone()[0]
                    self.samples[n].append(self.lag(max_id, time.perf_counter()))
                self.stop.wait(self.every)
        finally:
            for conn in conns:
                conn.close()


def fanout_writer(hq: Database, sampler: LagSampler, first_id: int, rate: int, per_txn: int,
                  seconds: float) -> int:
    """Commit `rate` changes/s as inserts of `per_txn` rows for `seconds`; return the last id.

    Time-bounded, not count-bounded: on an overloaded machine the writer falls behind
    its schedule and the achieved rate (reported) is lower than asked.
    """
    insert = "INSERT INTO items SELECT " + ROW_EXPR + " FROM generate_series(%s::bigint, %s::bigint) g"
    next_id = first_id
    with hq.connect() as conn:
        start = time.perf_counter()
        end = start + seconds
        for n in itertools.count():
            due = start + n * per_txn / rate
            if due >= end or time.perf_counter() >= end:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            conn.execute(insert, (next_id, next_id + per_txn - 1))
            next_id += per_txn
            sampler.committed(next_id - 1, time.perf_counter())
    return next_id - 1


def bench_fanout(env: Env) -> list[Result]:
    s = env.sizes
    k = s.fanout_branches
    say("fan-out: %d branches", k)
    hq, hq_yaml = capture_db(env, "fanout_hq", 1000)
    branches, paths = [], []
    for n in range(k):
        db = env.fresh("branch" if n % 2 == 0 else "branch2", f"fanout_br{n:02d}")
        db.execute(SCHEMA)
        branches.append(db)
        paths.append(register_branch(hq, hq_yaml, f"fanout-{n:02d}", db, env.workdir))
    say("  %d branches initialized; starting their `replicator run` daemons", k)
    daemons = [start(replicator_cmd("run", "-c", str(p)), env.workdir, f"fanout{n:02d}")
               for n, p in enumerate(paths)]
    results = []
    try:
        hq.execute(FILL, (10_000, 10_000))
        wait_for(lambda: all(arrived(b, 10_000)() for b in branches), 180, "every daemon to start", 0.5)
        sampler = LagSampler(branches)
        thread = threading.Thread(target=sampler.run, daemon=True)
        pids = [d.pid for d in daemons]
        cpu0, dcpu0, me0, t0 = env.cpu(), process_cpu_seconds(pids), time.process_time(), time.perf_counter()
        thread.start()
        say("  every daemon is up; writing %d changes/s for %.0f s", s.fanout_rate, s.fanout_seconds)
        last = fanout_writer(hq, sampler, 100_000, s.fanout_rate, s.fanout_rows_per_txn, s.fanout_seconds)
        hq_secs = cluster_cpu_seconds(env.hq) - cpu0[env.hq.name]
        _, clusters = env.cpu_since(cpu0)
        dcpu1, me1, t1 = process_cpu_seconds(pids), time.process_time(), time.perf_counter()
        say("  wrote up to id %d; waiting for every branch to catch up", last)
        behind = ""
        try:
            wait_for(lambda: all(arrived(b, last)() for b in branches), 120, "every branch to catch up", 0.25)
        except RuntimeError:
            behind = "; some branches had not caught up 120 s after the writer stopped"
        sampler.stop.set()
        thread.join(10)
        written = last - 100_000 + 1
        rate = written / (t1 - t0)
        for d in daemons:
            stop(d)
        p99s = [percentile(x, 99) for x in sampler.samples]
        worst = max(p99s)
        hq_cpu = hq_secs / (t1 - t0)
        note = (f"{k} daemons, {written:,} changes at {rate:.0f}/s (asked {s.fanout_rate}/s, "
                f"{s.fanout_rows_per_txn}-row txns) for {t1 - t0:.0f} s; median branch p99 "
                f"{median(p99s):.2f} s{behind}")
        lag = limit_result("fan-out", "worst branch lag p99", worst, 1.0, "s", note=note, strict_below=True)
        if behind:
            lag.ok = False
        if rate < 0.9 * s.fanout_rate:
            lag.ok = False
            lag.note += "; FAIL: the writer could not reach the asked rate (machine saturated)"
        results.append(lag)
        results.append(Result("fan-out", "HQ CPU per branch", hq_cpu / k * 1000, None, "ms/s",
                              note=f"HQ total {hq_cpu * 100:.0f}% of one core for {k} branches and the "
                                   f"writer; each daemon used {(dcpu1 - dcpu0) / k / (t1 - t0) * 1000:.0f} ms/s; "
                                   f"CPU-seconds over {t1 - t0:.0f} s: {clusters}, daemons {dcpu1 - dcpu0:.1f} s, "
                                   f"writer and sampler {me1 - me0:.1f} s"))
    finally:
        for d in daemons:
            if d.returncode is None:
                stop(d)
        env.hq.drop_database(hq.name)
        for b in branches:
            b.cluster.drop_database(b.name)
    results.append(bench_window_poll(env))
    return results


# ------------------------------------------------------------- window query plan

def fill_log(db: Database, table_id: int, rows: int, per_txn: int = 10_000) -> None:
    """Append `rows` realistic log rows in transactions of `per_txn` (distinct xids)."""
    db.execute(sql.SQL("""
DO $$
DECLARE i bigint := 0;
BEGIN
    WHILE i < {rows} LOOP
        INSERT INTO replication.change_log (table_id, op, row)
        SELECT {tid}, 'U', to_jsonb(r) FROM (SELECT {expr} FROM generate_series(i + 1, i + least({per}, {rows} - i)) g) r;
        i := i + {per};
        COMMIT;
    END LOOP;
END $$""").format(rows=sql.Literal(rows), tid=sql.Literal(table_id), per=sql.Literal(per_txn),
                  expr=sql.SQL(ROW_EXPR.replace("%%", "%"))))
    db.execute("VACUUM ANALYZE replication.change_log")


def plan_nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


@dataclass
class Poll:
    ms: float              # median planning + execution time
    plan: list[str]        # index (or sequential) scans on the change log
    rows: int
    jit_ms: float          # median JIT compilation time inside `ms` (0: no JIT)


def poll_time(hq: Database, reader: LogReader, repeat: int = 21) -> Poll:
    """Time the window query (plan + execute) for a fresh 10-change window at the log's end.

    The session has the settings `replicator run` gives a window's transaction
    (reader.WINDOW_SETTINGS: jit off, since compiling costs milliseconds when a big log's
    estimate passes jit_above_cost; no parallel workers; work_mem).
    """
    from ..reader import window_settings
    with hq.connect() as conn:
        window_settings(conn, local=False)
        prev = current_snapshot(conn)
        for i in range(10):
            conn.execute("UPDATE items SET price = price + 1 WHERE id = %s", (i + 1,))
        cur = current_snapshot(conn)
        params = {"prev": prev, "cur": cur, "late": reader.late_xids(conn, prev, cur), "after": 0,
                  "tables": list(reader.tables)}
        explain = sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + reader.plain_query   # no arrays in this log
        times, jit, scans, rows = [], [], set(), 0
        for _ in range(repeat):
            doc = conn.execute(explain, params).fetchone()[0]
            doc = (json.loads(doc) if isinstance(doc, str) else doc)[0]
            times.append(doc["Planning Time"] + doc["Execution Time"])
            jit.append(doc.get("JIT", {}).get("Timing", {}).get("Total", 0.0))
            rows = doc["Plan"].get("Actual Rows", 0)
            for node in plan_nodes(doc["Plan"]):
                if "Index Name" in node:
                    scans.add(f"{node['Node Type']} on {node['Index Name']}")
                if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "change_log":
                    scans.add("Seq Scan on change_log")
    return Poll(median(times), sorted(scans), rows, median(jit))


def bench_window_poll(env: Env) -> Result:
    s = env.sizes
    hq, _ = capture_db(env, "logsize_hq", 100)
    polls = {}
    try:
        with hq.connect() as conn:
            tables = source_tables(conn, ["items"])
        reader = LogReader(tables, {})
        for size, add in ((s.log_small, s.log_small), (s.log_big, s.log_big - s.log_small - 10)):
            if size == s.log_big:
                say("  filling the change log to %d rows", size)
            fill_log(hq, tables[0].id, add)
            polls[size] = p = poll_time(hq, reader)
            say("  window poll with %d log rows: %.3f ms (JIT %.3f ms; %s; %d rows)", size, p.ms, p.jit_ms,
                ", ".join(p.plan), p.rows)
    finally:
        env.hq.drop_database(hq.name)
    small, big = polls[s.log_small], polls[s.log_big]
    uses_index = all(any("change_log_xid" in x or "change_log_route" in x for x in p.plan)
                     and not any("Seq Scan" in x for x in p.plan)
                     for p in (small, big))
    flat = big.ms <= 2 * small.ms or big.ms - small.ms < 1.0
    note = f"plan: {', '.join(big.plan)}; {big.rows} rows"
    if big.jit_ms:
        note += (f"; JIT compilation {big.jit_ms:.2f} ms of it (the estimated cost passes jit_above_cost; "
                 f"{big.ms - big.jit_ms:.3f} ms without)")
    return Result("fan-out", f"window poll, {s.log_big:,} vs {s.log_small:,} log rows", big.ms, small.ms,
                  "ms", "index on xid; flat (≤ 2× or +1 ms)", uses_index and flat,
                  big.ms / small.ms if small.ms else None, note)


# ============================================================== row restriction

RESTRICT_SCHEMA = "CREATE TABLE stock (store_id int, item_id int, qty int NOT NULL, PRIMARY KEY (store_id, item_id));"
RESTRICT_CATALOGS = {"stock": {"label": "Existencias", "default": True, "tables": ["public.stock"],
                               "filter": "store_id = :store_id"}}
RESTRICT_STORES = 20


def bench_restrict(env: Env) -> list[Result]:
    """What migration 007's row restriction costs a branch of a filtered catalog: the same
    init and catch-up of store 1's stock, as store 1's own login (read_rows, the log's
    policy) and as an unrestricted login (the table, no row-level security at all)."""
    s = env.sizes
    hq = env.fresh("hq", "restrict_hq")
    hq.execute(RESTRICT_SCHEMA)
    hq.execute("INSERT INTO stock SELECT st, i, 0 FROM generate_series(1, %s) st, generate_series(1, %s) i",
               (RESTRICT_STORES, s.restrict_items))
    hq.execute("VACUUM (ANALYZE) stock")
    hq_yaml = env.workdir / "restrict.hq.yaml"
    hq_yaml.write_text(yaml.safe_dump({"dsn": hq.dsn, "retention": "7d", "catalogs": RESTRICT_CATALOGS}))
    cfg = config.load_hq(hq_yaml)
    with hq.connect() as conn:
        install(conn, cfg)
    paths = {}
    for who in ("own", "unrestricted"):
        br = env.fresh("branch", f"restrict_{who}")
        br.execute(RESTRICT_SCHEMA)
        with hq.connect() as conn:
            reg = add_branch(conn, cfg, f"restrict-{who}", {"store_id": "1"}, password=BRANCH_PASSWORD)
        source = hq.cluster.dsn(hq.name, reg.role, BRANCH_PASSWORD) if who == "own" else hq.dsn
        paths[who] = env.workdir / f"restrict-{who}.branch.yaml"
        paths[who].write_text(yaml.safe_dump({"branch": f"restrict-{who}", "source": {"dsn": source},
                                              "target": {"dsn": br.dsn}}))
    init = {w: [] for w in paths}
    catchup = {w: [] for w in paths}
    changes = s.restrict_txns * 10
    for run in range(env.runs):
        order = list(paths) if run % 2 == 0 else list(reversed(paths))
        for who in order:
            env.checkpoint()
            done = run_timed(replicator_cmd("-q", "init", "--force", "-c", str(paths[who])), env.workdir,
                             f"restrict-init-{who}{run}", timeout=3600)
            init[who].append(s.restrict_items / done.seconds)
        say("row restriction run %d: %d transactions on HQ, 10 of each one's %d changes for store 1",
            run, s.restrict_txns, 10 * RESTRICT_STORES)
        with hq.connect() as conn:
            for t in range(s.restrict_txns):
                lo = (t * 10) % s.restrict_items + 1
                conn.execute("UPDATE stock SET qty = qty + 1 WHERE item_id BETWEEN %s AND %s", (lo, lo + 9))
        for who in order:
            env.checkpoint()
            done = run_timed(replicator_cmd("-q", "run", "--once", "-c", str(paths[who])), env.workdir,
                             f"restrict-run-{who}{run}", timeout=3600)
            catchup[who].append(changes / done.seconds)
    note = (f"store 1 of {RESTRICT_STORES}, {s.restrict_items:,} items each; median of {env.runs}; "
            "baseline: the same branch through an unrestricted HQ login")
    return [ratio_result("row restriction", "filtered init, end to end", median(init["own"]),
                         median(init["unrestricted"]), "rows/s", 0.9, True, note),
            ratio_result("row restriction", f"filtered catch-up of {changes:,} changes",
                         median(catchup["own"]), median(catchup["unrestricted"]), "changes/s", 0.9, True, note)]


# ============================================================== uploads (sales up)

UPLOAD_SCHEMA = """
CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE sales (
    register_id int NOT NULL, folio bigint NOT NULL, store_id int NOT NULL,
    sold_at timestamptz NOT NULL DEFAULT now(), total numeric(14,2) NOT NULL,
    PRIMARY KEY (register_id, folio));
CREATE TABLE sale_lines (
    register_id int NOT NULL, folio bigint NOT NULL, line_no smallint NOT NULL, store_id int NOT NULL,
    item_id bigint NOT NULL, quantity numeric(14,3) NOT NULL, price numeric(14,4) NOT NULL,
    PRIMARY KEY (register_id, folio, line_no));
CREATE PROCEDURE ring_up(p_store int, n int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. n LOOP                       -- one transaction per sale, as a till commits
        INSERT INTO sales VALUES (p_store * 100 + 1, i, p_store, now(), 19.00);
        INSERT INTO sale_lines SELECT p_store * 100 + 1, i, l, p_store, 1 + (i * 7 + l) % 1000, l, 9.5
          FROM generate_series(1, 2) l;
        COMMIT;
    END LOOP;
END $$"""
UPLOAD_ROWS_PER_SALE = 3
UPLOADS = {"sales": {"label": "Ventas", "default": True, "tables": ["public.sales", "public.sale_lines"],
                     "owner": "store_id = :store_id"}}
# A sale at the till: header and three lines in one transaction (pgbench, -D n=folio space).
SALE_SCRIPT = """\\set reg random(1, 1000000)
\\set folio random(1, 1000000000)
BEGIN;
INSERT INTO sales VALUES (:reg, :folio, 1, now(), 28.50) ON CONFLICT DO NOTHING;
INSERT INTO sale_lines VALUES (:reg, :folio, 1, 1, 11, 1, 9.5) ON CONFLICT DO NOTHING;
INSERT INTO sale_lines VALUES (:reg, :folio, 2, 1, 12, 1, 9.5) ON CONFLICT DO NOTHING;
INSERT INTO sale_lines VALUES (:reg, :folio, 3, 1, 13, 1, 9.5) ON CONFLICT DO NOTHING;
END;
"""


def upload_hq(env: Env, name: str) -> tuple[Database, Path]:
    """HQ with the sales tables as upload targets (each branch's slice under row-level
    security) and a small catalog, as `replicator hq install` leaves it."""
    from ..uploads import check_targets, install_targets
    hq = env.fresh("hq", name)
    hq.execute(UPLOAD_SCHEMA)
    hq.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g")
    path = env.workdir / f"{name}.hq.yaml"
    path.write_text(yaml.safe_dump({"dsn": hq.dsn, "retention": "7d", "uploads": UPLOADS, "catalogs": {
        "items": {"label": "Items", "default": True, "tables": ["public.items"]}}}))
    cfg = config.load_hq(path)
    with hq.connect() as conn:
        check_targets(conn, cfg)
        install(conn, cfg)
        install_targets(conn, cfg)
    return hq, path


def upload_branch(env: Env, hq: Database, hq_yaml: Path, name: str, store: int, which: str = "branch") -> Path:
    """A branch registered for store `store`, catalogs and (empty) sales history initialized."""
    from .. import upload_init
    br = env.fresh(which, name)
    br.execute(UPLOAD_SCHEMA)
    path = register_branch(hq, hq_yaml, name.replace("_", "-"), br, env.workdir, params={"store_id": store})
    upload_init.initialize(config.load_branch(path))
    return path


def queue_sales(db: Database, store: int, n: int) -> None:
    db.execute("CALL ring_up(%s, %s)", (store, n))


def uploaded(hq: Database, store: int, n: int) -> bool:
    """Has HQ the last sale of `store` (its lines come in the same transaction)?"""
    return bool(hq.scalar("SELECT EXISTS (SELECT FROM sale_lines WHERE register_id = %s AND folio = %s)",
                          (store * 100 + 1, n)))


def check_uploaded(hq: Database, stores: list[int], n: int, what: str) -> None:
    got = hq.execute("SELECT (SELECT count(*) FROM sales WHERE store_id = ANY (%s)), "
                     "(SELECT count(*) FROM sale_lines WHERE store_id = ANY (%s))", (stores, stores))[0]
    if tuple(got) != (n * len(stores), 2 * n * len(stores)):
        raise RuntimeError(f"{what}: HQ holds {got[0]} sales and {got[1]} lines, expected {n * len(stores)} "
                           f"and {2 * n * len(stores)}")


def uploads_ours(env: Env, k: int, n: int, run: int) -> tuple[float, float]:
    """(rows/s, HQ CPU-seconds) of k branches catching up n queued sales each, at once.

    Each branch's `replicator run` daemon is up and paused (SIGSTOP) while its store sells
    offline, then resumed (SIGCONT) and timed until HQ holds every branch's last sale: the
    upload itself, as the native worker's, without a process start in the figure."""
    hq, hq_yaml = upload_hq(env, f"up{k}_{run}_hq")
    names = [f"up{k}_{run}_b{i:02d}" for i in range(k)]
    clusters = ["branch" if i % 2 == 0 else "branch2" for i in range(k)]
    paths = [upload_branch(env, hq, hq_yaml, names[i], i + 1, clusters[i]) for i in range(k)]
    for path in paths:      # probes as often as the native worker reacts: the figure is the transfer
        doc = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**doc, "poll_interval": "20ms", "idle_poll_interval": "20ms"}))
    procs = [start(replicator_cmd("-q", "run", "-c", str(p)), env.workdir, f"up{k}_{run}_{i}")
             for i, p in enumerate(paths)]
    try:
        wait_for(lambda: hq.scalar("SELECT count(*) FROM replication.branches WHERE uploads_reported_at "
                                   "IS NOT NULL") == k, 120, "upload daemons to start")
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        for i in range(k):
            queue_sales(env.cluster(clusters[i]).database(names[i]), i + 1, n)
        env.checkpoint()
        before = cluster_cpu_seconds(hq.cluster)
        started = time.perf_counter()
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: all(uploaded(hq, i + 1, n) for i in range(k)), 3600, "uploads", every=0.01)
        seconds = time.perf_counter() - started
        cpu = cluster_cpu_seconds(hq.cluster) - before
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
            stop(proc)
    check_uploaded(hq, list(range(1, k + 1)), n, f"{k}-branch upload")
    env.hq.drop_database(hq.name)
    for i in range(k):
        env.cluster(clusters[i]).drop_database(names[i])
    return k * n * UPLOAD_ROWS_PER_SALE / seconds, cpu


def uploads_native(env: Env, k: int, n: int, run: int) -> tuple[float, float]:
    """The same with k publications on the branches and k subscriptions in one HQ database."""
    dst = env.fresh("hq", f"nup{k}_{run}_hq")
    dst.execute(UPLOAD_SCHEMA)
    natives = []
    try:
        for i in range(k):
            src = env.fresh("branch" if i % 2 == 0 else "branch2", f"nup{k}_{run}_b{i:02d}")
            src.execute(UPLOAD_SCHEMA)
            native = Native(src, dst, f"nup{k}_{run}_{i:02d}", tables="sales, sale_lines")
            native.create()
            natives.append(native)
            native.disable()
            queue_sales(src, i + 1, n)
        env.checkpoint()
        before = cluster_cpu_seconds(dst.cluster)
        started = time.perf_counter()
        for native in natives:
            native.enable()
        wait_for(lambda: all(uploaded(dst, i + 1, n) for i in range(k)), 3600, "native uploads", every=0.01)
        seconds = time.perf_counter() - started
        cpu = cluster_cpu_seconds(dst.cluster) - before
        check_uploaded(dst, list(range(1, k + 1)), n, f"native {k}-subscription upload")
        return k * n * UPLOAD_ROWS_PER_SALE / seconds, cpu
    finally:
        for native in natives:
            native.drop()
            native.src.cluster.drop_database(native.src.name)
        env.hq.drop_database(dst.name)


def sale_capture(env: Env) -> Result:
    """pgbench: a sale (header and three lines, one transaction) on a durable branch, with the
    upload tables' capture vs without (triggers disabled)."""
    from .. import uploads
    db = env.fresh("hq_durable", "sale_capture")
    db.execute(UPLOAD_SCHEMA)
    with db.connect() as conn:
        ups = [uploads.Upload("sales", "Ventas", True, [("public", "sales", ""), ("public", "sale_lines", "")])]
        uploads.install_capture(conn, ups)
    script = env.workdir / "sale.sql"
    script.write_text(SALE_SCRIPT)
    secs = env.sizes.pgbench_seconds
    tps = {True: [], False: []}
    try:
        for run in range(env.runs):
            for on in ((True, False) if run % 2 == 0 else (False, True)):
                verb = "ENABLE" if on else "DISABLE"
                db.execute(f"ALTER TABLE sales {verb} TRIGGER USER; ALTER TABLE sale_lines {verb} TRIGGER USER")
                env.checkpoint()
                tps[on].append(pgbench_tps(db, script, 1, secs))
                say("  sale capture run %d %s: %.0f TPS", run, "on" if on else "off", tps[on][-1])
    finally:
        env.hq_durable.drop_database(db.name)
    return ratio_result("uploads", "capture of a sale (header + 3 lines), durable branch", median(tps[True]),
                        median(tps[False]), "TPS", 0.9, True,
                        f"pgbench -M prepared, 2 clients, {secs} s; the upload tables' capture triggers on vs off")


def bench_uploads(env: Env) -> list[Result]:
    n = env.sizes.upload_sales
    one, one_native, ten, ten_native, cpu, cpu_native = [], [], [], [], [], []
    for run in range(env.runs):
        say("uploads run %d: %d sales (%d rows) queued at one branch", run, n, n * UPLOAD_ROWS_PER_SALE)
        one.append(uploads_ours(env, 1, n, run)[0])
        one_native.append(uploads_native(env, 1, n, run)[0])
        say("  one branch: ours %.0f rows/s, native %.0f rows/s", one[-1], one_native[-1])
        rate, c = uploads_ours(env, 10, n // 10, run)
        ten.append(rate)
        cpu.append(c / 10)
        rate, c = uploads_native(env, 10, n // 10, run)
        ten_native.append(rate)
        cpu_native.append(c / 10)
        say("  ten branches: ours %.0f rows/s (HQ CPU %.2f s per branch), native %.0f rows/s (%.2f s)",
            ten[-1], cpu[-1], ten_native[-1], cpu_native[-1])
    note = (f"median of {env.runs}; paused `replicator run` daemons resumed vs disabled native subscriptions "
            "enabled, until HQ holds the last sale")
    return [ratio_result("uploads", f"{n:,} queued sales ({n * UPLOAD_ROWS_PER_SALE:,} rows), one branch",
                         median(one), median(one_native), "rows/s", 1.0, True,
                         note + "; baseline: a subscription at HQ to the branch's publication"),
            ratio_result("uploads", f"ten branches at once into one HQ ({n // 10:,} sales each)", median(ten),
                         median(ten_native), "rows/s", 1.0, True,
                         note + f"; HQ CPU per branch: ours {median(cpu):.2f} s, native {median(cpu_native):.2f} s"),
            sale_capture(env)]


# ============================================================== main

RUNNERS: dict[str, Callable[[Env], list[Result]]] = {
    "catchup": bench_catchup, "init": bench_init, "capture": bench_capture,
    "latency": bench_latency, "fanout": bench_fanout, "restrict": bench_restrict, "uploads": bench_uploads,
    "fleet": bench_fleet,
}
TITLES = {"catchup": "catch-up apply", "init": "initial copy", "capture": "capture on HQ",
          "latency": "latency", "fanout": "fan-out", "restrict": "row restriction",
          "uploads": "uploads", "fleet": "fleet"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m replicator.bench",
                                description="Benchmark replicator against PostgreSQL logical "
                                            "replication, a raw COPY pipe and no capture.")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run: checks the harness, not targets")
    p.add_argument("--runs", type=int, help="runs per benchmark (median); default 3, 1 with --quick")
    p.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--init-rows", type=int, metavar="N",
                   help="rows of the initial-copy table (default 1,000,000): the fixed process start "
                        "weighs less on bigger tables")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("-v", "--verbose", action="store_true", help="log the engine's INFO lines too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if not args.verbose:
        for name in ("replicator.cluster", "replicator.capture", "replicator.hq", "replicator.initialize",
                     "replicator.db", "replicator.uploads", "replicator.upload_init"):
            logging.getLogger(name).setLevel(logging.WARNING)
    sizes = QUICK if args.quick else FULL
    if args.init_rows:
        sizes = dataclasses.replace(sizes, init_rows=args.init_rows)
    runs = args.runs or (1 if args.quick else 3)
    if runs < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return 2
    command = "python -m replicator.bench" + (" --quick" if args.quick else "") + \
        "".join(f" --only {n}" for n in args.only or []) + (f" --runs {args.runs}" if args.runs else "")
    results: list[Result] = []
    failed: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="replicator-bench-") as tmp:
        env = Env(Path(tmp), sizes, runs)
        try:
            for name in args.only or BENCHMARKS:
                say("=== %s", name)
                t = time.monotonic()
                try:
                    results += RUNNERS[name](env)
                except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
                    log.exception("benchmark %s failed", name)
                    failed.append(name)
                    results.append(Result(TITLES[name], "ERROR", None, ok=False, note=str(e).splitlines()[0][:200]))
                say("=== %s done in %.0f s", name, time.monotonic() - t)
        finally:
            env.close()
    machine = machine_line()
    print(f"\nreplicator benchmarks — {machine}; {runs} run(s) each, total {time.monotonic() - started:.0f} s")
    print(text_table(results))
    if args.markdown:
        args.markdown.write_text(markdown_table(results, machine, command))
        print(f"\nMarkdown table written to {args.markdown}")
    if failed:
        return 1
    if args.strict and any(r.ok is False for r in results):
        return 1
    return 0
