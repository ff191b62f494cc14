-- replicator: rows set aside on a branch, migration 003.
--
-- A change this branch refuses (a local CHECK, UNIQUE or NOT NULL that HQ's row breaks,
-- a value too long for the local column, a character the database cannot hold) is set
-- aside here, in the same transaction that applies the rest of its chunk, and the
-- stream goes on.  One row per key: a newer change of the key that the branch accepts
-- clears it, one it refuses too replaces it.  `replicator run` retries them at start and
-- every minute; `replicator aside` lists, retries and discards them (README, Operations).

CREATE TABLE replication.set_aside (
    source          text NOT NULL DEFAULT 'hq',
    schema_name     name NOT NULL,
    table_name      name NOT NULL,
    key             text NOT NULL,          -- the key's text form, as the change stream carries it
    op              "char" NOT NULL,        -- 'U': write this image; 'D': delete the key
    image           bytea,                  -- the row as HQ sent it (JSON, UTF-8: this database's
                                            -- encoding may be unable to hold it), or
    record          bytea,                  -- as a binary record of the branch's row type
    sqlstate        text NOT NULL,
    constraint_name text,
    message         text NOT NULL,
    since           timestamptz NOT NULL DEFAULT now(),
    tried_at        timestamptz NOT NULL DEFAULT now(),
    attempts        int NOT NULL DEFAULT 1,
    PRIMARY KEY (source, schema_name, table_name, key)
);

-- Set-aside rows a person discarded on purpose (`replicator aside discard`): never silent.
CREATE TABLE replication.discarded (
    LIKE replication.set_aside,
    discarded_at timestamptz NOT NULL DEFAULT now(),
    discarded_by name NOT NULL DEFAULT session_user
);
