"""Connections and migrations, shared by every stage.

Connection failures become one plain sentence (wrong password, nothing
listening, TLS refused, unknown database) that never contains the password.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from .errors import ConnectionFailed, ReplicatorError

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_MIGRATION_RE = re.compile(r"^(\d+)_([a-z0-9_]+)\.sql$")


def describe(dsn: str) -> str:
    """user@host:port/db for messages: never the password."""
    try:
        d = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparseable connection string)"
    host = d.get("host") or "local socket"
    port = d.get("port") or "5432"
    user = d.get("user") or "(default user)"
    return f"{user}@{host}:{port}/{d.get('dbname') or '(default db)'}"


def connect(dsn: str, side: str, *, autocommit: bool = False, application: str = "replicator",
            timeout: int = 10) -> psycopg.Connection:
    """Open a connection or raise ConnectionFailed with advice for a person."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise ConnectionFailed(side, f"invalid connection string: {_first_line(e)}") from None
    try:
        return psycopg.connect(dsn, autocommit=autocommit, application_name=application,
                               connect_timeout=timeout)
    except psycopg.OperationalError as e:
        raise ConnectionFailed(side, f"{describe(dsn)}: {explain(e)}") from None


def explain(e: Exception) -> str:
    """Turn libpq's message into one line that says what to check."""
    msg = _first_line(e)
    low = msg.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        return "wrong or missing password; check PGPASSWORD, ~/.pgpass or the ${VAR} in the DSN"
    if "does not exist" in low and "database" in low:
        return f"{msg}; create it or fix dbname in the DSN"
    if "role" in low and "does not exist" in low:
        return f"{msg}; register the branch on HQ (replicator hq add-branch) or fix the user"
    if "connection refused" in low:
        return "nothing is listening there (connection refused); is PostgreSQL running and the host/port right?"
    if "timeout" in low or "timed out" in low:
        return "the server did not answer in time; check the host, firewall and network"
    if "could not translate host name" in low or "name or service not known" in low:
        return "unknown host name; check the host in the DSN"
    if "ssl" in low or "certificate" in low:
        return f"TLS problem: {msg}; check sslmode and certificates"
    if "no pg_hba.conf entry" in low:
        return f"{msg}; the server's pg_hba.conf does not allow this connection"
    return msg


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    # libpq prefixes "connection failed: connection to server at ... failed: <reason>"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = lines[-1] if lines else type(e).__name__
    reason = re.sub(r"^connection to server at .*? failed: ", "", reason)
    reason = re.sub(r"^connection failed: ", "", reason)
    return reason


def migrations(kind: str) -> list[tuple[int, str, str]]:
    """The numbered SQL files for 'hq' or 'branch', in order: (version, name, text)."""
    out = []
    for path in sorted((SQL_DIR / kind).glob("*.sql")):
        m = _MIGRATION_RE.match(path.name)
        if m:
            out.append((int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    return out


def applied_versions(conn: psycopg.Connection, schema: str = "replication") -> set[int]:
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.versions",)).fetchone()[0]
    if not exists:
        return set()
    q = sql.SQL("SELECT version FROM {}.versions").format(sql.Identifier(schema))
    return {r[0] for r in conn.execute(q)}


def migrate(conn: psycopg.Connection, kind: str) -> list[str]:
    """Apply pending migrations, each in its own transaction; return their names."""
    done = []
    with conn.transaction():
        # Serialize concurrent installers on the same database.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('replicator migrate'))")
        have = applied_versions(conn)
    for version, name, text in migrations(kind):
        if version in have:
            continue
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('replicator migrate'))")
            if version in applied_versions(conn):
                continue
            conn.execute(text)
            conn.execute("INSERT INTO replication.versions (version, name) VALUES (%s, %s)",
                         (version, name))
        log.info("applied %s migration %03d_%s", kind, version, name)
        done.append(f"{version:03d}_{name}")
    return done


def require_version(conn: psycopg.Connection, kind: str, side: str) -> None:
    """Refuse to work against a database whose replication schema is older than us."""
    want = {v for v, _, _ in migrations(kind)}
    have = applied_versions(conn)
    if not have:
        hint = "run `replicator hq install -c hq.yaml`" if kind == "hq" else "run `replicator init`"
        raise ReplicatorError(f"{side} has no replication schema; {hint}")
    if want - have:
        hint = "run `replicator hq install -c hq.yaml`" if kind == "hq" else "run `replicator init`"
        raise ReplicatorError(f"{side} replication schema is out of date "
                              f"(missing migrations {sorted(want - have)}); {hint}")
