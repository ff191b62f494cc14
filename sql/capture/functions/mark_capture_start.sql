-- When capture of a table (re)started.  A branch whose copy of the table is older
-- missed the changes made while capture was off, and is told to re-initialize that
-- catalog instead of being reported up to date (schema.py).
CREATE OR REPLACE FUNCTION replication.mark_capture_start() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' OR (NEW.active AND NOT OLD.active) THEN
        NEW.capture_since := pg_current_xact_id();
    END IF;
    RETURN NEW;
END $$;
