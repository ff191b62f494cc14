-- Attach capture to one table: register it and (re)create its capture function and
-- statement triggers only when their definition changed, so a second install is a no-op
-- and takes no lock on a busy table.  The function is generated per table (its text
-- from capture_body) so its statements are static and their plans cached; a changed
-- capture_body changes every table's signature, and `hq install` regenerates them.
CREATE OR REPLACE FUNCTION replication.attach_statement_triggers(p_catalog text, p_schema name, p_table name,
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
    -- The table by its qualified name, not rel::text: that text depends on the session's
    -- search_path, and the event trigger (its own) would re-create what install had made.
    sig := md5(body || format('%I.%I', p_schema, p_table) || coalesce(readable, ''));
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
REVOKE ALL ON FUNCTION replication.attach_statement_triggers(text,name,name,text,text[]) FROM PUBLIC;
