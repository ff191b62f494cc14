"""Progress of long copies (`replicator init`, the demo): a bar per table on a
terminal, plain periodic log lines otherwise (daemons, CI, pipes).

The copy reports through a callback ``progress(event, table, rows, bytes)``
(see ``initialize.Progress``):

* ``start``: the table begins; rows and bytes are HQ's planner estimates
  (statistics only, no scan), 0 when HQ has none;
* ``bytes``: periodically, the bytes copied so far (rows are not counted
  mid-copy: binary COPY is not parsed, so the copy runs at full speed);
* ``done``: the exact rows and bytes.

Rows in flight are estimated as ``bytes copied / estimated bytes per row``,
which is what rows/s and the ETA are computed from; the final line is exact.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from .table_progress import TableProgress

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)

LOG_EVERY = 10.0      # seconds between plain progress lines for one table


class LogProgress:
    """Not a terminal: a log line per table every LOG_EVERY seconds and one when it is done."""

    def __init__(self) -> None:
        self.tables: dict[str, TableProgress] = {}

    def __call__(self, event: str, table: str, rows: int, nbytes: int) -> None:
        if event == "start":
            self.tables[table] = TableProgress(table, rows, nbytes)
            return
        t = self.tables.setdefault(table, TableProgress(table))
        t.bytes = nbytes
        if event == "bytes":
            if time.monotonic() - t.last_line >= LOG_EVERY:
                t.last_line = time.monotonic()
                self._line(t)
        elif event == "done":
            log.info("copied %s: %s rows, %.1f MB in %.2f s (%s rows/s)", table, f"{rows:,}",
                     nbytes / 1e6, t.seconds, f"{rows / t.seconds:,.0f}")

    @staticmethod
    def _line(t: TableProgress) -> None:
        eta = t.eta()
        if t.est_rows:
            log.info("copying %s: ~%s of ~%s rows (%.0f%%), ~%s rows/s, %.1f MB, ETA %s", t.table,
                     f"{t.rows:,}", f"{t.total_rows:,}", 100 * t.rows / t.total_rows,
                     f"{t.rows / t.seconds:,.0f}", t.bytes / 1e6, _duration(eta))
        else:
            log.info("copying %s: %.1f MB so far (%.1f MB/s)", t.table, t.bytes / 1e6, t.bytes / 1e6 / t.seconds)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


@contextmanager
def reporter(tty: bool | None = None, console: Console | None = None) -> Iterator:
    """Yield a progress callback for `initialize`: bars on a terminal, log lines otherwise.

    rich is imported only for bars: a non-interactive init (cron, CI, the benchmark)
    starts faster without it."""
    if tty is None:
        tty = console.is_terminal if console is not None else sys.stderr.isatty()
    if not tty:
        yield LogProgress()
        return
    from .bars import bar_reporter
    with bar_reporter(console) as progress:
        yield progress
