"""Read-only catalogs on a branch: local writes are refused with a message naming
the catalog, the replicator's own writes pass, and `replicator release` frees
the tables of a deselected catalog."""
from __future__ import annotations

import psycopg
import pytest
import yaml

from tests.harness import assert_same, make_setup

SCHEMA = """
CREATE TABLE public.items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL DEFAULT 0);
CREATE TABLE public.kits (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE public.kit_parts (kit_id int REFERENCES public.kits, item_id int, qty int NOT NULL,
                               PRIMARY KEY (kit_id, item_id));
"""
CATALOGS = {
    "items": {"label": "Artículos", "default": True, "tables": ["public.items"]},
    "kits": {"label": "Kits", "tables": ["public.kits", "public.kit_parts"]},
}
FILL = """
INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 50) g;
INSERT INTO kits SELECT g, 'kit ' || g FROM generate_series(1, 5) g;
INSERT INTO kit_parts SELECT k, i, 1 FROM generate_series(1, 5) k, generate_series(1, 3) i;
"""
LOCAL_WRITES = {
    "INSERT": "INSERT INTO {t} (id, name) VALUES (1000, 'local')",
    "UPDATE": "UPDATE {t} SET name = 'local' WHERE id = 1",
    "DELETE": "DELETE FROM {t} WHERE id = 2",
    "TRUNCATE": "TRUNCATE {t} CASCADE",
}


def _message(table: str, catalog: str) -> str:
    return (f"table {table} belongs to catalog {catalog}, which is replicated from HQ and read-only here; "
            "change it at HQ")


def _set_catalogs(branch, catalogs) -> None:
    doc = yaml.safe_load(branch.path.read_text())
    if catalogs is None:
        doc.pop("catalogs", None)
    else:
        doc["catalogs"] = catalogs
    branch.path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _guards(db) -> list[tuple]:
    return db.execute("SELECT tgrelid::regclass::text, pg_get_triggerdef(oid) FROM pg_trigger "
                      "WHERE tgname = 'replicator_guard' ORDER BY 1") or []


@pytest.fixture
def setup(tmp_path, hq, branch_a):
    s = make_setup(tmp_path, hq, CATALOGS, SCHEMA, [branch_a])
    hq.execute(FILL)
    return s


def test_guard_rejects_local_writes_and_replication_passes(setup, hq, branch_a):
    b = setup.add_branch("store-1", branch_a, catalogs=["items", "kits"])
    b.init()
    guards = _guards(branch_a)
    assert [g[0] for g in guards] == ["items", "kit_parts", "kits"]
    assert all("BEFORE INSERT OR DELETE OR UPDATE OR TRUNCATE" in g[1] and "FOR EACH STATEMENT" in g[1]
               for g in guards), guards

    for op, stmt in LOCAL_WRITES.items():
        with branch_a.connect() as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
                conn.execute(stmt.format(t="public.items"))
            assert exc.value.diag.message_primary == _message("public.items", "items"), op
            assert "replicator release -c branch.yaml items" in exc.value.diag.message_hint
    with branch_a.connect() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege, match="catalog kits"):
        conn.execute("INSERT INTO kit_parts VALUES (1, 99, 1)")
    assert branch_a.scalar("SELECT count(*) FROM items") == 50      # nothing changed

    # The replicator's writes pass the guard: stream every kind of change, re-copy with --force.
    hq.execute("UPDATE items SET price = price + 1 WHERE id <= 10")
    hq.execute("INSERT INTO items VALUES (51, 'new', 5)")
    hq.execute("DELETE FROM items WHERE id = 50")
    hq.execute("TRUNCATE kit_parts")
    hq.execute("INSERT INTO kit_parts VALUES (1, 7, 2)")
    b.run_once()
    for t in ("items", "kits", "kit_parts"):
        assert_same(hq, branch_a, t)
    hq.execute("UPDATE kits SET name = upper(name)")
    b.init("kits", force=True)
    assert_same(hq, branch_a, "kits")
    assert len(_guards(branch_a)) == 3


def test_run_guards_a_catalog_it_streams_without_init(setup, hq, branch_a):
    b = setup.add_branch("store-1", branch_a, catalogs=["items", "kits"])
    b.init("items")
    assert [g[0] for g in _guards(branch_a)] == ["items"]
    b.run_once()            # kits streams from now on, never initialized: still read-only here
    assert [g[0] for g in _guards(branch_a)] == ["items", "kit_parts", "kits"]
    with branch_a.connect() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege, match="catalog kits"):
        conn.execute("DELETE FROM kits")


def test_release_frees_a_deselected_catalog(setup, hq, branch_a):
    b = setup.add_branch("store-1", branch_a, catalogs=["items", "kits"])
    b.init()

    refused = b.cli("release", "kits")
    assert refused.returncode == 2, refused
    assert refused.stderr.strip() == (
        f"error: {b.path}: catalogs: catalog kits is still selected; remove it from catalogs: first, "
        "then release it")
    assert len(_guards(branch_a)) == 3

    _set_catalogs(b, ["items"])
    done = b.cli("release", "kits")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("released kits: public.kit_parts, public.kits "
                                   "(writable here; no longer updated from HQ)")
    assert [g[0] for g in _guards(branch_a)] == ["items"]
    assert branch_a.scalar("SELECT array_agg(table_name ORDER BY 1)::text FROM replication.target_tables") == "{items}"
    branch_a.execute("INSERT INTO kits VALUES (100, 'local kit')")          # writable again
    branch_a.execute("DELETE FROM kit_parts WHERE kit_id = 2")
    with branch_a.connect() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM items")                                   # items still guarded

    again = b.cli("release", "kits")
    assert again.returncode == 2
    assert "catalog kits has no read-only or initialized tables on this branch; nothing to release" in again.stderr

    # Taking the catalog back starts with a fresh init, no --force needed.
    hq.execute("UPDATE kits SET name = name || '!'")
    b.run_once()
    assert branch_a.scalar("SELECT count(*) FROM kits WHERE name LIKE '%!'") == 0   # not replicated now
    _set_catalogs(b, ["items", "kits"])
    b.init("kits")
    for t in ("kits", "kit_parts"):
        assert_same(hq, branch_a, t)


def test_release_refuses_a_default_catalog(setup, branch_a):
    b = setup.add_branch("store-1", branch_a)          # no catalogs: -> HQ's defaults (items)
    b.init()
    refused = b.cli("release", "items")
    assert refused.returncode == 2
    assert "catalog items is selected by default (the file has no catalogs: list)" in refused.stderr
    assert [g[0] for g in _guards(branch_a)] == ["items"]


def test_deselected_catalog_needs_a_fresh_init_not_a_silent_gap(setup, hq, branch_a):
    b = setup.add_branch("store-1", branch_a, catalogs=["items", "kits"])
    b.init()
    _set_catalogs(b, ["items"])
    b.run_once()                # kits no longer streamed: its copy goes stale, its init is forgotten
    assert branch_a.scalar("SELECT array_agg(table_name ORDER BY 1)::text FROM replication.target_tables") == "{items}"
    assert [g[0] for g in _guards(branch_a)] == ["items", "kit_parts", "kits"]    # read-only until release
    hq.execute("UPDATE kits SET name = 'missed ' || id")
    hq.execute("INSERT INTO items VALUES (77, 'seventy-seven', 7)")
    b.run_once()

    _set_catalogs(b, ["items", "kits"])
    b.init("kits")              # no --force needed: the old copy no longer counts
    hq.execute("UPDATE kits SET name = 'after ' || id WHERE id <= 2")
    b.run_once()
    for t in ("items", "kits", "kit_parts"):
        assert_same(hq, branch_a, t)
