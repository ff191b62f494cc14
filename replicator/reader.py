"""Read windows of committed changes from a source's change log.

A window is the set of log rows written by transactions visible in a newer
snapshot ``cur`` and not visible in the snapshot ``prev`` the branch last
applied (README, How it works).  Never ``id > last_id``: ids are drawn before commit, so
a transaction holding a lower id can commit after a higher one was read.

The query runs on HQ with the branch's tables, row filters and per-table copy
snapshots folded in, and is streamed through a server-side cursor so memory
stays flat whatever the backlog.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator

import psycopg
from psycopg import sql

from .errors import ReplicatorError
from .schema import Table

log = logging.getLogger(__name__)


def current_snapshot(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]


def covers(conn: psycopg.Connection, newer: str, older: str) -> bool:
    """True when every transaction visible in `older` is visible in `newer`."""
    return conn.execute(
        """SELECT pg_snapshot_xmax(%(old)s::pg_snapshot) <= pg_snapshot_xmax(%(new)s::pg_snapshot)
                  AND NOT EXISTS (SELECT FROM pg_snapshot_xip(%(new)s::pg_snapshot) x
                                   WHERE pg_visible_in_snapshot(x, %(old)s::pg_snapshot))""",
        {"old": older, "new": newer}).fetchone()[0]


CHUNKS_PER_TRANSACTION = 10   # a window's HQ transaction ends after this many full chunks


class LogReader:
    """Builds the window query once per table set; reads chunks of it."""

    def __init__(self, tables: list[Table], params: dict, skip: dict[int, str] | None = None,
                 chunk_rows: int = 5000, whole_transactions: bool = False):
        self.tables = {t.id: t for t in tables}
        self.params = params
        self.skip = dict(skip or {})
        self.chunk_rows = chunk_rows
        # Uploads apply a source transaction all or nothing (apply.py): a chunk then never
        # ends inside one, which each row's transaction's last id in the window tells.
        self.whole_transactions = whole_transactions
        # Whether the login is a branch's, whose queries go by its routes (_BRANCH_ARMS); asked
        # of HQ at the first query (a login does not change kind).
        self.routed: bool | None = None
        self._queries: dict[tuple[bool, bool], sql.Composed] = {}

    def query_for(self, arrays: bool, routed: bool) -> sql.Composed:
        """A window without a bulk statement's array of images (most windows) is read by the
        plain query: expanding arrays costs every log row something, a catch-up about 7%."""
        if (arrays, routed) not in self._queries:
            self._queries[(arrays, routed)] = self._build(arrays, routed)
        return self._queries[(arrays, routed)]

    @property
    def query(self) -> sql.Composed:
        return self.query_for(True, bool(self.routed))

    @property
    def plain_query(self) -> sql.Composed:
        return self.query_for(False, bool(self.routed))

    def know_login(self, conn: psycopg.Connection) -> None:
        if self.routed is None:
            self.routed = is_routed(conn)

    # ------------------------------------------------------------ query
    def _build(self, arrays: bool, routed: bool) -> sql.Composed:
        op_cases, key_cases, row_cases, rec_cases, conds, chunk_conds = [], [], [], [], [], []
        for t in self.tables.values():
            tid = sql.Literal(t.id)
            new = self._predicate(t, sql.SQL("l.row"))
            key_cases.append(sql.SQL("WHEN {} THEN {}").format(tid, _key_expr(t)))
            if t.record_type:
                rec_cases.append(sql.SQL("WHEN {} THEN {}").format(tid, _record_expr(t)))
                row_cases.append(sql.SQL("WHEN {} THEN NULL").format(tid))
            elif t.exclude_columns:
                row_cases.append(sql.SQL("WHEN {} THEN l.row OPERATOR(pg_catalog.-) {}::text[]").format(
                    tid, sql.Literal(t.exclude_columns)))
            cond = []
            if new is not None:
                old = self._predicate(t, sql.SQL("l.old_row"))
                # A row updated out of this branch's filter must be deleted here.
                op_cases.append(sql.SQL("WHEN l.table_id = {} AND l.op = 'U' AND ({}) IS NOT TRUE THEN 'D'")
                                .format(tid, new))
                passes = sql.SQL("(l.op = 'T' OR ({new}) IS TRUE OR "
                                 "(l.op = 'U' AND (l.old_row IS NULL OR ({old}) IS TRUE)))").format(new=new, old=old)
                if arrays:
                    # A log row with an array of images (a bulk statement's) passes here as a
                    # whole; its images are filtered one by one once expanded.
                    cond.append(sql.SQL("(l.rows IS NOT NULL OR {})").format(passes))
                    chunk_conds.append(sql.SQL("WHEN {} THEN {}").format(tid, passes))
                else:
                    cond.append(passes)
            if t.id in self.skip:
                # Changes already inside this table's initial copy are not applied again.
                cond.append(sql.SQL("NOT pg_visible_in_snapshot(l.xid, {}::pg_snapshot)")
                            .format(sql.Literal(self.skip[t.id])))
            if cond:
                conds.append(sql.SQL("WHEN {} THEN {}").format(tid, sql.SQL(" AND ").join(cond)))
        op = sql.SQL("CASE {} ELSE l.op::text END").format(sql.SQL(" ").join(op_cases)) if op_cases \
            else sql.SQL("l.op::text")
        row = sql.SQL("(CASE l.table_id {} ELSE l.row END)::text").format(sql.SQL(" ").join(row_cases)) \
            if row_cases else sql.SQL("l.row::text")
        where = sql.SQL("AND CASE l.table_id {} ELSE true END").format(sql.SQL(" ").join(conds)) \
            if conds else sql.SQL("")
        chunk_where = sql.SQL("WHERE (NOT l.chunked OR CASE l.table_id {} ELSE true END)").format(
            sql.SQL(" ").join(chunk_conds)) if chunk_conds else sql.SQL("")
        rec = sql.SQL("CASE WHEN l.op <> 'T' THEN CASE l.table_id {} END END").format(
            sql.SQL(" ").join(rec_cases)) if rec_cases else sql.SQL("NULL::pg_catalog.bytea")
        # The sort by id needs the whole window before its first row.  Sorting only (id, ctid)
        # keeps it small; each image is then fetched by its ctid (OFFSET 0 keeps that a TID
        # lookup, not a join over the whole log) and decoded (keys, records, filters' ops)
        # row by row, while the branch applies the previous chunk.  A log row with an array
        # of images becomes one row per image, all with the log row's id.
        return sql.SQL("""
SELECT l.id, l.table_id, {op}, CASE l.table_id {keys} END, {row}, l.ts, {rec}, l.xid::text, w.xid_last
  FROM (SELECT l.ctid AS at, l.id, {xid_last} AS xid_last
          FROM replication.change_log l
         WHERE {rows}
           AND l.id > %(after)s
           AND l.table_id = ANY (%(tables)s::int[])
           {where}
         ORDER BY l.id) w
 CROSS JOIN LATERAL ({fetch} WHERE l.ctid = w.at OFFSET 0) l
 {chunk_where}
 ORDER BY w.id""").format(op=op, keys=sql.SQL(" ").join(key_cases), row=row, rec=rec, where=where,
                          rows=_window_rows(routed),
                          fetch=IMAGES if arrays else sql.SQL("SELECT * FROM replication.change_log l"),
                          chunk_where=chunk_where,
                          xid_last=sql.SQL("pg_catalog.max(l.id) OVER (PARTITION BY l.xid)")
                          if self.whole_transactions else sql.SQL("l.id"))

    def _predicate(self, t: Table, row_expr: sql.Composable) -> sql.Composable | None:
        if not t.filter:
            return None
        from .filters import jsonb_column, parse_filter, render   # sqlglot loads only when a filter exists
        flt = parse_filter(t.qualified, t.filter, t.hq_columns)
        return render(flt, self.params, jsonb_column(row_expr, t.hq_columns))

    # ------------------------------------------------------------- read
    def probe(self, conn: psycopg.Connection, prev: str) -> tuple[str, bool]:
        """HQ's current snapshot, and whether the log may hold changes of our tables since `prev`.

        This is what an idle branch costs HQ on every poll, so it is one statement of
        index probes (the window's range, then its late committers; by route for a branch
        login, see PROBE), with no cursor, no transaction block and no filter.  False means
        the window is surely empty; True only that it is worth reading.
        """
        self.know_login(conn)
        return conn.execute(PROBE if self.routed else PROBE_ALL, {"prev": prev, "tables": list(self.tables)}).fetchone()

    def late_xids(self, conn: psycopg.Connection, prev: str, cur: str) -> list[str]:
        """Transactions in progress at `prev` that have committed by `cur`."""
        return self._late_and_arrays(conn, prev, cur)[0]

    def _late_and_arrays(self, conn: psycopg.Connection, prev: str, cur: str
                         ) -> tuple[list[str], bool, list[str] | None]:
        """The late committers, whether the window holds an array of images (the partial
        index change_log_arrays makes that a probe of a tiny index), and the login's routes
        (None: no branch login), which the window's query takes as a value (see
        _window_rows)."""
        return conn.execute(LATE, {"prev": prev, "cur": cur, "tables": list(self.tables)}).fetchone()

    def window(self, conn: psycopg.Connection, prev: str, cur: str, after_id: int = 0
               ) -> Iterator[list[tuple]]:
        """Yield the window's rows in id order, in chunks of about chunk_rows that end with
        a whole log row (see _whole_log_rows); only the last chunk has fewer than chunk_rows.

        A named cursor needs a transaction on HQ, and an open transaction holds HQ's xmin
        (vacuum keeps every dead row newer than it): a branch back from a week offline must
        not hold it for the whole catch-up.  So a window is read in HQ transactions of at
        most CHUNKS_PER_TRANSACTION chunks, each going on after the last log id the one
        before read: the window's rows are committed and immutable, so the pieces are
        exactly the window, whatever the isolation level.
        """
        late, arrays, routes = self._late_and_arrays(conn, prev, cur)
        self.know_login(conn)
        query = self.query if arrays else self.plain_query
        if log.isEnabledFor(logging.DEBUG):
            log.debug("window query: %s", query.as_string(conn))
        try:
            while True:
                params = {"prev": prev, "cur": cur, "late": late, "after": after_id, "tables": list(self.tables),
                          "routes": routes}
                last = yield from self._piece(conn, query, params, arrays)
                if last is None:
                    return
                after_id = last
        except psycopg.DataError as e:
            filtered = [f"{t.qualified} ({t.filter})" for t in self.tables.values() if t.filter]
            if not filtered:
                raise
            raise ReplicatorError(
                f"reading the change log on HQ failed: {e.diag.message_primary}; a row filter HQ defines "
                f"cannot be evaluated on HQ's rows: {', '.join(filtered)}; fix it in hq.yaml and run "
                "`replicator hq install` (nothing was applied)") from e

    def _piece(self, conn: psycopg.Connection, query: sql.Composed, params: dict, arrays: bool):
        """One HQ transaction of a window: yields its chunks; returns the last log id read
        when it stopped at CHUNKS_PER_TRANSACTION full chunks (more may follow), None at the
        window's end."""
        with conn.transaction():
            window_settings(conn)
            # Binary results: records arrive as raw bytes, not hex text twice their size
            # (no hex encoding on HQ, no decoding here); ids and times as fixed-width fields.
            with conn.cursor(name="replicator_window", binary=True) as cur_:
                cur_.itersize = self.chunk_rows
                cur_.execute(query, params)
                if self.whole_transactions:
                    chunks = _whole_units(cur_, self.chunk_rows)
                elif arrays:
                    chunks = _whole_log_rows(cur_, self.chunk_rows)
                else:
                    chunks = _plain_chunks(cur_, self.chunk_rows)
                for n, rows in enumerate(chunks, 1):
                    yield rows
                    if len(rows) < self.chunk_rows:
                        return None
                    if n >= CHUNKS_PER_TRANSACTION:
                        return rows[-1][0]
        return None

# For the window's transaction only (SET LOCAL: a pooler in transaction mode hands the
# server connection to someone else afterwards): JIT compiles the window's query at a cost
# it never earns back on a big log; a window sorts (id, ctid) pairs, 1M of which fit in
# 64 MB where the default 4 MB spills; parallel workers would cost each poll ms to start.
WINDOW_SETTINGS = {"jit": "off", "work_mem": "64MB", "max_parallel_workers_per_gather": "0"}



def _window_rows(routed: bool) -> sql.Composable:
    """Which log rows are the window's: those of the range (by route for a branch login, see
    _BRANCH_ARMS) and the late committers'.  One scan's condition, not a union of scans: a
    catch-up's window then streams in id order off the primary key, with no sort of the
    whole window before its first row; a branch's window at the log's end is a BitmapOr of
    index ranges.  The routes come as a value (LATE reads them just before): the planner
    then knows how few of the log's rows they are.  Asked inside the query, they were a
    value it could not see, and once ANALYZE had seen the log it read the window's whole
    range off change_log_xid and dropped every other store's row."""
    rng = _RANGE.format(cur="%(cur)s::pg_snapshot")
    arms = [f"({arm.format(routes='%(routes)s::text[]')} AND {rng})"
            for arm in _BRANCH_ARMS] if routed else [f"({rng})"]
    return sql.SQL("({})").format(sql.SQL(" OR ".join(arms + ["l.xid = ANY (%(late)s::xid8[])"])))


def window_settings_sql(local: bool = True) -> sql.Composed:
    return sql.SQL("SELECT {}").format(sql.SQL(", ").join(
        sql.SQL("pg_catalog.set_config({}, {}, {})").format(sql.Literal(k), sql.Literal(v), sql.Literal(local))
        for k, v in WINDOW_SETTINGS.items()))


def window_settings(conn: psycopg.Connection, local: bool = True) -> None:
    conn.execute(window_settings_sql(local))


def _plain_chunks(cursor, size: int) -> Iterator[list[tuple]]:
    """One change per log row: any chunk ends with a whole one."""
    while True:
        rows = cursor.fetchmany(size)
        if rows:
            yield rows
        if len(rows) < size:
            return


def _whole_units(cursor, size: int) -> Iterator[list[tuple]]:
    """Chunks that end only where every source transaction begun in them is complete: each
    row carries its transaction's last id in the window (column 8)."""
    return _grown_chunks(cursor, size, end=8)


def _whole_log_rows(cursor, size: int) -> Iterator[list[tuple]]:
    """The cursor's rows in chunks of `size`, each grown to the end of its last log row.

    A position inside a window is a log id (the branch resumes after it), so a chunk must
    not end between two images of a bulk statement's log row: the rest would be skipped.
    """
    return _grown_chunks(cursor, size, end=0)


def _grown_chunks(cursor, size: int, end: int) -> Iterator[list[tuple]]:
    """Chunks of `size` rows, each grown while the next row's id is not past the largest
    row[end] in it (a row's own id: its log row stays whole; its transaction's last id: the
    transaction does).  Only the last chunk has fewer than `size` rows (the daemon knows
    the window's end so)."""
    rows: list[tuple] = []
    done = False

    def fetch(count: int) -> None:
        nonlocal done
        got = cursor.fetchmany(count)
        rows.extend(got)
        done = len(got) < count

    while True:
        if not done and len(rows) <= size:
            fetch(size + 1 - len(rows))     # one more: does the chunk go on?
        if done and len(rows) <= size:
            if rows:
                yield rows
            return
        cut, need = 0, 0
        while True:
            while cut < len(rows) and (cut < size or rows[cut][0] <= need):
                need = max(need, rows[cut][end])
                cut += 1
            if cut < len(rows) or done:
                break
            fetch(_TAIL_FETCH)
        chunk, rows = rows[:cut], rows[cut:]
        yield chunk


# The probe and the late committers' query, by name: the fleet benchmark (bench/fleet.py)
# runs exactly these, as a thousand branches would.
# The window's range: transactions that began after `prev` (its xmax) and are visible in
# `cur`.  Late committers (in progress at `prev`) are LATE's, by their xids.
_RANGE = ("l.xid >= pg_snapshot_xmax(%(prev)s::pg_snapshot) AND l.xid < pg_snapshot_xmax({cur}) "
          "AND pg_visible_in_snapshot(l.xid, {cur})")

# Routes (migration 012, routes.py): a branch login looks at the log rows without a route
# and at those of its own routes, each a range of change_log_route, not at every store's
# rows.  A session that is no branch login (no routes) reads the log as it is.  Windows
# come in both kinds (one text for both would cost every read the planning of both); a
# branch login's probe is replication.probe(), whose plans HQ keeps per session.
_BRANCH_ARMS = ("l.route IS NULL", "l.route = ANY ({routes})")

PROBE = "SELECT cur::text, news FROM replication.probe(%(prev)s::pg_snapshot, %(tables)s::int[])"
PROBE_ALL = """
SELECT s.cur::text,
       EXISTS (SELECT FROM replication.change_log l
                WHERE {range} AND l.table_id = ANY (%(tables)s::int[]))
       OR EXISTS (SELECT FROM pg_snapshot_xip(%(prev)s::pg_snapshot) x
                   WHERE pg_visible_in_snapshot(x, s.cur)
                     AND EXISTS (SELECT FROM replication.change_log l
                                  WHERE l.xid = x AND l.table_id = ANY (%(tables)s::int[])))
  FROM (SELECT pg_current_snapshot() AS cur) s""".format(range=_RANGE.format(cur="s.cur"))


def is_routed(conn: psycopg.Connection) -> bool:
    """Whether this login is a branch's (it has routes, maybe none), whose queries use them."""
    return conn.execute("SELECT replication.branch_routes() IS NOT NULL").fetchone()[0]


LATE = """
WITH late AS (SELECT ARRAY(SELECT x FROM pg_snapshot_xip(%(prev)s::pg_snapshot) x
                            WHERE pg_visible_in_snapshot(x, %(cur)s::pg_snapshot)) AS xids)
SELECT xids::text[],
       EXISTS (SELECT FROM replication.change_log l
                WHERE l.rows IS NOT NULL AND l.table_id = ANY (%(tables)s::int[])
                  AND ((l.xid >= pg_snapshot_xmax(%(prev)s::pg_snapshot)
                        AND l.xid < pg_snapshot_xmax(%(cur)s::pg_snapshot)
                        AND pg_visible_in_snapshot(l.xid, %(cur)s::pg_snapshot))
                       OR l.xid = ANY (xids))),
       replication.branch_routes()
  FROM late"""


# Rows fetched at a time while completing a chunk's last log row.
_TAIL_FETCH = 256


# One row per change of log row l: the log row itself, or one row per image when it holds
# a bulk statement's array of images (`chunked`; its op is in lower case there).  Callers
# add FROM's WHERE.
IMAGES = sql.SQL(
    "SELECT l.id, l.xid, l.table_id, l.ts, l.old_row, l.rows IS NOT NULL AS chunked, "
    "CASE WHEN l.rows IS NULL THEN l.op ELSE pg_catalog.upper(l.op::text)::\"char\" END AS op, "
    "pg_catalog.unnest(CASE WHEN l.rows IS NULL THEN ARRAY[l.row] ELSE l.rows END) AS row "
    "FROM replication.change_log l")


# Key types whose text depends on the writer's TimeZone: compared by value instead.
_ZONED = {"timestamp with time zone": sql.SQL("timestamptz"), "time with time zone": sql.SQL("timetz")}


def _key_part(t: Table, column: str) -> sql.Composable:
    """One key column's text, the same for every writer session (it only groups changes)."""
    text = sql.SQL("(l.row ->> {})").format(sql.Literal(column))
    zoned = _ZONED.get(t.hq_columns.get(column, ""))
    return sql.SQL("({}::pg_catalog.{})::text").format(text, zoned) if zoned else text


def _record_expr(t: Table) -> sql.Composable:
    """The row image as a binary record of the branch's columns, in the branch's order.

    HQ turns the image's text values into typed fields (the work the branch would
    otherwise do parsing JSON), and the branch receives them with the types'
    binary input: about a third less branch CPU per change than a JSON array.
    Every value is read back with its type's input function from the text
    capture stored, so the result equals jsonb_populate_record's.
    """
    fields = sql.SQL(", ").join(
        sql.SQL("(l.row OPERATOR(pg_catalog.->>) {})::{}").format(sql.Literal(c), sql.SQL(t.hq_columns[c]))
        for c in t.columns)
    return sql.SQL("pg_catalog.record_send(ROW({}))").format(fields)


def _key_expr(t: Table) -> sql.Composable:
    if len(t.key_columns) == 1:
        return _key_part(t, t.key_columns[0])
    parts = sql.SQL(", ").join(_key_part(t, k) for k in t.key_columns)
    return sql.SQL("pg_catalog.jsonb_build_array({})::text").format(parts)


class Prefetch:
    """Read the next chunk from HQ while the current one is applied on the branch.

    Reading (HQ, network) and applying (branch) are independent: a thread runs
    the window generator into a small queue, so both servers work at once.  The
    thread also runs `transform` on each chunk (the applier's reduction), so the
    Python work for chunk N+1 overlaps the branch executing chunk N.  The
    HQ connection belongs to the thread until the context exits; an error in the
    thread (HQ gone) is raised in the consumer; leaving early stops the thread
    and closes the window's transaction on HQ.
    """

    _END = object()

    def __init__(self, chunks: Iterator[list[tuple]], depth: int = 2, transform=None):
        self.chunks = chunks
        self.transform = transform
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="replicator-reader", daemon=True)

    def __enter__(self) -> Iterator[list[tuple]]:
        self.thread.start()
        return self._consume()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)     # unblock a producer waiting to put
            except queue.Empty:
                pass
        self.thread.join()

    def _produce(self) -> None:
        try:
            for rows in self.chunks:
                if not self._put(self.transform(rows) if self.transform else rows):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(e)
        finally:
            close = getattr(self.chunks, "close", None)
            if close:
                close()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _consume(self) -> Iterator[list[tuple]]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
