"""HQ administration: branch registration, status and log pruning.

Branches are registered on HQ with their row-filter parameters, so HQ, not
the branch, decides which rows a branch receives.  Each branch gets a login
role that can read the log and its catalogs and report its own position,
nothing more (DESIGN §3.6).
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import db
from .config import HQConfig
from .errors import ConfigError

log = logging.getLogger(__name__)


def role_name(branch: str) -> str:
    return "replicator_" + re.sub(r"[^a-z0-9_]", "_", branch.lower())[:50]


@dataclass
class Registration:
    branch: str
    role: str
    password: str | None      # set only when we generated it: shown once
    params: dict
    branch_yaml: str


def add_branch(conn: psycopg.Connection, cfg: HQConfig, branch: str, params: dict,
               password: str | None = None) -> Registration:
    """Create or update the branch's registration and login role."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", branch):
        raise ConfigError("use letters, digits, '-', '_' or '.' (max 63)", None, None, "BRANCH", branch)
    db.require_version(conn, "hq", "HQ")
    _check_params(conn, params)
    role = role_name(branch)
    generated = None
    with conn.transaction():
        _check_role(conn, branch, role)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if not exists:
            if password is None:
                password = generated = secrets.token_urlsafe(18)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
                         .format(sql.Identifier(role), sql.Literal(_verifier(conn, role, password))))
        elif password is not None:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(_verifier(conn, role, password))))
        else:
            log.warning("role %s already exists; its password is unchanged (pass --password-env to set one)", role)
        conn.execute(sql.SQL("GRANT replicator_branch TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), sql.Identifier(role)))
        conn.execute(
            """INSERT INTO replication.branches (name, role, params) VALUES (%s, %s, %s)
               ON CONFLICT (name) DO UPDATE SET params = EXCLUDED.params, role = EXCLUDED.role, active = true""",
            (branch, role, psycopg.types.json.Jsonb(params)))
    log.info("branch %s registered with role %s and parameters %s", branch, role, params)
    return Registration(branch, role, generated, params, branch_yaml(cfg, branch, role, params))


def _check_role(conn: psycopg.Connection, branch: str, role: str) -> None:
    """One login per branch, and never one that can do more than a branch needs."""
    other = conn.execute("SELECT name FROM replication.branches WHERE role = %s AND name <> %s",
                         (role, branch)).fetchone()
    if other:
        raise ConfigError(f"its login role {role} already belongs to branch {other[0]}; "
                          "choose a branch name that differs in more than case or punctuation",
                          None, None, "BRANCH", branch)
    row = conn.execute("SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls "
                       "FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    if row and row[0]:
        raise ConfigError(f"role {role} already exists with more privileges than a branch needs "
                          "(superuser, createrole, createdb, replication or bypassrls); "
                          "drop it or choose another branch name", None, None, "BRANCH", branch)


def _verifier(conn: psycopg.Connection, role: str, password: str) -> str:
    """A SCRAM verifier computed here, so the password itself never reaches HQ's logs."""
    return conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()


def _check_params(conn: psycopg.Connection, params: dict) -> None:
    """Every filter placeholder must be given and fit its column; unknown names are likely typos.

    Each filter is planned once on HQ with the values bound, so "store_id=4x"
    is refused here, not on every poll of the branch later.
    """
    from .capture import hq_columns
    from .filters import parse_filter, render
    filters = []
    for schema, table, text in conn.execute(
            "SELECT schema_name, table_name, filter FROM replication.tables "
            "WHERE active AND filter IS NOT NULL ORDER BY id"):
        filters.append((schema, table, parse_filter(f"{schema}.{table}", text,
                                                    hq_columns(conn, schema, table))))
    needed = set().union(*(f.params for _, _, f in filters))
    missing = needed - set(params)
    if missing:
        raise ConfigError(f"row filters on HQ need {', '.join(sorted(missing))}; pass --param "
                          + " --param ".join(f"{m}=VALUE" for m in sorted(missing)), None, None, "--param")
    unknown = set(params) - needed
    if unknown:
        log.warning("parameters %s are not used by any filter on HQ", ", ".join(sorted(unknown)))
    for schema, table, flt in filters:
        query = sql.SQL("SELECT FROM {} WHERE ({}) LIMIT 0").format(
            sql.Identifier(schema, table), render(flt, params, sql.Identifier))
        try:
            with conn.transaction():
                conn.execute(query)
        except psycopg.errors.DataError as e:
            given = ", ".join(f"{k}={params[k]}" for k in sorted(flt.params))
            raise ConfigError(f"{given} does not fit the row filter of {schema}.{table} ({flt.text}): "
                              f"{e.diag.message_primary}", None, None, "--param") from None


def branch_yaml(cfg: HQConfig, branch: str, role: str, params: dict | None = None) -> str:
    """A ready branch.yaml; the password is never written into it."""
    dsn = _branch_dsn(cfg.dsn, role)
    defaults = ", ".join(c.name for c in cfg.catalogs.values() if c.default) or "none"
    rows = ", ".join(f"{k}={v}" for k, v in (params or {}).items())
    return (f"# branch.yaml for {branch}, generated by `replicator hq add-branch` on {datetime.now():%Y-%m-%d}\n"
            f"# Check it with: replicator check -c branch.yaml\n"
            f"branch: {branch}\n"
            + (f"# HQ sends this branch only its own rows of filtered catalogs ({rows})\n" if rows else "")
            + f"source:\n"
            f"  # HQ; the password is not written here: use ~/.pgpass, PGPASSWORD or ${{VAR}}\n"
            f"  dsn: {json.dumps(dsn, ensure_ascii=False)}\n"
            f"target:\n"
            f"  dsn: \"postgresql:///pos\"   # this branch's own database\n"
            f"# Catalogs to keep updated. Omitted: HQ's defaults ({defaults}).\n"
            f"# HQ offers: {', '.join(cfg.catalogs)}\n"
            f"# catalogs: [items, stock]\n")


def _branch_dsn(hq_dsn: str, role: str) -> str:
    """HQ's address for the branch's login: same host, port, database and TLS settings,
    without the admin's user and password, every part URL-quoted."""
    d = {k: v for k, v in conninfo_to_dict(hq_dsn).items() if k not in ("password", "user", "passfile")}
    host = d.pop("host", None) or "localhost"
    port = d.pop("port", None)
    dbname = d.pop("dbname", None) or "postgres"
    if "," in host or host.startswith("/"):
        # multi-host (standbys) or a socket directory: keyword form says it plainly
        return make_conninfo("", host=host, port=port, dbname=dbname, user=role, **d)
    netloc = f"[{host}]" if ":" in host else quote(host, safe="")
    extra = urlencode(d, quote_via=quote)
    return (f"postgresql://{quote(role, safe='')}@{netloc}{':' + str(port) if port else ''}"
            f"/{quote(dbname, safe='')}" + (f"?{extra}" if extra else ""))


@dataclass
class BranchStatus:
    name: str
    role: str
    params: dict
    active: bool
    acked_at: datetime | None
    applied_until: datetime | None
    pending: int | None          # logged changes not yet in its acked position
    lag: timedelta | None        # age of the oldest of those


def status(conn: psycopg.Connection) -> list[BranchStatus]:
    db.require_version(conn, "hq", "HQ")
    rows = conn.execute(
        """SELECT b.name, b.role, b.params, b.active, b.acked_at, b.applied_until, p.pending,
                  now() - p.oldest
             FROM replication.branches b
             LEFT JOIN LATERAL (
                  SELECT coalesce(sum(coalesce(cardinality(l.rows), 1)), 0) AS pending, min(l.ts) AS oldest
                    FROM replication.change_log l
                   WHERE l.xid >= pg_snapshot_xmin(b.position)
                     AND NOT pg_visible_in_snapshot(l.xid, b.position)) p ON b.position IS NOT NULL
            ORDER BY b.name""").fetchall()
    return [BranchStatus(*r) for r in rows]


@dataclass
class PruneReport:
    deleted: int
    horizon: str
    kept_for: list[str]


def prune(conn: psycopg.Connection, cfg: HQConfig, batch: int = 10000) -> PruneReport:
    """Delete log rows every active branch has applied and older than the retention.

    Batched deletes in short transactions, so autovacuum keeps up and no
    long lock is held; the horizon records what is gone so a branch that
    still needed it is told to re-initialize instead of skipping a hole.
    """
    db.require_version(conn, "hq", "HQ")
    with conn.transaction():
        h = conn.execute(
            """SELECT least(
                    coalesce((SELECT min(pg_snapshot_xmin(position)) FROM replication.branches
                               WHERE active AND position IS NOT NULL), pg_snapshot_xmin(pg_current_snapshot())),
                    coalesce((SELECT min(xid) FROM replication.change_log WHERE ts >= now() - %s::interval),
                             pg_snapshot_xmin(pg_current_snapshot())))::text""",
            (cfg.retention,)).fetchone()[0]
        laggards = [r[0] for r in conn.execute(
            "SELECT name FROM replication.branches WHERE active AND position IS NOT NULL "
            "AND pg_snapshot_xmin(position) = %s::xid8", (h,))]
    deleted = 0
    while True:
        with conn.transaction():
            n = conn.execute(
                """DELETE FROM replication.change_log WHERE ctid = ANY (ARRAY(
                       SELECT ctid FROM replication.change_log WHERE xid < %s::xid8 LIMIT %s))""",
                (h, batch)).rowcount
            conn.execute("UPDATE replication.horizon SET pruned_below = greatest(pruned_below, %s::xid8)", (h,))
        deleted += n
        if n < batch:
            break
    log.info("pruned %d log rows below xid %s", deleted, h)
    return PruneReport(deleted, h, laggards)
