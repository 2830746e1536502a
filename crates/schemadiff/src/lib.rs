//! The pure part of dbopt-migrate's rollback generator: a PostgreSQL schema model filled from
//! catalog snapshots ([`model`]) and the DDL that turns one snapshot into another ([`diff`]).
//! A rollback is `transform(after, before)`: it needs no hand-written undo script.

pub mod diff;
pub mod model;

pub use diff::{transform, Plan};
pub use model::{QName, Schema};
