-- replicator: state on a branch, migration 001.
--
-- The branch's position and per-table initialization live in the branch
-- database itself, written in the same transaction as the rows they cover:
-- that is what makes a crash at any instant neither lose nor repeat changes.

CREATE SCHEMA IF NOT EXISTS replication;

-- replication.versions, the record of migrations, is created by sql/versions.sql.

CREATE TABLE replication.position (
    source          text PRIMARY KEY,          -- 'hq' for the catalog flow
    snapshot        pg_snapshot NOT NULL,       -- every change visible in it is applied
    window_snapshot pg_snapshot,                -- window being applied in chunks, or NULL
    window_last_id  bigint NOT NULL DEFAULT 0,  -- last log id applied inside that window
    config_version  bigint NOT NULL DEFAULT 0,  -- bumped by init; a running apply reloads
    applied_changes bigint NOT NULL DEFAULT 0,
    applied_until   timestamptz,                -- HQ time of the newest applied change
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE replication.target_tables (
    source         text NOT NULL DEFAULT 'hq',
    schema_name    name NOT NULL,
    table_name     name NOT NULL,
    catalog        text NOT NULL,
    copy_snapshot  pg_snapshot,                 -- changes visible in it are in the copy
    initialized_at timestamptz,
    rows_copied    bigint,
    PRIMARY KEY (source, schema_name, table_name)
);
