-- After an ALTER TABLE on a captured table, regenerate its capture (it names some
-- columns).  SECURITY DEFINER with a fixed search_path: the role running the DDL
-- (an application that owns its tables) needs no rights on schema replication, and
-- nothing here resolves through its search_path.  It never raises: a failure is a
-- warning and the DDL goes through (the DBA re-runs `replicator hq install`).
CREATE OR REPLACE FUNCTION replication.on_ddl()
RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t         replication.tables;
    refreshed boolean := false;
BEGIN
    FOR t IN SELECT DISTINCT rt.* FROM pg_catalog.pg_event_trigger_ddl_commands() c
               JOIN replication.tables rt
                 ON rt.active AND c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                AND c.objid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(
                        pg_catalog.format('%I.%I', rt.schema_name, rt.table_name)) LOOP
        BEGIN
            PERFORM replication.attach_table(t.catalog, t.schema_name, t.table_name, t.filter, t.exclude_columns);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'replicator: could not refresh capture of %.%: %; run `replicator hq install`',
                t.schema_name, t.table_name, SQLERRM;
        END;
        refreshed := true;
    END LOOP;
    IF refreshed THEN
        BEGIN
            PERFORM replication.build_access();     -- attach_table grants the group; take that back
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'replicator: could not refresh branch grants: %; run `replicator hq install`', SQLERRM;
        END;
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'replicator: DDL event trigger skipped: %', SQLERRM;
END $$;
REVOKE ALL ON FUNCTION replication.on_ddl() FROM PUBLIC;
