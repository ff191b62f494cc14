-- replicator: uploads, migration 010 (sales go up from every branch into HQ's tables).
--
-- HQ defines the uploads in hq.yaml (`uploads:`); `replicator hq install` records them
-- here, so a branch reads what it is to send (like replication.catalogs for what it
-- receives).  Each upload table has an owner predicate, the branch's slice: rendered by
-- `hq install` into a restrictive row-level security policy on the HQ table for branch
-- logins, so a branch login writes only its own rows, whoever's client sends them.

CREATE TABLE replication.uploads (
    name       text PRIMARY KEY,
    label      text NOT NULL,
    is_default boolean NOT NULL DEFAULT false,
    folios     jsonb                           -- {table, register, folio} or NULL
);

CREATE TABLE replication.upload_tables (
    upload      text NOT NULL REFERENCES replication.uploads ON DELETE CASCADE,
    schema_name name NOT NULL,
    table_name  name NOT NULL,
    owner       text NOT NULL,                 -- the owner predicate as hq.yaml writes it
    PRIMARY KEY (schema_name, table_name)
);

GRANT SELECT ON replication.uploads, replication.upload_tables TO replicator_branch;

-- What a branch last reported of its uploads: changes its log holds that HQ has not
-- applied yet (hq status shows it, as the branch last saw it).
ALTER TABLE replication.branches ADD COLUMN uploads_pending bigint,
                                 ADD COLUMN uploads_reported_at timestamptz;

-- The session's branch (its login), or NULL for a session that is no active branch.
CREATE FUNCTION replication.session_branch() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT b.name FROM replication.branches b
     WHERE b.role OPERATOR(pg_catalog.=) session_user AND b.active
$$;
REVOKE ALL ON FUNCTION replication.session_branch() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.session_branch() TO replicator_branch;

-- The upload stream a branch login writes at HQ: its position, copy states and set-aside
-- rows are keyed by it (the restrictive policies `hq install` puts on those tables).
CREATE FUNCTION replication.upload_stream() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT 'uploads:' OPERATOR(pg_catalog.||) replication.session_branch()
$$;
REVOKE ALL ON FUNCTION replication.upload_stream() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.upload_stream() TO replicator_branch;

CREATE FUNCTION replication.report_uploads(p_branch text, p_pending bigint)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE replication.branches SET uploads_pending = greatest(p_pending, 0), uploads_reported_at = now()
     WHERE name OPERATOR(pg_catalog.=) p_branch
       AND (role OPERATOR(pg_catalog.=) session_user
            OR (SELECT rolsuper FROM pg_roles WHERE rolname OPERATOR(pg_catalog.=) session_user));
    IF NOT FOUND THEN
        RAISE EXCEPTION 'branch % is not registered on HQ for role %', p_branch, session_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END $$;
REVOKE ALL ON FUNCTION replication.report_uploads(text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.report_uploads(text, bigint) TO replicator_branch;
