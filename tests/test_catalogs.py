"""Catalogs as a product, end to end on the sample POS schema and the shipped config/hq.yaml.

HQ holds the generated sample chain; each branch database has the same schema
and starts empty.  Branches log in to HQ with the least-privilege role that
`hq add-branch` created, as a real store would, and HQ's registered
parameters decide which rows they receive.
"""
from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from harness import REPO, Branch, assert_same, replicator_cli, table_rows
from replicator import config, sample
from replicator.capture import install
from replicator.cluster import Database
from replicator.errors import FilterError
from replicator.hq import add_branch, role_name
from replicator.initialize import copy_query
from replicator.reader import LogReader, current_snapshot
from replicator.schema import bind_target, branch_params, offered_catalogs, select_catalogs, source_tables

HQ_YAML = REPO / "config" / "hq.yaml"
DEFAULTS = ["currencies", "customers", "items", "policies", "stock"]
ALL_CATALOGS = ["categories", "currencies", "customers", "departments", "devices", "items", "kits",
                "lines", "payment_methods", "policies", "registers", "stock", "stores", "taxes", "users"]
CATALOG_TABLES = {
    "customers": ["customers"], "registers": ["registers"], "stores": ["stores"],
    "policies": ["price_policies"], "departments": ["departments"], "lines": ["product_lines"],
    "currencies": ["currencies", "exchange_rates"], "taxes": ["taxes"], "categories": ["categories"],
    "items": ["items", "item_prices", "item_barcodes"], "stock": ["stock"],
    "kits": ["kits", "kit_components"], "devices": ["devices"], "payment_methods": ["payment_methods"],
    "users": ["users"],
}


# --------------------------------------------------------------------- setup

@dataclass
class Pos:
    """HQ with the sample chain and capture installed from config/hq.yaml."""

    hq: Database
    dir: Path
    roles: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict:
        return {"REPLICATOR_HQ_DSN": self.hq.dsn}

    def hq_cli(self, command: str, *args: str, config_path: Path = HQ_YAML, env: dict | None = None):
        """`replicator hq COMMAND -c hq.yaml ...` as a real subprocess."""
        return replicator_cli("hq", command, "-c", str(config_path), *args, env={**self.env, **(env or {})})

    def branch_db(self, db: Database) -> Database:
        """A branch database: the sample schema, no rows."""
        with db.connect() as conn:
            sample.load_schema(conn)
        return db

    def unique(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.roles.append(role_name(name))
        return name

    def register(self, db: Database, store_id: int | str | None = None, catalogs: list[str] | None = None,
                 name: str | None = None) -> Branch:
        """Register on HQ (parameters as the CLI passes them: strings) and write branch.yaml
        whose source DSN is the branch's own least-privilege login."""
        name = name or self.unique(f"store-{store_id}")
        password = secrets.token_urlsafe(12)
        params = {} if store_id is None else {"store_id": str(store_id)}
        with self.hq.connect() as conn:
            reg = add_branch(conn, config.load_hq(HQ_YAML), name, params, password)
        return self.write_branch(name, db, self.role_dsn(reg.role, password), catalogs)

    def write_branch(self, name: str, db: Database, source_dsn: str,
                     catalogs: list[str] | None = None, **extra) -> Branch:
        doc = {"branch": name, "source": {"dsn": str(source_dsn)}, "target": {"dsn": db.dsn}, **extra}
        if catalogs is not None:
            doc["catalogs"] = catalogs
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return Branch(name, db, path)

    def role_dsn(self, role: str, password: str) -> str:
        return self.hq.cluster.dsn(self.hq.name, role, password)

    def connect_as(self, branch: Branch) -> psycopg.Connection:
        return psycopg.connect(branch.cfg.source_dsn, autocommit=True)


def make_pos(hq: Database, tmp_path: Path, monkeypatch, installed: bool = True) -> Pos:
    monkeypatch.setenv("REPLICATOR_HQ_DSN", hq.dsn)
    with hq.connect() as conn:
        sample.load_schema(conn)
        sample.generate(conn, "tiny")
        if installed:
            install(conn, config.load_hq(HQ_YAML))
    return Pos(hq, tmp_path)


def drop_roles(pos: Pos) -> None:
    """Roles are cluster-wide: drop the ones this test created (before HQ's database goes)."""
    with pos.hq.connect() as conn:
        for role in pos.roles:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))


@pytest.fixture
def pos(hq, tmp_path, monkeypatch):
    p = make_pos(hq, tmp_path, monkeypatch)
    yield p
    drop_roles(p)


@pytest.fixture
def bare_pos(hq, tmp_path, monkeypatch):
    """The sample chain on HQ without capture installed."""
    p = make_pos(hq, tmp_path, monkeypatch, installed=False)
    yield p
    drop_roles(p)


def store_rows(hq: Database, table: str, store_id: int) -> list[str]:
    return table_rows(hq, table, where=f"store_id = {int(store_id)}")


def an_item(hq: Database, in_store: int, not_in_store: int) -> int:
    """An item stocked in one store and not in the other (tiny data has several)."""
    item = hq.scalar("SELECT min(item_id) FROM stock s WHERE store_id = %s AND NOT EXISTS "
                     "(SELECT FROM stock t WHERE t.store_id = %s AND t.item_id = s.item_id)",
                     (in_store, not_in_store))
    assert item is not None, f"sample data has no item in store {in_store} missing in {not_in_store}"
    return item


# ---------------------------------------------------------- row filters

FILTERED = ["stock", "registers", "devices"]


def assert_own_rows(hq: Database, branch: Branch, store_id: int) -> None:
    for table in FILTERED:
        assert_same(hq, branch.db, table, hq_where=f"store_id = {store_id}")
        assert table_rows(branch.db, table), f"{table} on {branch.name} is empty"
        assert branch.db.scalar(f"SELECT count(*) FROM {table} WHERE store_id <> %s", (store_id,)) == 0


def test_two_branches_receive_exactly_their_own_rows(pos, branch_a, branch_b):
    a = pos.register(pos.branch_db(branch_a), 1, catalogs=FILTERED)
    # B is registered the way an HQ admin does it: the CLI, where "2" is a string
    b_name = pos.unique("store-2")
    r = pos.hq_cli("add-branch", b_name, "--param", "store_id=2", "--password-env", "B_PW",
                   env={"B_PW": "pw-of-store-2"})
    assert r.returncode == 0, r.stderr
    b = pos.write_branch(b_name, pos.branch_db(branch_b), pos.role_dsn(role_name(b_name), "pw-of-store-2"),
                         FILTERED)
    kinds = pos.hq.execute("SELECT jsonb_typeof(params -> 'store_id') FROM replication.branches")
    assert kinds == [("string",), ("string",)]   # "42" against an integer column

    a.init()
    b.init()
    assert_own_rows(pos.hq, a, 1)
    assert_own_rows(pos.hq, b, 2)

    # streamed changes, including rows that move between stores
    move_12, move_31, move_23 = an_item(pos.hq, 1, 2), an_item(pos.hq, 3, 1), an_item(pos.hq, 2, 3)
    device_12 = pos.hq.scalar("SELECT min(id) FROM devices WHERE store_id = 1")
    with pos.hq.connect() as conn, conn.transaction():
        conn.execute("UPDATE stock SET store_id = 2 WHERE store_id = 1 AND item_id = %s", (move_12,))
        conn.execute("UPDATE stock SET store_id = 1 WHERE store_id = 3 AND item_id = %s", (move_31,))
        conn.execute("UPDATE stock SET store_id = 3 WHERE store_id = 2 AND item_id = %s", (move_23,))
        conn.execute("UPDATE devices SET store_id = 2, register_id = NULL WHERE id = %s", (device_12,))
    pos.hq.execute("UPDATE stock SET quantity = quantity + 1 WHERE item_id % 3 = 0")
    pos.hq.execute("DELETE FROM stock WHERE store_id = 1 AND item_id = (SELECT max(item_id) FROM stock "
                   "WHERE store_id = 1)")
    pos.hq.execute("UPDATE registers SET name = name || ' (renovada)' WHERE store_id = 2")
    pos.hq.execute("INSERT INTO registers (store_id, code, name) VALUES (1, 'C99', 'Caja nueva'), "
                   "(3, 'C99', 'Caja de otra tienda')")
    assert a.run_once() == 0 and b.run_once() == 0

    assert_own_rows(pos.hq, a, 1)
    assert_own_rows(pos.hq, b, 2)
    on = lambda br, store, item: br.db.scalar(
        "SELECT count(*) FROM stock WHERE store_id = %s AND item_id = %s", (store, item))
    assert on(a, 1, move_12) == 0 and on(b, 2, move_12) == 1      # left A, arrived at B
    assert on(a, 1, move_31) == 1                                   # arrived at A
    assert on(b, 2, move_23) == 0                                   # left B
    assert a.db.scalar("SELECT count(*) FROM devices WHERE id = %s", (device_12,)) == 0
    assert b.db.scalar("SELECT store_id FROM devices WHERE id = %s", (device_12,)) == 2


def test_filter_means_the_same_rows_in_the_stream_and_the_copy(pos, branch_a, tmp_path):
    """A filter with several parameters, NULLs and NOT IN selects identical rows whether the
    copy runs it on the table or the stream runs it on logged row images."""
    text = "store_id = :store_id AND (quantity >= :min_qty OR max_qty IS NULL) AND item_id NOT IN (3, 5, 8)"
    hq_yaml = tmp_path / "hq-filtered.yaml"
    hq_yaml.write_text(yaml.safe_dump({"dsn": "${REPLICATOR_HQ_DSN}", "catalogs": {
        "stock": {"label": "Existencias", "tables": ["public.stock"], "filter": text}}}))
    with pos.hq.connect() as conn:
        install(conn, config.load_hq(hq_yaml))
        params = {"store_id": "2", "min_qty": "25"}
        name = pos.unique("store-2-min")
        add_branch(conn, config.load_hq(hq_yaml), name, params, "pw")
    b = pos.write_branch(name, pos.branch_db(branch_a), pos.role_dsn(role_name(name), "pw"), ["stock"])
    by_hand = "store_id = 2 AND (quantity >= 25 OR max_qty IS NULL) AND item_id NOT IN (3, 5, 8)"
    expected = {r for r in table_rows(pos.hq, "stock", "store_id, item_id", by_hand)}
    total = pos.hq.scalar("SELECT count(*) FROM stock WHERE store_id = 2")
    assert 0 < len(expected) < total, "the filter must select a proper subset to prove anything"

    # the copy
    b.init()
    assert set(table_rows(b.db, "stock", "store_id, item_id")) == expected
    # the stream: every stock row is logged once (a touch), read as the branch reads it
    with pos.connect_as(b) as hq_conn, b.db.connect() as br_conn:
        tables = source_tables(hq_conn, ["stock"])
        bind_target(br_conn, tables)
        assert "IS TRUE" in copy_query(tables[0], branch_params(hq_conn, name)).as_string(hq_conn)
        before = current_snapshot(hq_conn)
        pos.hq.execute("UPDATE stock SET updated_at = updated_at + interval '1 second'")
        reader = LogReader(tables, branch_params(hq_conn, name))
        rows = [r for chunk in reader.window(hq_conn, before, current_snapshot(hq_conn)) for r in chunk]
    assert {r[2] for r in rows} == {"U"}
    streamed = {"({},{})".format(*json.loads(r[3])) for r in rows}    # the key: [store_id, item_id]
    assert streamed == expected

    # rows moving across the quantity threshold enter and leave the branch
    pos.hq.execute("UPDATE stock SET quantity = CASE WHEN quantity >= 25 THEN 0 ELSE 100 END, max_qty = 200 "
                   "WHERE store_id = 2 AND item_id % 2 = 0")
    assert b.run_once() == 0
    assert_same(pos.hq, b.db, "stock", hq_where=by_hand)


# ---------------------------------------------------------- hostile filters

HOSTILE = [
    ("store_id = 1; DROP TABLE stock", "';' is not allowed"),
    ("store_id IN (SELECT id FROM public.stores)", "subqueries"),
    ("pg_sleep(1) IS NULL", "pg_sleep"),
    ("shop_id = :store_id", "shop_id"),
    ("store_id = :store_id -- OR true", "comment"),
]


def _with_stock_filter(tmp_path: Path, text: str) -> Path:
    """config/hq.yaml with the stock filter replaced, everything else as shipped."""
    shipped = HQ_YAML.read_text(encoding="utf-8")
    line = '    filter: "store_id = :store_id"        # a branch gets only its own store\'s stock'
    assert line in shipped
    path = tmp_path / "hq-hostile.yaml"
    path.write_text(shipped.replace(line, f"    filter: {json.dumps(text)}"), encoding="utf-8")
    return path


def _hq_state(hq: Database) -> list:
    return [hq.execute("SELECT * FROM replication.tables ORDER BY id"),
            hq.execute("SELECT * FROM replication.catalogs ORDER BY name"),
            hq.execute("SELECT tgrelid::regclass::text, tgname, tgfoid::regproc::text FROM pg_trigger "
                       "WHERE tgname LIKE 'replicator%' ORDER BY 1, 2"),
            hq.execute("SELECT proname, md5(prosrc) FROM pg_proc "
                       "WHERE pronamespace = 'replication'::regnamespace ORDER BY 1")]


def test_hostile_filter_stops_hq_install_before_anything_changes(bare_pos, tmp_path):
    bad = _with_stock_filter(tmp_path, HOSTILE[0][0])
    r = bare_pos.hq_cli("install", config_path=bad)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: filter for public.stock rejected: ';' is not allowed"), r.stderr
    assert "DROP TABLE stock" in r.stderr and "Traceback" not in r.stderr
    # the others through the library (a subprocess each would only repeat the CLI part)
    for text, reason in HOSTILE[1:]:
        with bare_pos.hq.connect() as conn, pytest.raises(FilterError) as info:
            install(conn, config.load_hq(_with_stock_filter(tmp_path, text)))
        assert info.value.exit_code == 2 and reason in str(info.value), (text, str(info.value))
    assert bare_pos.hq.scalar("SELECT to_regnamespace('replication')") is None
    assert bare_pos.hq.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'replicator%'") == 0
    assert bare_pos.hq.scalar("SELECT count(*) FROM stock") == 140


def test_hostile_filter_leaves_an_installed_hq_untouched(pos, tmp_path):
    before = _hq_state(pos.hq)
    bad = _with_stock_filter(tmp_path, HOSTILE[0][0])
    for command in ("install", "sql"):
        r = pos.hq_cli(command, config_path=bad)
        assert r.returncode == 2 and "';' is not allowed" in r.stderr, (command, r.stderr)
        assert r.stdout == ""
    assert _hq_state(pos.hq) == before
    assert pos.hq.scalar("SELECT filter FROM replication.tables WHERE table_name = 'stock'") == \
        "store_id = :store_id"


# ---------------------------------------------------------- excluded columns

def test_excluded_column_never_crosses_the_wire(pos, branch_a):
    db = pos.branch_db(branch_a)
    db.execute("ALTER TABLE users ALTER password_hash SET DEFAULT 'set-at-the-branch'")
    b = pos.register(db, 1, catalogs=["users"])
    assert pos.hq.scalar("SELECT count(*) FROM users WHERE password_hash = ''") == 0

    # the copy: the query a branch sends never names the column, and works without it
    with pos.connect_as(b) as hq_conn, db.connect() as br_conn:
        (users,) = source_tables(hq_conn, ["users"])
        bind_target(br_conn, [users])
        assert "password_hash" not in users.columns and "password_hash" not in users.hq_columns
        text = copy_query(users, {}).as_string(hq_conn)
        assert "password_hash" not in text
        with hq_conn.cursor() as cur, cur.copy(copy_query(users, {})) as copy:
            assert sum(len(chunk) for chunk in copy) > 0
        # nor can the branch's login read it on HQ by any other query
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            hq_conn.execute("SELECT password_hash FROM users")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            hq_conn.execute("SELECT u FROM users u")
    b.init()
    assert_same(pos.hq, db, "users", "id, login, full_name, role, store_id, active, last_login_at, updated_at")
    assert db.execute("SELECT DISTINCT password_hash FROM users") == [("set-at-the-branch",)]

    # the stream: change secrets and everything else, read the log as the branch does
    with pos.connect_as(b) as hq_conn:
        before = current_snapshot(hq_conn)
        pos.hq.execute("UPDATE users SET password_hash = 'secret-' || id, full_name = full_name || ' II'")
        pos.hq.execute("UPDATE users SET password_hash = 'only-the-secret-changed' WHERE id = 1")
        pos.hq.execute("INSERT INTO users (login, full_name, role, password_hash) "
                       "VALUES ('nuevo', 'Usuario Nuevo', 'cashier', 'secret-new')")
        pos.hq.execute("DELETE FROM users WHERE id = 2")
        logged = hq_conn.execute("SELECT row::text, old_row::text FROM replication.change_log").fetchall()
        assert len(logged) >= 12
        for row, old in logged:
            for image in (row, old):
                assert image is None or ("password_hash" not in json.loads(image) and "secret" not in image)
        reader = LogReader([users], {})
        read = [r for chunk in reader.window(hq_conn, before, current_snapshot(hq_conn)) for r in chunk]
    assert len(read) == len(logged)
    assert all("password_hash" not in json.loads(r[4]) and "secret" not in r[4] for r in read)

    assert b.run_once() == 0
    assert_same(pos.hq, db, "users", "id, login, full_name, role, store_id, active, last_login_at, updated_at")
    assert db.execute("SELECT DISTINCT password_hash FROM users") == [("set-at-the-branch",)]
    assert db.scalar("SELECT count(*) FROM users WHERE login = 'nuevo'") == 1


# ------------------------------------------------------------- selection

def _filled(db: Database) -> set[str]:
    """Catalogs whose every table holds rows on the branch."""
    return {c for c, tables in CATALOG_TABLES.items()
            if all(db.scalar(f"SELECT count(*) FROM {t}") for t in tables)}


def _empty(db: Database) -> set[str]:
    return {c for c, tables in CATALOG_TABLES.items()
            if not any(db.scalar(f"SELECT count(*) FROM {t}") for t in tables)}


def test_omitted_catalogs_mean_hq_defaults(pos, branch_a):
    b = pos.register(pos.branch_db(branch_a), 1)              # branch.yaml names no catalogs
    with pos.connect_as(b) as conn:
        assert sorted(select_catalogs(b.cfg, offered_catalogs(conn))) == DEFAULTS
    report = b.init(include_customers=True)
    assert sorted(report.catalogs) == DEFAULTS
    assert _filled(b.db) == set(DEFAULTS)
    assert _empty(b.db) == set(ALL_CATALOGS) - set(DEFAULTS)
    for table in ("customers", "items", "item_prices", "exchange_rates", "price_policies"):
        assert_same(pos.hq, b.db, table)
    # customers.search_key is GENERATED on both sides: recomputed on the branch, never written
    assert_same(pos.hq, b.db, "customers", "id, search_key")

    pos.hq.execute("UPDATE customers SET name = 'Cliente renombrado' WHERE id = 3")
    pos.hq.execute("UPDATE kits SET name = 'Kit que la sucursal no recibe'")
    assert b.run_once() == 0
    assert_same(pos.hq, b.db, "customers")
    assert b.db.scalar("SELECT search_key FROM customers WHERE id = 3").startswith("cliente renombrado")
    assert b.db.scalar("SELECT count(*) FROM kits") == 0


def test_explicit_list_means_exactly_those_catalogs(pos, branch_a):
    b = pos.register(pos.branch_db(branch_a), 1, catalogs=["kits", "taxes"])
    report = b.init()
    assert sorted(report.catalogs) == ["kits", "taxes"]
    assert _filled(b.db) == {"kits", "taxes"}
    assert _empty(b.db) == set(ALL_CATALOGS) - {"kits", "taxes"}
    pos.hq.execute("UPDATE taxes SET name = name || ' *'")
    pos.hq.execute("UPDATE items SET name = name || ' *'")
    assert b.run_once() == 0
    assert_same(pos.hq, b.db, "taxes")
    assert _empty(b.db) == set(ALL_CATALOGS) - {"kits", "taxes"}


def test_unknown_catalog_is_exit_2_listing_the_valid_ones(pos, branch_a):
    b = pos.register(pos.branch_db(branch_a), 1, catalogs=["items", "existencias"])
    for args in (("init",), ("status",), ("check",)):
        r = b.cli(*args)
        assert r.returncode == (1 if args == ("check",) else 2), (args, r.stdout, r.stderr)
        assert "unknown catalog existencias" in r.stderr and "Traceback" not in r.stderr
        assert "HQ offers: " + ", ".join(ALL_CATALOGS) in r.stderr
    # a catalog named on the command line is checked the same way
    b2 = pos.register(b.db, 1, catalogs=["items"])
    r = b2.cli("init", "stok")
    assert r.returncode == 2 and "unknown catalog stok" in r.stderr, r.stderr
    assert b.db.execute("SELECT to_regclass('replication.position')") == [(None,)]
    assert _empty(b.db) == set(ALL_CATALOGS)


def test_catalog_that_hq_stopped_defining_is_reported(pos, branch_a, tmp_path):
    b = pos.register(pos.branch_db(branch_a), 1, catalogs=["items", "kits"])
    b.init()
    doc = yaml.safe_load(HQ_YAML.read_text(encoding="utf-8"))
    del doc["catalogs"]["kits"]
    trimmed = tmp_path / "hq-without-kits.yaml"
    trimmed.write_text(yaml.safe_dump(doc, allow_unicode=True))
    r = pos.hq_cli("install", config_path=trimmed)          # branches are registered: refused ...
    assert r.returncode == 2 and "no longer lists public.kits (catalog kits)" in r.stderr, r.stdout + r.stderr
    r = pos.hq_cli("install", "--detach", config_path=trimmed)            # ... unless on purpose
    assert r.returncode == 0 and "capture removed: public.kits" in r.stdout, r.stdout + r.stderr

    r = b.cli("run", "--once")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "unknown catalog kits (HQ does not define it)" in r.stderr
    r = b.cli("check")
    assert r.returncode == 1
    assert "problem: " in r.stderr and "unknown catalog kits" in r.stderr
    assert "* items" in r.stdout and " kits " not in r.stdout
