-- replicator: set-aside rows grouped by source transaction, migration 005.
--
-- For uploads the unit is the source transaction: a sale whose one line HQ refuses is set
-- aside whole (its header and every line), retried whole and discarded whole, so HQ never
-- holds half a sale.  A later transaction that touches a key of a set-aside one joins its
-- unit (they are tried together: the later one may be the fix).  NULL: the key stands
-- alone (the catalog flow, and rows of a first copy, which carry no transaction).

ALTER TABLE replication.set_aside ADD COLUMN unit text;
ALTER TABLE replication.discarded ADD COLUMN unit text;
CREATE INDEX set_aside_unit ON replication.set_aside (stream, unit) WHERE unit IS NOT NULL;
