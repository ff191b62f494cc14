-- A branch login's poll: has any row of its granted tables (its own stores' routed rows,
-- and unrouted ones) been logged since p_prev?  One call per poll_interval, so it looks
-- its branch up once (routes and grants inline, no other SECURITY DEFINER call) and its
-- plans are generic (planned once per session), so the planner does not know the
-- branch's routes.  Once ANALYZE had seen the log it costed `route = ANY (routes)` as
-- many index descents and chose the xid index, reading every other store's row in the
-- window; so one route at a time, its xid range written as a row comparison on
-- (route, xid) that only change_log_route can answer, with seq scans ruled out.
CREATE OR REPLACE FUNCTION replication.probe(p_prev pg_snapshot, p_tables int[], OUT cur pg_snapshot,
                                             OUT news boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
    b      replication.branches;
    t      record;
    routes text[] := '{}';
    r      text;
    v      text;
    tabs   int[];
    lo     xid8 := pg_snapshot_xmax(p_prev);
    hi     xid8;
BEGIN
    SELECT * INTO b FROM replication.branches WHERE role = session_user;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'replication.probe() is for branch logins' USING ERRCODE = 'insufficient_privilege';
    END IF;
    cur := pg_current_snapshot();
    IF NOT b.active THEN
        news := false;
        RETURN;
    END IF;
    -- granted_tables() of this branch among those asked about
    tabs := ARRAY(SELECT id FROM replication.tables WHERE active AND id = ANY (p_tables)
                     AND (b.catalogs IS NULL OR catalog = ANY (b.catalogs)));
    -- branch_routes() of those tables (same rules: functions/branch_routes.sql)
    FOR t IN SELECT id, route_param, route_type FROM replication.tables
              WHERE route_column IS NOT NULL AND id = ANY (tabs) LOOP
        v := b.params ->> t.route_param;
        CONTINUE WHEN v IS NULL;
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
    hi := pg_snapshot_xmax(cur);
    news := EXISTS (SELECT FROM replication.change_log l
                     WHERE l.route IS NULL AND l.xid >= lo AND l.xid < hi AND pg_visible_in_snapshot(l.xid, cur)
                       AND l.table_id = ANY (tabs));
    FOREACH r IN ARRAY routes LOOP
        EXIT WHEN news;
        news := EXISTS (SELECT FROM replication.change_log l
                         WHERE (l.route, l.xid) >= (r, lo) AND (l.route, l.xid) < (r, hi)
                           AND pg_visible_in_snapshot(l.xid, cur) AND l.table_id = ANY (tabs));
    END LOOP;
    news := news
         OR EXISTS (SELECT FROM pg_snapshot_xip(p_prev) x
                     WHERE pg_visible_in_snapshot(x, cur)
                       AND EXISTS (SELECT FROM replication.change_log l
                                    WHERE l.xid = x AND l.table_id = ANY (tabs)
                                      AND (l.route IS NULL OR l.route = ANY (routes))));
END $$;
REVOKE ALL ON FUNCTION replication.probe(pg_snapshot,integer[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.probe(pg_snapshot,integer[]) TO replicator_branch;
