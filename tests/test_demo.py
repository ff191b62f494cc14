"""`replicator demo` end to end, its cleanup on Ctrl-C, and init's progress display.

The demo tests run the real command in a subprocess (its own process group, as a
shell runs it) with TMPDIR pointed at a private directory, so every process the
demo starts can be found afterwards: postmasters name their data directory on
their command line, backends run with it as their working directory, and the
replicator daemons run in the demo's work directory.
"""
from __future__ import annotations

import io
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from replicator import progress, sample
from replicator.demo import verify_branch
from replicator.progress import reporter

from tests.harness import REPO, make_setup

DEMO_PROCESSES = 5    # at least: three postmasters and two replicator daemons


class DemoRun:
    """The demo in a subprocess, with its stdout read line by line as it comes."""

    def __init__(self, *args: str):
        self.tmp = Path(tempfile.mkdtemp(prefix="test-demo-"))
        self.tmp.chmod(0o755)     # the server OS user must reach the clusters inside
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replicator", "demo", *args], cwd=REPO, text=True,
            env={**os.environ, "TMPDIR": str(self.tmp)}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            # as a terminal starts it: a shell's background job (pytest run with `&`) would
            # hand down SIGINT ignored, and the Ctrl-C tests would wait out their timeout
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        """Read output until a line matches `pattern`."""
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if m := re.search(pattern, line):
                return m
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{self.output}")

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc

    @property
    def workdir(self) -> Path:
        return Path(self.wait_for(r"^working directory: (\S+)").group(1))

    def close(self) -> None:
        """Test teardown: never leave the demo or its servers behind, even when a test failed."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in processes_under(self.tmp):
            _kill(pid)
        shutil.rmtree(self.tmp, ignore_errors=True)


def processes_under(directory: Path) -> list[int]:
    """Live processes whose command line or working directory is inside `directory`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(directory) in cmdline or cwd.startswith(str(directory)):
            found.append(int(proc.name))
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _assert_nothing_left(run: DemoRun, workdir: Path) -> None:
    deadline = time.monotonic() + 5       # backends notice their postmaster's exit within a moment
    while (left := processes_under(run.tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind by the demo: {left}"
    assert not workdir.exists(), f"{workdir} was not removed"


@pytest.fixture
def demo_run():
    runs: list[DemoRun] = []

    def start(*args: str) -> DemoRun:
        runs.append(DemoRun(*args))
        return runs[-1]

    yield start
    for run in runs:
        run.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_demo_runs_end_to_end_and_leaves_nothing(demo_run):
    run = demo_run("--duration", "6", "--size", "tiny", "--rate", "40")
    workdir = run.workdir
    run.wait_for(r"^store-002: replicator running")
    assert len(processes_under(run.tmp)) >= DEMO_PROCESSES   # proves the leftover check sees them

    rc = run.finish()

    assert rc == 0, run.output
    for branch in ("store-001", "store-002"):
        assert f"{branch}: catalogs are up to date" in run.output
    assert re.search(r"^store-001  customers +Clientes +up to date, verified: \d+ rows equal HQ$", run.output,
                     re.M), run.output
    assert not re.search(r"^store-002  customers", run.output, re.M), "store-002 was set up without customers"
    applied = [int(n.replace(",", "")) for n in re.findall(r"store-00\d: ([\d,]+) applied", run.output)]
    assert max(applied) > 0, "the branches applied nothing while HQ was changing"
    # sales up: history at init, sales during the run, HQ's stock rule, and that stock back down
    for branch in ("store-001", "store-002"):
        assert re.search(rf"^{branch}: sales history uploaded to HQ \(sales: [1-9][\d,]* sales\)", run.output, re.M)
        assert re.search(rf"^{branch}  sales +Ventas +sales uploaded up to .*, 0 pending, 0 set aside, verified: "
                         r"[\d,]+ rows equal HQ's$", run.output, re.M), run.output
        assert f"{branch}: sales are up at HQ" in run.output
        moved = re.search(rf"^  {branch}: [\d,]+ sales, total [\d,.]+; ([\d,]+) lines sold during the demo took "
                          rf"([\d,.]+) units off HQ's stock of store \d, which {branch} holds too$", run.output, re.M)
        assert moved and int(moved[1].replace(",", "")) > 0 and float(moved[2].replace(",", "")) > 0, run.output
    assert "fiscal folios: no gaps at HQ" in run.output
    _assert_nothing_left(run, workdir)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("phase", ["setup", "live"])
def test_ctrl_c_stops_everything(demo_run, phase):
    """Ctrl-C (SIGINT to the demo's process group, as a terminal sends it) while the
    clusters are being loaded, or while the replicators run: nothing survives."""
    run = demo_run("--duration", "60", "--size", "tiny")
    workdir = run.workdir
    if phase == "setup":
        run.wait_for(r"^started HQ cluster")
        expected = 1
    else:
        run.wait_for(r"HQ [\d,]+ transactions, [\d,]+ rows changed \|")
        expected = DEMO_PROCESSES
    assert len(processes_under(run.tmp)) >= expected

    os.killpg(run.proc.pid, signal.SIGINT)
    rc = run.finish(timeout=60)

    assert rc == 130, run.output
    assert "cleaning up" in run.output
    _assert_nothing_left(run, workdir)


# ------------------------------------------------------------------ init progress

CATALOGS = {
    "items": {"label": "Artículos", "default": True,
              "tables": ["public.items", "public.item_prices", "public.item_barcodes"]},
    "stock": {"label": "Existencias", "default": True, "tables": ["public.stock"],
              "filter": "store_id = :store_id"},
}


@pytest.fixture
def sample_branch(tmp_path, hq, branch_a):
    with hq.connect() as conn:
        sample.load_schema(conn)
        counts = sample.generate(conn, "tiny")
    with branch_a.connect() as conn:
        sample.load_schema(conn)
    setup = make_setup(tmp_path, hq, CATALOGS)
    return setup.add_branch("store-001", branch_a, params={"store_id": 1}), counts


def test_init_draws_a_bar_per_table_on_a_terminal(sample_branch):
    branch, counts = sample_branch
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system=None)
    with reporter(tty=True, console=console) as prog:
        branch.init(progress=prog)
    screen = out.getvalue()
    for table in ("public.items", "public.item_prices", "public.item_barcodes", "public.stock"):
        assert table in screen
    assert f"{counts['items']:,} rows" in screen
    assert "rows/s" in screen
    stock_rows = branch.db.scalar("SELECT count(*) FROM public.stock")
    assert 0 < stock_rows < counts["stock"]            # the row filter applied
    assert "public.stock" in screen and f"{stock_rows:,} rows" in screen


def test_init_logs_plain_lines_when_not_on_a_terminal(sample_branch, caplog):
    branch, counts = sample_branch
    caplog.set_level(logging.INFO, logger="replicator.progress")
    with reporter(tty=False) as prog:
        branch.init(progress=prog)
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("copied ")]
    assert len(done) == 4, done
    assert any(m.startswith(f"copied public.items: {counts['items']:,} rows") for m in done), done


def test_periodic_line_estimates_rows_and_eta(monkeypatch, caplog):
    """HQ's estimate (start event) turns bytes in flight into rows, rows/s and an ETA."""
    monkeypatch.setattr(progress, "LOG_EVERY", 0)
    caplog.set_level(logging.INFO, logger="replicator.progress")
    with reporter(tty=False) as prog:
        prog("start", "public.items", 1_000_000, 80_000_000)
        time.sleep(0.05)
        prog("bytes", "public.items", 0, 20_000_000)
    line = caplog.records[-1].getMessage()
    assert re.match(r"copying public\.items: ~250,000 of ~1,000,000 rows \(25%\), ~[\d,]+ rows/s, "
                    r"20\.0 MB, ETA \d+", line), line


# ------------------------------------------------------------------ the demo's verification

def test_demo_verification_fails_on_a_changed_or_lost_row(sample_branch):
    """The demo's exit code rests on this check: it must see a wrong row and a lost row."""
    branch, _ = sample_branch
    branch.init()
    lines: list[str] = []
    assert verify_branch(branch.cfg, lambda line, **kw: lines.append(line))
    assert lines[-1] == "store-001: catalogs are up to date"
    assert re.search(r"^store-001  stock +Existencias +up to date, verified: \d+ rows equal HQ$", "\n".join(lines),
                     re.M), lines

    with branch.db.connect() as conn:
        conn.execute("SET session_replication_role = replica")     # past the read-only guard
        conn.execute("UPDATE public.items SET name = name || ' (editado)' WHERE id = 1")
        gone = conn.execute("DELETE FROM public.stock WHERE ctid = (SELECT min(ctid) FROM public.stock)").rowcount
    assert gone == 1

    lines.clear()
    assert not verify_branch(branch.cfg, lambda line, **kw: lines.append(line))
    text = "\n".join(lines)
    assert re.search(r"^store-001  items +Artículos +up to date, DIFFERENT from HQ$", text, re.M), text
    assert re.search(r"^store-001  stock +Existencias +up to date, DIFFERENT from HQ$", text, re.M), text
    assert "public.items" in text and "public.stock" in text and "1 missing on the branch" in text
    assert lines[-1] == "store-001: catalogs DIFFER from HQ"
