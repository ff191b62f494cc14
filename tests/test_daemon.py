"""`replicator run` as a long-lived process: wake-ups, signals, the lock, outages.

Every test starts the real command in a subprocess (`python -m replicator run`)
and reads its stderr, because what is under test is the process: how fast it
wakes, how it exits, what it logs while a server is gone.
"""
from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql

from harness import Branch, assert_same, make_setup
from replicator.cluster import Cluster, Database
from replicator.session import IDLE_ADVANCE, IDLE_AFTER, QUIET_AFTER, probe_interval
from replicator.hq import role_name
from replicator.reader import covers

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(12,2));
"""
CATALOGS = {"items": {"label": "Artículos", "default": True, "tables": ["public.items"]}}


class Daemon:
    """A running `replicator run` whose stderr is collected line by line."""

    def __init__(self, branch: Branch, *args: str):
        self.proc = branch.popen("run", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def wait_for(self, text: str, timeout: float = 15) -> None:
        """Until a log line contains `text`; fail at once if the process died."""
        deadline = time.monotonic() + timeout
        while self.count(text) == 0:
            assert self.proc.poll() is None, f"replicator exited {self.proc.returncode}:\n{self.log}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.log}"
            time.sleep(0.05)

    def signal(self, signum: int = signal.SIGTERM, timeout: float = 5) -> float:
        """Send `signum`; return the seconds until the process exited (fails past `timeout`)."""
        start = time.monotonic()
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s after {signal.Signals(signum).name}:\n{self.log}")
        self._reader.join(5)
        return time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def daemon(branch: Branch, *args: str):
    d = Daemon(branch, *args)
    try:
        yield d
    finally:
        d.kill()


def wait_until(predicate, timeout: float, what: str) -> float:
    """Poll `predicate` every 20 ms; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def has_item(db: Database, item_id: int) -> bool:
    return bool(db.scalar("SELECT count(*) FROM items WHERE id = %s", (item_id,)))


def position(db: Database) -> dict:
    row = db.execute("SELECT snapshot::text, window_snapshot::text, window_last_id, applied_changes "
                     "FROM replication.position")[0]
    return dict(zip(("snapshot", "window_snapshot", "window_last_id", "applied_changes"), row))


@pytest.fixture
def world(tmp_path):
    """make(hq, branch_db, **branch_yaml_extra) -> an initialized Branch; roles dropped afterwards.

    Tests list it after the database fixtures, so it is torn down while their databases exist."""
    made = []

    def make(hq: Database, db: Database, **extra) -> Branch:
        where = tmp_path / uuid.uuid4().hex[:6]
        where.mkdir()
        s = make_setup(where, hq, CATALOGS, SCHEMA, [db])
        b = s.add_branch(f"d-{uuid.uuid4().hex[:8]}", db, **extra)
        made.append((hq, b.name))
        hq.execute("INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 10) g")
        b.init()
        return b

    yield make
    for hq, name in made:
        try:
            role = sql.Identifier(role_name(name))
            hq.execute(sql.SQL("DROP OWNED BY {}").format(role))
            hq.execute(sql.SQL("DROP ROLE {}").format(role))
        except psycopg.Error:
            pass   # the cluster is gone (scratch) or the role was never made


# ------------------------------------------------------------ waking up

def test_polling_finds_each_change_at_once_and_sigterm_exits_0(hq, branch_a, world):
    """No NOTIFY (HQ's writers never depend on branches): the default 250 ms probe of the
    log finds every change within a second, and an idle stretch moves nothing."""
    b = world(hq, branch_a)
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        wait_until(lambda: position(branch_a)["window_snapshot"] is None, 5, "idle")
        for i in (101, 102, 103):
            hq.execute("INSERT INTO items VALUES (%s, 'polled', 1)", (i,))
            took = wait_until(lambda: has_item(branch_a, i), 2.0, f"item {i} on the branch")
            assert took < 1.0
            time.sleep(0.2)
        assert d.signal(signal.SIGTERM) < 5
    assert d.proc.returncode == 0, d.log
    assert "Traceback" not in d.log
    assert "received SIGTERM" in d.log
    assert position(branch_a)["window_snapshot"] is None
    assert_same(hq, branch_a, "items")


def test_idle_polls_leave_the_branch_position_alone_and_sigint_exits_0(hq, branch_a, world):
    """While HQ commits only to tables the branch does not receive, a poll is one probe: the
    branch position moves at most every few seconds, not with every HQ commit."""
    b = world(hq, branch_a, poll_interval="50ms")
    hq.execute("CREATE TABLE other (i int)")
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        wait_until(lambda: position(branch_a)["window_snapshot"] is None, 5, "idle")
        moves = set()
        for i in range(40):      # 2 s of HQ commits, 40 polls
            hq.execute("INSERT INTO other VALUES (%s)", (i,))
            moves.add(branch_a.scalar("SELECT updated_at FROM replication.position"))
            time.sleep(0.05)
        assert len(moves) <= 2, sorted(moves)     # at most one move (every 5 s) inside the 2 s
        hq.execute("INSERT INTO items VALUES (201, 'after a quiet spell', 2)")
        wait_until(lambda: has_item(branch_a, 201), 3.0, "the change after the quiet spell")
        assert d.signal(signal.SIGINT) < 5
    assert d.proc.returncode == 0, d.log
    assert "received SIGINT" in d.log and "Traceback" not in d.log
    assert_same(hq, branch_a, "items")


def _probes(hq: Database, pid: int, seconds: float) -> float:
    """Probes per second the backend `pid` ran, from its query_start (sampled every 5 ms)."""
    starts = set()
    deadline = time.monotonic() + seconds
    with hq.connect() as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT query, query_start FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            if row and "pg_current_snapshot() AS cur" in row[0]:
                starts.add(row[1])
            time.sleep(0.005)
    return len(starts) / seconds


def test_an_idle_branch_probes_less_often_and_the_first_change_wakes_it(hq, branch_a, world):
    """Waking an HQ backend costs about as much as the probe itself: after IDLE_AFTER seconds
    with nothing new a branch probes every idle_poll_interval, and speeds up at once when a
    change for it arrives."""
    b = world(hq, branch_a, poll_interval="50ms", idle_poll_interval="500ms")
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        pid = hq.scalar("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'replicator run %%'")
        busy = _probes(hq, pid, 1.5)                 # just started: every poll_interval
        time.sleep(IDLE_AFTER)
        idle = _probes(hq, pid, 3.0)
        assert busy >= 8 and idle <= 3.5, (busy, idle)   # 2 a second, a position move, no more
        hq.execute("INSERT INTO items VALUES (401, 'after a quiet spell', 4)")
        took = wait_until(lambda: has_item(branch_a, 401), 3.0, "the first change after the quiet spell")
        assert took < 0.5 + 0.5, took
        assert _probes(hq, pid, 1.5) >= 8            # quick again
        assert d.signal() < 5
    assert d.proc.returncode == 0, d.log


def test_position_reaches_hq_once_hq_goes_quiet(hq, branch_a, world):
    """The last HQ commit may be one the branch does not receive, probed inside the few
    seconds between position moves; with nothing after it the position must still get there
    (`status` and every wait on "caught up" compare it with HQ's snapshot)."""
    b = world(hq, branch_a, poll_interval="50ms")
    hq.execute("CREATE TABLE IF NOT EXISTS other (i int)")
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        hq.execute("INSERT INTO items VALUES (301, 'last captured', 3)")
        wait_until(lambda: has_item(branch_a, 301), 3.0, "the captured change")
        hq.execute("INSERT INTO other VALUES (1)")     # HQ's last commit: nothing for us
        target = hq.scalar("SELECT pg_current_snapshot()::text")
        with hq.connect() as conn:
            wait_until(lambda: covers(conn, position(branch_a)["snapshot"], target),
                       IDLE_ADVANCE + 3, "the position to cover HQ's snapshot")
        assert d.signal() < 5
    assert d.proc.returncode == 0, d.log


# ------------------------------------------------------------ one run per branch

def test_second_run_on_the_same_branch_is_refused_naming_the_holder(hq, branch_a, world):
    b = world(hq, branch_a, poll_interval="60s")
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        for args in (("run",), ("run", "--once")):
            r = b.cli(*args, timeout=30)
            assert r.returncode == 1, (r.returncode, r.stderr)
            lines = r.stderr.splitlines()
            assert len(lines) == 1, lines
            assert lines[0].startswith("error: another replicator is already working on this branch database: ")
            assert f"'replicator run {b.name} pid {d.proc.pid}'" in lines[0]
            assert "stop it first" in lines[0]
        assert d.proc.poll() is None, "the first one keeps running"
        assert d.signal() < 5
    assert d.proc.returncode == 0
    # the lock went with the process: the next run works
    r = b.cli("run", "--once")
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------ stopping mid catch-up

@pytest.mark.slow
def test_sigterm_during_a_large_catch_up_finishes_the_chunk_and_exits_0(hq, branch_a, world):
    # 333 changes a chunk: no multiple of it (below 333,000) ends a log row of 1,000 images
    b = world(hq, branch_a, poll_interval="60s", batch_rows=333)
    base = position(branch_a)["applied_changes"]
    hq.execute("INSERT INTO items SELECT g, 'bulk ' || g, g FROM generate_series(1001, 61000) g")
    with daemon(b) as d:
        wait_until(lambda: position(branch_a)["applied_changes"] - base >= 1000, 30, "catch-up under way")
        assert d.signal(signal.SIGTERM) < 5
    assert d.proc.returncode == 0, d.log
    assert "Traceback" not in d.log
    pos = position(branch_a)
    applied = pos["applied_changes"] - base
    # stopped inside the window, after a whole log row (the INSERT logged its 60,000 images
    # about 1,000 to a log row: a chunk grows to the end of its last log row), with rows and
    # position agreeing
    assert pos["window_snapshot"] is not None, "it should have stopped before the end of the backlog"
    assert 0 < applied < 60_000, applied
    assert applied == hq.scalar("SELECT sum(cardinality(rows)) FROM replication.change_log WHERE id <= %s",
                                (pos["window_last_id"],))
    assert branch_a.scalar("SELECT count(*) FROM items WHERE id > 1000") == applied
    assert "stopping inside a window" in d.log
    # and the next run resumes exactly there
    r = b.cli("run", "--once")
    assert r.returncode == 0, r.stderr
    assert position(branch_a)["window_snapshot"] is None
    assert_same(hq, branch_a, "items")


# ------------------------------------------------------------ --once

def test_run_once_exits_0_while_hq_keeps_writing(hq, branch_a, world):
    b = world(hq, branch_a)
    stop = threading.Event()
    committed = []

    def writer():
        with hq.connect() as conn:
            i = 10_000
            while not stop.is_set():
                i += 1
                conn.execute("INSERT INTO items VALUES (%s, 'stream', 1)", (i,))
                committed.append(i)
                time.sleep(0.002)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_until(lambda: len(committed) > 50, 10, "writer started")
        before_start = committed[-1]
        r = b.cli("run", "--once", timeout=30)
        assert t.is_alive() and not stop.is_set(), "HQ was still writing when --once finished"
    finally:
        stop.set()
        t.join(10)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    missing = branch_a.scalar("SELECT count(*) FROM generate_series(10001, %s) g "
                              "WHERE NOT EXISTS (SELECT FROM items WHERE id = g)", (before_start,))
    assert missing == 0, "everything committed before the start must be there"
    assert b.cli("run", "--once").returncode == 0
    assert_same(hq, branch_a, "items")


# ------------------------------------------------------------ outages

def _outage_log_ok(d: Daemon, side: str) -> None:
    assert d.count(f"lost connection to {side}") == 1, d.log
    assert d.count("WARNING") == 1, d.log
    assert d.count("reconnected after") == 1, d.log
    assert d.count("ERROR") == 0 and "Traceback" not in d.log, d.log


@pytest.mark.slow
def test_hq_restart_one_warning_then_reconnected(scratch_cluster: Cluster, branch_a, world):
    hq = scratch_cluster.create_database("hq_outage")
    b = world(hq, branch_a, poll_interval="1s")
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        hq.execute("INSERT INTO items VALUES (301, 'before', 1)")
        wait_until(lambda: has_item(branch_a, 301), 5, "change before the outage")
        scratch_cluster.stop("immediate")
        time.sleep(2.5)   # several retries happen in here
        assert d.proc.poll() is None, d.log
        scratch_cluster.start()
        d.wait_for("reconnected after", timeout=20)
        hq.execute("INSERT INTO items VALUES (302, 'after', 1)")
        wait_until(lambda: has_item(branch_a, 302), 5, "change after the restart")
        assert d.signal() < 5
    assert d.proc.returncode == 0, d.log
    _outage_log_ok(d, "HQ")
    assert f"127.0.0.1:{scratch_cluster.port}/hq_outage" in d.log   # says which server
    assert_same(hq, branch_a, "items")


@pytest.mark.slow
def test_branch_restart_one_warning_then_reconnected(hq, scratch_cluster: Cluster, world):
    db = scratch_cluster.create_database("branch_outage")
    b = world(hq, db, poll_interval="1s")
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        scratch_cluster.stop("immediate")
        hq.execute("INSERT INTO items VALUES (401, 'during', 1)")   # wakes it: the branch is gone
        time.sleep(2.5)   # several retries happen in here
        assert d.proc.poll() is None, d.log
        scratch_cluster.start()
        wait_until(lambda: has_item(db, 401), 20, "change made during the outage")
        hq.execute("INSERT INTO items VALUES (402, 'after', 1)")
        wait_until(lambda: has_item(db, 402), 5, "change after the restart")
        assert d.signal() < 5
    assert d.proc.returncode == 0, d.log
    _outage_log_ok(d, "branch")
    assert_same(hq, db, "items")


def test_branch_table_altered_while_running_stops_with_one_line(hq, branch_a, world):
    """A schema change under a running replicator: named, rolled back, exit 1, no traceback."""
    b = world(hq, branch_a)
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        before = position(branch_a)
        branch_a.execute("ALTER TABLE items DROP COLUMN price")
        xid = hq.scalar("UPDATE items SET price = 5 WHERE id = 1 RETURNING pg_current_xact_id()::text")
        d.proc.wait(15)
        d._reader.join(5)
    assert d.proc.returncode == 1, d.log
    assert "Traceback" not in d.log, d.log
    assert d.lines[-1] == ("error: schema mismatch on public.items.price: column missing on the branch; "
                           "add it with the HQ type numeric(12,2)"), d.log
    # Rolled back: the position does not cover the update (an empty window may have moved it
    # before the update; which one the daemon read first is a race the test does not fix).
    after = position(branch_a)
    assert after["window_snapshot"] is None and after["applied_changes"] == before["applied_changes"], after
    assert hq.scalar("SELECT pg_visible_in_snapshot(%s::xid8, %s::pg_snapshot)", (xid, after["snapshot"])) is False


def test_branch_column_narrowed_while_running_is_caught_before_the_next_apply(hq, branch_a, world):
    """numeric(12,2) narrowed to numeric(12,1) under a running replicator would round 1.25 to
    1.3 without an error (binary records take the column's typmod): the definition is checked
    before each apply, so it stops with one line and nothing is rounded."""
    b = world(hq, branch_a)
    hq.execute("INSERT INTO items VALUES (701, 'before', 1.00)")
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        wait_until(lambda: has_item(branch_a, 701), 5, "the first change")
        branch_a.execute("ALTER TABLE items ALTER COLUMN price TYPE numeric(12,1)")
        hq.execute("UPDATE items SET price = 1.25 WHERE id = 701")
        d.proc.wait(15)
        d._reader.join(5)
    assert d.proc.returncode == 1, d.log
    assert "Traceback" not in d.log, d.log
    assert d.lines[-1] == ("error: schema mismatch on public.items.price: type is numeric(12,1) on the branch but "
                           "numeric(12,2) on HQ; change the branch column to numeric(12,2)"), d.log
    assert branch_a.scalar("SELECT price::text FROM items WHERE id = 701") == "1.0"


def test_branch_column_added_while_running_is_taken_in_stride(hq, branch_a, world):
    """A nullable local column added under a running replicator: the binary records it was
    applying no longer fit, so it binds the table again and goes on (now as JSON images)."""
    b = world(hq, branch_a)
    with daemon(b) as d:
        d.wait_for("replicating 1 tables")
        branch_a.execute("ALTER TABLE items ADD COLUMN local_note text")
        hq.execute("UPDATE items SET price = 7 WHERE id = 1")
        hq.execute("INSERT INTO items VALUES (601, 'after the change', 1)")
        wait_until(lambda: has_item(branch_a, 601), 15, "change after the branch column was added")
        d.wait_for("reading its definition again")
        assert d.signal() < 5
    assert d.proc.returncode == 0, d.log
    assert "Traceback" not in d.log, d.log
    assert_same(hq, branch_a, "items", "id, name, price")


def test_in_process_run_gives_the_signal_handlers_back(hq, branch_a, world):
    """run() takes SIGTERM/SIGINT only while it runs: a host process (tests, the demo) stays interruptible."""
    b = world(hq, branch_a)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    hq.execute("INSERT INTO items VALUES (501, 'in-process', 1)")
    assert b.run_once() == 0
    assert has_item(branch_a, 501)
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


def test_a_long_catch_up_reads_hq_in_short_transactions(hq, branch_a, world):
    """A branch back after a long time offline must not hold HQ's xmin (vacuum's horizon)
    for its whole catch-up: it reads the window in HQ transactions of a few chunks each."""
    b = world(hq, branch_a, batch_rows=100)
    for i in range(40):                               # 4,000 changes while the branch is away
        hq.execute("INSERT INTO items SELECT g, 'away', 1 FROM generate_series(%s::int, %s::int) g",
                   (1000 + i * 100, 1099 + i * 100))
    seen: set = set()
    done = threading.Event()

    def sample() -> None:
        with hq.connect() as conn:
            while not done.is_set():
                for start, in conn.execute(
                        "SELECT xact_start FROM pg_stat_activity WHERE application_name LIKE 'replicator run %%' "
                        "AND query ILIKE '%%replicator_window%%' AND xact_start IS NOT NULL"):
                    seen.add(start)
                time.sleep(0.002)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        r = b.cli("run", "--once")
    finally:
        done.set()
        watcher.join(10)
    assert r.returncode == 0, r.stderr
    assert_same(hq, branch_a, "items")
    # 4,000 changes, 100 a chunk, CHUNKS_PER_TRANSACTION (10) chunks per HQ transaction: 4 or more
    assert len(seen) >= 3, f"the window was read in {len(seen)} HQ transaction(s)"


def test_an_idle_branch_slows_down_in_two_steps():
    """poll_interval while changes flow, idle_poll_interval after IDLE_AFTER seconds of
    nothing, twice that after QUIET_AFTER (the fleet benchmark follows the same schedule)."""
    assert probe_interval(0.0, 0.25, 2.0) == 0.25
    assert probe_interval(IDLE_AFTER - 0.1, 0.25, 2.0) == 0.25
    assert probe_interval(IDLE_AFTER, 0.25, 2.0) == 2.0
    assert probe_interval(QUIET_AFTER - 0.1, 0.25, 2.0) == 2.0
    assert probe_interval(QUIET_AFTER, 0.25, 2.0) == 4.0
