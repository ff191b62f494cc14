"""Progress bars for `replicator init` on a terminal (progress.reporter picks them).

Kept apart from progress.py so that rich is imported only when bars are drawn.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from .table_progress import TableProgress


@contextmanager
def bar_reporter(console: Console | None = None) -> Iterator["BarProgress"]:
    console = console or Console(stderr=True)
    bars = Progress(TextColumn("{task.description:<28}"), BarColumn(), _RowsColumn(), _RateColumn(),
                    TimeRemainingColumn(), console=console)
    with bars, _logs_above(console):
        yield BarProgress(bars)


class BarProgress:
    """A terminal: one rich progress bar per table (rows, rows/s, ETA), kept when done."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.tables: dict[str, tuple[TableProgress, object]] = {}

    def __call__(self, event: str, table: str, rows: int, nbytes: int) -> None:
        if event == "start":
            task = self.bars.add_task(table, total=rows or None, mb=0.0)
            self.tables[table] = (TableProgress(table, rows, nbytes), task)
            return
        if table not in self.tables:
            self("start", table, 0, 0)
        t, task = self.tables[table]
        t.bytes = nbytes
        if event == "bytes":
            self.bars.update(task, completed=t.rows, total=t.total_rows or None, mb=nbytes / 1e6)
        elif event == "done":
            self.bars.update(task, completed=rows, total=rows, mb=nbytes / 1e6)
            self.bars.stop_task(task)


class _RowsColumn(ProgressColumn):
    """'~1,234/50,000 rows' while copying (estimated), '50,000 rows' when done (exact)."""

    def render(self, task: Task) -> Text:
        done = int(task.completed)
        if task.finished:
            return Text(f"{done:,} rows  {task.fields['mb']:.1f} MB")
        if task.total:
            return Text(f"~{done:,}/{int(task.total):,} rows  {task.fields['mb']:.1f} MB")
        return Text(f"{task.fields['mb']:.1f} MB")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        if task.finished and task.finished_time:
            speed = task.completed / max(task.finished_time, 1e-6)
        else:
            speed = task.speed
        return Text(f"{speed:,.0f} rows/s" if speed else "", style="progress.data.speed")


@contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """Send log lines written to stderr through rich, so they print above the bars
    instead of tearing them (rich redirects sys.stderr, not handlers that hold it)."""
    moved = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, console.file):
            moved.append((handler, handler.setStream(sys.stderr)))
    try:
        yield
    finally:
        for handler, stream in moved:
            handler.setStream(stream)


