-- The text of one table's capture function: static statements (their plans are cached)
-- that write the table's row images into the change log.  Why it reads as it does:
-- * SECURITY DEFINER (writers need no rights on the log), run with the writer's
--   search_path, so every operator, type and function is schema-qualified
--   (OPERATOR(pg_catalog.=), pg_catalog.text[]): no writer can slip its own `=` in front
--   of pg_catalog.  A SET search_path clause would cost every write a save and restore.
-- * No NOTIFY: notifications queue at commit, one idle LISTENer can fill the queue and
--   make every capturing commit fail, and notifying commits serialize on one lock.
--   Branches probe the log instead (replication.probe).
-- * A statement of 1,000 rows or more runs copies of its own, planned without JIT and
--   with a hash join, so a session's single-row statements keep plans made for them.
-- * A bulk statement on an unfiltered table logs its images 1,000 to a log row (`rows`,
--   lz4 where the server has it, op i/u/d); a key change is logged by attach_table's
--   row trigger, so the bulk UPDATE needs no old/new join.
-- * The writer-settings check (DateStyle, IntervalStyle, extra_float_digits,
--   bytea_output) is generated only for tables with a column whose image depends on it.
-- capture_body_unrouted and capture_body add partitioned tables and routes to this text.
CREATE OR REPLACE FUNCTION replication.capture_body_plain(p_tid int, p_rel regclass, p_keys text[], p_filter text,
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
    guard    text := '';     -- the writer-settings check, when the table needs it
    restore  text := '';
    writes   text;           -- the statements that log rows, for fewer than 1,000 rows
    bulk     text;           -- and for 1,000 rows or more
    upd_rows text;           -- the UPDATE's statement
    chunk    text := $c$(SELECT %s AS img, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS chunk
              FROM %s) c GROUP BY c.chunk;$c$;
BEGIN
    SELECT string_agg(format('o.%1$I OPERATOR(pg_catalog.=) n.%1$I', k), ' AND ') INTO same_key FROM unnest(keys) AS k;
    IF cardinality(p_exclude) > 0 THEN
        new_img := format('(pg_catalog.to_jsonb(n.*) OPERATOR(pg_catalog.-) %L::pg_catalog.text[])', p_exclude);
        old_img := format('(pg_catalog.to_jsonb(o.*) OPERATOR(pg_catalog.-) %L::pg_catalog.text[])', p_exclude);
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
    IF pg_catalog.current_setting('DateStyle') OPERATOR(pg_catalog.!~~) 'ISO%'
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

    -- A changed row is an upsert of its new image, an unchanged row is nothing.  A key
    -- change's delete of the old key was logged before, by the row trigger.
    upd_rows := format($u$INSERT INTO replication.change_log (table_id, op, row, old_row)
            SELECT %s, 'U', %s, %s
              FROM new_rows n LEFT JOIN old_rows o ON %s
             WHERE o.%I IS NULL OR NOT (o.* OPERATOR(pg_catalog.*=) n.*);$u$,
        tid, new_img, upd_old, same_key, keys[1]);
    writes := format($w$IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO replication.change_log (table_id, op, row)
            SELECT %1$s, 'I', %2$s FROM new_rows n;
        ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
            %4$s
        ELSE
            INSERT INTO replication.change_log (table_id, op, row)
            SELECT %1$s, 'D', %3$s FROM old_rows o;
        END IF;$w$, tid, new_img, old_img, upd_rows);

    -- A bulk statement logs its images 1,000 to a log row (an array, compressed with lz4
    -- where the server has it): a log row per changed row, with its index entries, costs
    -- more than the rest of capture.  Every updated row is logged, changed or not: pairing
    -- old and new rows to skip the unchanged ones costs 0.3-0.6 of the statement's time.  A
    -- table with a row filter logs row by row: its UPDATEs need each new image next to
    -- its old one (a branch must see a row leave its filter), and a replicator older than
    -- this migration would skip its arrays unseen, where for other tables it stops.
    bulk := writes;
    IF p_filter IS NULL THEN
        bulk := format($w$IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO replication.change_log (table_id, op, rows)
            SELECT %1$s, 'i', pg_catalog.array_agg(c.img) FROM %2$s
        ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
            INSERT INTO replication.change_log (table_id, op, rows)
            SELECT %1$s, 'u', pg_catalog.array_agg(c.img) FROM %2$s
        ELSE
            INSERT INTO replication.change_log (table_id, op, rows)
            SELECT %1$s, 'd', pg_catalog.array_agg(c.img) FROM %3$s
        END IF;$w$, tid, format(chunk, new_img, 'new_rows n'), format(chunk, old_img, 'old_rows o'));
    END IF;

    RETURN format($f$
DECLARE
    saved   pg_catalog.text[];
    planner pg_catalog.text[];
BEGIN%1$s
    IF TG_LEVEL OPERATOR(pg_catalog.=) 'ROW' THEN
        -- A key change (the row trigger's WHEN): the old key is deleted, before the
        -- statement trigger logs the new row.
        INSERT INTO replication.change_log (table_id, op, row)
        SELECT %2$s, 'D', %5$s FROM (SELECT OLD.*) o;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'TRUNCATE' THEN
        INSERT INTO replication.change_log (table_id, op) VALUES (%2$s, 'T');
    ELSE
        -- A session plans each statement at its first run and keeps the plan, which fits
        -- that run's row count: after a bulk statement, single-row ones would run a plan
        -- made for a million rows (JIT compiled on every run).  So statements of 1,000 rows
        -- or more run copies of their own, planned without JIT and, for the UPDATE's
        -- old/new join, with a hash join, which is what suits them.
        IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
            PERFORM FROM old_rows o OFFSET 999 LIMIT 1;
        ELSE
            PERFORM FROM new_rows n OFFSET 999 LIMIT 1;
        END IF;
        IF NOT FOUND THEN
        %3$s
        ELSE
        planner := ARRAY[pg_catalog.current_setting('jit'), pg_catalog.current_setting('enable_mergejoin')];
        PERFORM pg_catalog.set_config('jit', 'off', true), pg_catalog.set_config('enable_mergejoin', 'off', true);
        %4$s
        PERFORM pg_catalog.set_config('jit', planner[1], true),
                pg_catalog.set_config('enable_mergejoin', planner[2], true);
        END IF;
    END IF;
    %6$s
    RETURN NULL;
END$f$, guard, tid, writes, bulk, old_img, restore);
END $$;
REVOKE ALL ON FUNCTION replication.capture_body_plain(integer,regclass,text[],text,text[]) FROM PUBLIC;
