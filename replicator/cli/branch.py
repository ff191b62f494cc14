"""The commands a branch runs: check, init, run, status, verify, sql, purge, set-aside, release."""
from __future__ import annotations

import json
import sys

import click

from .. import config as config_mod
from ..errors import ConfigError, NotInitialized
from .root import CONFIG, Command, Group


@click.command(cls=Command)
@CONFIG
def check(config_path: str) -> None:
    """Check connections and readiness; says "connection OK".

    Exit 0 when the branch is ready to sync, 1 otherwise, one problem per line.

    Example:

        replicator check -c branch.yaml
    """
    from ..check import run_check
    cfg = config_mod.load_branch(config_path)
    report = run_check(cfg)
    for line in report.lines:
        click.echo(line)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    sys.exit(0 if report.ok else 1)


@click.command(cls=Command)
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
    from ..errors import AlreadyInitialized
    from ..initialize import initialize
    from ..progress import reporter
    from .. import upload_init
    cfg = config_mod.load_branch(config_path)
    rep = None
    try:
        with reporter() as progress:
            rep = initialize(cfg, list(catalogs), include_customers, force, create_missing, progress)
    except AlreadyInitialized:
        if catalogs:
            raise
        sent = upload_init.initialize(cfg, force)    # the uploads may still need their first sync
        if not sent:
            raise
        click.echo(f"uploaded the branch's history of {', '.join(sent)} to HQ (its slice)")
        return
    if not catalogs:
        sent = upload_init.initialize(cfg, force)
        if sent:
            click.echo(f"uploaded the branch's history of {', '.join(sent)} to HQ (its slice)")
    for name, since in rep.skipped.items():
        click.echo(f"skipped {name}: already initialized since {since:%Y-%m-%d %H:%M} (--force copies again)")
    mb = rep.bytes / 1e6
    click.echo(f"initialized {', '.join(rep.catalogs) or 'nothing'}: {len(rep.copies)} tables, "
               f"{rep.rows} rows, {mb:.1f} MB in {rep.seconds:.1f} s")


@click.command(cls=Command)
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
    from ..runner import run as run_loop
    from ..metrics import parse_listen
    if metrics_listen:
        parse_listen(metrics_listen)              # a bad address is a usage error before anything
    cfg = config_mod.load_branch(config_path)
    run_loop(cfg, once=once, metrics_listen=metrics_listen)


@click.command(cls=Command)
@CONFIG
def status(config_path: str) -> None:
    """Per catalog: up to date, behind by N changes, or not initialized; then
    every change set aside (refused by this branch: table, key, reason, since).

    Exit 0 when every selected catalog is up to date and nothing is set aside,
    1 otherwise.

    Example:

        replicator status -c branch.yaml
    """
    from ..status import branch_status
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
    from ..uploads import status as upload_status
    up = upload_status(cfg)
    if up is not None:
        click.echo(up.line())
    sys.exit(0 if st.up_to_date and (up is None or (up.initialized and not up.set_aside)) else 1)


@click.command("sql", cls=Command)
@CONFIG
def branch_sql(config_path: str) -> None:
    """Print the branch side's DDL for your own migration tool: its state tables and
    the capture of the uploads HQ defines for it (asks HQ which tables those are).

    Example:

        replicator sql -c branch.yaml > V7__replicator_branch.sql
    """
    from .. import db
    from ..uploads import print_sql
    cfg = config_mod.load_branch(config_path)
    with db.connect(cfg.source_dsn, "HQ", autocommit=True, application="replicator sql") as hq_conn:
        click.echo(print_sql(hq_conn, cfg), nl=False)


@click.command("purge", cls=Command)
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
    from ..purge import purge
    cfg = config_mod.load_branch(config_path)
    report = purge(cfg, table, where, dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} at branch {cfg.branch}: " + ", ".join(f"{n} rows of {t}" for t, n in report.rows.items())
               + ("" if dry_run else "; HQ keeps them"))


@click.group("set-aside", cls=Group)
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
    from .. import db, state
    from ..stream import CATALOGS
    if uploads_side:
        from ..uploads import stream as upload_stream
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
    from .. import aside as aside_mod
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
    from ..session import Session
    cfg = config_mod.load_branch(config_path)
    if uploads_side:
        from ..upload_session import UploadSession
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
    from .. import aside as aside_mod
    from .. import state
    from ..config import qualify
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


# `replicator aside`, the set-aside group's earlier name: kept, unlisted
old_aside = click.Group("aside", commands=set_aside.commands, hidden=True, help="Old name of `replicator set-aside`.")


@click.command(cls=Command)
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
    from ..verify_report import format_report
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
    from ..verify import verify as verify_catalogs, verify_uploads
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
    from ..verify import repair, repair_uploads
    down = replace(report, tables=[t for t in report.tables if t.direction == "catalogs"])
    up = replace(report, tables=[t for t in report.tables if t.direction == "uploads"])
    fixed = repair(cfg, down)
    sent = repair_uploads(cfg, up) if up.tables and not up.equal else None
    if sent is not None:
        fixed.left_to_stream.update(sent.left_to_stream)
        fixed.sent = sent.repaired
    return fixed


@click.command(cls=Command)
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
    from ..guard import release as release_catalogs
    cfg = config_mod.load_branch(config_path)
    for rel in release_catalogs(cfg, list(catalogs)):
        click.echo(f"released {rel.catalog}: {', '.join(rel.tables)} (writable here; no longer updated from HQ)")
COMMANDS = [check, init, run, status, branch_sql, purge_cmd, set_aside, old_aside, verify, release]
