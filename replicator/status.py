"""`replicator status`: per catalog, is the branch up to date with HQ?

Counts the changes of each selected table that HQ has committed and the
branch has not applied, using the same window query as the replicator (so
row filters and copy snapshots count exactly as they apply).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from psycopg import sql

from . import aside, state
from . import stream as stream_mod
from .config import BranchConfig
from .reader import LogReader, current_snapshot
from .schema import capture_gaps


@dataclass
class CatalogStatus:
    name: str
    label: str
    tables: list[str]
    initialized: datetime | None     # oldest table initialization, None if any table never copied
    behind: int                      # changes committed on HQ not yet applied
    gap: bool = False                # HQ's capture was off after the copy: changes were missed

    @property
    def state(self) -> str:
        if self.initialized is None:
            return "not initialized"
        if self.gap:
            return f"needs re-initialization: capture on HQ was off for a while (replicator init --force {self.name})"
        return "up to date" if self.behind == 0 else f"behind by {self.behind} changes"


@dataclass
class BranchStatus:
    branch: str
    position: state.Position | None
    catalogs: list[CatalogStatus]
    set_aside: list[aside.AsideRow] = field(default_factory=list)   # changes the branch refused

    @property
    def up_to_date(self) -> bool:
        return bool(self.catalogs) and all(c.state == "up to date" for c in self.catalogs) and not self.set_aside


def branch_status(cfg: BranchConfig) -> BranchStatus:
    stream = stream_mod.catalogs(cfg)
    with stream_mod.Ends(stream, "replicator status") as ends:
        hq, branch = ends.source, ends.target
        stream_mod.require_capture(hq, stream)
        state.require_current(branch)
        sel = stream_mod.resolve(hq, stream, cfg)
        tables = sel.tables
        pos = state.load_position(branch, stream.name)
        states = state.table_states(branch, stream.name)
        behind = _behind(hq, tables, sel.params, pos, states) if pos else {}
        gaps = {t.catalog for t in capture_gaps(hq, tables, states)}
        out = []
        for name in sel.names:
            ts = [t for t in tables if t.catalog == name]
            inits = [states[t.qualified].initialized_at if t.qualified in states else None for t in ts]
            init = None if any(i is None for i in inits) or pos is None else min(inits)
            out.append(CatalogStatus(name, sel.offered[name].label, [t.qualified for t in ts], init,
                                     sum(behind.get(t.id, 0) for t in ts), name in gaps))
        return BranchStatus(cfg.branch, pos, out, aside.rows(branch, stream.name))


def _behind(hq, tables, params, pos: state.Position, states) -> dict[int, int]:
    skip = {t.id: states[t.qualified].copy_snapshot for t in tables
            if t.qualified in states and states[t.qualified].copy_snapshot}
    reader = LogReader(tables, params, skip)
    cur = current_snapshot(hq)
    q = sql.SQL("SELECT w.table_id, count(*) FROM ({}) w(id, table_id, op, key, row, ts) "
                "GROUP BY w.table_id").format(reader.query)
    prm = {"prev": pos.snapshot, "cur": cur, "late": reader.late_xids(hq, pos.snapshot, cur),
           "after": 0, "tables": [t.id for t in tables]}
    return dict(hq.execute(q, prm).fetchall())
