"""The command line: a thin shell over the library.

Each command parses options, calls one library function and prints the
result.  A ReplicatorError becomes one line on stderr and its exit code
(2 for configuration, 1 otherwise); nothing else is caught, so a bug keeps
its traceback.
"""
from __future__ import annotations

import inspect
import json
import logging
import sys

import click
import psycopg

from . import config as config_mod
from .errors import ConfigError, NotInitialized, ReplicatorError, redact

log = logging.getLogger("replicator")

CONFIG = click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
                      help="Path to the YAML configuration file.")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": self.formatTime(record), "level": record.levelname,
                           "logger": record.name, "msg": record.getMessage()}, ensure_ascii=False)


class _Redact(logging.Filter):
    """Last line of defence: no log line carries a password from a connection string."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def _setup_logging(verbose: int, quiet: bool, log_json: bool, daemon: bool) -> None:
    """Daemons log a line per batch by default; one-shot commands print results and log only problems."""
    levels = [logging.INFO, logging.DEBUG] if daemon else [logging.WARNING, logging.INFO, logging.DEBUG]
    level = logging.WARNING if quiet else levels[min(verbose, len(levels) - 1)]
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Redact())
    handler.setFormatter(_JsonFormatter() if log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("psycopg").setLevel(logging.WARNING)


def _keep_examples(text: str) -> str:
    """Click rewraps every help paragraph; a \\b line keeps each example command on its own line."""
    paragraphs, in_example = inspect.cleandoc(text).split("\n\n"), False
    for i, para in enumerate(paragraphs):
        if para.startswith((" ", "\b")):
            if in_example and not para.startswith("\b"):
                paragraphs[i] = "\b\n" + para
        else:
            in_example = para.rstrip().endswith(("Example:", "Examples:"))
    return "\n\n".join(paragraphs)


class _KeepExamples:
    """Help text with its Example: block printed as written."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.help:
            self.help = _keep_examples(self.help)
        super().format_help_text(ctx, formatter)


class _Command(_KeepExamples, click.Command):
    pass


class _Group(_KeepExamples, click.Group):
    command_class = _Command    # every @group.command()
    group_class = type          # sub-groups are _Group too


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging; repeat for DEBUG (SQL).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--log-json", is_flag=True, help="Log JSON lines (for daemons and log shippers).")
@click.version_option(package_name="replicator")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, log_json: bool) -> None:
    """Keep branch catalogs in step with HQ over PostgreSQL.

    HQ commands live under `replicator hq`; the others run on a branch.

    Example:

        replicator hq install -c hq.yaml
        replicator init -c branch.yaml
        replicator run -c branch.yaml
    """
    _setup_logging(verbose, quiet, log_json, daemon=ctx.invoked_subcommand in ("run", "init", "demo"))


# ------------------------------------------------------------------ HQ

@cli.group()
def hq() -> None:
    """Administer capture on HQ: install, branches, status, pruning.

    Example:

        replicator hq install -c hq.yaml
    """


def _hq_conn(cfg):
    from . import db
    return db.connect(cfg.dsn, "HQ", autocommit=True, application="replicator hq")


DETACH = click.option("--detach", is_flag=True, help="Also stop capturing tables hq.yaml no longer lists, "
                      "although branches are registered (their changes stop reaching them).")


@hq.command("install")
@CONFIG
@DETACH
def hq_install(config_path: str, detach: bool) -> None:
    """Install or upgrade capture on HQ (idempotent).

    Applies pending migrations from sql/capture, registers the catalogs of
    hq.yaml and attaches capture triggers to their tables. Running it again
    changes nothing; a table added to a catalog gets its trigger. A table
    hq.yaml no longer lists keeps its capture while branches are
    registered, unless --detach.

    Example:

        replicator hq install -c hq.yaml
    """
    from .capture import install
    from .uploads import check_targets, install_targets
    cfg = config_mod.load_hq(config_path)
    with _hq_conn(cfg) as conn:
        check_targets(conn, cfg)
        report = install(conn, cfg, detach)
        targets = install_targets(conn, cfg)
    for m in report.migrations:
        click.echo(f"applied migration {m}")
    for t in report.attached:
        click.echo(f"capture attached: {t}")
    for t in report.retired:
        click.echo(f"capture removed: {t}")
    for t, old, new in report.filters:
        click.echo(f"row filter changed: {t}: {old or '(none)'} -> {new or '(none)'}")
    for t in report.restricted:
        click.echo(f"row restriction for branch logins rebuilt: {t}")
    for t in targets.changed:
        click.echo(f"upload target: {t} (branch logins write only their slice)")
    for w in targets.warnings:
        click.echo(f"warning: {w}", err=True)
    if not report.changed and not targets.changed:
        click.echo(f"capture is up to date ({len(report.unchanged)} tables); nothing changed")


@hq.command("sql")
@CONFIG
@DETACH
def hq_sql(config_path: str, detach: bool) -> None:
    """Print the install DDL for your own migration tool (no connection needed).

    Example:

        replicator hq sql -c hq.yaml > V42__replicator.sql
    """
    from .capture import sql_script
    click.echo(sql_script(config_mod.load_hq(config_path), detach), nl=False)


def _parse_params(values: tuple[str, ...]) -> dict:
    params = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("expected KEY=VALUE", None, None, "--param", item)
        params[key.strip()] = value
    return params


@hq.command("add-branch")
@CONFIG
@click.argument("branch")
@click.option("--param", "params", multiple=True, metavar="K=V", help="Row-filter parameter, e.g. store_id=42.")
@click.option("--password-env", metavar="VAR", help="Take the branch role's password from this variable "
              "(default: generate one and show it once).")
@click.option("--connection-limit", type=int, default=6, show_default=True, metavar="N",
              help="Most HQ connections the branch's login may hold at once.")
@click.option("--catalogs", "catalogs", metavar="A,B", help="The catalogs the branch may read "
              "(default: every catalog, also ones defined later).")
def hq_add_branch(config_path: str, branch: str, params: tuple[str, ...], password_env: str | None,
                  connection_limit: int, catalogs: str | None) -> None:
    """Register BRANCH on HQ with its parameters and a least-privilege login role.

    Prints a ready branch.yaml on stdout. HQ, not the branch, decides which
    rows the branch receives: row filters are filled with these parameters.
    The login role is created fresh (an existing role that add-branch did
    not create for BRANCH is refused), with a connection limit and session
    timeouts that protect HQ.

    Example:

        replicator hq add-branch -c hq.yaml store-042 --param store_id=42 > branch.yaml
        replicator hq add-branch -c hq.yaml store-043 --param store_id=43 --catalogs items,stock
    """
    import os
    from .hq import add_branch
    cfg = config_mod.load_hq(config_path)
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if not password:
            raise ConfigError(f"environment variable {password_env} is empty or not set", None, None,
                              "--password-env")
    with _hq_conn(cfg) as conn:
        granted = None if catalogs is None else [c.strip() for c in catalogs.split(",") if c.strip()]
        reg = add_branch(conn, cfg, branch, _parse_params(params), password, connection_limit, granted)
    if reg.password:
        click.echo(f"password for role {reg.role} (shown once; put it in the branch's ~/.pgpass): "
                   f"{reg.password}", err=True)
    click.echo(reg.branch_yaml, nl=False)


@hq.command("status")
@CONFIG
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for machines.")
def hq_status(config_path: str, as_json: bool) -> None:
    """Show every branch: last report, pending changes, changes it set aside, lag;
    its sales: uploaded up to, pending, set aside; and the fiscal folios missing at
    HQ per register (uploads that name their folios).

    Example:

        replicator hq status -c hq.yaml
        replicator hq status -c hq.yaml --json
    """
    from .hq import folio_gaps, status
    cfg = config_mod.load_hq(config_path)
    with _hq_conn(cfg) as conn:
        rows = status(conn)
        gaps = folio_gaps(conn)
    if as_json:
        click.echo(json.dumps({"branches": [b.to_json() for b in rows],
                               "folio_gaps": [g.to_json() for g in gaps]}, indent=2))
        return
    if not rows:
        click.echo("no branches registered; use `replicator hq add-branch`")
        return
    click.echo(f"{'branch':<20} {'last report':<20} {'pending':>8} {'set aside':>9} {'lag':>9}  "
               f"{'sales up to':<20} {'pending':>8} {'set aside':>9}")
    for b in rows:
        seen = f"{b.acked_at:%Y-%m-%d %H:%M:%S}" if b.acked_at else "never"
        pending = "-" if b.pending is None else str(b.pending)
        lag = "-" if b.lag is None else f"{b.lag.total_seconds():.1f} s"
        sales = f"{b.sales_until:%Y-%m-%d %H:%M:%S}" if b.sales_until else "-"
        sales_pending = "-" if b.sales_pending is None else str(b.sales_pending)
        flag = "" if b.active else " (inactive)"
        click.echo(f"{b.name:<20} {seen:<20} {pending:>8} {b.set_aside:>9} {lag:>9}  {sales:<20} "
                   f"{sales_pending:>8} {b.sales_set_aside:>9}{flag}")
    for g in gaps:
        more = ", ..." if g.missing > sum(_range_size(r) for r in g.ranges) else ""
        click.echo(f"folio gap: {g.table} register {g.register}: {g.missing} folio{'s' * (g.missing != 1)} "
                   f"missing at HQ ({', '.join(g.ranges)}{more})")


def _range_size(r: str) -> int:
    lo, _, hi = r.partition("-")
    return int(hi) - int(lo) + 1 if hi else 1


@hq.command("metrics")
@CONFIG
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Serve the fleet's metrics at http://HOST:PORT/metrics.")
def hq_metrics(config_path: str, listen: str) -> None:
    """Serve every branch's state as HQ sees it, as Prometheus metrics, until stopped.

    Each scrape reads replication.branches (as `hq status` does): last
    report, lag, pending changes, rows set aside, active; so one scrape
    shows every store, including one whose own replicator is down.

    Example:

        replicator hq metrics -c hq.yaml --listen 127.0.0.1:9188
    """
    from .hq import serve_fleet_metrics
    from .metrics import parse_listen
    parse_listen(listen, "--listen")
    serve_fleet_metrics(config_mod.load_hq(config_path), listen)


@hq.command("deactivate")
@CONFIG
@click.argument("branch")
def hq_deactivate(config_path: str, branch: str) -> None:
    """Stop BRANCH from holding HQ's log; its login can no longer connect.

    For a store that closed or went silent: `hq prune` stops keeping log
    rows for it, its role loses LOGIN and its open sessions are ended.
    `hq add-branch` with the same name brings it back (then `replicator
    init --force` on the branch if the log was pruned past it).

    Example:

        replicator hq deactivate -c hq.yaml store-042
    """
    from .hq import deactivate
    cfg = config_mod.load_hq(config_path)
    with _hq_conn(cfg) as conn:
        rep = deactivate(conn, branch)
    ended = ("its open sessions could not be ended (needs pg_signal_backend)" if rep.sessions_ended is None
             else f"{rep.sessions_ended} open session(s) ended")
    click.echo(f"deactivated {rep.branch}: role {rep.role} can no longer log in; {ended}")


@hq.command("prune")
@CONFIG
def hq_prune(config_path: str) -> None:
    """Delete log rows that every active branch has applied and that are older than `retention`.

    Example:

        replicator hq prune -c hq.yaml
    """
    from .hq import prune
    cfg = config_mod.load_hq(config_path)
    with _hq_conn(cfg) as conn:
        rep = prune(conn, cfg)
    click.echo(f"pruned {rep.deleted} log rows (kept everything from xid {rep.horizon})")
    if rep.kept_for:
        click.echo(f"oldest position held by: {', '.join(rep.kept_for)}")


# -------------------------------------------------------------- branch

@cli.command()
@CONFIG
def check(config_path: str) -> None:
    """Check connections and readiness; says "connection OK".

    Exit 0 when the branch is ready to sync, 1 otherwise, one problem per line.

    Example:

        replicator check -c branch.yaml
    """
    from .check import run_check
    cfg = config_mod.load_branch(config_path)
    report = run_check(cfg)
    for line in report.lines:
        click.echo(line)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    sys.exit(0 if report.ok else 1)


@cli.command()
@CONFIG
@click.argument("catalogs", nargs=-1)
@click.option("--include-customers", is_flag=True, help="Also copy customers (skipped by default: large).")
@click.option("--force", is_flag=True, help="Truncate and copy again catalogs already initialized.")
@click.option("--create-missing", is_flag=True, help="Create missing branch tables from HQ's definition.")
def init(config_path: str, catalogs: tuple[str, ...], include_customers: bool, force: bool,
         create_missing: bool) -> None:
    """First sync: truncate and copy the selected catalogs from HQ.

    Copies every selected catalog except customers (unless
    --include-customers or named), each at one HQ snapshot, and hands it
    over to the change stream with no gap and no double. Safe while HQ is
    writing and while `replicator run` is running.

    Example:

        replicator init -c branch.yaml
        replicator init -c branch.yaml kits        # a catalog added later
    """
    from .errors import AlreadyInitialized
    from .initialize import initialize
    from .progress import reporter
    from . import uploads
    cfg = config_mod.load_branch(config_path)
    rep = None
    try:
        with reporter() as progress:
            rep = initialize(cfg, list(catalogs), include_customers, force, create_missing, progress)
    except AlreadyInitialized:
        if catalogs:
            raise
        sent = uploads.initialize(cfg, force)    # the uploads may still need their first sync
        if not sent:
            raise
        click.echo(f"uploaded the branch's history of {', '.join(sent)} to HQ (its slice)")
        return
    if not catalogs:
        sent = uploads.initialize(cfg, force)
        if sent:
            click.echo(f"uploaded the branch's history of {', '.join(sent)} to HQ (its slice)")
    for name, since in rep.skipped.items():
        click.echo(f"skipped {name}: already initialized since {since:%Y-%m-%d %H:%M} (--force copies again)")
    mb = rep.bytes / 1e6
    click.echo(f"initialized {', '.join(rep.catalogs) or 'nothing'}: {len(rep.copies)} tables, "
               f"{rep.rows} rows, {mb:.1f} MB in {rep.seconds:.1f} s")


@cli.command()
@CONFIG
@click.option("--once", is_flag=True, help="Catch up to HQ's state at start, then exit 0.")
@click.option("--metrics", "metrics_listen", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics while running.")
def run(config_path: str, once: bool, metrics_listen: str | None) -> None:
    """Replicate HQ changes to this branch until stopped (SIGTERM/Ctrl-C finish cleanly).

    Probes HQ's log every `poll_interval` (branch.yaml, default 250ms; one
    indexed query), and every `idle_poll_interval` (default 2s) after 5 s
    with nothing new for this branch. Problems found at start (config, password, schema,
    nothing listening) exit at once: 2 for configuration, 1 otherwise. Once
    running, a lost HQ or branch connection is logged once and retried
    with backoff until it is back. SIGTERM/SIGINT finish the current
    transaction and exit 0. One `run` per branch database: a second one
    names the one holding the lock and exits 1.

    Example:

        replicator run -c branch.yaml
        replicator run -c branch.yaml --once     # catch up and exit
        replicator run -c branch.yaml --metrics 127.0.0.1:9187
    """
    from .daemon import run as run_loop
    from .metrics import parse_listen
    if metrics_listen:
        parse_listen(metrics_listen)              # a bad address is a usage error before anything
    cfg = config_mod.load_branch(config_path)
    run_loop(cfg, once=once, metrics_listen=metrics_listen)


@cli.command()
@CONFIG
def status(config_path: str) -> None:
    """Per catalog: up to date, behind by N changes, or not initialized; then
    every change set aside (refused by this branch: table, key, reason, since).

    Exit 0 when every selected catalog is up to date and nothing is set aside,
    1 otherwise.

    Example:

        replicator status -c branch.yaml
    """
    from .status import branch_status
    cfg = config_mod.load_branch(config_path)
    st = branch_status(cfg)
    for c in st.catalogs:
        click.echo(f"{c.name:<16} {c.label:<16} {c.state}")
    if st.set_aside:
        click.echo(f"{len(st.set_aside)} change{'s' * (len(st.set_aside) != 1)} set aside (refused by this "
                   "branch; `replicator set-aside list`):")
        for row in st.set_aside:
            click.echo(f"  {row.line()}")
    if st.up_to_date:
        click.echo("catalogs are up to date")
    from .uploads import status as upload_status
    up = upload_status(cfg)
    if up is not None:
        click.echo(up.line())
    sys.exit(0 if st.up_to_date and (up is None or (up.initialized and not up.set_aside)) else 1)


@cli.command("sql")
@CONFIG
def branch_sql(config_path: str) -> None:
    """Print the branch side's DDL for your own migration tool: its state tables and
    the capture of the uploads HQ defines for it (asks HQ which tables those are).

    Example:

        replicator sql -c branch.yaml > V7__replicator_branch.sql
    """
    from . import db
    from .uploads import print_sql
    cfg = config_mod.load_branch(config_path)
    with db.connect(cfg.source_dsn, "HQ", autocommit=True, application="replicator sql") as hq_conn:
        click.echo(print_sql(hq_conn, cfg), nl=False)


@cli.command("purge")
@CONFIG
@click.argument("table")
@click.option("--where", "where", required=True, metavar="PREDICATE",
              help="Which rows, in the row-filter grammar with values: \"sold_at < '2025-01-01 00:00-06'\".")
@click.option("--dry-run", is_flag=True, help="Count what would go, delete nothing.")
def purge_cmd(config_path: str, table: str, where: str, dry_run: bool) -> None:
    """Delete old sales at this branch only; HQ keeps its consolidated record.

    TABLE is an upload table; the rows of upload tables that reference the
    purged ones (a sale's lines) go with them. Nothing of it is captured, so
    nothing of it goes up; changes still waiting in the branch's log go up all
    the same. Recorded in replication.purges, and `init --force` and
    `verify --repair` leave those rows at HQ.

    Example:

        replicator purge -c branch.yaml public.sales --where "sold_at < '2025-01-01 00:00-06'" --dry-run
    """
    from .purge import purge
    cfg = config_mod.load_branch(config_path)
    report = purge(cfg, table, where, dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} at branch {cfg.branch}: " + ", ".join(f"{n} rows of {t}" for t, n in report.rows.items())
               + ("" if dry_run else "; HQ keeps them"))


@cli.group("set-aside")
def set_aside() -> None:
    """Changes this branch refused (a local constraint, a value that does not fit).

    A refused row is set aside, the rest of the stream goes on, and `run`
    retries it at start and every minute. These commands list them, retry
    them now, or discard one on purpose (recorded in replication.discarded).

    Example:

        replicator set-aside list -c branch.yaml
        replicator set-aside discard -c branch.yaml public.items 42
    """


UPLOADS_FLAG = click.option("--uploads", "uploads_side", is_flag=True,
                            help="the sales this branch uploads, set aside at HQ (through the branch's HQ login)")


def _aside_side(cfg, uploads_side: bool, app: str):
    """(connection, stream) of the set-aside rows asked for: the branch's catalogs, or its
    uploads at HQ (row-level security shows the login only its own)."""
    from . import db, state
    from .stream import CATALOGS
    if uploads_side:
        from .uploads import stream as upload_stream
        conn = db.connect(cfg.source_dsn, "HQ", autocommit=True, application=app)
        return conn, upload_stream(cfg).name
    conn = db.connect(cfg.target_dsn, "branch", autocommit=True, application=app)
    state.require_current(conn)
    return conn, CATALOGS


@set_aside.command("list")
@CONFIG
@UPLOADS_FLAG
def aside_list(config_path: str, uploads_side: bool) -> None:
    """List the changes set aside. Exit 1 when there are any.

    Example:

        replicator set-aside list -c branch.yaml
        replicator set-aside list -c branch.yaml --uploads
    """
    from . import aside as aside_mod
    cfg = config_mod.load_branch(config_path)
    conn, stream = _aside_side(cfg, uploads_side, "replicator set-aside")
    with conn:
        rows = aside_mod.rows(conn, stream)
    for row in rows:
        click.echo(row.line())
    if not rows:
        click.echo("nothing is set aside")
    sys.exit(1 if rows else 0)


@set_aside.command("retry")
@CONFIG
@UPLOADS_FLAG
def aside_retry(config_path: str, uploads_side: bool) -> None:
    """Apply the set-aside changes again now (after fixing their cause).
    Exit 1 when some are still refused.

    Example:

        replicator set-aside retry -c branch.yaml
        replicator set-aside retry -c branch.yaml --uploads
    """
    from .daemon import Session
    cfg = config_mod.load_branch(config_path)
    if uploads_side:
        from .uploads import UploadSession
        session = UploadSession(cfg, app="replicator set-aside")
    else:
        session = Session(cfg, app="replicator set-aside")
    try:
        session.open()
        left = sum(len(k) for k in session.applier.waiting.values())
    finally:
        session.close()
    click.echo(f"{left} change{'s' * (left != 1)} still set aside" if left else "nothing is set aside")
    sys.exit(1 if left else 0)


@set_aside.command("discard")
@CONFIG
@UPLOADS_FLAG
@click.argument("table")
@click.argument("key")
def aside_discard(config_path: str, uploads_side: bool, table: str, key: str) -> None:
    """Give up one set-aside change on purpose: it is recorded (who, when, what) in
    replication.discarded and never applied. `verify --repair` then makes the row
    HQ's again. With --uploads, a change that stands with its source transaction (a
    sale's line) takes the whole transaction with it: HQ never holds half a sale.

    Example:

        replicator set-aside discard -c branch.yaml public.items 42
        replicator set-aside discard -c branch.yaml --uploads public.sales '["11", "2"]'
    """
    from . import aside as aside_mod
    from . import state
    from .config import qualify
    cfg = config_mod.load_branch(config_path)
    try:
        table = qualify(table)
    except ValueError as e:
        raise ConfigError(str(e), None, None, "TABLE", table) from None
    conn, stream = _aside_side(cfg, uploads_side, "replicator set-aside")
    with conn:
        with conn.transaction():
            state.load_position(conn, stream, lock=True)          # not while run applies
            gone = aside_mod.discard(conn, stream, table, key) if aside_mod.has_table(conn) else 0
    flag = " --uploads" if uploads_side else ""
    if not gone:
        raise ConfigError(f"nothing of {table} key {key} is set aside (see `replicator set-aside list{flag}`)")
    more = f" and the {gone - 1} other change{'s' * (gone != 2)} of its source transaction" if gone > 1 else ""
    click.echo(f"discarded {table} key {key}{more} (recorded in replication.discarded"
               f"{' at HQ' if uploads_side else ''})")


# `replicator aside`, this group's name before DESIGN's `set-aside` was followed: kept, unlisted
cli.add_command(click.Group("aside", commands=set_aside.commands, hidden=True,
                            help="Old name of `replicator set-aside`."))


@cli.command()
@CONFIG
@click.argument("catalogs", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text.")
@click.option("--repair", is_flag=True, help="Re-copy the differing rows from HQ (one branch transaction), "
              "then verify again.")
@click.option("--wait", type=click.FloatRange(min=0), default=60, show_default=True, metavar="SECONDS",
              help="How long to wait for a running replicator to apply changes in flight.")
def verify(config_path: str, catalogs: tuple[str, ...], as_json: bool, repair: bool, wait: float) -> None:
    """Prove the branch holds exactly HQ's rows (filtered, without excluded columns)
    and HQ holds exactly the branch's sales (its slice; other branches' rows are
    not its business).

    Compares every initialized table of the selected (or named) catalogs, and
    of the uploads unless catalogs are named, by hashing primary-key buckets
    inside each database, narrows differing buckets down to keys, and
    re-checks those after the stream caught up, so changes in flight are not
    reported. Safe while `replicator run` and HQ keep working. `--repair`
    re-copies catalog rows from HQ and re-sends sales into the slice. Exit 0
    when equal, 1 when rows differ.

    Example:

        replicator verify -c branch.yaml
        replicator verify -c branch.yaml items stock --json
        replicator verify -c branch.yaml --repair
    """
    from .verify import format_report
    cfg = config_mod.load_branch(config_path)
    report = _verify_both(cfg, catalogs, wait)
    fixed = None
    if repair and not report.equal:
        fixed = _repair_both(cfg, report)
        if not as_json:
            for line in format_report(report):
                click.echo(line)
            for table, n in fixed.repaired.items():
                click.echo(f"repaired {table}: {n} rows re-copied from HQ")
            for table, n in fixed.sent.items():
                click.echo(f"repaired {table}: {n} rows re-sent to the branch's slice at HQ")
            for table, n in fixed.left_to_stream.items():
                click.echo(f"left {n} rows of {table} to the stream (HQ changes not yet applied)")
            click.echo("verifying again")
        report = _verify_both(cfg, catalogs, wait)
    if as_json:
        doc = report.to_json()
        if fixed is not None:
            doc["repair"] = {"repaired": fixed.repaired, "sent": fixed.sent, "left_to_stream": fixed.left_to_stream,
                             "snapshot": fixed.snapshot}
        click.echo(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        for line in format_report(report):
            click.echo(line)
    sys.exit(0 if report.equal else 1)


def _verify_both(cfg, catalogs: tuple[str, ...], wait: float):
    """The catalogs, then (unless catalogs are named) the sales uploads, in one report."""
    from .verify import verify as verify_catalogs, verify_uploads
    report = verify_catalogs(cfg, list(catalogs), wait)
    if not catalogs:
        try:
            up = verify_uploads(cfg, wait)
        except NotInitialized as e:
            click.echo(f"sales not compared: {e}", err=True)
            up = None
        if up is not None:
            report.tables += up.tables
            report.caught_up = report.caught_up and up.caught_up
            report.seconds += up.seconds
    return report


def _repair_both(cfg, report):
    """Catalog rows re-copied from HQ, upload rows re-sent into the branch's slice."""
    from dataclasses import replace
    from .verify import repair, repair_uploads
    down = replace(report, tables=[t for t in report.tables if t.direction == "catalogs"])
    up = replace(report, tables=[t for t in report.tables if t.direction == "uploads"])
    fixed = repair(cfg, down)
    sent = repair_uploads(cfg, up) if up.tables and not up.equal else None
    if sent is not None:
        fixed.left_to_stream.update(sent.left_to_stream)
        fixed.sent = sent.repaired
    return fixed


@cli.command()
@click.option("--duration", type=click.FloatRange(min=0), default=60, show_default=True, metavar="SECONDS",
              help="How long HQ keeps changing catalogs while the branches replicate.")
@click.option("--keep", is_flag=True, help="Leave the clusters running at the end and print how to connect.")
@click.option("--size", type=click.Choice(["tiny", "small", "demo"]), default="demo", show_default=True,
              help="Size of the sample chain on HQ (demo: 50,000 items, 10 stores).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=50, show_default=True,
              metavar="PER_SECOND", help="HQ transactions (price changes, stock moves, ...) per second.")
def demo(duration: float, keep: bool, size: str, rate: float) -> None:
    """Try it all on this machine: HQ, two branches, live changes, verification.

    Starts throwaway PostgreSQL clusters (HQ and two branches), loads the
    sample point-of-sale chain, installs capture, initializes store-001
    with customers and store-002 without, runs a replicator for each while
    HQ keeps changing prices, stock, customers and items, then checks that
    both branches hold exactly HQ's rows. Everything is removed at the end
    (also on Ctrl-C) unless --keep. Exit 0 when both branches match HQ.

    Example:

        replicator demo
        replicator demo --duration 10 --size tiny --keep
    """
    from .demo import run_demo
    sys.exit(run_demo(duration, keep, size, rate))


@cli.command()
@CONFIG
@click.argument("catalogs", nargs=-1, required=True)
def release(config_path: str, catalogs: tuple[str, ...]) -> None:
    """Make deselected catalogs' tables writable on this branch again.

    Replicated catalog tables are read-only for local users. To take a
    catalog back: remove it from `catalogs:` in branch.yaml, then release
    it (a running `replicator run` picks up the new selection). This drops
    its guard triggers and forgets its initialization, so selecting it
    again later starts with a fresh `replicator init`. Refused (exit 2)
    while the catalog is still selected. The tables keep their rows.

    Example:

        replicator release -c branch.yaml kits
    """
    from .guard import release as release_catalogs
    cfg = config_mod.load_branch(config_path)
    for rel in release_catalogs(cfg, list(catalogs)):
        click.echo(f"released {rel.catalog}: {', '.join(rel.tables)} (writable here; no longer updated from HQ)")


def main() -> None:
    """Entry point: user errors are one line and an exit code, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, KeyboardInterrupt):   # click turns Ctrl-C into Abort
            click.echo("interrupted", err=True)
            sys.exit(130)
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ReplicatorError as e:
        click.echo(f"error: {redact(str(e))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except psycopg.OperationalError as e:
        from .db import explain
        click.echo(f"error: database connection failed: {redact(explain(e))}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
