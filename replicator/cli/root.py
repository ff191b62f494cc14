"""The root of the command line: the `replicator` group, logging, help text, and
`main`, which turns a ReplicatorError into one line on stderr and its exit code
(2 for configuration, 1 otherwise); nothing else is caught, so a bug keeps its
traceback."""
from __future__ import annotations

import inspect
import json
import logging
import sys

import click
import psycopg

from ..errors import ReplicatorError, redact

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


class Command(_KeepExamples, click.Command):
    pass


class Group(_KeepExamples, click.Group):
    command_class = Command    # every @group.command()
    group_class = type          # sub-groups are Group too


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
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
        from ..db import explain
        click.echo(f"error: database connection failed: {redact(explain(e))}", err=True)
        sys.exit(1)
    sys.exit(0)
