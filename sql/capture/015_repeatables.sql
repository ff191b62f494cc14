-- replicator: capture on HQ, migration 015 (functions re-created when their text changes).
--
-- sql/versions.sql keeps replication.repeatables, the text each function file (and
-- hooks.sql) was last applied with; a branch login checks there that HQ has the
-- functions this release calls (db.require_version).

GRANT SELECT ON replication.repeatables TO replicator_branch;
