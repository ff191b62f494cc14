"""A wheel is the whole product: `pip install replicator` (not editable) works without a checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_sql_and_configs_and_its_install_runs_the_demo(tmp_path):
    # From a copy: setuptools reuses build/ in the tree, where an earlier build can leave files.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, text=True)
    wheel = next(tmp_path.glob("replicator-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith((".sql", ".yaml"))}
    expected = ({"replicator/sql/" + p.relative_to(ROOT / "sql").as_posix() for p in (ROOT / "sql").rglob("*.sql")}
                | {"replicator/templates/" + p.name for p in (ROOT / "config").glob("*.yaml")})
    assert len(expected) >= 6 and shipped == expected
    modules = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    product = {p.relative_to(ROOT).as_posix() for p in (ROOT / "replicator").rglob("*.py")
               if "bench" not in p.relative_to(ROOT / "replicator").parts}
    assert modules == product, "the wheel ships every module of the product and no benchmark code"

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    # The installed copy, not the checkout, answers: PYTHONPATH comes before the editable
    # install's finder, and the demo's daemons inherit it.
    env = {**os.environ, "PYTHONPATH": str(site), "REPLICATOR_HQ_DSN": "host=hq.invalid dbname=pos"}

    def replicator(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "replicator", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=180)

    where = subprocess.run([sys.executable, "-c", "import replicator; print(replicator.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    r = replicator("hq", "sql", "-c", str(ROOT / "config" / "hq.yaml"))      # never connects
    assert r.returncode == 0, r.stderr
    assert "CREATE TABLE replication.change_log" in r.stdout
    r = replicator("demo", "--duration", "3", "--size", "tiny")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for branch in ("store-001", "store-002"):
        assert f"{branch}: catalogs are up to date" in r.stdout, r.stdout[-3000:]
