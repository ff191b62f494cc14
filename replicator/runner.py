"""`replicator run`: the process that keeps a branch in step, both flows (the catalogs
down in this thread, the branch's uploads up in a second one), until it is stopped.

Each flow is a session (session.Session, upload_session.UploadSession) stepped in a loop:
probe, window, apply, report, then sleep until the next probe.  An outage (HQ or the
branch unreachable, a restart) is waited out with jittered backoff so that a fleet
reconnecting after an HQ restart does not arrive in lockstep; anything else stops `run`
with one line.
"""
from __future__ import annotations

import logging
import random
import signal
import threading
import time

import psycopg

from . import db, state, systemd
from . import metrics as metrics_mod
from .config import BranchConfig
from .session import Rebind, Reload, Session
from .errors import ApplyFailed, ConnectionFailed, NotInitialized, ReplicatorError
from .reader import covers, current_snapshot
from .upload_session import UploadSession

log = logging.getLogger(__name__)


def run(cfg: BranchConfig, once: bool = False, stop: threading.Event | None = None,
        metrics_listen: str | None = None) -> int:
    """Keep the branch in step until stopped, both flows: the catalogs down (this thread) and
    the branch's uploads up (a second thread, when HQ defines uploads for it); with
    once=True catch both up and return.  metrics_listen (HOST:PORT): serve Prometheus
    metrics there while running."""
    stop = stop or threading.Event()
    session = Session(cfg)
    session.stop = stop
    server = metrics_mod.serve(session.metrics.registry, metrics_listen) if metrics_listen else None
    previous = _install_signal_handlers(stop)
    failed: list[BaseException] = []
    ups: list = []                       # the upload stream's session, once open
    try:
        # A problem at start (config, password, schema, HQ unreachable) is an error, not an outage.
        session.open()
        up = _open_uploads(session, stop)
        if up is not None:
            ups.append(up)
        thread = None
        if up is not None or (session.upload_names and not once):
            def upload_loop():
                try:
                    if not ups and not _wait_for_uploads(session, stop, ups):
                        return
                    _loop(ups[0], once, stop)
                except BaseException as e:      # the run stops with the first failure of either flow
                    failed.append(e)
                    stop.set()
            thread = threading.Thread(target=upload_loop, name="uploads", daemon=True)
            thread.start()
        systemd.notify(f"READY=1\nSTATUS=replicating {len(session.tables)} tables"
                       + (f", uploading {len(up.tables)}" if up is not None else ""))
        watchdog = systemd.Watchdog()
        if once and thread is not None:
            # sales first: HQ's own rules may move catalogs with them (stock), and --once
            # ends with the catalogs caught up with what the sales changed at HQ
            while thread.is_alive():
                watchdog.feed()
                thread.join(1.0)
            if failed:
                raise failed[0]
        try:
            _loop(session, once, stop, watchdog)
        except BaseException as e:
            stop.set()
            if thread is not None:
                thread.join()
            if failed and failed[0] is not e:    # both flows failed: say the other one too
                log.error("the upload stream stopped too: %s", failed[0])
            raise
        finally:
            if thread is not None:
                if not once:
                    stop.set()
                thread.join()
        if failed:
            raise failed[0]
        return 0
    finally:
        systemd.notify("STOPPING=1")
        session.close()
        for up in ups:
            up.close()
        _restore_signal_handlers(previous)
        if server is not None:
            server.shutdown()
            server.server_close()


UPLOADS_CHECK = 15.0     # seconds between looks for uploads initialized after `run` started


def _wait_for_uploads(session: Session, stop: threading.Event, ups: list) -> bool:
    """The branch's uploads were not initialized when `run` started: look again now and
    then, so a `replicator init` while it runs starts them without a restart.  False when
    stopped first."""
    while not stop.wait(UPLOADS_CHECK):
        try:
            up = _open_uploads(session, stop, quiet=True)
        except (ReplicatorError, psycopg.Error) as e:
            log.debug("uploads not open yet: %s", e)
            continue
        if up is not None:
            ups.append(up)
            log.info("uploads initialized meanwhile; uploading %d tables", len(up.tables))
            return True
    return False


def _open_uploads(session: Session, stop: threading.Event, quiet: bool = False):
    """The upload stream's session, or None when the branch uploads nothing (or has not
    initialized its uploads yet: then the catalogs still flow, and it is said)."""
    if not session.upload_names:
        return None
    up = UploadSession(session.cfg, registry=session.metrics.registry)
    up.stop = stop
    try:
        up.open()
    except NotInitialized as e:
        up.close()
        if not quiet:
            log.warning("%s; carrying the catalogs only (`run` starts the uploads once they are)", e)
        return None
    except BaseException:
        up.close()
        raise
    return up


def _loop(session: Session, once: bool, stop: threading.Event, watchdog=None) -> None:
    """One stream's loop: steps, outages (reconnect with backoff) and reloads."""
    outage_since = None
    rebound = False
    session.target_at = time.time()
    target = current_snapshot(session.source) if once else None
    while not stop.is_set():
        if watchdog is not None:
            watchdog.feed()
        try:
            if session.source is None:
                session.open()
                log.info("reconnected after %.1f s; resuming", time.monotonic() - outage_since)
                outage_since = None
            if once and _caught_up(session, target):
                return
            began = time.monotonic()
            applied = session.step(target)
            rebound = False
            if not once:
                stop.wait(_next_probe_in(session, applied, began))
        except Rebind:
            log.info("a %s table's columns changed while running; reading its definition again",
                     session.stream.target_label)
            session.config_version = None
        except Reload:
            log.info("table states changed on the %s (init); reloading", session.stream.target_label)
            session.config_version = None   # step() reloads, inside this try (outages included)
        except psycopg.errors.SerializationFailure as e:
            # A hot standby cancels a read that conflicts with the WAL it replays: the
            # chunk was rolled back with its position; read it again.
            log.info("HQ cancelled a read (%s); reading again", e.diag.message_primary)
            stop.wait(session.poll_wait())
        except psycopg.errors.DatatypeMismatch as e:
            # Binary records fit the target table as it was bound; one altered (or re-created)
            # since then refuses them.  Bind again, once: a table that still does not fit is a
            # schema mismatch, and that is reported.
            if rebound:
                _explain_failure(session, e)
                raise
            log.info("a %s table changed while running (%s); reading its definition again",
                     session.stream.target_label, e.diag.message_primary)
            rebound = True
            session.config_version = None
        except (psycopg.OperationalError, psycopg.InterfaceError, ReplicatorError) as e:
            if isinstance(e, ReplicatorError) and not _is_connection_error(e):
                raise
            outage_since = _outage(session, e, outage_since, stop)
        except psycopg.DatabaseError as e:
            _explain_failure(session, e)
            raise
    if session.source is not None:
        try:
            session.flush_ack(now=True)       # stopped: HQ sees where we stopped
        except psycopg.Error:
            pass


def _next_probe_in(session: Session, applied: int, began: float) -> float:
    """Probes keep their cadence while changes flow: the next comes one poll interval after
    the one that found them, at once when applying took longer (a catch-up).  Probing again
    the moment a window is applied would make each branch's loop as fast as HQ answers, and
    a fleet of busy branches would spend HQ's CPU on windows of one change each (README,
    Performance: the fleet)."""
    wait = session.poll_wait()
    return wait if applied == 0 else max(0.0, wait - (time.monotonic() - began))


def _caught_up(session: Session, target: str) -> bool:
    pos = state.load_position(session.target, session.stream.name, schema_known=True)
    return pos.window_snapshot is None and covers(session.source, pos.snapshot, target)


def _is_connection_error(e: ReplicatorError) -> bool:
    return isinstance(e, ConnectionFailed) and e.retry


def _explain_failure(session: Session, e: psycopg.DatabaseError) -> None:
    """A statement failed on a live connection: turn what a person can fix into one line.

    The failed chunk was rolled back with its position.  A branch table
    altered while we run shows up as a SchemaMismatch when the selection is
    bound again; a branch-local constraint or bad data is named with its
    table.  Anything else is a bug and keeps its traceback.
    """
    try:
        session.load()
    except ReplicatorError as mismatch:
        raise mismatch from e
    except psycopg.Error:
        pass
    if isinstance(e, (psycopg.IntegrityError, psycopg.DataError)):
        diag = e.diag
        table = f"{diag.schema_name}.{diag.table_name}" if diag.table_name else "a branch table"
        raise ApplyFailed(f"applying changes to {table} failed on the branch: {diag.message_primary}"
                          f"{f' ({diag.constraint_name})' if diag.constraint_name else ''}; nothing of that "
                          "chunk was applied and the position is unchanged; fix the branch table (or its "
                          "constraint) and start again") from e
    if isinstance(e, psycopg.errors.InsufficientPrivilege):
        raise ReplicatorError(f"permission denied: {e.diag.message_primary}; on HQ re-run `replicator hq "
                              "install` (it grants branch roles their catalog tables), on the branch check "
                              "the login's privileges") from e


def _side(session: Session, e: Exception) -> str:
    """Which server went away: a failed connect says so; otherwise the broken connection does."""
    if isinstance(e, ConnectionFailed):
        return e.side
    target, st = session.target, session.stream
    return st.target_label if target is not None and (target.broken or target.closed) else st.source_label


def _outage(session: Session, e: Exception, since: float | None, stop: threading.Event) -> float:
    """Log one line per outage (not per retry), close everything, back off."""
    now = time.monotonic()
    reason = e.reason if isinstance(e, ConnectionFailed) else db.explain(e)
    session.metrics.error("connection")
    if since is None:
        side = _side(session, e)
        st = session.stream
        dsn = st.target_dsn if side == st.target_label else st.source_dsn
        log.warning("lost connection to %s at %s: %s; reconnecting with backoff (changes resume "
                    "when it is back)", side, db.describe(dsn), reason)
        since = now
    else:
        log.debug("still no connection: %s", reason)
    session.close()
    # Jittered: after an HQ restart many branches retry at once; each waits a random part of
    # the backoff so their reconnects spread out instead of arriving in lockstep.
    delay = min(30.0, 0.5 * 2 ** min(int((now - since) / 5), 6))
    stop.wait(random.uniform(delay / 2, delay))
    return since


def _install_signal_handlers(stop: threading.Event) -> dict:
    """SIGTERM/SIGINT finish the current transaction, then exit 0.

    Returns the handlers they replace: run() puts them back, so a caller that
    runs the loop in-process (tests, the demo) can still be interrupted after it.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        log.info("received %s; finishing the current transaction", signal.Signals(signum).name)
        stop.set()

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
