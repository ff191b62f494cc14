-- replicator: capture on HQ, migration 006 (HQ first).
--
-- Nothing a branch, an HQ application role or a careless admin does through
-- replication can fail, block or escalate on HQ (README, Security):
--
-- * Capture functions are SECURITY DEFINER (writers need no rights on the log) and
--   run in the writer's session, with the writer's search_path.  Every operator,
--   type and function in their text is schema-qualified (OPERATOR(pg_catalog.=),
--   pg_catalog.text[]), so no writer can slip its own `=` in front of pg_catalog
--   and have it run as the functions' owner.  No SET search_path clause: it would
--   cost every captured write a save and restore of the setting.
-- * Capture no longer sends a NOTIFY.  PostgreSQL queues notifications at commit:
--   any login that LISTENs and idles in a transaction can fill the queue and make
--   every capturing commit fail, and notifying commits serialize on one lock.
--   Branches poll the log instead (one indexed probe per poll_interval).
-- * The DDL event trigger runs as its owner with a fixed search_path and never
--   raises: someone else's ALTER TABLE never fails because of replication.
-- * A branch cannot move its reported position backwards (it would hold HQ's log).
--
-- Redefines capture_body, on_ddl and ack; `replicator hq install` then regenerates
-- every table's capture function, because its text changed.

-- The text of one table's capture function: static statements (their plans are
-- cached) that write the table's row images into the change log.
CREATE OR REPLACE FUNCTION replication.capture_body(p_tid int, p_rel regclass, p_keys text[], p_filter text,
                                         p_exclude text[])
RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
    rel      regclass := p_rel;
    keys     text[] := p_keys;
    tid      int := p_tid;
    same_key text;
    -- n.* / o.*: whole-row references even when the table has a column named n or o
    new_img  text := 'pg_catalog.to_jsonb(n.*)';
    old_img  text := 'pg_catalog.to_jsonb(o.*)';
    upd_old  text := 'NULL';
    exact    text[];         -- columns whose to_jsonb() form is not exact: they travel as text
    new_txt  text;
    old_txt  text;
    guard    text := '';     -- the writer-settings check, when the table needs it
    restore  text := '';
    writes   text;           -- the statements that log rows, for fewer than 1,000 rows
    bulk     text;           -- and for 1,000 rows or more
    upd_rows text;           -- the UPDATE's statement
    chunk    text := $c$(SELECT %s AS img, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS chunk
              FROM %s) c GROUP BY c.chunk;$c$;
BEGIN
    SELECT string_agg(format('o.%1$I OPERATOR(pg_catalog.=) n.%1$I', k), ' AND ') INTO same_key FROM unnest(keys) AS k;
    IF cardinality(p_exclude) > 0 THEN
        new_img := format('(pg_catalog.to_jsonb(n.*) OPERATOR(pg_catalog.-) %L::pg_catalog.text[])', p_exclude);
        old_img := format('(pg_catalog.to_jsonb(o.*) OPERATOR(pg_catalog.-) %L::pg_catalog.text[])', p_exclude);
    END IF;
    -- to_jsonb() loses the text of json (key order, spacing, duplicate keys), turns a
    -- json(b) null into SQL NULL, -0 into 0, and drops array bounds; composites nest all
    -- of these.  Such columns travel as their text form and the branch reads them back
    -- with the type's input function, as COPY would (apply.py).  The columns are named in
    -- the trigger: after DROP or RENAME of one, re-run `replicator hq install`.
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO exact
      FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname <> ALL (coalesce(p_exclude, '{}'))
       AND (a.atttypid IN ('pg_catalog.json'::regtype, 'pg_catalog.jsonb'::regtype,
                           'pg_catalog.float4'::regtype, 'pg_catalog.float8'::regtype)
            OR ty.typcategory = 'A' OR ty.typtype = 'c');
    IF exact IS NOT NULL THEN
        -- jsonb_build_object takes at most 100 arguments: 50 columns per call
        SELECT string_agg(format('pg_catalog.jsonb_build_object(%s)', pn), ' OPERATOR(pg_catalog.||) '),
               string_agg(format('pg_catalog.jsonb_build_object(%s)', po), ' OPERATOR(pg_catalog.||) ')
          INTO new_txt, old_txt
          FROM (SELECT string_agg(format('%L, n.%I::pg_catalog.text', c, c), ', ' ORDER BY i) AS pn,
                       string_agg(format('%L, o.%I::pg_catalog.text', c, c), ', ' ORDER BY i) AS po
                  FROM unnest(exact) WITH ORDINALITY AS u(c, i) GROUP BY (i - 1) / 50) g;
        new_img := format('(%s OPERATOR(pg_catalog.||) %s)', new_img, new_txt);
        old_img := format('(%s OPERATOR(pg_catalog.||) %s)', old_img, old_txt);
    END IF;
    IF p_filter IS NOT NULL THEN
        upd_old := old_img;   -- lets a branch see a row leave its filter
    END IF;

    -- The images must not depend on the writing session's settings (a float with
    -- extra_float_digits = 0 loses digits; DateStyle, IntervalStyle and bytea_output
    -- change text forms).  Function-level SET clauses would cost every write a GUC
    -- save/restore; instead the rare session with unusual settings takes a slow path
    -- that pins them for the capture statement and restores them.  TimeZone does not
    -- matter: every text form carries its offset, and readers compare keys by value.
    -- A table whose columns' images depend on none of these settings skips the check
    -- (it costs a single-row write about 0.04 of its speed).  Domains count by their
    -- base type; anything not listed here keeps the check.
    IF EXISTS (SELECT FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
                WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
                  AND a.attname <> ALL (coalesce(p_exclude, '{}'))
                  AND ty.typtype <> 'e'
                  AND (CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE ty.oid END)::regtype NOT IN (
                      'int2', 'int4', 'int8', 'oid', 'numeric', 'bool', 'text', 'varchar', 'bpchar',
                      'name', '"char"', 'uuid', 'date', 'timestamp', 'timestamptz', 'json', 'jsonb')) THEN
        guard := $g$
    IF pg_catalog.current_setting('DateStyle') OPERATOR(pg_catalog.!~~) 'ISO%'
       OR pg_catalog.current_setting('IntervalStyle') OPERATOR(pg_catalog.<>) 'postgres'
       OR pg_catalog.current_setting('extra_float_digits') OPERATOR(pg_catalog.<) '1'
       OR pg_catalog.current_setting('bytea_output') OPERATOR(pg_catalog.<>) 'hex' THEN
        saved := ARRAY[pg_catalog.current_setting('DateStyle'), pg_catalog.current_setting('IntervalStyle'),
                       pg_catalog.current_setting('extra_float_digits'), pg_catalog.current_setting('bytea_output')];
        PERFORM pg_catalog.set_config('DateStyle', 'ISO, MDY', true),
                pg_catalog.set_config('IntervalStyle', 'postgres', true),
                pg_catalog.set_config('extra_float_digits', '3', true),
                pg_catalog.set_config('bytea_output', 'hex', true);
    END IF;$g$;
        restore := $g$
    IF saved IS NOT NULL THEN
        PERFORM pg_catalog.set_config('DateStyle', saved[1], true),
                pg_catalog.set_config('IntervalStyle', saved[2], true),
                pg_catalog.set_config('extra_float_digits', saved[3], true),
                pg_catalog.set_config('bytea_output', saved[4], true);
    END IF;$g$;
    END IF;

    -- A changed row is an upsert of its new image, an unchanged row is nothing.  A key
    -- change's delete of the old key was logged before, by the row trigger.
    upd_rows := format($u$INSERT INTO replication.change_log (table_id, op, row, old_row)
            SELECT %s, 'U', %s, %s
              FROM new_rows n LEFT JOIN old_rows o ON %s
             WHERE o.%I IS NULL OR NOT (o.* OPERATOR(pg_catalog.*=) n.*);$u$,
        tid, new_img, upd_old, same_key, keys[1]);
    writes := format($w$IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO replication.change_log (table_id, op, row)
            SELECT %1$s, 'I', %2$s FROM new_rows n;
        ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
            %4$s
        ELSE
            INSERT INTO replication.change_log (table_id, op, row)
            SELECT %1$s, 'D', %3$s FROM old_rows o;
        END IF;$w$, tid, new_img, old_img, upd_rows);

    -- A bulk statement logs its images 1,000 to a log row (an array, compressed with lz4
    -- where the server has it): a log row per changed row, with its index entries, costs
    -- more than the rest of capture.  Every updated row is logged, changed or not: pairing
    -- old and new rows to skip the unchanged ones costs 0.3-0.6 of the statement's time.  A
    -- table with a row filter logs row by row: its UPDATEs need each new image next to
    -- its old one (a branch must see a row leave its filter), and a replicator older than
    -- this migration would skip its arrays unseen, where for other tables it stops.
    bulk := writes;
    IF p_filter IS NULL THEN
        bulk := format($w$IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO replication.change_log (table_id, op, rows)
            SELECT %1$s, 'i', pg_catalog.array_agg(c.img) FROM %2$s
        ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
            INSERT INTO replication.change_log (table_id, op, rows)
            SELECT %1$s, 'u', pg_catalog.array_agg(c.img) FROM %2$s
        ELSE
            INSERT INTO replication.change_log (table_id, op, rows)
            SELECT %1$s, 'd', pg_catalog.array_agg(c.img) FROM %3$s
        END IF;$w$, tid, format(chunk, new_img, 'new_rows n'), format(chunk, old_img, 'old_rows o'));
    END IF;

    RETURN format($f$
DECLARE
    saved   pg_catalog.text[];
    planner pg_catalog.text[];
BEGIN%1$s
    IF TG_LEVEL OPERATOR(pg_catalog.=) 'ROW' THEN
        -- A key change (the row trigger's WHEN): the old key is deleted, before the
        -- statement trigger logs the new row.
        INSERT INTO replication.change_log (table_id, op, row)
        SELECT %2$s, 'D', %5$s FROM (SELECT OLD.*) o;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'TRUNCATE' THEN
        INSERT INTO replication.change_log (table_id, op) VALUES (%2$s, 'T');
    ELSE
        -- A session plans each statement at its first run and keeps the plan, which fits
        -- that run's row count: after a bulk statement, single-row ones would run a plan
        -- made for a million rows (JIT compiled on every run).  So statements of 1,000 rows
        -- or more run copies of their own, planned without JIT and, for the UPDATE's
        -- old/new join, with a hash join, which is what suits them.
        IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
            PERFORM FROM old_rows o OFFSET 999 LIMIT 1;
        ELSE
            PERFORM FROM new_rows n OFFSET 999 LIMIT 1;
        END IF;
        IF NOT FOUND THEN
        %3$s
        ELSE
        planner := ARRAY[pg_catalog.current_setting('jit'), pg_catalog.current_setting('enable_mergejoin')];
        PERFORM pg_catalog.set_config('jit', 'off', true), pg_catalog.set_config('enable_mergejoin', 'off', true);
        %4$s
        PERFORM pg_catalog.set_config('jit', planner[1], true),
                pg_catalog.set_config('enable_mergejoin', planner[2], true);
        END IF;
    END IF;
    %6$s
    RETURN NULL;
END$f$, guard, tid, writes, bulk, old_img, restore);
END $$;

-- After an ALTER TABLE on a captured table, regenerate its capture (it names some
-- columns).  SECURITY DEFINER with a fixed search_path: the role running the DDL
-- (an application that owns its tables) needs no rights on schema replication, and
-- nothing here resolves through its search_path.  It never raises: a failure is a
-- warning and the DDL goes through (the DBA re-runs `replicator hq install`).
CREATE OR REPLACE FUNCTION replication.on_ddl()
RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t         replication.tables;
    refreshed boolean := false;
BEGIN
    FOR t IN SELECT DISTINCT rt.* FROM pg_catalog.pg_event_trigger_ddl_commands() c
               JOIN replication.tables rt
                 ON rt.active AND c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                AND c.objid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(
                        pg_catalog.format('%I.%I', rt.schema_name, rt.table_name)) LOOP
        BEGIN
            PERFORM replication.attach_table(t.catalog, t.schema_name, t.table_name, t.filter, t.exclude_columns);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'replicator: could not refresh capture of %.%: %; run `replicator hq install`',
                t.schema_name, t.table_name, SQLERRM;
        END;
        refreshed := true;
    END LOOP;
    IF refreshed THEN
        BEGIN
            PERFORM replication.build_access();     -- attach_table grants the group; take that back
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'replicator: could not refresh branch grants: %; run `replicator hq install`', SQLERRM;
        END;
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'replicator: DDL event trigger skipped: %', SQLERRM;
END $$;
REVOKE ALL ON FUNCTION replication.on_ddl() FROM PUBLIC;

-- A branch reports its own position; it cannot touch another branch's row, and it
-- cannot move its own backwards: an old position would keep HQ's log from being
-- pruned for ever.  A branch restored from a backup is told to re-initialize when
-- it needs rows HQ no longer keeps (replication.horizon).
CREATE OR REPLACE FUNCTION replication.ack(p_branch text, p_position pg_snapshot, p_applied_until timestamptz)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE replication.branches
       SET position = CASE WHEN position IS NULL OR pg_snapshot_xmax(p_position) >= pg_snapshot_xmax(position)
                           THEN p_position ELSE position END,
           acked_at = now(),
           applied_until = GREATEST(applied_until, p_applied_until)
     WHERE name = p_branch AND active
       AND (role = session_user
            OR (SELECT rolsuper FROM pg_roles WHERE rolname = session_user));
    IF NOT FOUND THEN
        RAISE EXCEPTION 'branch % is not registered (or not active) on HQ for role %', p_branch, session_user
            USING HINT = 'register it with: replicator hq add-branch', ERRCODE = 'insufficient_privilege';
    END IF;
END $$;
REVOKE ALL ON FUNCTION replication.ack(text, pg_snapshot, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.ack(text, pg_snapshot, timestamptz) TO replicator_branch;

-- When capture of a table (re)started.  A branch whose copy of the table is older
-- missed the changes made while capture was off, and is told to re-initialize that
-- catalog instead of being reported up to date (schema.py).
ALTER TABLE replication.tables ADD COLUMN capture_since xid8;
CREATE FUNCTION replication.mark_capture_start() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' OR (NEW.active AND NOT OLD.active) THEN
        NEW.capture_since := pg_current_xact_id();
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER replicator_capture_start BEFORE INSERT OR UPDATE OF active ON replication.tables
    FOR EACH ROW EXECUTE FUNCTION replication.mark_capture_start();

-- Make the registry match a configuration: tables and catalogs not listed stop.  While
-- active branches are registered, stopping capture of a table they may receive loses
-- their changes: it needs p_detach (`replicator hq install --detach`).
DROP FUNCTION replication.retire_others(text[], text[]);
CREATE FUNCTION replication.retire_others(p_catalogs text[], p_tables text[], p_detach boolean)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tid      int;
    leaving  text;
BEGIN
    SELECT string_agg(format('%s.%s (catalog %s)', schema_name, table_name, catalog), ', ' ORDER BY id)
      INTO leaving FROM replication.tables
     WHERE active AND format('%s.%s', schema_name, table_name) <> ALL (p_tables);
    IF leaving IS NOT NULL AND NOT p_detach
       AND EXISTS (SELECT FROM replication.branches WHERE active) THEN
        RAISE EXCEPTION 'the configuration no longer lists %, which registered branches receive', leaving
            USING ERRCODE = 'object_in_use',
                  HINT = 'add it back, or stop capturing it on purpose with `replicator hq install --detach` '
                         '(branches then need `replicator init --force` for it if it comes back)';
    END IF;
    FOR tid IN SELECT id FROM replication.tables
                WHERE active AND format('%s.%s', schema_name, table_name) <> ALL (p_tables) LOOP
        PERFORM replication.detach_table(tid);
    END LOOP;
    DELETE FROM replication.catalogs WHERE name <> ALL (p_catalogs);
END $$;
REVOKE ALL ON FUNCTION replication.retire_others(text[], text[], boolean) FROM PUBLIC;

-- What a branch login reads is enforced here, not by the replicator (README, Security):
-- * catalog tables: each catalog has a role replicator_catalog_<catalog> holding SELECT on
--   its tables' readable columns (never excluded ones); a branch login is a member of the
--   roles of the catalogs HQ grants it (replication.branches.catalogs; NULL: all), and the
--   group replicator_branch itself reads no catalog table;
-- * the change log: row-level security with the same grants (rows of tables of granted
--   catalogs only); excluded columns are not in it, old rows included.
-- The branch is the session's login (session_user), looked up in replication.branches.
-- Not enforced yet: rows of filtered catalogs that belong to other branches (README).
ALTER TABLE replication.branches ADD COLUMN catalogs text[];
-- Excluded columns already removed from log rows written before their exclusion.
ALTER TABLE replication.tables ADD COLUMN stripped text[] NOT NULL DEFAULT '{}';

CREATE FUNCTION replication.granted_tables() RETURNS int[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(t.id), '{}')
      FROM replication.tables t JOIN replication.branches b ON b.role = session_user AND b.active
     WHERE t.active AND (b.catalogs IS NULL OR t.catalog = ANY (b.catalogs))
$$;
-- The catalogs HQ grants a branch (NULL: all), for its own login (or a superuser).
CREATE FUNCTION replication.granted_catalogs(p_branch text) RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT b.catalogs FROM replication.branches b
     WHERE b.name = p_branch
       AND (b.role = session_user OR (SELECT rolsuper FROM pg_roles WHERE rolname = session_user))
$$;
REVOKE ALL ON FUNCTION replication.granted_tables(), replication.granted_catalogs(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.granted_tables(), replication.granted_catalogs(text) TO replicator_branch;

ALTER TABLE replication.change_log ENABLE ROW LEVEL SECURITY;
-- Branch logins: the tables of their catalogs.  The scalar subquery runs once per query;
-- the comparison is leakproof, so the window's xid index conditions still apply first.
CREATE POLICY branch_reads ON replication.change_log FOR SELECT TO replicator_branch
    USING (change_log.table_id OPERATOR(pg_catalog.=) ANY ((SELECT replication.granted_tables())::pg_catalog.int4[]));
-- Everyone else with SELECT on the log (admins, a supervisor role for `hq status`) reads it whole;
-- INSERT (capture), UPDATE and DELETE (prune) stay governed by grants alone, so a capture
-- function owned by another admin than the log's owner still writes.
CREATE POLICY others_read ON replication.change_log FOR SELECT
    USING ((SELECT NOT pg_catalog.pg_has_role(session_user, 'replicator_branch', 'MEMBER')));
CREATE POLICY capture_writes ON replication.change_log FOR INSERT WITH CHECK (true);
CREATE POLICY maintenance_updates ON replication.change_log FOR UPDATE USING (true);
CREATE POLICY maintenance_deletes ON replication.change_log FOR DELETE USING (true);

CREATE FUNCTION replication.catalog_role(p_catalog text) RETURNS name
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ('replicator_catalog_' || p_catalog)::name
$$;

-- Make what branch logins can read match the registry: catalog roles and their SELECT
-- grants (none for retired tables, none for the group), branch memberships, and newly
-- excluded columns removed from log rows written before.
CREATE FUNCTION replication.build_access() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t      replication.tables;
    rel    regclass;
    every  text;
    cols   text;
    c      text;
    b      replication.branches;
BEGIN
    FOR c IN SELECT name FROM replication.catalogs UNION SELECT catalog FROM replication.tables WHERE active LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = replication.catalog_role(c)) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', replication.catalog_role(c));
        END IF;
    END LOOP;
    FOR t IN SELECT * FROM replication.tables ORDER BY id LOOP
        rel := to_regclass(format('%I.%I', t.schema_name, t.table_name));
        CONTINUE WHEN rel IS NULL;
        SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO every FROM pg_attribute
         WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped;
        EXECUTE format('REVOKE SELECT ON %s FROM replicator_branch', rel);
        EXECUTE format('REVOKE SELECT (%s) ON %s FROM replicator_branch', every, rel);
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = replication.catalog_role(t.catalog)) THEN
            EXECUTE format('REVOKE SELECT ON %s FROM %I', rel, replication.catalog_role(t.catalog));
            EXECUTE format('REVOKE SELECT (%s) ON %s FROM %I', every, rel, replication.catalog_role(t.catalog));
        END IF;
        CONTINUE WHEN NOT t.active;
        SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols FROM pg_attribute
         WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped AND attname <> ALL (t.exclude_columns);
        EXECUTE format('GRANT SELECT (%s) ON %s TO %I', cols, rel, replication.catalog_role(t.catalog));
        IF NOT t.exclude_columns <@ t.stripped THEN
            UPDATE replication.change_log l
               SET row = l.row - t.exclude_columns, old_row = l.old_row - t.exclude_columns,
                   rows = CASE WHEN l.rows IS NULL THEN NULL
                               ELSE ARRAY(SELECT r - t.exclude_columns FROM unnest(l.rows) r) END
             WHERE l.table_id = t.id;
            UPDATE replication.tables SET stripped = t.exclude_columns WHERE id = t.id;
        END IF;
    END LOOP;
    FOR b IN SELECT * FROM replication.branches WHERE role IS NOT NULL LOOP
        CONTINUE WHEN NOT EXISTS (SELECT FROM pg_roles WHERE rolname = b.role);
        FOR c IN SELECT name FROM replication.catalogs LOOP
            IF b.active AND (b.catalogs IS NULL OR c = ANY (b.catalogs)) THEN
                IF NOT pg_has_role(b.role, replication.catalog_role(c), 'MEMBER') THEN
                    EXECUTE format('GRANT %I TO %I', replication.catalog_role(c), b.role);
                END IF;
            ELSIF pg_has_role(b.role, replication.catalog_role(c), 'MEMBER') THEN
                EXECUTE format('REVOKE %I FROM %I', replication.catalog_role(c), b.role);
            END IF;
        END LOOP;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION replication.build_access() FROM PUBLIC;
