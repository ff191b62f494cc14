-- The rows of a filtered table this branch may read, only those its filter passes, as
-- the table's own row type with every excluded column NULL:
--     SELECT ... FROM replication.read_rows(7, NULL::public.stock) AS stock
-- Only for tables of catalogs HQ grants this login (granted_tables()).  RETURN QUERY
-- collects the rows before the caller sees the first: one store's share of a table.
CREATE OR REPLACE FUNCTION replication.read_rows(p_table int, p_like anyelement) RETURNS SETOF anyelement
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t    replication.tables;
    rel  regclass;
    cols text;
BEGIN
    SELECT * INTO t FROM replication.tables WHERE id = p_table AND active;
    IF NOT FOUND OR NOT (p_table = ANY (replication.granted_tables())) THEN
        RAISE EXCEPTION 'replicated table % is not granted to this login', p_table
              USING ERRCODE = 'insufficient_privilege';
    END IF;
    rel := to_regclass(format('%I.%I', t.schema_name, t.table_name));
    IF t.row_access IS NULL OR rel IS NULL THEN
        RAISE EXCEPTION 'table %.% has no row restriction on HQ; read it directly', t.schema_name, t.table_name
              USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF pg_typeof(p_like) <> (SELECT reltype FROM pg_class WHERE oid = rel)::regtype THEN
        RAISE EXCEPTION 'read_rows(%, ...) takes NULL::%', p_table, rel USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(CASE WHEN attname = ANY (t.exclude_columns)
                           THEN 'NULL::' || format_type(atttypid, atttypmod) ELSE quote_ident(attname) END,
                      ', ' ORDER BY attnum) INTO cols
      FROM pg_attribute WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped;
    RETURN QUERY EXECUTE format('SELECT %s FROM %s WHERE (%s) IS TRUE', cols, rel, t.row_access);
END $$;
REVOKE ALL ON FUNCTION replication.read_rows(integer,anyelement) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.read_rows(integer,anyelement) TO replicator_branch;
