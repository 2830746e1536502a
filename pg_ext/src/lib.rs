//! dbopt, the PostgreSQL 15 extension.
//!
//! # Layout
//! - `lib.rs` (this file): wiring only — module magic, `_PG_init`, `dbopt.version()`.
//! - [`advisor`] — `dbopt.index_advice()`: missing indexes from slow-query plans (+ hypopg).
//! - [`ddl_history`] — `dbopt.ddl_history`: every DDL statement (event triggers, `sql/ddl_history.sql`).
//! - [`backend_local`] — per-backend state without thread-local lookups.
//! - [`fast_ffi`] — unguarded calls to a few never-erroring PostgreSQL functions (hot path).
//! - [`gucs`] — every `dbopt.*` setting.
//! - [`shmem`] — shared memory: record layouts, startup, persistence, locks, the statement table,
//!   the rings (one file each).
//! - [`hooks`] — executor hooks: per-statement statistics, errors, and the feeds below.
//! - [`invalidate`] — invalidation on commit: the tables a transaction wrote, announced by NOTIFY;
//!   `dbopt.invalidate_tags()/invalidate_table()/invalidate_all()`.
//! - [`watched`] — the tables caches registered (`dbopt.watch_tables()`): only their writes are
//!   announced.
//! - [`cache_analysis`] — `dbopt.cache_analysis()`: may a statement's result be cached, and which
//!   tables it reads (the router's cache asks).
//! - [`stats`] — `dbopt.query_stats()`, `dbopt.reset()`, `dbopt.statements_info()`.
//! - [`slow`] — slow queries with plans: `dbopt.slow_queries()`.
//! - [`nplusone`] — N+1 bursts: `dbopt.n_plus_one()`.
//! - [`metrics`] — `dbopt.metrics()`, Prometheus text.
//! - [`query_desc`] — a QueryDesc's own statement text and its N+1 fingerprint (and the hasher).
//! - [`read_spi`] — read-only SPI (works on replicas, unlike pgrx's `Spi::get_*`).
//! - [`privilege`] — who may see other users' texts.
//! - [`sampler`] — the background worker that samples host CPU from `/proc/stat` into shared memory,
//!   and `dbopt.host_cpu_percent()` that reads it.
//! - `sql/node_status.sql` (repository root): `dbopt.node_status()` and
//!   `dbopt.replication_status()`, plain SQL over PostgreSQL's own functions and views.
//!
//! The extension works only when preloaded (`shared_preload_libraries = 'dbopt'`): it needs shared
//! memory and a background worker, which PostgreSQL only grants at postmaster start.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

pub mod advisor;
pub mod backend_local;
pub mod cache_analysis;
pub mod ddl_history;
pub mod fast_ffi;
pub mod gucs;
pub mod hooks;
pub mod invalidate;
pub mod metrics;
pub mod nplusone;
pub mod privilege;
pub mod query_desc;
pub mod read_spi;
pub mod sampler;
pub mod shmem;
pub mod slow;
pub mod stats;
pub mod watched;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!(
    "../../sql/node_status.sql",
    name = "node_status",
    requires = [sampler::host_cpu_percent]
);
extension_sql_file!("../../sql/advisor.sql", name = "advisor");
extension_sql_file!(
    "../../sql/privileges.sql",
    name = "privileges",
    requires = [
        stats::reset,
        stats::query_stats,
        slow::slow_queries_reset,
        nplusone::n_plus_one_reset
    ]
);
extension_sql_file!(
    "../../sql/ddl_history.sql",
    name = "ddl_history",
    requires = ["privileges", ddl_history::outer_role]
);
extension_sql_file!(
    "../../sql/alerts.sql",
    name = "alerts",
    requires = ["privileges"]
);

/// Called by PostgreSQL when it loads `dbopt.so`.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a postmaster-owned flag; PostgreSQL sets it before loading libraries.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if !preloading {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "dbopt must be loaded via shared_preload_libraries",
            function_name!(),
        )
        .set_hint(
            "Add 'dbopt' to shared_preload_libraries in postgresql.conf and restart PostgreSQL, \
             then run CREATE EXTENSION dbopt.",
        )
        .report(PgLogLevel::ERROR);
        return;
    }
    gucs::init();
    shmem::init();
    hooks::init();
    invalidate::init();
    watched::init();
    sampler::init();
    // Ask the core to compute query ids (compute_query_id = auto turns them on for us).
    // SAFETY: allowed while preloading.
    unsafe { pg_sys::EnableQueryId() };
}

/// The version of the dbopt extension library that is loaded (not the SQL objects' version).
#[pg_extern(immutable, parallel_safe)]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn version_matches_the_crate() {
        let v = Spi::get_one::<String>("SELECT dbopt.version()").expect("spi");
        assert_eq!(v.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    }

    #[pg_test]
    fn node_status_on_a_primary() {
        let row = Spi::get_two::<String, bool>("SELECT role, in_recovery FROM dbopt.node_status()")
            .expect("spi");
        assert_eq!(row, (Some("primary".to_string()), Some(false)));
        let lag = Spi::get_one::<f64>("SELECT replay_lag_s FROM dbopt.node_status()").expect("spi");
        assert_eq!(lag, Some(0.0));
        let has_lsn = Spi::get_one::<bool>(
            "SELECT current_lsn IS NOT NULL AND received_lsn IS NULL FROM dbopt.node_status()",
        )
        .expect("spi");
        assert_eq!(has_lsn, Some(true));
        let up = Spi::get_one::<bool>("SELECT uptime_s > 0 FROM dbopt.node_status()").expect("spi");
        assert_eq!(up, Some(true));
    }

    #[pg_test]
    fn cpu_is_sampled_by_the_worker() {
        // The worker samples once a second; give it a few seconds after server start.
        let mut got = None;
        for _ in 0..50 {
            got = Spi::get_one::<f64>("SELECT dbopt.host_cpu_percent()").expect("spi");
            if got.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let pct = got.expect("the sampler published a CPU figure within 5 s");
        assert!((0.0..=100.0).contains(&pct), "cpu {pct}");
    }

    #[pg_test]
    fn nested_statements_are_tracked_when_asked() {
        Spi::run("SET dbopt.track_nested = on").expect("set");
        for _ in 0..3 {
            Spi::run("SELECT 40 + 2").expect("run");
        }
        let calls = Spi::get_one::<i64>(
            "SELECT calls FROM dbopt.query_stats() WHERE NOT toplevel AND query = 'SELECT $1 + $2'",
        )
        .expect("spi");
        assert_eq!(calls, Some(3));
    }

    #[pg_test]
    fn metrics_and_table_info_answer() {
        let text = Spi::get_one::<String>("SELECT dbopt.metrics()")
            .expect("spi")
            .expect("text");
        assert!(
            text.starts_with("# HELP dbopt_query_duration_seconds"),
            "{text}"
        );
        let max =
            Spi::get_one::<i64>("SELECT max_statements FROM dbopt.statements_info()").expect("spi");
        assert_eq!(max, Some(5000));
    }

    #[pg_test]
    fn slow_counter_answers_and_alerts_have_a_history_table() {
        // Slow statements are counted at top level only (a test body runs inside a function);
        // tests/tests/cluster.rs checks the count after a slow statement.
        let total = Spi::get_one::<i64>("SELECT dbopt.slow_queries_total()").expect("spi");
        assert!(total.is_some_and(|n| n >= 0), "{total:?}");
        // The table the notify channel writes.
        Spi::run(
            "INSERT INTO dbopt.alert_history (fingerprint, alertname, status, severity, labels,
                 annotations, starts_at, source)
             VALUES ('0123456789abcdef', 'NodeDown', 'firing', 'critical', '{}', '{}', now(), 't')",
        )
        .expect("insert");
        let n = Spi::get_one::<i64>("SELECT count(*) FROM dbopt.alert_history").expect("spi");
        assert_eq!(n, Some(1));
    }

    #[pg_test(
        error = "new row for relation \"alert_history\" violates check constraint \"alert_history_status_check\""
    )]
    fn alert_history_refuses_an_unknown_status() {
        Spi::run(
            "INSERT INTO dbopt.alert_history (fingerprint, alertname, status, severity, labels,
                 annotations, starts_at, source)
             VALUES ('x', 'NodeDown', 'bogus', 'critical', '{}', '{}', now(), 't')",
        )
        .expect("refused");
    }

    #[pg_test]
    fn replication_status_is_empty_without_replicas() {
        let n =
            Spi::get_one::<i64>("SELECT count(*) FROM dbopt.replication_status()").expect("spi");
        assert_eq!(n, Some(0));
    }
}

/// Used by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'dbopt'"]
    }
}
