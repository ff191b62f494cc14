"""`replicator check`: is this branch ready to sync, and if not, why?

Everything an admin needs on one screen: both connections, server versions,
HQ's knowledge of this branch, the catalogs offered (selected ones marked),
missing tables, whether capture is installed and the branch initialized.
Each problem is its own line, so an admin can fix them all in one pass
instead of discovering them one run at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import db, state
from .config import BranchConfig
from .errors import PositionLost, ReplicatorError, UnknownCatalog
from .schema import (Table, bind_target, branch_params, columns_of, offered_catalogs, select_catalogs,
                     source_tables)
from .stream import CATALOGS


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_check(cfg: BranchConfig) -> CheckReport:
    rep = CheckReport()
    hq = _connect(cfg.source_dsn, "HQ", rep)
    branch = _connect(cfg.target_dsn, "branch", rep)
    try:
        if hq is None or branch is None:
            return rep
        rep.lines.append("connection OK")
        rep.lines.append(f"HQ:     PostgreSQL {_version(hq)} at {db.describe(cfg.source_dsn)}")
        rep.lines.append(f"branch: PostgreSQL {_version(branch)} at {db.describe(cfg.target_dsn)}")
        encodings = [c.execute("SHOW server_encoding").fetchone()[0] for c in (hq, branch)]
        if encodings[0] != encodings[1]:
            rep.lines.append(f"branch database encoding {encodings[1]}, HQ's {encodings[0]}: text is converted "
                             f"on the way; a character {encodings[1]} cannot hold stops the apply, naming its table")
        _check_hq(cfg, hq, branch, rep)
        return rep
    finally:
        for conn in (hq, branch):
            if conn is not None:
                conn.close()


def _version(conn: psycopg.Connection) -> str:
    v = conn.info.server_version            # 150018 -> 15.18 (PostgreSQL 10 and later)
    return f"{v // 10000}.{v % 10000}"


def _connect(dsn: str, side: str, rep: CheckReport):
    try:
        return db.connect(dsn, side, autocommit=True, application="replicator check")
    except ReplicatorError as e:
        rep.problems.append(str(e))
        return None


def _check_hq(cfg: BranchConfig, hq, branch, rep: CheckReport) -> None:
    try:
        db.require_version(hq, "capture", "HQ")
    except ReplicatorError as e:
        rep.problems.append(f"capture is not installed on HQ: {e}")
        return
    versions = sorted(db.applied_versions(hq, "capture"))
    rep.lines.append(f"capture installed on HQ: yes (replication schema version {versions[-1]})")
    try:
        params = branch_params(hq, cfg.branch, cfg)
        rep.lines.append(f"branch {cfg.branch} registered on HQ: yes"
                         + (f" (parameters: {', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""))
    except ReplicatorError as e:
        rep.problems.append(str(e))
    offered = offered_catalogs(hq, cfg.branch)
    try:
        names = select_catalogs(cfg, offered)
    except UnknownCatalog as e:
        rep.problems.append(str(e))
        names = [c for c in cfg.catalogs or [] if c in offered]
    rep.lines.append("catalogs offered by HQ (* = selected):")
    for c in offered.values():
        mark = "*" if c.name in names else " "
        rep.lines.append(f"  {mark} {c.name:<16} {c.label}{'  (default)' if c.default else ''}")
    tables = source_tables(hq, names)
    present = _check_tables(branch, tables, rep)
    _check_access(hq, present, rep)
    _check_initialized(cfg, hq, branch, tables, rep)


def _check_tables(branch, tables: list[Table], rep: CheckReport) -> list[Table]:
    """Missing tables and column mismatches, every one of them, not just the first."""
    present = []
    for t in tables:
        if not columns_of(branch, t.schema, t.name):
            rep.problems.append(f"table {t.qualified} (catalog {t.catalog}) is missing on the branch "
                                "(create it, or `replicator init --create-missing`)")
            continue
        try:
            bind_target(branch, [t])
        except ReplicatorError as e:
            rep.problems.append(str(e))
            continue
        present.append(t)
    return present


def _check_access(hq, tables: list[Table], rep: CheckReport) -> None:
    """Can this login read what a sync reads? (a grant missing on HQ shows here, not mid-copy)"""
    queries = [("the change log", sql.SQL("SELECT FROM replication.change_log LIMIT 0"))]
    queries += [(t.qualified, sql.SQL("SELECT {} FROM {} LIMIT 0").format(
        sql.SQL(", ").join(map(sql.Identifier, t.columns)), t.hq_source)) for t in tables]
    for what, q in queries:
        try:
            hq.execute(q)
        except psycopg.errors.InsufficientPrivilege as e:
            rep.problems.append(f"HQ login cannot read {what}: {e.diag.message_primary}; "
                                "re-run `replicator hq install` and `replicator hq add-branch` on HQ")


def _check_initialized(cfg: BranchConfig, hq, branch, tables: list[Table], rep: CheckReport) -> None:
    if state.has_schema(branch):
        for m in state.ensure_schema(branch):        # a newer check brings the branch's own objects up to date
            what = "target migration " + m if m[:1].isdigit() else "re-created " + m
            rep.lines.append(f"branch replication schema upgraded: {what}")
    pos = state.load_position(branch, CATALOGS)
    if pos is None:
        rep.lines.append("branch initialized: no (next step: `replicator init`)")
        return
    states = state.table_states(branch, CATALOGS)
    done = sorted({states[t.qualified].catalog for t in tables
                   if t.qualified in states and states[t.qualified].initialized_at})
    rep.lines.append(f"branch initialized: yes (catalogs copied: {', '.join(done) or 'none'})")
    lost, horizon = hq.execute(
        "SELECT pruned_below > pg_snapshot_xmin(%s::pg_snapshot), pruned_below::text FROM replication.horizon",
        (pos.snapshot,)).fetchone()
    if lost:
        rep.problems.append(str(PositionLost(cfg.branch, pos.snapshot, horizon)))
