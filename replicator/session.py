"""One stream's session: each step keeps the target in step with its source (runner.py loops it).

    poll (one indexed probe of HQ's log) -> snapshot -> read window -> apply chunk + position
                                                                   (one branch transaction)
                                            -> ack position to HQ

Branches find new changes by polling, never by a NOTIFY from HQ's writers: a
notification is queued at the writer's commit, so any login idling in a
transaction with LISTEN could fill the queue and fail every capturing commit
(README, Security).  An idle poll is one probe on HQ (pg_current_snapshot and two
index range checks), well under a millisecond of HQ CPU.

The position row is locked and rewritten in every apply transaction, so
`init` and `verify --repair` serialize with us, and a SIGKILL at any instant
leaves either the whole chunk with its position or neither.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from datetime import datetime, timezone

import psycopg
from psycopg import sql

from . import config as config_mod
from . import aside, guard, locks, state
from . import stream as stream_mod
from .apply import Applier, Batch
from .config import BranchConfig
from .errors import ApplyFailed, LockHeld, NotInitialized, PositionLost
from .metrics import StreamMetrics
from .reader import LogReader, Prefetch, covers
from .schema import bind_target, capture_gap_error, capture_gaps, offered_catalogs, select_catalogs

log = logging.getLogger(__name__)

LOCK_WAIT = 5.0          # seconds to wait for the run lock of a replicator that just died
ACK_INTERVAL = 1.0       # seconds between position reports for empty windows
IDLE_ADVANCE = 5.0       # seconds between position moves while the log holds nothing for us
QUIET_ADVANCE = 30.0     # ... once the position was moved so since our last change
# After this many seconds with nothing for us, probes come every idle_poll_interval instead
# of every poll_interval: a probe costs HQ about as much as waking a backend at all (0.2-0.3
# ms of CPU on 2 cores, 1-1.2 ms with twenty branches and a writer sharing them), so an
# idle branch polling 4 times a second would cost HQ over 1 ms/s; while changes flow
# branches are as quick as before, and the first change after a quiet spell arrives within
# idle_poll_interval.  After QUIET_AFTER seconds of nothing, every QUIET_FACTOR times that:
# a store closed for the night costs HQ half as much, and its first change in the morning
# arrives within a few seconds.
IDLE_AFTER = 5.0
QUIET_AFTER = 60.0
QUIET_FACTOR = 2


def probe_interval(quiet_for: float, poll: float, idle_poll: float) -> float:
    """Seconds until the next probe of a branch that has seen nothing new for `quiet_for`
    seconds (the daemon's and the fleet benchmark's schedule)."""
    if quiet_for < IDLE_AFTER:
        return poll
    return idle_poll if quiet_for < QUIET_AFTER else QUIET_FACTOR * idle_poll


class Reload(Exception):
    """Table states changed under us (init ran): reload and re-read the window."""


class Rebind(Reload):
    """A branch table's columns changed since they were bound (an ALTER under a running
    replicator): bind again before applying, so a narrowed column is a schema mismatch,
    not a silent rounding."""


class Session:
    """Connections, lock, table set, reader and applier for one stream."""

    def __init__(self, cfg: BranchConfig, app: str = "replicator run", stream: stream_mod.Stream | None = None,
                 registry=None):
        self.cfg = cfg
        self.stream = stream or stream_mod.catalogs(cfg)
        self.app = f"{app} {cfg.branch} pid {os.getpid()}"
        self.ends = stream_mod.Ends(self.stream, self.app)
        self.metrics = StreamMetrics(self.stream.name.split(":")[0], cfg.branch, registry)
        self.target_at = None        # wall time of the `run --once` target snapshot
        self.source = self.primary = self.target = None
        self.tables = []
        self.upload_names: list[str] = []
        self.reader = None
        self.config_version = 0
        self.last_ack = 0.0
        self.unreported = None                    # a position report _ack held back
        self.last_advance = 0.0
        self.probed = self.probed_from = None    # end of the last empty probe, and the position it began at
        self.last_news = time.monotonic()         # when a probe last found something for us
        self.last_retry = time.monotonic()        # when set-aside rows were last retried
        self.standby_behind = False               # said once per spell
        self.stop = threading.Event()   # set by SIGTERM/SIGINT: stop after the current chunk

    # ---------------------------------------------------------- connect
    def open(self) -> None:
        self.ends.__enter__()
        self.source, self.primary, self.target = self.ends.source, self.ends.primary, self.ends.target
        if self.ends.reading_standby():
            log.info("reading HQ's log from a hot standby (%s); position reports go to the primary",
                     self.source.info.host)
        # Set-based applies are short, repeated statements whose planner cost on big batches
        # trips JIT: compiling costs more than it saves.  (The source's settings for window
        # reads are SET LOCAL in the window's transaction: nothing session-bound there.)
        self.target.execute("SET jit = off")
        self._lock()
        stream_mod.require_capture(self.source, self.stream)
        if state.has_schema(self.target):
            state.ensure_schema(self.target)    # a target from an older release: its migrations first
        self.load()

    def close(self) -> None:
        self.ends.close()
        self.source = self.primary = self.target = None

    def _lock(self) -> None:
        """One run per stream and target.  A replicator killed a moment ago may still hold
        the lock until its backend notices (end of its current statement): wait a little
        before calling the holder a live process, so a supervisor's restart just works."""
        deadline = time.monotonic() + LOCK_WAIT
        while not locks.try_run(self.target, self.stream.name):
            if time.monotonic() >= deadline:
                self._lock_held()
            time.sleep(0.25)

    def _lock_held(self) -> None:
        holder = locks.run_holder(self.target, self.stream.name)
        who = (f"'{holder[1]}' (backend pid {holder[0]}, from {holder[2]}, since "
               f"{holder[3]:%Y-%m-%d %H:%M:%S})") if holder else "another process"
        raise LockHeld(f"another replicator is already working on this {self.stream.target_label} database: "
                       f"{who}; stop it first (one `replicator run` per {self.stream.target_label})")

    # ------------------------------------------------------------- load
    def load(self) -> None:
        """Resolve the selection against the source and bind it to the target tables."""
        pos = state.load_position(self.target, self.stream.name)
        if pos is not None and self.reader is not None \
                and pos.config_version != self.config_version:
            self._reread_selection()
        if pos is None:
            # a bad selection is a config error first
            select_catalogs(self.cfg, offered_catalogs(self.source, self.stream.member))
            raise NotInitialized(f"branch {self.cfg.branch} has no position yet; run `replicator init -c "
                                 f"{self.cfg.path}` first")
        if self.reader is None and pos.updated_at is not None:
            self.metrics.since(pos.updated_at.timestamp())     # first load: how old our state is
        sel = stream_mod.resolve(self.source, self.stream, self.cfg)
        tables = sel.tables
        bind_target(self.target, tables)
        guard.sync(self.target, self.stream.name, tables, self.cfg.path, pos.config_version)
        states = state.table_states(self.target, self.stream.name)
        gaps = capture_gaps(self.source, tables, states)
        if gaps:
            raise capture_gap_error(gaps)
        skip = {}
        for t in tables:
            st = states.get(t.qualified)
            if st is None or st.initialized_at is None:
                log.warning("catalog %s (%s) was never initialized: only changes from now on are "
                            "replicated; run `replicator init %s` for a full copy", t.catalog, t.qualified, t.catalog)
            elif st.copy_snapshot and not covers(self.source, pos.snapshot, st.copy_snapshot):
                skip[t.id] = st.copy_snapshot
        self.tables = tables
        self.shape = self._shape()
        self.reader = LogReader(tables, sel.params, skip, self.cfg.batch_rows)
        self.applier = Applier(self.target, self.stream.name, tables)
        self.applier.prepare_session()
        self.applier.load_waiting()
        self.config_version = pos.config_version
        from . import uploads
        self.upload_names = uploads.select(self.cfg, uploads.offered(self.source))   # run carries them too
        log.info("branch %s: replicating %d tables of catalogs %s", self.cfg.branch, len(tables),
                 ", ".join(sel.names))
        self.retry_waiting()

    def retry_waiting(self) -> None:
        """Rows set aside get another try at start and every RETRY_INTERVAL: the cause may be
        fixed (a widened column, a dropped local constraint) without anyone telling us."""
        self.last_retry = time.monotonic()
        if not self.applier.waiting:
            return
        with self.target.transaction():
            state.load_position(self.target, self.stream.name, lock=True, schema_known=True)   # one apply at a time
            stats = self.applier.retry_waiting()
        left = sum(len(k) for k in self.applier.waiting.values())
        if stats.cleared:
            log.info("applied %d set-aside changes on retry; %d still set aside", stats.cleared, left)
        elif left:
            log.info("%d changes still set aside (`replicator set-aside list`)", left)

    def _shape(self) -> list[str]:
        """The branch tables' column rows as of now: any ALTER of a column rewrites its
        pg_attribute row, so a different xmin means "bind again"."""
        return self.target.execute(
            "SELECT coalesce(array_agg(a.attrelid::text || '.' || a.attnum || '.' || a.xmin::text "
            "ORDER BY a.attrelid, a.attnum), '{}') FROM pg_attribute a "
            "WHERE a.attrelid = ANY (%s::regclass[]) AND a.attnum > 0",
            ([t.ident.as_string(self.target) for t in self.tables],)).fetchone()[0]

    def _check_shape(self) -> None:
        """Inside the apply transaction, with the tables locked (an ALTER waits for us or we
        for it), so what is checked is what is written to."""
        self.target.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(
            sql.SQL(", ").join(t.ident for t in self.tables)))
        if self._shape() != self.shape:
            raise Rebind()

    def _reread_selection(self) -> None:
        """init and release bump config_version after the admin edited `catalogs:` in branch.yaml;
        streaming a catalog init just copied (or still streaming one release just freed) with the
        selection read at start would leave a gap (or write to a released table)."""
        if not self.cfg.path or not os.path.isfile(self.cfg.path):
            return
        fresh = config_mod.load_branch(self.cfg.path)
        if fresh.catalogs != self.cfg.catalogs:
            log.info("catalog selection in %s changed: %s", self.cfg.path,
                     ", ".join(fresh.catalogs) if fresh.catalogs is not None else "HQ defaults")
            self.cfg = dataclasses.replace(self.cfg, catalogs=fresh.catalogs)

    # ------------------------------------------------------------- work
    def check_horizon(self, pos: state.Position) -> None:
        row = self.source.execute(
            "SELECT pruned_below > pg_snapshot_xmin(%s::pg_snapshot), pruned_below::text FROM replication.horizon",
            (pos.snapshot,)).fetchone()
        if row and row[0]:
            raise PositionLost(self.cfg.branch, pos.snapshot, row[1])

    def step(self, target: str | None = None) -> int:
        """Apply one window (up to `target`, or to HQ's current snapshot). Returns changes applied."""
        self.flush_ack()
        pos = state.load_position(self.target, self.stream.name, schema_known=True)
        if pos.config_version != self.config_version:
            self.load()
        cur_at = None                # wall time at which the source's snapshot `cur` was taken
        if pos.window_snapshot:
            cur, after = pos.window_snapshot, pos.window_last_id
        elif target:
            cur, after, cur_at = target, 0, self.target_at
        else:
            if time.monotonic() - self.last_retry >= aside.RETRY_INTERVAL:
                self.retry_waiting()
            cur_at = time.time()
            cur, news = self._probe(pos)
            after = 0
            if cur is None or not news:
                # nothing for us committed up to this probe: the target holds that state
                self.metrics.caught_up(cur_at)
            if cur is None:
                return 0
            if not news:
                self._advance(pos, cur)
                return 0
        self.check_horizon(pos)
        applied, finished, newest, carry = 0, False, None, []
        with Prefetch(self.reader.window(self.source, pos.snapshot, cur, after),
                      transform=self.applier.reduce) as batches:
            for batch in batches:
                rows = batch.rows
                finished = len(rows) < self.cfg.batch_rows
                try:
                    applied += self._apply(pos, cur, self.applier.reduce(carry + rows) if carry else batch,
                                           done=finished)
                except psycopg.errors.UniqueViolation:
                    if finished:
                        raise
                    # The chunk ends inside an HQ statement whose rows are unique only all
                    # together: apply it with the next chunk (the window's end is consistent).
                    carry += rows
                    log.info("a unique constraint holds only past log id %d; applying %d changes "
                             "together with the next chunk", rows[-1][0], len(carry))
                    continue
                carry = []
                newest = rows[-1][5]
                if not finished and self.stop.is_set():
                    # The position holds window_last_id: the next run resumes right here.
                    log.info("stopping inside a window after log id %d; the next run resumes there",
                             rows[-1][0])
                    return applied
        if not finished:
            applied += self._apply(pos, cur, self.applier.reduce(carry), done=True)
            newest = carry[-1][5] if carry else newest
        self.last_advance = time.monotonic()
        if cur_at is not None:
            self.metrics.caught_up(cur_at)
        self._report_window(cur, newest, applied, once=target is not None)
        return applied

    def _report_window(self, cur: str, newest, applied: int, once: bool) -> None:
        self._ack(cur, newest, force=once)

    def _probe(self, pos: state.Position) -> tuple[str | None, bool]:
        """HQ's snapshot and whether anything of ours may have committed since the position.

        Probes start where the last empty probe ended (windows compose: what is visible
        in `cur` and not in the position is what the empty probes covered plus what this
        one covers), so an idle branch's probe looks at one poll's worth of log, not at
        everything other tables logged since its position last moved.
        """
        since = self.probed if self.probed_from == pos.snapshot else pos.snapshot
        cur, news = self.reader.probe(self.source, since)
        if self.source is not self.primary and cur != pos.snapshot and not covers(self.source, cur, pos.snapshot):
            # A standby behind what this branch already holds (it reads another, lagging one
            # since a reconnect): moving the position there would apply changes twice.
            if not self.standby_behind:
                log.warning("the HQ standby this branch reads is behind its position; waiting for it "
                            "to replay further (nothing is applied meanwhile)")
            self.standby_behind = True
            return None, False
        self.standby_behind = False
        if news:
            self.last_news = time.monotonic()
        else:
            self.probed, self.probed_from = cur, pos.snapshot
        if cur == pos.snapshot:
            return None, False
        # cur == since after earlier empty probes still returns cur: once HQ goes quiet, the
        # span those probes covered must reach the position, or it would stay short for ever.
        return cur, news

    def poll_wait(self) -> float:
        """Seconds until the next probe: poll_interval while changes for us flow, then
        idle_poll_interval, then QUIET_FACTOR times that (probe_interval)."""
        return probe_interval(time.monotonic() - self.last_news, self.cfg.poll_interval,
                              self.cfg.idle_poll_interval)

    def _advance(self, pos: state.Position, cur: str) -> None:
        """Move the position over log that holds nothing for us (so HQ can prune and `hq
        status` sees us), without reading the window again: IDLE_ADVANCE seconds after our
        last change, then every QUIET_ADVANCE seconds (each move is a commit on HQ too)."""
        every = QUIET_ADVANCE if self.last_advance > self.last_news + IDLE_ADVANCE else IDLE_ADVANCE
        if time.monotonic() - self.last_advance < every:
            return
        self.check_horizon(pos)        # a pruned hole would also look empty
        with self.target.transaction():
            locked = state.load_position(self.target, self.stream.name, lock=True, schema_known=True)
            if locked.config_version != self.config_version or locked.snapshot != pos.snapshot \
                    or locked.window_snapshot:
                raise Reload()
            state.save_position(self.target, self.stream.name, state.Position(snapshot=cur, window_snapshot=None, window_last_id=0,
                                                            config_version=self.config_version,
                                                            applied_until=None), applied=0)
        self.last_advance = time.monotonic()
        self._ack(cur, None, force=True)

    def flush_ack(self, now: bool = False) -> None:
        """Send the report _ack held back, once ACK_INTERVAL has passed (or `now`)."""
        if self.unreported is not None and (now or time.monotonic() - self.last_ack >= ACK_INTERVAL):
            self._ack(*self.unreported, force=True)

    def _apply(self, pos: state.Position, cur: str, batch: Batch, done: bool) -> int:
        start = time.monotonic()
        rows = batch.rows
        with self.target.transaction():
            locked = state.load_position(self.target, self.stream.name, lock=True, schema_known=True)
            if locked.config_version != self.config_version or locked.snapshot != pos.snapshot:
                raise Reload()
            if rows:
                self._check_shape()
            try:
                stats = self.applier.apply(batch, hold_unique=not done) if rows else None
            except psycopg.errors.UntranslatableCharacter as e:
                names = sorted(t.qualified for t in self.tables if t.id in batch.pending)
                raise ApplyFailed(f"applying changes to {', '.join(names)} failed on the branch: "
                                  f"{e.diag.message_primary}: this branch database's encoding cannot hold a "
                                  "character HQ sent; nothing of that chunk was applied and the position is "
                                  "unchanged; fix the value at HQ, or use a UTF8 branch database") from e
            last_id = batch.last_id if rows else locked.window_last_id
            newest = batch.newest
            new = state.Position(snapshot=cur if done else pos.snapshot,
                                 window_snapshot=None if done else cur,
                                 window_last_id=0 if done else last_id,
                                 config_version=self.config_version, applied_until=newest)
            state.save_position(self.target, self.stream.name, new, applied=len(rows))
        if rows:
            self.metrics.applied.inc(len(rows) - (stats.set_aside if stats else 0))   # not the refused
            self.metrics.last_apply.set(time.time())
        if stats:
            self.metrics.set_aside.set(sum(len(k) for k in self.applier.waiting.values()))
            for _ in range(stats.set_aside):
                self.metrics.error("set_aside")
            lag = (datetime.now(timezone.utc) - newest).total_seconds() if newest else 0.0
            log.info("applied %d changes to %s through log id %d in %.0f ms; lag %.1f s%s",
                     stats.rows, ", ".join(sorted(stats.tables)), last_id,
                     (time.monotonic() - start) * 1000, lag,
                     f"; {stats.set_aside} set aside (`replicator set-aside list`)" if stats.set_aside else "")
        if done:
            pos.snapshot = cur
        return len(rows)

    def _ack(self, position: str, applied_until, force: bool = False) -> None:
        """Report the position to HQ; failing to do so never blocks applying.

        Windows are reported at most once per ACK_INTERVAL (each report is a commit on HQ:
        a busy fleet reporting every window would flush HQ's WAL for each); one held back
        goes with the next step after the interval (flush_ack), or when `run` stops.
        """
        now = time.monotonic()
        if not force and now - self.last_ack < ACK_INTERVAL:
            self.unreported = (position, applied_until)
            return
        self.last_ack = now
        self.unreported = None
        try:
            waiting = sum(len(k) for k in self.applier.waiting.values())
            self.primary.execute("SELECT replication.ack(%s, %s::pg_snapshot, %s, %s)",
                                 (self.cfg.branch, position, applied_until, waiting))
        except psycopg.errors.InsufficientPrivilege as e:
            self.metrics.error("position_report")
            log.warning("HQ refused the position report: %s", e.diag.message_primary)
