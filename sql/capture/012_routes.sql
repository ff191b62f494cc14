-- replicator: capture on HQ, migration 012 (routes: a branch reads only log rows that can be its own).
--
-- A catalog filtered per store (stock: store_id = :store_id) sends each change to one
-- branch, yet every branch's probe and window evaluated the filter on every store's log
-- rows since its last read: a fleet's cost grew with branches times HQ's write rate.  Now
-- capture writes a route into such a table's log rows: '<table id>:<the column's text>'
-- (`replicator hq install` picks the column: one the whole filter requires equal to a
-- parameter, of a type whose text is equal exactly when its value is).  A branch login's
-- queries read the rows without a route and those of its own routes (branch_routes(),
-- probe()), each a range of the index change_log_route; the log's row-level policy still decides
-- every row they return, so a route only narrows what is looked at.  A row whose images
-- disagree on the column (it moved to another store) or any other row carries no route
-- and is looked at by every branch, as before.
--
-- `hq install` changes a table's route with the table locked against writers (no
-- transaction that ran the old capture is open): its routed rows lose their routes and
-- the new one takes effect for capture and branches at the same commit.

ALTER TABLE replication.change_log ADD COLUMN route text;
CREATE INDEX change_log_route ON replication.change_log (route, xid);

-- What branches read by (route_column, route_param, route_type: the type a parameter is
-- cast to) and what capture writes by (route_capture: the same column; kept apart so that
-- a route could be switched off for capture alone).
ALTER TABLE replication.tables ADD COLUMN route_column text, ADD COLUMN route_param text,
                               ADD COLUMN route_type text, ADD COLUMN route_capture text;
