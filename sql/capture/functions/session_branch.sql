-- The session's branch (its login), or NULL for a session that is no active branch.
CREATE OR REPLACE FUNCTION replication.session_branch() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT b.name FROM replication.branches b
     WHERE b.role OPERATOR(pg_catalog.=) session_user AND b.active
$$;
REVOKE ALL ON FUNCTION replication.session_branch() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.session_branch() TO replicator_branch;
