-- Make what branch logins can read match the registry: catalog roles and their SELECT
-- grants (none for retired tables, none for the group, none for a filtered
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
