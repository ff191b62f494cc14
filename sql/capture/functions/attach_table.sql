-- Attach capture to one table (attach_statement_triggers), plus the row trigger that logs
-- a primary-key change as a delete of the old key before the statement trigger logs the
-- new row: its WHEN is false unless a key changes, so other updates pay nothing.  A
-- partitioned table has no such trigger: a row moving between partitions is a delete
-- and an insert for PostgreSQL, and capture_body_unrouted logs the key that left.
CREATE OR REPLACE FUNCTION replication.attach_table(p_catalog text, p_schema name, p_table name,
                                                    p_filter text, p_exclude text[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    rel     regclass := to_regclass(format('%I.%I', p_schema, p_table));
    before  text := (SELECT signature FROM replication.tables WHERE schema_name = p_schema AND table_name = p_table);
    tid     int;
    changed text;
BEGIN
    tid := replication.attach_statement_triggers(p_catalog, p_schema, p_table, p_filter, p_exclude);
    IF (SELECT relkind FROM pg_class WHERE oid = rel) = 'p' THEN
        EXECUTE format('DROP TRIGGER IF EXISTS replicator_key_change ON %s', rel);
        RETURN tid;
    END IF;
    IF before IS NOT DISTINCT FROM (SELECT signature FROM replication.tables WHERE id = tid)
       AND EXISTS (SELECT FROM pg_trigger WHERE tgrelid = rel AND tgname = 'replicator_key_change') THEN
        RETURN tid;
    END IF;
    SELECT string_agg(format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', k), ' OR ') INTO changed
      FROM replication.tables t CROSS JOIN LATERAL unnest(t.key_columns) AS k WHERE t.id = tid;
    EXECUTE format('DROP TRIGGER IF EXISTS replicator_key_change ON %s', rel);
    EXECUTE format('CREATE TRIGGER replicator_key_change AFTER UPDATE ON %s FOR EACH ROW WHEN (%s) '
                   'EXECUTE FUNCTION replication.%I()', rel, changed, 'capture_' || tid);
    RETURN tid;
END $$;
REVOKE ALL ON FUNCTION replication.attach_table(text,name,name,text,text[]) FROM PUBLIC;
