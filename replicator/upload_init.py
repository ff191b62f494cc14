"""`replicator init` of a branch's uploads: its existing sales history up into its slice
at HQ, capture first (so nothing sold from then on is missed), then one copy at one
branch snapshot, in one HQ transaction with the stream's position.  Never a TRUNCATE at
HQ: the slice only, and what the branch purged stays HQ's record (purge.py)."""
from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from . import db, purge, state
from .apply import Applier, slice_condition
from .config import BranchConfig
from .schema import Table
from .stream import Ends, Stream
from .uploads import install_capture, offered, select, stream, tables_for

log = logging.getLogger(__name__)


def initialize(cfg: BranchConfig, force: bool = False) -> list[str]:
    """Send the branch's existing sales history up into its slice at HQ: capture first (so
    nothing sold from now on is missed), then one copy at one branch snapshot, all in one
    HQ transaction with the stream's position.  Returns the uploads initialized."""
    st = stream(cfg)
    with Ends(st, f"replicator init {cfg.branch}") as ends:
        branch, hq = ends.source, ends.target
        ups = offered(hq)
        names = select(cfg, ups)
        if not names:
            return []
        chosen = [ups[n] for n in names]
        db.require_version(hq, "target", "HQ")
        install_capture(branch, chosen)
        tables = tables_for(branch, hq, chosen)
        states = state.table_states(hq, st.name)
        done = sorted({t.catalog for t in tables if t.qualified in states})
        todo = names if force else [n for n in names if n not in done]
        if not todo:
            if force is False and done:
                log.info("uploads already initialized: %s", ", ".join(done))
            return []
        _copy(branch, hq, st, [t for t in tables if t.catalog in todo])
        return todo


def _copy(branch: psycopg.Connection, hq: psycopg.Connection, st: Stream, tables: list[Table]) -> None:
    with hq.transaction():
        hq.execute("SET LOCAL session_replication_role = replica")
        pos = state.load_position(hq, st.name, lock=True)
        applier = Applier(hq, st.name, tables, slice_of=st.member)
        with branch.transaction():
            branch.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            snap, copied_at = branch.execute("SELECT pg_current_snapshot()::text, now()").fetchone()
            for t in reversed(tables):
                # the slice only (row-level security, and stated for a login it does not bind);
                # what the branch purged stays HQ's record
                keep = purge.spared(branch, t.schema, t.name)
                cond = slice_condition(t)
                if keep is not None:
                    cond = sql.SQL("{} AND NOT coalesce({}, false)").format(cond, keep)
                hq.execute(sql.SQL("DELETE FROM {} WHERE {}").format(t.ident, cond))
            for t in tables:
                rows = _send(branch, applier, t)
                state.mark_copied(hq, st.name, t.schema, t.name, t.catalog, snap, rows)
                log.info("upload %s: %d rows of %s sent to HQ", t.catalog, rows, t.qualified)
        if pos is None:
            # HQ holds the branch's sales as of the copy (status: "uploaded up to")
            state.save_position(hq, st.name, state.Position(snapshot=snap, applied_until=copied_at))
        else:
            state.bump_config(hq, st.name)


def _send(branch: psycopg.Connection, applier: Applier, t: Table, chunk: int = 5000) -> int:
    """A table's rows as the change stream carries them (key, image or binary record), applied
    as inserts in chunks: refused rows are set aside like changes."""
    from .reader import _key_expr, _record_expr
    row = sql.SQL("NULL::text") if t.record_type else sql.SQL("l.row::text")
    rec = _record_expr(t) if t.record_type else sql.SQL("NULL::bytea")
    # no source transaction (the 8th column): a first copy's rows stand alone when refused
    query = sql.SQL("SELECT 0::int8, {tid}, 'I'::text, {key}, {row}, now(), {rec}, NULL::text "
                    "FROM (SELECT pg_catalog.to_jsonb(s.*) AS row FROM {t} s) l").format(
        tid=sql.Literal(t.id), key=_key_expr(t), row=row, rec=rec, t=t.ident)
    n = 0
    with branch.cursor(name="replicator_upload_copy", binary=True) as cur:
        cur.itersize = chunk
        cur.execute(query)
        while rows := cur.fetchmany(chunk):
            applier.apply(rows)
            n += len(rows)
    return n
