-- The session's branch parameter p_name (its registered value), for row filters as
-- `hq install` renders them into the log's policy and read_rows.  PL/pgSQL: a session
-- plans its lookup once (as an SQL function it was planned at every call).
CREATE OR REPLACE FUNCTION replication.branch_param(p_name text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT b.params ->> p_name FROM replication.branches b WHERE b.role = session_user AND b.active);
END $$;
REVOKE ALL ON FUNCTION replication.branch_param(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.branch_param(text) TO replicator_branch;
