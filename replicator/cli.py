"""The command line: a thin shell over the library.

Each command parses options, calls one library function and prints the
result.  A ReplicatorError becomes one line on stderr and its exit code
(2 for configuration, 1 otherwise); nothing else is caught, so a bug keeps
its traceback.
"""
from __future__ import annotations

import json
import logging
import sys

import click
import psycopg

from . import config as config_mod
from .errors import ConfigError, ReplicatorError

log = logging.getLogger("replicator")

CONFIG = click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
                      help="Path to the YAML configuration file.")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": self.formatTime(record), "level": record.levelname,
                           "logger": record.name, "msg": record.getMessage()}, ensure_ascii=False)


def _setup_logging(verbose: int, quiet: bool, log_json: bool, daemon: bool) -> None:
    """Daemons log a line per batch by default; one-shot commands print results and log only problems."""
    levels = [logging.INFO, logging.DEBUG] if daemon else [logging.WARNING, logging.INFO, logging.DEBUG]
    level = logging.WARNING if quiet else levels[min(verbose, len(levels) - 1)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("psycopg").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


@hq.command("install")
@CONFIG
def hq_install(config_path: str) -> None:
    """Install or upgrade capture on HQ (idempotent).

    Applies pending migrations from sql/hq, registers the catalogs of
    hq.yaml and attaches capture triggers to their tables. Running it again
    changes nothing; a table added to a catalog gets its trigger.

    Example:

        replicator hq install -c hq.yaml
    """
    from .capture import install
    cfg = config_mod.load_hq(config_path)
    with _hq_conn(cfg) as conn:
        report = install(conn, cfg)
    for m in report.migrations:
        click.echo(f"applied migration {m}")
    for t in report.attached:
        click.echo(f"capture attached: {t}")
    for t in report.retired:
        click.echo(f"capture removed: {t}")
    if not report.changed:
        click.echo(f"capture is up to date ({len(report.unchanged)} tables); nothing changed")


@hq.command("sql")
@CONFIG
def hq_sql(config_path: str) -> None:
    """Print the install DDL for your own migration tool (no connection needed).

    Example:

        replicator hq sql -c hq.yaml > V42__replicator.sql
    """
    from .capture import sql_script
    click.echo(sql_script(config_mod.load_hq(config_path)), nl=False)


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
def hq_add_branch(config_path: str, branch: str, params: tuple[str, ...], password_env: str | None) -> None:
    """Register BRANCH on HQ with its parameters and a least-privilege login role.

    Prints a ready branch.yaml on stdout. HQ, not the branch, decides which
    rows the branch receives: row filters are filled with these parameters.

    Example:

        replicator hq add-branch -c hq.yaml store-042 --param store_id=42 > branch.yaml
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
        reg = add_branch(conn, cfg, branch, _parse_params(params), password)
    if reg.password:
        click.echo(f"password for role {reg.role} (shown once; put it in the branch's ~/.pgpass): "
                   f"{reg.password}", err=True)
    click.echo(reg.branch_yaml, nl=False)


@hq.command("status")
@CONFIG
def hq_status(config_path: str) -> None:
    """Show every branch: last report, pending changes and lag.

    Example:

        replicator hq status -c hq.yaml
    """
    from .hq import status
    cfg = config_mod.load_hq(config_path)
    with _hq_conn(cfg) as conn:
        rows = status(conn)
    if not rows:
        click.echo("no branches registered; use `replicator hq add-branch`")
        return
    click.echo(f"{'branch':<20} {'last report':<20} {'pending':>8}  lag")
    for b in rows:
        seen = f"{b.acked_at:%Y-%m-%d %H:%M:%S}" if b.acked_at else "never"
        pending = "-" if b.pending is None else str(b.pending)
        lag = "-" if b.lag is None else f"{b.lag.total_seconds():.1f} s"
        flag = "" if b.active else " (inactive)"
        click.echo(f"{b.name:<20} {seen:<20} {pending:>8}  {lag}{flag}")


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
    from .initialize import initialize
    from .progress import reporter
    cfg = config_mod.load_branch(config_path)
    with reporter() as progress:
        rep = initialize(cfg, list(catalogs), include_customers, force, create_missing, progress)
    for name, since in rep.skipped.items():
        click.echo(f"skipped {name}: already initialized since {since:%Y-%m-%d %H:%M} (--force copies again)")
    mb = rep.bytes / 1e6
    click.echo(f"initialized {', '.join(rep.catalogs) or 'nothing'}: {len(rep.copies)} tables, "
               f"{rep.rows} rows, {mb:.1f} MB in {rep.seconds:.1f} s")


@cli.command()
@CONFIG
@click.option("--once", is_flag=True, help="Catch up to HQ's state at start, then exit 0.")
def run(config_path: str, once: bool) -> None:
    """Replicate HQ changes to this branch until stopped (SIGTERM/Ctrl-C finish cleanly).

    Example:

        replicator run -c branch.yaml
        replicator run -c branch.yaml --once     # catch up and exit
    """
    from .daemon import run as run_loop
    cfg = config_mod.load_branch(config_path)
    run_loop(cfg, once=once)


@cli.command()
@CONFIG
def status(config_path: str) -> None:
    """Per catalog: up to date, behind by N changes, or not initialized.

    Exit 0 when every selected catalog is up to date, 1 otherwise.

    Example:

        replicator status -c branch.yaml
    """
    from .status import branch_status
    cfg = config_mod.load_branch(config_path)
    st = branch_status(cfg)
    for c in st.catalogs:
        click.echo(f"{c.name:<16} {c.label:<16} {c.state}")
    if st.up_to_date:
        click.echo("catalogs are up to date")
    sys.exit(0 if st.up_to_date else 1)


def main() -> None:
    """Entry point: user errors are one line and an exit code, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ReplicatorError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except psycopg.OperationalError as e:
        from .db import explain
        click.echo(f"error: database connection failed: {explain(e)}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
