"""`replicator check`: is this branch ready to sync, and if not, why?

Everything an admin needs on one screen: both connections, server versions,
HQ's knowledge of this branch, the catalogs offered (selected ones marked),
missing tables, whether capture is installed and the branch initialized.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import db, state
from .config import BranchConfig
from .errors import ReplicatorError
from .schema import (bind_target, branch_params, columns_of, offered_catalogs, select_catalogs,
                     source_tables)


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
        rep.lines.append(f"HQ:     PostgreSQL {hq.info.server_version // 10000}.{hq.info.server_version % 10000} "
                         f"at {db.describe(cfg.source_dsn)}")
        rep.lines.append(f"branch: PostgreSQL {branch.info.server_version // 10000}."
                         f"{branch.info.server_version % 10000} at {db.describe(cfg.target_dsn)}")
        _check_hq(cfg, hq, branch, rep)
        return rep
    finally:
        for conn in (hq, branch):
            if conn is not None:
                conn.close()


def _connect(dsn: str, side: str, rep: CheckReport):
    try:
        return db.connect(dsn, side, autocommit=True, application="replicator check")
    except ReplicatorError as e:
        rep.problems.append(str(e))
        return None


def _check_hq(cfg: BranchConfig, hq, branch, rep: CheckReport) -> None:
    try:
        db.require_version(hq, "hq", "HQ")
    except ReplicatorError as e:
        rep.problems.append(f"capture is not installed on HQ: {e}")
        return
    rep.lines.append("capture installed on HQ: yes")
    try:
        params = branch_params(hq, cfg.branch)
        rep.lines.append(f"branch {cfg.branch} registered on HQ: yes"
                         + (f" (parameters: {', '.join(f'{k}={v}' for k, v in params.items())})" if params else ""))
    except ReplicatorError as e:
        rep.problems.append(str(e))
    offered = offered_catalogs(hq)
    try:
        names = select_catalogs(cfg, offered)
    except ReplicatorError as e:
        rep.problems.append(str(e))
        return
    rep.lines.append("catalogs offered by HQ (* = selected):")
    for c in offered.values():
        mark = "*" if c.name in names else " "
        rep.lines.append(f"  {mark} {c.name:<16} {c.label}{'  (default)' if c.default else ''}")
    tables = source_tables(hq, names)
    missing = [t.qualified for t in tables if not columns_of(branch, t.schema, t.name)]
    for t in missing:
        rep.problems.append(f"table {t} is missing on the branch (create it, or `replicator init --create-missing`)")
    present = [t for t in tables if t.qualified not in missing]
    try:
        bind_target(branch, present)
    except ReplicatorError as e:
        rep.problems.append(str(e))
    pos = state.load_position(branch)
    states = state.table_states(branch)
    if pos is None:
        rep.lines.append("branch initialized: no (next step: `replicator init`)")
    else:
        done = sorted({states[t.qualified].catalog for t in tables
                       if t.qualified in states and states[t.qualified].initialized_at})
        rep.lines.append(f"branch initialized: yes (catalogs copied: {', '.join(done) or 'none'})")
