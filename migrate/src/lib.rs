//! dbopt-migrate: Flyway-style migration files, applied in transactions with a history in the
//! database, each with a rollback generated from catalog snapshots before and after it.
//!
//! - [`files`]: the migration directory (pure);
//! - [`snapshot`]: the catalog → a [`dbopt_schemadiff::Schema`];
//! - [`status`]: applied / pending / changed / missing (pure);
//! - [`lint`]: rewrites and long locks in a migration (pure);
//! - [`connect`]: libpq's sslmode/sslrootcert on rustls;
//! - [`ddl_log`]: DDL outside migrations, from the dbopt extension's `dbopt.ddl_history`;
//! - [`keep`]: copies of the rows and values a migration drops, for its rollback; purge;
//! - [`run`]: apply and rollback against a database, the history table;
//! - [`validate`]: pending migrations applied, rolled back and applied again on a staging copy.

pub mod connect;
pub mod ddl_log;
pub mod files;
pub mod keep;
pub mod lint;
pub mod run;
pub mod snapshot;
pub mod status;
pub mod validate;
