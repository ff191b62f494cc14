-- replicator: capture's objects that call its functions (an event trigger, a trigger on the
-- registry, the log's policy for branch logins).
--
-- Created when missing, after functions/ and in the same transaction as the versioned
-- migrations (db.migrate): a versioned migration cannot name a function, since functions
-- are (re)created after them.  Present ones are left alone, so a re-run takes no lock on
-- the log; a change to one of these goes in a versioned migration (ALTER POLICY ...).
-- `hq install` rebuilds branch_reads' expression from the registry anyway (capture.py).

DO $$
BEGIN
    -- After an ALTER TABLE on a captured table, regenerate its capture (on_ddl).  Only a
    -- superuser can create an event trigger.
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = 'replicator_ddl') THEN
        IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
            CREATE EVENT TRIGGER replicator_ddl ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
                EXECUTE FUNCTION replication.on_ddl();
        ELSE
            RAISE NOTICE 'replicator: not a superuser, no DDL event trigger; re-run `replicator hq install` after ALTER TABLE on catalog tables';
        END IF;
    END IF;

    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger
                    WHERE tgrelid = 'replication.tables'::regclass AND tgname = 'replicator_capture_start') THEN
        CREATE TRIGGER replicator_capture_start BEFORE INSERT OR UPDATE OF active ON replication.tables
            FOR EACH ROW EXECUTE FUNCTION replication.mark_capture_start();
    END IF;

    -- Branch logins: the tables of their catalogs.  The scalar subquery runs once per
    -- query; the comparison is leakproof, so the window's xid index conditions still
    -- apply first.
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_policy
                    WHERE polrelid = 'replication.change_log'::regclass AND polname = 'branch_reads') THEN
        CREATE POLICY branch_reads ON replication.change_log FOR SELECT TO replicator_branch
            USING (change_log.table_id OPERATOR(pg_catalog.=)
                   ANY ((SELECT replication.granted_tables())::pg_catalog.int4[]));
    END IF;
END $$;
