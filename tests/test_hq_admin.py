"""HQ administration: `hq sql`, `hq add-branch` (least privilege), `hq status` and `hq prune`."""
from __future__ import annotations

import subprocess

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from harness import assert_same, replicator_cli, table_rows
from test_catalogs import HQ_YAML, Pos, bare_pos, pos  # noqa: F401  (fixtures)
from replicator import config, sample
from replicator.cluster import find_bindir
from replicator.errors import ConfigError
from replicator.hq import add_branch, role_name

LABELS = {"customers": "Clientes", "registers": "Cajas", "stores": "Tiendas", "policies": "Políticas",
          "departments": "Departamentos", "lines": "Líneas", "currencies": "Monedas", "taxes": "Impuestos",
          "categories": "Categorías", "items": "Artículos", "stock": "Existencias", "kits": "Kits",
          "devices": "Dispositivos", "payment_methods": "Formas de pago", "users": "Usuarios"}
DEFAULTS = {"customers", "policies", "currencies", "items", "stock"}


# ------------------------------------------------------------------ hq sql

def _registry(db) -> list:
    """What `hq install` leaves on a database: registry, triggers, functions, grants."""
    return [
        db.execute("SELECT * FROM replication.catalogs ORDER BY name"),
        db.execute("SELECT id, catalog, schema_name, table_name, key_columns, filter, exclude_columns, active, "
                   "signature, capture_since IS NOT NULL, row_access FROM replication.tables ORDER BY id"),
        db.execute("SELECT side, version, name FROM replication.versions ORDER BY 1, 2"),
        db.execute("SELECT tgrelid::regclass::text, tgname, tgfoid::regproc::text, tgtype FROM pg_trigger "
                   "WHERE tgname LIKE 'replicator%' ORDER BY 1, 2"),
        db.execute("SELECT proname, prosecdef, md5(prosrc), proacl::text FROM pg_proc "
                   "WHERE pronamespace = 'replication'::regnamespace ORDER BY 1, 3"),
        db.execute("SELECT c.relname, c.relacl::text, (SELECT array_agg(a.attname::text || ':' || a.attacl::text "
                   "ORDER BY a.attnum) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attacl IS NOT NULL) "
                   "FROM pg_class c WHERE c.relnamespace IN ('public'::regnamespace, 'replication'::regnamespace) "
                   "AND c.relkind = 'r' ORDER BY 1"),
        db.execute("SELECT polname, pg_get_expr(polqual, polrelid) FROM pg_policy "
                   "WHERE polrelid = 'replication.change_log'::regclass ORDER BY 1"),
    ]


def test_hq_sql_is_everything_hq_install_does(bare_pos, branch_a):
    r = bare_pos.hq_cli("sql")
    assert r.returncode == 0, r.stderr
    script = r.stdout
    assert "-- migration 001_capture" in script and "CREATE TABLE replication.change_log" in script
    for name, label in LABELS.items():
        assert f"SELECT replication.define_catalog('{name}', '{label}', {str(name in DEFAULTS).lower()});" \
            in script, name
    for table in ("stock", "registers", "devices"):
        assert f"SELECT replication.attach_table('{table}', 'public', '{table}', 'store_id = :store_id', " \
               "'{}'::text[]);" in script
    assert "SELECT replication.attach_table('users', 'public', 'users', NULL, '{password_hash}'::text[]);" in script

    # a DBA's migration tool runs it on an empty database that has the schema ...
    with branch_a.connect() as conn:
        sample.load_schema(conn)
    psql = subprocess.run([str(find_bindir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", branch_a.dsn],
                          input=script, capture_output=True, text=True, timeout=60)
    assert psql.returncode == 0, psql.stderr
    assert "run `replicator hq install` after applying it" in script
    # ... and gets what `hq install` gives, but for the row restriction of filtered catalogs
    # and the routes of their log rows (capture then writes them), which need HQ's column
    # types: `hq install` after the script adds just those
    r = bare_pos.hq_cli("install")
    assert r.returncode == 0, r.stderr
    r = replicator_cli("hq", "install", "-c", str(HQ_YAML), env={"REPLICATOR_HQ_DSN": branch_a.dsn})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"capture attached: public.{t}\n" for t in ("devices", "registers", "stock")) + \
        "".join(f"row restriction for branch logins rebuilt: public.{t}\n"
                               for t in ("registers", "stock", "devices")) + "".join(
        f"upload target: public.{t} (branch logins write only their slice)\n" for t in ("sales", "sale_lines")
    ), r.stdout
    assert _registry(branch_a) == _registry(bare_pos.hq)
    # 4 statement triggers and the key-change row trigger per table, and the registry's own
    assert len(_registry(bare_pos.hq)[3]) == 5 * 19 + 1
    # the two routes are interchangeable: the script's registry part applied again keeps
    # filtered tables closed to catalog roles, and install after it changes nothing
    registry_part = script[script.index("\n-- catalogs and capture triggers from"):]
    psql = subprocess.run([str(find_bindir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", branch_a.dsn],
                          input=registry_part, capture_output=True, text=True, timeout=60)
    assert psql.returncode == 0, psql.stderr
    assert _registry(branch_a) == _registry(bare_pos.hq)
    policy = "SELECT xmin::text FROM pg_policy WHERE polname = 'branch_reads'"
    written = branch_a.scalar(policy)
    r = replicator_cli("hq", "install", "-c", str(HQ_YAML), env={"REPLICATOR_HQ_DSN": branch_a.dsn})
    assert (r.returncode, r.stdout) == (0, "capture is up to date (19 tables); nothing changed\n"), r.stderr
    assert branch_a.scalar(policy) == written     # the log's policy untouched: capture never waited on it


# ------------------------------------------------------------- add-branch

def test_add_branch_prints_a_branch_yaml_and_creates_a_least_privilege_role(pos, tmp_path):
    name = pos.unique("store-7")
    r = pos.hq_cli("add-branch", name, "--param", "store_id=3")
    assert r.returncode == 0, r.stderr
    role = role_name(name)
    password = r.stderr.strip().rsplit(" ", 1)[1]
    assert r.stderr.startswith(f"password for role {role} (shown once")
    assert password not in r.stdout
    path = tmp_path / "branch.yaml"
    path.write_text(r.stdout)
    cfg = config.load_branch(path)
    assert cfg.branch == name and cfg.catalogs is None
    hq_info, src = conninfo_to_dict(pos.hq.dsn), conninfo_to_dict(cfg.source_dsn)
    assert "password" not in src and src["user"] == role
    assert (src["host"], src["port"], src["dbname"]) == (hq_info["host"], hq_info["port"], hq_info["dbname"])
    other = pos.register(pos.hq, 2)          # a second branch, for "not the other one's" checks

    with psycopg.connect(cfg.source_dsn, password=password, autocommit=True) as conn:
        def denied(query, *args):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(query, *args)

        # what a branch needs
        assert conn.execute("SELECT count(*) FROM replication.change_log").fetchone()[0] == 0
        # its own store's stock only, through HQ's read_rows; never the table itself
        own = pos.hq.scalar("SELECT count(*) FROM stock WHERE store_id = 3")
        assert 0 < own < 140
        tid = pos.hq.scalar("SELECT id FROM replication.tables WHERE table_name = 'stock'")
        assert conn.execute("SELECT count(*), min(store_id), max(store_id) FROM replication.read_rows(%s, "
                            "NULL::stock)", (tid,)).fetchone() == (own, 3, 3)
        denied("SELECT count(*) FROM stock")
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 50
        assert conn.execute("SELECT params FROM replication.branch_info(%s)", (name,)).fetchone() == \
            ({"store_id": "3"},)
        conn.execute("SELECT replication.ack(%s, pg_current_snapshot(), now())", (name,))
        # nothing more
        denied("SELECT replication.ack(%s, pg_current_snapshot(), now())", (other.name,))
        assert conn.execute("SELECT * FROM replication.branch_info(%s)", (other.name,)).fetchall() == []
        denied("SELECT * FROM replication.branches")
        denied("SELECT password_hash FROM users")
        denied("SELECT * FROM sales")                  # not a catalog
        for statement in ("INSERT INTO stock (store_id, item_id) VALUES (1, 1)",
                          "UPDATE items SET name = 'x'", "DELETE FROM customers", "TRUNCATE taxes",
                          "INSERT INTO replication.change_log (table_id, op) VALUES (1, 'T')",
                          "DELETE FROM replication.change_log", "UPDATE replication.horizon SET pruned_below = '1'",
                          "UPDATE replication.tables SET filter = NULL",
                          "SELECT replication.define_catalog('x', 'x', true)",
                          "SELECT replication.detach_table(1)",
                          "CREATE TABLE public.t (i int)"):
            denied(statement)
    acked = pos.hq.execute("SELECT name, acked_at IS NOT NULL FROM replication.branches ORDER BY acked_at")
    assert acked == [(name, True), (other.name, False)]
    attrs = pos.hq.execute("SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, "
                           "pg_has_role(rolname, 'replicator_branch', 'member') FROM pg_roles WHERE rolname = %s",
                           (role,))
    assert attrs == [(True, False, False, False, False, True)]


def test_add_branch_validates_its_parameters_before_creating_anything(pos):
    name = pos.unique("store-8")
    cases = [
        ((), "error: --param: row filters on HQ need store_id; pass --param store_id=VALUE"),
        (("--param", "store_id=4x"), "error: --param: store_id=4x does not fit the row filter of public.registers "
                                     "(store_id = :store_id): invalid input syntax for type integer: \"4x\""),
        (("--param", "store_id"), "error: --param: expected KEY=VALUE (got 'store_id')"),
    ]
    for args, message in cases:
        r = pos.hq_cli("add-branch", name, *args)
        assert (r.returncode, r.stdout, r.stderr.strip()) == (2, "", message), args
    assert pos.hq.scalar("SELECT count(*) FROM replication.branches") == 0
    assert pos.hq.scalar("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role_name(name),)) == 0

    with pos.hq.connect() as conn:
        cfg = config.load_hq(HQ_YAML)
        add_branch(conn, cfg, name, {"store_id": "8"}, "pw")
        twin = name.replace("store-8", "STORE_8")      # same login role name
        with pytest.raises(ConfigError, match="already belongs to branch " + name):
            add_branch(conn, cfg, twin, {"store_id": "9"}, "pw")


# ---------------------------------------------------------- status, prune

def _status(pos: Pos, config_path=HQ_YAML) -> dict[str, list[str]]:
    r = pos.hq_cli("status", config_path=config_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["branch", "last", "report", "pending", "set", "aside", "lag",
                                "sales", "up", "to", "pending", "set", "aside"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def _prune(pos: Pos, config_path) -> str:
    r = pos.hq_cli("prune", config_path=config_path)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _log_ids(pos: Pos) -> list[int]:
    return [r[0] for r in pos.hq.execute("SELECT id FROM replication.change_log ORDER BY id")]


@pytest.mark.slow
def test_status_prune_and_a_branch_that_fell_behind(pos, branch_a, branch_b, tmp_path):
    a = pos.register(pos.branch_db(branch_a), 1, catalogs=["stock", "items"])
    b = pos.register(pos.branch_db(branch_b), 2, catalogs=["stock", "items"])
    never = pos.register(branch_b, 3, catalogs=["stock"])
    a.init()
    b.init()
    no_retention = tmp_path / "hq-no-retention.yaml"
    no_retention.write_text(HQ_YAML.read_text(encoding="utf-8").replace("\nretention: 7d\n", "\nretention: 0s\n"))

    pos.hq.execute("UPDATE items SET name = name || '.' WHERE id <= 5")            # batch 1: both apply it
    a.run_once()
    b.run_once()
    batch1 = _log_ids(pos)
    pos.hq.execute("UPDATE stock SET quantity = quantity + 1 WHERE store_id = 2")  # batch 2: only A applies it
    a.run_once()
    batch2 = _log_ids(pos)[len(batch1):]
    assert len(batch1) == 5 and len(batch2) == 45

    st = _status(pos)
    assert st[a.name][2:5] == ["0", "0", "-"]                 # date, time, pending, set aside, lag
    assert st[b.name][2:4] == ["45", "0"] and st[b.name][5] == "s"      # ... "45  0  3.2 s"
    assert st[never.name] == ["never", "-", "0", "-", "-", "-", "0"]     # ... and no sales uploaded

    # retention keeps everything young; without retention only what every active branch has goes
    assert _prune(pos, HQ_YAML).startswith("pruned 0 log rows")
    assert _log_ids(pos) == batch1 + batch2
    out = _prune(pos, no_retention)
    assert out.startswith("pruned 5 log rows") and f"oldest position held by: {b.name}" in out
    assert _log_ids(pos) == batch2
    b.run_once()                                               # B still has everything it needs
    assert_same(pos.hq, b.db, "stock", hq_where="store_id = 2")

    # B goes quiet, is deactivated, the log is pruned past it, then B comes back
    pos.hq.execute("UPDATE stock SET quantity = quantity + 1 WHERE store_id = 2")
    a.run_once()
    pos.hq.execute("UPDATE replication.branches SET active = false WHERE name = %s", (b.name,))
    assert _prune(pos, no_retention).startswith("pruned 90 log rows")
    r = pos.hq_cli("add-branch", b.name, "--param", "store_id=2")   # reactivates it, same role
    assert r.returncode == 0 and "its password is unchanged" in r.stderr, r.stderr
    stock_before = table_rows(b.db, "stock")
    position_before = b.db.execute("SELECT * FROM replication.position")
    r = b.cli("run", "--once")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"error: branch {b.name} fell behind the log retained on HQ" in r.stderr
    assert "run `replicator init --force` to re-copy its catalogs" in r.stderr
    assert table_rows(b.db, "stock") == stock_before
    assert b.db.execute("SELECT * FROM replication.position") == position_before
    r = b.cli("check")
    assert r.returncode == 1 and "fell behind the log retained on HQ" in r.stderr

    b.init(force=True)
    assert_same(pos.hq, b.db, "stock", hq_where="store_id = 2")
    assert b.cli("check").returncode == 0
