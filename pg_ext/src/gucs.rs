//! Every `dbopt.*` setting, registered once by [`init`] and read through typed getters.
//! Out-of-range values are refused by PostgreSQL itself with a message naming the setting
//! (`ERROR: 2000000 is outside the valid range for parameter "dbopt.max_statements"`).

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// `dbopt.end_user`: the application's end user, for dbopt-router (PostgreSQL does nothing with it).
static END_USER: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);
/// `dbopt.migration_version`: the migration a transaction applies (dbopt-migrate sets it), for
/// `dbopt.ddl_history`. The event trigger reads it with `current_setting`; no Rust getter.
static MIGRATION_VERSION: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(None);
/// Most distinct statements tracked (size of the shared table; restart to change).
static MAX_STATEMENTS: GucSetting<i32> = GucSetting::<i32>::new(5000);
/// Also track statements run inside functions (nested), not only top-level ones.
static TRACK_NESTED: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Executions slower than this (ms) are kept with their plan; -1 turns capture off.
static SLOW_QUERY_MS: GucSetting<i32> = GucSetting::<i32>::new(100);
/// How many slow queries are kept (a ring; restart to change).
static SLOW_QUERY_MAX: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Instrument executions so slow plans carry actual rows and times per node.
static SLOW_QUERY_ANALYZE: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Share of executions instrumented when `slow_query_analyze` is on.
static SLOW_QUERY_SAMPLE_RATE: GucSetting<f64> = GucSetting::<f64>::new(1.0);
/// Keep the statement text with its literal values in slow-query records (off: normalised text).
static SLOW_QUERY_LOG_PARAMETERS: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Executions of one statement with distinct parameters that make an N+1 burst; 0 turns it off.
static N_PLUS_ONE_THRESHOLD: GucSetting<i32> = GucSetting::<i32>::new(10);
/// Outside transaction blocks, executions at most this far apart (ms) belong to one burst.
static N_PLUS_ONE_WINDOW_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Tables smaller than this (rows) never get index advice.
static ADVISOR_MIN_ROWS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Every this many top-level executions (per backend), the plan of the statement is sampled for
/// index advice over the whole workload, not only slow queries. 0: off.
static PLAN_SAMPLE_EVERY: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Announce the tables each committed transaction wrote (NOTIFY dbopt_invalidate), for caches.
/// Superuser-only: a client that turned it off could leave stale entries for everyone else.
static ANNOUNCE: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Announce every table written, not only those a cache watches (`dbopt.watch_tables`).
static ANNOUNCE_ALL_TABLES: GucSetting<bool> = GucSetting::<bool>::new(false);

pub fn init() {
    GucRegistry::define_int_guc(
        c"dbopt.max_statements",
        c"Most distinct statements dbopt tracks.",
        c"Size of the shared statement table. The least recently used 5% are evicted when it is full.",
        &MAX_STATEMENTS,
        100,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"dbopt.track_nested",
        c"Track statements executed inside functions too.",
        c"",
        &TRACK_NESTED,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"dbopt.slow_query_ms",
        c"Executions slower than this are kept with their plan (-1: off).",
        c"",
        &SLOW_QUERY_MS,
        -1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"dbopt.slow_query_max",
        c"How many slow queries are kept.",
        c"",
        &SLOW_QUERY_MAX,
        10,
        100_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"dbopt.slow_query_analyze",
        c"Record actual rows and times per plan node for slow queries.",
        c"Instruments sampled executions like EXPLAIN ANALYZE does; costs time on every sampled query.",
        &SLOW_QUERY_ANALYZE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"dbopt.slow_query_sample_rate",
        c"Share of executions instrumented when slow_query_analyze is on.",
        c"",
        &SLOW_QUERY_SAMPLE_RATE,
        0.0,
        1.0,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"dbopt.slow_query_log_parameters",
        c"Keep literal values in slow-query texts (off: normalised text only).",
        c"",
        &SLOW_QUERY_LOG_PARAMETERS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"dbopt.n_plus_one_threshold",
        c"Executions with distinct parameters that make an N+1 burst (0: off).",
        c"",
        &N_PLUS_ONE_THRESHOLD,
        0,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"dbopt.n_plus_one_window_ms",
        c"Outside transactions, executions at most this far apart belong to one N+1 burst.",
        c"",
        &N_PLUS_ONE_WINDOW_MS,
        1,
        3_600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"dbopt.advisor_min_rows",
        c"Tables with fewer rows never get index advice.",
        c"",
        &ADVISOR_MIN_ROWS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"dbopt.plan_sample_every",
        c"Samples the plan of every Nth top-level execution for index advice (0: off).",
        c"Statements that are individually fast but run often get advice too.",
        &PLAN_SAMPLE_EVERY,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"dbopt.announce",
        c"Announce the tables each committed transaction wrote (NOTIFY dbopt_invalidate).",
        c"Caches in front of the database (dbopt-router) rely on it; turn it off only to measure its cost.",
        &ANNOUNCE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"dbopt.announce_all_tables",
        c"Announce every table written, not only those a cache registered with dbopt.watch_tables().",
        c"For consumers of dbopt_invalidate other than dbopt-router; each notifying commit waits for the previous one.",
        &ANNOUNCE_ALL_TABLES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"dbopt.end_user",
        c"The application's end user for this session (e.g. the id of the person behind a web request).",
        c"Read by dbopt-router for per-end-user rate limits when no /*dbopt_user='...'*/ comment names one; PostgreSQL itself ignores it.",
        &END_USER,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"dbopt.migration_version",
        c"The schema migration this transaction applies (set by dbopt-migrate with SET LOCAL).",
        c"Recorded with every DDL statement in dbopt.ddl_history; empty outside migrations. A label only: the login that ran the DDL is recorded beside it.",
        &MIGRATION_VERSION,
        GucContext::Userset,
        GucFlags::default(),
    );
    // A misspelt `dbopt.` setting is an error, not a silently ignored placeholder.
    // SAFETY: called once from _PG_init, after every dbopt setting is defined.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"dbopt".as_ptr()) };
}

/// The setting's current value, read without pgrx's thread check (≈ 24 instructions a read:
/// the hooks read several settings on every statement). Sound because PostgreSQL only writes
/// the variable from the backend's one thread, which is the thread every hook runs on.
#[inline]
fn current<T>(setting: &GucSetting<T>) -> T
where
    T: pgrx::guc::GucValue<Raw = T> + Copy,
{
    // SAFETY: a plain read of the GUC variable PostgreSQL owns; see above for threads.
    unsafe { *setting.as_ptr() }
}

pub fn max_statements() -> usize {
    current(&MAX_STATEMENTS).max(100) as usize
}
pub fn track_nested() -> bool {
    current(&TRACK_NESTED)
}
/// `None` when capture is off.
pub fn slow_query_ms() -> Option<f64> {
    let v = current(&SLOW_QUERY_MS);
    (v >= 0).then_some(f64::from(v))
}
pub fn slow_query_max() -> usize {
    current(&SLOW_QUERY_MAX).max(10) as usize
}
pub fn slow_query_analyze() -> bool {
    current(&SLOW_QUERY_ANALYZE)
}
pub fn slow_query_sample_rate() -> f64 {
    current(&SLOW_QUERY_SAMPLE_RATE)
}
pub fn slow_query_log_parameters() -> bool {
    current(&SLOW_QUERY_LOG_PARAMETERS)
}
pub fn n_plus_one() -> dbopt_querystats::nplusone::Config {
    dbopt_querystats::nplusone::Config {
        threshold: current(&N_PLUS_ONE_THRESHOLD).max(0) as u32,
        window_ms: current(&N_PLUS_ONE_WINDOW_MS).max(1) as u64,
    }
}
/// `None` when plan sampling is off.
pub fn plan_sample_every() -> Option<u32> {
    let v = current(&PLAN_SAMPLE_EVERY);
    (v > 0).then_some(v as u32)
}
pub fn announce() -> bool {
    current(&ANNOUNCE)
}
pub fn announce_all_tables() -> bool {
    current(&ANNOUNCE_ALL_TABLES)
}
pub fn advisor_min_rows() -> i64 {
    i64::from(current(&ADVISOR_MIN_ROWS))
}
