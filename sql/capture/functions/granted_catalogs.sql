-- The catalogs HQ grants a branch (NULL: all), for its own login (or a superuser).
CREATE OR REPLACE FUNCTION replication.granted_catalogs(p_branch text) RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT b.catalogs FROM replication.branches b
     WHERE b.name = p_branch
       AND (b.role = session_user OR (SELECT rolsuper FROM pg_roles WHERE rolname = session_user))
$$;
REVOKE ALL ON FUNCTION replication.granted_catalogs(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.granted_catalogs(text) TO replicator_branch;
