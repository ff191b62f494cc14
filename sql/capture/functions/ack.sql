-- A branch reports its own position; it cannot touch another branch's row, and it
-- cannot move its own backwards: an old position would keep HQ's log from being
-- pruned for ever.  A branch restored from a backup is told to re-initialize when
-- it needs rows HQ no longer keeps (replication.horizon).  The 4-argument form also
-- reports how many changes the branch set aside (`hq status`); the 3-argument one
-- stays for older replicators.
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
REVOKE ALL ON FUNCTION replication.ack(text,pg_snapshot,timestamp with time zone) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.ack(text,pg_snapshot,timestamp with time zone) TO replicator_branch;

CREATE OR REPLACE FUNCTION replication.ack(p_branch text, p_position pg_snapshot, p_applied_until timestamptz,
                                p_set_aside int)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM replication.ack(p_branch, p_position, p_applied_until);     -- who may report what
    UPDATE replication.branches SET set_aside = greatest(p_set_aside, 0) WHERE name = p_branch;
END $$;
REVOKE ALL ON FUNCTION replication.ack(text,pg_snapshot,timestamp with time zone,integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.ack(text,pg_snapshot,timestamp with time zone,integer) TO replicator_branch;
