//! Helpers of the dbopt-migrate tests: migration files from (name, SQL) pairs, the options they
//! apply with, and a count from a query.

use dbopt_migrate::files::{ordered, Migration};
use dbopt_migrate::run::Options;

/// Migrations in version order from (file name, SQL) pairs.
pub fn migrations(files: &[(&str, &str)]) -> Vec<Migration> {
    ordered(
        files
            .iter()
            .map(|(n, s)| ((*n).to_string(), (*s).to_string()))
            .collect(),
    )
    .expect("migration files")
}

/// One transaction per migration, a 2 s lock timeout.
pub fn options() -> Options {
    Options {
        lock_timeout_ms: 2000,
        single_transaction: false,
    }
}

/// The `count(*)` (or any bigint) a query returns.
pub fn count(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}
