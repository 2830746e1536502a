//! `dbopt.query_stats()` / `dbopt.reset()` / `dbopt.statements_info()`: the statement table as SQL.

use pgrx::prelude::*;

use crate::privilege::{may_see, timestamp, HIDDEN};
use crate::shmem;

/// One row per (user, database, statement, top-level) with everything counted for it.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn query_stats() -> TableIterator<
    'static,
    (
        name!(userid, pg_sys::Oid),
        name!(dbid, pg_sys::Oid),
        name!(toplevel, bool),
        name!(queryid, i64),
        name!(query, String),
        name!(calls, i64),
        name!(errors, i64),
        name!(rows, i64),
        name!(total_exec_time, f64),
        name!(min_exec_time, f64),
        name!(max_exec_time, f64),
        name!(mean_exec_time, f64),
        name!(stddev_exec_time, f64),
        name!(p50_exec_time, Option<f64>),
        name!(p95_exec_time, Option<f64>),
        name!(p99_exec_time, Option<f64>),
        name!(shared_blks_hit, i64),
        name!(shared_blks_read, i64),
        name!(shared_blks_dirtied, i64),
        name!(shared_blks_written, i64),
        name!(local_blks_hit, i64),
        name!(local_blks_read, i64),
        name!(local_blks_written, i64),
        name!(temp_blks_read, i64),
        name!(temp_blks_written, i64),
        name!(wal_records, i64),
        name!(wal_fpi, i64),
        name!(wal_bytes, i64),
        name!(first_seen, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_seen, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    let rows: Vec<_> = shmem::snapshot()
        .into_iter()
        .map(|s| {
            let c = s.counters;
            let h = c.exec;
            (
                pg_sys::Oid::from(s.key.userid),
                pg_sys::Oid::from(s.key.dbid),
                s.key.toplevel == 1,
                s.key.queryid,
                if may_see(s.key.userid) {
                    s.text
                } else {
                    HIDDEN.to_string()
                },
                c.calls as i64,
                c.errors as i64,
                c.rows as i64,
                h.total_ms,
                h.min_ms,
                h.max_ms,
                h.mean_ms,
                h.stddev_ms(),
                h.quantile_ms(0.50),
                h.quantile_ms(0.95),
                h.quantile_ms(0.99),
                c.shared_blks_hit,
                c.shared_blks_read,
                c.shared_blks_dirtied,
                c.shared_blks_written,
                c.local_blks_hit,
                c.local_blks_read,
                c.local_blks_written,
                c.temp_blks_read,
                c.temp_blks_written,
                c.wal_records,
                c.wal_fpi,
                i64::try_from(c.wal_bytes).unwrap_or(i64::MAX),
                timestamp(c.first_seen),
                timestamp(c.last_seen),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Forgets every statement's statistics; returns how many statements were tracked.
#[pg_extern(volatile)]
fn reset() -> i64 {
    shmem::reset_statements() as i64
}

/// The statement table itself: fill, capacity, evictions, last reset, bytes per entry.
#[pg_extern(volatile, parallel_safe)]
fn statements_info() -> TableIterator<
    'static,
    (
        name!(statements, i64),
        name!(max_statements, i64),
        name!(evictions, i64),
        name!(stats_reset, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(bytes_per_statement, i64),
    ),
> {
    let (n, max, evictions, reset) = shmem::table_info();
    TableIterator::once((
        n as i64,
        max as i64,
        evictions as i64,
        timestamp(reset),
        shmem::bytes_per_statement() as i64,
    ))
}
