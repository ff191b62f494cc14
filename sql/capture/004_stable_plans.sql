-- replicator: capture on HQ, migration 004.
--
-- Capture's statements get the same plans in every session (README, Performance).  A
-- plpgsql function plans a statement at its first run in a session and keeps that
-- plan, made for that run's transition-table size.  A session whose first UPDATE was a
-- bulk one kept a merge join with JIT for its later single-row UPDATEs, which then
-- compiled JIT code on every run (10 ms each instead of 0.2); an INSERT or DELETE large
-- enough for the planner to choose JIT (several million rows) did the same to later
-- single-row ones.  Each capture statement now has one copy for fewer than 1,000 rows
-- and one for more, planned without JIT and, for the UPDATE's old/new join, with a hash
-- join.  Redefines capture_body; `replicator hq install` then regenerates every table's
-- capture function, because its text changed.

-- The text of one table's capture function: static statements (their plans are
-- cached) that write the table's row images into the change log.
CREATE OR REPLACE FUNCTION replication.capture_body(p_tid int, p_rel regclass, p_keys text[], p_filter text,
                                         p_exclude text[])
RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
    rel      regclass := p_rel;
    keys     text[] := p_keys;
    tid      int := p_tid;
    same_key text;
    -- n.* / o.*: whole-row references even when the table has a column named n or o
    new_img  text := 'pg_catalog.to_jsonb(n.*)';
    old_img  text := 'pg_catalog.to_jsonb(o.*)';
    upd_old  text := 'NULL';
    exact    text[];         -- columns whose to_jsonb() form is not exact: they travel as text
    new_txt  text;
    old_txt  text;
    no_new   text;           -- "this old row has no new row": its first key column is NULL
    guard    text := '';     -- the writer-settings check, when the table needs it
    restore  text := '';
    writes   text;           -- the statements that log rows (the function has them twice)
BEGIN
    SELECT string_agg(format('o.%1$I OPERATOR(pg_catalog.=) n.%1$I', k), ' AND ') INTO same_key FROM unnest(keys) AS k;
    no_new := format('n.%I IS NULL', keys[1]);
    IF cardinality(p_exclude) > 0 THEN
        new_img := format('(pg_catalog.to_jsonb(n.*) OPERATOR(pg_catalog.-) %L::text[])', p_exclude);
        old_img := format('(pg_catalog.to_jsonb(o.*) OPERATOR(pg_catalog.-) %L::text[])', p_exclude);
    END IF;
    -- to_jsonb() loses the text of json (key order, spacing, duplicate keys), turns a
    -- json(b) null into SQL NULL, -0 into 0, and drops array bounds; composites nest all
    -- of these.  Such columns travel as their text form and the branch reads them back
    -- with the type's input function, as COPY would (apply.py).  The columns are named in
    -- the trigger: after DROP or RENAME of one, re-run `replicator hq install`.
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO exact
      FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname <> ALL (coalesce(p_exclude, '{}'))
       AND (a.atttypid IN ('pg_catalog.json'::regtype, 'pg_catalog.jsonb'::regtype,
                           'pg_catalog.float4'::regtype, 'pg_catalog.float8'::regtype)
            OR ty.typcategory = 'A' OR ty.typtype = 'c');
    IF exact IS NOT NULL THEN
        -- jsonb_build_object takes at most 100 arguments: 50 columns per call
        SELECT string_agg(format('pg_catalog.jsonb_build_object(%s)', pn), ' OPERATOR(pg_catalog.||) '),
               string_agg(format('pg_catalog.jsonb_build_object(%s)', po), ' OPERATOR(pg_catalog.||) ')
          INTO new_txt, old_txt
          FROM (SELECT string_agg(format('%L, n.%I::pg_catalog.text', c, c), ', ' ORDER BY i) AS pn,
                       string_agg(format('%L, o.%I::pg_catalog.text', c, c), ', ' ORDER BY i) AS po
                  FROM unnest(exact) WITH ORDINALITY AS u(c, i) GROUP BY (i - 1) / 50) g;
        new_img := format('(%s OPERATOR(pg_catalog.||) %s)', new_img, new_txt);
        old_img := format('(%s OPERATOR(pg_catalog.||) %s)', old_img, old_txt);
    END IF;
    IF p_filter IS NOT NULL THEN
        upd_old := old_img;   -- lets a branch see a row leave its filter
    END IF;

    -- The images must not depend on the writing session's settings (a float with
    -- extra_float_digits = 0 loses digits; DateStyle, IntervalStyle and bytea_output
    -- change text forms).  Function-level SET clauses would cost every write a GUC
    -- save/restore; instead the rare session with unusual settings takes a slow path
    -- that pins them for the capture statement and restores them.  TimeZone does not
    -- matter: every text form carries its offset, and readers compare keys by value.
    -- A table whose columns' images depend on none of these settings skips the check
    -- (it costs a single-row write about 0.04 of its speed).  Domains count by their
    -- base type; anything not listed here keeps the check.
    IF EXISTS (SELECT FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
                WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                  AND a.attname <> ALL (coalesce(p_exclude, '{}'))
                  AND ty.typtype <> 'e'
                  AND (CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE ty.oid END)::regtype NOT IN (
                      'int2', 'int4', 'int8', 'oid', 'numeric', 'bool', 'text', 'varchar', 'bpchar',
                      'name', '"char"', 'uuid', 'date', 'timestamp', 'timestamptz', 'json', 'jsonb')) THEN
        guard := $g$
    IF pg_catalog.current_setting('DateStyle') NOT LIKE 'ISO%'
       OR pg_catalog.current_setting('IntervalStyle') OPERATOR(pg_catalog.<>) 'postgres'
       OR pg_catalog.current_setting('extra_float_digits') OPERATOR(pg_catalog.<) '1'
       OR pg_catalog.current_setting('bytea_output') OPERATOR(pg_catalog.<>) 'hex' THEN
        saved := ARRAY[pg_catalog.current_setting('DateStyle'), pg_catalog.current_setting('IntervalStyle'),
                       pg_catalog.current_setting('extra_float_digits'), pg_catalog.current_setting('bytea_output')];
        PERFORM pg_catalog.set_config('DateStyle', 'ISO, MDY', true),
                pg_catalog.set_config('IntervalStyle', 'postgres', true),
                pg_catalog.set_config('extra_float_digits', '3', true),
                pg_catalog.set_config('bytea_output', 'hex', true);
    END IF;$g$;
        restore := $g$
    IF saved IS NOT NULL THEN
        PERFORM pg_catalog.set_config('DateStyle', saved[1], true),
                pg_catalog.set_config('IntervalStyle', saved[2], true),
                pg_catalog.set_config('extra_float_digits', saved[3], true),
                pg_catalog.set_config('bytea_output', saved[4], true);
    END IF;$g$;
    END IF;

    writes := format($w$IF TG_OP = 'INSERT' THEN
            INSERT INTO replication.change_log (table_id, op, row)
            SELECT %1$s, 'I', %2$s FROM new_rows n;
        ELSIF TG_OP = 'UPDATE' THEN
            -- One pass: a changed row is an upsert of its new image; an old key absent from
            -- the new rows (a primary-key change) is a delete; an unchanged row is nothing.
            INSERT INTO replication.change_log (table_id, op, row, old_row)
            SELECT %1$s, CASE WHEN %6$s THEN 'D' ELSE 'U' END,
                   CASE WHEN %6$s THEN %3$s ELSE %2$s END,
                   CASE WHEN %6$s THEN NULL::pg_catalog.jsonb ELSE %5$s END
              FROM new_rows n FULL JOIN old_rows o ON %4$s
             WHERE %6$s OR %7$s OR NOT (o.* OPERATOR(pg_catalog.*=) n.*);
        ELSE
            INSERT INTO replication.change_log (table_id, op, row)
            SELECT %1$s, 'D', %3$s FROM old_rows o;
        END IF;$w$,
        tid, new_img, old_img, same_key, upd_old, no_new, format('o.%I IS NULL', keys[1]));

    RETURN format($f$
DECLARE
    saved   text[];
    planner text[];
BEGIN%1$s
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO replication.change_log (table_id, op) VALUES (%2$s, 'T');
    ELSE
        -- A session plans each statement at its first run and keeps the plan, which fits
        -- that run's row count: after a bulk statement, single-row ones would run a plan
        -- made for a million rows (JIT compiled on every run).  So statements of 1,000 rows
        -- or more run copies of their own, planned without JIT and, for the UPDATE's
        -- old/new join, with a hash join, which is what suits them.
        IF TG_OP = 'DELETE' THEN
            PERFORM FROM old_rows o OFFSET 999 LIMIT 1;
        ELSE
            PERFORM FROM new_rows n OFFSET 999 LIMIT 1;
        END IF;
        IF NOT FOUND THEN
        %3$s
        ELSE
        planner := ARRAY[pg_catalog.current_setting('jit'), pg_catalog.current_setting('enable_mergejoin')];
        PERFORM pg_catalog.set_config('jit', 'off', true), pg_catalog.set_config('enable_mergejoin', 'off', true);
        %3$s
        PERFORM pg_catalog.set_config('jit', planner[1], true),
                pg_catalog.set_config('enable_mergejoin', planner[2], true);
        END IF;
    END IF;
    -- Wake the branches.  A NOTIFY serializes the commits of all notifying transactions
    -- (PostgreSQL takes one database-wide lock for it at commit), which caps concurrent
    -- writers; sessions with replicator.notify = off skip it and branches find their
    -- changes by polling (poll_interval in branch.yaml).  See README, Operations.
    IF pg_catalog.current_setting('replicator.notify', true) IS DISTINCT FROM 'off' THEN
        PERFORM pg_catalog.pg_notify('replicator', '');
    END IF;%4$s
    RETURN NULL;
END$f$, guard, tid, writes, restore);
END $$;
