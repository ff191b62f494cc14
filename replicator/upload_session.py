"""The upload stream in `run` (runner.py steps it): the catalog session's machinery with
the ends swapped, the branch as source and HQ as target."""
from __future__ import annotations

import logging
import time

import psycopg

from . import db, locks, state
from .apply import Applier
from .config import BranchConfig
from .session import Session
from .errors import LockHeld, NotInitialized
from .reader import LogReader, covers
from .uploads import (PRUNE_INTERVAL, REPORT_INTERVAL, Upload, install_capture, offered, pending, prune_branch_log,
                      select, stream, tables_for)

log = logging.getLogger(__name__)


class UploadSession(Session):
    """The upload stream in `run`: the catalog loop's machinery with the ends swapped.  The
    run lock is on the branch (the source here): nothing session-bound on HQ."""

    def __init__(self, cfg: BranchConfig, app: str = "replicator run", registry=None):
        super().__init__(cfg, app, stream(cfg), registry)
        self.ups: list[Upload] = []
        self.last_prune = 0.0
        self.last_report = 0.0

    def open(self) -> None:
        self.ends.__enter__()
        self.source, self.primary, self.target = self.ends.source, self.ends.primary, self.ends.target
        self.target.execute("SET jit = off")
        self._lock()
        db.require_version(self.target, "target", "HQ")
        self.load()

    def _lock(self) -> None:
        if not locks.try_run(self.source, self.stream.name):
            holder = locks.run_holder(self.source, self.stream.name)
            raise LockHeld(f"another replicator is already uploading this branch's sales"
                           f"{f' (backend pid {holder[0]}, {holder[1]!r})' if holder else ''}; stop it first "
                           "(one `replicator run` per branch)")

    def load(self) -> None:
        pos = state.load_position(self.target, self.stream.name)
        ups = offered(self.target)
        names = select(self.cfg, ups)
        if pos is None:
            raise NotInitialized(f"uploads {', '.join(names)} of branch {self.cfg.branch} are not initialized; run "
                                 f"`replicator init -c {self.cfg.path}` first")
        self.ups = [ups[n] for n in names]
        install_capture(self.source, self.ups)           # a newer release brings its capture up to date
        tables = tables_for(self.source, self.target, self.ups)
        states = state.table_states(self.target, self.stream.name)
        skip = {}
        for t in tables:
            st = states.get(t.qualified)
            if st is None:
                log.warning("upload %s (%s) was never initialized: only sales from now on go up; run "
                            "`replicator init` to send its history", t.catalog, t.qualified)
            elif st.copy_snapshot and not covers(self.source, pos.snapshot, st.copy_snapshot):
                skip[t.id] = st.copy_snapshot
        self.tables = tables
        self.shape = self._shape()
        self.reader = LogReader(tables, {}, skip, self.cfg.batch_rows, whole_transactions=True)
        self.applier = Applier(self.target, self.stream.name, tables, slice_of=self.cfg.branch)
        self.applier.prepare_session()
        self.applier.load_waiting()
        self.config_version = pos.config_version
        log.info("branch %s: uploading %d tables of %s", self.cfg.branch, len(tables), ", ".join(names))
        self.retry_waiting()

    def _report_window(self, cur: str, newest, applied: int, once: bool) -> None:
        """HQ hears of every window that took sales up (hq status counts what is pending)."""
        self._ack(cur, newest, force=applied > 0 or once)

    def _ack(self, position: str, applied_until, force: bool = False) -> None:
        """What HQ holds of the branch's log can go (the branch keeps no retention of its
        own: HQ is the record), and HQ hears how much is still to come."""
        now = time.monotonic()
        if now - self.last_prune >= PRUNE_INTERVAL:
            self.last_prune = now
            prune_branch_log(self.source, position)
        if force or now - self.last_report >= REPORT_INTERVAL:
            self.last_report = now
            try:
                self.target.execute("SELECT replication.report_uploads(%s, %s)",
                                    (self.cfg.branch, pending(self.source, position, [t.id for t in self.tables])))
            except psycopg.errors.InsufficientPrivilege as e:
                self.metrics.error("position_report")
                log.warning("HQ refused the upload report: %s", e.diag.message_primary)
