"""A real PgBouncer in front of a throwaway cluster (tooling: tests and the fleet benchmark).

Started from the distribution's package (.ci/run installs it), as the unprivileged user the
clusters run as when run as root (PgBouncer, like PostgreSQL, will not run as root), in
transaction pooling.  The tests' default is two server connections per pool used in turn
(server_round_robin), so consecutive transactions of one client land on different server
connections, as they do on a busy pooler; the fleet benchmark asks for one per branch.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ..cluster import server_os_user

CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")


def find_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or next((c for c in CANDIDATES if os.access(c, os.X_OK)), None)
    if not found:
        raise RuntimeError("pgbouncer is not installed (.ci/run installs the distribution's package)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgBouncer:
    def __init__(self, backend_port: int, users: dict[str, str], pool_size: int = 2, min_pool_size: int | None = None,
                 max_clients: int = 200):
        # its own directory under /tmp: pytest's are private to root, the pooler's user could not enter
        self.dir = Path(tempfile.mkdtemp(prefix="replicator-pgbouncer-"))
        self.port = _free_port()
        self.backend_port = backend_port
        self.users = users            # role -> password (PgBouncer logs in to PostgreSQL with it)
        self.pool_size = pool_size
        self.min_pool_size = pool_size if min_pool_size is None else min_pool_size
        self.max_clients = max_clients
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PgBouncer":
        (self.dir / "userlist.txt").write_text(
            "".join(f'"{u}" "{p}"\n' for u, p in self.users.items()))
        (self.dir / "pgbouncer.ini").write_text(f"""[databases]
* = host=127.0.0.1 port={self.backend_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / "userlist.txt"}
pool_mode = transaction
default_pool_size = {self.pool_size}
min_pool_size = {self.min_pool_size}
server_round_robin = 1
max_client_conn = {self.max_clients}
logfile = {self.dir / "pgbouncer.log"}
pidfile = {self.dir / "pgbouncer.pid"}
""")
        self._out = open(self.dir / "stderr.txt", "w")
        user = server_os_user()
        if user:
            for p in (self.dir, *self.dir.iterdir()):
                os.chown(p, user[1], user[2])
        as_user = dict(user=user[1], group=user[2], extra_groups=[]) if user else {}
        self.proc = subprocess.Popen([find_pgbouncer(), str(self.dir / "pgbouncer.ini")], cwd=self.dir,
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
                                     **as_user)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"pgbouncer exited {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer not listening:\n{self.log()}")
                time.sleep(0.1)

    def dsn(self, dbname: str, user: str) -> str:
        return f"postgresql://{user}:{self.users[user]}@127.0.0.1:{self.port}/{dbname}"

    def log(self) -> str:
        return "".join((self.dir / f).read_text(errors="replace") for f in ("stderr.txt", "pgbouncer.log")
                       if (self.dir / f).exists())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc:
            self._out.close()
        shutil.rmtree(self.dir, ignore_errors=True)
