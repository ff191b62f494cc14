"""Where capture's cost goes: variants of the capture trigger's UPDATE statement, timed on
one UPDATE of 1,000,000 rows against the same UPDATE without capture; the single-row
capture taken apart one piece at a time (pgbench, 2 clients); what a session's first
UPDATE does to its later ones (migration 004); and the wake-up NOTIFY with 2 and 8 pgbench
clients.  The README's miss analysis quotes these figures.

Run:  .venv/bin/python tests/bench_capture_variants.py [hq|hq_durable ...]
      (default both clusters; env RUNS=2, ROWS=1000000, SECONDS=15,
      PARTS=bulk,log,single,session,notify picks parts; PICK=text,text keeps the bulk variants whose
      names contain one of the texts, e.g. PICK="floor,before migration,as installed")
"""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from replicator import bench as b  # noqa: E402

RUNS = int(os.environ.get("RUNS", "2"))
ROWS = int(os.environ.get("ROWS", "1000000"))
SECONDS = int(os.environ.get("SECONDS", "15"))
PARTS = os.environ.get("PARTS", "bulk,log,single,session,notify").split(",")
PICK = [text for text in os.environ.get("PICK", "").split(",") if text]

# A key-change detector that costs nothing when keys stay: a row trigger whose WHEN is false.
KEY_TRIGGER = """
CREATE FUNCTION bench_keychg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO replication.change_log (table_id, op, row) VALUES (1, 'D', to_jsonb(OLD)); RETURN NULL; END $$;
CREATE TRIGGER bench_keychg AFTER UPDATE ON items FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION bench_keychg();
-- The capture function under a statement trigger that keeps no old transition table.
CREATE TRIGGER bench_newonly AFTER UPDATE ON items REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION replication.capture_1();
ALTER TABLE items DISABLE TRIGGER bench_keychg, DISABLE TRIGGER bench_newonly;
ALTER TABLE replication.change_log ADD rtext text, ADD rbin bytea;
"""
JOIN = ("FROM new_rows n FULL JOIN old_rows o ON o.id = n.id "
        "WHERE n.id IS NULL OR o.id IS NULL OR NOT (o.* OPERATOR(pg_catalog.*=) n.*)")
LOG = "INSERT INTO replication.change_log (table_id, op"
NO_JOIN = f"{LOG}, row) SELECT 1, 'U', pg_catalog.to_jsonb(n.*) FROM new_rows n;"
VARIANTS = {   # name -> (capture mode, replacement for the UPDATE branch's INSERT (or a function of the
               #          installed source and that INSERT giving the whole source),
               #          extra triggers on: "key" the key-change row trigger, "new only" the
               #          capture function without the old transition table instead of capture's)
    "floor: an empty log row": ("floor", None, ()),
    "JSONB image, no join": (True, NO_JOIN, ()),
    "JSONB image, no join, key-change row trigger": (True, NO_JOIN, ("key",)),
    "the same without the old transition table": (False, NO_JOIN, ("key", "new only")),
    "row_to_json image, no join, key-change trigger": (
        True, f"{LOG}, rtext) SELECT 1, 'U', pg_catalog.row_to_json(n.*)::text FROM new_rows n;", ("key",)),
    # What writing the image's bytes costs, with no image built: one image-sized constant.
    "an image-sized constant, no join": (
        True, f"{LOG}, row) SELECT 1, 'U', (SELECT pg_catalog.to_jsonb(i) FROM items i LIMIT 1) FROM new_rows n;",
        ()),
    "text image, no join": (True, f"{LOG}, rtext) SELECT 1, 'U', n.*::text FROM new_rows n;", ()),
    "binary image (record_send), no join": (True, f"{LOG}, rbin) SELECT 1, 'U', record_send(n.*) FROM new_rows n;",
                                            ()),
    "empty log row after the join": (True, f"{LOG}) SELECT 1, 'U' {JOIN};", ()),
    "1,024 JSONB images per log row, after the join": (
        True, f"{LOG}, row) SELECT 1, 'U', pg_catalog.jsonb_agg(img) FROM (SELECT pg_catalog.to_jsonb(n.*) img, "
              f"pg_catalog.hashint8(coalesce(n.id, o.id)) OPERATOR(pg_catalog.&) 1023 g {JOIN}) s GROUP BY g;", ()),
    "images 1,000 to a log row after the old/new join (no-op skip kept)": (
        True, f"{LOG}, rows) SELECT 1, 'u', pg_catalog.array_agg(img) FROM (SELECT pg_catalog.to_jsonb(n.*) img, "
              f"(pg_catalog.row_number() OVER ()) OPERATOR(pg_catalog./) 1000 g {JOIN}) s GROUP BY g;", ()),
    "capture before migration 003 (whole-row NULL tests)": (True, lambda source, _: before_003(), ()),
    "capture of migration 003 (merge join, JIT)": (True, lambda source, _: HISTORY[3], ()),
    "capture of migration 004 (a log row per row, hash join)": (True, lambda source, _: HISTORY[4], ()),
    "capture as installed": (True, "", ()),
}


def set_body(hq, source: str, definer: bool = True) -> None:
    """Replace the capture function of `items` (table id 1) with `source`."""
    hq.execute("CREATE OR REPLACE FUNCTION replication.capture_1() RETURNS trigger LANGUAGE plpgsql "
               + ("SECURITY DEFINER " if definer else "") + "AS $f$" + source + "$f$")


def update_statement(source: str, bulk: bool = True) -> str:
    """The INSERT that the capture function runs for an UPDATE (the part the variants replace;
    since migration 004 the function has it twice: for small statements first, then for bulk)."""
    start = source.index("INSERT INTO", source.index("ELSIF TG_OP = 'UPDATE'",
                                                     source.index("planner :=") if bulk else 0))
    return source[start:source.index(";", start) + 1]


MIGRATIONS = Path(__file__).resolve().parent.parent / "sql/hq"
HISTORY: dict[int, str] = {}    # migration -> the capture function of `items` its capture_body generates


def load_history(hq) -> None:
    """The capture functions that migrations 003 and 004 generated for `items`, from their own
    capture_body (run under another name), for comparison with the installed one."""
    for version in (3, 4):
        text = next(MIGRATIONS.glob(f"{version:03d}_*.sql")).read_text().replace("CREATE OR REPLACE", "CREATE")
        start = text.index("CREATE FUNCTION replication.capture_body(")
        function = text[start:text.index("END $$;", start) + len("END $$;")]
        hq.execute(function.replace("CREATE FUNCTION replication.capture_body(",
                                    "CREATE OR REPLACE FUNCTION public.bench_capture_body("))
        HISTORY[version] = hq.scalar("SELECT public.bench_capture_body(1, 'items'::regclass, ARRAY['id'], NULL, '{}')")
        hq.execute("DROP FUNCTION public.bench_capture_body")


def before_003() -> str:
    """The capture function as migration 002 generated it: whole-row NULL tests in the join,
    and the writer-settings check for every table (the check's text is in migration 003)."""
    migration = (MIGRATIONS / "003_lean_capture.sql").read_text()
    guard, restore = (block.split("$g$;")[0] for block in migration.split(":= $g$")[1:3])
    old = HISTORY[3].replace("n.id IS NULL", "n.* IS NULL").replace("o.id IS NULL", "o.* IS NULL")
    old = old.replace("BEGIN\n", "BEGIN" + guard + "\n", 1).replace("\n    RETURN NULL;", restore + "\n    RETURN NULL;")
    if old.count("current_setting('DateStyle')") != 2 or "n.* IS NULL" not in old:
        raise SystemExit("the capture function changed shape: cannot rebuild the one before migration 003")
    return old


def check_logged(name: str, rows: int) -> None:
    """A variant that logs nothing would look cheap: each must write what its name says."""
    expected = range(1, 1025) if "per log row" in name else range(ROWS, ROWS + 1)
    if rows not in expected:
        raise SystemExit(f"variant {name!r} wrote {rows} log rows for an UPDATE of {ROWS} rows")


def bulk_variants(env: b.Env, which: str) -> None:
    hq, _ = b.capture_db(env, "variants", ROWS, which)
    hq.execute(b.FLOOR_TRIGGER)
    hq.execute(KEY_TRIGGER)
    load_history(hq)
    installed = hq.scalar("SELECT prosrc FROM pg_proc WHERE proname = 'capture_1'")
    statement = update_statement(installed)
    picked = {name: v for name, v in VARIANTS.items() if not PICK or any(text in name for text in PICK)}
    ratios: dict[str, list[float]] = {name: [] for name in picked}
    b.set_capture(hq, False)
    b.bulk_update(hq)                                   # warm-up: the table reaches its steady size
    for run in range(RUNS):
        seconds = {}
        for name, (mode, body, extra) in picked.items():
            b.set_capture(hq, mode)
            source = body(installed, statement) if callable(body) else \
                installed.replace(statement, body) if body else installed
            set_body(hq, source)
            for trigger, key in (("bench_keychg", "key"), ("bench_newonly", "new only")):
                hq.execute(f"ALTER TABLE items {'ENABLE' if key in extra else 'DISABLE'} TRIGGER {trigger}")
            env.checkpoint()
            logged: list[int] = []
            seconds[name] = b.bulk_update(hq, logged)
            check_logged(name, logged[0])
        base = baseline(env, hq)
        for name, value in seconds.items():
            ratios[name].append(value / base)
        print(f"{which} run {run}: " + ", ".join(f"{n} {r[-1]:.2f}×" for n, r in ratios.items()), flush=True)
    report(f"{which}: one UPDATE of {ROWS:,} rows, time vs no capture", ratios)
    hq.cluster.drop_database(hq.name)


def baseline(env: b.Env, hq) -> float:
    """The UPDATE without capture, twice, the faster counting: the shared machine now and then
    slows one statement down, and one slow baseline would flatter every ratio of its run."""
    b.set_capture(hq, False)
    times = []
    for _ in range(2):
        env.checkpoint()
        times.append(b.bulk_update(hq))
    return min(times)


def report(title: str, ratios: dict[str, list[float]]) -> None:
    print(f"\n{title} (median and range over {RUNS} runs)")
    for name, r in ratios.items():
        print(f"  {name:48s} {statistics.median(r):.2f}×  ({min(r):.2f}–{max(r):.2f})", flush=True)


INVOKER = "  and not SECURITY DEFINER"


def strip(source: str, start: str, end: str) -> str:
    """`source` without the first block that begins with `start` and ends with `end`."""
    i = source.index(start)
    return source[:i] + source[source.index(end, i) + len(end):]


SETTINGS_CHECK = "    IF pg_catalog.current_setting('DateStyle')"


def single_row_ladder(installed: str) -> dict[str, str]:
    """The installed capture function with one piece more removed at each step, so the
    steps' differences add up to what single-row capture costs above the floor.  The
    writer-settings check is generated only for tables that need it (items does not): with
    it, the ladder has a step for it."""
    no_notify = strip(installed, "    IF TG_LEVEL = 'STATEMENT'", "\n    END IF;\n")
    steps = {"capture as installed": installed, "  without the NOTIFY": no_notify}
    body = no_notify
    if SETTINGS_CHECK in body:
        body = steps["  and without the writer-settings check"] = strip(body, SETTINGS_CHECK, "\n    END IF;\n")
    statement = update_statement(body, bulk=False)
    steps["  and without the old/new join"] = body.replace(
        statement, f"{LOG}, row) SELECT 1, 'U', pg_catalog.to_jsonb(n.*) FROM new_rows n;")
    steps["  and without the image"] = body.replace(statement, f"{LOG}) SELECT 1, 'U' FROM new_rows n;")
    sources = list(steps.values())
    if any(a == b for a, b in zip(sources, sources[1:])):
        raise SystemExit("the capture function changed shape: a step of the ladder removed nothing")
    # The last step keeps the body and runs it with the writer's rights (single_row_variants).
    return {"capture before migration 003": before_003(), "capture of migration 003": HISTORY[3],
            "capture of migration 004": HISTORY[4], **steps, INVOKER: steps["  and without the image"]}


def single_row_variants(env: b.Env, which: str) -> None:
    hq, _ = b.capture_db(env, "ladder", ROWS, which)
    hq.execute(b.FLOOR_TRIGGER)
    script = env.workdir / "update.sql"
    script.write_text(b.PGBENCH_SCRIPT)
    load_history(hq)
    ladder = single_row_ladder(hq.scalar("SELECT prosrc FROM pg_proc WHERE proname = 'capture_1'"))
    tps: dict[str, list[float]] = {"no capture": [], "floor: an empty log row": [], **{n: [] for n in ladder}}
    b.set_capture(hq, False)
    b.bulk_update(hq)
    for _ in range(RUNS):
        for name in tps:
            b.set_capture(hq, False if name == "no capture" else "floor" if name.startswith("floor") else True)
            if name in ladder:
                set_body(hq, ladder[name], definer=name != INVOKER)
            env.checkpoint()
            tps[name].append(b.pgbench_tps(hq, script, ROWS, SECONDS))
    off = statistics.median(tps["no capture"])
    print(f"\n{which}: pgbench single-row UPDATE, 2 clients, {SECONDS} s, TPS vs no capture "
          f"(median of {RUNS}; each step removes one more piece)")
    for name, values in tps.items():
        print(f"  {name:48s} {statistics.median(values) / off:.2f}×", flush=True)
    hq.cluster.drop_database(hq.name)


# What one log row costs in a bulk UPDATE: the floor trigger writing into copies of the
# change log with one part left out at a time.
LOG_TABLES = {
    "  without the id's identity": """CREATE TABLE l_noid (LIKE replication.change_log INCLUDING DEFAULTS
        INCLUDING CONSTRAINTS INCLUDING INDEXES); ALTER TABLE l_noid ALTER id DROP NOT NULL""",
    "  without the ts BRIN index": """CREATE TABLE l_nobrin (LIKE replication.change_log INCLUDING DEFAULTS
        INCLUDING IDENTITY INCLUDING CONSTRAINTS); CREATE INDEX ON l_nobrin (xid)""",
    "  without the xid index": """CREATE TABLE l_noxid (LIKE replication.change_log INCLUDING DEFAULTS
        INCLUDING IDENTITY INCLUDING CONSTRAINTS); CREATE INDEX ON l_noxid USING brin (ts)""",
    "  a bare (table_id, op) table": "CREATE TABLE l_bare (table_id int, op \"char\")",
}


def log_row_parts(env: b.Env, which: str) -> None:
    hq, _ = b.capture_db(env, "logparts", ROWS, which)
    hq.execute(b.FLOOR_TRIGGER)
    tables = {}
    for name, ddl in LOG_TABLES.items():
        hq.execute(ddl)
        table = ddl.split()[2]
        tables[name] = table
        hq.execute(f"""CREATE FUNCTION {table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            INSERT INTO {table} (table_id, op) SELECT 0, 'U' FROM new_rows; RETURN NULL; END $$;
            CREATE TRIGGER {table} AFTER UPDATE ON items REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION {table}()""")
    ratios: dict[str, list[float]] = {"floor: an empty row in replication.change_log": [], **{n: [] for n in tables}}
    b.set_capture(hq, False)
    b.bulk_update(hq)
    for _ in range(RUNS):
        seconds = {}
        for name in ratios:
            b.set_capture(hq, "floor" if name.startswith("floor") else False)
            if name in tables:
                hq.execute(f"ALTER TABLE items ENABLE TRIGGER {tables[name]}")
            env.checkpoint()
            seconds[name] = b.bulk_update(hq)
            if name in tables:
                hq.execute(f"TRUNCATE {tables[name]}")
        base = baseline(env, hq)
        for name, value in seconds.items():
            ratios[name].append(value / base)
    report(f"{which}: one UPDATE of {ROWS:,} rows with one empty log row per changed row, time vs no capture",
           ratios)
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


SESSION_STATEMENTS = 2000


def single_rows(conn) -> float:
    """Milliseconds per single-row UPDATE, over SESSION_STATEMENTS of them in `conn`."""
    started = time.perf_counter()
    for i in range(SESSION_STATEMENTS):
        conn.execute("UPDATE items SET price = price + 1 WHERE id = %s", (i % ROWS + 1,))
    return (time.perf_counter() - started) / SESSION_STATEMENTS * 1000


def session_plans(env: b.Env, which: str) -> None:
    """What a session's first captured UPDATE does to its later ones, with the capture
    function before and after migration 004 (a plpgsql plan is made at a statement's first
    run and kept): single-row UPDATEs after a bulk one, a bulk UPDATE after a single-row one."""
    hq, _ = b.capture_db(env, "session", ROWS, which)
    hq.execute(b.FLOOR_TRIGGER)
    load_history(hq)
    installed = hq.scalar("SELECT prosrc FROM pg_proc WHERE proname = 'capture_1'")
    sources = {"before migration 004": HISTORY[3], "as installed": installed}
    bulk: dict[str, list[float]] = {"no capture": []}
    single: dict[str, list[float]] = {}
    b.set_capture(hq, False)
    b.bulk_update(hq)
    for _ in range(RUNS):
        b.set_capture(hq, False)
        env.checkpoint()
        bulk["no capture"].append(b.bulk_update(hq))
        b.set_capture(hq, True)
        for name, source in sources.items():
            set_body(hq, source)
            for first in ("bulk", "single-row"):
                env.checkpoint()
                with hq.connect(autocommit=True) as conn:
                    if first == "single-row":
                        conn.execute("UPDATE items SET price = price + 1 WHERE id = 1")
                    started = time.perf_counter()
                    conn.execute("UPDATE items SET price = price + 1")
                    bulk.setdefault(f"{name}: bulk UPDATE, first in session: {first}", []).append(
                        time.perf_counter() - started)
                    if first == "bulk":
                        single.setdefault(f"{name}: after a bulk UPDATE in the session", []).append(single_rows(conn))
                b.settle(hq)
            with hq.connect(autocommit=True) as conn:
                single.setdefault(f"{name}: in a fresh session", []).append(single_rows(conn))
            b.settle(hq)
    base = statistics.median(bulk.pop("no capture"))
    report(f"{which}: one UPDATE of {ROWS:,} rows, time vs no capture, by the session's first UPDATE",
           {name: [t / base for t in times] for name, times in bulk.items()})
    print(f"\n{which}: milliseconds per single-row UPDATE ({SESSION_STATEMENTS:,} in one session; median and range)")
    for name, values in single.items():
        print(f"  {name:48s} {statistics.median(values):.3f} ms  ({min(values):.3f}–{max(values):.3f})", flush=True)
    hq.cluster.drop_database(hq.name)


def main() -> None:
    clusters = sys.argv[1:] or ["hq", "hq_durable"]
    env = b.Env(Path(tempfile.mkdtemp(prefix="bench-variants-")), b.FULL, RUNS)
    try:
        for which in clusters:
            if "bulk" in PARTS:
                bulk_variants(env, which)
            if "log" in PARTS:
                log_row_parts(env, which)
        for which in clusters:
            if "single" in PARTS:
                single_row_variants(env, which)
        for which in clusters:
            if "session" in PARTS:
                session_plans(env, which)
        if "notify" in PARTS:
            notify_variants(env, "hq_durable")
    finally:
        env.close()


if __name__ == "__main__":
    main()
