"""What is replicated: catalogs offered by HQ, the tables a branch selected,
and the column lists both sides agree on.

Column lists come from each side's pg_catalog, so extra local columns keep
their defaults and excluded columns never travel.  A mismatch stops the
branch before any row is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .config import BranchConfig, table_display
from .errors import ConfigError, ReplicatorError, SchemaMismatch, UnknownCatalog


@dataclass
class Catalog:
    name: str
    label: str
    default: bool
    granted: bool = True      # HQ lets this branch read it (hq add-branch --catalogs)


@dataclass
class Table:
    """One replicated table as both sides see it."""
    id: int
    catalog: str
    schema: str
    name: str
    key_columns: list[str]
    filter: str | None
    exclude_columns: list[str]
    hq_columns: dict[str, str] = field(default_factory=dict)   # name -> type, excluded removed
    hq_generated: set[str] = field(default_factory=set)        # GENERATED columns on HQ
    columns: list[str] = field(default_factory=list)           # written on the branch
    referenced: bool = False          # another branch table has an FK to it
    identity_always: bool = False
    hq_builtin_types: bool = False    # every HQ column has a built-in type (same OID everywhere)
    record_type: int | None = None    # branch row type OID when changes travel as binary records
    capture_since: str | None = None  # xid at which HQ (re)started capturing it (migration 006)
    rows_restricted: bool = False     # this login reads its HQ rows through read_rows (migration 007)
    owner: str | None = None          # an upload's HQ table: the owner predicate of this login's slice

    @property
    def sliced(self) -> bool:
        return self.owner is not None

    @property
    def qualified(self) -> str:
        return table_display(self.schema, self.name)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def hq_source(self) -> sql.Composable:
        """Where this login reads the table's HQ rows: the table itself, or, for a branch
        login on a filtered catalog, HQ's read_rows(), which passes only its own rows."""
        if not self.rows_restricted:
            return self.ident
        return sql.SQL("replication.read_rows({}, NULL::{}) AS {}").format(
            sql.Literal(self.id), self.ident, sql.Identifier(self.name))


_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '', a.attidentity, a.attgenerated
  FROM pg_attribute a
 WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum"""


def columns_of(conn: psycopg.Connection, schema: str, name: str) -> list[tuple]:
    return conn.execute(_COLUMNS_SQL, (schema, name)).fetchall()


def offered_catalogs(hq: psycopg.Connection, branch: str | None = None) -> dict[str, Catalog]:
    """HQ's catalogs, each marked with whether HQ grants it to `branch`."""
    rows = hq.execute("SELECT name, label, is_default FROM replication.catalogs ORDER BY name").fetchall()
    granted = None
    if branch is not None:
        row = hq.execute("SELECT replication.granted_catalogs(%s)", (branch,)).fetchone()
        granted = row[0] if row else None
    return {r[0]: Catalog(*r, granted=granted is None or r[0] in granted) for r in rows}


def _not_granted(names: list[str], offered: dict[str, Catalog], where: str | None, line: int | None,
                 field: str | None) -> ConfigError | None:
    refused = [c for c in names if c in offered and not offered[c].granted]
    if not refused:
        return None
    granted = [c for c, cat in offered.items() if cat.granted]
    return ConfigError(f"catalog {', '.join(refused)} is not granted to this branch by HQ (it grants "
                       f"{', '.join(granted) or 'none'}); remove it here, or ask HQ's admin to grant it with "
                       "`replicator hq add-branch ... --catalogs`", where, line, field)


def select_catalogs(cfg: BranchConfig, offered: dict[str, Catalog]) -> list[str]:
    """branch.yaml's list, or HQ's defaults when it names none."""
    if cfg.catalogs is None:
        return [c.name for c in offered.values() if c.default and c.granted]
    unknown = [c for c in cfg.catalogs if c not in offered]
    if unknown:
        raise UnknownCatalog(f"unknown catalog {', '.join(unknown)} (HQ does not define it); HQ offers: "
                             f"{', '.join(offered) or '(none: run replicator hq install)'}",
                             cfg.path, cfg.lines.get("catalogs"), "catalogs")
    refused = _not_granted(cfg.catalogs, offered, cfg.path, cfg.lines.get("catalogs"), "catalogs")
    if refused:
        raise refused
    return list(cfg.catalogs)


def check_names(names: list[str], offered: dict[str, Catalog], where: str) -> None:
    unknown = [c for c in names if c not in offered]
    if unknown:
        raise UnknownCatalog(f"unknown catalog {', '.join(unknown)}; HQ offers: {', '.join(offered)}",
                             where, None, None)
    refused = _not_granted(names, offered, where, None, None)
    if refused:
        raise refused


def source_tables(hq: psycopg.Connection, catalogs: list[str]) -> list[Table]:
    """The HQ tables of the given catalogs with their HQ column types."""
    rows = hq.execute(
        """SELECT id, catalog, schema_name, table_name, key_columns, filter, exclude_columns, capture_since::text,
                  row_access IS NOT NULL AND NOT coalesce(has_any_column_privilege(
                      to_regclass(format('%%I.%%I', schema_name, table_name)), 'SELECT'), true)
             FROM replication.tables WHERE active AND catalog = ANY(%s) ORDER BY id""",
        (catalogs,)).fetchall()
    tables = [Table(*r[:7], capture_since=r[7], rows_restricted=r[8]) for r in rows]
    for t in tables:
        cols = columns_of(hq, t.schema, t.name)
        if not cols:
            raise ReplicatorError(f"table {t.qualified} of catalog {t.catalog} is registered but "
                                  "missing on HQ; re-run `replicator hq install`")
        t.hq_columns = {c[0]: c[1] for c in cols if c[0] not in t.exclude_columns}
        t.hq_generated = {c[0] for c in cols if c[5]}
        t.hq_builtin_types = _builtin_types(hq, t)
    return tables


def capture_gaps(hq: psycopg.Connection, tables: list[Table], states: dict) -> list[Table]:
    """Tables whose capture on HQ (re)started after this branch copied them.

    Changes made on HQ while a table's capture was off (`hq install --detach`, then
    the table listed again) never reached the branch; only a new copy brings them.
    """
    pairs = [(t, states[t.qualified].copy_snapshot) for t in tables
             if t.capture_since and t.qualified in states and states[t.qualified].copy_snapshot]
    if not pairs:
        return []
    seen = hq.execute("SELECT array_agg(pg_visible_in_snapshot(x::xid8, s::pg_snapshot) ORDER BY n) "
                      "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY u(x, s, n)",
                      ([t.capture_since for t, _ in pairs], [snap for _, snap in pairs])).fetchone()[0]
    return [t for (t, _), ok in zip(pairs, seen) if not ok]


def capture_gap_error(gaps: list[Table]) -> ReplicatorError:
    names = sorted({t.catalog for t in gaps})
    return ReplicatorError(
        f"capture of {', '.join(t.qualified for t in gaps)} (catalog {', '.join(names)}) was off on HQ for a "
        f"while after this branch copied it, so changes made then never reached this branch; run "
        f"`replicator init --force {' '.join(names)}`")


_BUILTIN_SQL = """
SELECT c.reltype, bool_and(a.atttypid < 16384)      -- FirstNormalObjectId: built-in types
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE c.oid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND a.attname = ANY(%s)
 GROUP BY c.reltype"""


def _builtin_types(conn: psycopg.Connection, t: Table) -> bool:
    row = conn.execute(_BUILTIN_SQL, (t.schema, t.name, list(t.hq_columns))).fetchone()
    return bool(row and row[1])


def _record_type(branch: psycopg.Connection, t: Table, local: list[str]) -> int | None:
    """The branch row type when changes can travel as binary records (apply.py).

    A binary record names each field's type OID and must have exactly the row
    type's columns, so this holds only when the branch table has the replicated
    columns and no others, and every type is built in on both sides.
    """
    if not t.hq_builtin_types or t.columns != local:
        return None
    row = branch.execute(_BUILTIN_SQL, (t.schema, t.name, local)).fetchone()
    return row[0] if row and row[1] else None


def bind_target(branch: psycopg.Connection, tables: list[Table]) -> None:
    """Check each branch table against HQ's and fill the column lists to write."""
    missing = [t.qualified for t in tables if not columns_of(branch, t.schema, t.name)]
    if missing:
        raise SchemaMismatch(", ".join(missing), None,
                             "table missing on the branch; create it (or `replicator init --create-missing`)")
    for t in tables:
        _bind_one(branch, t)


def _bind_one(branch: psycopg.Connection, t: Table) -> None:
    local = {c[0]: c for c in columns_of(branch, t.schema, t.name)}
    for col, typ in t.hq_columns.items():
        if col not in local:
            raise SchemaMismatch(t.qualified, col, "column missing on the branch; add it with the HQ type " + typ)
        if local[col][1] != typ:
            raise SchemaMismatch(t.qualified, col, f"type is {local[col][1]} on the branch but {typ} on HQ; "
                                 f"change the branch column to {typ}")
        if local[col][5] and col not in t.hq_generated:
            raise SchemaMismatch(t.qualified, col, "is a generated column on the branch but a plain one on HQ")
    for col, (_, typ, notnull, has_default, _, _) in local.items():
        if col not in t.hq_columns and notnull and not has_default:
            why = "is excluded on HQ" if col in t.exclude_columns else "does not exist on HQ"
            raise SchemaMismatch(t.qualified, col, f"{why} and is NOT NULL without a default on the branch; "
                                 "give it a default")
    keys = branch.execute(
        """SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i
            CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND i.indisprimary""",
        (t.schema, t.name)).fetchone()[0]
    if keys != t.key_columns:
        raise SchemaMismatch(t.qualified, None, f"primary key is ({', '.join(keys or [])}) on the branch "
                             f"but ({', '.join(t.key_columns)}) on HQ")
    # Generated on both sides: the branch computes it (it cannot be written).
    t.columns = [c for c in local if c in t.hq_columns and not (local[c][5] and c in t.hq_generated)]
    t.identity_always = any(local[c][4] == "a" for c in t.columns)
    t.record_type = _record_type(branch, t, list(local))
    t.referenced = branch.execute(
        "SELECT EXISTS (SELECT FROM pg_constraint WHERE contype = 'f' AND confrelid = "
        "to_regclass(format('%%I.%%I', %s::text, %s::text)))", (t.schema, t.name)).fetchone()[0]


def branch_params(hq: psycopg.Connection, branch: str, cfg: BranchConfig | None = None) -> dict:
    """The parameters HQ registered for this branch (row filters use them).

    With `cfg`, "not registered" points at the `branch:` line of branch.yaml."""
    try:
        row = hq.execute("SELECT params, active FROM replication.branch_info(%s)", (branch,)).fetchone()
    except psycopg.errors.InsufficientPrivilege as e:
        raise ReplicatorError(f"HQ refused to show branch {branch}'s registration: {e.diag.message_primary}") from e
    if row is None:
        message = (f"branch {branch} is not registered on HQ (or not for this login); fix the name here "
                   f"or run on HQ: replicator hq add-branch -c hq.yaml {branch}")
        raise cfg.error("branch", message) if cfg is not None else ConfigError(message)
    if not row[1]:
        raise ReplicatorError(f"branch {branch} is deactivated on HQ")
    return dict(row[0])
