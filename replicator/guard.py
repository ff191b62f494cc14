"""Read-only catalogs on the branch: guard triggers, and releasing them.

Once a catalog is replicated, its branch tables change only through the
replicator.  Each table gets one statement-level trigger (cheap: it fires
once per statement, not per row)::

    CREATE TRIGGER replicator_guard BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON public.items FOR EACH STATEMENT EXECUTE FUNCTION replication.guard('items')

whose function (sql/target/functions/guard.sql) raises ``insufficient_privilege``:
"table public.items belongs to catalog items, which is replicated from HQ and
read-only here; change it at HQ".  The replicator's own writes pass because
init and apply run with ``session_replication_role = replica``, where
ordinary triggers do not fire (PostgreSQL's logical replication works the same
way).  A superuser who sets that role locally bypasses the guard too: it
protects against mistakes, not against administrators.

Where guards come from:

* ``replicator init`` installs them in the same branch transaction as the
  copy, so a catalog is never copied without being protected.
* ``replicator run`` makes sure every table it streams is guarded when it
  loads its table set, because a selected catalog may be streamed without
  ever being initialized (customers is skipped by init by default).  Only
  missing guards are created, so a running branch takes no lock.

Deselecting a catalog (removing it from ``catalogs:``) stops the stream for
its tables; `run` then forgets their initialization state, because their copy
goes stale, so selecting the catalog again starts with a fresh `replicator
init` (no --force needed) instead of resuming with a silent gap.  The tables
stay read-only until ``replicator release -c branch.yaml CATALOG...``, which
drops the guards (and forgets the init state, if `run` has not yet).  Release
refuses while the catalog is still selected, because `run` would keep
writing there.  It bumps the branch's config version, so a running `run`
re-reads branch.yaml before its next transaction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import db, state
from .config import BranchConfig, table_display
from .errors import ConfigError
from .schema import Table, offered_catalogs, select_catalogs
from .stream import CATALOGS

log = logging.getLogger(__name__)

TRIGGER = "replicator_guard"

_GUARDED_SQL = """
SELECT n.nspname::text, c.relname::text, split_part(encode(t.tgargs, 'escape'), '\\000', 1)
  FROM pg_trigger t
  JOIN pg_class c ON c.oid = t.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE t.tgname = %s AND NOT t.tgisinternal
 ORDER BY 1, 2"""


def guarded(conn: psycopg.Connection) -> dict[tuple[str, str], str]:
    """Every guarded table on the branch: (schema, table) -> catalog."""
    return {(r[0], r[1]): r[2] for r in conn.execute(_GUARDED_SQL, (TRIGGER,))}


def install(conn: psycopg.Connection, tables: list[Table]) -> None:
    """Guard these tables (inside the caller's transaction; replaces a stale catalog name)."""
    for t in tables:
        conn.execute(sql.SQL(
            "CREATE OR REPLACE TRIGGER {trg} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {tbl} "
            "FOR EACH STATEMENT EXECUTE FUNCTION replication.guard({cat})").format(
                trg=sql.Identifier(TRIGGER), tbl=t.ident, cat=sql.Literal(t.catalog)))
    if tables:
        log.debug("guarded %s", ", ".join(t.qualified for t in tables))


def sync(conn: psycopg.Connection, stream: str, tables: list[Table], cfg_path: str | None = None,
         config_version: int | None = None) -> list[str]:
    """For `run`, when it loads its table set: keep the branch's bookkeeping in line with the selection.

    * Streamed tables without a guard get one.  Creating a trigger locks its
      table briefly, so tables already guarded (the usual case) are left alone.
    * Initialized tables that are no longer streamed lose their init state:
      from now on their copy goes stale, so selecting the catalog again must
      start with a fresh `replicator init` (allowed without --force), never
      resume the stream with a silent gap.  Done under the position lock and
      only if no init ran since `config_version` was read.
    * Guarded tables no longer streamed stay read-only until `release`; say so.

    Returns the tables newly guarded.
    """
    have = guarded(conn)
    todo = [t for t in tables if have.get((t.schema, t.name)) != t.catalog]
    if todo:
        state.ensure_schema(conn)      # a branch initialized before guards existed
        with conn.transaction():
            install(conn, todo)
        log.info("made read-only (managed from HQ): %s", ", ".join(t.qualified for t in todo))
    _forget_unstreamed(conn, stream, tables, config_version)
    streamed = {(t.schema, t.name) for t in tables}
    for cat in sorted({cat for key, cat in have.items() if key not in streamed}):
        log.warning("catalog %s is read-only on this branch but no longer selected, so its tables no longer "
                    "receive changes; to write them locally run `replicator release -c %s %s`",
                    cat, cfg_path or "branch.yaml", cat)
    return [t.qualified for t in todo]


def _forget_unstreamed(conn: psycopg.Connection, stream: str, tables: list[Table],
                       config_version: int | None) -> None:
    with conn.transaction():
        pos = state.load_position(conn, stream, lock=True)
        if pos is None or (config_version is not None and pos.config_version != config_version):
            return                     # an init just ran: the caller reloads with the new selection
        gone = conn.execute(
            """DELETE FROM replication.target_tables r
                WHERE stream = %s AND NOT EXISTS (
                      SELECT FROM unnest(%s::text[], %s::text[]) s(sch, tbl)
                       WHERE s.sch = r.schema_name AND s.tbl = r.table_name)
            RETURNING catalog, format('%%I.%%I', schema_name, table_name)""",
            (stream, [t.schema for t in tables], [t.name for t in tables])).fetchall()
    for cat in sorted({g[0] for g in gone}):
        log.warning("catalog %s is no longer selected: its tables (%s) stop receiving changes and count as "
                    "not initialized; selecting it again needs `replicator init %s`", cat,
                    ", ".join(g[1] for g in gone if g[0] == cat), cat)


@dataclass
class Released:
    catalog: str
    tables: list[str] = field(default_factory=list)


def release(cfg: BranchConfig, catalogs: list[str]) -> list[Released]:
    """Drop guards and init state of deselected catalogs, in one branch transaction."""
    _refuse_selected(cfg, catalogs)
    stream = CATALOGS
    branch = db.connect(cfg.target_dsn, "branch", autocommit=True, application=f"replicator release {cfg.branch}")
    try:
        with branch.transaction():
            pos = state.load_position(branch, stream, lock=True)     # waits for a running apply or init
            have = guarded(branch)
            plan = _plan(branch, stream, have, catalogs, cfg.path)
            for rel in plan:
                for schema, name in [key for key, cat in have.items() if cat == rel.catalog]:
                    branch.execute(sql.SQL("DROP TRIGGER {} ON {}").format(
                        sql.Identifier(TRIGGER), sql.Identifier(schema, name)))
                if state.has_schema(branch):
                    branch.execute("DELETE FROM replication.target_tables WHERE stream = %s AND catalog = %s",
                                   (stream, rel.catalog))
                log.info("released catalog %s: %s", rel.catalog, ", ".join(rel.tables))
            if pos is not None:
                state.bump_config(branch, stream)     # a running `run` reloads its table set
        return plan
    finally:
        branch.close()


def _plan(branch: psycopg.Connection, stream: str, have: dict, catalogs: list[str], path: str
          ) -> list[Released]:
    """The tables each catalog holds on this branch: guarded ones and initialized ones."""
    states = state.table_states(branch, stream)
    plan = []
    for cat in catalogs:
        tables = {table_display(s, n) for (s, n), c in have.items() if c == cat}
        tables |= {q for q, st in states.items() if st.catalog == cat}
        if not tables:
            raise ConfigError(f"catalog {cat} has no read-only or initialized tables on this branch; "
                              "nothing to release", path)
        plan.append(Released(cat, sorted(tables)))
    return plan


def _refuse_selected(cfg: BranchConfig, catalogs: list[str]) -> None:
    """Releasing a selected catalog would let local writes race the stream: refuse."""
    if cfg.catalogs is not None:
        selected = set(cfg.catalogs)
        how = "is still selected"
    else:
        hq = db.connect(cfg.source_dsn, "HQ", autocommit=True, application=f"replicator release {cfg.branch}")
        try:
            selected = set(select_catalogs(cfg, offered_catalogs(hq, cfg.branch)))
        finally:
            hq.close()
        how = "is selected by default (the file has no catalogs: list)"
    still = [c for c in catalogs if c in selected]
    if still:
        raise ConfigError(f"catalog {', '.join(still)} {how}; remove it from catalogs: first, then release it",
                          cfg.path, None, "catalogs")
