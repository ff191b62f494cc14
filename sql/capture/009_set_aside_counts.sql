-- replicator: capture on HQ, migration 009 (what each branch has set aside).
--
-- A branch reports, with its position, how many changes it refused and set aside
-- (branch migration 003), so `replicator hq status` shows which stores need a look.
-- The 3-argument ack stays for replicators older than this one.

ALTER TABLE replication.branches ADD COLUMN set_aside int NOT NULL DEFAULT 0;

CREATE FUNCTION replication.ack(p_branch text, p_position pg_snapshot, p_applied_until timestamptz,
                                p_set_aside int)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM replication.ack(p_branch, p_position, p_applied_until);     -- who may report what
    UPDATE replication.branches SET set_aside = greatest(p_set_aside, 0) WHERE name = p_branch;
END $$;
REVOKE ALL ON FUNCTION replication.ack(text, pg_snapshot, timestamptz, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replication.ack(text, pg_snapshot, timestamptz, int) TO replicator_branch;
