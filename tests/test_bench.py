"""The benchmark suite's smoke run: `python -m replicator.bench --quick` works end to end.

It checks the harness (clusters, baselines, the table and the Markdown file), not the
performance targets: those are for the full run on a quiet machine.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from replicator.bench import suite as bench
from tests.harness import REPO

EXPECTED_ROWS = [
    "catch-up apply: rate",
    "memory: peak RSS during catch-up",
    "initial copy: rate, end to end",
    "initial copy: rate, copy phase",
    "memory: peak RSS of init",
    "capture on HQ: pgbench single-row UPDATE, durable HQ",
    "capture on HQ: bulk UPDATE of 20,000 rows, durable HQ",
    "capture on HQ: pgbench single-row UPDATE, 8 clients, branches connected, durable HQ",
    "wake-ups: HQ CPU per idle connected branch",
    "capture on HQ: pgbench single-row UPDATE, fsync off",
    "capture on HQ: bulk UPDATE of 20,000 rows, fsync off",
    "latency: commit to visible, p50",
    "latency: commit to visible, p99",
    "fan-out: worst branch lag p99",
    "fan-out: HQ CPU per branch",
    "fan-out: window poll",
    "row restriction: filtered init, end to end",
    "row restriction: filtered catch-up",
    "uploads: 600 queued sales (1,800 rows), one branch",
    "uploads: ten branches at once into one HQ",
    "uploads: capture of a sale (header + 3 lines), durable branch",
    "fleet: HQ CPU polling, 40 idle branches",
    "fleet: HQ CPU the 40 branches add while the writer writes",
    "fleet: writer TPS with 40 branches vs none",
    "fleet: lag p99 over every change seen",
]


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_quick_run_prints_every_benchmark(tmp_path):
    md = tmp_path / "perf.md"
    done = subprocess.run([sys.executable, "-m", "replicator.bench", "--quick", "--markdown", str(md)],
                          cwd=REPO, capture_output=True, text=True, timeout=320)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    out = done.stdout
    assert "cores" in out and "PostgreSQL" in out
    for name in EXPECTED_ROWS:
        assert name in out, f"{name!r} missing from:\n{out}"
    assert "ERROR" not in out
    for line in out.splitlines():
        if any(line.startswith(name) for name in EXPECTED_ROWS):
            informational = "HQ CPU per branch" in line
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
