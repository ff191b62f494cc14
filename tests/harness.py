"""Test harness: an HQ and branches wired together with real config files.

`Setup` writes hq.yaml and one branch.yaml per branch into a temp dir,
installs capture on HQ and registers the branches, so a test reads like the
README: install, init, change HQ, run --once, compare.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from replicator import config
from replicator.capture import install
from replicator.cluster import Database
from replicator.runner import run
from replicator.hq import add_branch
from replicator.initialize import initialize

REPO = Path(__file__).resolve().parent.parent
# The last commit whose numbered migrations still held the functions (before sql/*/functions/):
# tests that stand in for an older release install its migrations from git history.
FUNCTIONS_IN_MIGRATIONS = "2702360"


def file_at(commit: str, path: str) -> str:
    """A file of this repository as it was at `commit`."""
    return subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"],
                          capture_output=True, text=True, check=True).stdout


def migrations_at(commit: str, side: str) -> list[tuple[int, str, str]]:
    """One side's numbered migrations as the release at `commit` shipped them: (version, name, text)."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", commit, f"sql/{side}/"],
                           capture_output=True, text=True, check=True).stdout.split()
    out = []
    for path in sorted(names):
        stem = Path(path).stem
        version, _, name = stem.partition("_")
        if version.isdigit():
            out.append((int(version), name, file_at(commit, path)))
    return out


@dataclass
class Branch:
    name: str
    db: Database
    path: Path

    @property
    def cfg(self) -> config.BranchConfig:
        return config.load_branch(self.path)

    def init(self, *catalogs: str, **kw):
        return initialize(self.cfg, list(catalogs), **kw)

    def run_once(self) -> int:
        return run(self.cfg, once=True)

    def cli(self, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the real `replicator` command in a subprocess with this branch's config."""
        return replicator_cli(*args, "-c", str(self.path), timeout=timeout, env=env)

    def popen(self, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "replicator", *args[:1], "-c", str(self.path), *args[1:]]
        return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, **kw)


@dataclass
class Setup:
    hq: Database
    dir: Path
    hq_path: Path
    branches: dict[str, Branch] = field(default_factory=dict)

    @property
    def hq_cfg(self) -> config.HQConfig:
        return config.load_hq(self.hq_path)

    def install(self):
        with self.hq.connect() as conn:
            return install(conn, self.hq_cfg)

    def add_branch(self, name: str, db: Database, catalogs: list[str] | None = None,
                   params: dict | None = None, **extra) -> Branch:
        with self.hq.connect() as conn:
            add_branch(conn, self.hq_cfg, name, params or {}, password=None)
        doc = {"branch": name, "source": {"dsn": self.hq.dsn}, "target": {"dsn": db.dsn}, **extra}
        if catalogs is not None:
            doc["catalogs"] = catalogs
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        b = self.branches[name] = Branch(name, db, path)
        return b


def make_setup(tmp_path: Path, hq: Database, catalogs: dict, schema_sql: str | None = None,
               branch_dbs: list[Database] = (), retention: str = "7d") -> Setup:
    """Create `schema_sql` on HQ and on every branch db, write hq.yaml, install capture."""
    if schema_sql:
        hq.execute(schema_sql)
        for b in branch_dbs:
            b.execute(schema_sql)
    hq_path = tmp_path / "hq.yaml"
    hq_path.write_text(yaml.safe_dump({"dsn": hq.dsn, "retention": retention, "catalogs": catalogs},
                                      sort_keys=False, allow_unicode=True))
    s = Setup(hq, tmp_path, hq_path)
    s.install()
    return s


def replicator_cli(*args: str, timeout: float = 120, env: dict | None = None,
                   input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replicator", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, input=input)


def table_rows(db: Database, table: str, columns: str = "*", where: str = "true") -> list[str]:
    """Every row in its text form, sorted: an exact comparison across clusters."""
    # (t.*): the whole row even when the table has a column named t
    rows = db.execute(f"SELECT (t.*)::text FROM (SELECT {columns} FROM {table} WHERE {where}) t ORDER BY 1")
    return [r[0] for r in rows or []]


def assert_same(hq: Database, branch: Database, table: str, columns: str = "*",
                hq_where: str = "true") -> None:
    a, b = table_rows(hq, table, columns, hq_where), table_rows(branch, table, columns, "true")
    if a != b:
        missing = sorted(set(a) - set(b))[:5]
        extra = sorted(set(b) - set(a))[:5]
        raise AssertionError(f"{table}: HQ {len(a)} rows, branch {len(b)} rows; "
                             f"missing on branch e.g. {missing}; extra e.g. {extra}")
