-- replicator: target-side state keyed by stream, migration 004.
--
-- A database can be a target and a capture source at once (a branch receives catalogs
-- and sends its sales), so the target side no longer uses names the capture side has:
-- per-table copy state is replication.target_tables (capture's replication.tables is the
-- registry of captured tables).  Positions, copy states and set-aside rows belong to a
-- stream by name; the catalog flow from HQ is the stream 'catalogs'.

DO $$
BEGIN
    -- A branch installed before this migration created replication.tables (and its index
    -- tables_pkey, which would collide with capture's) for its copy state.
    IF to_regclass('replication.target_tables') IS NULL THEN
        ALTER TABLE replication.tables RENAME TO target_tables;
        ALTER INDEX replication.tables_pkey RENAME TO target_tables_pkey;
    END IF;
END
$$;

ALTER TABLE replication.position RENAME COLUMN source TO stream;
ALTER TABLE replication.target_tables RENAME COLUMN source TO stream;
ALTER TABLE replication.target_tables ALTER COLUMN stream DROP DEFAULT;
ALTER TABLE replication.set_aside RENAME COLUMN source TO stream;
ALTER TABLE replication.set_aside ALTER COLUMN stream DROP DEFAULT;
ALTER TABLE replication.discarded RENAME COLUMN source TO stream;

UPDATE replication.position SET stream = 'catalogs' WHERE stream = 'hq';
UPDATE replication.target_tables SET stream = 'catalogs' WHERE stream = 'hq';
UPDATE replication.set_aside SET stream = 'catalogs' WHERE stream = 'hq';
UPDATE replication.discarded SET stream = 'catalogs' WHERE stream = 'hq';
