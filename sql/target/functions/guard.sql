-- Read-only catalogs on a branch: once a catalog is replicated, its tables change only
-- through the replicator (initialization or the change stream from HQ).  Each such table
-- carries one statement-level trigger, replicator_guard, created by `replicator init` /
-- `replicator run` with the catalog name as argument:
--
--   CREATE TRIGGER replicator_guard
--       BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.items
--       FOR EACH STATEMENT EXECUTE FUNCTION replication.guard('items');
--
-- The replicator writes with session_replication_role = replica, where ordinary
-- (ENABLE ORIGIN) triggers do not fire, so its own writes pass.  `replicator release
-- -c branch.yaml CATALOG` drops the triggers again.
CREATE OR REPLACE FUNCTION replication.guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'table %.% belongs to catalog %, which is replicated from HQ and read-only here; change it at HQ',
        quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME), TG_ARGV[0]
        USING ERRCODE = 'insufficient_privilege',
              HINT = format('to write here, remove %s from catalogs: in branch.yaml, then run: '
                            'replicator release -c branch.yaml %s', TG_ARGV[0], TG_ARGV[0]);
END
$$;
COMMENT ON FUNCTION replication.guard() IS 'replicator: rejects local writes to a replicated catalog table (argument: catalog)';
