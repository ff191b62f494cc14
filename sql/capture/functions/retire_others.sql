-- Make the registry match a configuration: tables and catalogs not listed stop.  While
-- active branches are registered, stopping capture of a table they may receive loses
-- their changes: it needs p_detach (`replicator hq install --detach`).
CREATE OR REPLACE FUNCTION replication.retire_others(p_catalogs text[], p_tables text[], p_detach boolean)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tid      int;
    leaving  text;
BEGIN
    SELECT string_agg(format('%s.%s (catalog %s)', schema_name, table_name, catalog), ', ' ORDER BY id)
      INTO leaving FROM replication.tables
     WHERE active AND format('%s.%s', schema_name, table_name) <> ALL (p_tables);
    IF leaving IS NOT NULL AND NOT p_detach
       AND EXISTS (SELECT FROM replication.branches WHERE active) THEN
        RAISE EXCEPTION 'the configuration no longer lists %, which registered branches receive', leaving
            USING ERRCODE = 'object_in_use',
                  HINT = 'add it back, or stop capturing it on purpose with `replicator hq install --detach` '
                         '(branches then need `replicator init --force` for it if it comes back)';
    END IF;
    FOR tid IN SELECT id FROM replication.tables
                WHERE active AND format('%s.%s', schema_name, table_name) <> ALL (p_tables) LOOP
        PERFORM replication.detach_table(tid);
    END LOOP;
    DELETE FROM replication.catalogs WHERE name <> ALL (p_catalogs);
END $$;
REVOKE ALL ON FUNCTION replication.retire_others(text[],text[],boolean) FROM PUBLIC;
