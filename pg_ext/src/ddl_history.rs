//! The schema-change history: `sql/ddl_history.sql` (the `dbopt.ddl_history` table and the two
//! event triggers that fill it) and [`outer_role`], which those SECURITY DEFINER triggers need to
//! know the role the DDL ran as.

use pgrx::prelude::*;

/// The role in effect outside any function: the session user, or the role of `SET ROLE`.
/// Unlike `current_user`, SECURITY DEFINER functions do not change it.
#[pg_extern(stable, parallel_safe)]
fn outer_role() -> String {
    // SAFETY: a backend-local read of the outer user id, then a syscache lookup with noerr.
    let oid = unsafe { pg_sys::GetOuterUserId() };
    crate::privilege::role_name(u32::from(oid))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn rows(filter: &str) -> i64 {
        Spi::get_one::<i64>(&format!(
            "SELECT count(*) FROM dbopt.ddl_history WHERE {filter}"
        ))
        .expect("spi")
        .unwrap_or(0)
    }

    #[pg_test]
    fn ddl_is_recorded_with_who_and_the_migration_version() {
        Spi::run("CREATE TABLE ddl_t (id int PRIMARY KEY)").expect("create");
        assert_eq!(
            rows(
                "command_tag = 'CREATE TABLE' AND object_identity = 'public.ddl_t' \
                  AND migration_version IS NULL AND statement IS NOT NULL"
            ),
            1
        );
        // The primary key's index comes with it.
        assert_eq!(
            rows("object_identity = 'public.ddl_t_pkey' AND object_type = 'index'"),
            1
        );
        Spi::run("SET LOCAL dbopt.migration_version = '7.1'").expect("set");
        Spi::run("ALTER TABLE ddl_t ADD COLUMN note text").expect("alter");
        assert_eq!(
            rows("command_tag = 'ALTER TABLE' AND migration_version = '7.1' AND login = session_user \
                  AND role = current_user"),
            1
        );
        Spi::run("DROP TABLE ddl_t").expect("drop");
        assert_eq!(
            rows("command_tag = 'DROP TABLE' AND object_identity = 'public.ddl_t' AND object_type = 'table'"),
            1
        );
    }

    #[pg_test]
    fn the_role_of_set_role_is_recorded_and_temporary_objects_are_not() {
        Spi::run("CREATE ROLE ddl_hist_app").expect("role");
        Spi::run("GRANT CREATE ON SCHEMA public TO ddl_hist_app").expect("grant");
        Spi::run("SET ROLE ddl_hist_app").expect("set role");
        Spi::run("CREATE TABLE ddl_app_t (x int)").expect("create as app");
        Spi::run("CREATE TEMP TABLE ddl_tmp (x int)").expect("temp");
        Spi::run("RESET ROLE").expect("reset");
        assert_eq!(
            rows("object_identity = 'public.ddl_app_t' AND role = 'ddl_hist_app' AND login = session_user"),
            1
        );
        assert_eq!(rows("object_identity LIKE '%ddl_tmp%'"), 0);
        // The grant itself is a recorded DDL command.
        assert!(rows("command_tag = 'GRANT'") >= 1);
    }

    #[pg_test]
    fn credentials_in_options_are_not_kept() {
        Spi::run("CREATE FOREIGN DATA WRAPPER ddl_fdw").expect("fdw");
        Spi::run("CREATE SERVER ddl_srv FOREIGN DATA WRAPPER ddl_fdw OPTIONS (host 'h')")
            .expect("server");
        Spi::run("CREATE USER MAPPING FOR current_user SERVER ddl_srv OPTIONS (password 's3cret')")
            .expect("mapping");
        assert_eq!(rows("command_tag = 'CREATE USER MAPPING'"), 1);
        assert_eq!(rows("statement LIKE '%s3cret%'"), 0);
    }

    #[pg_test(error = "invalid configuration parameter name \"dbopt.migration_versio\"")]
    fn a_misspelt_setting_is_refused() {
        Spi::run("SET dbopt.migration_versio = '1'").expect("refused");
    }
}
