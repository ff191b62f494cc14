"""A target's own state per stream: its position in the source's log and per-table copies.

Like pgcopydb's sentinel, progress is a row in the target database, written
in the same transaction as the rows it covers, and printed by `status`.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from . import db
from .errors import ReplicatorError
from .config import table_display


@dataclass
class Position:
    snapshot: str                    # everything visible in it is applied
    window_snapshot: str | None = None
    window_last_id: int = 0
    config_version: int = 0
    applied_changes: int = 0
    applied_until: datetime | None = None
    updated_at: datetime | None = None


@dataclass
class TableState:
    schema: str
    name: str
    catalog: str
    copy_snapshot: str | None
    initialized_at: datetime | None
    rows_copied: int | None

    @property
    def qualified(self) -> str:
        return table_display(self.schema, self.name)


def ensure_schema(conn: psycopg.Connection) -> list[str]:
    """Create or upgrade the branch's replication schema."""
    return db.migrate(conn, "target")


def require_current(conn: psycopg.Connection) -> None:
    """status, verify and set-aside read this release's state tables; a target still on an
    older release's schema is upgraded by its next `run`, `init` or `check`, never by a read."""
    have = db.applied_versions(conn, "target")
    missing = sorted({v for v, _, _ in db.migrations("target")} - have) if have else []
    if missing:
        raise ReplicatorError(f"this branch's replication schema is from an older release (missing target "
                              f"migrations {missing}); upgrade it with `replicator check` or `replicator run --once` "
                              "of this release")


def has_schema(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('replication.position') IS NOT NULL").fetchone()[0]


def load_position(conn: psycopg.Connection, stream: str, lock: bool = False, schema_known: bool = False
                  ) -> Position | None:
    """The stream's position; with lock=True it is held until the transaction ends,
    which serializes apply, init and repair on one branch.  schema_known skips the
    existence check: the apply loop asks several times per window on a branch it
    already loaded, and each check is a round trip."""
    if not schema_known and not has_schema(conn):
        return None
    q = ("SELECT snapshot::text, window_snapshot::text, window_last_id, config_version, "
         "applied_changes, applied_until, updated_at FROM replication.position WHERE stream = %s")
    if lock:
        q += " FOR UPDATE"
    row = conn.execute(q, (stream,)).fetchone()
    return Position(*row) if row else None


def save_position(conn: psycopg.Connection, stream: str, pos: Position, applied: int = 0) -> None:
    conn.execute(
        """INSERT INTO replication.position AS p (stream, snapshot, window_snapshot, window_last_id,
                  config_version, applied_changes, applied_until, updated_at)
           VALUES (%s, %s::pg_snapshot, %s::pg_snapshot, %s, %s, %s, %s, now())
           ON CONFLICT (stream) DO UPDATE SET snapshot = EXCLUDED.snapshot,
                  window_snapshot = EXCLUDED.window_snapshot, window_last_id = EXCLUDED.window_last_id,
                  config_version = EXCLUDED.config_version,
                  applied_changes = p.applied_changes + %s,
                  applied_until = GREATEST(p.applied_until, EXCLUDED.applied_until), updated_at = now()""",
        (stream, pos.snapshot, pos.window_snapshot, pos.window_last_id, pos.config_version,
         applied, pos.applied_until, applied))


def table_states(conn: psycopg.Connection, stream: str) -> dict[str, TableState]:
    if not has_schema(conn):
        return {}
    rows = conn.execute(
        "SELECT schema_name, table_name, catalog, copy_snapshot::text, initialized_at, rows_copied "
        "FROM replication.target_tables WHERE stream = %s", (stream,)).fetchall()
    return {table_display(r[0], r[1]): TableState(*r) for r in rows}


def mark_copied(conn: psycopg.Connection, stream: str, schema: str, name: str, catalog: str,
                snapshot: str, rows: int) -> None:
    conn.execute(
        """INSERT INTO replication.target_tables (stream, schema_name, table_name, catalog, copy_snapshot,
                                           initialized_at, rows_copied)
           VALUES (%s, %s, %s, %s, %s::pg_snapshot, now(), %s)
           ON CONFLICT (stream, schema_name, table_name) DO UPDATE
              SET catalog = EXCLUDED.catalog, copy_snapshot = EXCLUDED.copy_snapshot,
                  initialized_at = now(), rows_copied = EXCLUDED.rows_copied""",
        (stream, schema, name, catalog, snapshot, rows))


def bump_config(conn: psycopg.Connection, stream: str) -> None:
    """Tell a running apply loop that table states changed under it."""
    conn.execute("UPDATE replication.position SET config_version = config_version + 1 WHERE stream = %s",
                 (stream,))
