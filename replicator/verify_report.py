"""What `replicator verify` found, for machines (VerifyReport.to_json) and for people
(format_report): per table, the keys missing, extra, different or not yet applied."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

SHOW_KEYS = 20             # keys listed per category in the text report


@dataclass
class TableReport:
    table: str
    catalog: str
    status: str                                   # equal | different | not initialized
    hq_rows: int = 0
    branch_rows: int = 0
    missing: list[str] = field(default_factory=list)     # keys on HQ, not on the branch
    extra: list[str] = field(default_factory=list)       # keys on the branch, not on HQ
    different: list[str] = field(default_factory=list)   # keys on both, rows differ
    pending: list[str] = field(default_factory=list)     # differ, HQ changes not applied yet
    key_columns: list[str] = field(default_factory=list)
    direction: str = "catalogs"                   # catalogs (HQ -> branch) | uploads (branch -> HQ)

    @property
    def equal(self) -> bool:
        return self.status != "different"

    def keys(self) -> list[str]:
        return self.missing + self.extra + self.different + self.pending


@dataclass
class VerifyReport:
    branch: str
    tables: list[TableReport] = field(default_factory=list)
    replicator_running: bool = False
    caught_up: bool = True
    seconds: float = 0.0

    @property
    def equal(self) -> bool:
        return all(t.equal for t in self.tables)

    def to_json(self) -> dict:
        out = {"branch": self.branch, "equal": self.equal, "replicator_running": self.replicator_running,
               "caught_up": self.caught_up, "seconds": round(self.seconds, 3), "tables": []}
        for t in self.tables:
            d = asdict(t)
            for kind in ("missing", "extra", "different", "pending"):
                d[kind] = [key_dict(t.key_columns, k) for k in d[kind]]
            del d["key_columns"]
            out["tables"].append(d)
        return out


@dataclass
class RepairReport:
    repaired: dict[str, int] = field(default_factory=dict)        # table -> keys re-copied
    sent: dict[str, int] = field(default_factory=dict)            # upload table -> keys re-sent to HQ
    left_to_stream: dict[str, int] = field(default_factory=dict)  # table -> keys with pending changes
    snapshot: str | None = None
    seconds: float = 0.0


def key_dict(columns: list[str], key: str) -> dict:
    """A key's text form (a JSON object) as {column: value} in key column order."""
    values = json.loads(key)
    return {c: values[c] for c in columns}


def sort_keys(keys) -> list[str]:
    """Keys in natural order (numbers by value), for stable reports."""
    return sorted(keys, key=lambda k: [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
                                       for v in json.loads(k).values()])


def format_report(report: VerifyReport) -> list[str]:
    """Text lines for people: one per table, then the keys that differ (first few of each kind)."""
    lines = []
    for t in report.tables:
        if t.status == "not initialized":
            lines.append(f"{t.table:<28} not initialized (streamed without a copy; `replicator init {t.catalog}` "
                         "copies it)")
            continue
        if t.status == "equal":
            what = " (sales up: branch and its slice at HQ)" if t.direction == "uploads" else ""
            lines.append(f"{t.table:<28} equal ({t.hq_rows} rows){what}")
            continue
        there = "at HQ" if t.direction == "uploads" else "on the branch"
        counts = [f"{len(getattr(t, k))} {label}" for k, label in
                  (("missing", f"missing {there}"), ("extra", f"extra {there}"),
                   ("different", "different"), ("pending", "not yet applied")) if getattr(t, k)]
        lines.append(f"{t.table:<28} DIFFERENT: {', '.join(counts)} ({_sides(t)})")
        for kind in ("missing", "extra", "different", "pending"):
            keys = getattr(t, kind)
            if keys:
                shown = "; ".join(_show_key(t.key_columns, k) for k in keys[:SHOW_KEYS])
                more = f"; ... {len(keys) - SHOW_KEYS} more" if len(keys) > SHOW_KEYS else ""
                lines.append(f"    {kind}: {shown}{more}")
    if any(t.pending for t in report.tables):
        why = "the replicator is not running" if not report.replicator_running else \
            "it did not catch up in time"
        lines.append(f"rows 'not yet applied' have changes the stream has not applied yet ({why}); "
                     "they converge once `replicator run` catches up")
    compared = [t for t in report.tables if t.status != "not initialized"]
    differing = [t for t in compared if t.status == "different"]
    if differing:
        lines.append(f"differences in {len(differing)} of {len(compared)} tables")
    else:
        lines.append(f"branch {report.branch} equals HQ ({len(compared)} tables compared in "
                     f"{report.seconds:.1f} s)")
    return lines


def _sides(t: TableReport) -> str:
    """Row counts; for uploads `hq_rows` counts the source (the branch), `branch_rows` HQ's slice."""
    if t.direction == "uploads":
        return f"branch {t.hq_rows} rows, its slice at HQ {t.branch_rows}"
    return f"HQ {t.hq_rows} rows, branch {t.branch_rows}"


def _show_key(columns: list[str], key: str) -> str:
    return ", ".join(f"{c}={v}" for c, v in key_dict(columns, key).items())
