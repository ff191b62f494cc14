"""The tests' PostgreSQL servers, started by pytest-postgresql's executor.

pytest-postgresql runs `pg_ctl initdb` and `pg_ctl start` (its PostgreSQLExecutor, and the
session fixtures of `factories.postgresql_proc`); this module adds what the tests ask of a
server beyond that, as a `Cluster` (the demo's class, so tests and demo hold the same handle):

* PostgreSQL refuses to run as root, and CI runs as root: then the executor is handed
  `pg_ctl` through a small wrapper that drops to an unprivileged OS user (the one the demo
  uses) and lets that user into the directories pytest made for the server;
* the settings every test may need (logical WAL, slots, connections) and a pg_hba.conf where
  every role but the superuser gives its SCRAM password over TCP, so "wrong password" tests
  exercise real authentication (the executor's own initdb trusts everyone);
* stopping in a given mode, crashing (SIGKILL of the whole server) and starting again on the
  same port, and a streaming standby.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pytest_postgresql.executors import PostgreSQLExecutor

from replicator.cluster import PG_HBA, Cluster, ClusterError, find_bindir, server_os_user
from replicator.cluster import DEFAULT_SETTINGS, _conf_value, _free_port, _kill_tree, _run, _tail

# What pg_ctl's -o gets besides the executor's own (-F: no fsync, port, socket directory).
_SETTINGS = {k: v for k, v in DEFAULT_SETTINGS.items() if k != "fsync"}

_WRAPPER = '''#!{python}
"""pg_ctl as {user}, for pytest-postgresql's executor running as root (tests/servers.py)."""
import os, sys
PG_CTL, UID, GID, TOP = {pg_ctl!r}, {uid}, {gid}, {top!r}
args = sys.argv[1:]
for flag in ("-D", "--pgdata", "-l"):
    if flag in args[:-1]:
        # the directory pytest made for the server: the server user writes there, and
        # enters every directory above it (pytest makes them 0700 for root)
        where = os.path.dirname(os.path.abspath(args[args.index(flag) + 1]))
        if os.path.isdir(where) and os.stat(where).st_uid == 0:
            os.chown(where, UID, GID)
        up = os.path.dirname(where)
        while up.startswith(TOP) and up != TOP:
            mode = os.stat(up).st_mode
            if not mode & 0o001:
                os.chmod(up, mode | 0o001)
            up = os.path.dirname(up)
os.setgroups([])
os.setgid(GID)
os.setuid(UID)
os.execv(PG_CTL, [PG_CTL] + args)
'''


def _support_dir() -> Path:
    """The wrapper and pg_hba.conf, readable by the server user; removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="replicator-tests-pg-"))
    path.chmod(0o755)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def server_ctl() -> str | None:
    """What the executor runs as pg_ctl: pg_ctl itself, or the root wrapper around it;
    None when PostgreSQL is not installed (the cluster fixtures then skip or fail)."""
    try:
        pg_ctl = find_bindir() / "pg_ctl"
    except ClusterError:
        return None
    user = server_os_user()
    if user is None:
        return str(pg_ctl)
    wrapper = SUPPORT / "pg_ctl"
    wrapper.write_text(_WRAPPER.format(python=sys.executable, user=user[0], pg_ctl=str(pg_ctl), uid=user[1],
                                       gid=user[2], top=tempfile.gettempdir()))
    wrapper.chmod(0o700)
    return str(wrapper)


def postgres_options() -> str:
    """The servers' settings as pg_ctl's -o: DEFAULT_SETTINGS and our pg_hba.conf."""
    hba = SUPPORT / "pg_hba.conf"
    hba.write_text(PG_HBA)
    hba.chmod(0o644)
    settings = {**_SETTINGS, "hba_file": str(hba)}
    # -o is split by the shell rules of pg_ctl: no value here holds a space
    return " ".join(f"-c {k}={_conf_value(v).strip(chr(39))}" for k, v in settings.items())


SUPPORT = _support_dir()
PG_CTL = server_ctl()
OPTIONS = postgres_options()


class ExecutorCluster(Cluster):
    """A server pytest-postgresql's executor started, as the `Cluster` the tests use."""

    def __init__(self, name: str, executor: PostgreSQLExecutor):
        super().__init__(name, port=executor.port)
        self.executor = executor
        self.data_dir = Path(executor.datadir)
        self.root = self.data_dir.parent

    def start(self) -> "ExecutorCluster":
        """Start again after stop() or kill() (crash recovery), on the same port: the
        executor's own start command, run to its end (pg_ctl start -w)."""
        if self.is_running():
            return self
        done = subprocess.run(self.executor.command_parts, env=self.executor.envvars, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
        if done.returncode != 0:
            raise ClusterError(f"pg_ctl start failed for {self.name}: {done.stderr.strip()}\n"
                               f"--- server log ---\n{_tail(self.server_log())}")
        return self

    def _pg_ctl(self, *args) -> None:
        done = subprocess.run([self.executor.executable, *map(str, args), "-D", str(self.data_dir)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise ClusterError(f"pg_ctl {args[0]} failed for {self.name}: {done.stderr.strip()}")

    def kill(self) -> None:
        """A crash (SIGKILL of the whole server); the socket's lock file it leaves in the
        shared socket directory is stale once the postmaster is gone (a zombie not yet reaped
        by init would make the next start refuse it)."""
        super().kill()
        if not self.is_running():
            (Path(self.executor.unixsocketdir) / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def server_log(self) -> str:
        path = Path(self.executor.logfile)
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        """Stop the server and remove its directory (a fixture's own server: the session
        fixtures of pytest-postgresql clean theirs up themselves)."""
        try:
            if self.is_running():
                try:
                    self.stop("immediate")
                except ClusterError:
                    _kill_tree(self.data_dir)
        finally:
            self.executor._clear_process()   # mirakuru's pg_ctl handle: nothing left to kill at exit
            shutil.rmtree(self.root, ignore_errors=True)


def _executor(name: str, directory: Path) -> PostgreSQLExecutor:
    return PostgreSQLExecutor(executable=PG_CTL, host="127.0.0.1", port=_free_port(),
                              datadir=str(directory / "data"), unixsocketdir=str(directory),
                              logfile=str(directory / "server.log"), startparams="-w", dbname="tests",
                              postgres_options=OPTIONS)


def private_cluster(name: str) -> ExecutorCluster:
    """A server of one test's own (it may stop, kill or reconfigure it): the executor
    initializes and starts it; cleanup() removes it."""
    directory = Path(tempfile.mkdtemp(prefix=f"replicator-test-{name}-"))
    cluster = ExecutorCluster(name, _executor(name, directory))
    try:
        cluster.executor.start()
    except BaseException:
        cluster.cleanup()
        raise
    return cluster


def standby_of(primary: Cluster, name: str = "standby") -> ExecutorCluster:
    """A streaming hot standby of `primary`: pg_basebackup -R (as the server user, trusted for
    replication on loopback), then the executor's start command on its copy; it replays the
    primary's WAL until stopped."""
    directory = Path(tempfile.mkdtemp(prefix=f"replicator-test-{name}-"))
    cluster = ExecutorCluster(name, _executor(name, directory))
    user = server_os_user()
    if user:
        os.chown(directory, user[1], user[2])
    try:
        rc, out = _run([find_bindir() / "pg_basebackup", "-D", cluster.data_dir, "-R", "-X", "stream", "-c", "fast",
                        "-h", primary.host, "-p", str(primary.port), "-U", primary.superuser], cwd=directory)
        if rc != 0:
            raise ClusterError(f"pg_basebackup of {primary.name} failed: {_tail(out)}")
        cluster.start()
    except BaseException:
        cluster.cleanup()
        raise
    return cluster


__all__ = ["ExecutorCluster", "OPTIONS", "PG_CTL", "private_cluster", "standby_of"]
