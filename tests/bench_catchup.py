"""Catch-up rate: 100,000 mixed changes queued on HQ while the branch is stopped,
then `replicator run --once` timed end to end (process start to exit).

Run:  .venv/bin/python tests/bench_catchup.py
      (env: TXNS=600 for 600,000 changes, BATCH=5000 for batch_rows, RUNS=1 for one run)
"""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from replicator.cluster import Cluster  # noqa: E402
from tests.harness import assert_same, make_setup  # noqa: E402

SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY, sku text NOT NULL, name text, price numeric(12,2),
                   qty int NOT NULL, updated timestamptz NOT NULL DEFAULT now());
CREATE TABLE stock (id int PRIMARY KEY, store int NOT NULL, qty numeric(12,3), note text,
                    updated timestamptz NOT NULL DEFAULT now());
"""
# ~1000 changes per transaction: 400 inserts, 500 updates, 100 deletes (40/50/10)
CHURN = """
CREATE PROCEDURE churn(first int, n int) LANGUAGE plpgsql AS $$
DECLARE base int;
BEGIN
    FOR i IN first .. first + n - 1 LOOP
        base := (i / 2) * 400;
        IF i % 2 = 0 THEN
            INSERT INTO item SELECT base + g, 'SKU-' || (base + g), 'item ' || md5((base + g)::text),
                                    (base + g) % 1000 + 0.99, g FROM generate_series(1, 400) g;
            UPDATE item SET qty = qty + 1, price = price + 1, updated = now()
             WHERE id BETWEEN base - 500 AND base - 1;
            DELETE FROM item WHERE id BETWEEN base - 800 AND base - 701;
        ELSE
            INSERT INTO stock SELECT base + g, g % 50, g * 1.5, NULL FROM generate_series(1, 400) g;
            UPDATE stock SET qty = qty - 1, note = 'sold', updated = now()
             WHERE id BETWEEN base - 500 AND base - 1;
            DELETE FROM stock WHERE id BETWEEN base - 800 AND base - 701;
        END IF;
        COMMIT;
    END LOOP;
END $$;
"""
CATALOGS = {"items": {"label": "Items", "default": True, "tables": ["public.item", "public.stock"]}}
TXNS = int(os.environ.get("TXNS", "100"))


def main() -> None:
    rates = []
    with Cluster("bench-hq") as hq_c, Cluster("bench-branch") as br_c:
        for rep in range(int(os.environ.get("RUNS", "3"))):
            hq, br = hq_c.create_database(f"hq{rep}"), br_c.create_database(f"br{rep}")
            tmp = Path(tempfile.mkdtemp(prefix="bench-catchup-"))
            setup = make_setup(tmp, hq, CATALOGS, SCHEMA, [br])
            branch = setup.add_branch(f"bench{rep}", br, batch_rows=int(os.environ.get("BATCH", "20000")))
            branch.init()
            hq.execute(CHURN)
            # warm-up so both tables have rows for updates and deletes from the first measured txn
            hq.execute("CALL churn(0, 4)")
            assert branch.cli("run", "--once").returncode == 0
            before = hq.scalar("SELECT count(*) FROM replication.change_log")
            hq.execute("CALL churn(4, %s)", (TXNS,))
            changes = hq.scalar("SELECT count(*) FROM replication.change_log") - before
            hq.execute("VACUUM ANALYZE replication.change_log")
            t0 = time.monotonic()
            r = branch.cli("run", "--once", timeout=600)
            elapsed = time.monotonic() - t0
            assert r.returncode == 0, r.stderr
            for t in ("item", "stock"):
                assert_same(hq, br, t)
            rates.append(changes / elapsed)
            print(f"run {rep + 1}: {changes} changes in {elapsed:.2f} s = {changes / elapsed:,.0f} changes/s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"median: {statistics.median(rates):,.0f} changes/s")


if __name__ == "__main__":
    main()
