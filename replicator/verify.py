"""`replicator verify`: prove that the branch holds exactly HQ's rows, and
`--repair` the rows that differ.

What is compared: for every initialized table, HQ's rows inside the branch's
row filter against the branch's rows, over the columns the branch writes
(``Table.columns``: excluded columns and extra local columns are left out).
A row's canonical text is ``ROW(cols)::text`` in a session with fixed output
settings (UTC, ISO dates, ...): ``bind_target`` guarantees equal column types,
so equal rows print equally on both servers.

How, without shipping a million rows and without false alarms while the
replicator and HQ keep writing:

1. **Buckets.**  Each side hashes its rows inside the database into buckets
   of the primary key (``hash(key text) mod N``, computed identically on both
   sides; no key ordering, so collations do not matter) and returns, per
   bucket, the row count and the sum of 64-bit row hashes.  Both sides run in
   parallel; only N small rows travel.
2. **Narrowing.**  For the buckets that differ, each side lists key and row
   hash; comparing the lists names the candidate keys (missing on the
   branch, extra on the branch, different).
3. **Settling.**  The first pass is not a consistent cut: a candidate may be
   a change in flight.  Verify waits (up to ``wait`` seconds, only while a
   replicator is running) for the branch position to cover an HQ snapshot
   taken after the first pass, then re-checks the candidates at a consistent
   point: it locks ``replication.position`` (apply pauses for milliseconds),
   reads the branch rows and position P, releases, and reads HQ at a
   REPEATABLE READ snapshot S together with the keys that have changes in
   (P, S] that the stream will still apply (same rules as the reader: row
   filter, the table's copy snapshot).  A key that differs and has no such
   change is a real difference: HQ's row at S is HQ's row at P, which the
   branch should hold.  A key with such a change is still in flight; verify
   waits for the position to pass S and re-checks it, and reports it as
   "pending" if the branch does not catch up in time.

The row hash is ``hashtextextended`` (fast; 64 bits).  It is portable between
PostgreSQL versions but hashes bytes in machine word order, so verify first
checks that both servers hash a probe string alike and otherwise falls back
to ``md5`` (about 3x slower).
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
from psycopg import pq, sql

from . import aside, locks, state
from . import stream as stream_mod
from .config import BranchConfig
from .errors import NotInitialized
from .filters import jsonb_column, parse_filter, render, render_for_any_branch
from .reader import IMAGES, covers, current_snapshot
from .schema import Table, bind_target
from .verify_report import RepairReport, TableReport, VerifyReport, sort_keys

log = logging.getLogger(__name__)

CHUNK_KEYS = 10_000        # keys per re-check / repair statement

# Output settings that make ROW(...)::text identical on both servers.
# A row's text form depends on these, so both sides hash with the same ones.  They are set
# for each transaction that hashes (set_config(..., true)), never for the session: an HQ
# behind PgBouncer in transaction pooling runs each transaction on any server connection.
SETTINGS = {"DateStyle": "ISO, YMD", "IntervalStyle": "postgres", "TimeZone": "UTC",
            "extra_float_digits": "1", "bytea_output": "hex", "lc_monetary": "C"}
_SETTINGS_SQL = sql.SQL("SELECT {}").format(sql.SQL(", ").join(
    sql.SQL("pg_catalog.set_config({}, {}, true)").format(sql.Literal(k), sql.Literal(v))
    for k, v in SETTINGS.items()))
PROBE = "replicator verify probe: Ñandú ✓ 0123456789"
HASH = "auto"              # "md5" forces the portable row hash (tests use it)


# ------------------------------------------------------------------ entry points

def verify(cfg: BranchConfig, named: list[str] | None = None, wait: float = 60.0) -> VerifyReport:
    """Compare HQ and the branch, table by table; see the module docstring."""
    return _verify(_Context(cfg, named or [], "replicator verify"), wait)


def verify_uploads(cfg: BranchConfig, wait: float = 60.0) -> VerifyReport | None:
    """Compare the branch's upload tables with its slice at HQ (None: it uploads nothing).
    Rows of other branches are outside the slice, so never "extra"."""
    ctx = _UploadContext(cfg, [], "replicator verify")
    return _verify(ctx, wait) if ctx.uploads_selected() else None


def _verify(ctx: "_Context", wait: float) -> VerifyReport:
    started = time.monotonic()
    cfg = ctx.cfg
    with ctx:
        report = VerifyReport(cfg.branch, replicator_running=ctx.replicator_running())
        compared = {t.id for t in ctx.tables}
        candidates = {}
        for t in ctx.all_tables:
            tr = TableReport(t.qualified, t.catalog, "not initialized", key_columns=list(t.key_columns),
                             direction=ctx.direction)
            report.tables.append(tr)
            if t.id in compared:
                candidates[t.id] = ctx.first_pass(t, tr)
        candidates = {tid: c for tid, c in candidates.items() if c}
        if candidates:
            report.caught_up = _settle(ctx, candidates, report, wait)
        for tr, t in zip(report.tables, ctx.all_tables):
            if t.id in compared:
                tr.status = "different" if tr.keys() else "equal"
    report.seconds = time.monotonic() - started
    return report


def repair(cfg: BranchConfig, report: VerifyReport) -> RepairReport:
    """Re-copy the catalog rows `report` found different (see `_repair`)."""
    return _repair(_Context(cfg, sorted({tr.catalog for tr in report.tables if tr.keys()}),
                            "replicator verify --repair"), report)


def repair_uploads(cfg: BranchConfig, report: VerifyReport) -> RepairReport:
    """Re-send the branch's rows that HQ's slice lacks or holds otherwise, and delete the
    slice's rows the branch does not have: inside the slice only (row-level security)."""
    return _repair(_UploadContext(cfg, [], "replicator verify --repair"), report)


def _repair(ctx: "_Context", report: VerifyReport) -> RepairReport:
    """Re-copy the rows `report` found different, in ONE branch transaction.

    Coordination with a running replicator: the transaction takes init's
    advisory lock and locks ``replication.position`` FOR UPDATE, so apply
    waits; the HQ snapshot S is taken after the lock, in REPEATABLE READ.
    Only keys with *no* change in (P, S] that the stream will still apply
    are re-copied (P: the locked branch position).  For those, HQ's row at S
    is HQ's row at P, so after the repair the branch is again exactly HQ as
    of its position, and the position needs no change.

    Keys that do have such a change are left to the stream on purpose:
    every change carries a full row image (upsert or delete), so applying
    them overwrites whatever the branch holds and converges on HQ's row.
    Copying them at S instead would put the branch ahead of its position
    for those keys; the stream would then re-apply older images over the
    newer copy, regressing the row until it passes S.  That also converges,
    but shows rows out of order meanwhile; leaving them costs nothing.
    Re-copied rows are deleted and inserted (so a local extra column gets
    its default, as after init), with ``session_replication_role = replica``.
    """
    started = time.monotonic()
    out = RepairReport()
    todo = {tr.table: tr.keys() for tr in report.tables if tr.keys()}
    if not todo:
        return out
    with ctx:
        tables = [t for t in ctx.tables if t.qualified in todo]
        branch, hq = ctx.branch, ctx.hq
        with branch.transaction():
            branch.execute("SET LOCAL session_replication_role = replica")
            locks.copy(branch, ctx.stream.name)
            pos = state.load_position(branch, ctx.stream.name, lock=True)
            copies = _copy_snapshots(branch, ctx.stream.name)
            with hq.transaction():
                hq.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                out.snapshot = current_snapshot(hq)
                for t in tables:
                    busy, truncated = ctx.pending_keys(t, pos.snapshot, out.snapshot, copies.get(t.qualified))
                    keys = [] if truncated else [k for k in todo[t.qualified] if k not in busy]
                    if t.sliced:
                        # a key set aside at HQ (another branch's, outside the slice) stays set aside
                        held = _set_aside_keys(branch, ctx.stream.name, t)
                        keys = [k for k in keys if _stream_key(t, k) not in held]
                    left = len(todo[t.qualified]) - len(keys)
                    if left:
                        out.left_to_stream[t.qualified] = left
                    if keys:
                        ctx.recopy(t, keys)
                        out.repaired[t.qualified] = len(keys)
                        if not t.sliced:
                            _clear_repaired(branch, ctx.stream.name, t, keys)
                        log.info("%s: re-copied %d rows at HQ snapshot %s", t.qualified, len(keys), out.snapshot)
    out.seconds = time.monotonic() - started
    return out


# ------------------------------------------------------------------ settling

def _settle(ctx: "_Context", candidates: dict[int, dict], report: VerifyReport, wait: float) -> bool:
    """Re-check candidate keys at consistent points until none is in flight or time runs out.

    Returns True when the branch caught up with every snapshot waited for.
    """
    deadline = time.monotonic() + wait
    target = current_snapshot(ctx.hq)
    caught_up = True
    by_id = {t.id: t for t in ctx.tables}
    reports = {tr.table: tr for tr in report.tables}
    while True:
        caught_up = ctx.wait_for(target, deadline) and caught_up
        confirmed, in_flight, target = ctx.recheck(candidates)
        for tid, kinds in confirmed.items():
            tr = reports[by_id[tid].qualified]
            for kind, keys in kinds.items():
                getattr(tr, kind).extend(sort_keys(keys))
        candidates = {tid: keys for tid, keys in in_flight.items() if keys}
        if not candidates:
            return caught_up
        if time.monotonic() >= deadline or not ctx.replicator_running():
            for tid, keys in candidates.items():
                reports[by_id[tid].qualified].pending.extend(sort_keys(keys))
            return False


# ------------------------------------------------------------------ context

class _Context:
    """Both connections, the tables to compare, and the SQL to hash them."""

    direction = "catalogs"

    def __init__(self, cfg: BranchConfig, named: list[str], app: str):
        self.cfg = cfg
        self.named = named
        self.stream = self._stream(cfg)
        self.ends = stream_mod.Ends(self.stream, app)

    @staticmethod
    def _stream(cfg: BranchConfig) -> stream_mod.Stream:
        return stream_mod.catalogs(cfg)

    def __enter__(self) -> "_Context":
        self.ends.__enter__()
        self.hq, self.branch = self.ends.source, self.ends.target
        try:
            self._load()
        except BaseException:
            self.ends.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.ends.close()

    def _load(self) -> None:
        stream_mod.require_capture(self.hq, self.stream)
        state.require_current(self.branch)
        if state.load_position(self.branch, self.stream.name) is None:
            raise NotInitialized(f"branch {self.cfg.branch} has no position yet; run `replicator init -c "
                                 f"{self.cfg.path}` first")
        sel = stream_mod.resolve(self.hq, self.stream, self.cfg, stream_mod.only_named(self.cfg, self.named))
        self.params = sel.params
        self.all_tables = sel.tables
        states = state.table_states(self.branch, self.stream.name)
        self.tables = [t for t in self.all_tables
                       if t.qualified in states and states[t.qualified].initialized_at is not None]
        bind_target(self.branch, self.tables)
        self._hashing_setup()

    def _hashing_setup(self) -> None:
        encodings = {c.execute("SHOW server_encoding").fetchone()[0] for c in (self.hq, self.branch)}
        # Servers in different encodings hold the same text as different bytes: hash its UTF-8 form
        # (and the probe's characters may not exist in the branch's encoding).
        self.as_utf8 = len(encodings) > 1
        probe = [None] if self.as_utf8 else [
            c.execute("SELECT hashtextextended(%s, 0)", (PROBE,)).fetchone()[0] for c in (self.hq, self.branch)]
        self.fast_hash = HASH == "auto" and not self.as_utf8 and probe[0] == probe[1]
        if not self.fast_hash:
            log.info("HQ and branch hash text differently (byte order or encoding); using md5")

    # ---------------------------------------------------------- SQL pieces
    def _hash(self, text: sql.Composable, seed: int) -> sql.Composable:
        if self.fast_hash:
            return sql.SQL("pg_catalog.hashtextextended({}, {})").format(text, sql.Literal(seed))
        if self.as_utf8:
            text = sql.SQL("pg_catalog.convert_to({}, 'UTF8')").format(text)
            seeded = sql.SQL("({} OPERATOR(pg_catalog.||) {})").format(
                sql.SQL("pg_catalog.convert_to({}, 'UTF8')").format(sql.Literal(str(seed))), text)
        else:
            seeded = sql.SQL("({} || {})").format(sql.Literal(str(seed)), text)
        return sql.SQL("('x' || pg_catalog.substr(pg_catalog.md5({}), 1, 16))::bit(64)::bigint").format(seeded)

    @staticmethod
    def _row_text(cols: list[str]) -> sql.Composable:
        return sql.SQL('(ROW({})::text COLLATE "C")').format(sql.SQL(", ").join(map(sql.Identifier, cols)))

    def row_hash(self, t: Table) -> sql.Composable:
        return self._hash(self._row_text(t.columns), 0)

    def bucket(self, t: Table, n: int) -> sql.Composable:
        return sql.SQL("({} & {})").format(self._hash(self._row_text(t.key_columns), 1), sql.Literal(n - 1))

    @staticmethod
    def key_text(t: Table, column=sql.Identifier) -> sql.Composable:
        """The key as JSON object text, built from typed values in our fixed session settings:
        equal on HQ, on the branch and for change-log images, whatever the writer's settings."""
        return sql.SQL("pg_catalog.jsonb_build_object({})::text").format(
            sql.SQL(", ").join(sql.SQL("{}, {}").format(sql.Literal(k), column(k)) for k in t.key_columns))

    @staticmethod
    def source(t: Table, side: str) -> sql.Composable:
        return t.ident if side == "branch" else t.hq_source

    def where(self, t: Table, side: str) -> sql.Composable:
        """HQ rows outside the branch's filter are not the branch's business."""
        if side == "branch" and t.sliced:
            # the slice, as row-level security confines a branch login to it: stated here as
            # well, so a login RLS does not bind (a table owner) never sees others' rows as extra
            flt = parse_filter(t.qualified, t.owner, t.hq_columns)
            return sql.SQL("({}) IS TRUE").format(render_for_any_branch(flt, sql.Identifier))
        if side == "branch" or not t.filter:
            return sql.SQL("true")
        flt = parse_filter(t.qualified, t.filter, t.hq_columns)
        return sql.SQL("({}) IS TRUE").format(render(flt, self.params, sql.Identifier))

    @staticmethod
    def key_match(t: Table) -> sql.Composable:
        """`key IN (keys passed as a JSON array of key objects)`, each value cast to its column's type."""
        keys = sql.SQL(", ").join(map(sql.Identifier, t.key_columns))
        col = jsonb_column(sql.SQL("k.e"), t.hq_columns)
        return sql.SQL("({k}) IN (SELECT {v} FROM pg_catalog.jsonb_array_elements(%s::jsonb) AS k(e))").format(
            k=keys, v=sql.SQL(", ").join(col(k) for k in t.key_columns))

    # ---------------------------------------------------------- passes
    def _both(self, query_for) -> tuple[list, list]:
        """Run a query on HQ and on the branch at the same time (each its own server)."""
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(lambda c, s: _hashing(c, *query_for(s)), conn, side)
                    for conn, side in ((self.hq, "hq"), (self.branch, "branch"))]
            return futs[0].result(), futs[1].result()

    def buckets_for(self, t: Table) -> int:
        """About 256 rows per bucket (from HQ's statistics), 16 to 65536 buckets."""
        est = self.hq.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(format('%%I.%%I', %s::text, "
                              "%s::text))", (t.schema, t.name)).fetchone()
        n = 1024 * 256 if est is None or est[0] < 0 else int(est[0])
        return 1 << max(4, min(16, (n // 256).bit_length()))

    def first_pass(self, t: Table, tr: TableReport) -> dict[str, tuple]:
        """Bucket sums, then key lists of differing buckets: {key: (hq hash, branch hash)}."""
        n = self.buckets_for(t)
        hq_b, br_b = self._both(lambda side: (sql.SQL(
            "SELECT b, count(*), sum(h) FROM (SELECT {b} AS b, {h} AS h FROM {t} WHERE {w}) s GROUP BY b").format(
            b=self.bucket(t, n), h=self.row_hash(t), t=self.source(t, side), w=self.where(t, side)),))
        hq_b = {b: (c, s) for b, c, s in hq_b}
        br_b = {b: (c, s) for b, c, s in br_b}
        tr.hq_rows = sum(c for c, _ in hq_b.values())
        tr.branch_rows = sum(c for c, _ in br_b.values())
        differ = sorted(b for b in set(hq_b) | set(br_b) if hq_b.get(b) != br_b.get(b))
        log.info("%s: %d HQ rows, %d branch rows, %d of %d buckets differ", t.qualified, tr.hq_rows,
                 tr.branch_rows, len(differ), n)
        if not differ:
            return {}
        hq_k, br_k = self._both(lambda side: (sql.SQL(
            "SELECT {k}, {h} FROM {t} WHERE {b} = ANY(%s::int[]) AND {w}").format(
            k=self.key_text(t), h=self.row_hash(t), t=self.source(t, side), b=self.bucket(t, n), w=self.where(t, side)),
            (differ,)))
        return _diff(dict(hq_k), dict(br_k))

    def rows_for_keys(self, conn: psycopg.Connection, t: Table, side: str, keys: list[str]) -> dict[str, int]:
        out = {}
        q = sql.SQL("SELECT {k}, {h} FROM {t} WHERE {m} AND {w}").format(
            k=self.key_text(t), h=self.row_hash(t), t=self.source(t, side), m=self.key_match(t), w=self.where(t, side))
        for chunk in _chunks(keys):
            out.update(_hashing(conn, q, (self._key_objects(t, chunk),)))
        return out

    @staticmethod
    def _key_objects(t: Table, keys: list[str]) -> str:
        return "[" + ",".join(keys) + "]"    # key texts are JSON objects already: no float round trip

    def recheck(self, candidates: dict[int, dict]) -> tuple[dict, dict, str]:
        """Compare candidate keys (per table id) at a consistent point.

        Returns ({table id: {kind: keys}} confirmed, {table id: keys} still in flight, the HQ snapshot).
        """
        by_id = {t.id: t for t in self.tables}
        with self.branch.transaction():
            pos = state.load_position(self.branch, self.stream.name, lock=True)   # apply waits while we read
            copies = _copy_snapshots(self.branch, self.stream.name)
            branch_rows = {tid: self.rows_for_keys(self.branch, by_id[tid], "branch", list(keys))
                           for tid, keys in candidates.items()}
        confirmed, in_flight = {}, {}
        with self.hq.transaction():
            self.hq.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            snap = current_snapshot(self.hq)
            for tid, keys in candidates.items():
                t = by_id[tid]
                hq_rows = self.rows_for_keys(self.hq, t, "hq", list(keys))
                differ = _diff(hq_rows, branch_rows[tid], among=keys)
                busy, truncated = self.pending_keys(t, pos.snapshot, snap, copies.get(t.qualified))
                in_flight[tid] = {k: v for k, v in differ.items() if truncated or k in busy}
                confirmed[tid] = _classify({k: v for k, v in differ.items() if k not in in_flight[tid]})
        return confirmed, in_flight, snap

    def pending_keys(self, t: Table, position: str, snap: str, copy: str | None) -> tuple[set[str], bool]:
        """Keys of `t` with changes in (position, snap] that the stream will still apply,
        and whether a TRUNCATE is among them.  Mirrors reader.LogReader's rules."""
        cond = [sql.SQL("true")]
        if t.filter:
            flt = parse_filter(t.qualified, t.filter, t.hq_columns)
            new = render(flt, self.params, jsonb_column(sql.SQL("l.row"), t.hq_columns))
            old = render(flt, self.params, jsonb_column(sql.SQL("l.old_row"), t.hq_columns))
            cond = [sql.SQL("(l.op = 'T' OR ({new}) IS TRUE"
                            " OR (l.op = 'U' AND (l.old_row IS NULL OR ({old}) IS TRUE)))").format(new=new, old=old)]
        if copy:
            cond.append(sql.SQL("NOT pg_visible_in_snapshot(l.xid, {}::pg_snapshot)").format(sql.Literal(copy)))
        col = jsonb_column(sql.SQL("l.row"), t.hq_columns)
        q = sql.SQL("""
SELECT DISTINCT CASE WHEN l.op = 'T' THEN NULL ELSE {key} END
  FROM ({images}
         WHERE l.table_id = %(tid)s
           AND l.xid >= pg_snapshot_xmin(%(prev)s::pg_snapshot) AND l.xid < pg_snapshot_xmax(%(cur)s::pg_snapshot)
           AND pg_visible_in_snapshot(l.xid, %(cur)s::pg_snapshot)
           AND NOT pg_visible_in_snapshot(l.xid, %(prev)s::pg_snapshot)) l
 WHERE {cond}""").format(key=self.key_text(t, col), cond=sql.SQL(" AND ").join(cond), images=IMAGES)
        rows = self.hq.execute(q, {"tid": t.id, "prev": position, "cur": snap}).fetchall()
        keys = {r[0] for r in rows}
        truncated = None in keys
        keys.discard(None)
        return keys, truncated

    # ---------------------------------------------------------- waiting
    def replicator_running(self) -> bool:
        """Is a `replicator run` holding this branch's lock?"""
        return locks.run_holder(self.branch, self.stream.name) is not None

    def wait_for(self, target: str, deadline: float) -> bool:
        """Wait until the branch position covers `target`; False on timeout or no replicator."""
        while True:
            pos = state.load_position(self.branch, self.stream.name)
            if pos.window_snapshot is None and covers(self.hq, pos.snapshot, target):
                return True
            if time.monotonic() >= deadline or not self.replicator_running():
                return False
            time.sleep(0.1)

    # ---------------------------------------------------------- repair
    def recopy(self, t: Table, keys: list[str]) -> None:
        """Delete `keys` on the branch and insert HQ's rows for them (caller holds both transactions)."""
        cols = sql.SQL(", ").join(map(sql.Identifier, t.columns))
        fetch = sql.SQL("SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.to_jsonb(s)), '[]')::text "
                        "FROM (SELECT {c} FROM {t} WHERE {m} AND {w}) s").format(
            c=cols, t=t.hq_source, m=self.key_match(t), w=self.where(t, "hq"))
        # the target's own condition as well: an upload's slice (whatever the login), purges kept
        delete = sql.SQL("DELETE FROM {t} WHERE {m} AND {w}").format(t=t.ident, m=self.key_match(t),
                                                                     w=self.where(t, "branch"))
        overriding = sql.SQL("OVERRIDING SYSTEM VALUE ") if t.identity_always else sql.SQL("")
        insert = sql.SQL("INSERT INTO {t} ({c}) {o}SELECT {c} FROM pg_catalog.jsonb_populate_recordset(NULL::{t}, "
                         "%s::jsonb)").format(t=t.ident, c=cols, o=overriding)

        def copy(chunk: list[str]) -> None:
            objs = self._key_objects(t, chunk)
            rows = self.hq.execute(fetch, (objs,)).fetchone()[0]
            self.branch.execute(delete, (objs,))
            self.branch.execute(insert, (rows,))
        for chunk in _chunks(keys):
            if not t.sliced:
                copy(chunk)
                continue
            try:
                with self.branch.transaction():
                    copy(chunk)
            except psycopg.Error as e:
                if not aside.about_one_row(e, sliced=True):
                    raise
                for key in chunk:        # HQ refuses one of them (another branch's key ...): the rest go
                    try:
                        with self.branch.transaction():
                            copy([key])
                    except psycopg.Error as e1:
                        if not aside.about_one_row(e1, sliced=True):
                            raise
                        log.warning("%s key %s not repaired: HQ refused it (%s)", t.qualified, key,
                                    e1.diag.message_primary)


class _UploadContext(_Context):
    """The same comparison for the branch's upload stream: the branch is the source, HQ's
    slice the target ("hq"/"branch" in _Context read as source/target)."""

    direction = "uploads"

    @staticmethod
    def _stream(cfg: BranchConfig) -> stream_mod.Stream:
        from . import uploads
        return uploads.stream(cfg)

    def uploads_selected(self) -> bool:
        from . import uploads
        with stream_mod.Ends(self.stream, "replicator verify") as ends:
            return bool(uploads.select(self.cfg, uploads.offered(ends.target)))

    def _load(self) -> None:
        from . import db, purge, uploads
        db.require_version(self.branch, "target", "HQ")
        if state.load_position(self.branch, self.stream.name) is None:
            raise NotInitialized(f"uploads of branch {self.cfg.branch} are not initialized; run `replicator init "
                                 f"-c {self.cfg.path}` first")
        ups = uploads.offered(self.branch)
        self.params = {}
        self.all_tables = uploads.tables_for(self.hq, self.branch, [ups[n] for n in uploads.select(self.cfg, ups)])
        states = state.table_states(self.branch, self.stream.name)
        self.tables = [t for t in self.all_tables
                       if t.qualified in states and states[t.qualified].initialized_at is not None]
        self.spared = {t.id: purge.spared(self.hq, t.schema, t.name) for t in self.tables}
        self._hashing_setup()

    def where(self, t: Table, side: str) -> sql.Composable:
        """Without what the branch purged, on both sides: at HQ it is HQ's record now, not
        "extra"; at the branch a late row a purge covers is not the slice's business."""
        base = super().where(t, side)
        keep = self.spared.get(t.id)
        return base if keep is None else sql.SQL("({} AND NOT coalesce({}, false))").format(base, keep)

    def replicator_running(self) -> bool:
        """The upload stream's run lock is on the branch, its source."""
        return locks.run_holder(self.hq, self.stream.name) is not None


# ------------------------------------------------------------------ helpers

def _hashing(conn: psycopg.Connection, query: sql.Composable, params=None) -> list[tuple]:
    """Run a query that hashes rows' text with SETTINGS, in the caller's transaction or its own."""
    if conn.info.transaction_status == pq.TransactionStatus.IDLE:
        with conn.transaction():
            conn.execute(_SETTINGS_SQL)
            return conn.execute(query, params).fetchall()
    conn.execute(_SETTINGS_SQL)
    return conn.execute(query, params).fetchall()


def _copy_snapshots(branch: psycopg.Connection, stream: str) -> dict[str, str | None]:
    return {name: st.copy_snapshot for name, st in state.table_states(branch, stream).items()}


def _stream_key(t: Table, key: str) -> str:
    """verify's key (a JSON object of typed values) as the change stream writes keys, the
    form of replication.set_aside.key: the value's text for one key column, a JSON array of
    texts for several.  A type whose JSON and text forms differ (timestamps) does not match;
    repair's per-key fallback then keeps such a row out (recopy)."""
    values = json.loads(key, parse_float=str)

    def text(v) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else str(v)
    parts = [text(values[c]) for c in t.key_columns]
    return parts[0] if len(parts) == 1 else json.dumps(parts, ensure_ascii=False)


def _clear_repaired(conn: psycopg.Connection, stream: str, t: Table, keys: list[str]) -> None:
    """A waiting change of a key repair just copied from HQ is superseded by HQ's row (no
    change of the key is pending: repair skips those), so it waits no more."""
    if not aside.has_table(conn):
        return
    gone = conn.execute("DELETE FROM replication.set_aside WHERE stream = %s AND schema_name = %s "
                        "AND table_name = %s AND key = ANY (%s)",
                        (stream, t.schema, t.name, [_stream_key(t, k) for k in keys])).rowcount
    if gone:
        log.info("%s: %d set-aside change%s superseded by the repaired rows", t.qualified, gone, "s" * (gone != 1))


def _set_aside_keys(conn: psycopg.Connection, stream: str, t: Table) -> set[str]:
    return {k for (k,) in conn.execute(
        "SELECT key FROM replication.set_aside WHERE stream = %s AND schema_name = %s AND table_name = %s",
        (stream, t.schema, t.name))}


def _diff(hq: dict, branch: dict, among=None) -> dict[str, tuple]:
    keys = among if among is not None else set(hq) | set(branch)
    return {k: (hq.get(k), branch.get(k)) for k in keys if hq.get(k) != branch.get(k)}


def _classify(differ: dict[str, tuple]) -> dict[str, list[str]]:
    out = {"missing": [], "extra": [], "different": []}
    for k, (h, b) in differ.items():
        out["missing" if b is None else "extra" if h is None else "different"].append(k)
    return out


def _chunks(keys: list[str]):
    keys = list(keys)
    for i in range(0, len(keys), CHUNK_KEYS):
        yield keys[i:i + CHUNK_KEYS]
