-- replicator: capture on HQ, migration 003.
--
-- Leaner capture functions, same log rows (README, Performance):
-- * the UPDATE statement tells a missing side of the old/new join by its first key
--   column (never NULL in a row) instead of testing the whole row for NULL, which
--   built a copy of the row for each test: about 0.1 of a bulk UPDATE's time;
-- * the check of the writer's DateStyle, IntervalStyle, extra_float_digits and
--   bytea_output is generated only for tables with a column whose image depends on
--   one of them.  Integers, numeric, text, booleans, uuids, dates, timestamps, json
--   and enums have images that do not (to_jsonb writes dates and timestamps in ISO
--   8601 whatever DateStyle says), so a table of only those skips the check.
-- The capture function's text now comes from replication.capture_body, so that a later
-- change of capture redefines that function alone.  Redefines attach_table; `replicator
-- hq install` then regenerates every table's capture function, because its text changed.

-- The text of one table's capture function: static statements (their plans are
-- cached) that write the table's row images into the change log.
CREATE FUNCTION replication.capture_body(p_tid int, p_rel regclass, p_keys text[], p_filter text,
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

    RETURN format($f$
DECLARE
    saved text[];
BEGIN%6$s
    IF TG_OP = 'INSERT' THEN
        INSERT INTO replication.change_log (table_id, op, row)
        SELECT %1$s, 'I', %2$s FROM new_rows n;
    ELSIF TG_OP = 'UPDATE' THEN
        -- One pass: a changed row is an upsert of its new image; an old key absent from
        -- the new rows (a primary-key change) is a delete; an unchanged row is nothing.
        INSERT INTO replication.change_log (table_id, op, row, old_row)
        SELECT %1$s, CASE WHEN %7$s THEN 'D' ELSE 'U' END,
               CASE WHEN %7$s THEN %3$s ELSE %2$s END,
               CASE WHEN %7$s THEN NULL::pg_catalog.jsonb ELSE %5$s END
          FROM new_rows n FULL JOIN old_rows o ON %4$s
         WHERE %7$s OR %8$s OR NOT (o.* OPERATOR(pg_catalog.*=) n.*);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO replication.change_log (table_id, op, row)
        SELECT %1$s, 'D', %3$s FROM old_rows o;
    ELSE
        INSERT INTO replication.change_log (table_id, op) VALUES (%1$s, 'T');
    END IF;
    -- Wake the branches.  A NOTIFY serializes the commits of all notifying transactions
    -- (PostgreSQL takes one database-wide lock for it at commit), which caps concurrent
    -- writers; sessions with replicator.notify = off skip it and branches find their
    -- changes by polling (poll_interval in branch.yaml).  See README, Operations.
    IF pg_catalog.current_setting('replicator.notify', true) IS DISTINCT FROM 'off' THEN
        PERFORM pg_catalog.pg_notify('replicator', '');
    END IF;%9$s
    RETURN NULL;
END$f$, tid, new_img, old_img, same_key, upd_old, guard, no_new, format('o.%I IS NULL', keys[1]), restore);
END $$;

-- Attach capture to one table: register it and (re)create its trigger
-- function only when its definition changed, so a second install is a no-op
-- and takes no lock on a busy table.  The function is generated per table so
-- its statements are static and their plans cached.
CREATE OR REPLACE FUNCTION replication.attach_table(p_catalog text, p_schema name, p_table name,
                                         p_filter text, p_exclude text[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    rel      regclass := to_regclass(format('%I.%I', p_schema, p_table));
    keys     text[];
    tid      int;
    fn       text;
    body     text;
    sig      text;
    missing  text;
    readable text;           -- columns a branch may SELECT when some are excluded
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table %.% does not exist on HQ', p_schema, p_table
            USING ERRCODE = 'undefined_table';
    END IF;
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO keys
      FROM pg_index i
     CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    IF keys IS NULL THEN
        RAISE EXCEPTION 'table %.% has no primary key; replication needs one to apply updates and deletes (add a PRIMARY KEY)',
            p_schema, p_table USING ERRCODE = 'invalid_table_definition';
    END IF;
    SELECT string_agg(x, ', ') INTO missing FROM unnest(p_exclude) AS x
     WHERE NOT EXISTS (SELECT FROM pg_attribute
                        WHERE attrelid = rel AND attname = x AND attnum > 0 AND NOT attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'exclude_columns of %.%: no such column: %', p_schema, p_table, missing
            USING ERRCODE = 'undefined_column';
    END IF;
    IF p_exclude && keys THEN
        RAISE EXCEPTION 'exclude_columns of %.%: primary key columns cannot be excluded', p_schema, p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO replication.tables AS t (catalog, schema_name, table_name, key_columns, filter, exclude_columns)
    VALUES (p_catalog, p_schema, p_table, keys, p_filter, coalesce(p_exclude, '{}'))
    ON CONFLICT (schema_name, table_name) DO UPDATE
       SET catalog = EXCLUDED.catalog, key_columns = EXCLUDED.key_columns, filter = EXCLUDED.filter,
           exclude_columns = EXCLUDED.exclude_columns, active = true
    RETURNING id INTO tid;

    fn := format('replication.%I', 'capture_' || tid);
    body := replication.capture_body(tid, rel, keys, p_filter, p_exclude);

    IF cardinality(p_exclude) > 0 THEN
        SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO readable FROM pg_attribute
         WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped AND attname <> ALL (p_exclude);
    END IF;
    sig := md5(body || rel::text || coalesce(readable, ''));
    IF sig IS NOT DISTINCT FROM (SELECT signature FROM replication.tables WHERE id = tid)
       AND (SELECT count(*) FROM pg_trigger WHERE tgrelid = rel AND tgname LIKE 'replicator_capture_%') = 4 THEN
        RETURN tid;
    END IF;

    -- SECURITY DEFINER: writers need no rights on the log.  No SET search_path (it
    -- would cost a GUC save/restore per write): every name in the body is qualified.
    EXECUTE format('CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
                   'AS %L', fn, body);
    EXECUTE format('COMMENT ON FUNCTION %s() IS %L', fn, 'replicator: capture for ' || rel::text);
    EXECUTE format('DROP TRIGGER IF EXISTS replicator_capture_ins ON %s', rel);
    EXECUTE format('DROP TRIGGER IF EXISTS replicator_capture_upd ON %s', rel);
    EXECUTE format('DROP TRIGGER IF EXISTS replicator_capture_del ON %s', rel);
    EXECUTE format('DROP TRIGGER IF EXISTS replicator_capture_trunc ON %s', rel);
    EXECUTE format('CREATE TRIGGER replicator_capture_ins AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()', rel, fn);
    EXECUTE format('CREATE TRIGGER replicator_capture_upd AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()', rel, fn);
    EXECUTE format('CREATE TRIGGER replicator_capture_del AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()', rel, fn);
    EXECUTE format('CREATE TRIGGER replicator_capture_trunc AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %s()', rel, fn);
    IF readable IS NULL THEN
        EXECUTE format('GRANT SELECT ON %s TO replicator_branch', rel);
    ELSE
        -- Excluded columns never leave HQ: a branch login cannot even SELECT them.
        EXECUTE format('REVOKE SELECT ON %s FROM replicator_branch', rel);
        EXECUTE format('GRANT SELECT (%s) ON %s TO replicator_branch', readable, rel);
    END IF;
    UPDATE replication.tables SET signature = sig WHERE id = tid;
    RETURN tid;
END $$;

REVOKE ALL ON FUNCTION replication.capture_body(int, regclass, text[], text, text[]) FROM PUBLIC;
