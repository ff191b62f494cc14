"""The throwaway clusters the other tests stand on: they must be real, separate and robust."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import psycopg
import pytest

from replicator.cluster import Cluster, ClusterError, find_bindir


@pytest.fixture
def base_dir():
    """A short directory the server user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="replicator-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _state(pid: int) -> str:
    """'gone', or the process state letter ('Z' for a dead process not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "gone"


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def test_find_bindir_has_server_binaries():
    bindir = find_bindir()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(bindir / name, os.X_OK), name


def test_find_bindir_honours_env(monkeypatch, tmp_path):
    real = find_bindir()
    monkeypatch.setenv("REPLICATOR_PG_BINDIR", str(real))
    assert find_bindir() == real
    monkeypatch.setenv("REPLICATOR_PG_BINDIR", str(tmp_path))
    with pytest.raises(ClusterError, match="REPLICATOR_PG_BINDIR"):
        find_bindir()


def test_connect_and_database_helpers(hq):
    assert hq.scalar("SELECT current_database()") == hq.name
    assert hq.scalar("SHOW wal_level") == "logical"
    assert hq.scalar("SHOW server_encoding") == "UTF8"
    hq.execute("CREATE TABLE t (id int PRIMARY KEY, label text)")
    assert hq.execute("INSERT INTO t VALUES (1, %s)", ("Políticas",)) is None
    assert hq.execute("SELECT id, upper(label) FROM t") == [(1, "POLÍTICAS")]
    assert hq.scalar("SELECT label FROM t WHERE id = 2") is None
    with hq.connect() as conn:
        assert conn.autocommit


def test_server_does_not_run_as_root(hq_cluster, hq):
    expected = os.getuid() if os.geteuid() != 0 else None
    data_dir = Path(hq.scalar("SELECT current_setting('data_directory')"))
    assert data_dir == hq_cluster.data_dir
    backend = hq.scalar("SELECT pg_backend_pid()")
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    for uid in (data_dir.stat().st_uid, _uid_of(backend), _uid_of(postmaster)):
        assert uid != 0 if expected is None else uid == expected


def test_wrong_password_is_rejected(hq_cluster, hq):
    role = f"r_{uuid.uuid4().hex[:8]}"
    hq.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right horse'")
    try:
        with psycopg.connect(hq_cluster.dsn(hq.name, role, "right horse")) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(hq_cluster.dsn(hq.name, role, "wrong"))
        assert hq.scalar("SELECT rolpassword LIKE 'SCRAM-SHA-256$%%' FROM pg_authid "
                         "WHERE rolname = %s", (role,))
    finally:
        hq.execute(f"DROP ROLE {role}")


def test_dsn_quotes_password(hq_cluster):
    dsn = hq_cluster.dsn("my db", "u", "p@ss:/word")
    assert dsn == f"postgresql://u:p%40ss%3A%2Fword@127.0.0.1:{hq_cluster.port}/my%20db"


def test_clusters_are_separate(hq_cluster, branch_a_cluster, hq, branch_a):
    assert hq_cluster.port != branch_a_cluster.port
    assert hq_cluster.data_dir != branch_a_cluster.data_dir
    hq.execute("CREATE TABLE only_on_hq (id int)")
    assert hq.scalar("SELECT to_regclass('only_on_hq') IS NOT NULL")
    assert branch_a.scalar("SELECT to_regclass('only_on_hq') IS NULL")
    assert hq.scalar("SELECT inet_server_port()") == hq_cluster.port
    assert branch_a.scalar("SELECT inet_server_port()") == branch_a_cluster.port


def test_restart_immediate_keeps_committed_data(scratch_cluster):
    db = scratch_cluster.create_database("keep")
    db.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS id")
    port = scratch_cluster.port
    scratch_cluster.restart("immediate")
    assert scratch_cluster.port == port
    assert db.scalar("SELECT count(*) FROM t") == 1000


def test_kill_then_start_recovers(scratch_cluster):
    db = scratch_cluster.create_database("crash")
    db.execute("CREATE TABLE t (id int)")
    with db.connect() as conn:  # many small commits, the last ones just before the crash
        for i in range(200):
            conn.execute("INSERT INTO t VALUES (%s)", (i,))
    scratch_cluster.kill()
    assert not scratch_cluster.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(db.dsn, connect_timeout=2)
    scratch_cluster.start()
    assert db.scalar("SELECT count(*) FROM t") == 200
    assert "database system was interrupted" in scratch_cluster.server_log()


def test_stop_start_and_cleanup(base_dir):
    cluster = Cluster("short", base_dir=base_dir)
    with cluster:
        root = cluster.root
        assert root.parent == base_dir
        cluster.stop()
        assert not cluster.is_running()
        cluster.start()
        assert cluster.database("postgres").scalar("SELECT 1") == 1
        cluster.create_database("gone")
        cluster.drop_database("gone")
        assert cluster.database("postgres").scalar(
            "SELECT count(*) FROM pg_database WHERE datname = 'gone'") == 0
    assert not root.exists()
    assert not cluster.is_running()


def test_fixed_port_in_use_fails_clearly(hq_cluster):
    with pytest.raises(ClusterError, match="pg_ctl start failed"):
        with Cluster("clash", port=hq_cluster.port):
            pass


_LEAVE_BEHIND = textwrap.dedent("""
    import os, sys
    from replicator.cluster import Cluster
    c = Cluster("leaky", base_dir=sys.argv[1]).start()
    print(c.root, flush=True)
    if sys.argv[2] == "crash":
        os.kill(os.getpid(), 9)   # no atexit: the next Cluster in that dir must sweep it
""")


def _leave_cluster_behind(base: Path, how: str) -> Path:
    done = subprocess.run([sys.executable, "-c", _LEAVE_BEHIND, str(base), how],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout, done.stderr
    return Path(done.stdout.split()[0])


def test_atexit_cleans_up_forgotten_cluster(base_dir):
    root = _leave_cluster_behind(base_dir, "exit")
    assert not root.exists()


def test_cluster_of_killed_process_is_swept(base_dir):
    root = _leave_cluster_behind(base_dir, "crash")
    assert root.exists()
    pid = int((root / "data" / "postmaster.pid").read_text().split()[0])
    assert _state(pid) not in ("gone", "Z")
    with Cluster("next", base_dir=base_dir):
        assert not root.exists()
    assert _state(pid) in ("gone", "Z")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another OS user")
def test_base_dir_the_server_user_cannot_enter_fails_clearly(base_dir):
    private = base_dir / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ClusterError, match="cannot write .*choose another base_dir"):
        with Cluster("private", base_dir=private):
            pass
    assert list(private.iterdir()) == []
