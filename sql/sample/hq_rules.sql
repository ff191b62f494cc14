-- replicator: sample HQ rules on consolidated sales (HQ only, never at a branch).
--
-- HQ's stock follows what the stores sell: each consolidated sale line takes its
-- quantity off the store's stock at HQ (a void or a deleted line puts it back).  The
-- branches' uploads are applied in replica mode, where ordinary triggers stay quiet, so
-- the trigger is ENABLE ALWAYS; its function runs with session_replication_role = origin
-- so that the stock change is captured and flows back down to the store as its stock
-- catalog.  SECURITY DEFINER with a fixed search_path: a branch's login fires it and
-- must not need, or be able to redirect, anything it touches.

CREATE FUNCTION public.sale_line_moves_stock() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET session_replication_role = origin AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE public.stock SET quantity = quantity + OLD.quantity
         WHERE store_id = OLD.store_id AND item_id = OLD.item_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        UPDATE public.stock SET quantity = quantity - NEW.quantity
         WHERE store_id = NEW.store_id AND item_id = NEW.item_id;
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION public.sale_line_moves_stock() FROM PUBLIC;

CREATE TRIGGER sale_line_moves_stock AFTER INSERT OR UPDATE OR DELETE ON public.sale_lines
    FOR EACH ROW EXECUTE FUNCTION public.sale_line_moves_stock();
ALTER TABLE public.sale_lines ENABLE ALWAYS TRIGGER sale_line_moves_stock;
