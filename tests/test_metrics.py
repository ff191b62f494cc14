"""Metrics (issue 20, point 5): `run --metrics` serves a branch's own view and `hq metrics`
the fleet as HQ sees it; the shipped alert rules and Grafana dashboard name only metrics
that these endpoints really serve; `hq status --json` is for machines."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from harness import REPO, make_setup, replicator_cli
from replicator.hq import role_name
from test_daemon import daemon, wait_until

HQ_SCHEMA = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(12,2));"
BRANCH_SCHEMA = """CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL,
                                       price numeric(12,2) CONSTRAINT cheap CHECK (price < 1000));"""
CATALOGS = {"items": {"label": "Items", "default": True, "tables": ["public.items"]}}
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """name{labels} -> value, from the text exposition format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m[1] + (m[2] or ""): float(m[3]) for m in SAMPLE.finditer(text)}


def value(samples: dict, name: str, **labels) -> float | None:
    for key, v in samples.items():
        if key.split("{")[0] == name and all(f'{k}="{w}"' in key for k, w in labels.items()):
            return v
    return None


def scrape_until(port: int, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(port)
        except OSError:
            assert time.monotonic() < deadline, f"nothing served on port {port}"
            time.sleep(0.1)


@pytest.fixture
def world(tmp_path, hq, branch_a):
    """An initialized branch named "metrics"; the roles its registration made are dropped after
    (roles are cluster-wide)."""
    hq.execute(HQ_SCHEMA)
    branch_a.execute(BRANCH_SCHEMA)
    s = make_setup(tmp_path, hq, CATALOGS)
    hq.execute("INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 10) g")
    b = s.add_branch("metrics", branch_a, poll_interval="50ms")
    b.init()
    yield b
    for name in ("metrics", "silent"):
        role = sql.Identifier(role_name(name))
        try:
            hq.execute(sql.SQL("DROP OWNED BY {}").format(role))
            hq.execute(sql.SQL("DROP ROLE {}").format(role))
        except psycopg.Error:
            pass             # never made


def test_run_serves_lag_applied_set_aside_and_process_metrics(world, hq):
    port = free_port()
    with daemon(world, "--metrics", f"127.0.0.1:{port}") as d:
        d.wait_for("replicating 1 tables")
        first = scrape_until(port)
        labels = dict(stream="catalogs", branch="metrics")
        assert value(first, "replicator_changes_applied_total", **labels) == 0
        assert value(first, "process_cpu_seconds_total") is not None
        assert value(first, "replicator_rows_set_aside", **labels) == 0
        assert value(first, "replicator_errors_total", kind="connection", **labels) == 0

        hq.execute("INSERT INTO items SELECT g, 'new ' || g, 5 FROM generate_series(11, 30) g")
        hq.execute("INSERT INTO items VALUES (31, 'too dear for this branch', 5000)")   # refused: cheap
        wait_until(lambda: value(scrape(port), "replicator_rows_set_aside", **labels) == 1, 10,
                   "the refused row counted as set aside")
        now = scrape(port)
        assert value(now, "replicator_changes_applied_total", **labels) == 20
        assert value(now, "replicator_errors_total", kind="set_aside", **labels) == 1
        assert time.time() - value(now, "replicator_last_apply_timestamp_seconds", **labels) < 10
        # caught up: the lag is the age of the last probe, well under a second at 50 ms polls
        wait_until(lambda: value(scrape(port), "replicator_lag_seconds", **labels) < 1, 10, "lag under 1 s")
        assert d.signal() < 5
    assert d.proc.returncode == 0, d.log
    with pytest.raises(OSError):
        scrape(port)                                  # the endpoint goes with the process


def test_lag_grows_while_hq_is_away(world, hq):
    """An outage shows as lag that keeps growing and a connection error, not a stale zero."""
    port = free_port()
    with daemon(world, "--metrics", f"127.0.0.1:{port}") as d:
        d.wait_for("replicating 1 tables")
        labels = dict(stream="catalogs", branch="metrics")
        wait_until(lambda: value(scrape_until(port), "replicator_lag_seconds", **labels) < 1, 10, "caught up")
        hq.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE application_name LIKE 'replicator run%%'")
        away = hq.cluster.database("postgres")
        away.execute("ALTER DATABASE " + hq.name + " ALLOW_CONNECTIONS false")
        away.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND application_name LIKE 'replicator run%%'", (hq.name,))
        try:
            wait_until(lambda: value(scrape(port), "replicator_errors_total", kind="connection", **labels) >= 1,
                       10, "the outage counted")
            time.sleep(2.5)
            assert value(scrape(port), "replicator_lag_seconds", **labels) > 2
        finally:
            away.execute("ALTER DATABASE " + hq.name + " ALLOW_CONNECTIONS true")
        wait_until(lambda: value(scrape(port), "replicator_lag_seconds", **labels) < 1, 40, "caught up again")
        assert d.signal() < 5


def test_a_bad_or_busy_metrics_address_is_one_line(world, branch_a):
    r = world.cli("run", "--once", "--metrics", "localhost")
    assert r.returncode == 2 and "expected HOST:PORT" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = world.cli("run", "--once", "--metrics", f"127.0.0.1:{busy.getsockname()[1]}")
    assert r.returncode == 1 and "cannot serve metrics on 127.0.0.1" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def _hq_metrics(hq_yaml: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "replicator", "hq", "metrics", "-c", str(hq_yaml),
                             "--listen", f"127.0.0.1:{port}"], cwd=REPO, stderr=subprocess.PIPE, text=True)


def test_hq_metrics_and_json_show_every_branch(world, hq):
    assert world.cli("run", "--once").returncode == 0
    hq_yaml = world.path.parent / "hq.yaml"
    with hq.connect() as conn:          # a second store that never reported
        from replicator import config
        from replicator.hq import add_branch
        add_branch(conn, config.load_hq(hq_yaml), "silent", {}, password=None)
    hq.execute("INSERT INTO items VALUES (40, 'pending', 1)")
    port = free_port()
    proc = _hq_metrics(hq_yaml, port)
    try:
        s = scrape_until(port)
        assert value(s, "replicator_hq_up") == 1
        assert value(s, "replicator_branch_pending_changes", branch="metrics") == 1
        assert value(s, "replicator_branch_stale", branch="metrics") == 0
        assert value(s, "replicator_branch_stale", branch="silent") == 1
        assert time.time() - value(s, "replicator_branch_last_report_timestamp_seconds", branch="metrics") < 60
        assert value(s, "replicator_branch_rows_set_aside", branch="metrics") == 0
        assert value(s, "replicator_branch_active", branch="silent") == 1
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, proc.stderr.read()

    doc = json.loads(replicator_cli("hq", "status", "-c", str(hq_yaml), "--json").stdout)
    by_name = {b["branch"]: b for b in doc["branches"]}
    assert by_name["metrics"]["pending"] == 1 and by_name["metrics"]["stale"] is False
    assert by_name["silent"]["last_report"] is None and by_name["silent"]["stale"] is True


def _named_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b((?:replicator|process)_[a-z_]+)\b", text))


def test_alert_rules_and_dashboard_name_only_served_metrics(world, hq):
    """Every metric config/alerts.yaml and config/grafana-dashboard.json use is served by
    `run --metrics` or `hq metrics` (so a renamed metric fails here, not in production)."""
    rules = yaml.safe_load((REPO / "config" / "alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} >= {
        "ReplicatorBranchStale", "ReplicatorLagHigh", "ReplicatorRowsSetAside", "ReplicatorLogRetentionNearLimit"}
    dashboard = json.loads((REPO / "config" / "grafana-dashboard.json").read_text())
    targets = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets, "the dashboard has no queries"
    used = set().union(*(_named_metrics(e) for e in exprs + targets))

    served = set()
    port, hq_port = free_port(), free_port()
    proc = _hq_metrics(world.path.parent / "hq.yaml", hq_port)
    try:
        with daemon(world, "--metrics", f"127.0.0.1:{port}") as d:
            d.wait_for("replicating 1 tables")
            served |= {k.split("{")[0] for k in scrape_until(port)}
            served |= {k.split("{")[0] for k in scrape_until(hq_port)}
            assert d.signal() < 5
    finally:
        proc.terminate()
        proc.wait(10)
    assert used and used <= served, f"named but not served: {sorted(used - served)}"
