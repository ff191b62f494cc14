"""The benchmarks' harness: results and their table, percentiles, CPU accounting, pgbench.

Shared by suite.py and fleet.py (tooling, not the product)."""
from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..cluster import Cluster, Database, find_bindir

log = logging.getLogger("replicator.bench")     # what `python -m replicator.bench` shows


@dataclass
class Result:
    """One line of the table.  `higher` says which way is better for the ratio."""
    bench: str
    metric: str
    ours: float | None
    base: float | None = None
    unit: str = ""
    target: str = ""
    ok: bool | None = None
    ratio: float | None = None
    note: str = ""


def ratio_result(bench: str, metric: str, ours: float, base: float, unit: str, limit: float,
                 higher_is_better: bool, note: str = "") -> Result:
    """A figure judged by ours/base: at least `limit`x (rates) or at most `limit`x (times)."""
    ratio = ours / base if base else float("inf")
    ok = ratio >= limit if higher_is_better else ratio <= limit
    target = f"≥ {limit:g}×" if higher_is_better else f"≤ {limit:g}×"
    return Result(bench, metric, ours, base, unit, target, ok, ratio, note)


def limit_result(bench: str, metric: str, ours: float, limit: float, unit: str,
                 base: float | None = None, note: str = "", strict_below: bool = False) -> Result:
    """A figure judged against an absolute ceiling (latency, memory, lag)."""
    ok = ours < limit if strict_below else ours <= limit
    target = f"{'<' if strict_below else '≤'} {limit:g} {unit}"
    ratio = ours / base if base else None
    return Result(bench, metric, ours, base, unit, target, ok, ratio, note)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def _cells(r: Result) -> list[str]:
    verdict = "—" if r.ok is None else ("pass" if r.ok else "FAIL")
    ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
    return [f"{r.bench}: {r.metric}", _fmt(r.ours, r.unit), _fmt(r.base, r.unit), ratio,
            r.target or "—", verdict, r.note]


HEADER = ["benchmark", "ours", "baseline", "ratio", "target", "result", "notes"]


def text_table(results: list[Result]) -> str:
    rows = [HEADER] + [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 5)
    return "\n".join(lines)


def markdown_table(results: list[Result], machine: str, command: str) -> str:
    out = [f"{machine}", "", f"Command: `{command}`", "",
           "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for r in results:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |")
    return "\n".join(out) + "\n"


def machine_line() -> str:
    """Cores, CPU, memory, PostgreSQL and Python versions, date: what a reader needs to compare."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_text = f", {mem:.0f} GiB RAM"
    except (ValueError, OSError):
        mem_text = ""
    pg = subprocess.run([str(find_bindir() / "postgres"), "--version"], capture_output=True,
                        text=True).stdout.strip()
    return (f"{datetime.now():%Y-%m-%d %H:%M}: {os.cpu_count()} cores ({cpu}){mem_text}; {pg}; "
            f"Python {platform.python_version()}")


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); no interpolation, so p99 is a real sample."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def say(message: str, *args) -> None:
    log.info(message, *args)


def process_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of live processes (a daemon's work, without what it used before)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cluster_cpu_seconds(cluster: Cluster) -> float:
    """CPU used so far by a cluster: postmaster (with reaped children) plus live backends."""
    tick = os.sysconf("SC_CLK_TCK")
    pm = int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == pm:
            total += sum(int(x) for x in fields[11:15])   # utime stime cutime cstime
        elif ppid == pm:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def pgbench_tps(db: Database, script: Path, rows: int, seconds: int, clients: int = 2) -> float:
    c = db.cluster
    cmd = [str(find_bindir() / "pgbench"), "-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(seconds),
           "-f", str(script), "-D", f"n={rows}", "-h", c.host, "-p", str(c.port), "-U", c.superuser, db.name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed: {done.stderr.strip()[-1000:]}")
    for line in done.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(f"no tps in pgbench output: {done.stdout[-500:]}")
