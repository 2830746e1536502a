-- Who may reset what. As in pg_stat_statements, resets are not for everyone: superusers, and
-- members of the role dbopt_admin that the extension creates (grant it to your DBAs).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dbopt_admin') THEN
        CREATE ROLE dbopt_admin NOLOGIN;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION dbopt.reset() FROM PUBLIC;
REVOKE ALL ON FUNCTION dbopt.slow_queries_reset() FROM PUBLIC;
REVOKE ALL ON FUNCTION dbopt.n_plus_one_reset() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dbopt.reset() TO dbopt_admin;
GRANT EXECUTE ON FUNCTION dbopt.slow_queries_reset() TO dbopt_admin;
GRANT EXECUTE ON FUNCTION dbopt.n_plus_one_reset() TO dbopt_admin;

-- Everyone may read the statistics (texts of other users stay hidden, see privilege.rs).
GRANT USAGE ON SCHEMA dbopt TO PUBLIC;

-- The familiar view.
CREATE VIEW dbopt.query_stats AS SELECT * FROM dbopt.query_stats();
GRANT SELECT ON dbopt.query_stats TO PUBLIC;
