"""Routes on HQ's change log: which store's branch a filtered table's log row can be for.

A thousand branches each reading every store's stock changes to find its own cost HQ in
proportion to branches times its write rate (README, Performance: the fleet).  So a
filtered table whose filter requires ``column = :parameter`` gets a route: capture writes
the column's text into each log row, and a branch login's probe and window read only the
rows without a route and those of its own routes (migration 012).  Row-level security
still decides every row a branch reads; a route only narrows what HQ looks at, so a row
must never carry a route that hides it from a branch whose filter passes it (see `apply`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .config import HQConfig, quote_ident, table_display
from .filters import parse_filter, route_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    column: str
    param: str
    type: str          # what a branch's parameter is cast to (ROUTE_TYPES)


def wanted(cfg: HQConfig, columns) -> dict[tuple[str, str], Route | None]:
    """The route each configured table should have, from its filter and HQ's column types
    (`columns(table)`: name -> format_type); None for a table without one."""
    out = {}
    for cat in cfg.catalogs.values():
        for t in cat.tables:
            route = None
            if t.filter is not None:
                cols = {c: ty for c, ty in columns(t).items() if c not in t.exclude_columns}
                found = route_of(parse_filter(t.name, t.filter, cols))
                if found:
                    route = Route(*found)
            out[(t.schema, t.relname)] = route
    return out


def apply(conn: psycopg.Connection, cfg: HQConfig, columns) -> list[str]:
    """In install's transaction: give each table the route hq.yaml asks for; returns the
    tables whose route changed.

    A row must never carry a route that a branch's current route does not match while its
    filter passes it.  So the table is locked against writers first (SHARE ROW EXCLUSIVE,
    as regenerating its capture takes anyway): every transaction that ran its old capture
    has ended, and none runs the new one before this commits.  Then its routed log rows
    lose their routes (every branch looks at them again; the policy decides), and capture
    and branches take the new route at the same commit.
    """
    changed = []
    want = wanted(cfg, columns)
    rows = conn.execute("SELECT id, catalog, schema_name, table_name, filter, exclude_columns, route_column, "
                        "route_param, route_type, route_capture FROM replication.tables WHERE active "
                        "ORDER BY id").fetchall()
    for tid, catalog, schema, name, flt, exclude, col, param, typ, capture in rows:
        if (schema, name) not in want:
            continue                    # kept for registered branches, not in hq.yaml: as it is
        route = want[(schema, name)]
        have = Route(col, param, typ) if col is not None else None
        if route == have and capture == (route.column if route else None):
            continue
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(sql.Identifier(schema, name)))
        if have is not None:
            conn.execute("UPDATE replication.change_log SET route = NULL WHERE table_id = %s AND route IS NOT NULL",
                         (tid,))
        conn.execute("UPDATE replication.tables SET route_column = %s, route_param = %s, route_type = %s, "
                     "route_capture = %s WHERE id = %s",
                     (route and route.column, route and route.param, route and route.type,
                      route and route.column, tid))
        # regenerate the table's capture (attach_table does it when its text changed)
        conn.execute("SELECT replication.attach_table(%s, %s, %s, %s, %s::text[])",
                     (catalog, schema, name, flt, list(exclude)))
        changed.append(table_display(schema, name))
        log.info("route of %s: %s", table_display(schema, name),
                 f"{quote_ident(route.column)} = :{route.param}" if route else "none")
    if changed:
        conn.execute("SELECT replication.build_access()")    # attach_table grants the group; take that back
    return changed
