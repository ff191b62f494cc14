-- The capture function's text as attach_statement_triggers installs it: capture_body_unrouted
-- plus the route.  The route goes into the single-row statements, the only ones a filtered
-- table runs (its bulk statements log row by row too): an insert's and a delete's image,
-- and an update's when its old and new images agree on the column.  Anything else (a key
-- change's or a partition move's delete, a TRUNCATE) has none.  Only for a column that
-- still exists with a routable type: after an ALTER TABLE the event trigger regenerates
-- capture, and a column that changed type routes nothing.
CREATE OR REPLACE FUNCTION replication.capture_body(p_tid int, p_rel regclass, p_keys text[], p_filter text,
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
REVOKE ALL ON FUNCTION replication.capture_body(integer,regclass,text[],text,text[]) FROM PUBLIC;
