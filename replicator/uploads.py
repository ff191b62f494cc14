"""Uploads: every branch's sales up to HQ, on the same engine as the catalogs.

A branch's uploads are one stream, `uploads:<branch>`, with the branch as its source and
HQ as its target: capture (sql/capture) on the branch's upload tables, the reader over
the branch's own change log, the applier writing HQ's tables through the branch's HQ
login, and the stream's position, copy states and set-aside rows in HQ's target-side
tables (sql/target), written in the same HQ transaction as the rows.

Many branches write the same HQ tables.  Each owns its slice, the upload's owner
predicate filled with its registered parameters, and PostgreSQL enforces it: `hq install`
puts a restrictive row-level security policy on each upload table for branch logins (and
on HQ's target-side tables, keyed by the login's stream).  A branch login from psql can
write nothing outside its slice; a row the replicator sends outside it, or whose key is
another branch's row, is refused by HQ and set aside with the reason (apply.py), and the
other sales go on.  A TRUNCATE or an `init --force` at the branch empties only its slice:
row-level security confines the DELETE.

Nothing here touches the branch's sales transactions: capture writes the local log, and
the register never waits for HQ.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import db, state
from .config import BranchConfig, HQConfig, UploadSpec, quote_ident, table_display
from .errors import ConfigError, ReplicatorError, UnknownCatalog
from .filters import parse_filter, render_for_any_branch
from .schema import Table, bind_target, source_tables
from .stream import Ends, Stream

log = logging.getLogger(__name__)

PREFIX = "uploads:"
# HQ's target-side tables a branch login writes, each only in its own stream's rows.
STATE_TABLES = ("position", "target_tables", "set_aside", "discarded")
PRUNE_INTERVAL = 60.0     # seconds between prunes of what HQ holds from the branch's log
REPORT_INTERVAL = 5.0     # seconds between reports of pending changes to HQ


def stream(cfg: BranchConfig) -> Stream:
    """The branch's upload stream: its database up to HQ, through its HQ login."""
    return Stream(PREFIX + cfg.branch, cfg.target_dsn, cfg.source_dsn, cfg.branch,
                  source_label="branch", target_label="HQ", target_pooled=True)


# ------------------------------------------------------------------ HQ side

@dataclass
class TargetReport:
    changed: list[str] = field(default_factory=list)    # tables whose protection was (re)built
    warnings: list[str] = field(default_factory=list)


FOLIO_TYPES = ("smallint", "integer", "bigint")


def check_targets(conn: psycopg.Connection, cfg: HQConfig) -> None:
    """Every upload table and owner predicate of hq.yaml is usable at HQ: `hq install` asks
    this before it changes anything."""
    for up in cfg.uploads.values():
        for t in up.tables:
            _check_table(conn, cfg, up, t)


def install_targets(conn: psycopg.Connection, cfg: HQConfig) -> TargetReport:
    """What uploads need at HQ: the target side's tables, the registry of uploads, and each
    upload table's slice enforced by row-level security for branch logins (idempotent).
    Runs after the capture migrations (010 creates the registry)."""
    report = TargetReport()
    had = conn.execute("SELECT count(*) FROM replication.uploads").fetchone()[0]
    if not cfg.uploads and not had:
        return report
    checked = [(up, t, _check_table(conn, cfg, up, t)) for up in cfg.uploads.values() for t in up.tables]
    db.migrate(conn, "target")
    with conn.transaction():
        path = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()[0]
        conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)")
        _register(conn, cfg)
        for up, t, (cols, keys) in checked:
            flt = parse_filter(t.name, t.filter, cols)
            pred = render_for_any_branch(flt, sql.Identifier)
            if _protect(conn, sql.Identifier(t.schema, t.relname), "replicator_slice", pred):
                report.changed.append(t.name)
            apart = set(flt.column_types) | ({up.folios.register} if up.folios else set())
            if not apart & set(keys):
                report.warnings.append(
                    f"upload {up.name}: the primary key of {t.name} ({', '.join(keys)}) holds none of "
                    f"{', '.join(sorted(apart))}, so two branches can send the same key and the second "
                    "one's row is set aside; key sales by register (fiscal folios per register)")
        for name in STATE_TABLES:
            _protect(conn, sql.Identifier("replication", name), "replicator_stream",
                     sql.SQL("stream OPERATOR(pg_catalog.=) (SELECT replication.upload_stream())"))
        # Apply runs in replica mode (README, Uploads): FK checks and ordinary triggers stay quiet,
        # ENABLE ALWAYS ones fire.  A branch login may set it for its own session only.
        conn.execute("GRANT SET ON PARAMETER session_replication_role TO replicator_branch")
        conn.execute("SELECT pg_catalog.set_config('search_path', %s, true)", (path,))
    for name in report.changed:
        log.info("upload target %s: writes of branch logins confined to their slice", name)
    for w in report.warnings:
        log.warning("%s", w)
    return report


def _check_table(conn: psycopg.Connection, cfg: HQConfig, up: UploadSpec, t) -> tuple[dict, list[str]]:
    """The HQ table exists with a primary key and its owner predicate parses over its columns."""
    from .capture import _spelling_hint, hq_columns
    cols = hq_columns(conn, t.schema, t.relname)
    if not cols:
        raise ConfigError(f"upload {up.name}: table {t.name} does not exist on HQ; "
                          f"{_spelling_hint(conn, t.schema, t.relname)}", cfg.path)
    keys = conn.execute(
        """SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i
            CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
            WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND i.indisprimary""",
        (t.schema, t.relname)).fetchone()[0]
    if not keys:
        raise ConfigError(f"upload {up.name}: table {t.name} has no primary key; add one (the sale's key, "
                          "holding its register)", cfg.path)
    try:
        parse_filter(t.name, t.filter, cols)
    except (ValueError, ConfigError) as e:
        reason = getattr(e, "reason", None) or str(e)
        raise ConfigError(f"upload {up.name}: the owner predicate of {t.name} ({t.filter}) is refused: {reason}",
                          cfg.path) from None
    if up.folios and up.folios.table == t.name:
        for c in (up.folios.register, up.folios.folio):
            if c not in cols:
                raise ConfigError(f"upload {up.name}: folios: {t.name} has no column {c}", cfg.path)
        kind = cols[up.folios.folio]
        if kind not in FOLIO_TYPES and not (kind.startswith("numeric(") and kind.endswith(",0)")):
            raise ConfigError(f"upload {up.name}: folios: {t.name}.{quote_ident(up.folios.folio)} is {kind}; "
                              "a folio is a whole number (smallint, integer, bigint or numeric(N,0)), so that "
                              "hq status can find the folios missing between two", cfg.path)
    other = conn.execute(
        "SELECT string_agg(polname, ', ') FROM pg_policy WHERE polrelid = to_regclass(format('%%I.%%I', "
        "%s::text, %s::text)) AND polname NOT LIKE 'replicator%%'", (t.schema, t.relname)).fetchone()[0]
    if other:
        raise ConfigError(f"upload {up.name}: table {t.name} has row-level security policies of its own "
                          f"({other}); an upload table's policies are replicator's (README, Uploads)", cfg.path)
    return cols, keys


def _register(conn: psycopg.Connection, cfg: HQConfig) -> None:
    """replication.uploads as hq.yaml has them; a table no longer uploaded loses its policies."""
    keep = [(t.schema, t.relname) for up in cfg.uploads.values() for t in up.tables]
    for schema, name in conn.execute("SELECT schema_name::text, table_name::text FROM replication.upload_tables"
                                     ).fetchall():
        if (schema, name) not in keep and conn.execute("SELECT to_regclass(%s)", (
                sql.Identifier(schema, name).as_string(conn),)).fetchone()[0]:
            table = sql.Identifier(schema, name)
            for policy in ("replicator_slice", "replicator_hq"):
                conn.execute(sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(sql.Identifier(policy), table))
            conn.execute(sql.SQL("REVOKE SELECT, INSERT, UPDATE, DELETE ON {} FROM replicator_branch").format(table))
            log.info("%s is no longer an upload target; branch logins lost their rights on it",
                     table_display(schema, name))
    conn.execute("DELETE FROM replication.uploads WHERE name <> ALL (%s)", (list(cfg.uploads),))
    for up in cfg.uploads.values():
        folios = None
        if up.folios is not None:
            t = next(t for t in up.tables if t.name == up.folios.table)
            folios = psycopg.types.json.Jsonb({"table": up.folios.table, "schema_name": t.schema,
                                               "table_name": t.relname, "register": up.folios.register,
                                               "folio": up.folios.folio})
        conn.execute("INSERT INTO replication.uploads (name, label, is_default, folios) VALUES (%s, %s, %s, %s) "
                     "ON CONFLICT (name) DO UPDATE SET label = EXCLUDED.label, is_default = EXCLUDED.is_default, "
                     "folios = EXCLUDED.folios", (up.name, up.label, up.default, folios))
        conn.execute("DELETE FROM replication.upload_tables WHERE upload = %s", (up.name,))
        for t in up.tables:
            conn.execute("DELETE FROM replication.upload_tables WHERE schema_name = %s AND table_name = %s",
                         (t.schema, t.relname))
            conn.execute("INSERT INTO replication.upload_tables (upload, schema_name, table_name, owner) "
                         "VALUES (%s, %s, %s, %s)", (up.name, t.schema, t.relname, t.filter))


def _protect(conn: psycopg.Connection, table: sql.Identifier, name: str, predicate: sql.Composable) -> bool:
    """Row-level security on `table`: every other role as before (a permissive policy for all),
    branch logins only where `predicate` holds (restrictive, for reads and writes), and their
    grants.  CREATE POLICY locks the table against HQ's writers until install commits, so it
    runs only when the predicate changed (its digest is the policy's comment)."""
    text = predicate.as_string(conn)
    digest = hashlib.sha256(text.encode()).hexdigest()
    current = conn.execute("SELECT obj_description(oid, 'pg_policy') FROM pg_policy WHERE polname = %s "
                           "AND polrelid = to_regclass(%s)", (name, table.as_string(conn))).fetchone()
    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO replicator_branch").format(table))
    if current and current[0] == digest:
        return False
    policy = sql.Identifier(name)
    conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
    conn.execute(sql.SQL("DROP POLICY IF EXISTS replicator_hq ON {}").format(table))
    conn.execute(sql.SQL("CREATE POLICY replicator_hq ON {} USING (true) WITH CHECK (true)").format(table))
    conn.execute(sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(policy, table))
    conn.execute(sql.SQL("CREATE POLICY {} ON {} AS RESTRICTIVE TO replicator_branch USING (({p}) IS TRUE) "
                         "WITH CHECK (({p}) IS TRUE)").format(policy, table, p=sql.SQL(text)))
    conn.execute(sql.SQL("COMMENT ON POLICY {} ON {} IS {}").format(policy, table, sql.Literal(digest)))
    return True


# --------------------------------------------------------------- selection

@dataclass
class Upload:
    name: str
    label: str
    default: bool
    tables: list[tuple[str, str, str]]     # (schema, table, owner predicate)


def offered(hq: psycopg.Connection) -> dict[str, Upload]:
    """The uploads HQ defines (empty for an HQ without them, or older than uploads)."""
    if not hq.execute("SELECT to_regclass('replication.uploads') IS NOT NULL").fetchone()[0]:
        return {}
    out = {name: Upload(name, label, default, []) for name, label, default in hq.execute(
        "SELECT name, label, is_default FROM replication.uploads ORDER BY name")}
    for up, schema, name, owner in hq.execute(
            "SELECT upload, schema_name::text, table_name::text, owner FROM replication.upload_tables "
            "ORDER BY upload, schema_name, table_name"):
        out[up].tables.append((schema, name, owner))
    return out


def select(cfg: BranchConfig, ups: dict[str, Upload]) -> list[str]:
    """branch.yaml's `uploads:`, or HQ's defaults when it names none."""
    if cfg.uploads is None:
        return [u.name for u in ups.values() if u.default]
    unknown = [u for u in cfg.uploads if u not in ups]
    if unknown:
        raise UnknownCatalog(f"unknown upload {', '.join(unknown)} (HQ does not define it); HQ defines: "
                             f"{', '.join(ups) or '(none)'}", cfg.path, cfg.lines.get("uploads"), "uploads")
    return list(cfg.uploads)


def capture_statements(ups: list[Upload]) -> list[sql.Composed]:
    """Capture of the upload tables on the branch, as the registry calls HQ uses for catalogs."""
    stmts, tables = [], []
    for up in ups:
        stmts.append(sql.SQL("SELECT replication.define_catalog({}, {}, {})").format(
            sql.Literal(up.name), sql.Literal(up.label), sql.Literal(True)))
        for schema, name, _owner in up.tables:
            tables.append(f"{schema}.{name}")
            stmts.append(sql.SQL("SELECT replication.attach_table({}, {}, {}, NULL, '{{}}'::text[])").format(
                sql.Literal(up.name), sql.Literal(schema), sql.Literal(name)))
    # a branch's registry is its uploads (and, chained, what it re-serves: those stay)
    return stmts


def install_capture(branch: psycopg.Connection, ups: list[Upload]) -> list[str]:
    """Capture on the branch's upload tables (idempotent): migrations, then attach."""
    missing = [table_display(s, n) for up in ups for s, n, _ in up.tables
               if not branch.execute("SELECT to_regclass(%s)", (sql.Identifier(s, n).as_string(branch),)
                                     ).fetchone()[0]]
    if missing:
        raise ReplicatorError(f"upload table {', '.join(missing)} is missing on the branch; create it with "
                              "HQ's definition (the POS schema)")
    done = db.migrate(branch, "capture")
    with branch.transaction():
        for stmt in capture_statements(ups):
            branch.execute(stmt)
    return done


def tables_for(branch: psycopg.Connection, hq: psycopg.Connection, ups: list[Upload]) -> list[Table]:
    """The branch's captured upload tables, bound to HQ's (HQ's columns are written)."""
    tables = source_tables(branch, [u.name for u in ups])
    owners = {(s, n): o for u in ups for s, n, o in u.tables}
    tables = [t for t in tables if (t.schema, t.name) in owners]
    for t in tables:
        t.owner = owners[(t.schema, t.name)]
    try:
        bind_target(hq, tables)
    except ReplicatorError as e:
        raise ReplicatorError(f"upload tables differ between the branch and HQ: {e} (read 'branch' as HQ "
                              "here: HQ's tables receive the branch's rows)") from e
    return tables


# ------------------------------------------------------------ the branch log

def pending(branch: psycopg.Connection, position: str, tables: list[int]) -> int:
    """Log rows of the upload tables that HQ does not hold yet (the log is pruned behind HQ)."""
    return branch.execute(
        "SELECT count(*) FROM replication.change_log WHERE xid >= pg_snapshot_xmin(%s::pg_snapshot) "
        "AND NOT pg_visible_in_snapshot(xid, %s::pg_snapshot) AND table_id = ANY (%s)",
        (position, position, tables)).fetchone()[0]


def prune_branch_log(branch: psycopg.Connection, position: str, batch: int = 10000) -> int:
    """Delete the branch's log rows HQ holds, unless a branch chained below this one still
    needs them (its registered position)."""
    deleted = 0
    while True:
        with branch.transaction():
            h = branch.execute(
                "SELECT least(pg_snapshot_xmin(%s::pg_snapshot), (SELECT min(pg_snapshot_xmin(position)) "
                "FROM replication.branches WHERE active AND position IS NOT NULL))::text", (position,)).fetchone()[0]
            n = branch.execute("DELETE FROM replication.change_log WHERE ctid = ANY (ARRAY(SELECT ctid FROM "
                               "replication.change_log WHERE xid < %s::xid8 LIMIT %s))", (h, batch)).rowcount
            branch.execute("UPDATE replication.horizon SET pruned_below = greatest(pruned_below, %s::xid8)", (h,))
        deleted += n
        if n < batch:
            return deleted


# ----------------------------------------------------------------- status

@dataclass
class UploadStatus:
    names: list[str]
    uploaded_until: object        # source time of the newest sale HQ holds (None: none yet)
    pending: int
    set_aside: int
    initialized: bool

    def line(self) -> str:
        if not self.initialized:
            return f"sales uploads ({', '.join(self.names)}) not initialized: run `replicator init`"
        until = f"{self.uploaded_until:%Y-%m-%d %H:%M:%S}" if self.uploaded_until else "(nothing yet)"
        return (f"sales uploaded up to {until}, {self.pending} pending, {self.set_aside} set aside"
                + (" (`replicator set-aside list`)" if self.set_aside else ""))


def status(cfg: BranchConfig) -> UploadStatus | None:
    """The branch's uploads as HQ holds them; None when it uploads nothing."""
    st = stream(cfg)
    with Ends(st, f"replicator status {cfg.branch}") as ends:
        branch, hq = ends.source, ends.target
        ups = offered(hq)
        names = select(cfg, ups)
        if not names:
            return None
        pos = state.load_position(hq, st.name) if state.has_schema(hq) else None
        if pos is None:
            return UploadStatus(names, None, 0, 0, False)
        ids = [r[0] for r in branch.execute("SELECT id FROM replication.tables WHERE catalog = ANY (%s) AND active",
                                            (names,))]
        waiting = hq.execute("SELECT count(*) FROM replication.set_aside WHERE stream = %s", (st.name,)).fetchone()[0]
        return UploadStatus(names, pos.applied_until, pending(branch, pos.snapshot, ids), waiting, True)


def print_sql(hq: psycopg.Connection, cfg: BranchConfig) -> str:
    """`replicator sql -c branch.yaml`: the branch side's DDL for a DBA's migration tool."""
    ups = offered(hq)
    names = select(cfg, ups)
    parts = ["-- replicator: the branch side. Generated by `replicator sql`.",
             "-- Apply each block in order; each numbered migration records itself in replication.versions,\n"
             "-- and a block of functions (each re-created) may run again, as after an upgrade.",
             "\nBEGIN;\n" + db.versions_sql().rstrip() + "\nCOMMIT;"]
    parts += db.migration_script("target", "target migration") + db.migration_script("capture", "capture migration")
    if names:
        parts.append(f"\n-- capture of the uploads {', '.join(names)} (sales go up to HQ)\nBEGIN;")
        parts.extend(s.as_string(None) + ";" for s in capture_statements([ups[n] for n in names]))
        parts.append("COMMIT;")
    return "\n".join(parts) + "\n"

