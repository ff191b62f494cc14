"""Apply chunks of changes to a branch, set-based, inside the caller's transaction.

A chunk is reduced per table to the last change of each key (a row image
is the whole row, so the last one wins), with TRUNCATE as a barrier; then
each table gets at most one DELETE and one INSERT ... ON CONFLICT.  If a
set-based statement trips a unique constraint that only holds in HQ's
statement order, the chunk's changes of that table are replayed one by one
in log order instead.
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

    __slots__ = ("truncate", "last", "ordered")

    def __init__(self):
        self.truncate = False
        self.last: dict[str, tuple[str, str]] = {}   # key -> (op, row)
        self.ordered: list[tuple[str, str, str]] = []  # for the row-by-row fallback

    def add(self, op: str, key: str, row: str) -> None:
        if op == "T":
            self.truncate = True
            self.last.clear()
            self.ordered.clear()
            return
        self.last.pop(key, None)      # keep dict order = order of last change
        self.last[key] = (op, row)
        self.ordered.append((op, key, row))


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
            log.info("%s: set-based apply hit a unique constraint; replaying %d changes in order",
                     self.tables[tid].qualified, len(p.ordered))
            for op, _key, row in p.ordered:
                self.conn.execute(stmts["delete" if op == "D" else "upsert"], (_json_array([row]),))
        stats.deletes += len(deletes)
        stats.upserts += len(upserts)


def _json_array(rows: list[str]) -> str:
    return "[" + ",".join(rows) + "]"


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
    upsert = sql.SQL(
        "INSERT INTO {t} ({cols}) {ov}SELECT {cols} FROM pg_catalog.jsonb_populate_recordset(NULL::{t}, %s::jsonb) "
        "ON CONFLICT ({keys}) {conflict}").format(t=t.ident, cols=cols, ov=overriding, keys=keys, conflict=conflict)
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{0} = d.{0}").format(sql.Identifier(k)) for k in t.key_columns)
    delete = sql.SQL("DELETE FROM {t} AS t USING pg_catalog.jsonb_populate_recordset(NULL::{t}, %s::jsonb) AS d "
                     "WHERE {match}").format(t=t.ident, match=match)
    # TRUNCATE refuses a table referenced by a foreign key even in replica mode.
    truncate = (sql.SQL("DELETE FROM {}") if t.referenced else sql.SQL("TRUNCATE {}")).format(t.ident)
    return {"upsert": upsert, "delete": delete, "truncate": truncate}
