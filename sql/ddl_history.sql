-- dbopt.ddl_history: every schema change made in this database, by migrations or by hand.
-- Two event triggers fill it: ddl_command_end (one row per object a command created or altered,
-- GRANT/REVOKE included) and sql_drop (one row per object a command dropped, CASCADE victims
-- included). A row is written in the transaction of the DDL, so a rolled-back change leaves none.
--
-- Not covered (PostgreSQL fires no event trigger for them): roles, databases, tablespaces;
-- skipped on purpose: temporary objects, and the objects an extension script creates (the
-- CREATE EXTENSION row stands for them).
--
-- Who: `login` is the authenticated session user, `role` the role in effect (SET ROLE), which a
-- SECURITY DEFINER function cannot see through current_user, hence dbopt.outer_role().
-- migration_version: `dbopt.migration_version` of the transaction (dbopt-migrate sets it with
-- SET LOCAL); NULL for ad-hoc DDL. It is a label a session may set; login and role are not.
CREATE TABLE dbopt.ddl_history (
    id                bigserial PRIMARY KEY,
    at                timestamptz NOT NULL DEFAULT clock_timestamp(),
    login             text NOT NULL,
    role              text NOT NULL,
    application_name  text,
    client_addr       inet,
    backend_pid       integer NOT NULL,
    transaction_id    xid8 NOT NULL,
    command_tag       text NOT NULL,            -- CREATE TABLE, ALTER TABLE, DROP INDEX, GRANT, ...
    object_type       text,                     -- table, index, table column, function, ...
    schema_name       text,
    object_identity   text,                     -- pg_identify_object's text: public.users, ...
    migration_version text,
    statement         text                      -- the client's statement (hidden for commands that may carry a password)
);
CREATE INDEX ddl_history_at ON dbopt.ddl_history (at);
CREATE INDEX ddl_history_object ON dbopt.ddl_history (object_identity, at);
COMMENT ON TABLE dbopt.ddl_history IS 'Every DDL statement run in this database: who, when, which objects, which migration (event triggers of dbopt)';

-- The statement text of commands whose options may hold credentials is not kept.
CREATE FUNCTION dbopt._ddl_statement(tag text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN tag LIKE '% USER MAPPING' OR tag LIKE '% SERVER' OR tag LIKE '% SUBSCRIPTION'
                THEN '<hidden: the options may hold a password>'
                ELSE current_query() END
$$;

CREATE FUNCTION dbopt._ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO dbopt.ddl_history (login, role, application_name, client_addr, backend_pid,
        transaction_id, command_tag, object_type, schema_name, object_identity,
        migration_version, statement)
    SELECT session_user, dbopt.outer_role(), nullif(current_setting('application_name'), ''),
           inet_client_addr(), pg_backend_pid(), pg_current_xact_id(), c.command_tag,
           c.object_type, c.schema_name, c.object_identity,
           nullif(current_setting('dbopt.migration_version', true), ''),
           dbopt._ddl_statement(c.command_tag)
      FROM pg_event_trigger_ddl_commands() AS c
     WHERE c.schema_name IS DISTINCT FROM 'pg_temp'
       -- An extension's own objects: its CREATE/ALTER EXTENSION row stands for them.
       AND NOT c.in_extension;
END
$$;

CREATE FUNCTION dbopt._ddl_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- DROP EXTENSION dbopt drops this table too.
    IF to_regclass('dbopt.ddl_history') IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO dbopt.ddl_history (login, role, application_name, client_addr, backend_pid,
        transaction_id, command_tag, object_type, schema_name, object_identity,
        migration_version, statement)
    SELECT session_user, dbopt.outer_role(), nullif(current_setting('application_name'), ''),
           inet_client_addr(), pg_backend_pid(), pg_current_xact_id(), tg_tag,
           d.object_type, d.schema_name, d.object_identity,
           nullif(current_setting('dbopt.migration_version', true), ''),
           dbopt._ddl_statement(tg_tag)
      FROM pg_event_trigger_dropped_objects() AS d
     WHERE (d.original OR d.normal) AND NOT d.is_temporary;
END
$$;

CREATE EVENT TRIGGER dbopt_ddl_command_end ON ddl_command_end
    EXECUTE FUNCTION dbopt._ddl_command_end();
CREATE EVENT TRIGGER dbopt_ddl_sql_drop ON sql_drop
    EXECUTE FUNCTION dbopt._ddl_sql_drop();

REVOKE ALL ON dbopt.ddl_history FROM PUBLIC;
REVOKE ALL ON FUNCTION dbopt._ddl_statement(text) FROM PUBLIC;
GRANT SELECT ON dbopt.ddl_history TO pg_monitor, dbopt_admin;
-- Keeping it is the DBA's call: DELETE FROM dbopt.ddl_history WHERE at < now() - interval '1 year'
