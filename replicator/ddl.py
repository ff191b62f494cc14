"""`replicator init --create-missing`: create a missing branch table from HQ's definition.

What is reproduced, read from HQ's pg_catalog:

* every column, in HQ's order, with its type (``format_type`` for built-in
  types; user types by schema-qualified name), collation when it is not the
  type's default, and NOT NULL;
* ``GENERATED ALWAYS AS (expr) STORED`` columns, with HQ's expression (the
  branch computes them; the replicator never writes them);
* identity columns (``GENERATED ALWAYS|BY DEFAULT AS IDENTITY``), because
  apply already writes them with OVERRIDING SYSTEM VALUE when needed;
* defaults built from constants and PostgreSQL's own functions (``'{}'``,
  ``now()``, ``gen_random_uuid()``): they only matter for excluded columns and
  for local writes after `replicator release`, and they exist on every
  server.  A default that uses a sequence (``nextval``: a branch sequence
  would hand out ids that clash with HQ's) or a user-defined function (it may
  not exist here) is left out;
* the primary key, under HQ's constraint name;
* enum types the branch lacks, created from HQ's ``pg_enum`` in HQ's order.
  Any other missing user type (domain, composite, range) stops with a message
  naming it: create it on the branch first.

Excluded columns (``exclude_columns``) are created too, so the branch has
HQ's shape and applications that select them still work; they are created
nullable (they never receive a value from HQ) with HQ's default if it is
reproducible, else NULL.

Not reproduced, on purpose: foreign keys (a branch may hold only some
catalogs), CHECK and UNIQUE constraints and secondary indexes (HQ enforces
them; add indexes your branch queries need), triggers, partitioning,
UNLOGGED, comments and grants.

Identifiers are composed with psycopg.sql.  The type names of built-in types,
default and generation expressions are PostgreSQL's own deparsed, quoted SQL
(``format_type``, ``pg_get_expr``) from HQ's catalog, never configuration
text.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .config import table_display
from .errors import SchemaMismatch
from .schema import Table

log = logging.getLogger(__name__)

_BUILTIN_SCHEMAS = ("pg_catalog",)

_COLUMNS_SQL = """
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid), a.attgenerated::text, a.attidentity::text,
       en.nspname::text, et.typname::text, et.typtype::text, t.typcategory = 'A' AND t.typelem <> 0,
       CASE WHEN a.attcollation <> t.typcollation THEN cn.nspname::text END,
       CASE WHEN a.attcollation <> t.typcollation THEN co.collname::text END,
       EXISTS (SELECT FROM pg_depend dp
                WHERE dp.classid = 'pg_attrdef'::regclass AND dp.objid = d.oid
                  AND (dp.refclassid = 'pg_proc'::regclass
                       OR (dp.refclassid = 'pg_class'::regclass AND dp.refobjid <> a.attrelid)))
  FROM pg_attribute a
  JOIN pg_type t ON t.oid = a.atttypid
  JOIN pg_type et ON et.oid = CASE WHEN t.typcategory = 'A' AND t.typelem <> 0 THEN t.typelem ELSE t.oid END
  JOIN pg_namespace en ON en.oid = et.typnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  LEFT JOIN pg_collation co ON co.oid = a.attcollation
  LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
 WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum"""


@dataclass
class HQColumn:
    name: str
    type_text: str          # format_type on HQ
    notnull: bool
    default: str | None     # pg_get_expr of the default or generation expression
    generated: str          # 's' stored, '' plain
    identity: str           # 'a' always, 'd' by default, '' none
    type_schema: str        # of the element type for arrays
    type_name: str
    type_kind: str          # pg_type.typtype: b base, e enum, d domain, c composite, r range ...
    is_array: bool
    coll_schema: str | None  # set only when not the type's default collation
    coll_name: str | None
    default_needs_objects: bool   # uses a sequence or a user function

    @property
    def builtin_type(self) -> bool:
        return self.type_schema in _BUILTIN_SCHEMAS


def hq_columns(hq: psycopg.Connection, schema: str, name: str) -> list[HQColumn]:
    return [HQColumn(*r) for r in hq.execute(_COLUMNS_SQL, (schema, name)).fetchall()]


def create_from_hq(hq: psycopg.Connection, branch: psycopg.Connection, table: Table) -> None:
    """Create `table` on the branch as HQ defines it (schema, enum types, table), in one transaction."""
    cols = hq_columns(hq, table.schema, table.name)
    if not cols:
        raise SchemaMismatch(table.qualified, None, "missing on HQ too; re-run `replicator hq install`")
    pk_name = hq.execute(
        "SELECT conname::text FROM pg_constraint WHERE contype = 'p' "
        "AND conrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))",
        (table.schema, table.name)).fetchone()
    try:
        with branch.transaction():
            branch.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.schema)))
            for schema, name in _user_types(cols):
                _ensure_type(hq, branch, table, schema, name)
            branch.execute(create_statement(table, cols, pk_name[0] if pk_name else None))
    except psycopg.Error as e:
        raise SchemaMismatch(table.qualified, None, "could not create it from HQ's definition: "
                             f"{e.diag.message_primary or e}; create it by hand") from e
    log.info("created %s on the branch from HQ's definition", table.qualified)


def create_statement(table: Table, cols: list[HQColumn], pk_name: str | None) -> sql.Composed:
    parts = [_column_sql(c, excluded=c.name in table.exclude_columns) for c in cols]
    pk = sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, table.key_columns)))
    if pk_name:
        pk = sql.SQL("CONSTRAINT {} ").format(sql.Identifier(pk_name)) + pk
    parts.append(pk)
    return sql.SQL("CREATE TABLE {} (\n    {}\n)").format(table.ident, sql.SQL(",\n    ").join(parts))


def _column_sql(c: HQColumn, excluded: bool) -> sql.Composed:
    out = [sql.Identifier(c.name), _type_sql(c)]
    if c.coll_name:
        out.append(sql.SQL("COLLATE {}").format(sql.Identifier(c.coll_schema, c.coll_name)))
    if c.generated == "s":
        out.append(sql.SQL("GENERATED ALWAYS AS ({}) STORED").format(sql.SQL(c.default)))
    elif c.identity:
        out.append(sql.SQL("GENERATED ALWAYS AS IDENTITY" if c.identity == "a"
                           else "GENERATED BY DEFAULT AS IDENTITY"))
    elif c.default is not None and not c.default_needs_objects:
        out.append(sql.SQL("DEFAULT {}").format(sql.SQL(c.default)))
    if c.notnull and not excluded:
        out.append(sql.SQL("NOT NULL"))
    return sql.SQL(" ").join(out)


def _type_sql(c: HQColumn) -> sql.Composable:
    if c.builtin_type:
        return sql.SQL(c.type_text)
    ident = sql.Identifier(c.type_schema, c.type_name)
    return ident + sql.SQL("[]") if c.is_array else ident


def _user_types(cols: list[HQColumn]) -> list[tuple[str, str]]:
    seen = []
    for c in cols:
        if not c.builtin_type and (c.type_schema, c.type_name) not in seen:
            seen.append((c.type_schema, c.type_name))
    return seen


_TYPE_SQL = ("SELECT t.typtype::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
             "WHERE n.nspname = %s AND t.typname = %s")


def _ensure_type(hq, branch, table: Table, schema: str, name: str) -> None:
    """A user type the table needs: an enum is created (or checked) from HQ's labels; others must exist."""
    qualified = table_display(schema, name)
    kind = hq.execute(_TYPE_SQL, (schema, name)).fetchone()[0]
    exists = branch.execute(_TYPE_SQL, (schema, name)).fetchone() is not None
    if kind != "e":
        if not exists:
            raise SchemaMismatch(table.qualified, None, f"uses type {qualified}, which does not exist on the "
                                 "branch; create it there first (only enum types are created automatically)")
        return
    labels = [r[0] for r in hq.execute(
        "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = to_regtype(format('%%I.%%I', %s::text, %s::text)) "
        "ORDER BY enumsortorder", (schema, name))]
    if not exists:
        branch.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        branch.execute(sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
            sql.Identifier(schema, name), sql.SQL(", ").join(map(sql.Literal, labels))))
        log.info("created enum type %s on the branch from HQ's definition", qualified)
        return
    have = {r[0] for r in branch.execute(
        "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = to_regtype(format('%%I.%%I', %s::text, %s::text))",
        (schema, name))}
    lacking = [lab for lab in labels if lab not in have]
    if lacking:
        raise SchemaMismatch(table.qualified, None, f"enum type {qualified} on the branch lacks HQ's values "
                             f"{', '.join(map(repr, lacking))}; add them with ALTER TYPE ... ADD VALUE")
