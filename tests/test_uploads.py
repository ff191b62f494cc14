"""Sales up: every branch's sales into one set of HQ tables (issue 19).

Real clusters: HQ and two branches, each branch logging in to HQ as its own role (with
a password, over TCP), so what HQ's row-level security allows is what is tested.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
import yaml

from replicator import config, upload_init, uploads
from replicator.runner import run
from replicator.errors import ConfigError
from replicator.hq import add_branch, role_name
from replicator.initialize import initialize

from harness import REPO, replicator_cli, table_rows

SCHEMA = """
CREATE TABLE public.items (id int PRIMARY KEY, name text NOT NULL, stock int NOT NULL DEFAULT 0);
CREATE TABLE public.sales (
    register_id int NOT NULL, folio bigint NOT NULL, store_id int NOT NULL,
    total numeric(12,2) NOT NULL DEFAULT 0, voided boolean NOT NULL DEFAULT false,
    PRIMARY KEY (register_id, folio));
CREATE TABLE public.sale_lines (
    register_id int NOT NULL, folio bigint NOT NULL, line_no int NOT NULL, store_id int NOT NULL,
    item_id int NOT NULL, qty int NOT NULL,
    PRIMARY KEY (register_id, folio, line_no),
    FOREIGN KEY (register_id, folio) REFERENCES public.sales ON DELETE CASCADE);
"""

# HQ's own rule on consolidation: sold lines take HQ's stock down.  ENABLE ALWAYS, so it
# fires for the replicator's writes (replica mode); origin role inside, so the stock
# change is captured and flows down to the branches as the items catalog.
HQ_STOCK_TRIGGER = """
CREATE FUNCTION public.sale_line_stock() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET session_replication_role = origin AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE public.items SET stock = stock + OLD.qty WHERE id = OLD.item_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        UPDATE public.items SET stock = stock - NEW.qty WHERE id = NEW.item_id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER sale_line_stock AFTER INSERT OR UPDATE OR DELETE ON public.sale_lines
    FOR EACH ROW EXECUTE FUNCTION public.sale_line_stock();
ALTER TABLE public.sale_lines ENABLE ALWAYS TRIGGER sale_line_stock;
"""

CATALOGS = {"items": {"label": "Items", "default": True, "tables": ["public.items"]}}
UPLOADS = {"sales": {"label": "Ventas", "default": True, "tables": ["public.sales", "public.sale_lines"],
                     "owner": "store_id = :store_id",
                     "folios": {"table": "public.sales", "register": "register_id", "folio": "folio"}}}
KILLS = 12
STORES = {"store-a": (1, [11, 12]), "store-b": (2, [21, 22])}    # store id, its registers


class Uploading:
    """HQ with the schema, two branches registered with passwords, hq.yaml with uploads."""

    def __init__(self, tmp_path, hq, branch_a, branch_b):
        self.hq, self.dir = hq, tmp_path
        self.dbs = {"store-a": branch_a, "store-b": branch_b}
        for db in (hq, branch_a, branch_b):
            db.execute(SCHEMA)
        hq.execute(HQ_STOCK_TRIGGER)
        hq.execute("INSERT INTO public.items SELECT i, 'item ' || i, 1000 FROM generate_series(1, 20) i")
        self.hq_path = tmp_path / "hq.yaml"
        self.hq_path.write_text(yaml.safe_dump({"dsn": hq.dsn, "catalogs": CATALOGS, "uploads": UPLOADS}))
        assert replicator_cli("hq", "install", "-c", str(self.hq_path)).returncode == 0
        self.paths = {}
        for name, (store, _regs) in STORES.items():
            with hq.connect() as conn:
                add_branch(conn, config.load_hq(self.hq_path), name, {"store_id": str(store)}, f"pw-{name}")
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump({
                "branch": name, "source": {"dsn": self.login(name)}, "target": {"dsn": self.dbs[name].dsn}}))
            path.chmod(0o600)
            self.paths[name] = path

    def login(self, name: str) -> str:
        return self.hq.cluster.dsn(self.hq.name, role_name(name), f"pw-{name}")

    def cfg(self, name: str) -> config.BranchConfig:
        return config.load_branch(self.paths[name])

    def init(self, name: str, force: bool = False) -> list[str]:
        initialize(self.cfg(name), force=force)
        return upload_init.initialize(self.cfg(name), force=force)

    def run_once(self, name: str) -> None:
        assert run(self.cfg(name), once=True) == 0

    def slice(self, table: str, name: str, db=None) -> list[str]:
        return table_rows(db or self.hq, table, where=f"store_id = {STORES[name][0]}")


def sell(db, name: str, n: int, rng: random.Random, voids: bool = True) -> None:
    """n sales at a store: header and lines in one transaction; now and then a void (an
    update) or a line deleted."""
    store, registers = STORES[name]
    with db.connect() as conn:
        for _ in range(n):
            reg = rng.choice(registers)
            with conn.transaction():
                folio = conn.execute("SELECT coalesce(max(folio), 0) + 1 FROM public.sales WHERE register_id = %s",
                                     (reg,)).fetchone()[0]
                conn.execute("INSERT INTO public.sales VALUES (%s, %s, %s, 0)", (reg, folio, store))
                for line in range(1, rng.randint(1, 4) + 1):
                    conn.execute("INSERT INTO public.sale_lines VALUES (%s, %s, %s, %s, %s, %s)",
                                 (reg, folio, line, store, rng.randint(1, 20), rng.randint(1, 3)))
                conn.execute("UPDATE public.sales SET total = (SELECT sum(qty) FROM public.sale_lines "
                             "WHERE register_id = %s AND folio = %s) WHERE register_id = %s AND folio = %s",
                             (reg, folio, reg, folio))
            if voids and rng.random() < 0.1:
                with conn.transaction():
                    conn.execute("UPDATE public.sales SET voided = true WHERE register_id = %s AND folio = %s",
                                 (reg, folio))
                    conn.execute("DELETE FROM public.sale_lines WHERE register_id = %s AND folio = %s "
                                 "AND line_no > 1", (reg, folio))


def assert_slices_match(u: Uploading) -> None:
    for name, db in u.dbs.items():
        for table in ("public.sales", "public.sale_lines"):
            assert u.slice(table, name) == table_rows(db, table), f"{name}: {table} differs at HQ"


@pytest.fixture
def up(tmp_path, hq, branch_a, branch_b):
    return Uploading(tmp_path, hq, branch_a, branch_b)


def test_history_goes_up_at_init_and_two_branches_sell_at_once(up):
    rng = random.Random(19)
    sell(up.dbs["store-a"], "store-a", 30, rng)            # history before the first sync
    sell(up.dbs["store-b"], "store-b", 20, rng)
    assert up.init("store-a") == ["sales"]
    assert up.init("store-b") == ["sales"]
    assert_slices_match(up)
    before = up.hq.execute("SELECT sum(stock) FROM public.items")[0][0]

    # both stores sell while both replicators run
    stop = threading.Event()
    runners = [threading.Thread(target=run, args=(up.cfg(n),), kwargs={"stop": stop}) for n in STORES]
    for t in runners:
        t.start()
    sellers = [threading.Thread(target=sell, args=(up.dbs[n], n, 40, random.Random(i))) for i, n in enumerate(STORES)]
    for t in sellers:
        t.start()
    for t in sellers:
        t.join()
    stop.set()
    for t in runners:
        t.join(60)
    for n in STORES:
        up.run_once(n)
    assert_slices_match(up)
    # HQ's ENABLE ALWAYS trigger moved HQ's stock, and the stock came back down as a catalog
    sold = up.hq.execute("SELECT sum(qty) FROM public.sale_lines")[0][0]
    after = up.hq.execute("SELECT sum(stock) FROM public.items")[0][0]
    assert after < before and after == 20 * 1000 - sold
    for n in STORES:
        up.run_once(n)
        assert table_rows(up.dbs[n], "public.items") == table_rows(up.hq, "public.items")
    st = uploads.status(up.cfg("store-a"))
    assert st.initialized and st.pending == 0 and st.set_aside == 0
    assert "sales uploaded up to" in st.line() and "0 pending, 0 set aside" in st.line()


def test_uploads_initialized_while_run_runs_start_without_a_restart(up, monkeypatch):
    """`run` started before the branch's uploads were initialized carries the catalogs and
    says so; `replicator init` meanwhile starts the sales going up in the same process."""
    from replicator import runner
    monkeypatch.setattr(runner, "UPLOADS_CHECK", 0.5)
    initialize(up.cfg("store-a"))                          # the catalogs only
    _ring(up.dbs["store-a"], 11, 1, 1, [2, 3])
    stop = threading.Event()
    result = []
    runner = threading.Thread(target=lambda: result.append(run(up.cfg("store-a"), stop=stop)))
    runner.start()
    try:
        time.sleep(2)
        assert runner.is_alive() and up.hq.execute("SELECT count(*) FROM public.sales")[0][0] == 0
        assert upload_init.initialize(up.cfg("store-a")) == ["sales"]      # the history, at init
        _ring(up.dbs["store-a"], 11, 2, 1, [4])                        # and a sale after it
        deadline = time.monotonic() + 60
        while up.hq.execute("SELECT count(*) FROM public.sales WHERE folio = 2")[0][0] == 0:
            assert runner.is_alive() and time.monotonic() < deadline, "the new sale did not go up"
            time.sleep(0.2)
    finally:
        stop.set()
        runner.join(60)
    assert result == [0]
    assert_slices_match_one(up, "store-a")


def test_a_branch_login_writes_only_its_own_slice_from_psql(up):
    sell(up.dbs["store-b"], "store-b", 3, random.Random(1), voids=False)
    up.init("store-a")
    up.init("store-b")
    theirs = up.slice("public.sales", "store-b")
    with psycopg.connect(up.login("store-a"), autocommit=True) as conn:
        # reads: only its own rows
        assert conn.execute("SELECT count(*) FROM public.sales").fetchone()[0] == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("INSERT INTO public.sales VALUES (21, 999, 2, 5)")           # another store's row
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("INSERT INTO public.sales VALUES (21, 1, 1, 5) ON CONFLICT (register_id, folio) "
                         "DO UPDATE SET total = 0")                                  # another store's key
        assert conn.execute("UPDATE public.sales SET total = 0 WHERE store_id = 2").rowcount == 0
        assert conn.execute("DELETE FROM public.sales").rowcount == 0
        assert conn.execute("DELETE FROM public.sale_lines").rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("TRUNCATE public.sales")
        # moving its own row into another slice is refused too
        conn.execute("INSERT INTO public.sales VALUES (11, 500, 1, 5)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("UPDATE public.sales SET store_id = 2 WHERE folio = 500")
        # the other branch's upload position is neither visible nor writable
        assert conn.execute("SELECT stream FROM replication.position").fetchall() == [("uploads:store-a",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("INSERT INTO replication.position (stream, snapshot) VALUES "
                         "('uploads:store-c', pg_current_snapshot())")
        assert conn.execute("UPDATE replication.position SET applied_changes = 0 "
                            "WHERE stream = 'uploads:store-b'").rowcount == 0
        # other tables of HQ: nothing
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE public.items SET stock = 0")
    assert up.slice("public.sales", "store-b") == theirs


def test_rows_outside_the_slice_are_set_aside_and_named_and_the_rest_goes_on(up):
    up.init("store-a")
    up.init("store-b")
    sell(up.dbs["store-b"], "store-b", 2, random.Random(2), voids=False)
    up.run_once("store-b")
    a = up.dbs["store-a"]
    a.execute("INSERT INTO public.sales VALUES (11, 1, 1, 7)")            # an honest sale
    a.execute("INSERT INTO public.sales VALUES (12, 1, 2, 9)")            # forged: store 2's row
    b_key = up.hq.execute("SELECT register_id, folio FROM public.sales WHERE store_id = 2 LIMIT 1")[0]
    a.execute("INSERT INTO public.sales VALUES (%s, %s, 1, 3)", b_key)     # a key store-b's sale has
    a.execute("INSERT INTO public.sales VALUES (11, 2, 1, 8)")            # and another honest one
    b_before = up.slice("public.sales", "store-b")
    up.run_once("store-a")
    assert up.slice("public.sales", "store-a") == table_rows(a, "public.sales", where="store_id = 1 AND "
                                                             f"register_id <> {b_key[0]}")
    assert up.slice("public.sales", "store-b") == b_before
    rows = {r[0]: r[1] for r in up.hq.execute(
        "SELECT key, message FROM replication.set_aside WHERE stream = 'uploads:store-a'")}
    assert "outside store-a's slice of public.sales" in rows['["12", "1"]'] and "store_id = :store_id" in rows['["12", "1"]']
    assert "belongs to another branch's row of public.sales" in rows[f'["{b_key[0]}", "{b_key[1]}"]']
    st = uploads.status(up.cfg("store-a"))
    assert st.set_aside == 2 and "2 set aside" in st.line()
    res = replicator_cli("status", "-c", str(up.paths["store-a"]))
    assert res.returncode == 1 and "2 set aside" in res.stdout
    # the branch fixes its forged row: the newer image clears it
    a.execute("UPDATE public.sales SET store_id = 1 WHERE register_id = 12")
    up.run_once("store-a")
    assert up.hq.execute("SELECT count(*) FROM replication.set_aside WHERE stream = 'uploads:store-a'")[0][0] == 1


def _ring(db, reg: int, folio: int, store: int, qtys: list[int]) -> None:
    """One sale: its header and lines in one transaction, as a till commits it."""
    with db.connect() as conn, conn.transaction():
        conn.execute("INSERT INTO public.sales VALUES (%s, %s, %s, %s)", (reg, folio, store, sum(qtys)))
        for line, qty in enumerate(qtys, 1):
            conn.execute("INSERT INTO public.sale_lines VALUES (%s, %s, %s, %s, %s, %s)",
                         (reg, folio, line, store, line, qty))


def _aside(up, name: str) -> dict[str, tuple[str, str | None]]:
    return {k: (m, u) for k, m, u in up.hq.execute(
        "SELECT key, message, unit FROM replication.set_aside WHERE stream = %s", (f"uploads:{name}",))}


def _hq_stock_matches_its_lines(up) -> None:
    """HQ's ENABLE ALWAYS rule moved stock for exactly the lines HQ holds (none of a refused sale)."""
    assert up.hq.execute("""SELECT count(*) FROM public.items i WHERE stock <> 1000 - coalesce(
        (SELECT sum(qty) FROM public.sale_lines l WHERE l.item_id = i.id), 0)""")[0][0] == 0


def test_a_sale_with_one_refused_line_is_set_aside_whole_and_goes_up_whole_once_fixed(up):
    """The unit of uploads is the source transaction: HQ refuses one line (a CHECK only HQ
    has), so neither the header nor the other lines land; the sales around it do.  The
    store's correction of that line (a later transaction on the same key) is tried together
    with the waiting sale and takes it up whole; a DBA's fix at HQ takes another up on the
    next start."""
    up.init("store-a")
    up.hq.execute("ALTER TABLE public.sale_lines ADD CONSTRAINT hq_sane_qty CHECK (qty < 100)")
    a = up.dbs["store-a"]
    _ring(a, 11, 1, 1, [1, 2])
    _ring(a, 11, 2, 1, [3, 500, 4])              # line 2 breaks HQ's check
    _ring(a, 12, 1, 1, [5])
    up.run_once("store-a")
    assert up.hq.execute("SELECT register_id, folio FROM public.sales ORDER BY 1, 2") == [(11, 1), (12, 1)]
    assert up.hq.execute("SELECT count(*) FROM public.sale_lines WHERE folio = 2")[0][0] == 0
    aside = _aside(up, "store-a")
    assert set(aside) == {'["11", "2"]', '["11", "2", "1"]', '["11", "2", "2"]', '["11", "2", "3"]'}
    assert len({u for _m, u in aside.values()}) == 1 and None not in {u for _m, u in aside.values()}
    assert "hq_sane_qty" in aside['["11", "2", "2"]'][0] or "check constraint" in aside['["11", "2", "2"]'][0]
    assert aside['["11", "2"]'][0].startswith("set aside with its source transaction: HQ refused "
                                              'public.sale_lines key ["11", "2", "2"]')
    _hq_stock_matches_its_lines(up)
    res = replicator_cli("status", "-c", str(up.paths["store-a"]))
    assert res.returncode == 1 and "4 set aside" in res.stdout, res.stdout
    # the store corrects the line: that transaction joins the waiting sale, and both go up
    a.execute("UPDATE public.sale_lines SET qty = 5 WHERE register_id = 11 AND folio = 2 AND line_no = 2")
    up.run_once("store-a")
    assert _aside(up, "store-a") == {}
    assert up.hq.execute("SELECT qty FROM public.sale_lines WHERE folio = 2 ORDER BY line_no") == [(3,), (5,), (4,)]
    # another bad sale, then HQ's DBA relaxes the check: the next start takes it up whole
    _ring(a, 12, 2, 1, [7, 300])
    up.run_once("store-a")
    assert len(_aside(up, "store-a")) == 3
    up.hq.execute("ALTER TABLE public.sale_lines DROP CONSTRAINT hq_sane_qty")
    up.run_once("store-a")
    assert _aside(up, "store-a") == {}
    assert_slices_match_one(up, "store-a")
    _hq_stock_matches_its_lines(up)


HQ_ONLY_RULES = {
    # kind: (HQ's rule, what the branch allows instead, the SQLSTATE HQ refuses with)
    "unique": ("ALTER TABLE public.sale_lines ADD CONSTRAINT one_item UNIQUE (register_id, folio, item_id)",
               None, "23505"),
    "not null": (None, "ALTER TABLE public.sale_lines ALTER COLUMN qty DROP NOT NULL", "23502"),
    "enable always fk": ("""
        CREATE FUNCTION public.known_item() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT EXISTS (SELECT FROM public.items WHERE id = NEW.item_id) THEN
                RAISE EXCEPTION 'item % is not in HQ''s catalog', NEW.item_id USING ERRCODE = 'foreign_key_violation';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER known_item BEFORE INSERT OR UPDATE ON public.sale_lines
            FOR EACH ROW EXECUTE FUNCTION public.known_item();
        ALTER TABLE public.sale_lines ENABLE ALWAYS TRIGGER known_item;""", None, "23503"),
    # a value too long for an HQ column: HQ's picking list holds one-digit bin numbers
    "value too long": ("""
        CREATE TABLE public.picking (item_bin varchar(1));
        CREATE FUNCTION public.pick() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            INSERT INTO public.picking VALUES (NEW.item_id::text);
            RETURN NULL;
        END $$;
        CREATE TRIGGER pick AFTER INSERT ON public.sale_lines FOR EACH ROW EXECUTE FUNCTION public.pick();
        ALTER TABLE public.sale_lines ENABLE ALWAYS TRIGGER pick;""", None, "22001"),
}


@pytest.mark.parametrize("kind", list(HQ_ONLY_RULES))
def test_each_refusal_kind_at_hq_sets_the_sale_aside_whole(up, kind):
    """A UNIQUE, a NOT NULL, a foreign key an ENABLE ALWAYS trigger enforces or a value too
    long for an HQ column, only at HQ:
    the sale breaking it waits whole with the SQLSTATE, the sales around it land."""
    hq_rule, branch_rule, sqlstate = HQ_ONLY_RULES[kind]
    up.init("store-a")
    if hq_rule:
        up.hq.execute(hq_rule)
    a = up.dbs["store-a"]
    if branch_rule:
        a.execute(branch_rule)
    _ring(a, 11, 1, 1, [1, 2])
    with a.connect() as conn, conn.transaction():             # the bad sale: its second line breaks the rule
        conn.execute("INSERT INTO public.sales VALUES (11, 2, 1, 2)")
        conn.execute("INSERT INTO public.sale_lines VALUES (11, 2, 1, 1, 1, 1)")
        line = {"unique": (11, 2, 2, 1, 1, 1), "not null": (11, 2, 2, 1, 2, None),
                "enable always fk": (11, 2, 2, 1, 99, 1), "value too long": (11, 2, 2, 1, 99, 1)}[kind]
        conn.execute("INSERT INTO public.sale_lines VALUES (%s, %s, %s, %s, %s, %s)", line)
    _ring(a, 12, 1, 1, [3])
    up.run_once("store-a")
    assert up.hq.execute("SELECT register_id, folio FROM public.sales ORDER BY 1, 2") == [(11, 1), (12, 1)]
    assert up.hq.execute("SELECT count(*) FROM public.sale_lines WHERE folio = 2 AND register_id = 11")[0][0] == 0
    got = {k: st for k, st in up.hq.execute(
        "SELECT key, sqlstate FROM replication.set_aside WHERE stream = 'uploads:store-a'")}
    assert got == {'["11", "2"]': sqlstate, '["11", "2", "1"]': sqlstate, '["11", "2", "2"]': sqlstate}, got
    _hq_stock_matches_its_lines(up)


def test_a_sale_is_never_split_by_a_chunk_boundary(up):
    """Two tills ring up at once, their rows interleaved in the log, with chunks of two
    changes: a chunk grows until the sales begun in it are complete, so the sale with a
    refused line still waits whole (not its header applied in an earlier chunk)."""
    doc = yaml.safe_load(up.paths["store-a"].read_text())
    up.paths["store-a"].write_text(yaml.safe_dump({**doc, "batch_rows": 2}))
    up.init("store-a")
    up.hq.execute("ALTER TABLE public.sale_lines ADD CONSTRAINT hq_sane_qty CHECK (qty < 100)")
    a = up.dbs["store-a"]
    with a.connect() as one, a.connect() as two:
        one.autocommit = two.autocommit = False          # two open transactions, interleaved
        one.execute("INSERT INTO public.sales VALUES (11, 1, 1, 0)")
        two.execute("INSERT INTO public.sales VALUES (12, 1, 1, 0)")
        one.execute("INSERT INTO public.sale_lines VALUES (11, 1, 1, 1, 1, 1)")
        two.execute("INSERT INTO public.sale_lines VALUES (12, 1, 1, 1, 1, 1)")
        one.execute("INSERT INTO public.sale_lines VALUES (11, 1, 2, 1, 2, 500)")     # refused at HQ
        two.execute("INSERT INTO public.sale_lines VALUES (12, 1, 2, 1, 2, 2)")
        one.commit()
        two.commit()
    up.run_once("store-a")
    assert up.hq.execute("SELECT register_id FROM public.sales") == [(12,)]
    assert up.hq.execute("SELECT register_id, line_no FROM public.sale_lines ORDER BY 1, 2") == [(12, 1), (12, 2)]
    assert set(_aside(up, "store-a")) == {'["11", "1"]', '["11", "1", "1"]', '["11", "1", "2"]'}
    _hq_stock_matches_its_lines(up)


def test_a_transaction_that_swaps_unique_values_goes_up_beside_a_refused_sale(up):
    """In a chunk HQ refuses part of, each transaction is applied on its own; one that swaps
    two lines' items (unique per sale) cannot go key by key, and goes up as delete and
    insert, while the refused sale beside it waits."""
    up.hq.execute("ALTER TABLE public.sale_lines ADD CONSTRAINT one_item UNIQUE (register_id, folio, item_id)")
    # the branch's is checked at the end of the statement (DEFERRABLE), so its swap commits
    up.dbs["store-a"].execute("ALTER TABLE public.sale_lines ADD CONSTRAINT one_item UNIQUE "
                              "(register_id, folio, item_id) DEFERRABLE")
    up.init("store-a")
    a = up.dbs["store-a"]
    _ring(a, 11, 1, 1, [1, 2])                   # items 1 and 2
    up.run_once("store-a")
    up.hq.execute("ALTER TABLE public.sale_lines ADD CONSTRAINT hq_sane_qty CHECK (qty < 100)")
    a.execute("UPDATE public.sale_lines SET item_id = 3 - item_id WHERE register_id = 11 AND folio = 1")
    _ring(a, 11, 2, 1, [500])
    up.run_once("store-a")
    assert up.hq.execute("SELECT line_no, item_id FROM public.sale_lines WHERE folio = 1 ORDER BY 1") == \
        [(1, 2), (2, 1)]
    assert set(_aside(up, "store-a")) == {'["11", "2"]', '["11", "2", "1"]'}
    _hq_stock_matches_its_lines(up)


def test_set_aside_commands_list_retry_and_discard_a_sale_at_hq_whole(up):
    """`replicator set-aside ... --uploads` through the branch's own HQ login: list names
    each change of the refused sale, retry leaves it while HQ still refuses, discard of one
    line takes the whole sale into replication.discarded (recorded, with who)."""
    up.init("store-a")
    up.init("store-b")
    up.hq.execute("ALTER TABLE public.sale_lines ADD CONSTRAINT hq_sane_qty CHECK (qty < 100)")
    _ring(up.dbs["store-a"], 11, 1, 1, [1, 999])
    _ring(up.dbs["store-b"], 21, 1, 2, [999])
    up.run_once("store-a")
    up.run_once("store-b")
    cfg = ["-c", str(up.paths["store-a"]), "--uploads"]
    listed = replicator_cli("set-aside", "list", *cfg)
    assert listed.returncode == 1, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 3 and not any('["21"' in line for line in lines), listed.stdout
    assert any('public.sale_lines key ["11", "1", "2"]' in line and "hq_sane_qty" in line for line in lines)
    retried = replicator_cli("set-aside", "retry", *cfg)
    assert retried.returncode == 1 and "3 changes still set aside" in retried.stdout, retried.stdout + retried.stderr
    gone = replicator_cli("set-aside", "discard", *cfg, "public.sale_lines", '["11", "1", "1"]')
    assert gone.returncode == 0 and "and the 2 other changes of its source transaction" in gone.stdout, \
        gone.stdout + gone.stderr
    assert _aside(up, "store-a") == {}
    assert len(_aside(up, "store-b")) == 2                     # the other branch's sale still waits
    assert up.hq.execute("SELECT count(*), min(discarded_by) FROM replication.discarded "
                         "WHERE stream = 'uploads:store-a'")[0] == (3, role_name("store-a"))
    again = replicator_cli("set-aside", "discard", *cfg, "public.sales", '["21", "1"]')
    assert again.returncode == 2 and "nothing of public.sales key" in again.stderr, again.stdout + again.stderr
    assert len(_aside(up, "store-b")) == 2                     # another branch's rows are out of its reach
    assert up.hq.execute("SELECT count(*) FROM public.sales WHERE store_id = 1")[0][0] == 0


def assert_slices_match_one(up, name: str) -> None:
    for table in ("public.sales", "public.sale_lines"):
        assert up.slice(table, name) == table_rows(up.dbs[name], table), f"{name}: {table} differs at HQ"


def test_a_sale_an_hq_in_latin1_cannot_hold_waits_whole_and_the_others_go_up(tmp_path, hq_cluster, branch_a,
                                                                              branch_b):
    """HQ's database in LATIN1, the store's in UTF8: text is converted on the way up, and a
    sale with a character LATIN1 has no equivalent for is set aside whole (22P05), named."""
    name = f"hq_latin1_{uuid.uuid4().hex[:8]}"
    hq_cluster.database("postgres").execute(psycopg.sql.SQL(
        "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
        psycopg.sql.Identifier(name)))
    try:
        latin1 = hq_cluster.database(name)
        up = Uploading(tmp_path, latin1, branch_a, branch_b)
        for db in (latin1, branch_a):
            db.execute("ALTER TABLE public.sales ADD COLUMN customer text")
        up.init("store-a")
        a = up.dbs["store-a"]
        for folio, customer in ((1, "Zoë Muñoz"), (2, "東京 Ltd"), (3, "plain")):
            with a.connect() as conn, conn.transaction():
                conn.execute("INSERT INTO public.sales (register_id, folio, store_id, total, customer) "
                             "VALUES (11, %s, 1, 1, %s)", (folio, customer))
                conn.execute("INSERT INTO public.sale_lines VALUES (11, %s, 1, 1, 1, 1)", (folio,))
        up.run_once("store-a")
        assert latin1.execute("SELECT folio, customer FROM public.sales ORDER BY 1") == [(1, "Zoë Muñoz"),
                                                                                         (3, "plain")]
        assert latin1.execute("SELECT folio FROM public.sale_lines ORDER BY 1") == [(1,), (3,)]
        aside_rows = {k: (st, m) for k, st, m in latin1.execute("SELECT key, sqlstate, message FROM replication.set_aside")}
        assert {k: st for k, (st, _m) in aside_rows.items()} == {'["11", "2"]': "22P05", '["11", "2", "1"]': "22P05"}
        assert 'has no equivalent in encoding "LATIN1"' in aside_rows['["11", "2"]'][1]
    finally:
        hq_cluster.drop_database(name)


def test_a_sale_after_a_truncate_in_the_same_chunk_still_waits_whole(up):
    """A branch's TRUNCATE goes table-wide (inside its slice); the sales committed after it
    in the same chunk still go up, or wait, whole: the refused sale's header does not land."""
    up.init("store-a")
    up.hq.execute("ALTER TABLE public.sale_lines ADD CONSTRAINT hq_sane_qty CHECK (qty < 100)")
    a = up.dbs["store-a"]
    _ring(a, 11, 1, 1, [1])
    a.execute("TRUNCATE public.sale_lines, public.sales")
    _ring(a, 12, 1, 1, [1, 500])           # its second line is refused at HQ
    _ring(a, 12, 2, 1, [2])
    up.run_once("store-a")
    assert up.hq.execute("SELECT register_id, folio FROM public.sales ORDER BY 1, 2") == [(12, 2)]
    assert up.hq.execute("SELECT register_id, folio, line_no FROM public.sale_lines ORDER BY 1, 2, 3") == [(12, 2, 1)]
    assert set(_aside(up, "store-a")) == {'["12", "1"]', '["12", "1", "1"]', '["12", "1", "2"]'}


def test_truncate_and_reinit_at_one_branch_leave_the_other_untouched(up):
    rng = random.Random(3)
    sell(up.dbs["store-a"], "store-a", 10, rng)
    sell(up.dbs["store-b"], "store-b", 10, rng)
    up.init("store-a")
    up.init("store-b")
    b_sales, b_lines = up.slice("public.sales", "store-b"), up.slice("public.sale_lines", "store-b")
    assert b_sales
    a = up.dbs["store-a"]
    a.execute("TRUNCATE public.sale_lines, public.sales")
    sell(a, "store-a", 3, rng)
    up.run_once("store-a")
    assert_slices_match(up)
    assert up.slice("public.sales", "store-b") == b_sales and up.slice("public.sale_lines", "store-b") == b_lines
    # re-init without --force does nothing; with it, only store-a's slice is replaced
    assert upload_init.initialize(up.cfg("store-a")) == []
    a.execute("DELETE FROM public.sale_lines WHERE folio = 1")
    assert upload_init.initialize(up.cfg("store-a"), force=True) == ["sales"]
    assert_slices_match(up)
    assert up.slice("public.sales", "store-b") == b_sales and up.slice("public.sale_lines", "store-b") == b_lines


def test_verify_and_repair_inside_the_slice_with_both_branches_rows_at_hq(up):
    rng = random.Random(5)
    for n in STORES:
        sell(up.dbs[n], n, 15, rng)
        up.init(n)
    for n in STORES:
        up.run_once(n)           # HQ's stock moved with the history: it comes down as a catalog
        res = replicator_cli("verify", "-c", str(up.paths[n]))
        assert res.returncode == 0, res.stdout + res.stderr
        assert "public.sales" in res.stdout and "sales up: branch and its slice at HQ" in res.stdout
        assert "extra" not in res.stdout                     # the other store's rows are not this one's
    # HQ loses one of store-a's lines, holds another total, and gains a row in store-a's slice
    b_sales, b_lines = up.slice("public.sales", "store-b"), up.slice("public.sale_lines", "store-b")
    lost = up.hq.execute("SELECT register_id, folio, line_no FROM public.sale_lines WHERE store_id = 1 LIMIT 1")[0]
    up.hq.execute("DELETE FROM public.sale_lines WHERE (register_id, folio, line_no) = (%s, %s, %s)", lost)
    up.hq.execute("UPDATE public.sales SET total = total + 100 WHERE store_id = 1 AND folio = 2")
    up.hq.execute("INSERT INTO public.sales VALUES (11, 9999, 1, 1)")
    res = replicator_cli("verify", "-c", str(up.paths["store-a"]), "--json")
    assert res.returncode == 1
    import json
    doc = {t["table"]: t for t in json.loads(res.stdout)["tables"] if t["direction"] == "uploads"}
    assert doc["public.sale_lines"]["missing"] == [dict(zip(("register_id", "folio", "line_no"), lost))]
    assert doc["public.sales"]["extra"] == [{"register_id": 11, "folio": 9999}]
    assert len(doc["public.sales"]["different"]) == len(STORES["store-a"][1])      # folio 2 of each register
    res = replicator_cli("verify", "-c", str(up.paths["store-a"]), "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "re-sent to the branch's slice at HQ" in res.stdout
    assert_slices_match(up)
    assert up.slice("public.sales", "store-b") == b_sales and up.slice("public.sale_lines", "store-b") == b_lines
    # rows HQ set aside (store-b's key, store 2's row) are differences repair leaves alone
    b_key = up.hq.execute("SELECT register_id, folio FROM public.sales WHERE store_id = 2 LIMIT 1")[0]
    up.dbs["store-a"].execute("INSERT INTO public.sales VALUES (%s, %s, 1, 3), (12, 777, 2, 9)", b_key)
    up.run_once("store-a")
    assert up.hq.execute("SELECT count(*) FROM replication.set_aside WHERE stream = 'uploads:store-a'")[0][0] == 2
    res = replicator_cli("verify", "-c", str(up.paths["store-a"]), "--repair", "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    doc = {t["table"]: t for t in json.loads(res.stdout)["tables"] if t["direction"] == "uploads"}
    assert sorted(map(tuple, (k.values() for k in doc["public.sales"]["missing"]))) == sorted([tuple(b_key), (12, 777)])
    assert up.slice("public.sales", "store-b") == b_sales
    # HQ's stock trigger saw the repair as it sees uploads: stock is HQ's start minus what was sold
    sold = up.hq.execute("SELECT sum(qty) FROM public.sale_lines")[0][0]
    assert up.hq.execute("SELECT sum(stock) FROM public.items")[0][0] == 20 * 1000 - sold


def test_verify_before_the_uploads_are_initialized_compares_the_catalogs(up):
    initialize(up.cfg("store-a"))                          # catalogs only: the sales never went up
    res = replicator_cli("verify", "-c", str(up.paths["store-a"]))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "public.items" in res.stdout and "public.sales" not in res.stdout
    assert "sales not compared: uploads of branch store-a are not initialized" in res.stderr


def test_a_purge_drops_old_sales_at_the_branch_and_hq_keeps_them(up):
    a = up.dbs["store-a"]
    sell(a, "store-a", 12, random.Random(8), voids=False)
    up.init("store-a")
    old = up.slice("public.sales", "store-a"), up.slice("public.sale_lines", "store-a")
    cfg = str(up.paths["store-a"])
    res = replicator_cli("purge", "-c", cfg, "public.sales", "--where", "folio <= 3", "--dry-run")
    assert res.returncode == 0 and "would delete" in res.stdout, res.stdout + res.stderr
    assert table_rows(a, "public.sales") == old[0]
    before = dict(((r, f), t) for r, f, t in a.execute("SELECT register_id, folio, total FROM public.sales"))
    a.execute("UPDATE public.sales SET total = total + 1 WHERE folio = 1")       # pending when purged
    res = replicator_cli("purge", "-c", cfg, "public.sales", "--where", "folio <= 3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rows of public.sale_lines" in res.stdout and "HQ keeps them" in res.stdout
    assert a.execute("SELECT count(*) FROM public.sales WHERE folio <= 3")[0][0] == 0
    assert a.execute("SELECT count(*) FROM public.sale_lines WHERE folio <= 3")[0][0] == 0
    sell(a, "store-a", 2, random.Random(9), voids=False)
    up.run_once("store-a")
    # HQ keeps every purged sale and line, with the change that was waiting when it ran
    totals = dict(((r, f), t) for r, f, t in a.execute("SELECT register_id, folio, total FROM public.sales"))
    q = "SELECT register_id, folio, total FROM public.sales WHERE store_id = 1"
    at_hq = {(r, f): t for r, f, t in up.hq.execute(q)}
    assert {k for k in at_hq if k[1] <= 3} == {k for k in before if k[1] <= 3} and at_hq
    assert all(at_hq[k] == before[k] + (1 if k[1] == 1 else 0) for k in before)
    assert all(at_hq[k] == t for k, t in totals.items())
    assert up.slice("public.sale_lines", "store-a") == sorted(set(old[1]) | set(table_rows(a, "public.sale_lines")))
    hq_sales = up.slice("public.sales", "store-a")
    # verify does not call them extra, and a re-init keeps them at HQ
    res = replicator_cli("verify", "-c", cfg)
    assert res.returncode == 0, res.stdout + res.stderr
    assert upload_init.initialize(up.cfg("store-a"), force=True) == ["sales"]
    assert up.slice("public.sales", "store-a") == hq_sales
    # refused: a table that is no upload, a predicate outside the grammar
    res = replicator_cli("purge", "-c", cfg, "public.items", "--where", "id = 1")
    assert res.returncode == 2 and "is not an upload table of branch store-a" in res.stderr, res.stderr
    res = replicator_cli("purge", "-c", cfg, "public.sales", "--where", "folio = (SELECT 1)")
    assert res.returncode == 2 and "purge predicate refused" in res.stderr and "Traceback" not in res.stderr
    assert up.dbs["store-a"].execute("SELECT count(*) FROM replication.purges")[0][0] == 1


def test_a_purge_that_would_orphan_a_kept_return_is_refused(up):
    """A return row points at the sale it returns (a foreign key of sales to itself): a
    purge that takes the sale and keeps the return is refused, and nothing is purged."""
    for db in (up.hq, up.dbs["store-a"]):
        db.execute("ALTER TABLE public.sales ADD COLUMN returns_folio bigint, ADD CONSTRAINT returns_sale "
                   "FOREIGN KEY (register_id, returns_folio) REFERENCES public.sales")
    a = up.dbs["store-a"]
    for folio in (1, 2, 3):
        _ring(a, 11, folio, 1, [1])
    a.execute("INSERT INTO public.sales VALUES (11, 4, 1, -1, false, 2)")        # returns folio 2
    up.init("store-a")
    cfg = str(up.paths["store-a"])
    res = replicator_cli("purge", "-c", cfg, "public.sales", "--where", "folio <= 3")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert "1 row of public.sales that the purge keeps references rows it deletes (foreign key returns_sale)" \
        in res.stderr, res.stderr
    assert a.execute("SELECT count(*) FROM public.sales")[0][0] == 4
    assert a.execute("SELECT count(*) FROM replication.purges")[0][0] == 0
    res = replicator_cli("purge", "-c", cfg, "public.sales", "--where", "folio <= 4")
    assert res.returncode == 0, res.stdout + res.stderr
    assert a.execute("SELECT count(*) FROM public.sales")[0][0] == 0
    assert up.hq.execute("SELECT count(*) FROM public.sales")[0][0] == 4                 # HQ keeps them


def test_a_purge_predicate_means_the_same_rows_in_every_session(branch_a):
    """Stored, and evaluated again at HQ later: a time must not depend on TimeZone or DateStyle."""
    from replicator import purge
    branch_a.execute("CREATE TABLE public.tills (id int PRIMARY KEY, sold_at timestamptz, day date)")
    with branch_a.connect() as conn:
        for where in ("sold_at < '2025-01-01'", "sold_at < '2025-01-01 00:00'", "day < '01/02/2025'"):
            with pytest.raises(ConfigError, match="UTC offset|ISO 8601"):
                purge.condition(conn, "public", "tills", where)
        for where in ("sold_at < '2025-01-01 00:00:00-06'", "sold_at < '2025-01-01T00:00Z'", "day < '2025-01-02'",
                      "id < 10"):
            purge.condition(conn, "public", "tills", where)


def test_a_sale_rings_up_while_hq_is_down(up, hq_cluster):
    up.init("store-a")
    hq_cluster.stop()
    try:
        sell(up.dbs["store-a"], "store-a", 5, random.Random(4))     # the till never waits for HQ
    finally:
        hq_cluster.start()
    up.run_once("store-a")
    assert_slices_match(up)


def test_branch_sql_prints_the_upload_capture(up):
    res = replicator_cli("sql", "-c", str(up.paths["store-a"]))
    assert res.returncode == 0, res.stderr
    assert "replication.attach_table('sales', 'public', 'sales'" in res.stdout
    assert "replication.attach_table('sales', 'public', 'sale_lines'" in res.stdout
    assert "pw-store-a" not in res.stdout
    fresh = up.dbs["store-b"]
    proc = replicator_cli("sql", "-c", str(up.paths["store-b"]))
    with fresh.connect() as conn:
        conn.execute(proc.stdout)        # the script applies as printed
        assert conn.execute("SELECT count(*) FROM replication.tables WHERE catalog = 'sales'").fetchone()[0] == 2


def test_hq_install_warns_when_a_key_does_not_keep_branches_apart(tmp_path, hq):
    hq.execute("CREATE TABLE public.tickets (id bigint PRIMARY KEY, store_id int NOT NULL)")
    path = tmp_path / "hq.yaml"
    path.write_text(yaml.safe_dump({"dsn": hq.dsn, "catalogs": {"c": {"tables": ["public.tickets2"]}},
                                    "uploads": {"tickets": {"tables": ["public.tickets"],
                                                            "owner": "store_id = :store_id"}}}))
    hq.execute("CREATE TABLE public.tickets2 (id int PRIMARY KEY)")
    res = replicator_cli("hq", "install", "-c", str(path))
    assert res.returncode == 0, res.stderr
    assert "primary key of public.tickets (id) holds none of store_id" in res.stderr


@pytest.mark.parametrize("uploads_doc, message", [
    ({"sales": {"tables": ["public.sales"]}}, "no owner predicate for public.sales"),
    ({"sales": {"tables": ["public.items"], "owner": "id = :id"}}, "is in catalog items"),
    ({"Sales": {"tables": ["public.sales"], "owner": "store_id = :s"}}, "upload ids are lower-case"),
    ({"items": {"tables": ["public.sales"], "owner": "store_id = :s"}}, "already a catalog"),
    ({"sales": {"tables": ["public.sales"], "owner": "store_id = :s", "colour": 1}}, "unknown setting"),
    ({"sales": {"tables": [], "owner": "store_id = :s"}}, "needs at least one table"),
    ({"sales": {"tables": ["public.sales"], "owners": {"public.x": "a = 1"}}}, "not in this catalog's tables"),
    ({"sales": {"tables": ["public.sales"], "owner": "store_id = :s",
                "folios": {"table": "public.x", "register": "r", "folio": "f"}}}, "not in this upload's tables"),
    ({"sales": {"tables": ["public.sales"], "owner": "store_id = :s", "folios": {"table": "public.sales"}}},
     "missing required setting"),
])
def test_bad_uploads_in_hq_yaml_name_file_line_and_key(tmp_path, uploads_doc, message):
    path = tmp_path / "hq.yaml"
    path.write_text(yaml.safe_dump({"dsn": "postgresql:///x", "catalogs": CATALOGS, "uploads": uploads_doc}))
    with pytest.raises(ConfigError, match=message) as e:
        config.load_hq(path)
    assert str(path) in str(e.value) and ":" in str(e.value)
    res = replicator_cli("hq", "sql", "-c", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr and message.split()[0] in res.stderr


@pytest.mark.parametrize("owner, message", [
    ("store_id IN (SELECT 1)", "owner predicate"),
    ("nope = :store_id", "owner predicate"),
    ("store_id = 1; DROP TABLE public.sales", "owner predicate"),
])
def test_bad_owner_predicates_are_refused_by_hq_install_before_any_change(tmp_path, hq, owner, message):
    hq.execute(SCHEMA)
    path = tmp_path / "hq.yaml"
    path.write_text(yaml.safe_dump({"dsn": hq.dsn, "catalogs": CATALOGS,
                                    "uploads": {"sales": {"tables": ["public.sales"], "owner": owner}}}))
    res = replicator_cli("hq", "install", "-c", str(path))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert hq.execute("SELECT to_regclass('replication.uploads')")[0][0] is None


def test_a_folio_column_that_is_no_whole_number_is_refused_by_hq_install(tmp_path, hq):
    hq.execute(SCHEMA.replace("folio bigint NOT NULL, store_id int NOT NULL,\n    total",
                              "folio bigint NOT NULL, store_id int NOT NULL, ticket text,\n    total"))
    path = tmp_path / "hq.yaml"
    folios = {"table": "public.sales", "register": "register_id", "folio": "ticket"}
    path.write_text(yaml.safe_dump({"dsn": hq.dsn, "catalogs": CATALOGS, "uploads": {"sales": {
        "tables": ["public.sales"], "owner": "store_id = :store_id", "folios": folios}}}))
    res = replicator_cli("hq", "install", "-c", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "folios: public.sales.ticket is text; a folio is a whole number" in res.stderr, res.stderr
    assert hq.execute("SELECT to_regclass('replication.uploads')")[0][0] is None


def test_an_unknown_upload_in_branch_yaml_is_a_config_error(up):
    doc = yaml.safe_load(up.paths["store-a"].read_text())
    doc["uploads"] = ["refunds"]
    up.paths["store-a"].write_text(yaml.safe_dump(doc))
    res = replicator_cli("status", "-c", str(up.paths["store-a"]))
    assert res.returncode == 2 and "unknown upload refunds" in res.stderr and "uploads" in res.stderr


def test_hq_status_shows_each_branchs_sales(up):
    sell(up.dbs["store-a"], "store-a", 4, random.Random(5))
    for n in STORES:
        up.init(n)
    up.run_once("store-a")
    res = replicator_cli("hq", "status", "-c", str(up.hq_path), "--json")
    assert res.returncode == 0, res.stderr
    doc = {b["branch"]: b for b in yaml.safe_load(res.stdout)["branches"]}
    assert doc["store-a"]["sales"]["uploaded_until"] is not None
    assert doc["store-a"]["sales"]["pending"] == 0 and doc["store-a"]["sales"]["set_aside"] == 0
    assert yaml.safe_load(res.stdout)["folio_gaps"] == []
    # a register skips folios (a till that lost them, a sale set aside): HQ lists the gaps
    a = up.dbs["store-a"]
    a.execute("INSERT INTO public.sales VALUES (13, 1, 1, 5), (13, 2, 1, 5), (13, 5, 1, 5), (13, 9, 1, 5), "
              "(14, 1, 1, 5), (14, 3, 1, 5)")
    a.execute("INSERT INTO public.sales VALUES (21, 1, 2, 5)")               # forged: set aside, no gap
    up.run_once("store-a")
    res = replicator_cli("hq", "status", "-c", str(up.hq_path))
    assert res.returncode == 0, res.stderr
    assert "folio gap: public.sales register 13: 5 folios missing at HQ (3-4, 6-8)" in res.stdout, res.stdout
    assert "folio gap: public.sales register 14: 1 folio missing at HQ (2)" in res.stdout, res.stdout
    gaps = yaml.safe_load(replicator_cli("hq", "status", "-c", str(up.hq_path), "--json").stdout)["folio_gaps"]
    assert [(g["register"], g["missing"], g["ranges"]) for g in gaps] == [(13, 5, ["3-4", "6-8"]), (14, 1, ["2"])]


BACKLOG = """
CREATE PROCEDURE ring_up(p_store int, p_register int, n int) LANGUAGE plpgsql AS $$
DECLARE
    f bigint;
BEGIN
    SELECT coalesce(max(folio), 0) INTO f FROM public.sales WHERE register_id = p_register;
    FOR i IN 1 .. n LOOP
        INSERT INTO public.sales VALUES (p_register, f + i, p_store, i % 50);
        INSERT INTO public.sale_lines SELECT p_register, f + i, l, p_store, 1 + (i + l) % 20, 1
          FROM generate_series(1, 3) l;
        IF i % 25 = 0 THEN
            UPDATE public.sales SET voided = true WHERE register_id = p_register AND folio = f + i - 1;
            DELETE FROM public.sale_lines WHERE register_id = p_register AND folio = f + i - 1 AND line_no = 3;
        END IF;
        COMMIT;
    END LOOP;
END $$;
"""


def test_sigkill_during_a_large_upload_applies_every_sale_exactly_once(up):
    rng = random.Random(int(os.environ.get("REPLICATOR_TEST_SEED", "19")))
    a = up.dbs["store-a"]
    up.init("store-a")
    up.init("store-b")
    a.execute(BACKLOG)
    logged = "SELECT last_value FROM " + "pg_catalog.pg_sequences WHERE schemaname = 'replication' AND sequencename = 'change_log_id_seq'"
    first = a.execute(logged)[0][0] or 0
    a.execute("CALL ring_up(1, 11, 4000)")                 # 4,000 sales queued: 16,000+ changes
    assert a.execute(logged)[0][0] - first > 16000
    doc = yaml.safe_load(up.paths["store-a"].read_text())
    up.paths["store-a"].write_text(yaml.safe_dump({**doc, "batch_rows": 300}))   # many HQ transactions
    position = "SELECT applied_changes FROM replication.position WHERE stream = 'uploads:store-a'"
    kills, midway = 0, set()
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-m", "replicator", "run", "-c", str(up.paths["store-a"])],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill at a random moment once this run has committed something: inside the upload
        last, deadline = up.hq.execute(position)[0][0], time.monotonic() + 30
        while up.hq.execute(position)[0][0] == last and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(10)
        done = up.hq.execute(position)[0][0]
        if 0 < done < a.execute(logged)[0][0] - first:
            midway.add(done)
        if rng.random() < 0.3:
            a.execute("CALL ring_up(1, 12, 50)")           # the store keeps selling between kills
    assert kills >= 10 and len(midway) >= 3, (kills, midway)     # kills fell inside the upload
    up.run_once("store-a")
    assert_slices_match(up)
    # one log row per change here (single-row statements): HQ counted each exactly once
    applied = up.hq.execute(position)[0][0]
    assert applied == a.execute(logged)[0][0] - first
