-- replicator: the record of applied migrations, run before any migration of either side.
--
-- One database can hold both sides of replication: capture (sql/capture: the change log
-- and registry of a source, such as HQ for catalogs) and target (sql/target: positions,
-- copy snapshots and set-aside rows of a target, such as a branch).  Each side numbers its
-- own migrations, so a record is keyed by (side, version): capture's 002 and target's 002
-- never mistake each other.  Idempotent: it runs before every install.

CREATE SCHEMA IF NOT EXISTS replication;

CREATE TABLE IF NOT EXISTS replication.versions (
    side       text NOT NULL CHECK (side IN ('capture', 'target')),
    version    int NOT NULL,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (side, version)
);

-- A database installed by a release before sides existed has versions (version, name,
-- applied_at) and only one side in it: HQ's capture (it has the change log) or a branch's
-- target.  Record which, and key by side from now on.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                    WHERE attrelid = 'replication.versions'::regclass AND attname = 'side'
                      AND NOT attisdropped) THEN
        ALTER TABLE replication.versions ADD COLUMN side text;
        UPDATE replication.versions
           SET side = CASE WHEN to_regclass('replication.change_log') IS NOT NULL
                           THEN 'capture' ELSE 'target' END;
        ALTER TABLE replication.versions
            ALTER COLUMN side SET NOT NULL,
            ADD CHECK (side IN ('capture', 'target')),
            DROP CONSTRAINT versions_pkey,
            ADD PRIMARY KEY (side, version);
    END IF;
END
$$;

-- The files re-applied whenever their text changes (each side's functions/ and hooks.sql):
-- the checksum of the text last applied.  A file whose checksum differs is applied again.
CREATE TABLE IF NOT EXISTS replication.repeatables (
    side       text NOT NULL CHECK (side IN ('capture', 'target')),
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (side, name)
);
