"""Sales up under faults: the network to HQ breaks mid-upload, HQ restarts while a branch
sells (issue 19).

Both tests run the real loop, `replicator.runner.run`, in a thread and never restart it:
it has to reconnect by itself, and HQ must end with every sale and line of the branch
exactly once.
"""
from __future__ import annotations

import logging
import random
import threading
import time

import pytest
import yaml

from replicator import uploads
from replicator.runner import run

from faultproxy import FaultProxy
from test_uploads import BACKLOG, STORES, Uploading, assert_slices_match, sell

POSITION = "SELECT applied_changes FROM replication.position WHERE stream = 'uploads:store-a'"
LOGGED = ("SELECT coalesce(last_value, 0) FROM pg_catalog.pg_sequences "
          "WHERE schemaname = 'replication' AND sequencename = 'change_log_id_seq'")


@pytest.fixture
def up(tmp_path, hq, branch_a, branch_b):
    return Uploading(tmp_path, hq, branch_a, branch_b)


class Runner:
    """`run(cfg, stop=...)` in a thread; what it returned or raised is kept."""

    def __init__(self, cfg):
        self.stop = threading.Event()
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._main, args=(cfg,), name="replicator-run", daemon=True)
        self.thread.start()

    def _main(self, cfg) -> None:
        try:
            self.result = run(cfg, stop=self.stop)
        except BaseException as e:        # noqa: BLE001 - reported by the test
            self.error = e

    def alive(self) -> bool:
        return self.thread.is_alive()

    def check(self, what: str) -> None:
        assert self.alive(), f"replicator run ended {what}: returned {self.result!r}, raised {self.error!r}"

    def finish(self, timeout: float = 30) -> None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "replicator run did not stop within 30 s of being asked"
        assert self.error is None, f"replicator run raised {self.error!r}"
        assert self.result == 0


def applied(up: Uploading) -> int:
    return up.hq.execute(POSITION)[0][0] or 0


def wait_for(predicate, timeout: float, what: str, runner: Runner) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        runner.check(f"while waiting for {what}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


CUTS = 6


def reconnects(caplog) -> int:
    return sum(r.getMessage().startswith("reconnected after") for r in caplog.records
               if r.name == "replicator.runner")


def test_a_connection_cut_mid_upload_loses_and_doubles_nothing(up, hq_cluster, caplog):
    caplog.set_level(logging.INFO, logger="replicator")
    rng = random.Random(23)
    a = up.dbs["store-a"]
    up.init("store-a")
    up.init("store-b")
    a.execute(BACKLOG)
    first = a.execute(LOGGED)[0][0]
    a.execute("CALL ring_up(1, 11, 4000)")                 # 4,000 sales queued: 16,000+ changes
    assert a.execute(LOGGED)[0][0] - first > 16000
    with FaultProxy(hq_cluster.port) as proxy:
        doc = yaml.safe_load(up.paths["store-a"].read_text())
        doc["source"]["dsn"] = proxy.dsn(doc["source"]["dsn"])    # both flows reach HQ through it
        up.paths["store-a"].write_text(yaml.safe_dump({**doc, "batch_rows": 150}))   # many HQ transactions
        runner = Runner(up.cfg("store-a"))
        midway, cut_connections = set(), 0
        try:
            for i in range(CUTS):
                # cut at a random moment once the (re)connected run has committed at HQ again
                last = applied(up)
                wait_for(lambda: applied(up) > last, 30, f"the upload to move after cut {i}", runner)
                time.sleep(rng.uniform(0, 0.4))
                before = applied(up)
                n = proxy.cut()
                after = applied(up)
                total = a.execute(LOGGED)[0][0] - first
                cut_connections += n
                if 0 < before and after < total:
                    midway.add(after)         # the cut fell inside the upload, not after it
                if rng.random() < 0.4:
                    a.execute("CALL ring_up(1, 12, 40)")       # the store keeps selling meanwhile
            assert proxy.cuts >= CUTS and cut_connections >= CUTS, (proxy.cuts, cut_connections)
            assert len(midway) >= 3, f"cuts fell mid-upload only at {sorted(midway)}"
            # without a restart, the run reconnects and uploads the rest through the proxy
            total = a.execute(LOGGED)[0][0] - first
            wait_for(lambda: applied(up) >= total, 60, "the whole backlog at HQ", runner)
            runner.check("after the cuts")
            assert proxy.connections > CUTS and reconnects(caplog) >= CUTS, \
                (proxy.connections, reconnects(caplog))       # it came back by itself after every cut
        finally:
            runner.stop.set()
            runner.thread.join(30)
        runner.finish()
        up.run_once("store-a")
        st = uploads.status(up.cfg("store-a"))
        assert st.pending == 0 and st.set_aside == 0, st.line()
    assert_slices_match(up)
    # one log row per change (single-row statements): HQ counted each exactly once
    assert applied(up) == a.execute(LOGGED)[0][0] - first


def test_hq_restarted_while_a_branch_keeps_selling(up, hq_cluster, caplog):
    caplog.set_level(logging.INFO, logger="replicator")
    rng = random.Random(29)
    a = up.dbs["store-a"]
    sell(a, "store-a", 10, rng)
    for name in STORES:
        up.init(name)
    cfg = up.cfg("store-a")
    runner = Runner(cfg)
    try:
        sell(a, "store-a", 10, rng)
        wait_for(lambda: uploads.status(cfg).pending == 0, 30, "the first sales at HQ", runner)
        hq_cluster.stop()
        try:
            # ~10 s of sales with HQ down: each commits at once, the till never waits for HQ
            sold, slowest, start = 0, 0.0, time.monotonic()
            while time.monotonic() - start < 10:
                t0 = time.monotonic()
                sell(a, "store-a", 1, rng)
                slowest = max(slowest, time.monotonic() - t0)
                sold += 1
                time.sleep(0.05)
            runner.check("while HQ was down")
        finally:
            hq_cluster.start()
        assert sold >= 50 and slowest < 1.0, (sold, slowest)
        assert up.hq.execute("SELECT count(*) FROM public.sales WHERE store_id = 1")[0][0] < \
            a.execute("SELECT count(*) FROM public.sales")[0][0]       # those sales were not at HQ yet
        sell(a, "store-a", 10, rng)
        # the same run, never restarted, reconnects and uploads everything
        def caught_up() -> bool:
            try:
                if uploads.status(cfg).pending != 0:
                    return False
            except Exception:        # noqa: BLE001 - HQ still starting up
                return False
            return up.slice("public.sales", "store-a") == up.slice("public.sales", "store-a", a) and \
                up.slice("public.sale_lines", "store-a") == up.slice("public.sale_lines", "store-a", a)
        wait_for(caught_up, 60, "every sale at HQ after the restart", runner)
        runner.check("after HQ came back")
        assert reconnects(caplog) >= 1                 # the outage was lived through, not skipped
    finally:
        runner.stop.set()
        runner.thread.join(30)
    runner.finish()
    assert_slices_match(up)
    st = uploads.status(cfg)
    assert st.pending == 0 and st.set_aside == 0, st.line()
