//! Read-only SPI queries. pgrx's `Spi::get_*` helpers run through the read-write path, which
//! assigns a transaction id — impossible on a replica ("cannot assign TransactionIds during
//! recovery"). dbopt's functions must work on every node, so their catalog reads go through these.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

/// The first row's first column.
pub fn one<A: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> SpiResult<Option<A>> {
    Spi::connect(|c| c.select(sql, Some(1), args)?.first().get_one::<A>())
}

/// The first row's first two columns.
pub fn two<A: FromDatum + IntoDatum, B: FromDatum + IntoDatum>(
    sql: &str,
    args: &[DatumWithOid],
) -> SpiResult<(Option<A>, Option<B>)> {
    Spi::connect(|c| c.select(sql, Some(1), args)?.first().get_two::<A, B>())
}
