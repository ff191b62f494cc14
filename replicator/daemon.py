"""`replicator run`: the loop that keeps one branch in step with HQ.

    wait (NOTIFY or poll) -> snapshot -> read window -> apply chunk + position
                                                       (one branch transaction)
                          -> ack position to HQ

The position row is locked and rewritten in every apply transaction, so
`init` and `verify --repair` serialize with us, and a SIGKILL at any instant
leaves either the whole chunk with its position or neither.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import closing
import time
from datetime import datetime, timezone

import psycopg

from . import db, state
from .apply import Applier
from .config import BranchConfig
from .errors import LockHeld, NotInitialized, PositionLost, ReplicatorError
from .reader import LogReader, covers, current_snapshot
from .schema import bind_target, branch_params, offered_catalogs, select_catalogs, source_tables

log = logging.getLogger(__name__)

LOCK_KEY = 0x7265706C  # 'repl': pg_advisory_lock(LOCK_KEY, 1) marks a running replicator
CHANNEL = "replicator"


class _Reload(Exception):
    """Table states changed under us (init ran): reload and re-read the window."""


class Session:
    """Connections, lock, table set, reader and applier for one branch."""

    def __init__(self, cfg: BranchConfig, app: str = "replicator run"):
        self.cfg = cfg
        self.app = f"{app} {cfg.branch} pid {os.getpid()}"
        self.hq = self.branch = self.listener = None
        self.tables = []
        self.config_version = 0

    # ---------------------------------------------------------- connect
    def open(self, listen: bool = True) -> None:
        self.hq = db.connect(self.cfg.source_dsn, "HQ", autocommit=True, application=self.app)
        self.branch = db.connect(self.cfg.target_dsn, "branch", autocommit=True, application=self.app)
        self._lock()
        db.require_version(self.hq, "hq", "HQ")
        if listen:
            self.listener = db.connect(self.cfg.source_dsn, "HQ", autocommit=True, application=self.app)
            self.listener.execute(f"LISTEN {CHANNEL}")
        self.load()

    def close(self) -> None:
        for conn in (self.listener, self.hq, self.branch):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # closing a broken connection must not mask the real error
                    pass
        self.hq = self.branch = self.listener = None

    def _lock(self) -> None:
        got = self.branch.execute("SELECT pg_try_advisory_lock(%s, 1)", (LOCK_KEY,)).fetchone()[0]
        if got:
            return
        holder = self.branch.execute(
            """SELECT a.pid, a.application_name, coalesce(a.client_addr::text, 'local'), a.backend_start
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = 1 AND l.granted
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
            (LOCK_KEY,)).fetchone()
        who = (f"'{holder[1]}' (backend pid {holder[0]}, from {holder[2]}, since "
               f"{holder[3]:%Y-%m-%d %H:%M:%S})") if holder else "another process"
        raise LockHeld(f"another replicator is already working on this branch database: {who}; "
                       "stop it first (one `replicator run` per branch)")

    # ------------------------------------------------------------- load
    def load(self) -> None:
        """Resolve the selection against HQ and bind it to the branch tables."""
        pos = state.load_position(self.branch)
        if pos is None:
            raise NotInitialized(f"branch {self.cfg.branch} has no position yet; run `replicator init -c "
                                 f"{self.cfg.path}` first")
        offered = offered_catalogs(self.hq)
        names = select_catalogs(self.cfg, offered)
        params = branch_params(self.hq, self.cfg.branch)
        tables = source_tables(self.hq, names)
        bind_target(self.branch, tables)
        states = state.table_states(self.branch)
        skip = {}
        for t in tables:
            st = states.get(t.qualified)
            if st is None or st.initialized_at is None:
                log.warning("catalog %s (%s) was never initialized: only changes from now on are "
                            "replicated; run `replicator init %s` for a full copy", t.catalog, t.qualified, t.catalog)
            elif st.copy_snapshot and not covers(self.hq, pos.snapshot, st.copy_snapshot):
                skip[t.id] = st.copy_snapshot
        self.tables = tables
        self.reader = LogReader(tables, params, skip, self.cfg.batch_rows)
        self.applier = Applier(self.branch, tables)
        self.applier.prepare_session()
        self.config_version = pos.config_version
        log.info("branch %s: replicating %d tables of catalogs %s", self.cfg.branch, len(tables), ", ".join(names))

    # ------------------------------------------------------------- work
    def check_horizon(self, pos: state.Position) -> None:
        row = self.hq.execute(
            "SELECT pruned_below > pg_snapshot_xmin(%s::pg_snapshot), pruned_below::text FROM replication.horizon",
            (pos.snapshot,)).fetchone()
        if row and row[0]:
            raise PositionLost(self.cfg.branch, pos.snapshot, row[1])

    def step(self, target: str | None = None) -> int:
        """Apply one window (up to `target`, or to HQ's current snapshot). Returns changes applied."""
        pos = state.load_position(self.branch)
        if pos.config_version != self.config_version:
            self.load()
        if pos.window_snapshot:
            cur, after = pos.window_snapshot, pos.window_last_id
        else:
            cur, after = target or current_snapshot(self.hq), 0
            if cur == pos.snapshot:
                return 0
        self.check_horizon(pos)
        applied, finished, newest = 0, False, None
        with closing(self.reader.window(self.hq, pos.snapshot, cur, after)) as chunks:
            for rows in chunks:
                finished = len(rows) < self.cfg.batch_rows
                applied += self._apply(pos, cur, rows, done=finished)
                newest = rows[-1][5]
        if not finished:
            self._apply(pos, cur, [], done=True)
        self._ack(cur, newest)
        return applied

    def _apply(self, pos: state.Position, cur: str, rows: list[tuple], done: bool) -> int:
        start = time.monotonic()
        with self.branch.transaction():
            locked = state.load_position(self.branch, lock=True)
            if locked.config_version != self.config_version or locked.snapshot != pos.snapshot:
                raise _Reload()
            stats = self.applier.apply(rows) if rows else None
            last_id = rows[-1][0] if rows else locked.window_last_id
            newest = max((r[5] for r in rows), default=None)
            new = state.Position(snapshot=cur if done else pos.snapshot,
                                 window_snapshot=None if done else cur,
                                 window_last_id=0 if done else last_id,
                                 config_version=self.config_version, applied_until=newest)
            state.save_position(self.branch, new, applied=len(rows))
        if stats:
            lag = (datetime.now(timezone.utc) - newest).total_seconds() if newest else 0.0
            log.info("applied %d changes to %s through log id %d in %.0f ms; lag %.1f s",
                     stats.rows, ", ".join(sorted(stats.tables)), last_id,
                     (time.monotonic() - start) * 1000, lag)
        if done:
            pos.snapshot = cur
        return len(rows)

    def _ack(self, position: str, applied_until) -> None:
        """Report the position to HQ; failing to do so never blocks applying."""
        try:
            self.hq.execute("SELECT replication.ack(%s, %s::pg_snapshot, %s)",
                            (self.cfg.branch, position, applied_until))
        except psycopg.errors.InsufficientPrivilege as e:
            log.warning("HQ refused the position report: %s", e.diag.message_primary)

    def wait(self, seconds: float, stop: threading.Event) -> None:
        """Sleep until HQ notifies a change, `seconds` pass, or we are asked to stop."""
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.listener is None:
                stop.wait(min(left, 0.5))
                continue
            got = False
            for _ in self.listener.notifies(timeout=min(left, 0.5), stop_after=1):
                got = True
            if got:
                # drain the burst: one window covers every change notified so far
                for _ in self.listener.notifies(timeout=0.001):
                    pass
                return


def run(cfg: BranchConfig, once: bool = False, stop: threading.Event | None = None) -> int:
    """Keep the branch in step until stopped; with once=True catch up and return."""
    stop = stop or threading.Event()
    _install_signal_handlers(stop)
    session = Session(cfg)
    session.open(listen=not once)
    target = current_snapshot(session.hq) if once else None
    outage_since = None
    try:
        while not stop.is_set():
            try:
                if session.hq is None:
                    session.open(listen=not once)
                    log.info("reconnected after %.1f s", time.monotonic() - outage_since)
                    outage_since = None
                if once and _caught_up(session, target):
                    return 0
                applied = session.step(target)
                if not once and applied == 0:
                    session.wait(cfg.poll_interval, stop)
            except _Reload:
                log.info("table states changed on the branch (init); reloading")
                session.load()
            except (psycopg.OperationalError, psycopg.InterfaceError, ReplicatorError) as e:
                if isinstance(e, ReplicatorError) and not _is_connection_error(e):
                    raise
                outage_since = _outage(session, e, outage_since, stop)
        return 0
    finally:
        session.close()


def _caught_up(session: Session, target: str) -> bool:
    pos = state.load_position(session.branch)
    return pos.window_snapshot is None and covers(session.hq, pos.snapshot, target)


def _is_connection_error(e: ReplicatorError) -> bool:
    from .errors import ConnectionFailed
    return isinstance(e, ConnectionFailed) and "password" not in e.reason and "does not exist" not in e.reason


def _outage(session: Session, e: Exception, since: float | None, stop: threading.Event) -> float:
    """Log one line per outage (not per retry), close everything, back off."""
    now = time.monotonic()
    if since is None:
        side = "branch" if session.branch is not None and (session.branch.broken or session.branch.closed) \
            else "HQ"
        log.warning("lost connection to %s (%s); reconnecting with backoff", side, db.explain(e))
        since = now
    else:
        log.debug("still no connection: %s", db.explain(e))
    session.close()
    delay = min(30.0, 0.5 * 2 ** min(int((now - since) / 5), 6))
    stop.wait(delay)
    return since


def _install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT finish the current transaction, then exit 0."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, _frame):
        log.info("received %s; finishing the current transaction", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
