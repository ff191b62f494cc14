"""`replicator hq ...`: the commands an HQ admin runs (install, branches, status, pruning)."""
from __future__ import annotations

import json

import click

from .. import config as config_mod
from ..errors import ConfigError
from .root import CONFIG, Group


@click.group(cls=Group)
def hq() -> None:
    """Administer capture on HQ: install, branches, status, pruning.

    Example:

        replicator hq install -c hq.yaml
    """


def _hq_conn(cfg):
    from .. import db
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
    from ..capture import install
    from ..uploads import check_targets, install_targets
    cfg = config_mod.load_hq(config_path)
    with _hq_conn(cfg) as conn:
        check_targets(conn, cfg)
        report = install(conn, cfg, detach)
        targets = install_targets(conn, cfg)
    for m in report.migrations:
        click.echo(f"applied migration {m}" if m[:1].isdigit() else f"re-created {m}")
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
    from ..capture import sql_script
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
    from ..hq import add_branch
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
    from ..hq import folio_gaps, status
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
    from ..hq import serve_fleet_metrics
    from ..metrics import parse_listen
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
    from ..hq import deactivate
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
    from ..hq import prune
    cfg = config_mod.load_hq(config_path)
    with _hq_conn(cfg) as conn:
        rep = prune(conn, cfg)
    click.echo(f"pruned {rep.deleted} log rows (kept everything from xid {rep.horizon})")
    if rep.kept_for:
        click.echo(f"oldest position held by: {', '.join(rep.kept_for)}")
