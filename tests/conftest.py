"""Fixtures: three real PostgreSQL clusters (HQ and two branches), one fresh database each per test.

The servers are pytest-postgresql's: its process fixtures (`factories.postgresql_proc`) run
initdb and pg_ctl through its executor, with the wrapper and settings of tests/servers.py
(root in CI: the server runs as an unprivileged OS user). They start once per session
(initdb costs about a second each); every test
gets its own uniquely named database in each cluster it asks for, dropped afterwards,
so tests never see each other's tables, roles aside (roles are cluster-wide: tests
that create roles give them unique names and drop them).
"""
from __future__ import annotations

import os
import re
import uuid

import pytest
from pytest_postgresql import factories

from replicator.cluster import Cluster, ClusterError, Database, find_bindir
from servers import OPTIONS, PG_CTL, ExecutorCluster, private_cluster


def _require_postgres() -> None:
    """Skip when PostgreSQL is not installed, except in CI, which must have everything."""
    try:
        find_bindir()
    except ClusterError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


def _server():
    """pytest-postgresql's session-scoped server fixture for one of the three clusters (its
    directory is named after the fixture: hq_proc, branch_a_proc, branch_b_proc)."""
    return factories.postgresql_proc(executable=PG_CTL, host="127.0.0.1", port=None, dbname="tests",
                                     startparams="-w", postgres_options=OPTIONS)


hq_proc = _server()
branch_a_proc = _server()
branch_b_proc = _server()


def _session_cluster(name: str, request: pytest.FixtureRequest) -> Cluster:
    _require_postgres()
    return ExecutorCluster(name, request.getfixturevalue(f"{name}_proc"))


@pytest.fixture(scope="session")
def hq_cluster(request):
    return _session_cluster("hq", request)


@pytest.fixture(scope="session")
def branch_a_cluster(request):
    return _session_cluster("branch_a", request)


@pytest.fixture(scope="session")
def branch_b_cluster(request):
    return _session_cluster("branch_b", request)


def _fresh_database(cluster: Cluster, request: pytest.FixtureRequest, role: str):
    """A new database named after the role and the test (readable in server logs), dropped after."""
    test = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:30]
    name = f"{role}_{test}_{uuid.uuid4().hex[:8]}"
    db = cluster.create_database(name)
    try:
        yield db
    finally:
        cluster.drop_database(name)


@pytest.fixture
def hq(hq_cluster: Cluster, request: pytest.FixtureRequest) -> Database:
    yield from _fresh_database(hq_cluster, request, "hq")


@pytest.fixture
def branch_a(branch_a_cluster: Cluster, request: pytest.FixtureRequest) -> Database:
    yield from _fresh_database(branch_a_cluster, request, "branch_a")


@pytest.fixture
def branch_b(branch_b_cluster: Cluster, request: pytest.FixtureRequest) -> Database:
    yield from _fresh_database(branch_b_cluster, request, "branch_b")


@pytest.fixture
def scratch_cluster() -> Cluster:
    """A private cluster for tests that stop, kill or reconfigure it (never a shared one)."""
    _require_postgres()
    cluster = private_cluster("scratch")
    try:
        yield cluster
    finally:
        cluster.cleanup()
