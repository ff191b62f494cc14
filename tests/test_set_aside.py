"""One bad row never stalls the stream: what the branch refuses is set aside, the rest goes on.

The branch has constraints HQ does not (a CHECK, a UNIQUE, a NOT NULL); HQ's rows break
them.  Each refused change waits in replication.set_aside with its reason, in the same
transaction as the rest of its chunk; status names it; a newer image or the DBA's fix
clears it; discarding one is recorded.
"""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from harness import make_setup, replicator_cli

HQ_SCHEMA = "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(12,2), code text);"
BRANCH_SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(12,2) CONSTRAINT cheap CHECK (price < 1000),
                    code text CONSTRAINT one_code UNIQUE);
"""
CATALOGS = {"items": {"label": "Items", "default": True, "tables": ["public.items"]}}


@pytest.fixture
def world(tmp_path, hq, branch_a):
    hq.execute(HQ_SCHEMA)
    branch_a.execute(BRANCH_SCHEMA)
    s = make_setup(tmp_path, hq, CATALOGS)
    hq.execute("INSERT INTO items VALUES (1, 'first', 1, 'A')")
    b = s.add_branch("aside", branch_a)
    b.init()
    return b


def waiting(db) -> dict:
    return {r[0]: r[1:] for r in db.execute(
        "SELECT key, op::text, constraint_name, sqlstate, attempts FROM replication.set_aside ORDER BY key")}


def ids(db) -> list[int]:
    return [r[0] for r in db.execute("SELECT id FROM items ORDER BY id")]


def test_refused_rows_are_set_aside_and_the_rest_of_the_chunk_applies(world, hq, branch_a):
    b = world
    hq.execute("""INSERT INTO items VALUES (2, 'expensive', 5000, 'B'),   -- breaks cheap
                                           (3, 'copy', 3, 'A'),           -- breaks one_code
                                           (4, NULL, 4, 'D'),             -- breaks NOT NULL
                                           (5, 'fine', 5, 'E')""")
    hq.execute("UPDATE items SET name = 'first!' WHERE id = 1")
    r = b.cli("run", "--once")
    assert r.returncode == 0, r.stderr
    assert "3 set aside" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert ids(branch_a) == [1, 5]
    assert branch_a.scalar("SELECT name FROM items WHERE id = 1") == "first!"
    assert waiting(branch_a) == {"2": ("U", "cheap", "23514", 1), "3": ("U", "one_code", "23505", 1),
                                 "4": ("U", None, "23502", 1)}
    r = replicator_cli("hq", "status", "-c", str(b.path.parent / "hq.yaml"))      # HQ sees it too
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("aside "))
    assert r.returncode == 0 and line.split()[4] == "3", r.stdout
    r = b.cli("status")
    assert r.returncode == 1, r.stdout
    assert "3 changes set aside" in r.stdout, r.stdout
    assert 'public.items key 2: cheap: new row for relation "items" violates check constraint "cheap"' in r.stdout
    assert "public.items key 3: one_code: duplicate key value violates unique constraint" in r.stdout
    assert "catalogs are up to date" not in r.stdout
    r = b.cli("verify")               # a refused row is a difference until it is applied or discarded
    assert r.returncode == 1, r.stdout + r.stderr

    # a newer image of a refused key that the branch accepts replaces it
    hq.execute("UPDATE items SET price = 10 WHERE id = 2")
    # a newer image that is refused too replaces the older one (order per key holds)
    hq.execute("UPDATE items SET name = 'copy 2' WHERE id = 3")
    r = b.cli("run", "--once")
    assert r.returncode == 0, r.stderr
    assert ids(branch_a) == [1, 2, 5]
    # (each run also retried both at its start: attempts count every try)
    assert waiting(branch_a) == {"3": ("U", "one_code", "23505", 3), "4": ("U", None, "23502", 2)}

    # the DBA's fix: the next run retries and applies without being asked
    branch_a.execute("ALTER TABLE items ALTER COLUMN name DROP NOT NULL")
    r = b.cli("run", "--once")
    assert r.returncode == 0 and "applied 1 set-aside changes on retry" in r.stderr, r.stderr
    assert ids(branch_a) == [1, 2, 4, 5]

    # discarding is deliberate and recorded; nothing else makes a refused row go
    r = b.cli("set-aside", "list")
    assert r.returncode == 1 and r.stdout.startswith("public.items key 3: one_code:"), r.stdout
    assert b.cli("aside", "list").stdout == r.stdout           # the group's earlier name still works
    r = b.cli("set-aside", "discard", "items", "3")
    assert r.returncode == 0 and "discarded public.items key 3" in r.stdout, r.stdout + r.stderr
    assert branch_a.execute("SELECT key, constraint_name, discarded_by IS NOT NULL FROM replication.discarded") == \
        [("3", "one_code", True)]
    r = b.cli("set-aside", "discard", "items", "3")
    assert r.returncode == 2 and "nothing of public.items key 3 is set aside" in r.stderr, r.stderr
    r = b.cli("status")
    assert r.returncode == 0 and "catalogs are up to date" in r.stdout, r.stdout


def test_a_failure_that_is_not_about_a_row_still_stops_with_one_line(world, hq, branch_a):
    b = world
    branch_a.execute("REVOKE UPDATE, INSERT ON items FROM PUBLIC")
    branch_a.execute("ALTER TABLE items DROP COLUMN code")
    hq.execute("INSERT INTO items VALUES (9, 'n', 1, 'Z')")
    r = b.cli("run", "--once")
    errors = [ln for ln in r.stderr.splitlines() if " INFO " not in ln]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert "column missing on the branch" in errors[0], errors
    assert branch_a.scalar("SELECT count(*) FROM replication.set_aside") == 0


def test_rows_set_aside_survive_a_sigkill_and_apply_after_the_fix(world, hq, branch_a):
    b = world
    hq.execute("INSERT INTO items SELECT i, 'n' || i, CASE WHEN i % 100 = 0 THEN 5000 ELSE 1 END, 'c' || i "
               "FROM generate_series(10, 2009) i")
    proc = b.popen("run", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while branch_a.scalar("SELECT count(*) FROM replication.set_aside") < 20:
            assert time.monotonic() < deadline and proc.poll() is None, "rows set aside by the running replicator"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert branch_a.scalar("SELECT count(*) FROM items") == 1 + 2000 - 20       # set aside with their chunk
    branch_a.execute("ALTER TABLE items DROP CONSTRAINT cheap")
    r = b.cli("run", "--once")
    assert r.returncode == 0 and "applied 20 set-aside changes on retry" in r.stderr, r.stderr
    assert branch_a.scalar("SELECT count(*) FROM items") == 2001
    assert b.cli("verify").returncode == 0


def test_verify_repair_copies_a_waiting_key_and_it_waits_no_more(world, hq, branch_a):
    """The DBA fixes the cause and repairs at once: the key is HQ's row again, and its
    set-aside change (now superseded) no longer counts as waiting."""
    b = world
    hq.execute("INSERT INTO items VALUES (2, 'expensive', 5000, 'B'), (3, 'fine', 3, 'C')")
    assert b.cli("run", "--once").returncode == 0
    assert set(waiting(branch_a)) == {"2"}
    branch_a.execute("ALTER TABLE items DROP CONSTRAINT cheap")
    r = b.cli("verify", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert waiting(branch_a) == {}
    assert branch_a.scalar("SELECT price FROM items WHERE id = 2") == 5000
    r = b.cli("status")
    assert r.returncode == 0 and "catalogs are up to date" in r.stdout, r.stdout


def test_a_row_set_aside_as_a_record_applies_after_a_fix_that_changes_the_columns(world, hq, branch_a):
    """Changes of a table whose columns match HQ's travel as binary records, which name no
    columns.  The DBA's fix here drops the CHECK and adds a local column, so the table's
    changes travel as JSON from then on: the waiting row must still apply (it waited forever
    when it was kept as the record it came as)."""
    b = world
    hq.execute("INSERT INTO items VALUES (2, 'expensive', 5000, 'B'), (3, 'fine', 3, 'C')")
    assert b.cli("run", "--once").returncode == 0
    assert set(waiting(branch_a)) == {"2"}
    assert branch_a.scalar("SELECT count(*) FROM replication.set_aside WHERE image IS NOT NULL") == 1
    branch_a.execute("ALTER TABLE items DROP CONSTRAINT cheap, ADD COLUMN shelf text DEFAULT 'front'")
    hq.execute("UPDATE items SET name = 'fine!' WHERE id = 3")       # and the stream goes on as JSON
    r = b.cli("run", "--once")
    assert r.returncode == 0 and "applied 1 set-aside change" in r.stderr, r.stderr
    assert waiting(branch_a) == {}
    assert [tuple(r) for r in branch_a.execute("SELECT id, name, price, shelf FROM items ORDER BY id")] == \
        [(1, "first", 1, "front"), (2, "expensive", 5000, "front"), (3, "fine!", 3, "front")]
    assert b.cli("verify").returncode == 0


def test_a_row_kept_as_a_record_by_an_older_replicator_applies_when_the_table_reads_it(world, hq, branch_a):
    """Set-aside rows an older replicator kept as binary records are read through the
    table's row type while it still fits."""
    b = world
    hq.execute("INSERT INTO items VALUES (2, 'expensive', 5000, 'B'), (4, 'pricey', 4000, 'D')")
    assert b.cli("run", "--once").returncode == 0
    assert set(waiting(branch_a)) == {"2", "4"}
    # what an older replicator stored: the record itself, no image
    branch_a.execute("""UPDATE replication.set_aside a SET image = NULL,
                               record = pg_catalog.record_send(i) FROM (VALUES (2, 'expensive', 5000, 'B'),
                               (4, 'pricey', 4000, 'D')) AS v(id, name, price, code),
                               LATERAL (SELECT (v.id, v.name, v.price, v.code)::items AS i) r
                         WHERE a.key = v.id::text""")
    assert branch_a.scalar("SELECT count(*) FROM replication.set_aside WHERE image IS NULL") == 2
    branch_a.execute("ALTER TABLE items DROP CONSTRAINT cheap")
    r = b.cli("run", "--once")
    assert r.returncode == 0 and "applied 2 set-aside changes" in r.stderr, r.stderr
    assert waiting(branch_a) == {} and ids(branch_a) == [1, 2, 4]


def test_a_record_the_table_can_no_longer_read_waits_named_until_repaired(world, hq, branch_a):
    b = world
    hq.execute("INSERT INTO items VALUES (2, 'expensive', 5000, 'B')")
    assert b.cli("run", "--once").returncode == 0
    branch_a.execute("UPDATE replication.set_aside SET image = NULL, record = pg_catalog.record_send("
                     "(2, 'expensive', 5000, 'B')::items)")
    branch_a.execute("ALTER TABLE items DROP CONSTRAINT cheap, ADD COLUMN shelf text")   # four fields no more
    r = b.cli("run", "--once")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert set(waiting(branch_a)) == {"2"} and ids(branch_a) == [1]
    r = b.cli("status")
    assert r.returncode == 1 and "public.items key 2: cheap:" in r.stdout, r.stdout
    assert b.cli("verify", "--repair").returncode == 0
    assert waiting(branch_a) == {} and ids(branch_a) == [1, 2]


BRANCH_ONLY_RULES = {
    # kind: (the branch's own rule, written as its DBA would, and the SQLSTATE it refuses with)
    # a foreign key the branch enforces with an ENABLE ALWAYS trigger (replica mode keeps
    # plain foreign keys quiet): the item's code must be one this store's shelves know
    "enable always fk": ("""
        CREATE TABLE shelf_codes (code text PRIMARY KEY);
        INSERT INTO shelf_codes VALUES ('A'), ('B'), ('E');
        CREATE FUNCTION known_code() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT EXISTS (SELECT FROM shelf_codes WHERE code = NEW.code) THEN
                RAISE EXCEPTION 'code % is not on this store''s shelves', NEW.code
                    USING ERRCODE = 'foreign_key_violation';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER known_code BEFORE INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION known_code();
        ALTER TABLE items ENABLE ALWAYS TRIGGER known_code;""", "23503"),
    # a value too long for a branch column: the store's label printer queue holds 3-letter codes
    "value too long": ("""
        CREATE TABLE labels (item_id int, code varchar(3));
        CREATE FUNCTION queue_label() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO labels VALUES (NEW.id, NEW.code);
            RETURN NEW;
        END $$;
        CREATE TRIGGER queue_label AFTER INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION queue_label();
        ALTER TABLE items ENABLE ALWAYS TRIGGER queue_label;""", "22001"),
}


@pytest.mark.parametrize("kind", list(BRANCH_ONLY_RULES))
def test_each_further_refusal_kind_on_a_branch_sets_the_row_aside(world, hq, branch_a, kind):
    """A foreign key an ENABLE ALWAYS trigger enforces, a value too long for a branch column:
    the refused row waits with its SQLSTATE, the rest of its chunk applies, the fix clears it."""
    b = world
    rule, sqlstate = BRANCH_ONLY_RULES[kind]
    branch_a.execute(rule)
    hq.execute("INSERT INTO items VALUES (2, 'two', 2, 'B'), (3, 'three', 3, 'ZZZZ'), (5, 'five', 5, 'E')")
    r = b.cli("run", "--once")
    assert r.returncode == 0 and "1 set aside" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert ids(branch_a) == [1, 2, 5]
    assert {k: v[2] for k, v in waiting(branch_a).items()} == {"3": sqlstate}
    r = b.cli("status")
    assert r.returncode == 1 and "public.items key 3:" in r.stdout, r.stdout
    branch_a.execute("INSERT INTO shelf_codes VALUES ('ZZZZ')" if kind == "enable always fk"
                     else "ALTER TABLE labels ALTER COLUMN code TYPE text")
    r = b.cli("set-aside", "retry")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ids(branch_a) == [1, 2, 3, 5] and waiting(branch_a) == {}
