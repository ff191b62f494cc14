"""A wheel carries the SQL: `pip install replicator` (not editable) must work without a checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_every_sql_file_and_an_install_uses_them(tmp_path):
    # From a copy: setuptools reuses build/ in the tree, where an earlier build can leave files.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, text=True)
    wheel = next(tmp_path.glob("replicator-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".sql")}
    expected = {"replicator/sql/" + p.relative_to(ROOT / "sql").as_posix() for p in (ROOT / "sql").rglob("*.sql")}
    assert expected and shipped == expected

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    # The installed copy, not the checkout, answers (it comes first on sys.path).
    probe = (f"import sys; sys.path.insert(0, {str(site)!r}); sys.argv = ['replicator'] + sys.argv[1:]\n"
             "import replicator, replicator.sample as s\n"
             f"assert replicator.__file__.startswith({str(site)!r}), replicator.__file__\n"
             "assert s.SCHEMA_FILE.is_file() and s.SCHEMA_FILE.is_relative_to(sys.path[0]), s.SCHEMA_FILE\n"
             "from replicator.cli import main; main()\n")
    env = {**os.environ, "REPLICATOR_HQ_DSN": "host=hq.invalid dbname=pos"}   # `hq sql` never connects
    r = subprocess.run([sys.executable, "-c", probe, "hq", "sql", "-c", str(ROOT / "config" / "hq.yaml")],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "CREATE TABLE replication.change_log" in r.stdout
