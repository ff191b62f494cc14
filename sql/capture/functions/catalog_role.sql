-- The role holding SELECT on one catalog's readable columns (build_access); a branch
-- login is a member of the roles of the catalogs HQ grants it.
CREATE OR REPLACE FUNCTION replication.catalog_role(p_catalog text) RETURNS name
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ('replicator_catalog_' || p_catalog)::name
$$;
