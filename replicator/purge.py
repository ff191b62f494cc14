"""`replicator purge`: a store drops old sales locally, and HQ keeps its consolidated record.

A DELETE at the branch is a change like any other (a void, a line taken off a ticket), so
it goes up and HQ follows.  A purge is the opposite on purpose: last year's sales leave the
store's database and stay at HQ.  It deletes in replica mode
(`session_replication_role = replica`), where capture's triggers do not fire, so nothing
of it enters the branch's log.  Foreign-key actions do not fire in replica mode either: the
rows of upload tables that reference the purged ones (a sale's lines) are deleted first,
explicitly, and a table outside the upload that references them, or a kept row of a table
that references itself (a return and its sale), makes the purge refuse rather than leave
orphans.

Changes already in the branch's log still go up (the log is not touched), so a purge never
loses a sale HQ has not received.  Each purge is recorded in replication.purges (table,
predicate, rows, who, when); `init --force` and `verify --repair` of the uploads spare at HQ
the rows a recorded purge covers.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .config import BranchConfig, parse_table_name, table_display
from .errors import ConfigError, FilterError, ReplicatorError

log = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    table: str
    rows: dict[str, int] = field(default_factory=dict)     # table -> rows deleted, children first
    dry_run: bool = False


class _DryRun(Exception):
    """Rolls the purge's transaction back after counting."""


def purge(cfg: BranchConfig, table: str, where: str, dry_run: bool = False) -> PurgeReport:
    """Delete the rows of upload table `table` matching `where` at the branch only."""
    from . import uploads
    from .stream import Ends
    try:
        schema, name = parse_table_name(table)
    except ValueError as e:
        raise ConfigError(str(e), None, None, "TABLE", table) from None
    shown = table_display(schema, name)
    with Ends(uploads.stream(cfg), "replicator purge") as ends:
        branch, hq = ends.source, ends.target
        ups = uploads.offered(hq)
        owned = {(s, n) for u in uploads.select(cfg, ups) for s, n, _ in ups[u].tables}
        if (schema, name) not in owned:
            raise ConfigError(f"{shown} is not an upload table of branch {cfg.branch} (uploads: "
                              f"{', '.join(sorted(table_display(*t) for t in owned)) or 'none'}); purge only "
                              "deletes sales HQ keeps")
        if not branch.execute("SELECT to_regclass('replication.purges') IS NOT NULL").fetchone()[0]:
            raise ReplicatorError("the branch's capture is older than purges; run `replicator run --once` "
                                  "(or `replicator init`) first, which brings it up to date")
        root = condition(branch, schema, name, where)
        plan = _children(branch, (schema, name), root, owned)
        report = PurgeReport(shown, dry_run=dry_run)
        try:
            with branch.transaction():
                branch.execute("SET LOCAL session_replication_role = replica")    # capture stays quiet
                for (s, n), cond in plan:
                    _refuse_kept_references(branch, (s, n), cond)
                for (s, n), cond in plan:
                    shown_t = table_display(s, n)
                    report.rows[shown_t] = report.rows.get(shown_t, 0) + branch.execute(
                        sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier(s, n), cond)).rowcount
                branch.execute("INSERT INTO replication.purges (schema_name, table_name, predicate, rows) "
                               "VALUES (%s, %s, %s, %s)", (schema, name, where, report.rows[shown]))
                if dry_run:
                    raise _DryRun
        except _DryRun:
            pass
    if not dry_run:
        log.info("purged %s at branch %s: %s", shown, cfg.branch,
                 ", ".join(f"{t} {n}" for t, n in report.rows.items()))
    return report


def condition(conn: psycopg.Connection, schema: str, name: str, where: str) -> sql.Composable:
    """`where` as SQL: the row-filter grammar (sqlglot-checked), literals only."""
    from .capture import hq_columns
    from .filters import parse_filter, render
    shown = table_display(schema, name)
    try:
        flt = parse_filter(shown, where, hq_columns(conn, schema, name))
    except FilterError as e:
        raise ConfigError(f"purge predicate refused: {e.reason} (predicate: {where!r})", None, None,
                          "--where", where) from None
    if flt.params:
        raise ConfigError(f"a purge predicate takes values, not parameters (:{', :'.join(sorted(flt.params))})",
                          None, None, "--where", where)
    _require_absolute_times(flt, where)
    return sql.SQL("({}) IS TRUE").format(render(flt, {}, sql.Identifier))


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ISO_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?\s*(Z|[+-]\d{2}(:?\d{2})?)")


def _require_absolute_times(flt, where: str) -> None:
    """The predicate is stored and evaluated again later, at HQ too (`init --force`,
    `verify`), in sessions with other TimeZone and DateStyle settings: a time literal must
    mean the same instant everywhere.  Over a timestamptz column every string literal must
    carry its UTC offset; over date and timestamp columns it must be ISO 8601."""
    from sqlglot import exp
    types = set(flt.column_types.values())
    with_tz = any(ty.startswith("timestamp with time zone") for ty in types)
    dated = with_tz or any(ty == "date" or ty.startswith("timestamp") for ty in types)
    if not dated:
        return
    for lit in flt.tree.find_all(exp.Literal):
        if not lit.is_string:
            continue
        text = lit.this.strip()
        if with_tz and not _ISO_INSTANT.fullmatch(text):
            raise ConfigError(f"purge predicate: {text!r} is read in each session's time zone; write the instant "
                              "with its UTC offset, e.g. '2025-01-01 00:00:00-06'", None, None, "--where", where)
        if not (_ISO_INSTANT.fullmatch(text) or _ISO_DATE.fullmatch(text)
                or re.fullmatch(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?", text)):
            raise ConfigError(f"purge predicate: write dates as ISO 8601 ('2025-01-31'), not {text!r} (read per "
                              "DateStyle)", None, None, "--where", where)


_REFERENCING = """
SELECT c.conrelid::regclass::text, n.nspname::text, r.relname::text,
       array_agg(a.attname::text ORDER BY k.ord), array_agg(p.attname::text ORDER BY k.ord)
  FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid JOIN pg_namespace n ON n.oid = r.relnamespace
 CROSS JOIN LATERAL unnest(c.conkey, c.confkey) WITH ORDINALITY AS k(att, patt, ord)
  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.att
  JOIN pg_attribute p ON p.attrelid = c.confrelid AND p.attnum = k.patt
 WHERE c.contype = 'f' AND c.confrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
   AND c.conrelid <> c.confrelid AND c.conparentid = 0
 GROUP BY c.oid, c.conrelid, n.nspname, r.relname"""


def _children(conn: psycopg.Connection, table: tuple[str, str], cond: sql.Composable, owned: set,
              seen: tuple = ()) -> list[tuple[tuple[str, str], sql.Composable]]:
    """(table, rows to delete) in delete order: referencing upload tables first (their rows
    pointing at the purged ones), then the table itself."""
    plan = []
    for shown, s, n, cols, refs in conn.execute(_REFERENCING, table).fetchall():
        if (s, n) not in owned:
            raise ReplicatorError(f"{shown} references {table_display(*table)} and is not part of the upload: a "
                                  "purge would leave it orphans; purge or detach its rows first")
        if (s, n) in seen:
            continue
        sub = sql.SQL("({}) IN (SELECT {} FROM {} WHERE {})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(map(sql.Identifier, refs)),
            sql.Identifier(*table), cond)
        plan += _children(conn, (s, n), sub, owned, seen + (table,))
    return plan + [(table, cond)]


_SELF_REFERENCES = """
SELECT c.conname::text, array_agg(a.attname::text ORDER BY k.ord), array_agg(p.attname::text ORDER BY k.ord)
  FROM pg_constraint c
 CROSS JOIN LATERAL unnest(c.conkey, c.confkey) WITH ORDINALITY AS k(att, patt, ord)
  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.att
  JOIN pg_attribute p ON p.attrelid = c.confrelid AND p.attnum = k.patt
 WHERE c.contype = 'f' AND c.conrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
   AND c.confrelid = c.conrelid AND c.conparentid = 0
 GROUP BY c.oid, c.conname"""


def _refuse_kept_references(conn: psycopg.Connection, table: tuple[str, str], cond: sql.Composable) -> None:
    """A table that references itself (a return pointing at the sale it returns): a row the
    purge keeps must not point at one it deletes, since replica mode fires no foreign-key
    action and the kept row would be left an orphan."""
    t = sql.Identifier(*table)
    for name, cols, refs in conn.execute(_SELF_REFERENCES, table).fetchall():
        kept = conn.execute(sql.SQL("SELECT count(*) FROM {t} WHERE ({c}) IS NOT TRUE AND ({f}) IN "
                                    "(SELECT {r} FROM {t} WHERE {c})").format(
            t=t, c=cond, f=sql.SQL(", ").join(map(sql.Identifier, cols)),
            r=sql.SQL(", ").join(map(sql.Identifier, refs)))).fetchone()[0]
        if kept:
            raise ReplicatorError(f"{kept} row{'s' * (kept != 1)} of {table_display(*table)} that the purge keeps "
                                  f"reference{'s' * (kept == 1)} rows it deletes (foreign key {name}): they would "
                                  "be left orphans; widen the predicate to take them too (nothing was purged)")


def spared(branch: psycopg.Connection, schema: str, name: str) -> sql.Composable | None:
    """Rows of `schema.name` that recorded purges cover, as a condition over the table's
    columns (the same tables exist at HQ), or None when no purge covers any."""
    if not branch.execute("SELECT to_regclass('replication.purges') IS NOT NULL").fetchone()[0]:
        return None
    conds = []
    for s, n, where in branch.execute("SELECT DISTINCT schema_name::text, table_name::text, predicate "
                                      "FROM replication.purges ORDER BY 1, 2, 3").fetchall():
        root = condition(branch, s, n, where)
        everything = {(s, n), (schema, name)} | _referencing_closure(branch, (s, n))
        for t, cond in _children(branch, (s, n), root, everything):
            if t == (schema, name):
                conds.append(cond)
    if not conds:
        return None
    return sql.SQL("({})").format(sql.SQL(" OR ").join(conds))


def _referencing_closure(conn: psycopg.Connection, table: tuple[str, str], seen: frozenset = frozenset()) -> set:
    out = set()
    for _shown, s, n, _c, _r in conn.execute(_REFERENCING, table).fetchall():
        if (s, n) not in seen and (s, n) != table:
            out |= {(s, n)} | _referencing_closure(conn, (s, n), seen | {table})
    return out
