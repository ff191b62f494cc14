"""The benchmark suite's smoke run: `python -m replicator.bench --quick` works end to end.

It checks the harness (clusters, baselines, the table and the Markdown file), not the
performance targets: those are for the full run on a quiet machine.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from replicator import bench
from tests.harness import REPO

EXPECTED_ROWS = [
    "catch-up apply: rate",
    "memory: peak RSS during catch-up",
    "initial copy: rate, end to end",
    "initial copy: rate, copy phase",
    "memory: peak RSS of init",
    "capture on HQ: pgbench single-row UPDATE, durable HQ",
    "capture on HQ: bulk UPDATE of 20,000 rows, durable HQ",
    "capture on HQ: pgbench single-row UPDATE, 8 clients, durable HQ",
    "capture on HQ: pgbench single-row UPDATE, fsync off",
    "capture on HQ: bulk UPDATE of 20,000 rows, fsync off",
    "latency: commit to visible, p50",
    "latency: commit to visible, p99",
    "fan-out: worst branch lag p99",
    "fan-out: HQ CPU per branch",
    "fan-out: window poll",
]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_run_prints_every_benchmark(tmp_path):
    md = tmp_path / "perf.md"
    done = subprocess.run([sys.executable, "-m", "replicator.bench", "--quick", "--markdown", str(md)],
                          cwd=REPO, capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    out = done.stdout
    assert "cores" in out and "PostgreSQL" in out
    for name in EXPECTED_ROWS:
        assert name in out, f"{name!r} missing from:\n{out}"
    assert "ERROR" not in out
    for line in out.splitlines():
        if any(line.startswith(name) for name in EXPECTED_ROWS):
            informational = "HQ CPU" in line or "8 clients" in line
            assert "pass" in line or "FAIL" in line or informational, line
    text = md.read_text()
    assert text.count("\n| ") == len(EXPECTED_ROWS) + 1    # header + one line per figure
    assert "python -m replicator.bench --quick" in text


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert bench.percentile(values, 50) == 50
    assert bench.percentile(values, 99) == 99
    assert bench.percentile(values, 100) == 100
    assert bench.percentile([7.0], 99) == 7.0


def test_results_judge_ratios_and_limits():
    rate = bench.ratio_result("b", "rate", 90, 100, "rows/s", 0.9, True)
    assert rate.ok and rate.ratio == pytest.approx(0.9)
    slow = bench.ratio_result("b", "time", 2.5, 1.0, "s", 2.0, False)
    assert not slow.ok and slow.target == "≤ 2×"
    lag = bench.limit_result("b", "lag", 2.0, 2.0, "s", strict_below=True)
    assert not lag.ok
    table = bench.text_table([rate, slow, lag])
    assert "pass" in table and "FAIL" in table and "b: rate" in table


def test_mixed_workload_shape():
    work = bench.Mixed(txns=1000)
    assert work.changes == 1_000_000
    assert work.update_span % 199 != 0 and work.update_span >= work.updates
    assert work.final_rows == work.base_rows + 300_000
    assert work.last_id == work.base_rows + 400_000


def test_a_failing_benchmark_makes_the_run_fail(monkeypatch, capsys):
    def broken(env):
        raise RuntimeError("boom")
    monkeypatch.setitem(bench.RUNNERS, "init", broken)
    assert bench.main(["--quick", "--only", "init"]) == 1
    out = capsys.readouterr().out
    assert "initial copy: ERROR" in out and "boom" in out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_capture_variants_script_runs():
    """The README quotes tests/bench_capture_variants.py: a tiny run keeps the script working."""
    env = {**os.environ, "RUNS": "1", "ROWS": "2000", "SECONDS": "1"}
    done = subprocess.run([sys.executable, "tests/bench_capture_variants.py", "hq"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    for line in ("floor: an empty log row", "binary image (record_send), no join", "capture as installed",
                 "an image-sized constant, no join", "1,024 JSONB images per log row", "capture of migration 004",
                 "and without the image", "and not SECURITY DEFINER", "without the xid index",
                 "a bare (table_id, op) table", "2 clients: capture", "8 clients: capture",
                 "without the old transition table", "row_to_json image, no join",
                 "capture before migration 003", "capture of migration 003",
                 "images 1,000 to a log row after the old/new join",
                 "before migration 004: after a bulk UPDATE in the session", "as installed: in a fresh session"):
        assert line in done.stdout, done.stdout
