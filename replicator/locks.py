"""Advisory locks on a target database, keyed by stream.

Two locks per stream, both on the target database (a source is never locked for a target's
sake):

- the run lock, a session lock `run` holds while it works, so one `run` per stream and
  target, and `verify` can tell whether a replicator is running;
- the copy lock, a transaction lock that init's copies and verify's repair take, so they
  exclude each other (a running apply is held off by the position row lock instead).

Each lock is (KEY, n): n is 1 (run) or 2 (copy) for the catalog stream, the numbers the
releases before streams used, so an old `run` and a new one exclude each other during an
upgrade; another stream's n adds a number derived from its name.
"""
from __future__ import annotations

import zlib

import psycopg

from .stream import CATALOGS

KEY = 0x7265706C  # 'repl'
RUN, COPY = 1, 2


def _objid(stream: str, kind: int) -> int:
    if stream == CATALOGS:
        return kind
    return (zlib.crc32(stream.encode()) % 0x1FFFFFFF + 1) << 2 | kind   # never 1 or 2; fits int4


def try_run(conn: psycopg.Connection, stream: str) -> bool:
    return conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (KEY, _objid(stream, RUN))).fetchone()[0]


def copy(conn: psycopg.Connection, stream: str) -> None:
    """Wait for the copy lock until the current transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (KEY, _objid(stream, COPY)))


_HOLDER = """
SELECT a.pid, a.application_name, coalesce(a.client_addr::text, 'local'), a.backend_start
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"""


def run_holder(conn: psycopg.Connection, stream: str) -> tuple | None:
    """(pid, application, client, since) of the session holding the stream's run lock."""
    return conn.execute(_HOLDER, (KEY, _objid(stream, RUN))).fetchone()
