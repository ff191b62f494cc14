-- Stop capturing a table: its key-change row trigger, then its statement triggers.
CREATE OR REPLACE FUNCTION replication.detach_table(p_id int)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    rel regclass := (SELECT to_regclass(format('%I.%I', schema_name, table_name))
                       FROM replication.tables WHERE id = p_id);
BEGIN
    IF rel IS NOT NULL THEN
        EXECUTE format('DROP TRIGGER IF EXISTS replicator_key_change ON %s', rel);
    END IF;
    PERFORM replication.detach_statement_triggers(p_id);
END $$;
REVOKE ALL ON FUNCTION replication.detach_table(integer) FROM PUBLIC;
