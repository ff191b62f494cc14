"""`replicator init`: the first sync under write load, interrupted and resumed,
catalog choice, the first-sync-only rule, a catalog added while `run` works,
and `--create-missing`."""
from __future__ import annotations

import random
import re
import signal
import threading
import time

import psycopg
import pytest
import yaml

from tests.harness import assert_same, make_setup, table_rows

SCHEMA = """
CREATE TABLE public.items (id bigint PRIMARY KEY, name text NOT NULL, price numeric(12,2) NOT NULL,
                           pad text NOT NULL DEFAULT '');
CREATE TABLE public.counters (id int PRIMARY KEY, n bigint NOT NULL);
CREATE TABLE public.tallies (id int PRIMARY KEY, n bigint NOT NULL);
CREATE TABLE public.customers (id int PRIMARY KEY, name text NOT NULL,
                               search_key text GENERATED ALWAYS AS (lower(name)) STORED);
"""
CATALOGS = {
    "items": {"label": "Artículos", "default": True, "tables": ["public.items"]},
    "counters": {"label": "Contadores", "tables": ["public.counters"]},
    "tallies": {"label": "Cuentas", "tables": ["public.tallies"]},
    "customers": {"label": "Clientes", "default": True, "tables": ["public.customers"]},
}


def fill(hq, items: int = 1000, pad: int = 0) -> None:
    hq.execute(f"""
        INSERT INTO items SELECT g, 'item ' || g, g % 1000, repeat('x', {pad}) FROM generate_series(1, {items}) g;
        INSERT INTO counters SELECT g, 0 FROM generate_series(1, 200) g;
        INSERT INTO tallies SELECT g, 0 FROM generate_series(1, 200) g;
        INSERT INTO customers SELECT g, 'Customer ' || g FROM generate_series(1, 300) g;""")


def set_catalogs(branch, catalogs) -> None:
    doc = yaml.safe_load(branch.path.read_text())
    doc["catalogs"] = catalogs
    branch.path.write_text(yaml.safe_dump(doc, sort_keys=False))


class Writers:
    """Threads committing small HQ transactions until stopped: counters go up, rows come and go."""

    def __init__(self, hq, tables=("counters",), threads: int = 2, items_max: int = 1000):
        self.hq, self.tables, self.items_max = hq, tables, items_max
        self.stop = threading.Event()
        self.commits = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)
        assert not self.errors, self.errors

    def _work(self, n: int) -> None:
        rnd = random.Random(n)
        next_id = 100_000 * (n + 1)
        try:
            with psycopg.connect(self.hq.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    with conn.transaction():
                        for table in self.tables:
                            conn.execute(f"UPDATE {table} SET n = n + 1 WHERE id = %s", (rnd.randint(1, 200),))
                            next_id += 1
                            conn.execute(f"INSERT INTO {table} VALUES (%s, 1)", (next_id,))
                            conn.execute(f"DELETE FROM {table} WHERE id = %s", (next_id - 3,))
                        conn.execute("UPDATE items SET price = price + 1 WHERE id = %s",
                                     (rnd.randint(1, self.items_max),))
                    self.commits += 1
                    time.sleep(0.002)
        except BaseException as e:  # reported by __exit__
            self.errors.append(e)


@pytest.fixture
def setup(tmp_path, hq, branch_a):
    return make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])


# ----------------------------------------------------------------- load

@pytest.mark.slow
def test_init_under_concurrent_writes_then_stream_is_equal(setup, hq, branch_a):
    fill(hq, items=100_000, pad=50)
    b = setup.add_branch("store-1", branch_a, catalogs=["counters", "items"])
    with Writers(hq, ("counters",), items_max=100_000) as w:
        time.sleep(0.2)
        before = w.commits
        rep = b.init()
        during = w.commits - before
        time.sleep(0.2)
    assert rep.catalogs == ["counters", "items"] and rep.rows > 100_000
    assert during > 5, f"only {during} HQ commits happened during the copy"
    b.run_once()
    assert_same(hq, branch_a, "items")
    assert_same(hq, branch_a, "counters")


# Branch-only indexes of every kind init defers or must leave alone.
BRANCH_INDEXES = """
ALTER TABLE items ADD CONSTRAINT items_name_key UNIQUE (name) INCLUDE (price) WITH (fillfactor = 70)
    DEFERRABLE INITIALLY DEFERRED;
CREATE INDEX items_cheap ON items (price) WHERE price < 10;
CREATE INDEX items_lower ON items (lower(name) text_pattern_ops);
CREATE INDEX items_noted ON items (price, id);
COMMENT ON INDEX items_noted IS 'a comment is not in the index definition: this one stays';
CREATE VIEW tally_view AS SELECT id, n FROM tallies GROUP BY id;   -- depends on tallies_pkey
"""
INDEXES = """
SELECT c.relname::text, pg_get_indexdef(i.indexrelid), i.indimmediate, con.conname::text,
       pg_get_constraintdef(con.oid), obj_description(i.indexrelid, 'pg_class')
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
  LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
 WHERE i.indrelid IN ('public.items'::regclass, 'public.tallies'::regclass) ORDER BY 1"""
OIDS = """SELECT c.relname::text, c.oid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
           WHERE i.indrelid IN ('public.items'::regclass, 'public.tallies'::regclass)"""


def test_init_builds_indexes_after_the_copy_and_keeps_their_definitions(setup, hq, branch_a):
    fill(hq, items=5000)
    branch_a.execute(BRANCH_INDEXES)
    before, oids = branch_a.execute(INDEXES), dict(branch_a.execute(OIDS))
    b = setup.add_branch("store-1", branch_a, catalogs=["items", "tallies"])
    b.init()
    assert branch_a.execute(INDEXES) == before
    rebuilt = {name for name, oid in branch_a.execute(OIDS) if oids[name] != oid}
    # Dropped for the copy and built again: the key, the unique constraint, plain indexes.  Kept:
    # the commented index, and the key a view depends on.
    assert rebuilt == {"items_pkey", "items_name_key", "items_cheap", "items_lower"}
    assert_same(hq, branch_a, "items")
    assert_same(hq, branch_a, "tallies")
    assert branch_a.scalar("SELECT count(*) FROM tally_view") == 200

    hq.execute("UPDATE items SET price = price + 1 WHERE id <= 100; DELETE FROM items WHERE id > 4990;"
               "INSERT INTO items VALUES (9001, 'new', 1)")
    b.run_once()
    assert_same(hq, branch_a, "items")
    assert branch_a.scalar("SELECT count(*) FROM items WHERE price < 10") == \
        hq.scalar("SELECT count(*) FROM items WHERE price < 10")


@pytest.mark.parametrize("hq_sql, branch_sql, problem, indexes", [
    # fails while the deferred indexes are built, after the copy
    ("UPDATE items SET name = 'same' WHERE id IN (7, 8)", "CREATE UNIQUE INDEX items_name_uq ON items (name)",
     'could not create unique index "items_name_uq" (items_name_uq)', 2),
    # fails in the middle of the COPY stream
    ("INSERT INTO items SELECT g, 'more ' || g, 1 FROM generate_series(101, 20000) g",
     "ALTER TABLE items ADD CONSTRAINT cheap CHECK (price < 50)",
     'new row for relation "items" violates check constraint "cheap" (cheap)', 1),
], ids=["unique-index", "check-mid-copy"])
def test_init_breaking_a_branch_only_constraint_touches_nothing(setup, hq, branch_a, hq_sql, branch_sql,
                                                                problem, indexes):
    fill(hq, items=100)
    hq.execute(hq_sql)
    branch_a.execute(f"{branch_sql}; INSERT INTO items VALUES (1, 'old', 1)")
    b = setup.add_branch("store-1", branch_a, catalogs=["items"])
    res = b.cli("init")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: copying public.items failed on the branch: {problem}; catalog items was not copied and its "
        "tables keep their old rows; fix or drop that branch constraint and run init again"), res.stderr
    assert branch_a.execute("SELECT id, name FROM items") == [(1, "old")]
    assert branch_a.scalar("SELECT count(*) FROM pg_index WHERE indrelid = 'items'::regclass AND indisvalid") \
        == indexes


@pytest.mark.slow
def test_sigkill_during_init_then_rerun_finishes_the_job(setup, hq, branch_a):
    fill(hq, items=300_000, pad=100)
    branch_a.execute("INSERT INTO items VALUES (-1, 'old branch row', 0)")
    b = setup.add_branch("store-1", branch_a, catalogs=["counters", "items"])
    proc = b.popen("init", stdout=None, stderr=None)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            copied = branch_a.scalar("SELECT tuples_processed FROM pg_stat_progress_copy "
                                     "WHERE relid = 'public.items'::regclass")
            if copied:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < copied < 300_000, copied

    # The committed catalog is done, the interrupted one is as it was.
    states = dict(branch_a.execute("SELECT table_name, rows_copied FROM replication.target_tables"))
    assert states == {"counters": 200}
    assert table_rows(branch_a, "items") == ["(-1,\"old branch row\",0.00,\"\")"]

    hq.execute("UPDATE items SET price = 7 WHERE id <= 100; UPDATE counters SET n = n + 5 WHERE id <= 10")
    again = b.cli("init")
    assert again.returncode == 0, again.stderr
    assert "skipped counters: already initialized since" in again.stdout
    assert re.search(r"initialized items: 1 tables, 300000 rows", again.stdout), again.stdout

    hq.execute("UPDATE items SET price = 8 WHERE id <= 50; DELETE FROM items WHERE id = 300000; "
               "UPDATE counters SET n = n + 1")
    b.run_once()
    assert_same(hq, branch_a, "items")
    assert_same(hq, branch_a, "counters")


# ------------------------------------------------------------ selection

def test_customers_only_when_asked(tmp_path, setup, hq, branch_a, branch_b):
    fill(hq)
    b = setup.add_branch("store-1", branch_a)             # HQ defaults: items, customers
    rep = b.init()
    assert rep.catalogs == ["items"]
    assert branch_a.scalar("SELECT count(*) FROM customers") == 0
    rep = b.init(include_customers=True)                  # items is done: only customers now
    assert rep.catalogs == ["customers"] and list(rep.skipped) == ["items"]
    assert_same(hq, branch_a, "customers")

    branch_b.execute(SCHEMA)
    b2 = setup.add_branch("store-2", branch_b)
    rep = b2.init("customers")                            # named: copied without the flag
    assert rep.catalogs == ["customers"]
    assert_same(hq, branch_b, "customers")
    assert branch_b.scalar("SELECT count(*) FROM items") == 0
    hq.execute("UPDATE customers SET name = 'Renamed ' || id WHERE id <= 5")
    b2.run_once()
    assert_same(hq, branch_b, "customers")


def test_force_refusal_text_and_exit_code(setup, hq, branch_a):
    fill(hq)
    b = setup.add_branch("store-1", branch_a, catalogs=["items", "counters"])
    first = b.cli("init")
    assert first.returncode == 0, first.stderr
    since = {r[0]: r[1] for r in branch_a.connect().execute(
        "SELECT catalog, min(initialized_at) FROM replication.target_tables GROUP BY 1")}

    refused = b.cli("init")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: already initialized: items (since {since['items']:%Y-%m-%d %H:%M}), "
        f"counters (since {since['counters']:%Y-%m-%d %H:%M}); a full initialization is meant for the "
        "first sync only; pass --force to truncate and copy again")
    named = b.cli("init", "counters")
    assert named.returncode == 2 and "already initialized: counters (since" in named.stderr

    # --force truncates and copies again (here: repairs rows damaged behind the guard's back).
    with branch_a.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("DELETE FROM items WHERE id <= 10; UPDATE counters SET n = -1")
    forced = b.cli("init", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "initialized items, counters: 2 tables" in forced.stdout
    assert_same(hq, branch_a, "items")
    assert_same(hq, branch_a, "counters")


# ------------------------------------------------- a catalog added later

REGRESSION_CHECK = """
CREATE TABLE public.regressions (tbl text, id int, old_n bigint, new_n bigint);
CREATE FUNCTION public.check_monotonic() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.n < OLD.n THEN
        INSERT INTO public.regressions VALUES (TG_TABLE_NAME, NEW.id, OLD.n, NEW.n);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER counters_monotonic BEFORE UPDATE ON public.counters
    FOR EACH ROW EXECUTE FUNCTION public.check_monotonic();
ALTER TABLE public.counters ENABLE ALWAYS TRIGGER counters_monotonic;
CREATE TRIGGER tallies_monotonic BEFORE UPDATE ON public.tallies
    FOR EACH ROW EXECUTE FUNCTION public.check_monotonic();
ALTER TABLE public.tallies ENABLE ALWAYS TRIGGER tallies_monotonic;
"""


def _converge(hq, branch, tables, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            for t in tables:
                assert_same(hq, branch, t)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _start_daemon(b):
    proc = b.popen("run", stdout=None, stderr=None)
    time.sleep(1.0)
    assert proc.poll() is None, "replicator run exited early"
    return proc


def _stop_daemon(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_catalog_added_later_joins_running_stream(setup, hq, branch_a):
    """Both orders: init while `run` still has the old selection, and `run` restarted before init."""
    fill(hq, items=2000)
    branch_a.execute(REGRESSION_CHECK)
    b = setup.add_branch("store-1", branch_a, catalogs=["items"])
    b.init()
    daemon = _start_daemon(b)
    try:
        with Writers(hq, ("counters", "tallies"), items_max=2000) as w:
            # Order 1: edit branch.yaml, init the new catalog while the daemon runs the old selection.
            time.sleep(0.5)
            set_catalogs(b, ["items", "counters"])
            res = b.cli("init", "counters")
            assert res.returncode == 0, res.stderr
            assert "initialized counters: 1 tables" in res.stdout
            time.sleep(1.0)
            # Order 2: edit branch.yaml, restart the daemon (streams tallies un-initialized), then init.
            set_catalogs(b, ["items", "counters", "tallies"])
            _stop_daemon(daemon)
            daemon = _start_daemon(b)
            res = b.cli("init", "tallies")
            assert res.returncode == 0, res.stderr
            time.sleep(1.0)
        assert w.commits > 50
        _converge(hq, branch_a, ["items", "counters", "tallies"])
        assert branch_a.execute("SELECT * FROM regressions") == [], "an old change was applied after a newer one"
    finally:
        _stop_daemon(daemon)


# -------------------------------------------------------- create-missing

DEFINITIONS = """
CREATE SCHEMA pos;
CREATE TYPE pos.kind AS ENUM ('printer', 'scale', 'drawer');
CREATE FUNCTION pos.next_code() RETURNS text LANGUAGE sql AS $$ SELECT 'C' || floor(random() * 1000)::text $$;
CREATE TABLE pos.devices (
    store_id    int NOT NULL,
    id          bigint GENERATED BY DEFAULT AS IDENTITY,
    kind        pos.kind NOT NULL DEFAULT 'printer',
    kinds       pos.kind[] NOT NULL DEFAULT '{}',
    code        varchar(20) NOT NULL DEFAULT pos.next_code(),
    serial_no   serial,
    label       text COLLATE "C" NOT NULL DEFAULT '',
    price       numeric(14,2) NOT NULL DEFAULT 0,
    tags        text[] NOT NULL DEFAULT '{}',
    settings    jsonb NOT NULL DEFAULT '{"on": true}',
    added_at    timestamptz NOT NULL DEFAULT now(),
    token       uuid DEFAULT gen_random_uuid(),
    secret      text NOT NULL DEFAULT 'x',
    label_key   text GENERATED ALWAYS AS (lower(label) || '/' || store_id) STORED,
    CONSTRAINT devices_pkey PRIMARY KEY (store_id, id)
);
CREATE TABLE pos.notes (id int PRIMARY KEY, body text);
"""
DEF_CATALOGS = {"devices": {"label": "Dispositivos", "default": True, "tables": ["pos.devices", "pos.notes"],
                            "exclude_columns": {"pos.devices": ["secret"]}}}

DESCRIBE = """
SELECT c.relname::text, a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid), a.attgenerated::text, a.attidentity::text,
       (SELECT collname::text FROM pg_collation WHERE oid = a.attcollation)
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'pos'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY 1, 2"""
PKEYS = """
SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid) FROM pg_constraint
 WHERE contype = 'p' AND connamespace = 'pos'::regnamespace ORDER BY 1"""


def test_create_missing_reproduces_the_definition(tmp_path, hq, branch_a):
    s = make_setup(tmp_path, hq, DEF_CATALOGS, DEFINITIONS)
    hq.execute("""INSERT INTO pos.devices (store_id, kind, kinds, label, price, tags)
                  SELECT g % 3, (ARRAY['printer','scale','drawer'])[g % 3 + 1]::pos.kind, '{scale,drawer}',
                         'Dev ' || g, g * 1.5, ARRAY['a', 'b'] FROM generate_series(1, 500) g;
                  INSERT INTO pos.notes SELECT g, 'note ' || g FROM generate_series(1, 20) g""")
    b = s.add_branch("store-1", branch_a)

    refused = b.cli("init")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "error: schema mismatch on pos.devices, pos.notes: table missing on the branch; create it, or pass "
        "--create-missing to create it from HQ's definition")
    assert branch_a.scalar("SELECT to_regnamespace('pos')") is None        # nothing touched

    done = b.cli("init", "--create-missing")
    assert done.returncode == 0, done.stderr

    want = []
    for row in hq.execute(DESCRIBE):
        rel, num, col, typ, notnull, default, gen, ident, coll = row
        if col in ("code", "serial_no"):      # nextval / user function: not reproduced
            default = None
        if col == "secret":                   # excluded: nullable, keeps its constant default
            notnull = False
        want.append((rel, num, col, typ, notnull, default, gen, ident, coll))
    assert branch_a.execute(DESCRIBE) == want
    assert branch_a.execute(PKEYS) == hq.execute(PKEYS)
    assert branch_a.scalar("SELECT enum_range(NULL::pos.kind)::text") == "{printer,scale,drawer}"

    cols = "store_id, id, kind, kinds, code, serial_no, label, price, tags, settings, added_at, token, label_key"
    assert_same(hq, branch_a, "pos.devices", cols)
    assert_same(hq, branch_a, "pos.notes")
    assert branch_a.scalar("SELECT count(*) FROM pos.devices WHERE secret = 'x'") == 500

    hq.execute("UPDATE pos.devices SET label = 'Renamed', kind = 'scale' WHERE id <= 10; "
               "DELETE FROM pos.notes WHERE id > 15")
    b.run_once()
    assert_same(hq, branch_a, "pos.devices", cols)
    assert_same(hq, branch_a, "pos.notes")


def test_create_missing_names_a_type_it_cannot_create(tmp_path, hq, branch_a):
    s = make_setup(tmp_path, hq, {"money": {"label": "M", "default": True, "tables": ["pos.prices"]}},
                   "CREATE SCHEMA pos; CREATE DOMAIN pos.amount AS numeric(12,2) CHECK (VALUE >= 0);"
                   "CREATE TABLE pos.prices (id int PRIMARY KEY, amount pos.amount NOT NULL);")
    b = s.add_branch("store-1", branch_a)
    res = b.cli("init", "--create-missing")
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "error: schema mismatch on pos.prices: uses type pos.amount, which does not exist on the branch; "
        "create it there first (only enum types are created automatically)")
    assert branch_a.scalar("SELECT to_regclass('pos.prices')") is None
