-- The tables a branch login may read in the log: those of the catalogs HQ grants it.
-- The log's row-level policy calls it once per reference to the log in a query (a window
-- has five); in PL/pgSQL a session plans its lookup once (a pooled server connection
-- serves many polls), where an SQL function planned it at every call, 0.1-0.2 ms each.
CREATE OR REPLACE FUNCTION replication.granted_tables() RETURNS int[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(t.id), '{}')
              FROM replication.tables t JOIN replication.branches b ON b.role = session_user AND b.active
             WHERE t.active AND (b.catalogs IS NULL OR t.catalog = ANY (b.catalogs)));
END $$;
REVOKE ALL ON FUNCTION replication.granted_tables() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.granted_tables() TO replicator_branch;
