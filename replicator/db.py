"""Connections and migrations, shared by every stage.

Connection failures become one plain sentence (wrong password, nothing
listening, TLS refused, unknown database) that never contains the password.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from .errors import ConnectionFailed, ReplicatorError

log = logging.getLogger(__name__)


def data_dir(name: str, packaged_as: str | None = None) -> Path:
    """A top-level directory of the project (sql/, config/): shipped inside the package by a
    wheel (pyproject.toml maps it there), beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / (packaged_as or name)
    return packaged if packaged.is_dir() else here.parent / name


SQL_DIR = data_dir("sql")
_MIGRATION_RE = re.compile(r"^(\d+)_([a-z0-9_]+)\.sql$")


def describe(dsn: str) -> str:
    """user@host:port/db for messages: never the password."""
    try:
        d = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparseable connection string)"
    if "@" in (d.get("host") or ""):
        return "(connection string with '@' in its host name)"
    host = d.get("host") or "local socket"
    port = d.get("port") or "5432"
    user = d.get("user") or "(default user)"
    return f"{user}@{host}:{port}/{d.get('dbname') or '(default db)'}"


def check_dsn(dsn: str, side: str) -> dict:
    """Parse a connection string, or say what is wrong with it without quoting any of it.

    libpq's own message quotes the offending token, which may be the password (a bad
    %-escape in it, a keyword DSN missing '='), so it is never shown as it is.
    """
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise ConnectionFailed(side, f"invalid connection string: {_dsn_problem(e)}") from None
    if "@" in (parts.get("host") or ""):
        # postgresql://user:p@ss@host: libpq splits at the first '@', so the rest of the
        # password became the host name (and would show up in every error about it).
        raise ConnectionFailed(side, "invalid connection string: the host name contains '@'; "
                                     "write an '@' inside the user name or password as %40")
    return parts


_DSN_PROBLEMS = (
    ("percent-encoded", "a %-escape is not valid (write a literal % as %25)"),
    ('missing "="', "a word without '=' (write keyword=value pairs; quote a value with spaces in single quotes)"),
    ("unterminated quoted string", "a quoted value is not closed"),
    ("invalid connection option", "an unknown keyword (see libpq's connection parameters)"),
    ("invalid URI query parameter", "an unknown ?parameter (see libpq's connection parameters)"),
    ("invalid integer value", "a number is not valid (port, connect_timeout)"),
    ("ipv6", "an IPv6 address is not closed with ']'"),
)


def _dsn_problem(e: Exception) -> str:
    low = str(e).lower()
    for needle, text in _DSN_PROBLEMS:
        if needle.lower() in low:
            return text
    return "libpq cannot parse it (its message is not shown: it may quote the password)"


def connect(dsn: str, side: str, *, autocommit: bool = False, application: str = "replicator",
            timeout: int = 10, session_attrs: str | None = None) -> psycopg.Connection:
    """Open a connection or raise ConnectionFailed with advice for a person.  session_attrs:
    libpq's target_session_attrs, which host of a multi-host DSN to take."""
    secret = check_dsn(dsn, side).get("password")
    extra = {"target_session_attrs": session_attrs} if session_attrs else {}
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, application_name=application,
                               connect_timeout=timeout, **extra)
    except psycopg.OperationalError as e:
        kind, why = classify(e)
        reason = f"{describe(dsn)}: {why}"
        if secret:
            reason = reason.replace(secret, "***")
        raise ConnectionFailed(side, reason, retry=kind == RETRY) from None
    # psycopg reads dates and intervals only in ISO / postgres output style; a server or database
    # set to DateStyle 'SQL, DMY' (usual in Latin America) would make every timestamp unreadable.
    # Only the output style changes: the day/month order for input stays the server's.
    # Every connection speaks UTF-8, whatever its server's encoding: text copied from HQ to a
    # LATIN1 or WIN1252 branch (binary COPY, binary records) is converted by that server, and
    # a character it cannot hold is an error there, never bytes stored as the wrong letters.
    conn.execute("SELECT set_config('DateStyle', 'ISO', false), set_config('IntervalStyle', 'postgres', false), "
                 "set_config('client_encoding', 'UTF8', false)")
    if not autocommit:
        conn.commit()
    return conn


def explain(e: Exception) -> str:
    """Turn libpq's message into one line that says what to check."""
    return classify(e)[1]


# What a failed connection means for a running replicator: wait and reconnect (the server
# or the network is away), or stop (a person must fix the DSN, the password, the role).
RETRY, FIX = "retry", "fix"

# SQLSTATEs of a server that is going away or not ready yet (class 08: connection
# exception; 57P01-57P03: shutdown, crash, "cannot connect now": starting, recovering).
_OUTAGE_STATES = {"57P01": "the server shut down or an administrator ended the session",
                  "57P02": "the server crashed and is restarting",
                  "57P03": "the server is starting up, shutting down or recovering"}


def classify(e: Exception) -> tuple[str, str]:
    """(RETRY or FIX, one line saying what to check) for a failed connection or statement.

    By SQLSTATE where the server sent one (a statement on a live connection).  A failed
    connection attempt has none: libpq reports it as text only (psycopg's error carries no
    SQLSTATE for it), so there the message decides, once, here."""
    state = getattr(e, "sqlstate", None)
    if state in _OUTAGE_STATES:
        return RETRY, _OUTAGE_STATES[state]
    if state and state.startswith("08"):
        return RETRY, "the connection was lost"
    msg = _first_line(e)
    low = str(e).lower()   # every line: libpq puts the reason before its hint line
    for needles, kind, text in _CONNECT_FAILURES:
        if all(any(n in low for n in group) for group in needles):
            return kind, text.format(msg=msg)
    return (RETRY, _explain_outage(low)) if _explain_outage(low) else (RETRY, msg)


# libpq's messages for a failed connection attempt, first match wins: (needles: every group
# must have one of its words in the message, kind, text).
_CONNECT_FAILURES = (
    ((("password authentication failed", "no password supplied"),), FIX,
     "wrong or missing password; check PGPASSWORD, ~/.pgpass or the ${{VAR}} in the DSN"),
    ((("database",), ("does not exist",)), FIX, "{msg}; create it or fix dbname in the DSN"),
    ((("role",), ("does not exist",)), FIX,
     "{msg}; register the branch on HQ (replicator hq add-branch) or fix the user"),
    ((("connection refused",),), RETRY,
     "nothing is listening there (connection refused); is PostgreSQL running and the host/port right?"),
    ((("timeout", "timed out"),), RETRY, "the server did not answer in time; check the host, firewall and network"),
    ((("could not translate host name", "name or service not known"),), RETRY,
     "unknown host name; check the host in the DSN"),
    ((("server does not support ssl",),), FIX, "the server does not accept TLS connections, but the DSN requires "
     "TLS (sslmode); enable ssl on the server or change sslmode in the DSN"),
    ((("ssl", "certificate"),), FIX, "TLS problem: {msg}; check sslmode and certificates"),
    ((("no pg_hba.conf entry",),), FIX, "{msg}; the server's pg_hba.conf does not allow this connection"),
    ((("permission denied",),), FIX,
     "{msg}; the login may not connect there: check its privileges (CONNECT)"),
)


_OUTAGES = (
    ("server closed the connection unexpectedly", "the server closed the connection (restart, crash or network cut)"),
    ("terminating connection due to administrator command", "the server shut down or an administrator ended the session"),
    ("the database system is starting up", "the server is starting up"),
    ("the database system is shutting down", "the server is shutting down"),
    ("the database system is in recovery mode", "the server is recovering from a crash"),
    ("the connection is lost", "the connection was lost"),
    ("the connection is closed", "the connection was lost"),
)


def _explain_outage(low: str) -> str | None:
    """The server went away under us: say so plainly (the daemon reconnects)."""
    for needle, text in _OUTAGES:
        if needle in low:
            return text
    return None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    # libpq prefixes "connection failed: connection to server at ... failed: <reason>"
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith(_HINT_LINES)]
    reason = lines[-1] if lines else type(e).__name__
    reason = re.sub(r"^connection failed: ", "", reason)
    reason = re.sub(r"^connection to server at .*? failed: ", "", reason)
    return re.sub(r"^(FATAL|ERROR):\s+", "", reason)


# libpq's second lines are hints for people, not the reason.
_HINT_LINES = ("Is the server", "This probably means", "before or while")


SIDES = ("capture", "target")
_HINTS = {"capture": "run `replicator hq install -c hq.yaml`", "target": "run `replicator init`"}


def migrations(side: str) -> list[tuple[int, str, str]]:
    """The numbered SQL files of one side ('capture' or 'target'), in order: (version, name, text).
    They hold tables, indexes, roles and grants, and run once each."""
    out = []
    for path in sorted((SQL_DIR / side).glob("*.sql")):
        m = _MIGRATION_RE.match(path.name)
        if m:
            out.append((int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    return out


def repeatables(side: str) -> list[tuple[str, str]]:
    """One side's files applied again whenever their text changes, in order: (name, text).
    functions/ holds each function in one file (CREATE OR REPLACE, its grants); hooks.sql,
    where a side has one, the objects that call them, created after them."""
    side_dir = SQL_DIR / side
    paths = sorted((side_dir / "functions").glob("*.sql")) + sorted(side_dir.glob("hooks.sql"))
    return [(path.relative_to(side_dir).as_posix(), path.read_text(encoding="utf-8")) for path in paths]


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def versions_sql() -> str:
    """The record of migrations, keyed by side; run before either side's migrations."""
    return (SQL_DIR / "versions.sql").read_text(encoding="utf-8")


def applied_versions(conn: psycopg.Connection, side: str) -> set[int]:
    """Versions of one side recorded in this database (none if nothing is installed).  A
    record from a release before sides existed has no side column: the side it belongs to
    is told by what the database holds, as sql/versions.sql will record it."""
    cols = {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass('replication.versions') "
        "AND attnum > 0 AND NOT attisdropped")}
    if not cols:
        return set()
    if "side" not in cols:
        capture = conn.execute("SELECT to_regclass('replication.change_log') IS NOT NULL").fetchone()[0]
        if (side == "capture") != capture:
            return set()
        return {r[0] for r in conn.execute("SELECT version FROM replication.versions")}
    return {r[0] for r in conn.execute("SELECT version FROM replication.versions WHERE side = %s", (side,))}


def applied_repeatables(conn: psycopg.Connection, side: str) -> dict[str, str]:
    """Name -> checksum of the repeatable files last applied to one side (none before this
    layout: a release that kept functions inside its numbered migrations)."""
    if conn.execute("SELECT to_regclass('replication.repeatables')").fetchone()[0] is None:
        return {}
    return dict(conn.execute("SELECT name, checksum FROM replication.repeatables WHERE side = %s", (side,)))


_RECORD_REPEATABLE = ("INSERT INTO replication.repeatables (side, name, checksum) VALUES ({side}, {name}, {sum}) "
                      "ON CONFLICT (side, name) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()")


def migration_script(side: str, heading: str = "migration") -> list[str]:
    """One side's migrations as script blocks for a DBA's migration tool: each numbered one
    refuses to run twice and records itself, as `migrate` does; then one block of the
    repeatable files, which may run again (it re-creates the functions and records them)."""
    blocks = [f"\n-- {heading} {version:03d}_{name}\nBEGIN;\n"
              f"DO $v$ BEGIN IF EXISTS (SELECT FROM replication.versions "
              f"WHERE side = '{side}' AND version = {version}) THEN "
              f"RAISE EXCEPTION 'migration {version} already applied: skip this block'; "
              f"END IF; END $v$;\n{text.rstrip()}\n"
              f"INSERT INTO replication.versions (side, version, name) VALUES ('{side}', {version}, '{name}');\n"
              "COMMIT;" for version, name, text in migrations(side)]
    files = repeatables(side)
    body = "\n".join(f"-- {name}\n{text.rstrip()}\n" + _RECORD_REPEATABLE.format(
        side=f"'{side}'", name=f"'{name}'", sum=f"'{checksum(text)}'") + ";" for name, text in files)
    blocks.append(f"\n-- {heading}: functions ({len(files)} files, repeatable: apply again after an upgrade)\n"
                  f"BEGIN;\n{body}\nCOMMIT;")
    return blocks


def migrate(conn: psycopg.Connection, side: str) -> list[str]:
    """Apply one side's pending numbered migrations, then the repeatable files whose text
    changed, all in one transaction (no moment with a table's row security on and its
    policy not yet created); return what was applied."""
    done = []
    with conn.transaction():
        # Serialize concurrent installers on the same database.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('replicator migrate'))")
        _require_other_side_current(conn, side)
        conn.execute(versions_sql())
        have = applied_versions(conn, side)
        for version, name, text in migrations(side):
            if version in have:
                continue
            conn.execute(text)
            conn.execute("INSERT INTO replication.versions (side, version, name) VALUES (%s, %s, %s)",
                         (side, version, name))
            log.info("applied %s migration %03d_%s", side, version, name)
            done.append(f"{version:03d}_{name}")
        applied = applied_repeatables(conn, side)
        for name, text in repeatables(side):
            if applied.get(name) == checksum(text):
                continue
            conn.execute(text)
            conn.execute(sql.SQL(_RECORD_REPEATABLE).format(
                side=sql.Literal(side), name=sql.Literal(name), sum=sql.Literal(checksum(text))))
            log.info("applied %s %s", side, name)
            done.append(name)
    return done


def _require_other_side_current(conn: psycopg.Connection, side: str) -> None:
    """Both sides in one database need each other at this release: an older target side
    still uses names capture's migrations create (replication.tables), so installing one
    side beside an older other side would fail half-way.  Say which to upgrade first."""
    other = SIDES[1 - SIDES.index(side)]
    have = applied_versions(conn, other)
    missing = {v for v, _, _ in migrations(other)} - have
    if have and missing:
        raise ReplicatorError(
            f"this database also holds replication's {other} side from an older release "
            f"(missing its migrations {sorted(missing)}); upgrade that side first: {_HINTS[other]}")


def require_version(conn: psycopg.Connection, side: str, label: str) -> None:
    """Refuse to work against a database whose replication schema is older than us."""
    want = {v for v, _, _ in migrations(side)}
    have = applied_versions(conn, side)
    if not have:
        raise ReplicatorError(f"{label} has no replication schema; {_HINTS[side]}")
    if want - have:
        raise ReplicatorError(f"{label} replication schema is out of date "
                              f"(missing migrations {sorted(want - have)}); {_HINTS[side]}")
    # Only by name: a newer install may have re-created a function this release knows
    # (a release that needs a function's new behaviour gives it a new name).
    applied = applied_repeatables(conn, side)
    missing = [name for name, _ in repeatables(side) if name not in applied]
    if missing:
        raise ReplicatorError(f"{label} replication schema is out of date (missing {', '.join(missing)}); "
                              f"{_HINTS[side]}")
