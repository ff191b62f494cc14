"""Where capture's cost goes: variants of the capture trigger's UPDATE statement, timed on
one UPDATE of 1,000,000 rows against the same UPDATE without capture, and the wake-up
NOTIFY with 2 and 8 pgbench clients.  The README's miss analysis quotes these figures.

Run:  .venv/bin/python tests/bench_capture_variants.py [hq|hq_durable ...]
      (default both clusters; env RUNS=2, ROWS=1000000, SECONDS=15)
"""
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from replicator import bench as b  # noqa: E402

RUNS = int(os.environ.get("RUNS", "2"))
ROWS = int(os.environ.get("ROWS", "1000000"))
SECONDS = int(os.environ.get("SECONDS", "15"))

# A key-change detector that costs nothing when keys stay: a row trigger whose WHEN is false.
KEY_TRIGGER = """
CREATE FUNCTION bench_keychg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO replication.change_log (table_id, op, row) VALUES (1, 'D', to_jsonb(OLD)); RETURN NULL; END $$;
CREATE TRIGGER bench_keychg AFTER UPDATE ON items FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION bench_keychg();
ALTER TABLE items DISABLE TRIGGER bench_keychg;
ALTER TABLE replication.change_log ADD rtext text, ADD rbin bytea;
"""
JOIN = ("FROM new_rows n FULL JOIN old_rows o ON o.id = n.id "
        "WHERE n.* IS NULL OR o.* IS NULL OR NOT (o.* OPERATOR(pg_catalog.*=) n.*)")
LOG = "INSERT INTO replication.change_log (table_id, op"
VARIANTS = {   # name -> (capture mode, replacement for the UPDATE branch's INSERT, key trigger on)
    "floor: an empty log row": ("floor", None, False),
    "JSONB image, no join": (True, f"{LOG}, row) SELECT 1, 'U', pg_catalog.to_jsonb(n.*) FROM new_rows n;", False),
    "JSONB image, no join, key-change row trigger": (
        True, f"{LOG}, row) SELECT 1, 'U', pg_catalog.to_jsonb(n.*) FROM new_rows n;", True),
    "text image, no join": (True, f"{LOG}, rtext) SELECT 1, 'U', n.*::text FROM new_rows n;", False),
    "binary image (record_send), no join": (True, f"{LOG}, rbin) SELECT 1, 'U', record_send(n.*) FROM new_rows n;",
                                            False),
    "empty log row after the join": (True, f"{LOG}) SELECT 1, 'U' {JOIN};", False),
    "capture as installed": (True, "", False),
}


def bulk_variants(env: b.Env, which: str) -> None:
    hq, _ = b.capture_db(env, "variants", ROWS, which)
    hq.execute(b.FLOOR_TRIGGER)
    hq.execute(KEY_TRIGGER)
    installed = hq.scalar("SELECT prosrc FROM pg_proc WHERE proname = 'capture_1'")
    branch = installed[installed.index("ELSIF TG_OP = 'UPDATE'"):installed.index("ELSIF TG_OP = 'DELETE'")]
    statement = branch[branch.index("INSERT INTO"):branch.rindex(";") + 1]
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    b.set_capture(hq, False)
    b.bulk_update(hq)                                   # warm-up: the table reaches its steady size
    for run in range(RUNS):
        b.set_capture(hq, False)
        env.checkpoint()
        base = b.bulk_update(hq)
        for name, (mode, body, key_trigger) in VARIANTS.items():
            b.set_capture(hq, mode)
            source = installed.replace(statement, body) if body else installed
            hq.execute("CREATE OR REPLACE FUNCTION replication.capture_1() RETURNS trigger LANGUAGE plpgsql "
                       "SECURITY DEFINER AS $f$" + source + "$f$")
            hq.execute(f"ALTER TABLE items {'ENABLE' if key_trigger else 'DISABLE'} TRIGGER bench_keychg")
            env.checkpoint()
            ratios[name].append(b.bulk_update(hq) / base)
        print(f"{which} run {run}: " + ", ".join(f"{n} {r[-1]:.2f}×" for n, r in ratios.items()), flush=True)
    print(f"\n{which}: one UPDATE of {ROWS:,} rows, time vs no capture (range over {RUNS} runs)")
    for name, r in ratios.items():
        print(f"  {name:48s} {min(r):.2f}–{max(r):.2f}×")
    hq.cluster.drop_database(hq.name)


def notify_variants(env: b.Env, which: str) -> None:
    hq, _ = b.capture_db(env, "notify", ROWS, which)
    hq.execute(b.FLOOR_TRIGGER)
    script = env.workdir / "update.sql"
    script.write_text(b.PGBENCH_SCRIPT)
    b.set_capture(hq, False)
    b.bulk_update(hq)
    print(f"\n{which}: pgbench single-row UPDATE, {SECONDS} s, TPS vs no capture (median of {RUNS})")
    for clients in (2, 8):
        tps: dict[str, list[float]] = {"off": [], "on": [], "notify off": []}
        for _ in range(RUNS):
            for mode in tps:
                b.set_capture(hq, mode != "off")
                b.set_notify(hq, mode != "notify off")
                env.checkpoint()
                tps[mode].append(b.pgbench_tps(hq, script, ROWS, SECONDS, clients))
        b.set_notify(hq, True)
        off = statistics.median(tps["off"])
        print(f"  {clients} clients: capture {statistics.median(tps['on']) / off:.2f}×, "
              f"with replicator.notify = off {statistics.median(tps['notify off']) / off:.2f}×", flush=True)
    hq.cluster.drop_database(hq.name)


def main() -> None:
    clusters = sys.argv[1:] or ["hq", "hq_durable"]
    env = b.Env(Path(tempfile.mkdtemp(prefix="bench-variants-")), b.FULL, RUNS)
    try:
        for which in clusters:
            bulk_variants(env, which)
        notify_variants(env, "hq_durable")
    finally:
        env.close()


if __name__ == "__main__":
    main()
