"""HQ administration: branch registration, status and log pruning.

Branches are registered on HQ with their row-filter parameters, so HQ, not
the branch, decides which rows a branch receives.  Each branch gets a login
role that can read the log and its catalogs and report its own position,
nothing more (README, Security).
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import signal
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import db
from .config import HQConfig
from .errors import ConfigError

log = logging.getLogger(__name__)


GROUP_ROLE = "replicator_branch"       # every branch login is a member; it has no rights of its own
BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# A branch login needs one HQ connection per command it runs at once (run, init, verify,
# status, check) and one spare for a restarted `run` whose old backend has not gone yet.
CONNECTION_LIMIT = 6
# What protects HQ from an honest but buggy branch login.  The role can override the
# first two with SET (they are user settings); temp_file_limit it cannot (superuser only).
ROLE_SETTINGS = {"idle_in_transaction_session_timeout": "5min", "statement_timeout": "1h",
                 "temp_file_limit": "5GB"}


def role_name(branch: str) -> str:
    return "replicator_" + re.sub(r"[^a-z0-9_]", "_", branch.lower())[:50]


def role_mark(branch: str) -> str:
    """The comment add-branch puts on a role it created: the only roles it will ever change."""
    return f"replicator: HQ login of branch {branch}, created by replicator hq add-branch"


@dataclass
class Registration:
    branch: str
    role: str
    password: str | None      # set only when we generated it: shown once
    params: dict
    branch_yaml: str
    warnings: list[str]


def check_branch_name(branch: object) -> str:
    if not isinstance(branch, str) or not BRANCH_NAME.fullmatch(branch):
        raise ConfigError("use letters, digits, '-', '_' or '.' (max 63), starting with a letter or digit",
                          None, None, "BRANCH", branch)
    if role_name(branch) == GROUP_ROLE:
        raise ConfigError(f"its login role would be {GROUP_ROLE}, the group role of every branch; "
                          "choose another name", None, None, "BRANCH", branch)
    return branch


def add_branch(conn: psycopg.Connection, cfg: HQConfig, branch: str, params: dict,
               password: str | None = None, connection_limit: int = CONNECTION_LIMIT,
               catalogs: list[str] | None = None) -> Registration:
    """Create or update the branch's registration and its own login role.

    The role is created here, fresh, and marked; an existing role is changed only if
    add-branch created it for this same branch.  Anything else with that name (an
    application's role, an admin's) is refused by name: adopting it would reset its
    password and hand a store its rights.  `catalogs` are the catalogs it may read
    (None: every catalog, also ones defined later); PostgreSQL enforces it.
    """
    check_branch_name(branch)
    if catalogs is not None:
        unknown = [c for c in catalogs if c not in cfg.catalogs]
        if unknown or not catalogs:
            raise ConfigError(f"unknown catalog {', '.join(unknown)}; {cfg.path} defines {', '.join(cfg.catalogs)}"
                              if unknown else "name at least one catalog", None, None, "--catalogs",
                              ",".join(catalogs))
    if not 1 <= connection_limit <= 100:
        raise ConfigError("must be between 1 and 100", None, None, "--connection-limit", connection_limit)
    db.require_version(conn, "capture", "HQ")
    _check_params(conn, params)
    role = role_name(branch)
    generated = None
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('replicator add-branch'))")
        exists = _check_role(conn, branch, role)
        ident = sql.Identifier(role)
        if not exists:
            if password is None:
                password = generated = secrets.token_urlsafe(18)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT {} PASSWORD {}").format(
                ident, sql.Literal(connection_limit), sql.Literal(_verifier(conn, role, password))))
        else:
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN CONNECTION LIMIT {}").format(
                ident, sql.Literal(connection_limit)))
            if password is not None:
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    ident, sql.Literal(_verifier(conn, role, password))))
            else:
                log.warning("role %s already exists; its password is unchanged (pass --password-env to set one)",
                            role)
        conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(role_mark(branch))))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(GROUP_ROLE), ident))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), ident))
        conn.execute(
            """INSERT INTO replication.branches (name, role, params, catalogs) VALUES (%s, %s, %s, %s)
               ON CONFLICT (name) DO UPDATE SET params = EXCLUDED.params, role = EXCLUDED.role, active = true,
                                                catalogs = EXCLUDED.catalogs""",
            (branch, role, psycopg.types.json.Jsonb(params), catalogs))
        conn.execute("SELECT replication.build_access()")     # its catalog memberships
    warnings = _protect(conn, role)
    log.info("branch %s registered with role %s and parameters %s", branch, role, params)
    return Registration(branch, role, generated, params, branch_yaml(cfg, branch, role, params), warnings)


def _check_role(conn: psycopg.Connection, branch: str, role: str) -> bool:
    """Whether the branch's role exists already; refuse one that add-branch did not make for it."""
    other = conn.execute("SELECT name FROM replication.branches WHERE role = %s AND name <> %s",
                         (role, branch)).fetchone()
    if other:
        raise ConfigError(f"its login role {role} already belongs to branch {other[0]}; "
                          "choose a branch name that differs in more than case or punctuation",
                          None, None, "BRANCH", branch)
    row = conn.execute(
        """SELECT shobj_description(r.oid, 'pg_authid') IS NOT DISTINCT FROM %s
                  OR EXISTS (SELECT FROM replication.branches b WHERE b.name = %s AND b.role = r.rolname),
                  r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
             FROM pg_roles r WHERE r.rolname = %s""", (role_mark(branch), branch, role)).fetchone()
    if row is None:
        return False
    ours, powerful = row
    if not ours or powerful:
        raise ConfigError(f"role {role} already exists and is not a login that add-branch created for this "
                          "branch; replicator never adopts an existing role: drop or rename that role, or "
                          "choose another branch name", None, None, "BRANCH", branch)
    return True


def _protect(conn: psycopg.Connection, role: str) -> list[str]:
    """Session limits for the branch login (README, Security); one it may not set is a warning."""
    warnings = []
    for name, value in ROLE_SETTINGS.items():
        try:
            with conn.transaction():
                conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(
                    sql.Identifier(role), sql.Identifier(name), sql.Literal(value)))
        except psycopg.errors.InsufficientPrivilege:
            warnings.append(f"could not set {name} = {value} for role {role} (needs a superuser); "
                            f"set it with: ALTER ROLE {role} SET {name} = '{value}'")
    for w in warnings:
        log.warning("%s", w)
    return warnings


@dataclass
class Deactivation:
    branch: str
    role: str
    sessions_ended: int | None    # None: not allowed to end them


def deactivate(conn: psycopg.Connection, branch: str) -> Deactivation:
    """Stop a branch from holding HQ's log: prune no longer waits for it, its login cannot
    connect, and its open sessions are ended.  `hq add-branch` with its name brings it back
    (it then needs `replicator init --force` if the log was pruned past it)."""
    db.require_version(conn, "capture", "HQ")
    with conn.transaction():
        row = conn.execute("UPDATE replication.branches SET active = false WHERE name = %s RETURNING role",
                           (branch,)).fetchone()
        if row is None:
            raise ConfigError("no such branch is registered on HQ; `replicator hq status` lists them",
                              None, None, "BRANCH", branch)
        role = row[0]
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
            conn.execute("SELECT replication.build_access()")     # no catalog memberships left
    try:
        ended = conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                             "WHERE usename = %s AND pid <> pg_backend_pid()", (role,)).fetchone()[0]
    except psycopg.errors.InsufficientPrivilege:
        ended = None
    log.info("branch %s deactivated (role %s can no longer log in)", branch, role)
    return Deactivation(branch, role, ended)


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
    if conn.execute("SELECT to_regclass('replication.upload_tables') IS NOT NULL").fetchone()[0]:
        # an upload's owner predicate says which rows the branch owns: its parameters too
        for schema, table, text in conn.execute(
                "SELECT schema_name, table_name, owner FROM replication.upload_tables ORDER BY 1, 2"):
            filters.append((schema, table, parse_filter(f"{schema}.{table}", text,
                                                        hq_columns(conn, schema, table))))
    needed = set().union(*(f.params for _, _, f in filters))
    missing = needed - set(params)
    if missing:
        raise ConfigError(f"row filters on HQ need {', '.join(sorted(missing))}; pass --param "
                          + " --param ".join(f"{m}=VALUE" for m in sorted(missing)), None, None, "--param")
    unknown = set(params) - needed
    if unknown:
        log.warning("parameters %s are not used by any filter or owner predicate on HQ", ", ".join(sorted(unknown)))
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
            + (f"  # TLS with verification: add sslrootcert=<HQ's CA file on this branch> to the DSN\n"
               if "sslmode=verify" in dsn else "")
            + f"  dsn: {json.dumps(dsn, ensure_ascii=False)}\n"
            f"target:\n"
            f"  dsn: \"postgresql:///pos\"   # this branch's own database\n"
            f"# Catalogs to keep updated. Omitted: HQ's defaults ({defaults}).\n"
            f"# HQ offers: {', '.join(cfg.catalogs)}\n"
            f"# catalogs: [items, stock]\n")


# What a branch's connection may copy from the admin's: where HQ is and how to reach it.
# Never credentials or the admin's files (password, passfile, sslkey, sslcert, sslpassword,
# sslrootcert and CRL paths are the admin's; the branch brings its own), nor a service name.
_BRANCH_DSN_KEYS = ("host", "hostaddr", "port", "dbname", "sslmode", "gssencmode", "channel_binding",
                    "target_session_attrs", "load_balance_hosts", "connect_timeout", "keepalives",
                    "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
                    "ssl_min_protocol_version", "require_auth")


def _branch_dsn(hq_dsn: str, role: str) -> str:
    """HQ's address for the branch's login: same host, port, database and TLS settings,
    without the admin's user and password, every part URL-quoted."""
    d = {k: v for k, v in conninfo_to_dict(hq_dsn).items() if k in _BRANCH_DSN_KEYS}
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


STALE_AFTER = 300.0     # seconds without a position report before an active branch counts as stale


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
    set_aside: int = 0           # changes it refused and set aside, as last reported
    sales_until: datetime | None = None   # branch time of the newest upload HQ holds
    sales_pending: int | None = None      # upload changes still on the branch, as it last reported
    sales_set_aside: int = 0              # its upload rows HQ refused (outside its slice, ...)

    def stale(self, after: float = STALE_AFTER) -> bool:
        """An active branch that has not reported for `after` seconds (or never)."""
        if not self.active:
            return False
        return self.acked_at is None or (datetime.now(timezone.utc) - self.acked_at).total_seconds() > after

    def to_json(self) -> dict:
        return {"branch": self.name, "role": self.role, "params": self.params, "active": self.active,
                "last_report": self.acked_at.isoformat() if self.acked_at else None,
                "applied_until": self.applied_until.isoformat() if self.applied_until else None,
                "pending": self.pending, "lag_seconds": None if self.lag is None else self.lag.total_seconds(),
                "set_aside": self.set_aside, "stale": self.stale(),
                "sales": {"uploaded_until": self.sales_until.isoformat() if self.sales_until else None,
                          "pending": self.sales_pending, "set_aside": self.sales_set_aside}}


def status(conn: psycopg.Connection) -> list[BranchStatus]:
    db.require_version(conn, "capture", "HQ")
    uploads = conn.execute("SELECT to_regclass('replication.position') IS NOT NULL AND "
                           "to_regclass('replication.set_aside') IS NOT NULL").fetchone()[0]
    sales = ("""(SELECT applied_until FROM replication.position WHERE stream = 'uploads:' || b.name),
                  b.uploads_pending,
                  (SELECT count(*) FROM replication.set_aside WHERE stream = 'uploads:' || b.name)::int"""
             if uploads else "NULL::timestamptz, NULL::bigint, 0")
    rows = conn.execute(
        """SELECT b.name, b.role, b.params, b.active, b.acked_at, b.applied_until, p.pending,
                  now() - p.oldest, b.set_aside, """ + sales + """
             FROM replication.branches b
             LEFT JOIN LATERAL (
                  SELECT coalesce(sum(coalesce(cardinality(l.rows), 1)), 0) AS pending, min(l.ts) AS oldest
                    FROM replication.change_log l
                   WHERE l.xid >= pg_snapshot_xmin(b.position)
                     AND NOT pg_visible_in_snapshot(l.xid, b.position)) p ON b.position IS NOT NULL
            ORDER BY b.name""").fetchall()
    return [BranchStatus(*r) for r in rows]


@dataclass
class FolioGaps:
    """Fiscal folios missing at HQ for one register: between its lowest and highest folio
    HQ holds, the numbers no sale has (a sale lost, set aside, or not uploaded yet)."""
    upload: str
    table: str
    register: object
    missing: int                  # folios missing
    ranges: list[str]             # the first few, as "5" or "7-9"

    def to_json(self) -> dict:
        return {"upload": self.upload, "table": self.table, "register": self.register,
                "missing": self.missing, "ranges": self.ranges}


SHOW_GAPS = 5     # gap ranges listed per register


def folio_gaps(conn: psycopg.Connection) -> list[FolioGaps]:
    """Per register, the folios missing at HQ, for every upload that names its folios: a
    business-level check of the consolidated sales (one index scan of the folio table)."""
    if not conn.execute("SELECT to_regclass('replication.uploads') IS NOT NULL").fetchone()[0]:
        return []
    out = []
    for name, f in conn.execute("SELECT name, folios FROM replication.uploads WHERE folios IS NOT NULL "
                                "ORDER BY name").fetchall():
        if "schema_name" not in f:
            continue        # recorded by an older install: the next `hq install` completes it
        query = sql.SQL("""
SELECT reg, sum(next - folio - 1)::int8,
       (array_agg(CASE WHEN next = folio + 2 THEN (folio + 1)::text
                       ELSE (folio + 1)::text || '-' || (next - 1)::text END ORDER BY folio))[1:{show}]
  FROM (SELECT {reg} AS reg, {folio} AS folio, lead({folio}) OVER (PARTITION BY {reg} ORDER BY {folio}) AS next
          FROM {table}) s
 WHERE next > folio + 1
 GROUP BY reg ORDER BY reg""").format(
            show=sql.Literal(SHOW_GAPS), reg=sql.Identifier(f["register"]), folio=sql.Identifier(f["folio"]),
            table=sql.Identifier(f["schema_name"], f["table_name"]))
        out += [FolioGaps(name, f["table"], reg, missing, ranges) for reg, missing, ranges in conn.execute(query)]
    return out


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
    db.require_version(conn, "capture", "HQ")
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


def serve_fleet_metrics(cfg: HQConfig, listen: str, stop: threading.Event | None = None) -> None:
    """`hq metrics`: serve the fleet as HQ sees it until SIGTERM/SIGINT (or `stop`).  One HQ
    connection, opened again after HQ comes back; each scrape is one status query."""
    from .metrics import fleet_registry, serve
    stop = stop or threading.Event()
    conn = None

    def hq() -> psycopg.Connection:
        nonlocal conn
        if conn is None or conn.closed or conn.broken:
            conn = db.connect(cfg.dsn, "HQ", autocommit=True, application="replicator hq metrics")
        return conn

    def log_age() -> float | None:
        return hq().execute("SELECT extract(epoch FROM now() - min(ts))::float8 "
                            "FROM replication.change_log").fetchone()[0]

    status(hq())                                # HQ unreachable or not installed: say so at start
    registry = fleet_registry(lambda: status(hq()), log_age, cfg.retention.total_seconds())
    server = serve(registry, listen, "--listen")
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        server.shutdown()
        server.server_close()
        if conn is not None:
            conn.close()
