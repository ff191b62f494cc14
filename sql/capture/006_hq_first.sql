-- replicator: capture on HQ, migration 006 (HQ first).
--
-- Nothing a branch, an HQ application role or a careless admin does through
-- replication can fail, block or escalate on HQ (README, Security).  The tables and
-- grants of that; the functions' side is in functions/ (capture_body_plain, on_ddl, ack).

-- When capture of a table (re)started (mark_capture_start, by a trigger in hooks.sql).
ALTER TABLE replication.tables ADD COLUMN capture_since xid8;

-- retire_others takes p_detach now (functions/retire_others.sql).
DROP FUNCTION IF EXISTS replication.retire_others(text[], text[]);

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

-- Branch logins read by the policy branch_reads (hooks.sql: it calls granted_tables()).
ALTER TABLE replication.change_log ENABLE ROW LEVEL SECURITY;
-- Everyone else with SELECT on the log (admins, a supervisor role for `hq status`) reads it whole;
-- INSERT (capture), UPDATE and DELETE (prune) stay governed by grants alone, so a capture
-- function owned by another admin than the log's owner still writes.
CREATE POLICY others_read ON replication.change_log FOR SELECT
    USING ((SELECT NOT pg_catalog.pg_has_role(session_user, 'replicator_branch', 'MEMBER')));
CREATE POLICY capture_writes ON replication.change_log FOR INSERT WITH CHECK (true);
CREATE POLICY maintenance_updates ON replication.change_log FOR UPDATE USING (true);
CREATE POLICY maintenance_deletes ON replication.change_log FOR DELETE USING (true);
