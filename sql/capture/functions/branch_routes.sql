-- The routes of the session's branch; NULL for a session that is no branch login (it
-- reads every row).  A parameter that does not cast to its column's type routes nothing:
-- the filter it feeds passes no row either.
CREATE OR REPLACE FUNCTION replication.branch_routes() RETURNS text[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    b      replication.branches;
    t      record;
    routes text[] := '{}';
    v      text;
BEGIN
    SELECT * INTO b FROM replication.branches WHERE role = session_user;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT b.active THEN
        RETURN routes;
    END IF;
    FOR t IN SELECT id, route_param, route_type FROM replication.tables
              WHERE active AND route_column IS NOT NULL ORDER BY id LOOP
        v := b.params ->> t.route_param;
        CONTINUE WHEN v IS NULL;
        -- text as it is, a small whole number written as its type prints it (a store id):
        -- no cast, no subtransaction, on every probe of every branch
        IF t.route_type <> 'text' AND NOT (t.route_type IN ('int2', 'int4', 'int8')
                                          AND v ~ '^(0|[1-9][0-9]{0,3})$') THEN
            BEGIN
                v := CASE t.route_type WHEN 'int2' THEN v::int2::text WHEN 'int4' THEN v::int4::text
                                       WHEN 'int8' THEN v::int8::text WHEN 'uuid' THEN v::uuid::text END;
            EXCEPTION WHEN data_exception THEN
                v := NULL;
            END;
        END IF;
        IF v IS NOT NULL THEN
            routes := routes || (t.id || ':' || v);
        END IF;
    END LOOP;
    RETURN routes;
END $$;
REVOKE ALL ON FUNCTION replication.branch_routes() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.branch_routes() TO replicator_branch;
