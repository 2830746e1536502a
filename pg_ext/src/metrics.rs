//! `dbopt.metrics()`: Prometheus text exposition of query latency, throughput, errors, slow
//! queries, N+1 bursts, statement-table fill and the node's replication figures.

use dbopt_querystats::exposition::Exposition;
use dbopt_querystats::histogram::Histogram;
use pgrx::prelude::*;

use crate::{read_spi, shmem};

#[pg_extern(volatile, parallel_safe)]
fn metrics() -> Result<String, pgrx::spi::SpiError> {
    let (mut all, mut calls, mut errors, mut rows) = (Histogram::default(), 0u64, 0u64, 0u64);
    for s in shmem::snapshot() {
        all.merge(&s.counters.exec);
        calls += s.counters.calls;
        errors += s.counters.errors;
        rows += s.counters.rows;
    }
    let (statements, max, evictions, _) = shmem::table_info();
    let (primary, lag_s) = read_spi::two::<bool, f64>(
        "SELECT role = 'primary', replay_lag_s FROM dbopt.node_status()",
        &[],
    )?;
    let (lag_bytes, cpu) = read_spi::two::<f64, f64>(
        "SELECT replay_lag_bytes::float8, cpu_percent FROM dbopt.node_status()",
        &[],
    )?;

    let mut e = Exposition::default();
    e.histogram_seconds(
        "dbopt_query_duration_seconds",
        "Execution time of tracked statements.",
        &all,
    )
    .counter(
        "dbopt_queries_total",
        "Executions of tracked statements.",
        calls as f64,
    )
    .counter(
        "dbopt_query_errors_total",
        "Executions that failed with an error.",
        errors as f64,
    )
    .counter(
        "dbopt_query_rows_total",
        "Rows returned or affected by tracked statements.",
        rows as f64,
    )
    .counter(
        "dbopt_slow_queries_total",
        "Executions over dbopt.slow_query_ms since start.",
        shmem::slow_total() as f64,
    )
    .counter(
        "dbopt_n_plus_one_bursts_total",
        "N+1 bursts detected since start.",
        shmem::n1_total() as f64,
    )
    .gauge(
        "dbopt_statements",
        "Distinct statements in the statement table.",
        statements as f64,
    )
    .gauge(
        "dbopt_statements_max",
        "Capacity of the statement table (dbopt.max_statements).",
        max as f64,
    )
    .counter(
        "dbopt_statement_evictions_total",
        "Statements evicted from a full table.",
        evictions as f64,
    )
    .gauge(
        "dbopt_node_is_primary",
        "1 on the primary, 0 on a replica.",
        if primary.unwrap_or(false) { 1.0 } else { 0.0 },
    )
    .gauge(
        "dbopt_replication_replay_lag_seconds",
        "Replay lag of this replica (0 on a primary).",
        lag_s.unwrap_or(0.0),
    )
    .gauge(
        "dbopt_replication_replay_lag_bytes",
        "WAL received but not replayed (0 on a primary).",
        lag_bytes.unwrap_or(0.0),
    )
    .gauge(
        "dbopt_host_cpu_percent",
        "Host CPU busy share over the last second.",
        cpu.unwrap_or(f64::NAN),
    );
    Ok(e.finish())
}
