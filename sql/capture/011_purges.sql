-- replicator: purges, migration 011 (a branch drops old sales locally; HQ keeps them).
--
-- `replicator purge` deletes rows of an upload table at the branch without capturing
-- the deletes, and records here what it deleted: the table and the predicate, as the
-- DBA wrote it.  An `init --force` of the uploads, and `verify --repair`, spare at HQ
-- the rows a recorded purge covers: from then on they are HQ's record, not the branch's.

CREATE TABLE replication.purges (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    schema_name name NOT NULL,
    table_name  name NOT NULL,
    predicate   text NOT NULL,
    rows        bigint NOT NULL,
    purged_at   timestamptz NOT NULL DEFAULT now(),
    purged_by   text NOT NULL DEFAULT session_user
);
