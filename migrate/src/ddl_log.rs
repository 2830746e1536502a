//! Schema changes made outside migrations, from the dbopt extension's `dbopt.ddl_history` (every
//! DDL statement, recorded by event triggers; migrations label theirs with
//! `dbopt.migration_version`, see [`label`]). Without the extension there is no such record, and
//! the functions here say so instead of failing.

use postgres::GenericClient;

use crate::run::db_error;

/// Labels the DDL of this transaction (`local`) or session with a migration version, for
/// `dbopt.ddl_history`. On a server without dbopt it is a harmless placeholder setting.
pub fn label(c: &mut impl GenericClient, label: &str, local: bool) -> Result<(), String> {
    c.execute(
        "SELECT set_config('dbopt.migration_version', $1, $2)",
        &[&label, &local],
    )
    .map(|_| ())
    .map_err(|e| format!("labelling the migration's DDL: {}", db_error(&e)))
}

/// One ad-hoc schema change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub at: String,
    pub login: String,
    pub role: String,
    pub command: String,
    pub object: String,
    pub statement: String,
}

/// What the database can tell about DDL outside migrations.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// The newest changes (newest first) and how many there are since the last migration ran.
    Changes {
        newest: Vec<Change>,
        since_last_migration: i64,
    },
    /// No `dbopt.ddl_history` here (the extension is not installed in this database).
    NotRecorded,
    /// The table exists but this login may not read it (needs pg_monitor or dbopt_admin).
    NotReadable,
}

/// Up to `limit` changes made outside migrations, newest first.
pub fn outside_migrations(c: &mut impl GenericClient, limit: i64) -> Result<Record, String> {
    let exists: bool = c
        .query_one("SELECT to_regclass('dbopt.ddl_history') IS NOT NULL", &[])
        .map_err(|e| format!("looking for dbopt.ddl_history: {}", db_error(&e)))?
        .get(0);
    if !exists {
        return Ok(Record::NotRecorded);
    }
    let readable: bool = c
        .query_one(
            "SELECT has_table_privilege('dbopt.ddl_history', 'SELECT')",
            &[],
        )
        .map_err(|e| format!("looking for dbopt.ddl_history: {}", db_error(&e)))?
        .get(0);
    if !readable {
        return Ok(Record::NotReadable);
    }
    let rows = c
        .query(
            "SELECT to_char(at, 'YYYY-MM-DD HH24:MI:SS'), login, role, command_tag, \
                    coalesce(object_identity, ''), coalesce(statement, '') \
               FROM dbopt.ddl_history \
              WHERE migration_version IS NULL AND schema_name IS DISTINCT FROM 'dbopt_migrate' \
              ORDER BY id DESC LIMIT $1",
            &[&limit],
        )
        .map_err(|e| format!("reading dbopt.ddl_history: {}", db_error(&e)))?;
    let newest = rows
        .iter()
        .map(|r| Change {
            at: r.get(0),
            login: r.get(1),
            role: r.get(2),
            command: r.get(3),
            object: r.get(4),
            statement: r.get(5),
        })
        .collect();
    // "Since the last migration": after the newest history entry of dbopt-migrate (apply or
    // rollback); all of them when nothing was ever applied.
    let since: i64 = c
        .query_one(
            "SELECT count(DISTINCT transaction_id) FROM dbopt.ddl_history h \
              WHERE h.migration_version IS NULL AND h.schema_name IS DISTINCT FROM 'dbopt_migrate' \
                AND h.at > coalesce((SELECT max(at) FROM dbopt_migrate.history), '-infinity')",
            &[],
        )
        .map_err(|e| format!("reading dbopt.ddl_history: {}", db_error(&e)))?
        .get(0);
    Ok(Record::Changes {
        newest,
        since_last_migration: since,
    })
}

/// A statement shown on one line, at most `max` characters.
pub fn one_line(statement: &str, max: usize) -> String {
    let flat = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn statements_are_flattened_and_cut() {
        assert_eq!(
            one_line("ALTER TABLE t\n   ADD x int;", 80),
            "ALTER TABLE t ADD x int;"
        );
        assert_eq!(one_line("abcdef", 4), "abc…");
        assert_eq!(one_line("ééééé", 5), "ééééé");
    }
}
