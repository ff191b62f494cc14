-- A branch reads its own registration (parameters for row filters) and no other.
CREATE OR REPLACE FUNCTION replication.branch_info(p_branch text)
RETURNS TABLE (name text, params jsonb, active boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT b.name, b.params, b.active FROM replication.branches b
     WHERE b.name = p_branch
       AND (b.role = session_user
            OR (SELECT rolsuper FROM pg_roles WHERE rolname = session_user));
$$;
REVOKE ALL ON FUNCTION replication.branch_info(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.branch_info(text) TO replicator_branch;
