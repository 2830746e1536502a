//! The pure part of dbopt-migrate's rollback generator: a PostgreSQL schema model filled from
//! catalog snapshots ([`model`]), the DDL that turns one snapshot into another ([`diff`]), and
//! the data a migration drops, restored from copies kept aside ([`kept`]).
//! A rollback is `transform(after, before)`: it needs no hand-written undo script.

pub mod diff;
pub mod kept;
pub mod model;

pub use diff::{transform, transform_keeping, Plan};
pub use kept::{dropped, Dropped, Kept, KeptColumn, KeptTable};
pub use model::{ident, QName, Schema};
