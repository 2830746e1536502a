//! dbopt-migrate: Flyway-style migration files, applied in transactions with a history in the
//! database, each with a rollback generated from catalog snapshots before and after it.
//!
//! - [`files`]: the migration directory (pure);
//! - [`snapshot`]: the catalog → a [`dbopt_schemadiff::Schema`].

pub mod files;
pub mod snapshot;
