"""Progress for long work: a live line per table on a terminal, plain
periodic log lines otherwise (daemons, CI, pipes)."""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)


class _Progress:
    def __init__(self, tty: bool):
        self.tty = tty
        self.started: dict[str, float] = {}
        self.last_line = 0.0

    def __call__(self, event: str, table: str, rows: int, nbytes: int) -> None:
        now = time.monotonic()
        if event == "start":
            self.started[table] = now
            return
        secs = max(now - self.started.get(table, now), 1e-6)
        if event == "bytes":
            line = f"  {table}: {nbytes / 1e6:8.1f} MB  {nbytes / 1e6 / secs:6.1f} MB/s"
            if self.tty:
                sys.stderr.write("\r" + line)
                sys.stderr.flush()
            elif now - self.last_line >= 10:
                self.last_line = now
                log.info("copying %s: %.1f MB so far", table, nbytes / 1e6)
            return
        line = f"  {table}: {rows} rows, {nbytes / 1e6:.1f} MB in {secs:.1f} s ({rows / secs:,.0f} rows/s)"
        if self.tty:
            sys.stderr.write("\r" + line + "\n")
            sys.stderr.flush()
        else:
            log.info("copied %s: %d rows, %.1f MB in %.1f s", table, rows, nbytes / 1e6, secs)


@contextmanager
def reporter():
    yield _Progress(sys.stderr.isatty())
