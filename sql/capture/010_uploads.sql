-- replicator: uploads, migration 010 (sales go up from every branch into HQ's tables).
--
-- HQ defines the uploads in hq.yaml (`uploads:`); `replicator hq install` records them
-- here, so a branch reads what it is to send (like replication.catalogs for what it
-- receives).  Each upload table has an owner predicate, the branch's slice: rendered by
-- `hq install` into a restrictive row-level security policy on the HQ table for branch
-- logins, so a branch login writes only its own rows, whoever's client sends them.

CREATE TABLE replication.uploads (
    name       text PRIMARY KEY,
    label      text NOT NULL,
    is_default boolean NOT NULL DEFAULT false,
    folios     jsonb                           -- {table, register, folio} or NULL
);

CREATE TABLE replication.upload_tables (
    upload      text NOT NULL REFERENCES replication.uploads ON DELETE CASCADE,
    schema_name name NOT NULL,
    table_name  name NOT NULL,
    owner       text NOT NULL,                 -- the owner predicate as hq.yaml writes it
    PRIMARY KEY (schema_name, table_name)
);

GRANT SELECT ON replication.uploads, replication.upload_tables TO replicator_branch;

-- What a branch last reported of its uploads: changes its log holds that HQ has not
-- applied yet (hq status shows it, as the branch last saw it).
ALTER TABLE replication.branches ADD COLUMN uploads_pending bigint,
                                 ADD COLUMN uploads_reported_at timestamptz;
