"""HQ first, least privilege: each attack of README's threat model, tried for real.

Every test logs in as the role that would attack (an HQ application role that can
write captured tables, a branch's own login) and tries; what must hold is checked
in the database, not in our client code.
"""
from __future__ import annotations

import uuid

import psycopg
import pytest
import yaml
from psycopg import sql

from harness import assert_same, make_setup, replicator_cli
from replicator.errors import ConfigError
from replicator.hq import CONNECTION_LIMIT, add_branch, role_name

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(12,2), doc jsonb, f float8, tags text[]);
CREATE TABLE stock (store_id int, item_id int, qty int, PRIMARY KEY (store_id, item_id));
"""
CATALOGS = {
    "items": {"label": "Items", "default": True, "tables": ["public.items"],
              "exclude_columns": {"public.items": ["f"]}},
    "stock": {"label": "Stock", "default": True, "tables": ["public.stock"], "filter": "store_id = :store_id"},
}
PASSWORD = "branch-pw-9931"


@pytest.fixture
def roles(hq):
    """Unique role names for a test, dropped after it (roles are cluster-wide)."""
    made = []

    def make(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        made.append(name)
        return name

    yield make
    for name in made + [role_name(n) for n in made]:
        try:
            ident = sql.Identifier(name)
            hq.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            hq.execute(sql.SQL("DROP ROLE {}").format(ident))
        except psycopg.Error:
            pass


def _login(hq, role: str, password: str) -> None:
    hq.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
    hq.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(hq.name), sql.Identifier(role)))


def _as(hq, role: str, password: str, **kw) -> psycopg.Connection:
    return psycopg.connect(hq.cluster.dsn(hq.name, role, password), autocommit=True, **kw)


def _register(s, hq, name: str, **params):
    with hq.connect() as conn:
        return add_branch(conn, s.hq_cfg, name, {k: str(v) for k, v in params.items()}, PASSWORD)


# ------------------------------------------------------- 1. operators as the definer

# Everything a writer could put in front of pg_catalog: the operators and types capture's
# text uses, each backed by a function that records who ran it.
_TRAPS = [("=", "text", "text"), ("<>", "text", "text"), ("<", "text", "text"), ("!~~", "text", "text"),
          ("~~", "text", "text"), ("=", "int4", "int4"), ("=", "int8", "int8"), ("-", "jsonb", "text[]"),
          ("||", "jsonb", "jsonb"), ("-", "int8", "int8"), ("/", "int8", "int4"), ("=", '"char"', '"char"')]


def _plant_traps(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {}.pwned (who text, what text)").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("GRANT INSERT ON {}.pwned TO PUBLIC").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(sql.Identifier(schema)))
    for n, (op, left, right) in enumerate(_TRAPS):
        fn = sql.Identifier(schema, f"trap{n}")
        real = sql.SQL(f"($1 OPERATOR(pg_catalog.{op}) $2)")
        conn.execute(sql.SQL(
            "CREATE FUNCTION {fn}(a {l}, b {r}) RETURNS {ret} LANGUAGE sql AS $$ "
            "INSERT INTO {s}.pwned VALUES (current_user, {what}); SELECT {real} $$").format(
                fn=fn, l=sql.SQL(left), r=sql.SQL(right), s=sql.Identifier(schema), what=sql.Literal(op),
                real=real, ret=sql.SQL("boolean" if op in ("=", "<>", "<", "!~~", "~~") else
                                       {"-": "jsonb" if left == "jsonb" else "int8", "||": "jsonb",
                                        "/": "int8"}[op])))
        conn.execute(sql.SQL("CREATE OPERATOR {}.{} (LEFTARG = {}, RIGHTARG = {}, FUNCTION = {})").format(
            sql.Identifier(schema), sql.SQL(op), sql.SQL(left), sql.SQL(right), fn))
    # a domain named like a built-in type, whose check runs a function
    conn.execute(sql.SQL("CREATE FUNCTION {}(t pg_catalog.text) RETURNS boolean LANGUAGE sql AS $$ "
                         "INSERT INTO {}.pwned VALUES (current_user, 'domain'); SELECT true $$").format(
        sql.Identifier(schema, "check_text"), sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE DOMAIN {} AS pg_catalog.text CHECK ({}(VALUE))").format(
        sql.Identifier(schema, "text"), sql.Identifier(schema, "check_text")))


def test_a_writer_cannot_run_its_operators_as_the_capture_functions_owner(tmp_path, hq, roles):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    writer = roles("app_writer")
    _login(hq, writer, "w")
    hq.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(hq.name), sql.Identifier(writer)))
    hq.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON items, stock TO {}").format(sql.Identifier(writer)))
    evil = f"evil_{uuid.uuid4().hex[:6]}"
    with _as(hq, writer, "w") as conn:
        _plant_traps(conn, evil)
        conn.execute(sql.SQL("SET search_path = {}, pg_catalog, public").format(sql.Identifier(evil)))
        # the traps work: the writer's own statements call them
        assert conn.execute("SELECT 'a'::pg_catalog.text = 'a'::pg_catalog.text").fetchone() == (True,)
        conn.execute(sql.SQL("DELETE FROM {}.pwned").format(sql.Identifier(evil)))
        # every path of capture: small and bulk statements, a key move, settings that take the slow path
        conn.execute("SET DateStyle = 'SQL, DMY'")
        conn.execute("INSERT INTO items (id, name, price, doc, f, tags) VALUES (1, 'a', 1, '{}', 1.5, '{x}')")
        conn.execute("INSERT INTO items (id, name) SELECT g, 'bulk' FROM generate_series(2, 1500) g")
        conn.execute("UPDATE items SET name = 'b' WHERE id = 1")
        conn.execute("UPDATE items SET id = 9001 WHERE id = 2")
        conn.execute("UPDATE items SET price = 2")
        conn.execute("INSERT INTO stock VALUES (1, 1, 5), (2, 1, 5)")
        conn.execute("UPDATE stock SET qty = qty + 1")
        conn.execute("DELETE FROM items WHERE id > 1000")
        conn.execute("DELETE FROM items")
    # the writer's own WHERE clauses ran its traps as itself; nothing ran as anyone else
    ran = hq.execute(sql.SQL("SELECT DISTINCT who, what FROM {}.pwned ORDER BY 1, 2").format(sql.Identifier(evil)))
    assert ran and all(who == writer for who, _ in ran), ran
    logged = hq.scalar("SELECT sum(coalesce(cardinality(rows), 1)) FROM replication.change_log")
    # 1 + 1,499 inserted, 1 updated, a key move (delete + upsert), 1,500 updated in bulk, 2 + 2
    # stock rows, 501 deleted, then the 999 left (id 2 had moved to 9001)
    assert logged == 1 + 1499 + 1 + 2 + 1500 + 2 + 2 + 501 + 999, logged
    # and no SECURITY DEFINER function of ours leaves name resolution to its caller
    loose = hq.execute(
        """SELECT p.proname FROM pg_proc p
            WHERE p.pronamespace = 'replication'::regnamespace AND p.prosecdef
              AND NOT coalesce(p.proconfig::text LIKE '%search_path=pg_catalog%', false)
              AND p.proname !~ '^capture_[0-9]+$'""")
    assert loose == [], loose
    for (src,) in hq.execute("SELECT prosrc FROM pg_proc WHERE pronamespace = 'replication'::regnamespace "
                             "AND proname ~ '^capture_[0-9]+$'"):
        for unqualified in ("TG_OP =", "TG_LEVEL =", " NOT LIKE ", "::text[]", " text[]", "IS DISTINCT FROM"):
            assert unqualified not in src, unqualified


# ----------------------------------------------------------- 2. someone else's DDL

def test_the_ddl_event_trigger_never_fails_an_application_roles_alter_table(tmp_path, hq, roles):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    assert hq.scalar("SELECT count(*) FROM pg_event_trigger WHERE evtname = 'replicator_ddl'") == 1
    app = roles("app_owner")
    _login(hq, app, "a")
    hq.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(app)))
    hq.execute(sql.SQL("ALTER TABLE stock OWNER TO {}").format(sql.Identifier(app)))    # captured, theirs
    with _as(hq, app, "a") as conn:
        conn.execute("CREATE TABLE app_notes (id int PRIMARY KEY)")                       # not captured
        conn.execute("ALTER TABLE app_notes ADD COLUMN body text")
        conn.execute("SET search_path = nowhere")
        conn.execute("ALTER TABLE public.app_notes ADD COLUMN at timestamptz")
        conn.execute("RESET search_path")
        conn.execute("ALTER TABLE stock ADD COLUMN note text")          # regenerates capture as its owner
        conn.execute("INSERT INTO stock VALUES (1, 1, 1, 'n')")
    assert hq.scalar("SELECT count(*) FROM replication.change_log") == 1
    assert "note" in hq.scalar("SELECT row::text FROM replication.change_log")


# ------------------------------------------------------------- 3. the NOTIFY queue

def test_no_capturing_commit_depends_on_the_notification_queue(tmp_path, hq, roles):
    """A login that LISTENs and idles in a transaction used to fill the queue until every
    capturing commit failed.  Capture sends no notification at all now."""
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    _register(s, hq, roles("q"), store_id=1)
    with hq.connect() as idler, hq.connect() as writer:
        idler.execute("LISTEN replicator")
        idler.execute("BEGIN")
        idler.execute("SELECT 1")          # idle in transaction: the queue cannot drain past it
        for i in range(200):
            writer.execute("INSERT INTO items (id, name) VALUES (%s, 'x')", (i,))
        writer.execute("UPDATE items SET name = 'y'")
        assert writer.execute("SELECT pg_notification_queue_usage()").fetchone()[0] == 0
        idler.execute("COMMIT")
        assert list(idler.notifies(timeout=0.3)) == []
    for (src,) in hq.execute("SELECT prosrc FROM pg_proc WHERE pronamespace = 'replication'::regnamespace"):
        assert "notify" not in src.lower()


# -------------------------------------------------------- 4. one branch, all slots

def test_a_branch_login_cannot_take_every_connection(tmp_path, hq, roles):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    name = roles("greedy")
    reg = _register(s, hq, name, store_id=1)
    assert hq.scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (reg.role,)) == CONNECTION_LIMIT
    settings = hq.scalar("SELECT setconfig FROM pg_db_role_setting WHERE setrole = %s::regrole AND setdatabase = 0",
                         (reg.role,))
    assert "idle_in_transaction_session_timeout=5min" in settings and "temp_file_limit=5GB" in settings
    held = [_as(hq, reg.role, PASSWORD) for _ in range(CONNECTION_LIMIT)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            _as(hq, reg.role, PASSWORD)
        with hq.connect() as other:            # everyone else still gets in
            assert other.execute("SELECT 1").fetchone() == (1,)
        # what the login may not change about itself
        conn = held[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET temp_file_limit = -1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT -1").format(sql.Identifier(reg.role)))
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("5min",)
    finally:
        for c in held:
            c.close()


# --------------------------------------------------------------- 6. role adoption

def test_add_branch_never_adopts_a_role_it_did_not_create(tmp_path, hq, roles):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    name = roles("store")
    existing = role_name(name)
    _login(hq, existing, "theirs")          # an application's role that happens to have the name
    hq.execute(sql.SQL("GRANT SELECT ON items TO {}").format(sql.Identifier(existing)))
    r = replicator_cli("hq", "add-branch", "-c", str(s.hq_path), name, "--param", "store_id=1")
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr == (f"error: BRANCH: role {existing} already exists and is not a login that add-branch "
                        "created for this branch; replicator never adopts an existing role: drop or rename that "
                        f"role, or choose another branch name (got '{name}')\n")
    with _as(hq, existing, "theirs") as conn:        # password unchanged, not a branch
        assert conn.execute("SELECT pg_has_role(current_user, 'replicator_branch', 'member')").fetchone() == (False,)
    assert hq.scalar("SELECT count(*) FROM replication.branches") == 0

    with hq.connect() as conn:
        for bad, message in (("branch", "the group role of every branch"), ("Branch", "the group role"),
                             (f"{name}\n", "use letters, digits"), ("", "use letters, digits"),
                             ("-x", "use letters, digits")):
            with pytest.raises(ConfigError, match=message):
                add_branch(conn, s.hq_cfg, bad, {"store_id": "1"}, "pw")
    assert hq.scalar("SELECT count(*) FROM replication.branches") == 0

    # a branch add-branch made itself is updated in place, and stays marked
    own = roles("own")
    first = _register(s, hq, own, store_id=2)
    again = _register(s, hq, own, store_id=3)
    assert first.role == again.role
    assert hq.scalar("SELECT shobj_description(%s::regrole, 'pg_authid')", (again.role,)).startswith(
        f"replicator: HQ login of branch {own}")
    assert hq.scalar("SELECT params->>'store_id' FROM replication.branches WHERE name = %s", (own,)) == "3"


# ---------------------------------------------------- 12. holding HQ's log for ever

def test_deactivate_stops_a_branch_holding_the_log_and_its_login(tmp_path, hq, branch_a, roles):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    name = roles("quiet")
    reg = _register(s, hq, name, store_id=1)
    with _as(hq, reg.role, PASSWORD) as conn:
        conn.execute("SELECT replication.ack(%s, pg_current_snapshot(), now())", (name,))
    first = hq.scalar("SELECT position::text FROM replication.branches WHERE name = %s", (name,))
    hq.execute("INSERT INTO items (id) VALUES (1)")
    with _as(hq, reg.role, PASSWORD) as conn:
        newer = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
        conn.execute("SELECT replication.ack(%s, %s::pg_snapshot, now())", (name, newer))
        # an old position cannot be acked back: it would hold the log for ever
        conn.execute("SELECT replication.ack(%s, %s::pg_snapshot, now())", (name, first))
    assert hq.scalar("SELECT position::text FROM replication.branches WHERE name = %s", (name,)) == newer

    idle = _as(hq, reg.role, PASSWORD)
    r = replicator_cli("hq", "deactivate", "-c", str(s.hq_path), name)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"deactivated {name}: role {reg.role} can no longer log in; 1 open session(s) ended\n"
    with pytest.raises(psycopg.OperationalError):
        idle.execute("SELECT 1")
    idle.close()
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        _as(hq, reg.role, PASSWORD)
    status = replicator_cli("hq", "status", "-c", str(s.hq_path))
    assert status.returncode == 0 and f"{name}" in status.stdout and "(inactive)" in status.stdout
    r = replicator_cli("hq", "deactivate", "-c", str(s.hq_path), "nobody-here")
    assert (r.returncode, r.stderr) == (2, "error: BRANCH: no such branch is registered on HQ; `replicator hq "
                                           "status` lists them (got 'nobody-here')\n")
    _register(s, hq, name, store_id=1)       # add-branch brings it back
    _as(hq, reg.role, PASSWORD).close()


# ------------------------------------------------------------- 8. partial install

def test_an_hq_yaml_missing_a_catalog_does_not_silently_stop_its_capture(tmp_path, hq, branch_a, roles):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    name = roles("store")
    hq.execute("INSERT INTO stock VALUES (1, 1, 1), (1, 2, 2)")
    b = s.add_branch(name, branch_a, params={"store_id": 1})
    b.init()
    partial = tmp_path / "partial.yaml"
    doc = {"dsn": hq.dsn, "catalogs": {"items": CATALOGS["items"]}}
    partial.write_text(yaml.safe_dump(doc))
    r = replicator_cli("hq", "install", "-c", str(partial))
    assert r.returncode == 2, r
    assert r.stderr == (f"error: {partial}: the configuration no longer lists public.stock (catalog stock), which "
                        "registered branches receive; add it back, or stop capturing it on purpose with "
                        "`replicator hq install --detach` (branches then need `replicator init --force` for it "
                        "if it comes back)\n")
    assert hq.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'stock'::regclass "
                     "AND tgname LIKE 'replicator%'") == 5
    # on purpose: capture stops, a change is made meanwhile, the catalog comes back
    r = replicator_cli("hq", "install", "-c", str(partial), "--detach")
    assert r.returncode == 0 and "capture removed: public.stock" in r.stdout, r
    hq.execute("UPDATE stock SET qty = 99 WHERE item_id = 1")         # never logged
    r = replicator_cli("hq", "install", "-c", str(s.hq_path))
    assert r.returncode == 0 and "capture attached: public.stock" in r.stdout, r
    r = b.cli("status")
    assert r.returncode == 1
    assert ("stock            Stock            needs re-initialization: capture on HQ was off for a while "
            "(replicator init --force stock)") in r.stdout, r.stdout
    r = b.cli("run", "--once")
    assert r.returncode == 1 and r.stderr.startswith("error: capture of public.stock (catalog stock) was off"), r
    assert "run `replicator init --force stock`" in r.stderr
    r = b.cli("init", "--force", "stock")
    assert r.returncode == 0, r.stderr
    assert b.cli("run", "--once").returncode == 0
    r = b.cli("status")
    assert r.returncode == 0 and "catalogs are up to date" in r.stdout, r.stdout
    assert branch_a.scalar("SELECT qty FROM stock WHERE item_id = 1") == 99


# ------------------------------------------------------------- 11. HQ's filters

def _hq_yaml(tmp_path, hq, stock_filter: str, name: str = "hq2.yaml"):
    doc = {"dsn": hq.dsn, "catalogs": {**CATALOGS, "stock": {**CATALOGS["stock"], "filter": stock_filter}}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_filters_are_checked_on_hq_at_install_and_blamed_on_hq(tmp_path, hq, branch_a, roles):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    hq.execute("INSERT INTO stock VALUES (1, 1, 1), (2, 1, 2)")
    b = s.add_branch(roles("store"), branch_a, params={"store_id": 1})
    b.init()
    before = hq.execute("SELECT filter FROM replication.tables WHERE table_name = 'stock'")

    # parses, but cannot be evaluated on HQ's rows
    broken = _hq_yaml(tmp_path, hq, "store_id = :store_id AND qty = 1/0")
    r = replicator_cli("hq", "install", "-c", str(broken))
    assert r.returncode == 2, r
    assert r.stderr == (f"error: {broken}: catalog stock: the row filter of public.stock (store_id = :store_id AND "
                        f"qty = 1/0) fails on HQ's rows for branch {b.name} (store_id=1): division by zero; "
                        "fix the filter\n")
    # a placeholder no registered branch has a value for
    unknown = _hq_yaml(tmp_path, hq, "store_id = :store_id AND qty > :min_qty")
    r = replicator_cli("hq", "install", "-c", str(unknown))
    assert r.returncode == 2 and "needs min_qty, which registered branches " + b.name in r.stderr, r.stderr
    assert f"replicator hq add-branch -c {unknown} {b.name} --param min_qty=VALUE" in r.stderr
    assert hq.execute("SELECT filter FROM replication.tables WHERE table_name = 'stock'") == before

    # a change is reported as one
    changed = _hq_yaml(tmp_path, hq, "store_id = :store_id AND qty >= 0")
    r = replicator_cli("hq", "install", "-c", str(changed))
    assert r.returncode == 0, r.stderr
    assert ("row filter changed: public.stock: store_id = :store_id -> store_id = :store_id AND qty >= 0"
            in r.stdout), r.stdout
    assert "nothing changed" not in r.stdout

    # a filter that fails only on rows that arrive later stops the branch naming HQ's filter
    hq.execute("UPDATE replication.tables SET filter = 'store_id = :store_id AND 1 / (qty - 7) > 0' "
               "WHERE table_name = 'stock'")
    hq.execute("INSERT INTO stock VALUES (1, 2, 7)")
    r = b.cli("run", "--once")
    assert r.returncode == 1, r
    errors = [ln for ln in r.stderr.splitlines() if " INFO " not in ln]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith("error: reading the change log on HQ failed: division by zero; a row filter HQ "
                                "defines cannot be evaluated on HQ's rows: public.stock (store_id = :store_id "
                                "AND 1 / (qty - 7) > 0)"), r.stderr


# ------------------------------------------------------ 10. a LATIN1 branch database

@pytest.fixture
def latin1_branch(branch_a_cluster):
    name = f"branch_latin1_{uuid.uuid4().hex[:8]}"
    admin = branch_a_cluster.database("postgres")
    admin.execute(sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
                  .format(sql.Identifier(name)))
    try:
        yield branch_a_cluster.database(name)
    finally:
        branch_a_cluster.drop_database(name)


def test_a_latin1_branch_gets_converted_text_or_a_clear_refusal(tmp_path, hq, latin1_branch, roles):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [latin1_branch])
    assert latin1_branch.scalar("SHOW server_encoding") == "LATIN1"
    hq.execute("INSERT INTO items (id, name) VALUES (1, 'Artículo ñandú'), (2, 'Café über'), (3, 'plain')")
    b = s.add_branch(roles("latin"), latin1_branch, params={"store_id": 1})
    r = b.cli("check")
    assert r.returncode == 0 and "branch database encoding LATIN1, HQ's UTF8: text is converted" in r.stdout, r
    b.init()
    hq.execute("INSERT INTO items (id, name) VALUES (4, 'Ünïcödé'), (5, 'x')")
    hq.execute("UPDATE items SET name = name || ' ¿sí?' WHERE id = 2")
    assert b.cli("run", "--once").returncode == 0
    # the branch holds the same characters, stored as LATIN1 bytes (one byte each)
    names = dict(latin1_branch.execute("SELECT id, name FROM items"))
    assert names == dict(hq.execute("SELECT id, name FROM items"))
    assert latin1_branch.scalar("SELECT octet_length(name) FROM items WHERE id = 1") == len("Artículo ñandú")
    r = b.cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    # a character LATIN1 cannot hold: that row is set aside, named, the rest of its chunk applies
    hq.execute("INSERT INTO items (id, name) VALUES (6, 'precio 5 €'), (7, 'siete')")
    r = b.cli("run", "--once")
    assert r.returncode == 0 and "1 set aside" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert latin1_branch.scalar("SELECT count(*) FROM items WHERE id = 6") == 0
    assert latin1_branch.scalar("SELECT name FROM items WHERE id = 7") == "siete"
    r = b.cli("status")
    assert r.returncode == 1 and "public.items key 6:" in r.stdout, r.stdout
    assert 'has no equivalent in encoding "LATIN1"' in r.stdout, r.stdout
    # HQ fixes the value: the newer image replaces the refused one
    hq.execute("UPDATE items SET name = 'precio 5 EUR' WHERE id = 6")
    assert b.cli("run", "--once").returncode == 0
    assert latin1_branch.scalar("SELECT name FROM items WHERE id = 6") == "precio 5 EUR"
    assert b.cli("status").returncode == 0


# ---------------------------------------------------- 5. what a branch login reads

SECRET_SCHEMA = SCHEMA + """
CREATE TABLE customers (id int PRIMARY KEY, name text, email text);
"""
SECRET_CATALOGS = {**CATALOGS, "customers": {"label": "Clientes", "tables": ["public.customers"]}}
MARKER_EMAIL = "ana.secret@example.com"
MARKER_F = 31337.25


def _readable_text(conn: psycopg.Connection, role: str) -> dict[str, str]:
    """Every relation and column the login can SELECT, outside the system catalogs, as text."""
    out = {}
    rels = conn.execute(
        """SELECT c.oid::regclass::text, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
              AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'""").fetchall()
    for name, oid in rels:
        cols = [r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
            "AND has_column_privilege(%s, attrelid, attnum, 'SELECT') ORDER BY attnum", (oid, role))]
        if not cols:
            continue
        q = sql.SQL("SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM (SELECT {} FROM {}) t").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(name))
        out[name] = conn.execute(q).fetchone()[0]
    return out


def test_a_branch_login_reads_only_what_hq_granted_it(tmp_path, hq, branch_a, roles):
    s = make_setup(tmp_path, hq, SECRET_CATALOGS, SECRET_SCHEMA, [branch_a])
    hq.execute("INSERT INTO customers VALUES (1, 'Ana', %s)", (MARKER_EMAIL,))
    hq.execute("INSERT INTO items (id, name, f) VALUES (1, 'one', %s)", (MARKER_F,))
    name = roles("reader")
    with hq.connect() as conn:
        reg = add_branch(conn, s.hq_cfg, name, {"store_id": "1"}, PASSWORD, catalogs=["items", "stock"])
    # every kind of change, after registration, so the log holds them all
    hq.execute("UPDATE customers SET name = 'Ana María'")
    hq.execute("UPDATE items SET name = 'uno', f = %s", (MARKER_F + 1,))
    hq.execute("INSERT INTO stock VALUES (1, 1, 3), (2, 1, 4)")
    with _as(hq, reg.role, PASSWORD) as conn:
        seen = _readable_text(conn, reg.role)
        everything = "\n".join(seen.values())
        assert MARKER_EMAIL not in everything and "Ana" not in everything, seen
        assert str(MARKER_F) not in everything and str(MARKER_F + 1) not in everything, seen
        assert "public.customers" not in seen and "public.users" not in seen
        for denied in ("SELECT * FROM customers", "SELECT f FROM items", "SELECT * FROM replication.branches"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(denied)
        # the log holds rows of its catalogs only
        tables = {r[0] for r in conn.execute(
            "SELECT t.table_name FROM replication.change_log l JOIN replication.tables t ON t.id = l.table_id")}
        assert tables == {"items", "stock"}, tables
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (1,)
    # the whole log, for comparison, holds the customer
    assert MARKER_EMAIL in hq.scalar("SELECT string_agg(row::text, '') FROM replication.change_log")

    # a branch.yaml that selects an ungranted catalog stops with one line
    b = s.add_branch(name, branch_a, catalogs=["items", "customers"], params={"store_id": 1})
    with hq.connect() as conn:       # the harness re-registered it with every catalog: grant two again
        add_branch(conn, s.hq_cfg, name, {"store_id": "1"}, PASSWORD, catalogs=["items", "stock"])
    r = b.cli("init")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert ("catalogs: catalog customers is not granted to this branch by HQ (it grants items, stock); "
            "remove it here, or ask HQ's admin") in r.stderr, r.stderr


ROWS_SCHEMA = SCHEMA + """
CREATE TABLE registers (id int PRIMARY KEY, store_id int NOT NULL, name text);
"""
ROWS_CATALOGS = {**CATALOGS, "registers": {"label": "Registers", "default": True, "tables": ["public.registers"],
                                           "filter": "store_id = :store_id"}}


def _other_stores_rows(hq) -> None:
    """Store 2's rows carry the marker 7770 (stock) or caja-2 (registers); store 1's never."""
    hq.execute("INSERT INTO stock VALUES (1, 1, 10), (1, 2, 20), (2, 1, 777001), (2, 2, 777002), (2, 3, 777003)")
    hq.execute("INSERT INTO registers VALUES (1, 1, 'caja-1a'), (2, 1, 'caja-1b'), (3, 2, 'caja-2a')")


def test_a_branch_login_reads_only_its_own_rows_of_filtered_catalogs(tmp_path, hq, branch_a, roles):
    s = make_setup(tmp_path, hq, ROWS_CATALOGS, ROWS_SCHEMA, [branch_a])
    _other_stores_rows(hq)
    one, two, items_only = roles("store1"), roles("store2"), roles("itemsonly")
    with hq.connect() as conn:
        reg1 = add_branch(conn, s.hq_cfg, one, {"store_id": "1"}, PASSWORD)
        reg2 = add_branch(conn, s.hq_cfg, two, {"store_id": "2"}, PASSWORD)
        reg3 = add_branch(conn, s.hq_cfg, items_only, {"store_id": "1"}, PASSWORD, catalogs=["items"])
    # every kind of change to both stores' rows, after registration, so the log holds them all
    hq.execute("INSERT INTO stock VALUES (1, 3, 30), (2, 4, 777004)")
    hq.execute("UPDATE stock SET qty = qty + 1")
    hq.execute("UPDATE stock SET store_id = 1, qty = 40 WHERE store_id = 2 AND item_id = 4")   # key moves in
    hq.execute("DELETE FROM stock WHERE store_id = 2 AND item_id = 2")
    hq.execute("UPDATE registers SET name = 'caja-2b' WHERE store_id = 2")
    ids = dict(hq.execute("SELECT table_name, id FROM replication.tables"))
    with _as(hq, reg1.role, PASSWORD) as conn:
        seen = _readable_text(conn, reg1.role)
        everything = "\n".join(seen.values())
        assert "7770" not in everything and "caja-2" not in everything, seen
        for denied in ("SELECT * FROM stock", "SELECT * FROM registers", "SELECT store_id FROM stock"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(denied)
        stock = conn.execute("SELECT store_id, item_id, qty FROM replication.read_rows(%s, NULL::stock) "
                             "ORDER BY 2", (ids["stock"],)).fetchall()
        assert stock == [(1, 1, 11), (1, 2, 21), (1, 3, 31), (1, 4, 40)], stock
        assert conn.execute("SELECT name FROM replication.read_rows(%s, NULL::registers) ORDER BY 1",
                            (ids["registers"],)).fetchall() == [("caja-1a",), ("caja-1b",)]
        # the log: rows of store 1's rows only (a key that moved in shows as its new row)
        log_rows = conn.execute("SELECT op, row ->> 'store_id', old_row ->> 'store_id' FROM replication.change_log "
                                "WHERE table_id = ANY (%s) ORDER BY id", ([ids["stock"], ids["registers"]],)).fetchall()
        assert log_rows and all(new == "1" or old == "1" or op == "T" for op, new, old in log_rows), log_rows
        # read_rows serves granted filtered tables only
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute("SELECT * FROM replication.read_rows(%s, NULL::items)", (ids["items"],))
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="takes NULL::public.stock"):
            conn.execute("SELECT * FROM replication.read_rows(%s, NULL::registers)", (ids["stock"],))
    with _as(hq, reg2.role, PASSWORD) as conn:      # the markers are there, for store 2's login
        assert conn.execute("SELECT count(*) FROM replication.read_rows(%s, NULL::stock) WHERE qty > 777000",
                            (ids["stock"],)).fetchone() == (2,)
    with _as(hq, reg3.role, PASSWORD) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not granted"):
            conn.execute("SELECT * FROM replication.read_rows(%s, NULL::stock)", (ids["stock"],))
        assert conn.execute("SELECT count(*) FROM replication.change_log WHERE table_id <> %s",
                            (ids["items"],)).fetchone() == (0,)


def test_a_filter_hq_cannot_enforce_per_login_is_refused_at_install(tmp_path, hq, branch_a, roles):
    """A parameter in arithmetic has no type without its value: HQ could not restrict the
    login's reads by it, so install refuses it by name and changes nothing."""
    s = make_setup(tmp_path, hq, ROWS_CATALOGS, ROWS_SCHEMA, [branch_a])
    with hq.connect() as conn:
        add_branch(conn, s.hq_cfg, roles("arith"), {"store_id": "1"}, PASSWORD)
    before = hq.execute("SELECT id, filter, row_access FROM replication.tables ORDER BY id")
    bad = _write(tmp_path, hq, {**ROWS_CATALOGS, "stock": {**ROWS_CATALOGS["stock"],
                                                           "filter": "store_id = :store_id + 0"}}, "arith.yaml")
    r = replicator_cli("hq", "install", "-c", str(bad))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {bad}: catalog stock: the row filter of public.stock "
                               "(store_id = :store_id + 0) cannot be enforced on HQ for branch logins: "), r.stderr
    assert "compare each :parameter with a column or CAST it" in r.stderr
    assert hq.execute("SELECT id, filter, row_access FROM replication.tables ORDER BY id") == before
    fixed = _write(tmp_path, hq, {**ROWS_CATALOGS, "stock": {**ROWS_CATALOGS["stock"],
                                  "filter": "store_id = CAST(:store_id AS integer) + 0"}}, "cast.yaml")
    r = replicator_cli("hq", "install", "-c", str(fixed))
    assert r.returncode == 0 and "row restriction for branch logins rebuilt: public.stock" in r.stdout, r


def test_a_branch_replicates_its_own_rows_through_its_restricted_login(tmp_path, hq, branch_a, roles):
    """init, run and verify as the store's own HQ login: they read what the restriction
    lets through (read_rows, the log's policy) and the branch gets exactly its rows."""
    s = make_setup(tmp_path, hq, ROWS_CATALOGS, ROWS_SCHEMA, [branch_a])
    _other_stores_rows(hq)
    name = roles("store1run")
    with hq.connect() as conn:
        reg = add_branch(conn, s.hq_cfg, name, {"store_id": "1"}, PASSWORD)
    path = tmp_path / "store1.yaml"
    path.write_text(yaml.safe_dump({"branch": name, "source": {"dsn": hq.cluster.dsn(hq.name, reg.role, PASSWORD)},
                                    "target": {"dsn": branch_a.dsn}}))

    def cli(*args):
        r = replicator_cli(*args, "-c", str(path))
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    def same(table: str) -> None:
        assert_same(hq, branch_a, table, hq_where="store_id = 1")

    cli("init")
    same("stock"), same("registers")
    hq.execute("INSERT INTO stock VALUES (1, 5, 30), (2, 4, 777004)")
    hq.execute("UPDATE stock SET qty = qty + 1")
    hq.execute("UPDATE stock SET store_id = 1 WHERE store_id = 2 AND item_id = 3")   # into store 1
    hq.execute("UPDATE stock SET store_id = 3 WHERE store_id = 1 AND item_id = 2")   # out of it
    hq.execute("UPDATE registers SET store_id = 2 WHERE id = 2")                     # out, not a key
    hq.execute("UPDATE registers SET store_id = 1 WHERE id = 3")                     # in
    cli("run", "--once")
    same("stock"), same("registers")
    assert branch_a.scalar("SELECT count(*) FROM stock WHERE qty > 777000") == 1        # (1, 3) moved in
    assert cli("verify").returncode == 0


def test_exclusions_added_later_and_retired_catalogs_leave_nothing_readable(tmp_path, hq, branch_a, roles):
    plain = {k: {kk: vv for kk, vv in v.items() if kk != "exclude_columns"} for k, v in SECRET_CATALOGS.items()}
    s = make_setup(tmp_path, hq, plain, SECRET_SCHEMA, [branch_a])
    name = roles("late")
    with hq.connect() as conn:
        reg = add_branch(conn, s.hq_cfg, name, {"store_id": "1"}, PASSWORD)
    hq.execute("INSERT INTO items (id, name, f) VALUES (1, 'one', %s)", (MARKER_F,))
    hq.execute("INSERT INTO customers VALUES (1, 'Ana', %s)", (MARKER_EMAIL,))
    with _as(hq, reg.role, PASSWORD) as conn:      # readable before the exclusion
        assert str(MARKER_F) in "\n".join(_readable_text(conn, reg.role).values())
    r = replicator_cli("hq", "install", "-c", str(_write(tmp_path, hq, SECRET_CATALOGS, "excluded.yaml")))
    assert r.returncode == 0, r.stderr
    with _as(hq, reg.role, PASSWORD) as conn:      # gone from the table and from old log rows
        assert str(MARKER_F) not in "\n".join(_readable_text(conn, reg.role).values())
    # retiring a catalog (on purpose) revokes what its tables granted
    without = {k: v for k, v in SECRET_CATALOGS.items() if k != "customers"}
    r = replicator_cli("hq", "install", "-c", str(_write(tmp_path, hq, without, "retired.yaml")), "--detach")
    assert r.returncode == 0, r.stderr
    with _as(hq, reg.role, PASSWORD) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM customers")
        assert MARKER_EMAIL not in "\n".join(_readable_text(conn, reg.role).values())
    # a deactivated branch reads nothing of any catalog, also if its login were reenabled
    replicator_cli("hq", "deactivate", "-c", str(s.hq_path), name)
    hq.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(reg.role)))
    with _as(hq, reg.role, PASSWORD) as conn:
        assert conn.execute("SELECT count(*) FROM replication.change_log").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM items")


def _write(tmp_path, hq, catalogs: dict, name: str):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"dsn": hq.dsn, "catalogs": catalogs}))
    return path
