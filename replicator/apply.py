"""Apply chunks of changes to a branch, set-based, inside the caller's transaction.

A chunk is reduced per table to the last change of each key (a row image
is the whole row, so the last one wins), with TRUNCATE as a barrier; then
each table gets at most one DELETE and one INSERT ... ON CONFLICT.  If a
set-based statement trips a unique constraint that only holds in HQ's
statement order, every key the chunk touched in that table is deleted and
the final images inserted again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .schema import Table

log = logging.getLogger(__name__)


@dataclass
class ApplyStats:
    rows: int = 0
    upserts: int = 0
    deletes: int = 0
    truncates: int = 0
    tables: set = field(default_factory=set)


class _Pending:
    """The reduced effect of a chunk on one table."""

    __slots__ = ("truncate", "last")

    def __init__(self):
        self.truncate = False
        self.last: dict[str, tuple[str, str]] = {}   # key -> (op, row)

    def add(self, op: str, key: str, row: str) -> None:
        if op == "T":
            self.truncate = True
            self.last.clear()
            return
        self.last.pop(key, None)      # keep dict order = order of last change
        self.last[key] = (op, row)


class Applier:
    """Prepared statements per table for one branch connection."""

    def __init__(self, conn: psycopg.Connection, tables: list[Table]):
        self.conn = conn
        self.tables = {t.id: t for t in tables}
        self.sql = {t.id: _statements(t) for t in tables}

    def prepare_session(self) -> None:
        """Replica role: FKs and user triggers (incl. read-only guards) stay quiet."""
        self.conn.execute("SET session_replication_role = replica")

    def apply(self, rows: list[tuple]) -> ApplyStats:
        """rows: (id, table_id, op, key, row, ts) in id order. Caller owns the transaction."""
        stats = ApplyStats(rows=len(rows))
        pending: dict[int, _Pending] = {}
        for _id, tid, op, key, row, _ts in rows:
            p = pending.get(tid)
            if p is None:
                p = pending[tid] = _Pending()
            p.add(op, key, row)
        for tid, p in pending.items():
            stats.tables.add(self.tables[tid].qualified)
            self._apply_table(tid, p, stats)
        return stats

    def _apply_table(self, tid: int, p: _Pending, stats: ApplyStats) -> None:
        stmts = self.sql[tid]
        if p.truncate:
            self.conn.execute(stmts["truncate"])
            stats.truncates += 1
        deletes = [row for op, row in p.last.values() if op == "D"]
        upserts = [row for op, row in p.last.values() if op != "D"]
        try:
            with self.conn.transaction():
                if deletes:
                    self.conn.execute(stmts["delete"], (_json_array(deletes),))
                if upserts:
                    self.conn.execute(stmts["upsert"], (_json_array(upserts),))
        except psycopg.errors.UniqueViolation:
            # Replaying row by row in log order is not enough: one HQ statement may move a unique
            # value along many rows (`SET id = id + 1` on a table with a unique code) in an order
            # no single-row sequence can follow.  Removing every touched key first frees all their
            # values; the final images then hold together as they did on HQ.
            log.info("%s: set-based apply hit a unique constraint; re-applying %d keys as delete + insert",
                     self.tables[tid].qualified, len(p.last))
            self.conn.execute(stmts["delete"], (_json_array([row for _op, row in p.last.values()]),))
            if upserts:
                self.conn.execute(stmts["upsert"], (_json_array(upserts),))
        stats.deletes += len(deletes)
        stats.upserts += len(upserts)


def _json_array(rows: list[str]) -> str:
    return "[" + ",".join(rows) + "]"


def _images(t: Table) -> sql.Composed:
    """The rows of a jsonb array of row images (the %s parameter), typed as the table, as `d`.

    Capture sends json and jsonb values as their text (to_jsonb would reorder a json
    value's keys and turn a JSON null into SQL NULL); jsonb_populate_record would keep
    such a text as a JSON string, so those columns are cast from the text instead.
    Every other type reads its text form, or its JSON value, through populate.
    """
    texts = [c for c in t.columns if t.hq_columns.get(c) in ("json", "jsonb")]
    if not texts:
        return sql.SQL("pg_catalog.jsonb_populate_recordset(NULL::{}, %s::jsonb) AS d").format(t.ident)
    exprs = sql.SQL(", ").join(
        sql.SQL("(e.r OPERATOR(pg_catalog.->>) {})::pg_catalog.{} AS {}").format(
            sql.Literal(c), sql.SQL(t.hq_columns[c]), sql.Identifier(c)) if c in texts
        else sql.SQL("p.{}").format(sql.Identifier(c)) for c in t.columns)
    return sql.SQL("(SELECT {} FROM pg_catalog.jsonb_array_elements(%s::jsonb) AS e(r), "
                   "LATERAL pg_catalog.jsonb_populate_record(NULL::{}, e.r) AS p) AS d").format(exprs, t.ident)


def _statements(t: Table) -> dict[str, sql.Composed]:
    cols = sql.SQL(", ").join(map(sql.Identifier, t.columns))
    keys = sql.SQL(", ").join(map(sql.Identifier, t.key_columns))
    non_key = [c for c in t.columns if c not in t.key_columns]
    if non_key:
        conflict = sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in non_key))
    else:
        conflict = sql.SQL("DO NOTHING")
    overriding = sql.SQL("OVERRIDING SYSTEM VALUE ") if t.identity_always else sql.SQL("")
    images = _images(t)
    upsert = sql.SQL(
        "INSERT INTO {t} ({cols}) {ov}SELECT {cols} FROM {images} "
        "ON CONFLICT ({keys}) {conflict}").format(t=t.ident, cols=cols, ov=overriding, images=images,
                                                  keys=keys, conflict=conflict)
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{0} = d.{0}").format(sql.Identifier(k)) for k in t.key_columns)
    delete = sql.SQL("DELETE FROM {t} AS t USING {images} WHERE {match}").format(
        t=t.ident, images=images, match=match)
    # TRUNCATE refuses a table referenced by a foreign key even in replica mode.
    truncate = (sql.SQL("DELETE FROM {}") if t.referenced else sql.SQL("TRUNCATE {}")).format(t.ident)
    return {"upsert": upsert, "delete": delete, "truncate": truncate}
