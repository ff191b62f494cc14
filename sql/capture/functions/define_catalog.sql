-- Register a catalog (or change its label and default), as hq.yaml defines it.
CREATE OR REPLACE FUNCTION replication.define_catalog(p_name text, p_label text, p_default boolean)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO replication.catalogs (name, label, is_default) VALUES (p_name, p_label, p_default)
    ON CONFLICT (name) DO UPDATE SET label = EXCLUDED.label, is_default = EXCLUDED.is_default
    WHERE (catalogs.label, catalogs.is_default) IS DISTINCT FROM (EXCLUDED.label, EXCLUDED.is_default);
$$;
REVOKE ALL ON FUNCTION replication.define_catalog(text,text,boolean) FROM PUBLIC;
