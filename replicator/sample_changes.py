"""Live changes to the sample point-of-sale database (sample.py builds it).

* :func:`random_changes` is the "store keeps working" stream: small committed
  transactions of the kinds a real HQ produces (price changes, stock moves,
  new items and customers, deletes, a row moving between stores).
* :func:`random_sales` writes sales at a branch, for the branch -> HQ flow.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import psycopg
from psycopg.pq import TransactionStatus

from .sample import (DEPARTMENTS, EMAIL_DOMAINS, FIRST_NAMES, HOSTILE_CUSTOMER_NAMES, HOSTILE_ITEM_NAMES, ITEM_BRANDS,
                     ITEM_NOUNS, ITEM_SIZES, ITEM_TAGS, LAST_NAMES, ean13)

log = logging.getLogger(__name__)


# ---------------------------------------------------------- random changes

@dataclass
class _Shop:
    """What random changes pick from, read once per call."""

    stores: list[int]
    max_item: int
    max_customer: int
    max_user: int
    policies: list[int]
    foreign: list[str]


def random_changes(conn: psycopg.Connection, n: int, rng: random.Random) -> int:
    """Apply ``n`` small committed changes to HQ's catalogs; return the rows changed.

    Each change is its own transaction of one to a dozen rows, like an HQ
    back office at work: prices and stock go up and down, customers and items
    appear, barcodes are dropped, a stock row moves to another store (leaving
    one branch's row filter and entering another's), a password changes (a
    column branches never see).  Choices come from ``rng`` so a test can
    repeat a run.  ``conn`` must not be inside a transaction.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError("random_changes() commits its own transactions; pass an idle connection")
    shop = _load_shop(conn)
    kinds = [k for k, _ in _CHANGES]
    weights = [w for _, w in _CHANGES]
    changed = 0
    for _ in range(n):
        change = rng.choices(kinds, weights)[0]
        with conn.transaction():
            rows = change(conn, rng, shop)
        log.debug("sample change %s: %d rows", change.__name__, rows)
        changed += rows
    return changed


def _load_shop(conn: psycopg.Connection) -> _Shop:
    one = lambda q: conn.execute(q).fetchone()[0]  # noqa: E731
    return _Shop(
        stores=[r[0] for r in conn.execute("SELECT id FROM public.stores WHERE active ORDER BY id")],
        max_item=one("SELECT coalesce(max(id), 0) FROM public.items"),
        max_customer=one("SELECT coalesce(max(id), 0) FROM public.customers"),
        max_user=one("SELECT coalesce(max(id), 0) FROM public.users"),
        policies=[r[0] for r in conn.execute("SELECT id FROM public.price_policies ORDER BY id")],
        foreign=[r[0] for r in conn.execute(
            "SELECT DISTINCT currency_code FROM public.exchange_rates ORDER BY 1")],
    )


def _pick(conn: psycopg.Connection, rng: random.Random, query: str, hi: int, *params):
    """First row of ``query`` at or after a random key in [1, hi], wrapping around.

    ``query`` ends with ``>= %s ORDER BY key LIMIT 1`` so it is one index probe
    however big the table is.
    """
    row = conn.execute(query, (*params, rng.randint(1, max(hi, 1)))).fetchone()
    return row if row is not None else conn.execute(query, (*params, 0)).fetchone()


def _stock_row(conn, rng, shop, store):
    return _pick(conn, rng, "SELECT item_id, quantity FROM public.stock WHERE store_id = %s"
                            " AND item_id >= %s ORDER BY item_id LIMIT 1", shop.max_item, store)


def _item(conn, rng, shop):
    row = _pick(conn, rng, "SELECT id FROM public.items WHERE id >= %s ORDER BY id LIMIT 1", shop.max_item)
    return row[0] if row else None


def _price_change(conn, rng, shop) -> int:
    item = _item(conn, rng, shop)
    factor = rng.choice([0.9, 0.95, 0.98, 1.02, 1.05, 1.1])
    only_list = rng.random() < 0.8
    return conn.execute(
        "UPDATE public.item_prices SET price = round(price * %s::numeric, 2)"
        " WHERE item_id = %s AND (policy_id = 1 OR NOT %s)", (factor, item, only_list)).rowcount


def _stock_quantity(conn, rng, shop) -> int:
    store = rng.choice(shop.stores)
    row = _stock_row(conn, rng, shop, store)
    if row is None:
        return 0
    delta = -rng.randint(1, 5) if rng.random() < 0.8 else rng.randint(10, 60)
    return conn.execute("UPDATE public.stock SET quantity = quantity + %s WHERE store_id = %s AND item_id = %s",
                        (delta, store, row[0])).rowcount


def _between_stores(conn, rng, shop):
    """Two different stores and a stock row of the first, for a change that moves stock
    from one to the other; None when the chain has one store or the first has no stock."""
    if len(shop.stores) < 2:
        return None
    src, dst = rng.sample(shop.stores, 2)
    row = _stock_row(conn, rng, shop, src)
    return None if row is None else (src, dst, row)


def _stock_transfer(conn, rng, shop) -> int:
    """A traspaso: units leave one store and arrive at another (2 rows)."""
    pick = _between_stores(conn, rng, shop)
    if pick is None:
        return 0
    src, dst, row = pick
    qty = rng.randint(1, 12)
    n = conn.execute("UPDATE public.stock SET quantity = quantity - %s WHERE store_id = %s AND item_id = %s",
                     (qty, src, row[0])).rowcount
    return n + conn.execute(
        "INSERT INTO public.stock (store_id, item_id, quantity) VALUES (%s, %s, %s)"
        " ON CONFLICT (store_id, item_id) DO UPDATE SET quantity = stock.quantity + EXCLUDED.quantity",
        (dst, row[0], qty)).rowcount


def _stock_row_moved(conn, rng, shop) -> int:
    """A correction: a stock row was booked under the wrong store.

    ``UPDATE stock SET store_id = ...`` changes the primary key, and moves the
    row from one branch's filter to another's.  If the target store already
    has the item, its row is deleted first and the quantities merged.
    """
    pick = _between_stores(conn, rng, shop)
    if pick is None:
        return 0
    src, dst, row = pick
    gone = conn.execute("DELETE FROM public.stock WHERE store_id = %s AND item_id = %s RETURNING quantity",
                        (dst, row[0])).fetchone()
    return (gone is not None) + conn.execute(
        "UPDATE public.stock SET store_id = %s, quantity = quantity + %s WHERE store_id = %s AND item_id = %s",
        (dst, gone[0] if gone else 0, src, row[0])).rowcount


def _stock_row_deleted(conn, rng, shop) -> int:
    """An item leaves one store's assortment."""
    store = rng.choice(shop.stores)
    row = _stock_row(conn, rng, shop, store)
    if row is None:
        return 0
    return conn.execute("DELETE FROM public.stock WHERE store_id = %s AND item_id = %s",
                        (store, row[0])).rowcount


def _person_name(rng: random.Random) -> str:
    if rng.random() < 0.05:
        return rng.choice(HOSTILE_CUSTOMER_NAMES)
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)} {rng.choice(LAST_NAMES)}"


def _new_customer(conn, rng, shop) -> int:
    cid = conn.execute("SELECT nextval(pg_get_serial_sequence('public.customers', 'id'))").fetchone()[0]
    shop.max_customer = max(shop.max_customer, cid)
    return conn.execute(
        "INSERT INTO public.customers (id, code, name, email, phone, credit_limit)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (cid, f"C{cid:07d}", _person_name(rng), f"nuevo{cid}@{rng.choice(EMAIL_DOMAINS)}",
         f"+52 {rng.randint(2000000000, 9999999999)}", rng.choice([0, 0, 0, 1000, 5000]))).rowcount


def _customer_update(conn, rng, shop) -> int:
    row = _pick(conn, rng, "SELECT id FROM public.customers WHERE id >= %s ORDER BY id LIMIT 1",
                shop.max_customer)
    if row is None:
        return 0
    if rng.random() < 0.5:
        return conn.execute("UPDATE public.customers SET credit_limit = %s WHERE id = %s",
                            (rng.randint(0, 40) * 500, row[0])).rowcount
    return conn.execute("UPDATE public.customers SET name = %s, loyalty_points = loyalty_points + %s"
                        " WHERE id = %s", (_person_name(rng), rng.randint(1, 50), row[0])).rowcount


def _customer_deleted(conn, rng, shop) -> int:
    """A duplicate customer record is removed (only one nobody bought with)."""
    row = _pick(conn, rng,
                "SELECT id FROM public.customers AS c WHERE id > 1"
                " AND NOT EXISTS (SELECT FROM public.sales WHERE customer_id = c.id)"
                " AND id >= %s ORDER BY id LIMIT 1", shop.max_customer)
    if row is None:
        return 0
    return conn.execute("DELETE FROM public.customers WHERE id = %s", (row[0],)).rowcount


def _new_item(conn, rng, shop) -> int:
    """A new item with its list price, a barcode and a stock row in every store."""
    item = conn.execute("SELECT nextval(pg_get_serial_sequence('public.items', 'id'))").fetchone()[0]
    shop.max_item = max(shop.max_item, item)
    name = (rng.choice(HOSTILE_ITEM_NAMES) if rng.random() < 0.05 else
            f"{rng.choice(ITEM_NOUNS)} {rng.choice(ITEM_BRANDS)} {rng.choice(ITEM_SIZES)}")
    cost = round(rng.uniform(3, 900), 4)
    n = conn.execute(
        "INSERT INTO public.items (id, sku, name, department_id, tax_id, cost, tags)"
        " VALUES (%s, %s, %s, %s, 1, %s, %s)",
        (item, f"SKU{item:08d}", name, rng.randint(1, len(DEPARTMENTS)), cost, ["nuevo"])).rowcount
    n += conn.execute("INSERT INTO public.item_prices (item_id, policy_id, price) VALUES (%s, 1, %s)",
                      (item, round(cost * 1.35, 2))).rowcount
    n += conn.execute("INSERT INTO public.item_barcodes (barcode, item_id, is_primary) VALUES (%s, %s, true)"
                      " ON CONFLICT DO NOTHING", (ean13(f"750{item:09d}"), item)).rowcount
    n += conn.execute("INSERT INTO public.stock (store_id, item_id, quantity, min_qty)"
                      " SELECT id, %s, %s, 2 FROM public.stores WHERE active",
                      (item, rng.randint(0, 48))).rowcount
    return n


def _item_update(conn, rng, shop) -> int:
    item = _item(conn, rng, shop)
    what = rng.random()
    if what < 0.4:
        return conn.execute("UPDATE public.items SET name = name || ' (nueva presentación)'"
                            " WHERE id = %s AND length(name) < 200", (item,)).rowcount
    if what < 0.7:
        return conn.execute("UPDATE public.items SET tags = array_append(tags, %s) WHERE id = %s",
                            (rng.choice(ITEM_TAGS), item)).rowcount
    return conn.execute("UPDATE public.items SET active = NOT active WHERE id = %s", (item,)).rowcount


def _barcode_deleted(conn, rng, shop) -> int:
    return conn.execute(
        "DELETE FROM public.item_barcodes WHERE barcode = (SELECT barcode FROM public.item_barcodes"
        " WHERE item_id >= %s ORDER BY item_id, barcode LIMIT 1)",
        (rng.randint(1, max(shop.max_item, 1)),)).rowcount


def _barcode_added(conn, rng, shop) -> int:
    item = _item(conn, rng, shop)
    if item is None:
        return 0
    code = ean13(f"759{rng.randint(0, 999_999_999):09d}")
    return conn.execute("INSERT INTO public.item_barcodes (barcode, item_id) VALUES (%s, %s)"
                        " ON CONFLICT DO NOTHING", (code, item)).rowcount


def _exchange_rate(conn, rng, shop) -> int:
    """Today's rate for one currency: an insert the first time, then updates."""
    if not shop.foreign:
        return 0
    return conn.execute(
        "INSERT INTO public.exchange_rates (currency_code, valid_on, rate)"
        " SELECT currency_code, current_date, round(rate * %s::numeric, 6) FROM public.exchange_rates"
        "  WHERE currency_code = %s ORDER BY valid_on DESC LIMIT 1"
        " ON CONFLICT (currency_code, valid_on) DO UPDATE SET rate = EXCLUDED.rate",
        (1 + rng.uniform(-0.01, 0.01), rng.choice(shop.foreign))).rowcount


def _password_change(conn, rng, shop) -> int:
    """Only the excluded column changes: branches see an update with no visible difference."""
    user = rng.randint(1, max(shop.max_user, 1))
    return conn.execute("UPDATE public.users SET password_hash = %s WHERE id = %s",
                        (f"$2b$12${rng.getrandbits(200):051x}"[:60], user)).rowcount


def _policy_change(conn, rng, shop) -> int:
    if len(shop.policies) < 2:
        return 0
    return conn.execute("UPDATE public.price_policies SET discount_pct = %s WHERE id = %s",
                        (rng.choice([5, 7.5, 10, 12.5, 15]), rng.choice(shop.policies[1:]))).rowcount


_CHANGES = [  # (change, weight): mostly prices and stock, as in a real store
    (_price_change, 25), (_stock_quantity, 30), (_stock_transfer, 8), (_stock_row_moved, 3),
    (_stock_row_deleted, 1), (_new_customer, 5), (_customer_update, 5), (_customer_deleted, 1),
    (_new_item, 3), (_item_update, 5), (_barcode_deleted, 3), (_barcode_added, 2),
    (_exchange_rate, 3), (_password_change, 2), (_policy_change, 1),
]


# ------------------------------------------------------------------- sales

def random_sales(conn: psycopg.Connection, n: int, rng: random.Random,
                 store_id: int | None = None) -> int:
    """Ring up ``n`` sales at a branch (or anywhere); return the rows written.

    For the branch -> HQ consolidation flow: each sale and its lines are one
    transaction, with the next folio of its register, like a real till.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise ValueError("random_sales() commits its own transactions; pass an idle connection")
    registers = conn.execute(
        "SELECT id, store_id FROM public.registers WHERE active AND (store_id = %s OR %s IS NULL)"
        " ORDER BY id", (store_id, store_id)).fetchall()
    if not registers:
        raise ValueError(f"no active register for store {store_id}")
    max_item = conn.execute("SELECT coalesce(max(id), 0) FROM public.items").fetchone()[0]
    written = 0
    for _ in range(n):
        register, store = rng.choice(registers)
        with conn.transaction():
            folio = conn.execute("SELECT coalesce(max(folio), 0) + 1 FROM public.sales WHERE register_id = %s",
                                 (register,)).fetchone()[0]
            written += conn.execute(
                "INSERT INTO public.sales (register_id, folio, store_id, payment_method_id)"
                " VALUES (%s, %s, %s, 1)", (register, folio, store)).rowcount
            for line in range(1, rng.randint(1, 5) + 1):
                row = _pick(conn, rng, "SELECT id FROM public.items WHERE active AND id >= %s"
                                       " ORDER BY id LIMIT 1", max_item)
                if row is None:
                    raise ValueError("no active item to sell; load the items catalog first")
                written += conn.execute(
                    "INSERT INTO public.sale_lines (register_id, folio, line_no, store_id, item_id, quantity,"
                    " price) SELECT %s, %s, %s, %s, %s, %s, coalesce((SELECT price FROM public.item_prices"
                    "  WHERE item_id = %s AND policy_id = 1), 0)",
                    (register, folio, line, store, row[0], rng.randint(1, 3), row[0])).rowcount
            conn.execute(
                "UPDATE public.sales SET total = (SELECT coalesce(round(sum(quantity * price), 2), 0)"
                " FROM public.sale_lines WHERE register_id = %s AND folio = %s)"
                " WHERE register_id = %s AND folio = %s", (register, folio, register, folio))
    return written
