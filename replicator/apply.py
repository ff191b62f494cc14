"""Apply chunks of changes to a branch, set-based, inside the caller's transaction.

A chunk is reduced per table to the last change of each key (a row image
is the whole row, so the last one wins), with TRUNCATE as a barrier; then
each table gets at most one DELETE, one plain INSERT (keys whose only change in
the chunk is HQ's INSERT) and one INSERT ... ON CONFLICT.  If a set-based
statement trips a unique constraint that only holds in HQ's statement order,
or a key HQ inserted is already here, every key the chunk touched in that
table is deleted and the final images inserted again.

A chunk a table refuses (a row breaks a branch-only constraint or does not fit) is
applied again key by key, each in a savepoint: what the branch refuses is set aside
(aside.py) and the rest is written; keys already waiting go that way too, in order.  A change set
aside as a binary record is kept as the JSON image it holds (names, not positions),
so the DBA's fix may change the table's columns and the retry still reads it.

Images reach the statements in one of two forms: binary records built on HQ
(tables whose columns are all of built-in types and match the branch's row
type, see schema._record_type), read with the types' binary input; otherwise
a JSON array of the captured images, read with json_populate_recordset.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from itertools import chain
from typing import Iterator

import psycopg
from psycopg import pq, sql
from psycopg.adapt import Dumper

from . import aside
from .errors import ReplicatorError
from .filters import parse_filter, render_for_any_branch
from .schema import Table

log = logging.getLogger(__name__)


@dataclass
class ApplyStats:
    rows: int = 0
    upserts: int = 0
    deletes: int = 0
    truncates: int = 0
    set_aside: int = 0       # changes the branch refused, now waiting
    cleared: int = 0         # waiting keys a newer change (or a retry) wrote
    tables: set = field(default_factory=set)


class _Pending:
    """The reduced effect of a chunk on one table, with its statement payloads."""

    __slots__ = ("truncate", "last", "deletes", "inserts", "upserts", "counts")

    def __init__(self):
        self.truncate = False
        self.last: dict[str, tuple[str, str]] = {}   # key -> (op, row)
        # The statements' parameters: images as a JSON array, or an array of binary records.
        self.deletes = self.inserts = self.upserts = None
        self.counts = (0, 0, 0)

    def add(self, op: str, key: str, row: str) -> None:
        if op == "T":
            self.truncate = True
            self.last.clear()
            return
        if op not in ("I", "U", "D"):
            # The log has no CHECK on op (migration 016): this is where an unknown one stops.
            raise ReplicatorError(f"the change log holds an operation this replicator does not know "
                                  f"({op!r}); upgrade it to the release that installed the log")
        earlier = self.last.pop(key, None)      # keep dict order = order of last change
        if op == "I" and earlier is not None:
            op = "U"     # e.g. deleted then inserted again: the row may still be on the branch
        self.last[key] = (op, row)

    def split(self, payload) -> None:
        """Deletes; inserts of keys HQ created (absent here, so a plain INSERT: a third cheaper
        than ON CONFLICT; should one exist after all, the unique-violation path repairs it);
        upserts for the rest."""
        parts = {"D": [], "I": [], "U": []}
        for op, row in self.last.values():
            parts[op].append(row)
        self.counts = (len(parts["D"]), len(parts["I"]), len(parts["U"]))
        self.deletes, self.inserts, self.upserts = (payload(parts[op]) if parts[op] else None for op in "DIU")


@dataclass
class Batch:
    """A chunk of the log reduced to what the branch must do, ready to execute."""
    rows: list[tuple]
    pending: dict[int, _Pending]

    @property
    def last_id(self) -> int:
        return self.rows[-1][0]

    @property
    def newest(self):
        """Commit time of the newest change in the chunk (for lag and applied_until)."""
        return max((r[5] for r in self.rows), default=None)


class Applier:
    """Prepared statements per table for one target connection and stream."""

    def __init__(self, conn: psycopg.Connection, stream: str, tables: list[Table], slice_of: str | None = None):
        self.conn = conn
        self.stream = stream
        # The member whose slice this login writes (uploads into HQ): HQ's row-level security
        # refuses rows outside it, and those are set aside like any refused row.
        self.slice_of = slice_of
        self.tables = {t.id: t for t in tables}
        self.sql = {t.id: _statements(t, bool(t.record_type)) for t in tables}
        self.payload = {t.id: _record_array(t.record_type) if t.record_type else _json_array for t in tables}
        self._json_sql: dict[int, dict[str, sql.Composed]] = {}   # record tables' statements for JSON images
        conn.adapters.register_dumper(Records, _RecordsDumper)
        self.waiting: dict[int, set[str]] = {}     # table id -> keys set aside (load_waiting)

    def load_waiting(self) -> None:
        have = aside.keys_by_table(self.conn, self.stream)
        self.waiting = {tid: have[(t.schema, t.name)] for tid, t in self.tables.items() if (t.schema, t.name) in have}

    def prepare_session(self) -> None:
        """Replica role: FKs and user triggers (incl. read-only guards) stay quiet."""
        self.conn.execute("SET session_replication_role = replica")

    def reduce(self, rows: list[tuple]) -> Batch:
        """rows: (id, table_id, op, key, row, ts, record, xid) in id order, to the last change per key.

        Pure Python with no database access, so the reader thread runs it for the
        next chunk while the branch is still executing the current one.
        """
        pending: dict[int, _Pending] = {}
        for _id, tid, op, key, row, _ts, rec, *_xid in rows:
            p = pending.get(tid)
            if p is None:
                p = pending[tid] = _Pending()
            p.add(op, key, row if rec is None else rec)
        for tid, p in pending.items():
            p.split(self.payload[tid])
        return Batch(rows, pending)

    def apply(self, batch: Batch | list[tuple], hold_unique: bool = False) -> ApplyStats:
        """Execute a reduced chunk (or reduce and execute rows). Caller owns the transaction.

        hold_unique: a unique violation is raised, not set aside (the daemon then applies
        the chunk together with the next one: it may end inside an HQ statement whose rows
        are unique only all together)."""
        if not isinstance(batch, Batch):
            batch = self.reduce(batch)
        stats = ApplyStats(rows=len(batch.rows))
        for tid in batch.pending:
            stats.tables.add(self.tables[tid].qualified)
        if self._whole_transactions(batch):
            self._apply_units(batch, stats, hold_unique)
            return stats
        if self.slice_of is not None and any(p.truncate for p in batch.pending.values()):
            # a branch's TRUNCATE goes table-wide (inside its slice): the sales before and
            # after it in the chunk still go up, or wait, whole
            for part in _around_truncates(batch.rows):
                part = self.reduce(part)
                if self._whole_transactions(part):
                    self._apply_units(part, stats, hold_unique)
                else:
                    for tid, p in part.pending.items():
                        self._apply_table(tid, p, stats, hold_unique)
            return stats
        for tid, p in batch.pending.items():
            self._apply_table(tid, p, stats, hold_unique)
        return stats

    # ------------------------------------------------------------ source transactions
    def _whole_transactions(self, batch: Batch) -> bool:
        """Uploads keep a source transaction whole (a sale is its header and lines): chunks
        whose rows carry their transaction, without a TRUNCATE (that one goes table-wide)."""
        return self.slice_of is not None and any(len(r) > 7 and r[7] for r in batch.rows) \
            and not any(p.truncate for p in batch.pending.values())

    def _apply_units(self, batch: Batch, stats: ApplyStats, hold_unique: bool) -> None:
        """The chunk set-based in one savepoint when HQ takes all of it and nothing of it
        waits (the usual case); otherwise transaction by transaction."""
        blocked = any(self.waiting.get(tid) and not self.waiting[tid].isdisjoint(p.last)
                      for tid, p in batch.pending.items())
        if not blocked:
            try:
                with self.conn.transaction():
                    for tid, p in batch.pending.items():
                        self._set_based(tid, p)
            except psycopg.Error as e:
                if not aside.about_one_row(e, True) or (hold_unique and isinstance(e, psycopg.errors.UniqueViolation)):
                    raise
                log.info("HQ refused a row of this chunk (%s); applying it transaction by transaction",
                         e.diag.message_primary)
            else:
                for p in batch.pending.values():
                    stats.deletes += p.counts[0]
                    stats.upserts += p.counts[1] + p.counts[2]
                return
        for xid, rows in _by_transaction(batch.rows):
            changes = {}
            for _id, tid, op, key, row, _ts, rec, *_ in rows:
                changes.setdefault(tid, {}).pop(key, None)
                changes[tid][key] = (op, row if rec is None else rec)
            self._try_unit(xid, changes, stats)

    def _try_unit(self, unit: str, changes: dict[int, dict[str, tuple[str, object]]], stats: ApplyStats,
                  retry: bool = False) -> bool:
        """Apply one source transaction's changes in a savepoint, all or nothing.  Units set
        aside before that share a key with it join it (stored images first, its own newer
        ones over them): tried together, since it may be the fix; refused, they wait together
        under its name.  True when applied."""
        keys = [(self.tables[tid].schema, self.tables[tid].name, key) for tid, ks in changes.items() for key in ks]
        joined = [unit] if retry else aside.units_of(self.conn, self.stream, keys) if self._touches_waiting(changes) \
            else []
        merged: dict[int, dict[str, tuple[str, object]]] = {}
        by_name = {(t.schema, t.name): tid for tid, t in self.tables.items()}
        unusable = 0
        for schema, table, key, op, text, record, _u in aside.unit_rows(self.conn, self.stream, joined):
            tid = by_name.get((schema, table))
            row = self._readable(tid, text, record) if tid is not None else None
            if row is not None:
                merged.setdefault(tid, {})[key] = (op, row)
            else:
                unusable += 1
        if unusable:
            # a row of a waiting unit this session cannot apply (its table left the upload, or
            # it is a binary record the table cannot read any more): the unit cannot go up
            # whole, so it stays, and this transaction waits with it (verify --repair, then discard)
            return self._wait_with(unit, joined, changes, stats, retry)
        for tid, ks in changes.items():
            for key, change in ks.items():
                merged.setdefault(tid, {}).pop(key, None)
                merged[tid][key] = change
        try:
            with self.conn.transaction():
                self._write_unit(merged)
        except psycopg.Error as e:
            if not aside.about_one_row(e, True):
                raise
            self._set_aside_unit(unit, merged, joined, e, retry)
            stats.set_aside += sum(len(ks) for ks in changes.values()) if not retry else 0
            return False
        if joined:
            aside.clear_units(self.conn, self.stream, joined)
        for tid, ks in merged.items():
            waiting = self.waiting.get(tid, set())
            done = waiting & ks.keys()
            t = self.tables[tid]
            for key in done:             # also a key that waited alone (a first copy's row)
                aside.clear(self.conn, self.stream, t.schema, t.name, key)
            stats.cleared += len(done)
            waiting -= ks.keys()
            if not waiting:
                self.waiting.pop(tid, None)
            for op, _row in ks.values():
                if op == "D":
                    stats.deletes += 1
                else:
                    stats.upserts += 1
        return True

    def _write_unit(self, merged: dict[int, dict[str, tuple[str, object]]]) -> None:
        """The unit's final images key by key; when a unique value moves between its rows
        (line numbers shifted by one statement), its keys deleted first and the images
        inserted again, as the set-based path does."""
        try:
            with self.conn.transaction():
                for tid, ks in merged.items():
                    for op, row in ks.values():
                        self._write_one(tid, op, row)
        except psycopg.errors.UniqueViolation:
            for tid, ks in merged.items():
                for rows in _by_form(ks.values()):
                    self._execute(tid, "delete", rows)
                for rows in _by_form(change for change in ks.values() if change[0] != "D"):
                    self._execute(tid, "insert", rows)

    def _wait_with(self, unit: str, joined: list[str], changes: dict[int, dict], stats: ApplyStats,
                   retry: bool) -> bool:
        """Keep waiting units as they are (one name for all of them) and set this
        transaction's changes aside with them."""
        if retry:
            aside.touch_units(self.conn, self.stream, joined)
            return False
        first = aside.first_reason(self.conn, self.stream, joined)
        aside.retag_units(self.conn, self.stream, joined, unit)
        for tid, ks in changes.items():
            t = self.tables[tid]
            for key, (op, row) in ks.items():
                aside.put_reason(self.conn, self.stream, t.schema, t.name, key, op, self._portable(tid, row),
                                 first[0], first[1], "waits with a set-aside source transaction it touches, which holds a row this "
                                 f"replicator cannot apply ({first[2]}); `verify --repair`, then discard it", unit)
                self.waiting.setdefault(tid, set()).add(key)
                stats.set_aside += 1
        return False

    def _touches_waiting(self, changes: dict[int, dict]) -> bool:
        return any(self.waiting.get(tid) and not self.waiting[tid].isdisjoint(ks) for tid, ks in changes.items())

    def _set_aside_unit(self, unit: str, merged: dict[int, dict], joined: list[str], e: psycopg.Error,
                        retry: bool) -> None:
        """Every change of the unit waits, each naming the row HQ refused (found key by key
        in a savepoint that is rolled back: nothing of the unit lands)."""
        if retry:
            aside.touch_units(self.conn, self.stream, joined)
            return
        culprit = self._refused_key(merged) or (None, None, e)
        ctid, ckey, cerr = culprit
        what = f"{self.tables[ctid].qualified} key {ckey}" if ctid is not None else "a row of it"
        reason = self._slice_reason(self.tables[ctid], cerr) if ctid is not None else None
        reason = reason or cerr.diag.message_primary or str(cerr)
        for tid, ks in merged.items():
            t = self.tables[tid]
            for key, (op, row) in ks.items():
                mine = (tid, key) == (ctid, ckey)
                message = reason if mine else f"set aside with its source transaction: HQ refused {what}: {reason}"
                aside.put_reason(self.conn, self.stream, t.schema, t.name, key, op, self._portable(tid, row),
                                 cerr.sqlstate, cerr.diag.constraint_name, message, unit)
                self.waiting.setdefault(tid, set()).add(key)
        log.warning("a source transaction of %d changes set aside whole: HQ refused %s: %s",
                    sum(len(ks) for ks in merged.values()), what, reason)

    def _refused_key(self, merged: dict[int, dict]) -> tuple[int, str, psycopg.Error] | None:
        """The first change HQ refuses when the unit's changes are tried one after the other."""
        found = None
        try:
            with self.conn.transaction():
                for tid, ks in merged.items():
                    for key, (op, row) in ks.items():
                        try:
                            with self.conn.transaction():
                                self._write_one(tid, op, row)
                        except psycopg.Error as e:
                            if not aside.about_one_row(e, True):
                                raise
                            found = (tid, key, e)
                            raise _Found()
                raise _Found()           # nothing refused alone: roll back all the same
        except _Found:
            pass
        return found

    def _apply_table(self, tid: int, p: _Pending, stats: ApplyStats, hold_unique: bool = False) -> None:
        t, stmts = self.tables[tid], self.sql[tid]
        if p.truncate:
            self.conn.execute(stmts["truncate"])
            stats.truncates += 1
            if self.waiting.pop(tid, None):       # HQ emptied the table: nothing of it waits
                aside.clear(self.conn, self.stream, t.schema, t.name)
        waiting = self.waiting.get(tid)
        if waiting and not waiting.isdisjoint(p.last):
            self._key_by_key(tid, p, stats)
            return
        try:
            with self.conn.transaction():
                self._set_based(tid, p)
        except psycopg.Error as e:
            if not aside.about_one_row(e, self.slice_of is not None) or (hold_unique and isinstance(e, psycopg.errors.UniqueViolation)):
                raise
            log.info("%s: the branch refused a row of this chunk (%s); applying its %d keys one by one",
                     t.qualified, e.diag.message_primary, len(p.last))
            self._key_by_key(tid, p, stats)
            return
        stats.deletes += p.counts[0]
        stats.upserts += p.counts[1] + p.counts[2]

    def _key_by_key(self, tid: int, p: _Pending, stats: ApplyStats) -> None:
        """Each key's last change in its own savepoint, in log order: refused ones are set
        aside (replacing what the key had waiting), accepted ones clear the key."""
        t = self.tables[tid]
        waiting = self.waiting.setdefault(tid, set())
        for key, (op, row) in p.last.items():
            try:
                with self.conn.transaction():
                    self._write_one(tid, op, row)
            except psycopg.Error as e:
                if not aside.about_one_row(e, self.slice_of is not None):
                    raise
                why = self._slice_reason(t, e)
                aside.put(self.conn, self.stream, t.schema, t.name, key, op, self._portable(tid, row), e, why)
                waiting.add(key)
                stats.set_aside += 1
                log.warning("%s key %s set aside: %s", t.qualified, key, why or e.diag.message_primary)
                continue
            if key in waiting:
                aside.clear(self.conn, self.stream, t.schema, t.name, key)
                waiting.discard(key)
                stats.cleared += 1
            if op == "D":
                stats.deletes += 1
            else:
                stats.upserts += 1
        if not waiting:
            self.waiting.pop(tid, None)

    def _slice_reason(self, t: Table, e: psycopg.Error) -> str | None:
        kind = aside.outside_slice(e) if self.slice_of is not None else None
        if kind == "another":
            return (f"the key belongs to another branch's row of {t.qualified} at HQ (not {self.slice_of}'s): "
                    "two branches sent the same key (e.g. a register id shared by two stores)")
        if kind == "outside":
            return (f"the row is outside {self.slice_of}'s slice of {t.qualified} at HQ (owner: {t.owner}); "
                    "HQ keeps only rows this branch owns")
        return None

    def retry_waiting(self) -> ApplyStats:
        """Apply what waits again (the caller holds the position lock): the DBA may have fixed
        the cause.  A binary record the table's row type cannot read any more stays.  Units (a
        source transaction kept whole) are tried whole, oldest first."""
        stats = ApplyStats()
        if self.slice_of is not None:
            for unit in aside.units(self.conn, self.stream):
                self._try_unit(unit, {}, stats, retry=True)
        for tid in list(self.waiting):
            t = self.tables[tid]
            p = _Pending()
            for key, op, text, record in aside.stored(self.conn, self.stream, t.schema, t.name):
                row = self._readable(tid, text, record)
                if row is not None:         # else a record the table cannot read: verify --repair, discard
                    p.last[key] = (op, row)
            if p.last:
                stats.tables.add(t.qualified)
                self._key_by_key(tid, p, stats)
        return stats

    # ------------------------------------------------------------ one change, in its form
    def _write_one(self, tid: int, op: str, row) -> None:
        self._execute(tid, "delete" if op == "D" else "upsert", [row])

    def _execute(self, tid: int, statement: str, rows: list) -> None:
        """A statement over rows of one form: a JSON image (str) of a table whose changes travel
        as records is one that waited, and takes the table's JSON statements."""
        if isinstance(rows[0], str) and self.tables[tid].record_type:
            stmts = self._json_sql.get(tid) or self._json_sql.setdefault(tid, _statements(self.tables[tid], False))
            self.conn.execute(stmts[statement], (_json_array(rows),))
        else:
            self.conn.execute(self.sql[tid][statement], (self.payload[tid](rows),))

    def _portable(self, tid: int, row):
        """What to keep of a change set aside: a binary record as the JSON image it holds, when
        the table reads it now (a record names no columns: once the DBA's fix adds or drops
        one, its positions no longer fit; a JSON image's names still do); else as it came."""
        if isinstance(row, str):
            return row
        return self._as_json(tid, row) or row

    def _readable(self, tid: int, text: str | None, record: bytes | None):
        """A waiting change in a form this session can apply, or None: a JSON image always; a
        binary record (kept by an older replicator, or unreadable when set aside) only
        through the JSON image the table's row type reads from it now."""
        return text if text is not None else self._as_json(tid, record)

    def _as_json(self, tid: int, record: bytes) -> str | None:
        t = self.tables[tid]
        if not t.record_type:
            return None
        try:
            with self.conn.transaction():
                return self.conn.execute(_to_json(t), (self.payload[tid]([record]),)).fetchone()[0]
        except psycopg.Error as e:
            if not e.sqlstate or (e.sqlstate[:2] != "22" and e.sqlstate != "42804"):
                raise
            return None            # a value this database cannot hold (22), another row type's record (42804)

    def _set_based(self, tid: int, p: _Pending) -> None:
        stmts = self.sql[tid]
        try:
            with self.conn.transaction():
                if p.deletes:
                    self.conn.execute(stmts["delete"], (p.deletes,))
                if p.inserts:
                    self.conn.execute(stmts["insert"], (p.inserts,))
                if p.upserts:
                    self.conn.execute(stmts["upsert"], (p.upserts,))
        except psycopg.errors.UniqueViolation:
            # Replaying row by row in log order is not enough: one HQ statement may move a unique
            # value along many rows (`SET id = id + 1` on a table with a unique code) in an order
            # no single-row sequence can follow.  Removing every touched key first frees all their
            # values; the final images then hold together as they did on HQ.
            log.info("%s: set-based apply hit a unique constraint; re-applying %d keys as delete + insert",
                     self.tables[tid].qualified, len(p.last))
            self.conn.execute(stmts["delete"], (self.payload[tid]([row for _op, row in p.last.values()]),))
            for images in (p.inserts, p.upserts):
                if images:
                    self.conn.execute(stmts["insert"], (images,))


class _Found(Exception):
    """Ends the search for a refused change (its savepoint rolls back)."""


def _around_truncates(rows: list[tuple]) -> Iterator[list[tuple]]:
    """The chunk's rows in runs between TRUNCATEs, each TRUNCATE a run of its own, in order."""
    run: list[tuple] = []
    for r in rows:
        if r[2] == "T":
            if run:
                yield run
            yield [r]
            run = []
        else:
            run.append(r)
    if run:
        yield run


def _by_transaction(rows: list[tuple]) -> list[tuple[str | None, list[tuple]]]:
    """The chunk's rows per source transaction, in the order the transactions wrote last:
    of two that touch one key, the later writer waited for the other's commit, so all of
    the first's rows come before the later one's last row."""
    groups: dict[str | None, list[tuple]] = {}
    for r in rows:
        groups.setdefault(r[7] if len(r) > 7 else None, []).append(r)
    return sorted(groups.items(), key=lambda g: g[1][-1][0])


def _json_array(rows: list[str]) -> str:
    return "[" + ",".join(rows) + "]"


def _by_form(changes) -> list[list]:
    """The rows of (op, row) changes, JSON images and binary records apart."""
    forms: dict[bool, list] = {}
    for _op, row in changes:
        forms.setdefault(isinstance(row, str), []).append(row)
    return list(forms.values())


def _to_json(t: Table) -> sql.Composed:
    """A binary record of `t` as the JSON image capture would have sent (json and jsonb
    values as their text, see _json_images)."""
    image = sql.SQL("pg_catalog.to_jsonb(d)")
    texts = [c for c in t.columns if t.hq_columns.get(c) in ("json", "jsonb")]
    if texts:
        image = sql.SQL("({} OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object({}))").format(
            image, sql.SQL(", ").join(sql.SQL("{}, d.{}::pg_catalog.text").format(sql.Literal(c), sql.Identifier(c))
                                      for c in texts))
    return sql.SQL("SELECT {}::pg_catalog.text FROM pg_catalog.unnest(%b::{}[]) AS d").format(image, t.ident)


class Records(bytes):
    """A one-dimensional array of binary records in PostgreSQL's binary array format."""


class _RecordsDumper(Dumper):
    """Sends Records as they are, binary, with no type: the statement casts the parameter
    to the table's array type, and the server reads it with array_recv/record_recv."""
    format = pq.Format.BINARY
    oid = 0

    def dump(self, obj: Records) -> bytes:
        return obj


_INT4 = struct.Struct("!i")


def _record_array(rowtype: int):
    """A payload builder: binary records (record_send output from HQ) into an array of `rowtype`."""
    def build(recs: list[bytes]) -> Records:
        head = struct.pack("!iiIii", 1, 0, rowtype, len(recs), 1)   # ndim, no nulls, element type, size, lbound
        return Records(head + b"".join(chain.from_iterable((_INT4.pack(len(r)), r) for r in recs)))
    return build


def _images(t: Table, records: bool) -> sql.Composed:
    if records:
        return sql.SQL("pg_catalog.unnest(%b::{}[]) AS d").format(t.ident)
    return _json_images(t)


def _json_images(t: Table) -> sql.Composed:
    """The rows of a JSON array of row images (the %s parameter), typed as the table, as `d`.

    The array is read as json, not jsonb: the images are already normalized jsonb
    text, and json's input only checks the syntax where jsonb's builds a tree of
    every image (25% more branch CPU per change, measured).

    Capture sends json and jsonb values as their text (to_jsonb would reorder a json
    value's keys and turn a JSON null into SQL NULL); jsonb_populate_record would keep
    such a text as a JSON string, so those columns are cast from the text instead.
    Every other type reads its text form, or its JSON value, through populate.
    """
    texts = [c for c in t.columns if t.hq_columns.get(c) in ("json", "jsonb")]
    if not texts:
        return sql.SQL("pg_catalog.json_populate_recordset(NULL::{}, %s::pg_catalog.json) AS d").format(t.ident)
    exprs = sql.SQL(", ").join(
        sql.SQL("(e.r OPERATOR(pg_catalog.->>) {})::pg_catalog.{} AS {}").format(
            sql.Literal(c), sql.SQL(t.hq_columns[c]), sql.Identifier(c)) if c in texts
        else sql.SQL("p.{}").format(sql.Identifier(c)) for c in t.columns)
    return sql.SQL("(SELECT {} FROM pg_catalog.json_array_elements(%s::pg_catalog.json) AS e(r), "
                   "LATERAL pg_catalog.json_populate_record(NULL::{}, e.r) AS p) AS d").format(exprs, t.ident)


def slice_condition(t: Table) -> sql.Composable:
    """The login's slice of upload table `t` at HQ, as the row-level policy states it: for
    the statements that must stay inside it whatever the login (a replayed TRUNCATE, an
    `init --force`)."""
    flt = parse_filter(t.qualified, t.owner, t.hq_columns)
    return sql.SQL("({}) IS TRUE").format(render_for_any_branch(flt, sql.Identifier))


def _statements(t: Table, records: bool) -> dict[str, sql.Composed]:
    cols = sql.SQL(", ").join(map(sql.Identifier, t.columns))
    keys = sql.SQL(", ").join(map(sql.Identifier, t.key_columns))
    non_key = [c for c in t.columns if c not in t.key_columns]
    if non_key:
        conflict = sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in non_key))
    else:
        conflict = sql.SQL("DO NOTHING")
    overriding = sql.SQL("OVERRIDING SYSTEM VALUE ") if t.identity_always else sql.SQL("")
    images = _images(t, records)
    insert = sql.SQL("INSERT INTO {t} ({cols}) {ov}SELECT {cols} FROM {images}").format(
        t=t.ident, cols=cols, ov=overriding, images=images)
    upsert = insert + sql.SQL(" ON CONFLICT ({keys}) {conflict}").format(keys=keys, conflict=conflict)
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{0} = d.{0}").format(sql.Identifier(k)) for k in t.key_columns)
    delete = sql.SQL("DELETE FROM {t} AS t USING {images} WHERE {match}").format(
        t=t.ident, images=images, match=match)
    # TRUNCATE refuses a table referenced by a foreign key even in replica mode.
    # An upload's target (t.sliced) is emptied only inside the slice: HQ's row-level security
    # confines the DELETE to this branch's rows.
    truncate = (sql.SQL("DELETE FROM {}") if t.referenced else sql.SQL("TRUNCATE {}")).format(t.ident)
    if t.sliced:      # stated as well, for a login row-level security does not bind
        truncate = sql.SQL("DELETE FROM {} WHERE {}").format(t.ident, slice_condition(t))
    return {"insert": insert, "upsert": upsert, "delete": delete, "truncate": truncate}
