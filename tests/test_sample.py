"""The sample POS database that the demo and the other tests replicate.

Checks that the schema matches config/hq.yaml, that the generator is fast,
complete, consistent and deterministic, that hostile text survives a round
trip, and that the live change stream keeps the data consistent.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import yaml
from psycopg import sql

from replicator import sample, sample_changes

HQ_YAML = Path(__file__).resolve().parent.parent / "config" / "hq.yaml"

# the catalogs a POS chain runs: catalog id -> (label, updated by default)
CATALOGS = {
    "customers": ("Clientes", True), "registers": ("Cajas", False), "stores": ("Tiendas", False),
    "policies": ("Políticas", True), "departments": ("Departamentos", False),
    "lines": ("Líneas", False), "currencies": ("Monedas", True), "taxes": ("Impuestos", False),
    "categories": ("Categorías", False), "items": ("Artículos", True),
    "stock": ("Existencias", True), "kits": ("Kits", False), "devices": ("Dispositivos", False),
    "payment_methods": ("Formas de pago", False), "users": ("Usuarios", False),
}


@pytest.fixture
def conn(hq):
    """An autocommit connection to HQ loaded with the tiny sample."""
    with hq.connect() as conn:
        sample.load_schema(conn)
        sample.generate(conn, "tiny")
        yield conn


def fingerprint(conn) -> dict[str, str]:
    """md5 of every sample table's rows in key-independent order."""
    return {t: conn.execute(sql.SQL("SELECT md5(string_agg(x::text, '|' ORDER BY x::text)) FROM {} AS x")
                            .format(sql.Identifier("public", t))).fetchone()[0]
            for t in sample.TABLES}


def broken_foreign_keys(conn) -> list[str]:
    """Every FK in schema public whose child rows point at a missing parent row."""
    fks = conn.execute("""
        SELECT con.conname, con.conrelid::regclass::text, con.confrelid::regclass::text,
               array_agg(ca.attname ORDER BY k.n), array_agg(pa.attname ORDER BY k.n)
          FROM pg_constraint con
         CROSS JOIN LATERAL unnest(con.conkey, con.confkey) WITH ORDINALITY AS k(child, parent, n)
          JOIN pg_attribute ca ON ca.attrelid = con.conrelid AND ca.attnum = k.child
          JOIN pg_attribute pa ON pa.attrelid = con.confrelid AND pa.attnum = k.parent
         WHERE con.contype = 'f' AND con.connamespace = 'public'::regnamespace
         GROUP BY con.oid, con.conname, con.conrelid, con.confrelid
    """).fetchall()
    assert len(fks) >= 25, fks
    broken = []
    for name, child, parent, ccols, pcols in fks:
        query = sql.SQL("SELECT count(*) FROM {child} AS c WHERE {notnull} AND NOT EXISTS"
                        " (SELECT FROM {parent} AS p WHERE {match})").format(
            child=sql.SQL(child), parent=sql.SQL(parent),   # regclass text: already quoted
            notnull=sql.SQL(" AND ").join(sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(c))
                                          for c in ccols),
            match=sql.SQL(" AND ").join(sql.SQL("p.{} = c.{}").format(sql.Identifier(p), sql.Identifier(c))
                                        for c, p in zip(ccols, pcols)))
        if conn.execute(query).fetchone()[0]:
            broken.append(name)
    return broken


# ------------------------------------------------------------------ config

def test_hq_yaml_lists_the_fifteen_catalogs_of_the_design():
    cfg = yaml.safe_load(HQ_YAML.read_text(encoding="utf-8"))
    assert cfg["dsn"] == "${REPLICATOR_HQ_DSN}"
    assert cfg["retention"] == "7d"
    assert list(cfg["catalogs"]) == list(CATALOGS)
    for name, (label, default) in CATALOGS.items():
        cat = cfg["catalogs"][name]
        assert cat["label"] == label
        assert cat.get("default", False) is default, name
    assert cfg["catalogs"]["users"]["exclude_columns"] == {"public.users": ["password_hash"]}
    for name in ("stock", "registers", "devices"):
        assert cfg["catalogs"][name]["filter"] == "store_id = :store_id"


def test_every_configured_table_exists_with_its_filter_and_excluded_columns(hq):
    cfg = yaml.safe_load(HQ_YAML.read_text(encoding="utf-8"))
    with hq.connect() as conn:
        sample.load_schema(conn)
        configured = set()
        for name, cat in cfg["catalogs"].items():
            for table in cat["tables"]:
                configured.add(table)
                assert conn.execute(
                    "SELECT EXISTS (SELECT FROM pg_constraint WHERE contype = 'p' AND conrelid = %s::regclass)",
                    (table,)).fetchone()[0], f"{table} has no primary key"
                columns = {r[0] for r in conn.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
                    " AND NOT attisdropped", (table,))}
                if "filter" in cat:
                    assert "store_id" in columns, table
                for col in cat.get("exclude_columns", {}).get(table, []):
                    assert col in columns, (table, col)
        # Every sample table is a catalog table, except the sales that flow back.
        assert configured == {f"public.{t}" for t in sample.TABLES} - {"public.sales", "public.sale_lines"}


# ---------------------------------------------------------------- generate

def test_tiny_loads_in_under_a_second_with_the_promised_counts(hq):
    spec = sample.SIZES["tiny"]
    with hq.connect() as conn:
        started = time.perf_counter()
        sample.load_schema(conn)
        counts = sample.generate(conn, "tiny")
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0, f"tiny sample took {elapsed:.2f}s"
        assert counts == sample.table_counts(conn)
        per_store = dict(conn.execute("SELECT store_id, count(*) FROM public.stock GROUP BY 1").fetchall())
    assert all(n > 0 for n in counts.values()), counts
    assert (counts["stores"], counts["items"], counts["customers"], counts["users"]) == \
        (spec.stores, spec.items, spec.customers, spec.users)
    assert counts["registers"] == spec.stores * spec.registers_per_store
    assert counts["currencies"] == len(sample.CURRENCIES)
    assert counts["price_policies"] == spec.policies
    assert counts["kits"] == spec.kits
    assert set(per_store) == set(range(1, spec.stores + 1))
    assert 0.75 * spec.stores * spec.items <= counts["stock"] <= spec.stores * spec.items


def test_generated_rows_satisfy_every_foreign_key(conn):
    assert broken_foreign_keys(conn) == []
    # Things the FKs alone do not say.
    assert conn.execute("SELECT count(*) FROM public.items i WHERE NOT EXISTS"
                        " (SELECT FROM public.item_prices p WHERE p.item_id = i.id AND p.policy_id = 1)"
                        ).fetchone()[0] == 0, "every item has a list price"
    assert conn.execute("SELECT count(*) FROM public.items i WHERE NOT EXISTS"
                        " (SELECT FROM public.item_barcodes b WHERE b.item_id = i.id AND b.is_primary)"
                        ).fetchone()[0] == 0, "every item has a primary barcode"
    assert conn.execute("SELECT count(*) FROM public.sales s WHERE total <> (SELECT round(sum(quantity * price), 2)"
                        " FROM public.sale_lines l WHERE (l.register_id, l.folio) = (s.register_id, s.folio))"
                        ).fetchone()[0] == 0, "sale totals add up"
    assert conn.execute("SELECT count(*) FROM public.users WHERE password_hash = ''").fetchone()[0] == 0


def test_identity_sequences_continue_after_the_generated_ids(conn):
    new_id = conn.execute("INSERT INTO public.customers (code, name) VALUES ('X1', 'Nuevo') RETURNING id"
                          ).fetchone()[0]
    assert new_id == sample.SIZES["tiny"].customers + 1


def test_same_seed_same_data_other_seed_other_data(conn):
    first = fingerprint(conn)

    def reload(seed):
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
        sample.load_schema(conn)
        sample.generate(conn, "tiny", seed=seed)
        return fingerprint(conn)

    assert reload(42) == first
    other = reload(7)
    assert other["items"] != first["items"] and other["stock"] != first["stock"]


def test_generate_refuses_tables_that_already_hold_data(conn):
    with pytest.raises(ValueError, match="already hold data"):
        sample.generate(conn, "tiny")


def test_hostile_text_survives_the_round_trip(conn):
    names = [r[0] for r in conn.execute("SELECT name FROM public.items WHERE id <= %s ORDER BY id",
                                        (len(sample.HOSTILE_ITEM_NAMES),))]
    assert names == sample.HOSTILE_ITEM_NAMES
    assert conn.execute("SELECT tags FROM public.items WHERE id = 1").fetchone()[0] == sample.HOSTILE_ITEM_TAGS
    customers = [r[0] for r in conn.execute("SELECT name FROM public.customers WHERE id BETWEEN 2 AND %s ORDER BY id",
                                            (len(sample.HOSTILE_CUSTOMER_NAMES) + 1,))]
    assert customers == sample.HOSTILE_CUSTOMER_NAMES
    thumb = conn.execute("SELECT thumbnail FROM public.items WHERE id = 2").fetchone()[0]
    assert thumb.startswith(b"\x89PNG") and b"\x00\\'" in thumb
    # jsonb keeps numeric scale: 0.250 must stay 0.250 (a float round trip gives 0.25)
    assert conn.execute("SELECT settings->>'tara_kg' FROM public.devices WHERE kind = 'scale' LIMIT 1"
                        ).fetchone()[0] == "0.250"
    # the generated column is computed by PostgreSQL, from the hostile name too
    assert conn.execute("SELECT search_key FROM public.customers WHERE id = 2").fetchone()[0].startswith("o'brien")


def test_sql_and_python_barcodes_agree_and_are_ean13(conn):
    for barcode, item in conn.execute("SELECT barcode, item_id FROM public.item_barcodes WHERE is_primary"):
        assert barcode == sample.ean13(f"750{item:09d}")
    assert sample.ean13("750103131130") == "7501031311309"   # a real Mexican EAN-13


def test_sizes_promised_for_the_demo():
    demo = sample.SIZES["demo"]
    assert demo.stores >= 10 and demo.items >= 50_000 and demo.customers >= 20_000
    assert demo.stock_rows == demo.stores * demo.items >= 500_000
    assert sample.SIZES["tiny"].stores == 3 and sample.SIZES["tiny"].items == 50
    assert (sample.SIZES["small"].stores, sample.SIZES["small"].items) == (5, 2_000)


# ---------------------------------------------------------- random changes

def test_random_changes_commit_small_consistent_transactions(hq, conn):
    before = sample.table_counts(conn)
    changed = sample_changes.random_changes(conn, 300, random.Random(5))
    assert changed >= 250           # almost every change touches at least one row
    with hq.connect() as other:     # committed: visible from another session
        after = sample.table_counts(other)
        assert broken_foreign_keys(other) == []
    assert after["items"] > before["items"] and after["customers"] > before["customers"]


def test_a_new_item_arrives_with_price_barcode_and_stock_everywhere(conn):
    with conn.transaction():
        changed = sample_changes._new_item(conn, random.Random(4), sample_changes._load_shop(conn))
    item = conn.execute("SELECT max(id) FROM public.items").fetchone()[0]
    assert item == sample.SIZES["tiny"].items + 1
    stores = conn.execute("SELECT count(*) FROM public.stores WHERE active").fetchone()[0]
    assert conn.execute("SELECT count(*) FROM public.stock WHERE item_id = %s", (item,)).fetchone()[0] == stores
    assert conn.execute("SELECT barcode FROM public.item_barcodes WHERE item_id = %s", (item,)
                        ).fetchone()[0] == sample.ean13(f"750{item:09d}")
    assert changed == 3 + stores


def test_a_stock_row_can_move_to_another_store(conn):
    """UPDATE stock SET store_id = ...: the row leaves one branch's filter and enters another's."""
    query = "SELECT store_id, item_id, quantity FROM public.stock"
    before = {(s, i): q for s, i, q in conn.execute(query)}
    with conn.transaction():
        changed = sample_changes._stock_row_moved(conn, random.Random(3), sample_changes._load_shop(conn))
    after = {(s, i): q for s, i, q in conn.execute(query)}
    (src, item), = set(before) - set(after)
    (dst, moved), = [k for k in after if before.get(k) != after[k]]
    assert moved == item and dst != src
    assert after[dst, item] == before[src, item] + before.get((dst, item), 0)
    assert changed == 1 + ((dst, item) in before)


def test_random_changes_wants_an_idle_connection(hq, conn):
    with hq.connect(autocommit=False) as busy:
        busy.execute("SELECT 1")
        with pytest.raises(ValueError, match="idle connection"):
            sample_changes.random_changes(busy, 1, random.Random(1))


def test_random_sales_use_the_next_folio_of_each_register(conn):
    written = sample_changes.random_sales(conn, 12, random.Random(9), store_id=2)
    assert written > 12
    rows = conn.execute("""
        SELECT register_id, array_agg(folio ORDER BY folio), bool_and(store_id = 2 OR folio <= %s)
          FROM public.sales GROUP BY register_id
    """, (sample.SIZES["tiny"].sales_per_register,)).fetchall()
    for register, folios, own_store in rows:
        assert folios == list(range(1, len(folios) + 1)), register
        assert own_store
    assert conn.execute("SELECT count(*) FROM public.sales WHERE store_id = 2").fetchone()[0] == \
        sample.SIZES["tiny"].registers_per_store * sample.SIZES["tiny"].sales_per_register + 12
