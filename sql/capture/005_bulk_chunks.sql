-- replicator: capture on HQ, migration 005.
--
-- Bulk statements (1,000 rows or more) on tables without a row filter log their row
-- images 1,000 to a log row (README, Performance): a log row per changed row, with its
-- identity and index entries, cost a bulk UPDATE more than the images themselves.  Such
-- a log row carries the images in `rows` (op i, u or d) instead of one in `row`; readers
-- expand it (reader.py).  Smaller statements, and every statement on a filtered table,
-- log one log row per change as before.
-- A primary-key change is now logged by a row trigger (replicator_key_change, whose
-- WHEN is false unless a key changes: it costs other updates nothing) as a delete of
-- the old key, before the statement trigger logs the new row; so the bulk UPDATE needs
-- no old/new join, and it logs every row it updated, changed or not.

ALTER TABLE replication.change_log ADD COLUMN rows jsonb[];
COMMENT ON COLUMN replication.change_log.rows IS
    'replicator: images of a bulk statement (op i, u or d), each as `row` would hold it for op I, U or D';
-- Such a log row's op is lower case, so that a replicator older than this migration stops
-- at it (an op it does not know) instead of applying `row`, which is NULL there.  NOT
-- VALID: the rows already in the log passed the former check, and validating them would
-- hold the log's lock (and every captured write) for a scan of the whole log.
ALTER TABLE replication.change_log DROP CONSTRAINT change_log_op_check,
    ADD CONSTRAINT change_log_op_check
        CHECK (CASE WHEN rows IS NULL THEN op IN ('I', 'U', 'D', 'T') ELSE op IN ('i', 'u', 'd') END) NOT VALID;
-- A reader checks here whether a window holds arrays at all: most do not, and are read
-- without expanding them (reader.py).  Only bulk log rows are in this index.
CREATE INDEX change_log_arrays ON replication.change_log (xid) WHERE rows IS NOT NULL;
-- lz4 compresses a chunk of images in a fraction of pglz's time; without lz4 in the
-- server a chunk is stored uncompressed (pglz would cost a bulk UPDATE more than that).
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_settings
                WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE replication.change_log ALTER COLUMN rows SET COMPRESSION lz4;
    ELSE
        ALTER TABLE replication.change_log ALTER COLUMN rows SET STORAGE EXTERNAL;
    END IF;
END $$;
