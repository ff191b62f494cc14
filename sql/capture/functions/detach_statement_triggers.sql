-- Stop capturing a table (kept in the registry, inactive, so its id is never reused).
CREATE OR REPLACE FUNCTION replication.detach_statement_triggers(p_id int)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t   replication.tables;
    rel regclass;
BEGIN
    SELECT * INTO t FROM replication.tables WHERE id = p_id;
    rel := to_regclass(format('%I.%I', t.schema_name, t.table_name));
    IF rel IS NOT NULL THEN
        EXECUTE format('DROP TRIGGER IF EXISTS replicator_capture_ins ON %s', rel);
        EXECUTE format('DROP TRIGGER IF EXISTS replicator_capture_upd ON %s', rel);
        EXECUTE format('DROP TRIGGER IF EXISTS replicator_capture_del ON %s', rel);
        EXECUTE format('DROP TRIGGER IF EXISTS replicator_capture_trunc ON %s', rel);
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS replication.%I()', 'capture_' || p_id);
    UPDATE replication.tables SET active = false, signature = NULL WHERE id = p_id;
END $$;
REVOKE ALL ON FUNCTION replication.detach_statement_triggers(integer) FROM PUBLIC;
