-- replicator: capture on HQ, migration 012 (routes: a branch reads only log rows that can be its own).
--
-- A catalog filtered per store (stock: store_id = :store_id) sends each change to one
-- branch, yet every branch's probe and window evaluated the filter on every store's log
-- rows since its last read: a fleet's cost grew with branches times HQ's write rate.  Now
-- capture writes a route into such a table's log rows: '<table id>:<the column's text>'
-- (`replicator hq install` picks the column: one the whole filter requires equal to a
-- parameter, of a type whose text is equal exactly when its value is).  A branch login's
-- queries read the rows without a route and those of its own routes (branch_routes()),
-- each a range of the index change_log_route; the log's row-level policy still decides
-- every row they return, so a route only narrows what is looked at.  A row whose images
-- disagree on the column (it moved to another store) or any other row carries no route
-- and is looked at by every branch, as before.
--
-- `hq install` changes a table's route with the table locked against writers (no
-- transaction that ran the old capture is open): its routed rows lose their routes and
-- the new one takes effect for capture and branches at the same commit.

ALTER TABLE replication.change_log ADD COLUMN route text;
CREATE INDEX change_log_route ON replication.change_log (route, xid);

-- What branches read by (route_column, route_param, route_type: the type a parameter is
-- cast to) and what capture writes by (route_capture: the same column; kept apart so that
-- a route could be switched off for capture alone).
ALTER TABLE replication.tables ADD COLUMN route_column text, ADD COLUMN route_param text,
                               ADD COLUMN route_type text, ADD COLUMN route_capture text;

-- The routes of the session's branch; NULL for a session that is no branch login (it
-- reads every row).  A parameter that does not cast to its column's type routes nothing:
-- the filter it feeds passes no row either.
CREATE FUNCTION replication.branch_routes() RETURNS text[]
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

-- The row-level policy on the log calls these once per reference to the log in a query
-- (a window has five): as SQL functions they planned their query at every call, 0.1-0.2
-- ms each; in PL/pgSQL a session plans it once (a pooled server connection serves many
-- polls).  Same definitions as in 006 and 007.
CREATE OR REPLACE FUNCTION replication.granted_tables() RETURNS int[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(t.id), '{}')
              FROM replication.tables t JOIN replication.branches b ON b.role = session_user AND b.active
             WHERE t.active AND (b.catalogs IS NULL OR t.catalog = ANY (b.catalogs)));
END $$;

CREATE OR REPLACE FUNCTION replication.branch_param(p_name text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT b.params ->> p_name FROM replication.branches b WHERE b.role = session_user AND b.active);
END $$;

-- capture_body as of 008, under another name; capture_body adds the route.
ALTER FUNCTION replication.capture_body(int, regclass, text[], text, text[]) RENAME TO capture_body_unrouted;
REVOKE ALL ON FUNCTION replication.capture_body_unrouted(int, regclass, text[], text, text[]) FROM PUBLIC;

-- The route goes into the single-row statements, the only ones a filtered table runs
-- (its bulk statements log row by row too): an insert's and a delete's image, and an
-- update's when its old and new images agree on the column.  Anything else (a key
-- change's or a partition move's delete, a TRUNCATE) has none.  Only for a column that
-- still exists with a routable type: after an ALTER TABLE the event trigger regenerates
-- capture, and a column that changed type routes nothing.
CREATE FUNCTION replication.capture_body(p_tid int, p_rel regclass, p_keys text[], p_filter text,
                                         p_exclude text[])
RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
    body  text := replication.capture_body_unrouted(p_tid, p_rel, p_keys, p_filter, p_exclude);
    col   text := (SELECT route_capture FROM replication.tables WHERE id = p_tid);
    new_r text;              -- the route of a new image (n), of an old one (o)
    old_r text;
BEGIN
    IF col IS NULL OR NOT EXISTS (
            SELECT FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation
             WHERE a.attrelid = p_rel AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
               AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'text'::regtype,
                                  'varchar'::regtype, 'uuid'::regtype)
               AND coalesce(c.collisdeterministic, true)) THEN
        RETURN body;
    END IF;
    new_r := format('%L OPERATOR(pg_catalog.||) n.%I::pg_catalog.text', p_tid || ':', col);
    old_r := format('%L OPERATOR(pg_catalog.||) o.%I::pg_catalog.text', p_tid || ':', col);
    body := replace(body, format($r$INSERT INTO replication.change_log (table_id, op, row)
            SELECT %s, 'I', $r$, p_tid), format($r$INSERT INTO replication.change_log (table_id, op, route, row)
            SELECT %s, 'I', %s, $r$, p_tid, new_r));
    body := replace(body, format($r$INSERT INTO replication.change_log (table_id, op, row)
            SELECT %s, 'D', $r$, p_tid), format($r$INSERT INTO replication.change_log (table_id, op, route, row)
            SELECT %s, 'D', %s, $r$, p_tid, old_r));
    body := replace(body, format($r$INSERT INTO replication.change_log (table_id, op, row, old_row)
            SELECT %s, 'U', $r$, p_tid), format($r$INSERT INTO replication.change_log (table_id, op, route, row, old_row)
            SELECT %s, 'U', CASE WHEN o.%I OPERATOR(pg_catalog.=) n.%I THEN %s END, $r$,
            p_tid, col, col, new_r));
    RETURN body;
END $$;
REVOKE ALL ON FUNCTION replication.capture_body(int, regclass, text[], text, text[]) FROM PUBLIC;

-- A branch login's probe, as one call: HQ's snapshot and whether the log may hold changes
-- for it since p_prev (rows without a route or of its routes, of tables HQ grants it, in
-- the window or of its late committers).  PL/pgSQL keeps its plans per session (a pooled
-- server connection answers many polls), where the same statement sent as text was
-- planned at every poll: most of what an idle branch cost HQ.  Generic plans from the first
-- call (a session would plan the first five calls for their values): index ranges either way.  It tells a branch no more
-- than that some row of a table it is granted changed; reading one is for the policy.
CREATE FUNCTION replication.probe(p_prev pg_snapshot, p_tables int[], OUT cur pg_snapshot, OUT news boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    routes text[] := replication.branch_routes();
    tabs   int[];
    lo     xid8 := pg_snapshot_xmax(p_prev);
    hi     xid8;
BEGIN
    IF routes IS NULL THEN
        RAISE EXCEPTION 'replication.probe() is for branch logins' USING ERRCODE = 'insufficient_privilege';
    END IF;
    cur := pg_current_snapshot();
    hi := pg_snapshot_xmax(cur);
    tabs := ARRAY(SELECT unnest(p_tables) INTERSECT SELECT unnest(replication.granted_tables()));
    news := EXISTS (SELECT FROM replication.change_log l
                     WHERE l.route IS NULL AND l.xid >= lo AND l.xid < hi AND pg_visible_in_snapshot(l.xid, cur)
                       AND l.table_id = ANY (tabs))
         OR EXISTS (SELECT FROM replication.change_log l
                     WHERE l.route = ANY (routes) AND l.xid >= lo AND l.xid < hi AND pg_visible_in_snapshot(l.xid, cur)
                       AND l.table_id = ANY (tabs))
         OR EXISTS (SELECT FROM pg_snapshot_xip(p_prev) x
                     WHERE pg_visible_in_snapshot(x, cur)
                       AND EXISTS (SELECT FROM replication.change_log l
                                    WHERE l.xid = x AND l.table_id = ANY (tabs)
                                      AND (l.route IS NULL OR l.route = ANY (routes))));
END $$;
REVOKE ALL ON FUNCTION replication.probe(pg_snapshot, int[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.probe(pg_snapshot, int[]) TO replicator_branch;
