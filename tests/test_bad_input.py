"""Bad input through the real CLI: one line naming the thing, the right exit code, nothing touched.

Every case runs `python -m replicator ...` in a subprocess against a branch
that is initialized and has changes pending on HQ, so a command that went
ahead despite the problem would visibly change the branch.  Each case checks:

- exactly one line on stderr (`error: ...`, or `problem: ...` for `check`),
  holding the parts a person needs (file:line and key for config, table and
  column for schema, host and reason for connections);
- exit code 2 for configuration, 1 for problems found at run time;
- no Python traceback;
- the branch tables, `replication.position` and `replication.target_tables` are
  byte-for-byte what they were before;
- the distinctive password written into every DSN never appears in the output.
"""
from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg import sql

from harness import Branch, Setup, make_setup, replicator_cli, table_rows
from replicator.cluster import Cluster, Database
from replicator.hq import role_name

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(12,2));
CREATE TABLE stock (store_id int, item_id int, qty int NOT NULL DEFAULT 0,
                    PRIMARY KEY (store_id, item_id));
"""
CATALOGS = {
    "items": {"label": "Artículos", "default": True, "tables": ["public.items"]},
    "stock": {"label": "Existencias", "default": True, "tables": ["public.stock"]},
}
# Written into every DSN below.  The superuser is trusted over TCP on the test
# clusters, so it is ignored there, but any message or log line that echoed a
# connection string would carry it.
PASSWORD = "Zebra-Sekr1t-4471"


@dataclass
class World:
    setup: Setup
    branch: Branch
    hq: Database
    db: Database

    def dsn(self, database: Database, user: str = "postgres", password: str = PASSWORD,
            dbname: str | None = None) -> str:
        return database.cluster.dsn(dbname or database.name, user=user, password=password)

    def write(self, name: str, text: str) -> Path:
        path = self.setup.dir / f"{name}.yaml"
        path.write_text(text)
        return path

    def config(self, name: str, *, branch: str | None = None, source: str | None = None,
               target: str | None = None, extra: str = "") -> Path:
        """A branch.yaml: branch on line 1, source on 2, target on 3, `extra` from line 4."""
        return self.write(name, f"branch: {branch or self.branch.name}\n"
                                f"source: {{dsn: '{source or self.dsn(self.hq)}'}}\n"
                                f"target: {{dsn: '{target or self.dsn(self.db)}'}}\n{extra}")

    def snapshot(self) -> dict:
        """Everything a bad command must leave alone on the branch."""
        with self.db.connect() as conn:
            return {t: [r[0] for r in conn.execute(f"SELECT t::text FROM {t} t ORDER BY 1")]
                    for t in ("items", "stock", "stock_old", "replication.position", "replication.target_tables")
                    if conn.execute("SELECT to_regclass(%s) IS NOT NULL", (t,)).fetchone()[0]}


def _world(tmp_path: Path, hq: Database, db: Database) -> World:
    """An initialized branch with HQ changes pending that a working `run` would apply."""
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [db])
    name = f"bad-{uuid.uuid4().hex[:8]}"
    b = s.add_branch(name, db)
    hq.execute("INSERT INTO items SELECT g, 'item ' || g, g * 1.25 FROM generate_series(1, 20) g")
    hq.execute("INSERT INTO stock SELECT 1, g, g FROM generate_series(1, 20) g")
    b.init()
    hq.execute("UPDATE items SET price = price + 1 WHERE id <= 10")
    hq.execute("DELETE FROM stock WHERE item_id > 15")
    w = World(s, b, hq, db)
    assert table_rows(db, "items") != table_rows(hq, "items"), "changes must be pending"
    return w


def _drop_role(hq: Database, branch: str) -> None:
    role = sql.Identifier(role_name(branch))
    hq.execute(sql.SQL("DROP OWNED BY {}").format(role))
    hq.execute(sql.SQL("DROP ROLE {}").format(role))


@pytest.fixture(scope="module")
def world(hq_cluster: Cluster, branch_a_cluster: Cluster, tmp_path_factory) -> World:
    """One world for the cases that only read: config, connection, registration."""
    suffix = uuid.uuid4().hex[:8]
    hq = hq_cluster.create_database(f"hq_bad_input_{suffix}")
    db = branch_a_cluster.create_database(f"branch_bad_input_{suffix}")
    w = _world(tmp_path_factory.mktemp("bad_input"), hq, db)
    try:
        yield w
    finally:
        _drop_role(hq, w.branch.name)
        hq_cluster.drop_database(hq.name)
        branch_a_cluster.drop_database(db.name)


@pytest.fixture
def fresh_world(tmp_path, hq, branch_a) -> World:
    """A world of its own, for cases that alter the branch schema."""
    w = _world(tmp_path, hq, branch_a)
    yield w
    _drop_role(hq, w.branch.name)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_rejected(w: World, before: dict, result, code: int, *parts: str, prefix: str = "error: ") -> str:
    """One line on stderr with every part, exit `code`, no traceback, no secret, nothing changed."""
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    assert PASSWORD not in out, f"password leaked: {out}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    line = lines[0]
    assert line.startswith(prefix), line
    for part in parts:
        assert part in line, f"{part!r} not in {line!r}"
    assert result.returncode == code, (result.returncode, line)
    assert w.snapshot() == before, "the branch changed"
    return line


def run_cli(*args: str, config: Path, verbose: bool = False):
    return replicator_cli(*(["-v", "-v"] if verbose else []), *args, "-c", str(config), timeout=60)


# ---------------------------------------------------------------- config: exit 2

def _bad_yaml_cases(w: World) -> dict[str, tuple[str, list[str]]]:
    src, tgt = w.dsn(w.hq), w.dsn(w.db)
    name = w.branch.name
    return {
        # line 4 is indented under a scalar value
        "indentation": (f"branch: {name}\nsource:\n  dsn: '{src}'\n    user: x\ntarget: {{dsn: '{tgt}'}}\n",
                        [":4: invalid YAML", "indentation"]),
        "dedent": (f"branch: {name}\nsource:\n    dsn: '{src}'\n  user: x\ntarget: {{dsn: '{tgt}'}}\n",
                   [":4: invalid YAML", "indentation"]),
        "tab": (f"branch: {name}\nsource:\n\tdsn: '{src}'\ntarget: {{dsn: '{tgt}'}}\n",
                [":3: invalid YAML", "tabs cannot indent YAML; use spaces"]),
        "unclosed": (f"branch: {name}\nsource: {{dsn: '{src}'\ntarget: {{dsn: '{tgt}'}}\n",
                     [":3: invalid YAML"]),
        "duplicate": (f"branch: {name}\nbranch: other\nsource: {{dsn: '{src}'}}\ntarget: {{dsn: '{tgt}'}}\n",
                      [":2: branch: setting appears twice (first on line 1)"]),
        "empty": ("", [":1: expected a mapping of settings"]),
    }


@pytest.mark.parametrize("case, cmd", [
    ("indentation", ("run", "--once")), ("dedent", ("init",)), ("tab", ("check",)),
    ("unclosed", ("run",)), ("duplicate", ("run", "--once")), ("empty", ("init", "--force"))])
def test_malformed_yaml_names_file_and_line(world: World, case: str, cmd: tuple):
    text, parts = _bad_yaml_cases(world)[case]
    path = world.write(f"yaml_{case}", text)
    before = world.snapshot()
    assert_rejected(world, before, run_cli(*cmd, config=path), 2, f"error: {path}", *parts)


def test_unknown_setting_lists_the_valid_ones(world: World):
    path = world.config("unknown_key", extra="poll_intervall: 5s\n")
    before = world.snapshot()
    r = run_cli("run", "--once", config=path)
    assert_rejected(world, before, r, 2, f"{path}:4: poll_intervall: unknown setting; expected one of",
                    "poll_interval", "batch_rows")
    nested = world.write("unknown_nested", f"branch: {world.branch.name}\n"
                                           f"source: {{dsn: '{world.dsn(world.hq)}', sslmod: require}}\n"
                                           f"target: {{dsn: '{world.dsn(world.db)}'}}\n")
    r = run_cli("init", config=nested)
    assert_rejected(world, before, r, 2, f"{nested}:2: source.sslmod: unknown setting; expected one of dsn")


def test_missing_required_setting(world: World):
    before = world.snapshot()
    no_target = world.write("no_target", f"branch: {world.branch.name}\nsource: {{dsn: '{world.dsn(world.hq)}'}}\n")
    r = run_cli("run", "--once", config=no_target)
    assert_rejected(world, before, r, 2, f"{no_target}:1: target: missing required setting")
    no_dsn = world.write("no_dsn", f"branch: {world.branch.name}\nsource: {{dsn: '{world.dsn(world.hq)}'}}\n"
                                   f"target:\n  dns: '{world.dsn(world.db)}'\n")
    r = run_cli("check", config=no_dsn)
    # the typo is reported first: it is the line to fix
    assert_rejected(world, before, r, 2, f"{no_dsn}:4: target.dns: unknown setting; expected one of dsn")
    empty_target = world.write("empty_target", f"branch: {world.branch.name}\n"
                                               f"source: {{dsn: '{world.dsn(world.hq)}'}}\ntarget: {{}}\n")
    r = run_cli("init", config=empty_target)
    assert_rejected(world, before, r, 2, f"{empty_target}:3: target.dsn: missing required setting",
                    "add it under target:")


def test_wrong_type(world: World):
    before = world.snapshot()
    path = world.config("wrong_type", extra="batch_rows: many\n")
    r = run_cli("run", "--once", config=path)
    assert_rejected(world, before, r, 2, f"{path}:4: batch_rows: expected a whole number (got 'many')")
    path = world.config("wrong_duration", extra="poll_interval: soon\n")
    r = run_cli("run", "--once", config=path)
    assert_rejected(world, before, r, 2, f"{path}:4: poll_interval:", "7d, 12h, 30m, 45s or 250ms", "'soon'")
    path = world.config("wrong_list", extra="catalogs: items\n")
    r = run_cli("init", config=path)
    assert_rejected(world, before, r, 2, f"{path}:4: catalogs: expected a list (got 'items')")


def _hostile_configs(w: World) -> dict[str, tuple[bytes, list[str]]]:
    head = w.config("head").read_bytes()
    laughs = "lol0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"lol{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
        for i in range(1, 12))
    return {
        # an alias bomb inside a setting's value: refused at its first alias
        "alias_bomb": (head + b"catalogs:\n  " + laughs.replace("\n", "\n  ").encode() + b"x: 1\n",
                       [":6: YAML aliases (*name) are not supported here"]),
        "latin1_bytes": (head + "poll_interval: 1s  # café\n".encode("latin-1"),
                         [":4: not UTF-8 text (byte 0xe9); save the file as UTF-8"]),
        "huge": (head + b"# " + b"x" * 10_000_000 + b"\n",
                 ["file is larger than 1 MB; a configuration is a few kilobytes"]),
        "deep": (head + b"catalogs: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", [": values are nested too deeply"]),
        "overflow": (head + b"poll_interval: 99999999999999999999d\n",
                     [":4: poll_interval: not a duration like 7d"]),
        "too_long": (head + b"poll_interval: 100000000d\n",
                     [":4: poll_interval: must be between 10ms and 1h (got '100000000d')"]),
        "zero_poll": (head + b"poll_interval: 0\n", [":4: poll_interval: must be between 10ms and 1h (got 0)"]),
        "negative": (head + b"poll_interval: -1s\n", [":4: poll_interval: not a duration like"]),
        "bool_poll": (head + b"poll_interval: yes\n", [":4: poll_interval: expected a number or duration"]),
        "branch_newline": (head.replace(f"branch: {w.branch.name}\n".encode(),
                                        f'branch: "{w.branch.name}\\n"\n'.encode()),
                           [":1: branch: use letters, digits"]),
    }


@pytest.mark.parametrize("case", ["alias_bomb", "latin1_bytes", "huge", "deep", "overflow", "too_long", "zero_poll",
                                  "negative", "bool_poll", "branch_newline"])
@pytest.mark.timeout(60)
def test_hostile_config_is_one_line_in_bounded_time(world: World, case: str):
    """Every class of hostile file: one line, exit 2, in seconds and without swelling."""
    text, parts = _hostile_configs(world)[case]
    path = world.setup.dir / f"hostile_{case}.yaml"
    path.write_bytes(text)
    before = world.snapshot()
    for cmd in (("check",), ("run", "--once")):
        started = time.monotonic()
        r = run_cli(*cmd, config=path)
        assert time.monotonic() - started < 15, "took too long"
        assert_rejected(world, before, r, 2, f"error: {path}", *parts)


# Each way a DSN can be mistyped with the password in it; libpq's own messages quote
# the offending token, which would be (part of) the password.
SECRET = "Qx7-s3cretPW"
LEAKY_DSNS = {
    "bad_percent": f"postgresql://postgres:{SECRET}%zz@127.0.0.1:{{port}}/db",
    "at_in_password": f"postgresql://postgres:{SECRET[:5]}@{SECRET[5:]}@127.0.0.1:{{port}}/db",
    "keyword_missing_equals": f"host=127.0.0.1 port={{port}} password {SECRET} dbname=db",
    "unterminated_quote": f"host=127.0.0.1 port={{port}} password='{SECRET} dbname=db",
    "password_as_keyword": f"host=127.0.0.1 port={{port}} {SECRET}=x",
    "query_password": f"postgresql://postgres@127.0.0.1:{{port}}/db?password={SECRET}&bogus=1",
    "sslpassword": f"host=127.0.0.1 port={{port}} dbname=db sslpassword={SECRET} sslmode=require",
    "bad_ipv6": f"postgresql://postgres:{SECRET}@[::1/db",
}


@pytest.mark.parametrize("case", list(LEAKY_DSNS))
def test_a_mistyped_dsn_never_shows_its_password(world: World, case: str):
    port = closed_port()
    dsn = LEAKY_DSNS[case].format(port=port)
    before = world.snapshot()
    for side in ("source", "target"):
        path = world.config(f"leak_{case}_{side}", **{side: dsn.replace("'", "''")})
        for cmd in (("check",), ("run", "--once"), ("status",)):
            r = run_cli(*cmd, config=path, verbose=True)
            out = r.stdout + r.stderr
            assert "Traceback" not in out, out
            for piece in (SECRET, SECRET[:5], SECRET[5:], SECRET[2:9]):
                assert piece not in out, f"{piece!r} leaked by {cmd} with {case}: {out}"
            assert r.returncode in (1, 2), out
            assert "cannot connect to " in r.stderr, out


def test_wrong_type_never_echoes_a_password(world: World):
    """A DSN given where a mapping belongs is quoted back, without its password."""
    path = world.write("dsn_as_string", f"branch: {world.branch.name}\nsource: '{world.dsn(world.hq)}'\n"
                                        f"target: {{dsn: '{world.dsn(world.db)}'}}\n")
    before = world.snapshot()
    r = run_cli("run", "--once", config=path)
    assert_rejected(world, before, r, 2, f"{path}:2: source: expected a mapping", "postgres:***@127.0.0.1")


def test_unknown_catalog_lists_valid_ones(world: World):
    path = world.config("unknown_catalog", extra="catalogs: [items, stok]\n")
    before = world.snapshot()
    expected = (f"{path}:4: catalogs: unknown catalog stok", "HQ offers: items, stock")
    for cmd in (("run", "--once"), ("init",), ("init", "--force", "items")):
        assert_rejected(world, before, run_cli(*cmd, config=path), 2, *expected)
    r = run_cli("check", config=path)
    assert "connection OK" in r.stdout
    assert_rejected(world, before, r, 1, *expected, prefix="problem: ")


def test_environment_variable_not_set(world: World, monkeypatch):
    monkeypatch.delenv("REPLICATOR_TEST_UNSET_DSN", raising=False)
    path = world.config("unset_env", source="${REPLICATOR_TEST_UNSET_DSN}")
    before = world.snapshot()
    for cmd in (("run", "--once"), ("check",)):
        r = run_cli(*cmd, config=path)
        assert_rejected(world, before, r, 2, f"{path}:2: source.dsn: environment variable "
                        "REPLICATOR_TEST_UNSET_DSN is not set", "export it")


def test_branch_not_registered_on_hq(world: World):
    path = world.config("unregistered", branch="store-999")
    before = world.snapshot()
    expected = (f"{path}:1: branch: branch store-999 is not registered on HQ",
                "replicator hq add-branch -c hq.yaml store-999")
    for cmd in (("run", "--once"), ("init", "--force")):
        assert_rejected(world, before, run_cli(*cmd, config=path), 2, *expected)
    assert_rejected(world, before, run_cli("check", config=path), 1, *expected, prefix="problem: ")


# ------------------------------------------------------------- runtime: exit 1

def test_unreachable_hq(world: World):
    port = closed_port()
    path = world.config("closed_port", source=f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/pos")
    before = world.snapshot()
    for cmd in (("run", "--once"), ("run",), ("init",), ("check",)):
        r = run_cli(*cmd, config=path)
        assert_rejected(world, before, r, 1, f"cannot connect to HQ: postgres@127.0.0.1:{port}/pos",
                        "connection refused", "is PostgreSQL running",
                        prefix="problem: " if cmd == ("check",) else "error: ")


def test_unreachable_branch_database(world: World):
    port = closed_port()
    path = world.config("closed_branch", target=f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/pos")
    before = world.snapshot()
    for cmd in (("run", "--once"), ("init",)):
        r = run_cli(*cmd, config=path)
        assert_rejected(world, before, r, 1, f"cannot connect to branch: postgres@127.0.0.1:{port}/pos",
                        "connection refused")


def test_wrong_password_for_branch_role(world: World):
    """The role add-branch created exists and needs SCRAM over TCP: a wrong password is refused."""
    role = role_name(world.branch.name)
    assert world.hq.scalar("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)) == 1
    path = world.config("wrong_password", source=world.dsn(world.hq, user=role))
    before = world.snapshot()
    for cmd in (("run", "--once"), ("init",), ("check",)):
        r = run_cli(*cmd, config=path, verbose=True)   # DEBUG logging must not leak it either
        assert_rejected(world, before, r, 1, f"cannot connect to HQ: {role}@127.0.0.1:{world.hq.cluster.port}/",
                        "wrong or missing password", "PGPASSWORD",
                        prefix="problem: " if cmd == ("check",) else "error: ")


def test_database_does_not_exist(world: World):
    missing = f"{world.db.name}_gone"
    path = world.config("no_database", target=world.dsn(world.db, dbname=missing))
    before = world.snapshot()
    for cmd in (("run", "--once"), ("init",)):
        r = run_cli(*cmd, config=path)
        assert_rejected(world, before, r, 1, "cannot connect to branch: postgres@127.0.0.1:",
                        f'database "{missing}" does not exist', "fix dbname in the DSN")


def test_password_never_logged_on_success(world: World):
    """The happy path at DEBUG level (SQL included) prints no password either.

    It applies the pending changes, so it comes after every test of the shared world."""
    path = world.config("with_password")
    r = run_cli("run", "--once", config=path, verbose=True)
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    assert "applied" in r.stderr
    r = run_cli("check", config=path)
    assert r.returncode == 0 and PASSWORD not in r.stdout + r.stderr, r.stdout + r.stderr


# --------------------------------------------------------------- schema: exit 1

SCHEMA_CASES = {
    "missing_table": ("ALTER TABLE stock RENAME TO stock_old",
                      ["schema mismatch on public.stock", "table missing on the branch"],
                      ["table public.stock", "is missing on the branch"]),
    "type_mismatch": ("ALTER TABLE items ALTER price TYPE text",
                      ["schema mismatch on public.items.price: type is text on the branch but "
                       "numeric(12,2) on HQ", "change the branch column to numeric(12,2)"], None),
    "missing_column": ("ALTER TABLE items DROP price",
                       ["schema mismatch on public.items.price: column missing on the branch",
                        "add it with the HQ type numeric(12,2)"], None),
    "extra_not_null": ("ALTER TABLE items ADD local_note text NOT NULL DEFAULT 'x';"
                       "ALTER TABLE items ALTER local_note DROP DEFAULT",
                       ["schema mismatch on public.items.local_note", "NOT NULL without a default",
                        "give it a default"], None),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_schema_mismatch_stops_before_any_change(fresh_world: World, case: str):
    ddl, parts, check_parts = SCHEMA_CASES[case]
    w = fresh_world
    w.db.execute(ddl)
    path = w.branch.path
    before = w.snapshot()
    for cmd in (("run", "--once"), ("init", "--force"), ("init", "--force", "items")):
        if case == "missing_table" and cmd[-1] == "items":
            continue   # stock is not part of that init
        assert_rejected(w, before, run_cli(*cmd, config=path), 1, *parts)
    assert_rejected(w, before, run_cli("check", config=path), 1, *(check_parts or parts), prefix="problem: ")
