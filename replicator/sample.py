"""The sample point-of-sale database: schema and deterministic data.

The shipped ``config/hq.yaml`` describes the catalogs of this schema, and the
demo and the tests need an HQ that looks like a real chain's: thousands of
items, stock for every store, Spanish names with accents, and the odd value a
cashier types that breaks naive code.  This module builds that database.

* :func:`load_schema` creates the tables (``sql/sample/pos_schema.sql``), and
  :func:`load_hq_rules` HQ's own trigger on consolidated sales (``hq_rules.sql``).
* :func:`generate` fills them, set-based and deterministic: every value is a
  function of ``(seed, column, row number)`` through ``md5``, never of
  ``random()`` or of plan order, so the same seed gives byte-identical tables
  on any machine and a test can name the row it expects.
* the live changes, HQ's back office at work and a branch's tills, are in
  ``sample_changes.py``.

Run :func:`generate` before ``replicator hq install`` when you want a quick
load: afterwards every row would also be written to the change log.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .db import SQL_DIR

log = logging.getLogger(__name__)

SCHEMA_FILE = SQL_DIR / "sample" / "pos_schema.sql"
HQ_RULES_FILE = SQL_DIR / "sample" / "hq_rules.sql"

#: Every table of the sample schema, parents before children.
TABLES = (
    "stores", "registers", "price_policies", "departments", "product_lines", "currencies",
    "exchange_rates", "taxes", "categories", "items", "item_prices", "item_barcodes", "stock",
    "kits", "kit_components", "devices", "payment_methods", "users", "customers",
    "sales", "sale_lines",
)


@dataclass(frozen=True)
class SampleSize:
    """How big a generated chain is.  Row counts are exact unless noted."""

    stores: int
    items: int
    customers: int
    users: int
    registers_per_store: int
    categories: int
    lines_per_department: int     # product lines in each of the 12 departments
    policies: int                 # price policies, at most len(POLICIES)
    kits: int
    rate_days: int                # days of exchange rates per foreign currency
    sales_per_register: int
    stock_coverage: float         # share of items each store stocks (1.0: all of them)

    @property
    def stock_rows(self) -> int:
        """Expected stock rows (exact when stock_coverage is 1.0)."""
        return round(self.stores * self.items * min(self.stock_coverage, 1.0))


SIZES: dict[str, SampleSize] = {
    # unit tests: loads in well under a second
    "tiny": SampleSize(stores=3, items=50, customers=30, users=10, registers_per_store=2,
                       categories=8, lines_per_department=2, policies=3, kits=3, rate_days=7,
                       sales_per_register=5, stock_coverage=0.9),
    # integration tests and a quick demo
    "small": SampleSize(stores=5, items=2_000, customers=1_000, users=40, registers_per_store=3,
                        categories=40, lines_per_department=4, policies=5, kits=40, rate_days=30,
                        sales_per_register=50, stock_coverage=0.9),
    # the demo: a chain big enough that set-based apply and indexed reads matter
    "demo": SampleSize(stores=10, items=50_000, customers=20_000, users=200,
                       registers_per_store=6, categories=200, lines_per_department=10,
                       policies=8, kits=500, rate_days=365, sales_per_register=200,
                       stock_coverage=1.0),
}

# ------------------------------------------------------------ reference data
# Small fixed tables, written as Python data so they are easy to read and to
# change.  Row i gets id i.

CURRENCIES = [  # code, name, symbol, decimals, MXN per unit (seed of the rate series)
    ("MXN", "Peso mexicano", "$", 2, None),
    ("USD", "Dólar estadounidense", "US$", 2, 17.25),
    ("EUR", "Euro", "€", 2, 18.70),
    ("CAD", "Dólar canadiense", "C$", 2, 12.60),
    ("GTQ", "Quetzal guatemalteco", "Q", 2, 2.21),
    ("JPY", "Yen japonés", "¥", 0, 0.1152),
    ("CLF", "Unidad de Fomento (Chile)", "UF", 4, 702.5),
]
TAXES = [  # name, kind, rate (percent), included in price
    ("IVA 16%", "IVA", 16, True),
    ("IVA 8% región fronteriza", "IVA", 8, True),
    ("IVA 0%", "IVA", 0, True),
    ("IEPS 8% alimentos de alta densidad calórica", "IEPS", 8, True),
    ("IEPS 26.5% bebidas alcohólicas", "IEPS", 26.5, True),
    ("Exento", "EXENTO", 0, False),
]
DEPARTMENTS = [  # code, name
    ("ABA", "Abarrotes"), ("BEB", "Bebidas"), ("LAC", "Lácteos y huevo"),
    ("CAR", "Carnes y salchichonería"), ("FYV", "Frutas y verduras"),
    ("PAN", "Panadería y tortillería"), ("LIM", "Limpieza del hogar"),
    ("HIG", "Higiene y belleza"), ("MAS", "Mascotas"), ("ELE", "Electrónica"),
    ("FER", "Ferretería"), ("PAP", 'Papelería y "oficina"'),
]
LINE_NAMES = ["Básicos", "Marca propia", "Premium", "Importados", "Orgánicos", "Económica",
              "Temporada", "Granel", "Institucional", "Gourmet"]
POLICIES = [  # name, discount %, min quantity, priority, valid from, valid to
    ("Precio de lista", 0, 1, 0, "2020-01-01", None),
    ("Mayoreo", 8.5, 12, 10, "2020-01-01", None),
    ("Empleados", 15, 1, 20, "2021-03-01", None),
    ("Cliente frecuente", 5, 1, 5, "2022-01-01", None),
    ("Buen Fin 2024", 20, 1, 50, "2024-11-15", "2024-11-18"),
    ("Liquidación", 40, 1, 40, "2024-01-01", "2025-12-31"),
    ("Temporada navideña", 10, 1, 30, "2024-12-01", "2025-01-06"),
    ("Precio frontera norte", 3, 1, 1, "2023-01-01", None),
]
PAYMENT_METHODS = [  # code, name, requires reference, gives change, currency, max amount
    ("EFE", "Efectivo", False, True, "MXN", None),
    ("TDC", "Tarjeta de crédito", True, False, "MXN", None),
    ("TDD", "Tarjeta de débito", True, False, "MXN", None),
    ("VAL", "Vales de despensa", True, True, "MXN", 5000),
    ("USD", "Dólares en efectivo", False, True, "USD", 500),
    ("TRF", "Transferencia (SPEI)", True, False, "MXN", None),
    ("CRE", "Crédito a cliente", True, False, "MXN", None),
]

# Word lists for generated names.
CITIES = [("Centro", "America/Mexico_City"), ("Polanco", "America/Mexico_City"),
          ("Monterrey", "America/Monterrey"), ("Guadalajara", "America/Mexico_City"),
          ("Tijuana", "America/Tijuana"), ("Mérida", "America/Merida"),
          ("Cancún", "America/Cancun"), ("Hermosillo", "America/Hermosillo"),
          ("Chihuahua", "America/Chihuahua"), ("Querétaro", "America/Mexico_City"),
          ("León", "America/Mexico_City"), ("Mazatlán", "America/Mazatlan"),
          ("Oaxaca", "America/Mexico_City"), ("Matamoros", "America/Matamoros"),
          ("Coyoacán", "America/Mexico_City")]
STREETS = ["Av. Juárez", "Calle 5 de Mayo", "Blvd. Díaz Ordaz", "Av. Insurgentes Sur",
           "Calle Niños Héroes", "Av. Revolución", "Calzada de Tlalpan", "Paseo de la Reforma"]
FIRST_NAMES = ["José", "María", "Juan", "Guadalupe", "Luis", "Sofía", "Ángel", "Ximena",
               "Jesús", "Renée", "Iñaki", "Begoña", "Chloé", "Zoë", "Óscar", "Paulina",
               "Raúl", "Fernanda", "Héctor", "Mónica"]
LAST_NAMES = ["Hernández", "García", "Martínez", "López", "González", "Pérez", "Rodríguez",
              "Sánchez", "Ramírez", "Cruz", "Núñez", "Ibáñez", "Peña", "Muñoz", "Ortíz",
              "O'Farrill", "Treviño", "Zúñiga", "de la Garza", "Villaseñor"]
COMPANY_KINDS = ["Abarrotes", "Comercializadora", "Distribuidora", "Restaurante", "Papelería",
                 "Farmacia", "Grupo"]
EMAIL_DOMAINS = ["example.com", "correo.example.mx", "ejemplo.com.mx"]
ITEM_NOUNS = ["Refresco", "Jugo", "Leche", "Yogur", "Queso", "Jamón", "Pan", "Galletas",
              "Arroz", "Frijol", "Aceite", "Jabón", "Detergente", "Champú", "Croquetas",
              "Cuaderno", "Pilas", "Foco LED", "Tornillos", "Café", "Azúcar", "Atún",
              "Chiles jalapeños", "Tortillas", "Piñata", "Mole", "Cajeta", "Limón", "Aguacate"]
ITEM_BRANDS = ["Don Chuy", "La Abuelita", "El Güero", "Doña Pepa", "Señorial", "Mañanitas",
               "Ñu", "Sol de Oaxaca", "La Costeñita", "Tío Nacho"]
ITEM_SIZES = ["1 kg", "500 g", "250 g", "600 ml", "1 L", "2 L", "12 pzas", "3 pzas", "355 ml",
              "paquete"]
ITEM_TAGS = ["nuevo", "oferta", "temporada", "importado", "granel", "sin gluten", "orgánico",
             "marca propia"]
CATEGORY_NAMES = ["Despensa", "Bebidas frías", "Niños & Bebés / 0–3 años", "Hogar", "Oficina",
                  "Cuidado personal", "Mascotas", "Temporada"]
CATEGORY_WORDS = ["Básicos", "Especiales", "Importados", "Infantil", "Familiar", "Gourmet",
                  "Saludable", "Económico"]

# Hostile but valid text: quotes, backslashes, emoji, accents, COPY's NULL
# marker, tabs and newlines, printf/format/placeholder syntax, SQL.  Code that
# builds SQL or COPY data by string pasting breaks on these; correct code
# carries them unchanged.
HOSTILE_ITEM_NAMES = [
    "Artículo Ñandú",
    'Pan "dulce" de ½ kg',
    "Cable 3' \\ rojo \\\\ doble",
    "🍺 Cerveza clara ×6 🇲🇽",
    "\\N",
    "Tabla\tcon\ttabuladores",
    "Línea 1\nLínea 2\r\nLínea 3",
    "%s %(name)s {0} $1 :store_id ?",
    "'; DROP TABLE items; --",
    "NULL",
    "  espacios al borde  ",
    "Ĉàfé crème brûlée — «ñ» 日本茶",
]
HOSTILE_ITEM_TAGS = ["a,b", '"comillas"', None, "{}", "ñ", "back\\slash", ""]
HOSTILE_DESCRIPTIONS = [
    "Descripción con\nsalto de línea y \"comillas\" y 'apóstrofos'",
    "C:\\Ventas\\nuevo\\tabla.csv",
    "JSON-ish: {\"a\": [1, 2]} y E'\\x00'",
]
HOSTILE_CUSTOMER_NAMES = [
    "O'Brien \"El Güero\" \\ López",
    "Café Niño 🛒 S. de R.L.",
    "Ana\tTabulada",
    "Renée\nMultilínea",
    "\\N",
    "Robert'); DROP TABLE customers;--",
]
HOSTILE_STORE_NAMES = ['Sucursal "La Ñandú" — Niños Héroes', "Sucursal O'Higgins \\ Norte 🏬"]
HOSTILE_USER_NAME = "Zoë O'Connor \"La Jefa\" \\ 🧾"


# ------------------------------------------------------------------- schema

def load_schema(conn: psycopg.Connection) -> None:
    """Create the sample POS tables in an empty database, in one transaction."""
    with conn.transaction():
        conn.execute(SCHEMA_FILE.read_text(encoding="utf-8"))


def load_hq_rules(conn: psycopg.Connection) -> None:
    """HQ's own rules on consolidated sales (HQ only): sold lines take HQ's stock down."""
    with conn.transaction():
        conn.execute(HQ_RULES_FILE.read_text(encoding="utf-8"))


# ----------------------------------------------------------------- generate

def generate(conn: psycopg.Connection, size: str | SampleSize = "small", seed: int = 42) -> dict[str, int]:
    """Fill every sample table deterministically; return the row count per table.

    All of it happens in one transaction with ``INSERT ... SELECT`` over
    ``generate_series``: per-row Python would take minutes for the demo size.
    The tables must be empty (a fresh :func:`load_schema`), so that generated
    ids, and therefore the data, are the same on every run.
    """
    spec = SIZES[size] if isinstance(size, str) else size
    if not 1 <= spec.policies <= len(POLICIES) or spec.lines_per_department > len(LINE_NAMES):
        raise ValueError(f"size {spec} asks for more policies or product lines than defined")
    if spec.kits > spec.items - 4 or spec.stores < 1 or spec.customers < len(HOSTILE_CUSTOMER_NAMES) + 1:
        raise ValueError(f"size {spec} is too small to be consistent")
    started = time.perf_counter()
    with conn.transaction():
        if conn.execute("SELECT EXISTS (SELECT FROM public.stores)").fetchone()[0]:
            raise ValueError("the sample tables already hold data; generate() needs a fresh load_schema()")
        _create_helpers(conn, seed)
        params = _params(spec)
        _insert_reference_data(conn, spec)
        for name, statement in _STEPS:
            t0 = time.perf_counter()
            cur = conn.execute(statement, params)
            log.debug("sample %s: %d rows in %.2fs", name, cur.rowcount, time.perf_counter() - t0)
        _reset_identities(conn)
        conn.execute("DROP FUNCTION pg_temp.rnd, pg_temp.rint, pg_temp.pick, pg_temp.hex, pg_temp.ean13")
        conn.execute(sql.SQL("ANALYZE {}").format(
            sql.SQL(", ").join(sql.Identifier("public", t) for t in TABLES)))
        counts = table_counts(conn)
    log.info("generated sample data (%d items, %d stock rows) in %.1fs",
             counts["items"], counts["stock"], time.perf_counter() - started)
    return counts


def table_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Exact row count of every sample table."""
    query = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {}, count(*) FROM {}").format(sql.Literal(t), sql.Identifier("public", t))
        for t in TABLES)
    return {name: n for name, n in conn.execute(query)}


def _create_helpers(conn: psycopg.Connection, seed: int) -> None:
    """Session-local pseudo-random functions keyed by (seed, tag, row number).

    ``rnd(tag, i)`` is uniform in [0, 1).  Deriving each value from md5 of its
    own key (instead of ``setseed()`` + ``random()``) makes it independent of
    the order in which the plan visits rows.  The SQL functions are inlined.
    """
    seed_text = sql.Literal(f"{seed}:")
    conn.execute(sql.SQL("""
        CREATE OR REPLACE FUNCTION pg_temp.hex(tag text, i bigint) RETURNS text
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$ SELECT md5({seed} || tag || ':' || i::text) $$
    """).format(seed=seed_text))
    conn.execute("""
        CREATE OR REPLACE FUNCTION pg_temp.rnd(tag text, i bigint) RETURNS double precision
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$ SELECT ('x' || substr(pg_temp.hex(tag, i), 1, 13))::bit(52)::bigint
                     / 4503599627370496::double precision $$
    """)
    conn.execute("""
        CREATE OR REPLACE FUNCTION pg_temp.rint(tag text, i bigint, lo bigint, hi bigint)
        RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$ SELECT lo + floor(pg_temp.rnd(tag, i) * (hi - lo + 1))::bigint $$
    """)
    conn.execute("""
        CREATE OR REPLACE FUNCTION pg_temp.pick(tag text, i bigint, words text[]) RETURNS text
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$ SELECT words[1 + floor(pg_temp.rnd(tag, i) * cardinality(words))::int] $$
    """)
    # EAN-13 check digit, so the sample barcodes scan in a real POS.
    conn.execute("""
        CREATE OR REPLACE FUNCTION pg_temp.ean13(base text) RETURNS text
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$ SELECT base || mod(10 - mod(sum(substr(base, k, 1)::int
                                              * CASE WHEN mod(k, 2) = 0 THEN 3 ELSE 1 END), 10), 10)
               FROM generate_series(1, 12) AS k $$
    """)


def ean13(base12: str) -> str:
    """Append the EAN-13 check digit to 12 digits (same rule as pg_temp.ean13)."""
    total = sum(int(d) * (3 if k % 2 else 1) for k, d in enumerate(base12))
    return base12 + str((10 - total % 10) % 10)


def _params(spec: SampleSize) -> dict:
    return {
        "stores": spec.stores, "items": spec.items, "customers": spec.customers,
        "users": spec.users, "registers": spec.registers_per_store,
        "categories": spec.categories, "top_categories": max(2, -(-spec.categories // 5)),
        "lines": spec.lines_per_department, "departments": len(DEPARTMENTS),
        "kits": spec.kits, "rate_days": spec.rate_days, "sales": spec.sales_per_register,
        "coverage": float(spec.stock_coverage), "payment_methods": len(PAYMENT_METHODS),
        "cities": [c for c, _ in CITIES], "zones": [z for _, z in CITIES], "streets": STREETS,
        "first_names": FIRST_NAMES, "last_names": LAST_NAMES, "company_kinds": COMPANY_KINDS,
        "domains": EMAIL_DOMAINS, "nouns": ITEM_NOUNS, "brands": ITEM_BRANDS,
        "sizes": ITEM_SIZES, "tags": ITEM_TAGS, "line_names": LINE_NAMES,
        "category_names": CATEGORY_NAMES, "category_words": CATEGORY_WORDS,
        "hostile_items": HOSTILE_ITEM_NAMES, "hostile_tags": HOSTILE_ITEM_TAGS,
        "hostile_descriptions": HOSTILE_DESCRIPTIONS, "hostile_customers": HOSTILE_CUSTOMER_NAMES,
        "hostile_stores": HOSTILE_STORE_NAMES, "hostile_user": HOSTILE_USER_NAME,
        "rate_codes": [c[0] for c in CURRENCIES if c[4]],
        "rate_bases": [c[4] for c in CURRENCIES if c[4]],
    }


def _insert_reference_data(conn: psycopg.Connection, spec: SampleSize) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO public.currencies (code, name, symbol, decimals) VALUES (%s, %s, %s, %s)",
            [c[:4] for c in CURRENCIES])
        cur.executemany(
            "INSERT INTO public.taxes (id, name, kind, rate, included_in_price) VALUES (%s, %s, %s, %s, %s)",
            [(i, *t) for i, t in enumerate(TAXES, 1)])
        cur.executemany("INSERT INTO public.departments (id, code, name) VALUES (%s, %s, %s)",
                        [(i, *d) for i, d in enumerate(DEPARTMENTS, 1)])
        cur.executemany(
            "INSERT INTO public.price_policies (id, name, discount_pct, min_quantity, priority,"
            " valid_from, valid_to) VALUES (%s, %s, %s, %s, %s, %s::date, %s::date)",
            [(i, *p) for i, p in enumerate(POLICIES[:spec.policies], 1)])
        cur.executemany(
            "INSERT INTO public.payment_methods (id, code, name, requires_reference, gives_change,"
            " currency_code, max_amount, sort_order) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [(i, *p, i * 10) for i, p in enumerate(PAYMENT_METHODS, 1)])


# One statement per table, in FK order.  Parameters come from _params(); no
# literal percent signs here (psycopg placeholders).  Row i of a table has id i
# and its values depend only on (seed, tag, i).
_STEPS: list[tuple[str, str]] = [
    ("product_lines", """
        INSERT INTO public.product_lines (id, department_id, name)
        SELECT (d - 1) * %(lines)s + k, d, (%(line_names)s::text[])[k]
          FROM generate_series(1, %(departments)s) AS d, generate_series(1, %(lines)s) AS k
         ORDER BY 1
    """),
    ("categories", """
        INSERT INTO public.categories (id, parent_id, name)
        SELECT i,
               CASE WHEN i > %(top_categories)s THEN pg_temp.rint('cat.parent', i, 1, i - 1) END,
               CASE WHEN i <= %(top_categories)s
                    THEN (%(category_names)s::text[])[1 + mod(i - 1, cardinality(%(category_names)s::text[]))]
                         || CASE WHEN i > cardinality(%(category_names)s::text[]) THEN ' ' || i ELSE '' END
                    ELSE pg_temp.pick('cat.word', i, %(category_words)s) || ' ' || i END
          FROM generate_series(1, %(categories)s) AS i
    """),
    ("stores", """
        INSERT INTO public.stores (id, code, name, address, timezone, opens_at, closes_at,
                                   opened_on, active, updated_at)
        SELECT i, 'T' || lpad(i::text, 3, '0'),
               CASE WHEN i = 1 THEN 'Matriz ' || c.city
                    WHEN i - 1 <= cardinality(%(hostile_stores)s::text[]) THEN (%(hostile_stores)s::text[])[i - 1]
                    ELSE 'Sucursal ' || c.city || ' ' || i END,
               pg_temp.pick('store.street', i, %(streets)s) || ' ' || pg_temp.rint('store.no', i, 1, 2500)
                   || ', ' || c.city || ', C.P. ' || lpad(pg_temp.rint('store.cp', i, 1000, 99999)::text, 5, '0'),
               c.zone,
               time '07:00' + pg_temp.rint('store.open', i, 0, 4) * interval '30 min',
               time '21:00' + pg_temp.rint('store.close', i, 0, 5) * interval '30 min',
               date '2005-01-01' + pg_temp.rint('store.opened', i, 0, 6000)::int,
               true,
               timestamptz '2024-01-01 12:00:00+00' + pg_temp.rnd('store.upd', i) * interval '300 days'
          FROM generate_series(1, %(stores)s) AS i
         CROSS JOIN LATERAL (SELECT (%(cities)s::text[])[1 + mod(i - 1, cardinality(%(cities)s::text[]))] AS city,
                                    (%(zones)s::text[])[1 + mod(i - 1, cardinality(%(zones)s::text[]))] AS zone) AS c
    """),
    ("registers", """
        INSERT INTO public.registers (id, store_id, code, name, active)
        SELECT (s - 1) * %(registers)s + r, s, 'CAJA-' || lpad(r::text, 2, '0'),
               CASE WHEN r = 1 THEN 'Caja 1 (rápida ≤10 artículos)' ELSE 'Caja ' || r END,
               pg_temp.rnd('register.active', (s - 1) * %(registers)s + r) >= 0.05
          FROM generate_series(1, %(stores)s) AS s, generate_series(1, %(registers)s) AS r
         ORDER BY 1
    """),
    ("exchange_rates", """
        INSERT INTO public.exchange_rates (currency_code, valid_on, rate)
        SELECT cur.code, date '2024-12-31' - d,
               round((cur.base * (1 + 0.04 * (pg_temp.rnd('rate.' || cur.code, d) - 0.5)))::numeric, 6)
          FROM unnest(%(rate_codes)s::text[], %(rate_bases)s::numeric[]) AS cur(code, base),
               generate_series(0, %(rate_days)s - 1) AS d
         ORDER BY 1, 2
    """),
    ("items", """
        INSERT INTO public.items (id, sku, name, description, department_id, line_id, category_id,
                                  tax_id, unit, weighed, cost, active, tags, thumbnail,
                                  created_at, updated_at)
        SELECT i, 'SKU' || lpad(i::text, 8, '0'),
               CASE WHEN i <= cardinality(%(hostile_items)s::text[]) THEN (%(hostile_items)s::text[])[i]
                    ELSE pg_temp.pick('item.noun', i, %(nouns)s) || ' '
                         || pg_temp.pick('item.brand', i, %(brands)s) || ' '
                         || CASE WHEN w.weighed THEN 'a granel' ELSE pg_temp.pick('item.size', i, %(sizes)s) END
               END,
               CASE WHEN i <= cardinality(%(hostile_descriptions)s::text[])
                        THEN (%(hostile_descriptions)s::text[])[i]
                    WHEN pg_temp.rnd('item.desc', i) < 0.3 THEN NULL
                    ELSE 'Artículo ' || i || ' de la línea ' || pg_temp.pick('item.descline', i, %(line_names)s) END,
               d.dept,
               CASE WHEN pg_temp.rnd('item.noline', i) >= 0.1
                    THEN (d.dept - 1) * %(lines)s + pg_temp.rint('item.line', i, 1, %(lines)s) END,
               CASE WHEN pg_temp.rnd('item.nocat', i) >= 0.05
                    THEN pg_temp.rint('item.cat', i, 1, %(categories)s) END,
               CASE WHEN pg_temp.rnd('item.taxodd', i) < 0.02 THEN 6          -- exento
                    WHEN pg_temp.rnd('item.taxodd', i) < 0.03 THEN 2          -- frontera
                    WHEN d.dept = 2 AND pg_temp.rnd('item.alcohol', i) < 0.2 THEN 5
                    WHEN d.dept = 1 AND pg_temp.rnd('item.snack', i) < 0.1 THEN 4
                    WHEN d.dept IN (1, 3, 4, 5, 6) THEN 3                     -- IVA 0 (food)
                    ELSE 1 END,
               CASE WHEN w.weighed THEN 'KG'
                    WHEN d.dept = 2 AND pg_temp.rnd('item.unit', i) < 0.3 THEN 'LT'
                    WHEN pg_temp.rnd('item.unit', i) < 0.05 THEN 'CAJA'
                    ELSE 'PZA' END,
               w.weighed,
               round((2 + 1200 * pg_temp.rnd('item.cost', i) ^ 3)::numeric, 4),
               pg_temp.rnd('item.active', i) >= 0.03,
               CASE WHEN i = 1 THEN %(hostile_tags)s::text[]
                    WHEN pg_temp.rnd('item.tags', i) < 0.6 THEN '{}'::text[]
                    WHEN pg_temp.rnd('item.tags', i) < 0.85 THEN ARRAY[pg_temp.pick('item.tag1', i, %(tags)s)]
                    ELSE ARRAY[pg_temp.pick('item.tag1', i, %(tags)s), pg_temp.pick('item.tag2', i, %(tags)s)] END,
               -- a few tiny "images": PNG magic, then bytes including 0x00, 0x5c and 0x27
               CASE WHEN i = 2 OR pg_temp.rnd('item.thumb', i) < 0.03
                    THEN decode('89504e470d0a1a0a' || pg_temp.hex('item.thumb1', i) || '005c27'
                                || pg_temp.hex('item.thumb2', i), 'hex') END,
               t.created,
               t.created + pg_temp.rnd('item.upd', i) * interval '400 days'
          FROM generate_series(1, %(items)s) AS i
         CROSS JOIN LATERAL (SELECT pg_temp.rint('item.dept', i, 1, %(departments)s)::smallint AS dept) AS d
         CROSS JOIN LATERAL (SELECT d.dept IN (4, 5) AND pg_temp.rnd('item.weighed', i) < 0.6 AS weighed) AS w
         CROSS JOIN LATERAL (SELECT timestamptz '2021-01-01 00:00:00+00'
                                    + pg_temp.rnd('item.created', i) * interval '1000 days' AS created) AS t
    """),
    ("item_prices", """
        INSERT INTO public.item_prices (item_id, policy_id, price, currency_code, updated_at)
        SELECT it.id, p.id,
               round(it.cost * (1.25 + 0.35 * pg_temp.rnd('price', it.id))::numeric * (1 - p.discount_pct / 100)
                     / CASE WHEN usd THEN 17.25 ELSE 1 END,
                     CASE WHEN it.weighed THEN 4 ELSE 2 END),
               CASE WHEN usd THEN 'USD' ELSE 'MXN' END,
               it.updated_at
          FROM public.items AS it
         CROSS JOIN public.price_policies AS p
         CROSS JOIN LATERAL (SELECT p.id = 1 AND pg_temp.rnd('price.usd', it.id) < 0.01 AS usd) AS u
         WHERE p.id = 1 OR pg_temp.rnd('price.has.' || p.id, it.id) < 0.25
         ORDER BY it.id, p.id
    """),
    ("item_barcodes", """
        INSERT INTO public.item_barcodes (barcode, item_id, is_primary)
        SELECT pg_temp.ean13('750' || lpad(id::text, 9, '0')), id, true FROM public.items
        UNION ALL
        SELECT pg_temp.ean13('758' || lpad(id::text, 9, '0')), id, false FROM public.items
         WHERE pg_temp.rnd('barcode.alt', id) < 0.2
    """),
    ("stock", """
        INSERT INTO public.stock (store_id, item_id, quantity, min_qty, max_qty, updated_at)
        SELECT s, it.id,
               CASE WHEN it.weighed THEN round((150 * pg_temp.rnd(k.tag || 'q', it.id))::numeric, 3)
                    ELSE pg_temp.rint(k.tag || 'q', it.id, -3, 240) END,
               m.min_qty,
               CASE WHEN pg_temp.rnd(k.tag || 'nomax', it.id) >= 0.2 THEN m.min_qty * 4 + 12 END,
               it.updated_at + pg_temp.rnd(k.tag || 'upd', it.id) * interval '30 days'
          FROM generate_series(1, %(stores)s) AS s
         CROSS JOIN public.items AS it
         CROSS JOIN LATERAL (SELECT 'stock.' || s || '.' AS tag) AS k
         CROSS JOIN LATERAL (SELECT pg_temp.rint(k.tag || 'min', it.id, 0, 20)::numeric AS min_qty) AS m
         WHERE %(coverage)s >= 1.0 OR pg_temp.rnd(k.tag || 'has', it.id) < %(coverage)s
         ORDER BY s, it.id
    """),
    ("kits", """
        INSERT INTO public.kits (id, item_id, name, active)
        SELECT k, it.id, 'Kit ' || it.name, it.active
          FROM generate_series(1, %(kits)s) AS k
          JOIN public.items AS it ON it.id = %(items)s - k + 1
         ORDER BY k
    """),
    ("kit_components", """
        INSERT INTO public.kit_components (kit_id, item_id, quantity)
        SELECT DISTINCT ON (k, c.item_id) k, c.item_id, c.quantity
          FROM generate_series(1, %(kits)s) AS k
         CROSS JOIN LATERAL generate_series(1, pg_temp.rint('kit.n', k, 2, 4)::int) AS n
         CROSS JOIN LATERAL (SELECT pg_temp.rint('kit.item', k * 10 + n, 1, %(items)s - %(kits)s) AS item_id,
                                    pg_temp.rint('kit.qty', k * 10 + n, 1, 6)::numeric AS quantity) AS c
         ORDER BY k, c.item_id, n
    """),
    ("devices", """
        INSERT INTO public.devices (id, store_id, register_id, kind, model, settings, serial, updated_at)
        SELECT row_number() OVER (ORDER BY store_id, register_id NULLS FIRST, kind),
               store_id, register_id, kind, model, settings,
               pg_temp.hex('device.serial', store_id * 100000 + coalesce(register_id, 0) * 10
                                            + kind_order)::uuid,
               timestamptz '2024-01-01 00:00:00+00'
                   + pg_temp.rnd('device.upd', store_id * 1000 + coalesce(register_id, 0)) * interval '300 days'
          FROM (
            -- one scale per store, shared by its registers
            SELECT s.id AS store_id, NULL::int AS register_id, 'scale'::public.device_kind AS kind,
                   'Torrey L-EQ 20' AS model,
                   jsonb_build_object('port', '/dev/ttyUSB0', 'baud', 9600, 'protocol', 'Torrey',
                                      'tara_kg', 0.250, 'max_kg', 20, 'calibrated_on', '2024-03-15')
                       AS settings, 4 AS kind_order
              FROM public.stores AS s
            UNION ALL
            SELECT r.store_id, r.id, v.kind, v.model, v.settings, v.ord
              FROM public.registers AS r
             CROSS JOIN LATERAL (VALUES
                ('printer'::public.device_kind, 'Epson TM-T20III',
                 jsonb_build_object('port', '/dev/usb/lp0', 'paper_mm', 80, 'cut', true,
                                    'codepage', 'CP850',
                                    'header', jsonb_build_array('Tienda ' || r.store_id || ' — ' || r.code,
                                                                '¡Gracias por su compra! 😀'),
                                    'footer', 'Precios en "MXN" \\ IVA incluido'), 1),
                ('cash_drawer', 'APG Vasario 1616',
                 jsonb_build_object('via', 'printer', 'kick_pulse_ms', 120, 'pin', 2), 2),
                ('scanner', 'Honeywell Voyager 1250g',
                 jsonb_build_object('suffix', E'\\r', 'beep', true,
                                    'symbologies', jsonb_build_array('EAN-13', 'UPC-A', 'Code 128', 'QR')), 3)
             ) AS v(kind, model, settings, ord)
            UNION ALL
            -- the first register of each store also has a display and a card terminal
            SELECT r.store_id, r.id, v.kind, v.model, v.settings, v.ord
              FROM public.registers AS r
             CROSS JOIN LATERAL (VALUES
                ('customer_display'::public.device_kind, 'Logic Controls PD3000',
                 jsonb_build_object('lines', 2, 'cols', 20, 'greeting', '¡Bienvenido! ☺ \\ Ñandú'), 5),
                ('pinpad', 'Verifone V200c',
                 jsonb_build_object('provider', 'Banco Ejemplo', 'terminal_id', 'TPV' || lpad(r.id::text, 6, '0'),
                                    'amount_limit', 99999.99, 'sequence', 9007199254740993), 6)
             ) AS v(kind, model, settings, ord)
             WHERE r.code = 'CAJA-01'
          ) AS d
         ORDER BY 1
    """),
    ("users", """
        INSERT INTO public.users (id, login, full_name, role, store_id, active, last_login_at,
                                  password_hash, updated_at)
        SELECT i,
               CASE WHEN i = 1 THEN 'admin'
                    ELSE translate(lower(pg_temp.pick('user.first', i, %(first_names)s)),
                                   'áéíóúüñëç', 'aeiouunec') || '.' || i END,
               CASE WHEN i = 1 THEN 'Administrador del sistema'
                    WHEN i = 3 THEN %(hostile_user)s
                    ELSE pg_temp.pick('user.first', i, %(first_names)s) || ' '
                         || pg_temp.pick('user.last', i, %(last_names)s) END,
               CASE WHEN i <= 2 THEN 'admin'
                    WHEN (i - 3) / %(stores)s = 0 THEN 'manager'
                    WHEN (i - 3) / %(stores)s = 1 THEN 'supervisor'
                    ELSE 'cashier' END,
               CASE WHEN i > 2 THEN 1 + mod(i - 3, %(stores)s) END,
               pg_temp.rnd('user.active', i) >= 0.05,
               CASE WHEN pg_temp.rnd('user.login', i) >= 0.2
                    THEN timestamptz '2024-12-01 00:00:00+00' + pg_temp.rnd('user.login', i) * interval '30 days' END,
               '$2b$12$' || substr(pg_temp.hex('user.salt', i) || pg_temp.hex('user.hash', i), 1, 53),
               timestamptz '2024-06-01 00:00:00+00' + pg_temp.rnd('user.upd', i) * interval '180 days'
          FROM generate_series(1, %(users)s) AS i
    """),
    ("customers", """
        INSERT INTO public.customers (id, code, name, tax_id, email, phone, price_policy_id,
                                      credit_limit, birthday, loyalty_points, created_at, updated_at)
        SELECT i, 'C' || lpad(i::text, 7, '0'),
               CASE WHEN i = 1 THEN 'PÚBLICO EN GENERAL'
                    WHEN i - 1 <= cardinality(%(hostile_customers)s::text[]) THEN (%(hostile_customers)s::text[])[i - 1]
                    WHEN k.company THEN pg_temp.pick('cust.kind', i, %(company_kinds)s) || ' '
                         || pg_temp.pick('cust.last1', i, %(last_names)s) || ' S.A. de C.V.'
                    ELSE pg_temp.pick('cust.first', i, %(first_names)s) || ' '
                         || pg_temp.pick('cust.last1', i, %(last_names)s) || ' '
                         || pg_temp.pick('cust.last2', i, %(last_names)s) END,
               -- RFC: 3 (company) or 4 (person) letters, birth/incorporation date, homoclave
               CASE WHEN i = 1 THEN 'XAXX010101000'
                    WHEN pg_temp.rnd('cust.rfc', i) < 0.3 THEN NULL
                    ELSE translate(upper(substr(pg_temp.hex('cust.rfc.l', i), 1, CASE WHEN k.company THEN 3 ELSE 4 END)),
                                   '0123456789ABCDEF', 'ABCDEFGHIJKLMNOP')
                         || to_char(date '1950-01-01' + pg_temp.rint('cust.rfc.d', i, 0, 20000)::int, 'YYMMDD')
                         || upper(substr(pg_temp.hex('cust.rfc.h', i), 1, 3)) END,
               CASE WHEN i = 2 THEN 'o''brien+pos@example.com'
                    WHEN i = 1 OR pg_temp.rnd('cust.email', i) < 0.25 THEN NULL
                    ELSE 'cliente' || i || '@' || pg_temp.pick('cust.domain', i, %(domains)s) END,
               CASE WHEN i > 1 AND pg_temp.rnd('cust.phone', i) >= 0.2
                    THEN '+52 ' || lpad(pg_temp.rint('cust.phone', i, 2000000000, 9999999999)::text, 10, '0') END,
               CASE WHEN pg_temp.rnd('cust.policy', i) < 0.15
                    THEN 1 + mod(i, (SELECT count(*) FROM public.price_policies))::int END,
               CASE WHEN k.company OR pg_temp.rnd('cust.credit', i) < 0.1
                    THEN 500 * pg_temp.rint('cust.credit.amt', i, 1, 200) ELSE 0 END,
               CASE WHEN NOT k.company AND pg_temp.rnd('cust.bday', i) < 0.5
                    THEN date '1950-01-01' + pg_temp.rint('cust.bday.d', i, 0, 20000)::int END,
               pg_temp.rint('cust.points', i, 0, 5000),
               t.created,
               t.created + pg_temp.rnd('cust.upd', i) * interval '300 days'
          FROM generate_series(1, %(customers)s) AS i
         CROSS JOIN LATERAL (SELECT i > 1 AND pg_temp.rnd('cust.company', i) < 0.15 AS company) AS k
         CROSS JOIN LATERAL (SELECT timestamptz '2020-01-01 00:00:00+00'
                                    + pg_temp.rnd('cust.created', i) * interval '1500 days' AS created) AS t
    """),
    ("sales", """
        INSERT INTO public.sales (register_id, folio, store_id, sold_at, customer_id,
                                  payment_method_id, total)
        SELECT r.id, f, r.store_id,
               timestamptz '2024-06-01 14:00:00+00' + f * interval '37 min'
                   + pg_temp.rnd('sale.at', r.id * 1000000 + f) * interval '30 min',
               CASE WHEN pg_temp.rnd('sale.cust', r.id * 1000000 + f) < 0.2
                    THEN pg_temp.rint('sale.cust.id', r.id * 1000000 + f, 1, %(customers)s) END,
               pg_temp.rint('sale.pay', r.id * 1000000 + f, 1, %(payment_methods)s),
               0
          FROM public.registers AS r, generate_series(1, %(sales)s) AS f
         ORDER BY 1, 2
    """),
    ("sale_lines", """
        INSERT INTO public.sale_lines (register_id, folio, line_no, store_id, item_id, quantity, price)
        SELECT s.register_id, s.folio, ln, s.store_id, x.item_id,
               CASE WHEN pg_temp.rnd('line.return', x.key) < 0.02 THEN -1
                    ELSE pg_temp.rint('line.qty', x.key, 1, 4) END,
               p.price
          FROM public.sales AS s
         CROSS JOIN LATERAL generate_series(1, pg_temp.rint('sale.lines', s.register_id * 1000000 + s.folio, 1, 5)::int) AS ln
         CROSS JOIN LATERAL (SELECT (s.register_id * 1000000 + s.folio) * 10 + ln AS key) AS k
         CROSS JOIN LATERAL (SELECT k.key, pg_temp.rint('line.item', k.key, 1, %(items)s) AS item_id) AS x
          JOIN public.item_prices AS p ON p.item_id = x.item_id AND p.policy_id = 1
         ORDER BY 1, 2, 3
    """),
    ("sales.total", """
        UPDATE public.sales AS s SET total = l.total
          FROM (SELECT register_id, folio, round(sum(quantity * price), 2) AS total
                  FROM public.sale_lines GROUP BY register_id, folio) AS l
         WHERE (s.register_id, s.folio) = (l.register_id, l.folio)
    """),
]


def _reset_identities(conn: psycopg.Connection) -> None:
    """Move identity sequences past the generated ids, so new rows do not collide."""
    rows = conn.execute("""
        SELECT c.relname, a.attname
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
         WHERE c.relnamespace = 'public'::regnamespace AND a.attidentity <> '' AND NOT a.attisdropped
           AND c.relname = ANY(%s)
    """, (list(TABLES),)).fetchall()
    for table, column in rows:
        conn.execute(sql.SQL(
            "SELECT setval(pg_get_serial_sequence({qname}, {col}), coalesce(max({c}), 0) + 1, false)"
            " FROM {t}").format(qname=sql.Literal(f"public.{table}"), col=sql.Literal(column),
                                c=sql.Identifier(column), t=sql.Identifier("public", table)))
