"""Rows set aside on a branch: a change the branch refuses waits there, the stream goes on.

A refusal that is about one row (its values break a local constraint or do not fit a
local column) must not stop every other change: the row is set aside with the reason,
in the same transaction as the rest of its chunk (branch migration 003).  A failure
that is not about one row (a missing column, a dropped table, a permission) is not a
data error and still stops the stream, naming it.

Per key, order holds: a newer change of a set-aside key is tried after it and replaces
it (accepted: the key is clear; refused: the newer image waits instead), because each
change carries the whole row.  `replicator run` retries what waits at start and every
RETRY_INTERVAL seconds, so a DBA's fix applies without anyone asking.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import psycopg

from .config import table_display

log = logging.getLogger(__name__)

RETRY_INTERVAL = 60.0

# SQLSTATE classes about a row's values: data exceptions (22: too long, out of range,
# untranslatable character, invalid text) and integrity violations (23: CHECK, UNIQUE,
# NOT NULL, foreign keys that an ENABLE ALWAYS trigger enforces).
_ROW_CLASSES = ("22", "23")


def about_one_row(e: psycopg.Error, sliced: bool = False) -> bool:
    """sliced: the target confines this login to its slice (uploads into HQ), where a row
    outside it, or a key another branch owns, is refused by row-level security."""
    return bool(e.sqlstate) and (e.sqlstate[:2] in _ROW_CLASSES or (sliced and outside_slice(e) is not None))


def outside_slice(e: psycopg.Error) -> str | None:
    """'another' when the key belongs to another branch's row, 'outside' when the row is not
    in this branch's slice, None when the error is no slice refusal."""
    message = e.diag.message_primary or ""
    if e.sqlstate != "42501" or not message.startswith("new row violates row-level security policy"):
        return None
    return "another" if "(USING expression)" in message else "outside"


@dataclass
class AsideRow:
    schema: str
    table: str
    key: str
    op: str
    sqlstate: str
    constraint: str | None
    message: str
    since: datetime
    attempts: int

    @property
    def qualified(self) -> str:
        return table_display(self.schema, self.table)

    def line(self) -> str:
        why = f"{self.constraint}: " if self.constraint else ""
        return (f"{self.qualified} key {self.key}: {why}{self.message} (SQLSTATE {self.sqlstate}; set aside "
                f"since {self.since:%Y-%m-%d %H:%M:%S}, {self.attempts} attempt{'s' * (self.attempts != 1)})")


def has_table(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('replication.set_aside') IS NOT NULL").fetchone()[0]


def rows(conn: psycopg.Connection, stream: str) -> list[AsideRow]:
    if not has_table(conn):
        return []
    return [AsideRow(*r) for r in conn.execute(
        "SELECT schema_name, table_name, key, op::text, sqlstate, constraint_name, message, since, attempts "
        "FROM replication.set_aside WHERE stream = %s ORDER BY since, schema_name, table_name, key",
        (stream,))]


def keys_by_table(conn: psycopg.Connection, stream: str) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    if has_table(conn):
        for schema, table, key in conn.execute(
                "SELECT schema_name, table_name, key FROM replication.set_aside WHERE stream = %s",
                (stream,)):
            out.setdefault((schema, table), set()).add(key)
    return out


def put(conn: psycopg.Connection, stream: str, schema: str, table: str, key: str, op: str, image, e: psycopg.Error,
        message: str | None = None, unit: str | None = None) -> None:
    """Set the change aside (or replace the key's older one, keeping when it first waited).
    unit: the source transaction it stands or falls with (uploads), or None."""
    put_reason(conn, stream, schema, table, key, op, image, e.sqlstate, e.diag.constraint_name,
               message or e.diag.message_primary or str(e), unit)


def put_reason(conn: psycopg.Connection, stream: str, schema: str, table: str, key: str, op: str, image,
               sqlstate: str, constraint: str | None, message: str, unit: str | None = None) -> None:
    text, record = (image.encode(), None) if isinstance(image, str) else (None, bytes(image))
    conn.execute(
        """INSERT INTO replication.set_aside AS a (stream, schema_name, table_name, key, op, image, record,
                  sqlstate, constraint_name, message, unit)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (stream, schema_name, table_name, key) DO UPDATE
              SET op = EXCLUDED.op, image = EXCLUDED.image, record = EXCLUDED.record,
                  sqlstate = EXCLUDED.sqlstate, constraint_name = EXCLUDED.constraint_name,
                  message = EXCLUDED.message, unit = EXCLUDED.unit, tried_at = now(), attempts = a.attempts + 1""",
        (stream, schema, table, key, "D" if op == "D" else "U", text, record, sqlstate, constraint, message, unit))


def units_of(conn: psycopg.Connection, stream: str, keys: list[tuple[str, str, str]]) -> list[str]:
    """The units that hold any of these (schema, table, key)s."""
    if not keys:
        return []
    return [u for (u,) in conn.execute(
        "SELECT DISTINCT unit FROM replication.set_aside WHERE stream = %s AND unit IS NOT NULL "
        "AND (schema_name, table_name, key) IN (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))",
        (stream, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]))]


def unit_rows(conn: psycopg.Connection, stream: str, units: list[str]) -> list[tuple]:
    """(schema, table, key, op, image text, record, unit) of whole units, oldest first."""
    return [(schema, table, key, op, image.decode() if image is not None else None, record, unit)
            for schema, table, key, op, image, record, unit in conn.execute(
                "SELECT schema_name, table_name, key, op::text, image, record, unit FROM replication.set_aside "
                "WHERE stream = %s AND unit = ANY (%s) ORDER BY since, key", (stream, units))]


def clear_units(conn: psycopg.Connection, stream: str, units: list[str]) -> None:
    conn.execute("DELETE FROM replication.set_aside WHERE stream = %s AND unit = ANY (%s)", (stream, units))


def retag_units(conn: psycopg.Connection, stream: str, units: list[str], unit: str) -> None:
    """Waiting units joined into one (they go up together or not at all)."""
    conn.execute("UPDATE replication.set_aside SET unit = %s WHERE stream = %s AND unit = ANY (%s)",
                 (unit, stream, units))


def touch_units(conn: psycopg.Connection, stream: str, units: list[str]) -> None:
    """Tried again and refused again."""
    conn.execute("UPDATE replication.set_aside SET tried_at = now(), attempts = attempts + 1 "
                 "WHERE stream = %s AND unit = ANY (%s)", (stream, units))


def first_reason(conn: psycopg.Connection, stream: str, units: list[str]) -> tuple[str, str | None, str]:
    """(sqlstate, constraint, message) of the oldest refusal among these units."""
    return conn.execute("SELECT sqlstate, constraint_name, message FROM replication.set_aside WHERE stream = %s "
                        "AND unit = ANY (%s) ORDER BY since LIMIT 1", (stream, units)).fetchone()


def clear(conn: psycopg.Connection, stream: str, schema: str, table: str, key: str | None = None) -> None:
    """A newer change of the key was accepted (or HQ truncated the table): nothing waits."""
    conn.execute("DELETE FROM replication.set_aside WHERE stream = %s AND schema_name = %s AND table_name = %s "
                 "AND (%s::text IS NULL OR key = %s)", (stream, schema, table, key, key))


def stored(conn: psycopg.Connection, stream: str, schema: str, table: str) -> list[tuple[str, str, str | None, bytes | None]]:
    """(key, op, image text, record) of what waits for one table alone (not in a unit), oldest first."""
    return [(key, op, image.decode() if image is not None else None, record) for key, op, image, record in conn.execute(
        "SELECT key, op::text, image, record FROM replication.set_aside WHERE stream = %s "
        "AND schema_name = %s AND table_name = %s AND unit IS NULL ORDER BY since, key", (stream, schema, table))]


def units(conn: psycopg.Connection, stream: str) -> list[str]:
    """Every unit that waits, oldest first."""
    return [u for (u,) in conn.execute(
        "SELECT unit FROM replication.set_aside WHERE stream = %s AND unit IS NOT NULL GROUP BY unit "
        "ORDER BY min(since), unit", (stream,))]


_COLUMNS = ("stream, schema_name, table_name, key, op, image, record, sqlstate, constraint_name, message, "
            "since, tried_at, attempts, unit")


def discard(conn: psycopg.Connection, stream: str, qualified: str, key: str) -> int:
    """Move one set-aside row to replication.discarded (who, when): the only way one goes
    without being applied.  A row that stands with its source transaction (a sale's line)
    takes the whole transaction with it: HQ never gets half of it.  Returns rows moved."""
    from .config import parse_table_name
    schema, table = parse_table_name(qualified)
    return conn.execute(
        f"""WITH one AS (SELECT unit FROM replication.set_aside WHERE stream = %(s)s AND schema_name = %(n)s
                           AND table_name = %(t)s AND key = %(k)s),
                 gone AS (DELETE FROM replication.set_aside a WHERE stream = %(s)s
                           AND ((schema_name = %(n)s AND table_name = %(t)s AND key = %(k)s)
                                OR unit = (SELECT unit FROM one)) RETURNING {_COLUMNS})
            INSERT INTO replication.discarded ({_COLUMNS}) SELECT {_COLUMNS} FROM gone""",
        {"s": stream, "n": schema, "t": table, "k": key}).rowcount
