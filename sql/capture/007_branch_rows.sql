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
