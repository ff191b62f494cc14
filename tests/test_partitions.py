"""Partitioned tables on either side (issue: real schemas replicate as their tools create them).

HQ's partitioned table is captured once, through its parent, rows that move between its
partitions included; a partitioned branch table receives rows that move between its own
partitions; a plain table on one side and a partitioned one on the other work too.
"""
from __future__ import annotations

import pytest

from harness import assert_same, make_setup

PARTITIONED = """
CREATE TABLE stock (store_id int NOT NULL, item_id int NOT NULL, qty int, PRIMARY KEY (store_id, item_id))
    PARTITION BY LIST (store_id);
CREATE TABLE stock_1 PARTITION OF stock FOR VALUES IN (1);
CREATE TABLE stock_2 PARTITION OF stock FOR VALUES IN (2);
CREATE TABLE stock_rest PARTITION OF stock DEFAULT;
CREATE TABLE prices (item_id int PRIMARY KEY, band text NOT NULL, price numeric(10,2)) PARTITION BY HASH (item_id);
CREATE TABLE prices_0 PARTITION OF prices FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE prices_1 PARTITION OF prices FOR VALUES WITH (MODULUS 2, REMAINDER 1);
"""
PLAIN = """
CREATE TABLE stock (store_id int NOT NULL, item_id int NOT NULL, qty int, PRIMARY KEY (store_id, item_id));
CREATE TABLE prices (item_id int PRIMARY KEY, band text NOT NULL, price numeric(10,2));
"""
CATALOGS = {"stock": {"label": "Stock", "default": True, "tables": ["public.stock", "public.prices"]}}


def _changes(hq) -> None:
    hq.execute("INSERT INTO stock SELECT s, i, i FROM generate_series(1, 3) s, generate_series(1, 50) i")
    hq.execute("INSERT INTO prices SELECT i, 'b', i FROM generate_series(1, 1200) i")      # a bulk statement
    hq.execute("UPDATE stock SET store_id = 2, item_id = item_id + 100 WHERE store_id = 1 AND item_id <= 10")
    hq.execute("UPDATE stock SET store_id = 9, qty = 0 WHERE store_id = 2 AND item_id BETWEEN 41 AND 50")
    hq.execute("UPDATE prices SET item_id = item_id + 5000 WHERE item_id <= 20")            # key moves partition
    hq.execute("UPDATE prices SET price = price * 2")                                       # bulk, every partition
    hq.execute("DELETE FROM stock WHERE store_id = 3 AND item_id % 7 = 0")


@pytest.mark.parametrize("hq_side, branch_side", [(PARTITIONED, PARTITIONED), (PARTITIONED, PLAIN),
                                                  (PLAIN, PARTITIONED)],
                         ids=["both-partitioned", "partitioned-hq", "partitioned-branch"])
def test_partitioned_tables_replicate_rows_that_move_between_partitions(tmp_path, hq, branch_a,
                                                                        hq_side, branch_side):
    hq.execute(hq_side)
    branch_a.execute(branch_side)
    s = make_setup(tmp_path, hq, CATALOGS)
    if hq_side is PARTITIONED:   # capture through the parents (their row trigger's clones are PostgreSQL's)
        assert {r[0] for r in hq.execute("SELECT tgrelid::regclass::text FROM pg_trigger "
                                         "WHERE tgname ~ '^replicator_capture_(ins|upd|del|trunc)$'")} == {"stock", "prices"}
    b = s.add_branch("p", branch_a)
    hq.execute("INSERT INTO stock VALUES (1, 1000, 1), (2, 1000, 2)")
    b.init()
    _changes(hq)
    b.run_once()
    for table in ("stock", "prices"):
        assert_same(hq, branch_a, table)
    assert hq.scalar("SELECT count(*) FROM stock WHERE store_id = 9") == 10
    assert hq.scalar("SELECT count(*) FROM replication.change_log") > 0
    if branch_side is PARTITIONED:      # moved rows sit in their new partitions on the branch too
        for part, where in (("stock_1", "store_id = 1"), ("stock_2", "store_id = 2"),
                            ("stock_rest", "store_id NOT IN (1, 2)")):
            assert branch_a.scalar(f"SELECT count(*) FROM ONLY {part}") == \
                hq.scalar(f"SELECT count(*) FROM stock WHERE {where}"), part
