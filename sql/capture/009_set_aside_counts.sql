-- replicator: capture on HQ, migration 009 (what each branch has set aside).
--
-- A branch reports, with its position, how many changes it refused and set aside
-- (branch migration 003), so `replicator hq status` shows which stores need a look.
-- The 3-argument ack stays for replicators older than this one.

ALTER TABLE replication.branches ADD COLUMN set_aside int NOT NULL DEFAULT 0;
