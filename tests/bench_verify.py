"""Benchmark: `replicator verify` of a 1,000,000-row table (target: under 10 s when equal).

    .venv/bin/python tests/bench_verify.py [--rows 1000000] [--runs 3]

Not collected by pytest (the name does not start with test_).  Starts an HQ
and a branch cluster, fills an items-like table on HQ (text, numeric,
timestamptz, boolean, text[], a row filter on the branch's store), copies it
with `replicator init`, and times `verify` when the tables are equal, then
with a handful of differing rows (the narrowing pass included).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from harness import make_setup  # noqa: E402
from replicator.cluster import Cluster  # noqa: E402
from replicator.verify import verify  # noqa: E402

SCHEMA = """
CREATE TABLE public.articles (
    store_id   int NOT NULL,
    id         bigint NOT NULL,
    sku        text NOT NULL,
    name       text NOT NULL,
    price      numeric(14,4) NOT NULL,
    active     boolean NOT NULL,
    tags       text[] NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (store_id, id)
);
"""
FILL = """
INSERT INTO public.articles
SELECT s, g, 'SKU-' || g, 'Artículo ' || md5(g::text), round((g %% 9973) * 1.37, 4), g %% 7 <> 0,
       ARRAY['t' || (g %% 11)], '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 second'
  FROM generate_series(1, %(rows)s) g, generate_series(1, %(stores)s) s
"""
CATALOGS = {"articles": {"label": "Artículos", "default": True, "tables": ["public.articles"],
                         "filter": "store_id = :store_id"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows the branch holds (default 1,000,000)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with Cluster("bench-hq") as hc, Cluster("bench-branch") as bc, tempfile.TemporaryDirectory() as tmp:
        hq, branch = hc.create_database("pos"), bc.create_database("pos")
        hq.execute(SCHEMA)
        branch.execute(SCHEMA)
        t0 = time.monotonic()
        hq.execute(FILL, {"rows": args.rows, "stores": 2})    # HQ holds 2 stores; the branch gets one
        hq.execute("VACUUM ANALYZE public.articles")
        setup = make_setup(Path(tmp), hq, CATALOGS)
        b = setup.add_branch("bench-store", branch, params={"store_id": 1})
        b.init()
        branch.execute("VACUUM ANALYZE public.articles")
        print(f"setup: {args.rows:,} rows on the branch ({2 * args.rows:,} on HQ) in {time.monotonic() - t0:.1f} s")

        equal = _time(lambda: verify(b.cfg), args.runs, expect_equal=True)
        print(f"verify, equal:        median {statistics.median(equal):.2f} s  (runs: "
              f"{', '.join(f'{x:.2f}' for x in equal)})")
        with branch.connect() as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute("DELETE FROM public.articles WHERE store_id = 1 AND id IN (10, 500000)")
            conn.execute("UPDATE public.articles SET price = price + 1 WHERE store_id = 1 AND id IN (7, 77, 777)")
            conn.execute("INSERT INTO public.articles VALUES (1, %s, 'x', 'extra', 1, true, '{}', now())",
                         (args.rows + 1,))
        differ = _time(lambda: verify(b.cfg, wait=0), args.runs, expect_equal=False)
        print(f"verify, 6 rows differ: median {statistics.median(differ):.2f} s  (runs: "
              f"{', '.join(f'{x:.2f}' for x in differ)})")
        ok = statistics.median(equal) < 10
        print("PASS: under 10 s" if ok else "FAIL: 10 s or more")
        return 0 if ok else 1


def _time(fn, runs: int, expect_equal: bool) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.monotonic()
        report = fn()
        out.append(time.monotonic() - start)
        assert report.equal is expect_equal, report
    return out


if __name__ == "__main__":
    sys.exit(main())
