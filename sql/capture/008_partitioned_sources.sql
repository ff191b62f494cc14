-- replicator: capture on HQ, migration 008 (partitioned tables at HQ).
--
-- A partitioned table is captured through its parent: its statement triggers see every
-- row of a statement on the parent, in whichever partition.  An UPDATE that moves a row
-- to another partition is, for PostgreSQL, a DELETE and an INSERT: AFTER UPDATE row
-- triggers do not fire for it, so the row trigger that logs a key change never saw the
-- old key leave, and branches kept it.  For partitioned tables the UPDATE's statement
-- trigger now logs that delete itself (an old row whose key no new row has), and they
-- carry no key-change row trigger.  Write through the parent: a statement addressed to a
-- partition fires only that partition's triggers, which capture nothing.

-- capture_body as of 006, under another name; capture_body wraps it.
ALTER FUNCTION replication.capture_body(int, regclass, text[], text, text[]) RENAME TO capture_body_plain;
REVOKE ALL ON FUNCTION replication.capture_body_plain(int, regclass, text[], text, text[]) FROM PUBLIC;

CREATE FUNCTION replication.capture_body(p_tid int, p_rel regclass, p_keys text[], p_filter text,
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
REVOKE ALL ON FUNCTION replication.capture_body(int, regclass, text[], text, text[]) FROM PUBLIC;

-- attach_table as of 005, with no key-change row trigger on a partitioned table.
CREATE OR REPLACE FUNCTION replication.attach_table(p_catalog text, p_schema name, p_table name,
                                                    p_filter text, p_exclude text[])
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    rel     regclass := to_regclass(format('%I.%I', p_schema, p_table));
    before  text := (SELECT signature FROM replication.tables WHERE schema_name = p_schema AND table_name = p_table);
    tid     int;
    changed text;
BEGIN
    tid := replication.attach_statement_triggers(p_catalog, p_schema, p_table, p_filter, p_exclude);
    IF (SELECT relkind FROM pg_class WHERE oid = rel) = 'p' THEN
        EXECUTE format('DROP TRIGGER IF EXISTS replicator_key_change ON %s', rel);
        RETURN tid;
    END IF;
    IF before IS NOT DISTINCT FROM (SELECT signature FROM replication.tables WHERE id = tid)
       AND EXISTS (SELECT FROM pg_trigger WHERE tgrelid = rel AND tgname = 'replicator_key_change') THEN
        RETURN tid;
    END IF;
    SELECT string_agg(format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', k), ' OR ') INTO changed
      FROM replication.tables t CROSS JOIN LATERAL unnest(t.key_columns) AS k WHERE t.id = tid;
    EXECUTE format('DROP TRIGGER IF EXISTS replicator_key_change ON %s', rel);
    EXECUTE format('CREATE TRIGGER replicator_key_change AFTER UPDATE ON %s FOR EACH ROW WHEN (%s) '
                   'EXECUTE FUNCTION replication.%I()', rel, changed, 'capture_' || tid);
    RETURN tid;
END $$;
REVOKE ALL ON FUNCTION replication.attach_table(text, name, name, text, text[]) FROM PUBLIC;
