-- replicator: capture on HQ, migration 007 (a branch login reads only its own rows).
--
-- A filtered catalog (stock per store) is readable by a branch login only through
-- its filter, filled with that login's own registered parameters:
-- * the catalog tables: the catalog role has no grant on a filtered table; a branch
--   reads its rows (init, verify) through replication.read_rows, which applies the
--   filter as HQ rendered it at `replicator hq install` (replication.tables.row_access);
-- * the change log: the branch_reads policy, rebuilt at every install, holds each
--   filtered table's filter over the row images (capture.restrict_rows).
-- Neither touches HQ's application tables: row-level security on them would refuse
-- COPY FROM to every writer that does not own the table, and a view would make their
-- ALTER TABLE fail on every column it names.

-- The filter as rendered by `hq install` (sqlglot, then psycopg.sql): columns by name,
-- parameters as replication.branch_param(); NULL when the table has no filter.
ALTER TABLE replication.tables ADD COLUMN row_access text;

-- One registered parameter of the session's branch (hq add-branch --param), as text;
-- NULL for a session that is no active branch, so its filtered rows are none.
CREATE FUNCTION replication.branch_param(p_name text) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT b.params OPERATOR(pg_catalog.->>) p_name FROM replication.branches b
     WHERE b.role OPERATOR(pg_catalog.=) session_user AND b.active
$$;
REVOKE ALL ON FUNCTION replication.branch_param(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.branch_param(text) TO replicator_branch;

-- The rows of a filtered table this branch may read, only those its filter passes, as
-- the table's own row type with every excluded column NULL:
--     SELECT ... FROM replication.read_rows(7, NULL::public.stock) AS stock
-- Only for tables of catalogs HQ grants this login (granted_tables()).  RETURN QUERY
-- collects the rows before the caller sees the first: one store's share of a table.
CREATE FUNCTION replication.read_rows(p_table int, p_like anyelement) RETURNS SETOF anyelement
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t    replication.tables;
    rel  regclass;
    cols text;
BEGIN
    SELECT * INTO t FROM replication.tables WHERE id = p_table AND active;
    IF NOT FOUND OR NOT (p_table = ANY (replication.granted_tables())) THEN
        RAISE EXCEPTION 'replicated table % is not granted to this login', p_table
              USING ERRCODE = 'insufficient_privilege';
    END IF;
    rel := to_regclass(format('%I.%I', t.schema_name, t.table_name));
    IF t.row_access IS NULL OR rel IS NULL THEN
        RAISE EXCEPTION 'table %.% has no row restriction on HQ; read it directly', t.schema_name, t.table_name
              USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF pg_typeof(p_like) <> (SELECT reltype FROM pg_class WHERE oid = rel)::regtype THEN
        RAISE EXCEPTION 'read_rows(%, ...) takes NULL::%', p_table, rel USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(CASE WHEN attname = ANY (t.exclude_columns)
                           THEN 'NULL::' || format_type(atttypid, atttypmod) ELSE quote_ident(attname) END,
                      ', ' ORDER BY attnum) INTO cols
      FROM pg_attribute WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped;
    RETURN QUERY EXECUTE format('SELECT %s FROM %s WHERE (%s) IS TRUE', cols, rel, t.row_access);
END $$;
REVOKE ALL ON FUNCTION replication.read_rows(int, anyelement) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.read_rows(int, anyelement) TO replicator_branch;

-- Make what branch logins can read match the registry: catalog roles and their SELECT
-- grants (none for retired tables, none for the group; new in 007: none for a filtered
-- table whose restriction is built, so a re-applied `hq sql` keeps it closed), branch
-- memberships, and newly excluded columns removed from log rows written before.
CREATE OR REPLACE FUNCTION replication.build_access() RETURNS void
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
        -- a filtered table's rows are read through read_rows once `hq install` rendered its filter
        IF t.filter IS NULL OR t.row_access IS NULL THEN
            SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols FROM pg_attribute
             WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped AND attname <> ALL (t.exclude_columns);
            EXECUTE format('GRANT SELECT (%s) ON %s TO %I', cols, rel, replication.catalog_role(t.catalog));
        END IF;
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
