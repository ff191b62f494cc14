"""`replicator demo`: the whole product on one machine, from nothing, in a minute.

Starts a throwaway HQ and two branch clusters, loads the sample point-of-sale
chain on HQ, installs capture, registers and initializes both branches (catalogs
down, each store's sales history up), starts a real `replicator run` daemon for
each, and keeps both flows busy: HQ changes prices, stock, customers and items
while the stores ring up sales, which HQ consolidates; HQ's own trigger takes its
stock down with each sold line and that stock comes back down to the store.  At
the end it waits for both flows to catch up, proves each branch holds exactly
HQ's rows (after row filters and excluded columns) and HQ exactly each store's
sales, and removes everything it started, also on Ctrl-C.  :func:`run_demo` reads like that list; the helpers below it
do one step each.
"""
from __future__ import annotations

import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import click
import yaml
from psycopg import sql
from rich.console import Console

from . import cluster as cluster_mod
from . import config, state
from .capture import install
from .cluster import Cluster, Database, server_os_user
from .db import data_dir
from .errors import ReplicatorError
from .hq import add_branch, status as hq_status
from .initialize import initialize
from .progress import reporter
from .sample import generate, load_hq_rules, load_schema
from .sample_changes import random_changes, random_sales
from .stream import CATALOGS
from .status import branch_status
from .verify import verify, verify_uploads
from .verify_report import format_report

log = logging.getLogger(__name__)

HQ_TEMPLATE = data_dir("config", packaged_as="templates") / "hq.yaml"   # replicator.config is a module
DBNAME = "pos"
SHOW_EVERY = 2.0          # seconds between progress lines while the load runs
CATCH_UP_TIMEOUT = 120.0  # seconds the branches get to apply the last changes
SALES_PER_SECOND = 2.0    # sales rung up at each store while the demo runs


@dataclass(frozen=True)
class BranchSpec:
    """One demo branch: its name on HQ, its store (row filters), what it keeps."""

    name: str
    store_id: int
    catalogs: tuple[str, ...]
    include_customers: bool


BRANCHES = (
    # store 1 keeps customers and more: filtered registers, users without their password hashes
    BranchSpec("store-001", 1, ("customers", "items", "stock", "policies", "currencies", "stores",
                                "registers", "payment_methods", "users"), include_customers=True),
    # store 2 keeps the daily catalogs only, no customers
    BranchSpec("store-002", 2, ("items", "stock", "policies", "currencies", "stores", "registers",
                                "payment_methods"), include_customers=False),
)


class DemoError(ReplicatorError):
    """The demo could not go on (a daemon died, a branch did not catch up)."""


@dataclass
class DemoBranch:
    spec: BranchSpec
    cluster: Cluster
    db: Database
    config_path: Path | None = None
    daemon: subprocess.Popen | None = None

    @property
    def cfg(self) -> config.BranchConfig:
        return config.load_branch(self.config_path)

    @property
    def log_path(self) -> Path:
        return self.config_path.with_suffix(".log")


def run_demo(duration: float = 60, keep: bool = False, size: str = "demo", rate: float = 50,
             echo=click.echo) -> int:
    """Run the demo; 0 when both branches match HQ at the end, 1 otherwise."""
    with _quiet_library_logs(), Workspace(echo) as ws:
        echo(f"working directory: {ws.dir}")
        started = time.monotonic()
        hq = start_hq(ws)
        with ThreadPoolExecutor(len(BRANCHES)) as pool:    # branch clusters start while HQ loads
            starting = [pool.submit(start_branch, ws, spec) for spec in BRANCHES]
            load_sample(hq, size, echo)
            branches = [f.result() for f in starting]
        hq_cfg = write_hq_config(ws, hq)
        install_capture(hq, hq_cfg, echo)
        for b in branches:
            register_branch(ws, hq, hq_cfg, b)
        initialize_branches(branches, echo)
        for b in branches:
            seed_sales_history(hq, b)
        upload_history(branches, echo)
        install_hq_rules(hq, echo)
        history = top_folios(hq)
        echo(f"setup done in {time.monotonic() - started:.1f} s")
        for b in branches:
            ws.start_daemon(b)
        changes, sales = drive_load(hq, branches, duration, rate, echo)
        echo(f"load stopped after {changes:,} HQ transactions and {sales:,} sales at the stores; waiting for "
             "both flows to catch up")
        wait_caught_up(branches, echo)
        ok = all([verify_branch(b.cfg, echo) for b in branches])
        ws.stop_daemons()
        summarize_changes(hq, echo)
        summarize_sales(hq, branches, history, echo)
        if keep:
            ws.keep_clusters(hq, branches)
        echo("demo finished: every branch matches HQ" if ok else "demo finished: VERIFICATION FAILED")
        return 0 if ok else 1


# ------------------------------------------------------------------ workspace

class Workspace:
    """Everything the demo starts (temp dir, clusters, daemons), so that one place
    stops it all: on success, on error, on Ctrl-C (SIGINT) and on SIGTERM."""

    def __init__(self, echo) -> None:
        self.echo = echo
        self.dir = Path(tempfile.mkdtemp(prefix="replicator-demo-"))
        self.dir.chmod(0o755)      # the clusters' OS user (postgres, when we are root) must enter it
        self.clusters: list[Cluster] = []
        self.branches: list[DemoBranch] = []
        self.kept = False
        self._old_term = None

    def __enter__(self) -> "Workspace":
        self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with _signals_ignored():      # a second Ctrl-C must not leave half the servers running
            if exc_type is not None:
                try:
                    self.echo(f"stopping the demo ({'interrupted' if exc_type is KeyboardInterrupt else 'error'});"
                              " cleaning up", err=True)
                except OSError:       # output gone (`| head`): clean up all the same
                    pass
            self.stop_daemons()
            if not self.kept:
                self.remove_all()
            signal.signal(signal.SIGTERM, self._old_term)

    def cluster(self, name: str) -> Cluster:
        c = Cluster(name, base_dir=self.dir)
        self.clusters.append(c)
        return c.start()

    def start_daemon(self, b: DemoBranch) -> None:
        """A real `replicator run` per branch, in its own session (we stop it, not the terminal)."""
        self.branches.append(b)      # first: a Ctrl-C right after Popen must still find it
        with open(b.log_path, "ab") as out:
            b.daemon = subprocess.Popen(
                [sys.executable, "-m", "replicator", "run", "-c", str(b.config_path)], cwd=self.dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.echo(f"{b.spec.name}: replicator running (pid {b.daemon.pid}, log {b.log_path})")

    def stop_daemons(self, timeout: float = 15) -> None:
        """SIGTERM (the daemon finishes its transaction), then SIGKILL if it does not exit."""
        running = [b for b in self.branches if b.daemon and b.daemon.poll() is None]
        for b in running:
            b.daemon.terminate()
        deadline = time.monotonic() + timeout
        for b in running:
            try:
                b.daemon.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("replicator of %s did not stop on SIGTERM; killing it", b.spec.name)
                b.daemon.kill()
                b.daemon.wait()

    def remove_all(self) -> None:
        for c in self.clusters:
            try:
                c.cleanup()
            except Exception as e:  # noqa: BLE001 - keep removing the others
                log.warning("could not remove cluster %s: %s", c.name, e)
        shutil.rmtree(self.dir, ignore_errors=True)

    def keep_clusters(self, hq: Database, branches: list[DemoBranch]) -> None:
        """--keep: leave the servers up and say how to reach and stop them."""
        self.kept = True
        for c in self.clusters:
            cluster_mod._LIVE.discard(c)     # the cluster module would stop them at exit
        self.echo("\nclusters kept running; connect with:")
        for name, d in [("HQ", hq)] + [(b.spec.name, b.db) for b in branches]:
            self.echo(f"  {name:<10} psql \"{d.dsn}\"")
        self.echo("keep a branch replicating with:")
        for b in branches:
            self.echo(f"  replicator run -c {b.config_path}")
        self.echo("stop and remove everything with:")
        for c in [hq.cluster] + [b.cluster for b in branches]:
            self.echo(f"  {_as_server_user()}{c.bindir / 'pg_ctl'} stop -m fast -D {c.data_dir}")
        self.echo(f"  rm -rf {self.dir}")


@contextmanager
def _quiet_library_logs():
    """The demo tells its story on stdout; the library's INFO lines (a line per captured
    table, per cluster, per migration) would bury it.  Init progress and warnings stay;
    -v shows everything."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    names = ("capture", "cluster", "db", "hq", "initialize", "sample", "uploads", "upload_init", "verify")
    loggers = [logging.getLogger(f"replicator.{n}") for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old):
            lg.setLevel(level)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def _signals_ignored():
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _as_server_user() -> str:
    user = server_os_user()
    return f"runuser -u {user[0]} -- " if user else ""


# ------------------------------------------------------------------ setup

def start_hq(ws: Workspace) -> Database:
    t0 = time.monotonic()
    hq = ws.cluster("hq").create_database(DBNAME)
    ws.echo(f"started HQ cluster in {time.monotonic() - t0:.1f} s (PostgreSQL from {hq.cluster.bindir})")
    return hq


def start_branch(ws: Workspace, spec: BranchSpec) -> DemoBranch:
    """A branch cluster with the sample schema and no data: init brings the data."""
    c = ws.cluster(spec.name)
    b = DemoBranch(spec, c, c.create_database(DBNAME))
    with b.db.connect() as conn:
        load_schema(conn)
    ws.echo(f"{spec.name}: cluster started with the sample schema, no data yet")
    return b


def load_sample(hq: Database, size: str, echo) -> None:
    """The sample POS chain on HQ: schema and data (generated before capture is installed)."""
    t0 = time.monotonic()
    with hq.connect() as conn:
        load_schema(conn)
        counts = generate(conn, size)
    echo(f"loaded the sample chain on HQ ({size}: {counts['items']:,} items, {counts['stock']:,} stock rows, "
         f"{counts['customers']:,} customers, {sum(counts.values()):,} rows) in {time.monotonic() - t0:.1f} s")


def write_hq_config(ws: Workspace, hq: Database) -> Path:
    """hq.yaml: the shipped catalogs of config/hq.yaml, pointed at the demo's HQ."""
    doc = yaml.safe_load(HQ_TEMPLATE.read_text(encoding="utf-8"))
    doc["dsn"] = hq.dsn
    path = ws.dir / "hq.yaml"
    path.write_text(f"# written by `replicator demo` from {HQ_TEMPLATE.name}\n"
                    + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def install_capture(hq: Database, hq_path: Path, echo) -> None:
    """What `replicator hq install` does: capture of the catalogs, and the upload targets
    (each store's slice of the sales tables, enforced by row-level security)."""
    from .uploads import check_targets, install_targets
    cfg = config.load_hq(hq_path)
    with hq.connect() as conn:
        check_targets(conn, cfg)
        report = install(conn, cfg)
        targets = install_targets(conn, cfg)
    echo(f"capture installed on HQ: {len(report.attached)} tables; upload targets: {', '.join(targets.changed)}")


def register_branch(ws: Workspace, hq: Database, hq_path: Path, b: DemoBranch) -> None:
    """Register the branch on HQ with its own login, and write its branch.yaml.

    The password goes to a pgpass file (libpq's ``passfile``), never into the YAML.
    """
    password = secrets.token_urlsafe(18)
    with hq.connect() as conn:
        reg = add_branch(conn, config.load_hq(hq_path), b.spec.name, {"store_id": b.spec.store_id}, password)
    passfile = ws.dir / "pgpass"
    with open(os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as f:
        f.write(f"{hq.cluster.host}:{hq.cluster.port}:{DBNAME}:{reg.role}:{password}\n")
    source = f"{hq.cluster.dsn(DBNAME, user=reg.role)}?passfile={quote(str(passfile))}"
    doc = {"branch": b.spec.name, "source": {"dsn": source}, "target": {"dsn": b.db.dsn},
           "catalogs": list(b.spec.catalogs)}
    b.config_path = ws.dir / f"{b.spec.name}.yaml"
    b.config_path.write_text(f"# written by `replicator demo`: store {b.spec.store_id}\n"
                             + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def initialize_branches(branches: list[DemoBranch], echo) -> None:
    """First sync: the first branch with customers, the second without."""
    for b in branches:
        with reporter() as progress:
            rep = initialize(b.cfg, include_customers=b.spec.include_customers, progress=progress)
        echo(f"{b.spec.name}: initialized {', '.join(rep.catalogs)}: {len(rep.copies)} tables, "
             f"{rep.rows:,} rows, {rep.bytes / 1e6:.1f} MB in {rep.seconds:.1f} s")


def seed_sales_history(hq: Database, b: DemoBranch) -> None:
    """The store's sales so far, as its point of sale holds them before replicator: the
    sample chain's sales of that store (written in replica mode: a store without the
    customers catalog still holds the tickets that name a customer)."""
    with hq.connect() as src, b.db.connect() as dst:
        with dst.transaction():
            dst.execute("SET LOCAL session_replication_role = replica")
            for table in (sql.Identifier("public", "sales"), sql.Identifier("public", "sale_lines")):
                query = sql.SQL("COPY (SELECT * FROM {} WHERE store_id = {}) TO STDOUT").format(
                    table, sql.Literal(b.spec.store_id))
                with src.cursor().copy(query) as out, \
                        dst.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(table)) as into:
                    for data in out:
                        into.write(data)


def upload_history(branches: list[DemoBranch], echo) -> None:
    """`replicator init`'s second half: capture on the store's sales tables, and its history
    up into its slice at HQ."""
    from . import upload_init
    for b in branches:
        t0 = time.monotonic()
        sent = upload_init.initialize(b.cfg)
        n = b.db.scalar("SELECT count(*) FROM public.sales")
        echo(f"{b.spec.name}: sales history uploaded to HQ ({', '.join(sent)}: {n:,} sales) in "
             f"{time.monotonic() - t0:.1f} s")


def install_hq_rules(hq: Database, echo) -> None:
    with hq.connect() as conn:
        load_hq_rules(conn)
    echo("HQ rule installed: each consolidated sale line takes HQ's stock down (ENABLE ALWAYS trigger)")


def top_folios(hq: Database) -> dict[int, int]:
    """Each register's last folio at HQ: what is sold after it is the demo's."""
    return dict(hq.execute("SELECT register_id, max(folio) FROM public.sales GROUP BY 1") or [])


# ------------------------------------------------------------------ live load

@dataclass
class Lag:
    branch: str
    applied: int           # changes applied since init (the branch's own count)
    pending: int | None    # HQ changes it has not reported yet
    seconds: float | None  # age of the oldest of those
    sales_up: int = 0                # sales of this store at HQ
    sales_pending: int | None = None  # upload changes still at the store, as it last reported


def drive_load(hq: Database, branches: list[DemoBranch], duration: float, rate: float, echo) -> tuple[int, int]:
    """HQ keeps working (`rate` random catalog changes per second) and each store sells
    (SALES_PER_SECOND) for `duration` seconds, while each branch's progress and lag is shown
    every SHOW_EVERY seconds.  Returns (HQ transactions, sales)."""
    rng = random.Random(20240501)
    done = sold = 0
    started = time.monotonic()
    tills = [b.db.connect() for b in branches]
    try:
        with hq.connect() as conn, LagDisplay(echo) as display:
            next_show = started
            while (elapsed := time.monotonic() - started) < duration:
                due = int(elapsed * rate) - done
                if due > 0:
                    random_changes(conn, due, rng)
                    done += due
                due = int(elapsed * SALES_PER_SECOND) - sold
                if due > 0:
                    for b, till in zip(branches, tills):
                        random_sales(till, due, rng, b.spec.store_id)
                    sold += due
                next_show = _show(display, conn, branches, started, elapsed, done, next_show)
                time.sleep(min(0.05, max(started + duration - time.monotonic(), 0)))
            display.show(time.monotonic() - started, done, logged_rows(conn), measure_lag(conn, branches))
    finally:
        for till in tills:
            till.close()
    return done, sold * len(branches)


def _show(display, conn, branches, started, elapsed, done, next_show) -> float:
    if time.monotonic() >= next_show:
        check_daemons(branches)
        display.show(elapsed, done, logged_rows(conn), measure_lag(conn, branches))
        next_show += SHOW_EVERY
    return next_show


def logged_rows(hq_conn) -> int:
    """Row changes HQ's capture has logged (one transaction changes one row or a dozen)."""
    return hq_conn.execute("SELECT coalesce(sum(coalesce(cardinality(rows), 1)), 0) "
                           "FROM replication.change_log").fetchone()[0]


def measure_lag(hq_conn, branches: list[DemoBranch]) -> list[Lag]:
    """Pending changes and lag as HQ sees them (replication.branches), applied count from each branch."""
    on_hq = {s.name: s for s in hq_status(hq_conn)}
    sales = dict(hq_conn.execute("SELECT store_id, count(*) FROM public.sales GROUP BY store_id").fetchall())
    out = []
    for b in branches:
        with b.db.connect() as conn:
            pos = state.load_position(conn, CATALOGS)
        s = on_hq.get(b.spec.name)
        lag = Lag(b.spec.name, pos.applied_changes if pos else 0, None, None, sales.get(b.spec.store_id, 0))
        if s is not None:
            lag.sales_pending = s.sales_pending
            if s.pending is not None:                # a position reported
                lag.pending, lag.seconds = s.pending, s.lag.total_seconds() if s.pending and s.lag else 0.0
        out.append(lag)
    return out


def check_daemons(branches: list[DemoBranch]) -> None:
    for b in branches:
        if b.daemon is not None and b.daemon.poll() is not None:
            tail = "\n".join(b.log_path.read_text(errors="replace").splitlines()[-10:])
            raise DemoError(f"the replicator of {b.spec.name} exited with code {b.daemon.returncode}:\n{tail}")


class LagDisplay:
    """Per-branch progress while the load runs: a live table on a terminal, a line otherwise."""

    def __init__(self, echo) -> None:
        self.echo = echo
        self.live = None

    def __enter__(self) -> "LagDisplay":
        if Console().is_terminal:
            from rich.live import Live
            self.live = Live(auto_refresh=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def show(self, elapsed: float, transactions: int, logged: int, lags: list[Lag]) -> None:
        """`applied` counts the rows a branch received (its row filter and catalogs), `pending` the
        HQ log rows it has not reported, `lag` the age of the oldest of those."""
        if self.live is not None:
            self.live.update(self._table(elapsed, transactions, logged, lags), refresh=True)
            return
        parts = [f"{lag.branch}: {lag.applied:,} applied, {_pending(lag)} pending, lag {_secs(lag.seconds)}, "
                 f"{lag.sales_up:,} sales at HQ, {_sales_pending(lag)} to go up" for lag in lags]
        self.echo(f"{elapsed:5.0f} s  HQ {transactions:,} transactions, {logged:,} rows changed | "
                  + " | ".join(parts))

    @staticmethod
    def _table(elapsed: float, transactions: int, logged: int, lags: list[Lag]):
        from rich.console import Group
        from rich.table import Table
        table = Table()
        for col in ("branch", "applied", "pending", "lag", "sales at HQ", "to go up"):
            table.add_column(col, justify="left" if col == "branch" else "right")
        for lag in lags:
            table.add_row(lag.branch, f"{lag.applied:,}", _pending(lag), _secs(lag.seconds), f"{lag.sales_up:,}",
                          _sales_pending(lag))
        return Group(f"{elapsed:.0f} s: HQ committed {transactions:,} transactions, {logged:,} rows changed", table)


def _pending(lag: Lag) -> str:
    return "-" if lag.pending is None else f"{lag.pending:,}"


def _sales_pending(lag: Lag) -> str:
    return "-" if lag.sales_pending is None else f"{lag.sales_pending:,}"


def _secs(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


# ------------------------------------------------------------------ the end

def wait_caught_up(branches: list[DemoBranch], echo, timeout: float = CATCH_UP_TIMEOUT) -> None:
    """Until every branch's sales are all at HQ and then (HQ's stock moved with them) every
    selected catalog is up to date, as `replicator status` says."""
    from . import uploads
    started = time.monotonic()
    waiting = list(branches)
    up = {b.spec.name: False for b in branches}
    while waiting:
        check_daemons(waiting)
        for b in list(waiting):
            if not up[b.spec.name]:
                st = uploads.status(b.cfg)
                up[b.spec.name] = st is None or (st.pending == 0 and st.set_aside == 0)
            if up[b.spec.name] and branch_status(b.cfg).up_to_date:
                echo(f"{b.spec.name}: caught up ({time.monotonic() - started:.1f} s after the load stopped)")
                waiting.remove(b)
        if waiting and time.monotonic() - started > timeout:
            raise DemoError(f"{', '.join(b.spec.name for b in waiting)} did not catch up within {timeout:.0f} s; "
                            f"see {', '.join(str(b.log_path) for b in waiting)}")
        if waiting:
            time.sleep(0.3)


def verify_branch(cfg: config.BranchConfig, echo) -> bool:
    """Per catalog: up to date (as `replicator status` says) and equal to HQ's rows for this
    branch (as `replicator verify` proves: row filter applied, excluded columns left out);
    then its sales: all at HQ and equal to its slice there."""
    status = branch_status(cfg)
    report = verify(cfg, wait=30)
    ok = _verify_catalogs(cfg, status, report, echo)
    return _verify_sales(cfg, echo) and ok


def _verify_catalogs(cfg: config.BranchConfig, status, report, echo) -> bool:
    ok = True
    for c in status.catalogs:
        tables = [t for t in report.tables if t.catalog == c.name]
        equal = bool(tables) and all(t.status == "equal" for t in tables)
        ok = ok and equal and c.state == "up to date"
        rows = sum(t.branch_rows for t in tables)
        echo(f"{cfg.branch}  {c.name:<15} {c.label:<14} {c.state}, "
             + (f"verified: {rows:,} rows equal HQ" if equal else "DIFFERENT from HQ"))
    if not ok:
        for line in format_report(report):
            echo(f"{cfg.branch}    {line}")
    echo(f"{cfg.branch}: catalogs are up to date" if ok else f"{cfg.branch}: catalogs DIFFER from HQ")
    return ok


def _verify_sales(cfg: config.BranchConfig, echo) -> bool:
    """The branch's sales against its slice at HQ (`replicator verify` does both)."""
    from . import uploads
    st = uploads.status(cfg)
    if st is None:
        return True
    report = verify_uploads(cfg, wait=30)
    equal = report.equal and all(t.status == "equal" for t in report.tables)
    rows = sum(t.hq_rows for t in report.tables)
    echo(f"{cfg.branch}  {'sales':<15} {'Ventas':<14} {st.line()}, "
         + (f"verified: {rows:,} rows equal HQ's" if equal else "DIFFERENT at HQ"))
    if not equal:
        for line in format_report(report):
            echo(f"{cfg.branch}    {line}")
    ok = equal and st.pending == 0 and st.set_aside == 0
    echo(f"{cfg.branch}: sales are up at HQ" if ok else f"{cfg.branch}: sales DIFFER at HQ")
    return ok


def summarize_changes(hq: Database, echo) -> None:
    """What HQ's change log captured during the demo, per table and operation."""
    rows = hq.execute("""SELECT t.table_name, coalesce(sum(n) FILTER (WHERE op = 'I'), 0),
                                coalesce(sum(n) FILTER (WHERE op = 'U'), 0), coalesce(sum(n) FILTER (WHERE op = 'D'), 0)
                           FROM (SELECT table_id, upper(op::text) AS op, coalesce(cardinality(rows), 1) AS n  -- bulk: i/u/d
                                   FROM replication.change_log) l JOIN replication.tables t ON t.id = l.table_id
                          GROUP BY 1 ORDER BY sum(n) DESC, 1""") or []
    echo("HQ captured during the demo:")
    for table, i, u, d in rows:
        echo(f"  {table:<16} {i:>6,} inserted {u:>6,} updated {d:>6,} deleted")


def summarize_sales(hq: Database, branches: list[DemoBranch], history: dict[int, int], echo) -> None:
    """HQ's side of the sales flow: the consolidated sales per store, what HQ's rule took
    off its stock for the lines sold during the demo (the branch holds that stock: verified
    above), and the folio check of `hq status`."""
    from .hq import folio_gaps
    echo("HQ consolidated (concentrado de ventas):")
    for b in branches:
        n, total = hq.execute("SELECT count(*), coalesce(sum(total), 0) FROM public.sales WHERE store_id = %s",
                              (b.spec.store_id,))[0]
        lines = hq.execute("""SELECT l.register_id, l.folio, l.quantity FROM public.sale_lines l
                               WHERE l.store_id = %s AND EXISTS (SELECT FROM public.stock k
                                     WHERE k.store_id = l.store_id AND k.item_id = l.item_id)""",
                           (b.spec.store_id,)) or []
        new = [q for reg, folio, q in lines if folio > history.get(reg, 0)]
        echo(f"  {b.spec.name}: {n:,} sales, total {total:,.2f}; {len(new):,} lines sold during the demo took "
             f"{sum(new, 0):,} units off HQ's stock of store {b.spec.store_id}, which {b.spec.name} holds too")
    with hq.connect() as conn:
        gaps = folio_gaps(conn)
    echo("  fiscal folios: no gaps at HQ" if not gaps else
         f"  fiscal folios: {len(gaps)} registers with gaps at HQ (`replicator hq status`)")
