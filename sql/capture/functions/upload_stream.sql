-- The upload stream a branch login writes at HQ: its position, copy states and set-aside
-- rows are keyed by it (the restrictive policies `hq install` puts on those tables).
CREATE OR REPLACE FUNCTION replication.upload_stream() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT 'uploads:' OPERATOR(pg_catalog.||) replication.session_branch()
$$;
REVOKE ALL ON FUNCTION replication.upload_stream() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.upload_stream() TO replicator_branch;
