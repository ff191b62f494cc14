-- capture_body_plain, plus for a partitioned table the delete of a key that left with
-- an UPDATE moving it to another partition (AFTER UPDATE row triggers do not fire for a
-- move, so attach_table's key-change trigger never sees it).  Write through the parent:
-- a statement addressed to a partition fires only that partition's triggers.
CREATE OR REPLACE FUNCTION replication.capture_body_unrouted(p_tid int, p_rel regclass, p_keys text[], p_filter text,
                                         p_exclude text[])
RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
    body     text := replication.capture_body_plain(p_tid, p_rel, p_keys, p_filter, p_exclude);
    old_img  text := 'pg_catalog.to_jsonb(o.*)';
    same_key text;
    gone     text;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = p_rel) <> 'p' THEN
        RETURN body;
    END IF;
    IF cardinality(p_exclude) > 0 THEN
        old_img := format('(pg_catalog.to_jsonb(o.*) OPERATOR(pg_catalog.-) %L::pg_catalog.text[])', p_exclude);
    END IF;
    SELECT string_agg(format('o.%1$I OPERATOR(pg_catalog.=) n.%1$I', k), ' AND ') INTO same_key
      FROM unnest(p_keys) AS k;
    -- before the UPDATE's own images (small and bulk paths alike): the keys that left
    gone := format($g$
            INSERT INTO replication.change_log (table_id, op, row)
            SELECT %s, 'D', %s FROM old_rows o WHERE NOT EXISTS (SELECT FROM new_rows n WHERE %s);$g$,
        p_tid, old_img, same_key);
    RETURN replace(body, $m$ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN$m$,
                   $m$ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN$m$ || gone);
END $$;
REVOKE ALL ON FUNCTION replication.capture_body_unrouted(integer,regclass,text[],text,text[]) FROM PUBLIC;
