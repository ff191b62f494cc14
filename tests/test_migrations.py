"""Migrations as the design reads: numbered files hold tables, indexes, roles and grants and run
once each; each function is one file, re-created when its text changes; hooks.sql creates the
objects that call functions.  A database upgraded from the last release that kept its functions
inside the numbered migrations holds exactly what a fresh install gives."""
from __future__ import annotations

import pytest

from replicator import db as dbmod
from tests.harness import FUNCTIONS_IN_MIGRATIONS, file_at, make_setup, migrations_at

SCHEMA = "CREATE TABLE items (id int PRIMARY KEY, name text);"
CATALOGS = {"items": {"label": "Items", "default": True, "tables": ["items"]}}

# What a side's migrations leave in a database, in forms that do not depend on oids or on the
# order objects were created in.
CATALOG_QUERIES = {
    "functions": "SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), p.proacl::text, "
                 "obj_description(p.oid, 'pg_proc') FROM pg_proc p "
                 "WHERE p.pronamespace = 'replication'::regnamespace ORDER BY 1",
    "columns": "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
               "pg_get_expr(d.adbin, d.adrelid), a.attcompression, a.attstorage, a.attacl::text "
               "FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
               "LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum "
               "WHERE c.relnamespace = 'replication'::regnamespace ORDER BY 1, 2",
    "relations": "SELECT relname, relkind, relacl::text, relrowsecurity FROM pg_class "
                 "WHERE relnamespace = 'replication'::regnamespace ORDER BY 1",
    "indexes": "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
               "WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'replication'::regnamespace) "
               "ORDER BY 1",
    "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated "
                   "FROM pg_constraint WHERE connamespace = 'replication'::regnamespace ORDER BY 1, 2",
    "policies": "SELECT polname, polcmd, polroles::regrole[]::text, pg_get_expr(polqual, polrelid), "
                "pg_get_expr(polwithcheck, polrelid) FROM pg_policy ORDER BY 1",
    "triggers": "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger "
                "WHERE NOT tgisinternal ORDER BY 1, 2",
    "event triggers": "SELECT evtname, evtevent, evtfoid::regproc::text, evttags::text FROM pg_event_trigger",
    "schema": "SELECT nspacl::text FROM pg_namespace WHERE nspname = 'replication'",
}


def _catalog(database) -> dict:
    return {what: database.execute(query) for what, query in CATALOG_QUERIES.items()}


def _install_old_release(database, side: str, upto: int) -> None:
    """`side` as the release at FUNCTIONS_IN_MIGRATIONS left it after its migration `upto`."""
    database.execute(file_at(FUNCTIONS_IN_MIGRATIONS, "sql/versions.sql"))
    for version, name, text in migrations_at(FUNCTIONS_IN_MIGRATIONS, side):
        if version <= upto:
            database.execute(text)
            database.execute("INSERT INTO replication.versions (side, version, name) VALUES (%s, %s, %s)",
                             (side, version, name))


@pytest.mark.parametrize("side,upto", [("capture", 1), ("capture", 5), ("capture", 14), ("target", 3)])
def test_an_upgraded_database_holds_what_a_fresh_install_gives(hq, branch_a, side, upto):
    _install_old_release(hq, side, upto)
    with hq.connect() as conn:
        applied = dbmod.migrate(conn, side)
    assert [name for name, _ in dbmod.repeatables(side)] == [m for m in applied if not m[:1].isdigit()]
    with branch_a.connect() as conn:
        dbmod.migrate(conn, side)
    upgraded, fresh = _catalog(hq), _catalog(branch_a)
    for what in CATALOG_QUERIES:
        assert upgraded[what] == fresh[what], what
    assert len(fresh["functions"]) == sum(line.startswith("CREATE OR REPLACE FUNCTION")
                                          for _, text in dbmod.repeatables(side) for line in text.splitlines())


def test_numbered_migrations_name_no_function_and_each_function_has_one_file():
    """A function defined in a numbered migration would run before functions/ re-creates it
    (and its old text would come back as a copy): they stay in functions/, one name per file."""
    for side in dbmod.SIDES:
        for version, name, text in dbmod.migrations(side):
            assert "CREATE FUNCTION" not in text and "CREATE OR REPLACE FUNCTION" not in text, (side, name)
            assert "EXECUTE FUNCTION" not in text, (side, name)
        for name, text in dbmod.repeatables(side):
            if name.startswith("functions/"):
                defined = {line.split("(")[0].split(".")[-1] for line in text.splitlines()
                           if line.startswith("CREATE OR REPLACE FUNCTION")}
                assert defined == {name.removeprefix("functions/").removesuffix(".sql")}, name


def test_a_function_whose_text_changed_is_re_created_by_the_next_install_and_only_it(tmp_path, hq):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA)
    definition = "SELECT pg_get_functiondef('replication.catalog_role(text)'::regprocedure)"
    before = hq.scalar(definition)
    hq.execute("CREATE OR REPLACE FUNCTION replication.catalog_role(p_catalog text) RETURNS name "
               "LANGUAGE sql IMMUTABLE AS $$ SELECT 'stale'::name $$")
    hq.execute("UPDATE replication.repeatables SET checksum = 'older text' "
               "WHERE side = 'capture' AND name = 'functions/catalog_role.sql'")
    others = hq.execute("SELECT name, applied_at FROM replication.repeatables "
                        "WHERE name <> 'functions/catalog_role.sql' ORDER BY 1")
    assert s.install().migrations == ["functions/catalog_role.sql"]
    assert hq.scalar(definition) == before
    assert hq.execute("SELECT name, applied_at FROM replication.repeatables "
                      "WHERE name <> 'functions/catalog_role.sql' ORDER BY 1") == others
    assert s.install().migrations == []


def test_a_branch_stops_with_one_line_at_an_hq_missing_a_function_of_this_release(tmp_path, hq, branch_a):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    a = s.add_branch("a", branch_a)
    hq.execute("DELETE FROM replication.repeatables WHERE name = 'functions/probe.sql'")
    r = a.cli("init")
    assert r.returncode == 1
    assert r.stderr == ("error: HQ replication schema is out of date (missing functions/probe.sql); "
                        "run `replicator hq install -c hq.yaml`\n"), r.stderr
    assert branch_a.scalar("SELECT to_regnamespace('replication')") is None
    r = s.install()
    assert r.migrations == ["functions/probe.sql"]
    assert a.cli("init").returncode == 0
