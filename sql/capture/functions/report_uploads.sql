-- A branch reports its uploads' pending count (`hq status` shows it as the branch last
-- saw it); only its own row, as for ack.
CREATE OR REPLACE FUNCTION replication.report_uploads(p_branch text, p_pending bigint)
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
REVOKE ALL ON FUNCTION replication.report_uploads(text,bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.report_uploads(text,bigint) TO replicator_branch;
