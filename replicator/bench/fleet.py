"""The fleet benchmark: a thousand branches on one HQ, through PgBouncer.

A thousand `replicator run` daemons do not fit on a 2-core machine, but what they cost HQ
is their queries, and those are simulated faithfully: each simulated branch has its own
registered login (so row-level security on the log is evaluated as in production), its own
connection through PgBouncer in transaction pooling, and runs the daemon's own statements
on the daemon's own schedule (reader.PROBE every poll interval, a window read with
reader.LATE and the LogReader's query when the probe finds something, replication.ack
after changes and every few seconds while idle).  Nothing is applied to a branch
database: the apply side is what the other benchmarks measure.

The writer is pgbench on a durable HQ (every commit flushed): single-row UPDATEs of the
stock catalog, filtered per store, so each change is for one branch, the way a chain's
stock moves.  Three phases: the writer alone, the fleet idle, then both.
"""
from __future__ import annotations

import asyncio
import logging
import random
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field

import psycopg
import yaml

from .. import config
from ..capture import install
from ..hq import add_branch
from ..reader import LATE, PROBE, LogReader, current_snapshot, window_settings_sql
from ..schema import source_tables
from ..session import ACK_INTERVAL, IDLE_ADVANCE, IDLE_AFTER, QUIET_ADVANCE, probe_interval
from . import kit as b
from .pgbouncer import PgBouncer

log = logging.getLogger(__name__)

PASSWORD = "fleet-bench-password"
ITEMS_PER_STORE = 10
WRITER_SCRIPT = """\\set s random(1, :stores)
\\set i random(1, {items})
UPDATE stock SET quantity = quantity + 1, updated_at = now() WHERE store_id = :s AND item_id = :i;
""".format(items=ITEMS_PER_STORE)
SCHEMA = """
CREATE TABLE stock (store_id int NOT NULL, item_id int NOT NULL, quantity numeric(14,3) NOT NULL,
                    updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (store_id, item_id));
"""


@dataclass
class Fleet:
    """What the fleet saw in one phase."""
    probes: int = 0
    windows: int = 0
    acks: int = 0
    changes: int = 0
    errors: int = 0
    lags: dict[int, list[float]] = field(default_factory=dict)     # branch -> seconds per change seen


class Poller:
    """One simulated branch: the daemon's loop, its queries, its intervals."""

    def __init__(self, n: int, name: str, dsn: str, reader: LogReader, poll: float, idle_poll: float):
        self.n, self.name, self.dsn, self.reader = n, name, dsn, reader
        self.poll, self.idle_poll = poll, idle_poll
        self.tables = list(reader.tables)
        self.conn: psycopg.AsyncConnection | None = None
        self.pos = self.probed = None
        self.unreported = None        # a report held back (the daemon's _ack)
        self.last_news = self.last_ack = self.last_advance = 0.0

    async def open(self, start: str) -> None:
        # prepare_threshold=None: no prepared statements, which transaction pooling would break
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, prepare_threshold=None,
                                                          application_name=f"fleet {self.name}")
        self.pos = self.probed = start
        self.last_ack = self.last_advance = time.monotonic()
        self.last_news = time.monotonic() - IDLE_AFTER

    async def run(self, owner: "FleetRunner", stop: asyncio.Event) -> None:
        await asyncio.sleep(random.uniform(0, self.idle_poll))     # daemons start at any moment
        while not stop.is_set():
            fleet = owner.fleet          # the current phase's counters
            began = time.monotonic()
            try:
                found = await self.step(fleet)
            except psycopg.Error:
                fleet.errors += 1
                found = False
            wait = probe_interval(time.monotonic() - self.last_news, self.poll, self.idle_poll)
            if found:                    # as the daemon (_next_probe_in): probes keep their cadence
                wait = max(0.0, wait - (time.monotonic() - began))
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def step(self, fleet: Fleet) -> bool:
        if self.unreported and time.monotonic() - self.last_ack >= ACK_INTERVAL:   # the daemon's flush_ack
            await self.ack(*self.unreported, fleet, force=True)
        cur, news = await (await self.conn.execute(PROBE, {"prev": self.probed, "tables": self.tables})).fetchone()
        fleet.probes += 1
        if cur == self.pos:
            return False
        if not news:
            self.probed = cur
            await self.advance(cur, fleet)
            return False
        self.last_news = time.monotonic()
        params = {"prev": self.pos, "cur": cur, "tables": self.tables}
        async with self.conn.transaction():
            await self.conn.execute(window_settings_sql())
            late, arrays, routes = await (await self.conn.execute(LATE, params)).fetchone()
            query = self.reader.query if arrays else self.reader.plain_query
            rows = await (await self.conn.execute(query, {**params, "late": late, "after": 0, "routes": routes})
                          ).fetchall()
        fleet.windows += 1
        seen = time.time()
        if rows:
            fleet.changes += len(rows)
            fleet.lags.setdefault(self.n, []).extend(seen - r[5].timestamp() for r in rows)
        self.pos = self.probed = cur
        self.last_advance = time.monotonic()
        await self.ack(cur, rows[-1][5] if rows else None, fleet)
        return bool(rows)

    async def advance(self, cur: str, fleet: Fleet) -> None:
        """The daemon's _advance: move the position over log with nothing for us, rarely."""
        every = QUIET_ADVANCE if self.last_advance > self.last_news + IDLE_ADVANCE else IDLE_ADVANCE
        if time.monotonic() - self.last_advance < every:
            return
        self.pos = cur
        self.last_advance = time.monotonic()
        await self.ack(cur, None, fleet, force=True)

    async def ack(self, position: str, applied_until, fleet: Fleet, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_ack < ACK_INTERVAL:
            self.unreported = (position, applied_until)
            return
        self.last_ack = now
        self.unreported = None
        await self.conn.execute("SELECT replication.ack(%s, %s::pg_snapshot, %s, %s)",
                                (self.name, position, applied_until, 0))
        fleet.acks += 1


class FleetRunner:
    """The pollers on an asyncio loop in a thread of their own; phases are switched from outside."""

    def __init__(self, pollers: list[Poller]):
        self.pollers = pollers
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stop_event: asyncio.Event | None = None
        self.tasks: list[asyncio.Future] = []
        self.fleet = Fleet()

    def call(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self, start: str) -> None:
        async def open_all():
            sem = asyncio.Semaphore(20)        # logins one at a time per core or so: SCRAM is costly

            async def one(p):
                async with sem:
                    await p.open(start)
            await asyncio.gather(*(one(p) for p in self.pollers))
        self.call(open_all())

    def start(self, position: str) -> None:
        """Every simulated branch starts polling, holding HQ's state `position` (as after init)."""
        async def go():
            self.stop_event = asyncio.Event()
            for p in self.pollers:
                p.pos = p.probed = position
                p.last_news = time.monotonic() - IDLE_AFTER
            self.fleet = Fleet()
            self.tasks = [asyncio.ensure_future(p.run(self, self.stop_event)) for p in self.pollers]
        self.call(go())

    def phase(self) -> Fleet:
        """What the fleet saw since the last call (counters restart)."""
        async def swap():
            seen, self.fleet = self.fleet, Fleet()
            return seen
        return self.call(swap())

    def halt(self) -> None:
        """Stop polling; connections stay open (idle clients of PgBouncer cost HQ nothing)."""
        async def halt():
            if self.stop_event is not None:
                self.stop_event.set()
                await asyncio.gather(*self.tasks, return_exceptions=True)
            self.tasks = []
        self.call(halt(), 120)

    def close(self) -> None:
        async def close_all():
            for p in self.pollers:
                if p.conn is not None:
                    await p.conn.close()
        try:
            self.halt()
            self.call(close_all(), 120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


# ------------------------------------------------------------------ the benchmark

def fleet_hq(env, k: int):
    """A durable HQ database with the stock of k stores, captured, and k registered branches."""
    hq = env.fresh("fleet", "fleet_hq")
    hq.execute(SCHEMA)
    hq.execute("INSERT INTO stock SELECT s, i, 100 FROM generate_series(1, %s) s, generate_series(1, %s) i",
               (k, ITEMS_PER_STORE))
    path = env.workdir / "fleet.hq.yaml"
    path.write_text(yaml.safe_dump({"dsn": hq.dsn, "retention": "7d", "catalogs": {
        "stock": {"label": "Existencias", "default": True, "tables": ["public.stock"],
                  "filter": "store_id = :store_id"}}}))
    cfg = config.load_hq(path)
    names = [f"fleet-{n:04d}" for n in range(1, k + 1)]
    with hq.connect() as conn:
        install(conn, cfg)
        roles = {name: add_branch(conn, cfg, name, {"store_id": n}, password=PASSWORD).role
                 for n, name in enumerate(names, 1)}
        tables = source_tables(conn, ["stock"])
    return hq, roles, tables


def raise_fd_limit(needed: int) -> None:
    """A thousand client sockets here and two thousand in PgBouncer (it inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < needed:
        raise RuntimeError(f"the fleet benchmark needs {needed} open files; the limit is {soft} (ulimit -n)")


def bench_fleet(env) -> list:
    k, secs = env.sizes.fleet_branches, env.sizes.fleet_seconds
    raise_fd_limit(3 * k + 200)
    defaults = config.BranchConfig.__dataclass_fields__
    poll, idle = defaults["poll_interval"].default, defaults["idle_poll_interval"].default
    b.say("fleet: %d simulated branches through PgBouncer, polling every %.2f s (%.0f s idle)", k, poll, idle)
    started = time.monotonic()
    hq, roles, tables = fleet_hq(env, k)
    b.say("  %d branches registered in %.0f s", k, time.monotonic() - started)
    bouncer = PgBouncer(hq.cluster.port, {r: PASSWORD for r in roles.values()}, pool_size=1, min_pool_size=0,
                        max_clients=k + 50).start()
    script = env.workdir / "fleet_writer.sql"
    script.write_text(WRITER_SCRIPT.replace(":stores", str(k)))
    pollers = [Poller(n, name, bouncer.dsn(hq.name, roles[name]), LogReader(tables, {"store_id": n}), poll, idle)
               for n, name in enumerate(roles, 1)]
    for p in pollers:
        p.reader.routed = True       # each is a branch login: what LogReader.know_login finds
    runner = FleetRunner(pollers)
    alone, with_fleet, idle_cpu, busy_cpu, lags, worst, medians, notes = [], [], [], [], [], [], [], []
    try:
        runner.open(current_snapshot_of(hq))
        b.say("  %d connections open through PgBouncer", k)
        for run in range(env.runs):
            env.checkpoint()
            cpu0 = b.cluster_cpu_seconds(hq.cluster)
            alone.append(b.pgbench_tps(hq, script, 1, secs))
            time.sleep(0.5)               # pgbench's backends exit and are reaped (a zombie's CPU reads 0)
            cpu_alone = (b.cluster_cpu_seconds(hq.cluster) - cpu0) / secs
            runner.start(current_snapshot_of(hq))
            time.sleep(idle + 1)                                   # every branch has probed
            runner.phase()
            cpu0, bcpu0, me0, t0 = (b.cluster_cpu_seconds(hq.cluster), b.process_cpu_seconds([bouncer.proc.pid]),
                                    time.process_time(), time.perf_counter())
            time.sleep(secs)
            t = time.perf_counter() - t0
            idle_cpu.append((b.cluster_cpu_seconds(hq.cluster) - cpu0) / t)
            quiet = runner.phase()
            bouncer_idle = (b.process_cpu_seconds([bouncer.proc.pid]) - bcpu0) / t
            sim_idle = (time.process_time() - me0) / t
            env.checkpoint()
            runner.phase()
            cpu0 = b.cluster_cpu_seconds(hq.cluster)
            with_fleet.append(b.pgbench_tps(hq, script, 1, secs))
            time.sleep(0.5)
            busy = (b.cluster_cpu_seconds(hq.cluster) - cpu0) / (secs + 0.5)
            time.sleep(poll + 0.5)                                 # the last changes arrive
            seen = runner.phase()
            runner.halt()
            # HQ's CPU less what the writer's own transactions took (at the rate it still reached)
            busy_cpu.append(max(0.0, busy - cpu_alone * with_fleet[-1] / alone[-1]))
            every = [x for v in seen.lags.values() for x in v]
            lags.append(b.percentile(every, 99))
            p99s = [b.percentile(v, 99) for v in seen.lags.values()]
            worst.append(max(p99s) if p99s else float("nan"))
            medians.append(statistics.median(p99s) if p99s else float("nan"))
            notes.append(f"run {run}: writer {alone[-1]:.0f} -> {with_fleet[-1]:.0f} TPS, HQ CPU {cpu_alone:.2f} -> "
                         f"{busy:.2f} cores; idle fleet {quiet.probes / t:.0f} probes/s, PgBouncer "
                         f"{bouncer_idle:.2f} cores, simulator {sim_idle:.2f} cores; busy fleet "
                         f"{seen.probes / secs:.0f} probes/s, {seen.windows / secs:.0f} windows/s, "
                         f"{seen.changes:,} changes to {len(seen.lags)} branches, {seen.errors} errors")
            b.say("  %s", notes[-1])
            if seen.errors or quiet.errors:
                raise RuntimeError(f"the simulated fleet saw {seen.errors + quiet.errors} query errors")
    finally:
        runner.close()
        bouncer.stop()
        env.fleet.drop_database(hq.name)
    med = b.median
    note = (f"median of {env.runs}; {k} simulated branches, each its own login and PgBouncer client "
            f"(transaction pooling, a server connection per login), poll {poll:g} s / idle {idle:g} s; writer: "
            f"pgbench -c 2 single-row UPDATEs of stock, filtered per store, durable HQ, {secs} s")
    return [b.limit_result("fleet", f"HQ CPU polling, {k:,} idle branches", med(idle_cpu), 0.5, "cores",
                           note=f"{med(idle_cpu) / k * 1000:.2f} ms/s per branch; " + note),
            b.limit_result("fleet", f"HQ CPU the {k:,} branches add while the writer writes", med(busy_cpu), 0.5,
                           "cores", note="; ".join(notes)),
            b.ratio_result("fleet", f"writer TPS with {k:,} branches vs none", med(with_fleet), med(alone), "TPS",
                           0.9, True, note),
            b.limit_result("fleet", "lag p99 over every change seen", med(lags), 2.0, "s",
                           note=f"worst branch p99 {med(worst):.2f} s, median branch p99 {med(medians):.2f} s")]


def current_snapshot_of(db) -> str:
    with db.connect() as conn:
        return current_snapshot(conn)
