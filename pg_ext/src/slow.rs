//! Slow queries with their plans (auto_explain's job, kept queryable): every top-level execution
//! slower than `dbopt.slow_query_ms` is kept in a shared ring with its EXPLAIN JSON and written to
//! the server log as one JSON line. Nothing is explained for fast queries: the plan is only printed
//! once an execution is known to be slow.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::gucs;
use crate::privilege::{application_name, database_name, may_see, role_name, timestamp, HIDDEN};
use crate::query_desc::statement_text;
use crate::shmem::{self, StatsKey, PLAN_MAX};

/// Asks the executor for per-node timing when slow plans should carry actual rows and times
/// (`dbopt.slow_query_analyze`), for a `dbopt.slow_query_sample_rate` share of executions.
///
/// # Safety
/// `qd` must be a QueryDesc before `standard_ExecutorStart`.
pub unsafe fn maybe_instrument(qd: *mut pg_sys::QueryDesc) {
    if gucs::slow_query_ms().is_none() || !gucs::slow_query_analyze() {
        return;
    }
    let rate = gucs::slow_query_sample_rate();
    // SAFETY: PostgreSQL's global PRNG, backend-local state.
    let sampled = rate >= 1.0
        || unsafe { pg_sys::pg_prng_double(&raw mut pg_sys::pg_global_prng_state) } < rate;
    if sampled {
        use pg_sys::InstrumentOption::*;
        // SAFETY: the caller passes a QueryDesc that is not started yet.
        unsafe {
            (*qd).instrument_options |=
                (INSTRUMENT_TIMER | INSTRUMENT_ROWS | INSTRUMENT_BUFFERS) as i32
        };
    }
}

/// The statement's plan as EXPLAIN (FORMAT JSON) text, with actuals when it was instrumented.
///
/// # Safety
/// `qd` must be a QueryDesc after the run and before `standard_ExecutorEnd`.
unsafe fn explain_json(qd: *mut pg_sys::QueryDesc, analyzed: bool) -> String {
    // SAFETY: the ExplainState is allocated in the current (per-query) memory context.
    unsafe {
        let es = pg_sys::NewExplainState();
        (*es).format = pg_sys::ExplainFormat::EXPLAIN_FORMAT_JSON;
        (*es).analyze = analyzed;
        (*es).buffers = analyzed;
        (*es).timing = analyzed;
        (*es).summary = analyzed;
        (*es).costs = true;
        pg_sys::ExplainBeginOutput(es);
        pg_sys::ExplainPrintPlan(es, qd);
        pg_sys::ExplainEndOutput(es);
        let text = CStr::from_ptr((*(*es).str_).data)
            .to_string_lossy()
            .into_owned();
        // The JSON output is a one-element array around the plan's fields without their own
        // braces ("[ "Plan": … ]"); make it the object it describes, as auto_explain does.
        // The tables the statement reads, with their schemas (a plan without VERBOSE names
        // tables only): index advice must know which `orders` it is, never guess `public`.
        let relations = relations_json(qd);
        let trimmed = text.trim();
        match (trimmed.strip_prefix('['), trimmed.strip_suffix(']')) {
            (Some(_), Some(_)) => format!(
                "{{\"Relations\": {relations},{}}}",
                &trimmed[1..trimmed.len() - 1]
            ),
            _ => text,
        }
    }
}

/// `[{"name": …, "schema": …}, …]` for the plain tables in the statement's range table.
///
/// # Safety
/// `qd` must be a QueryDesc with its plannedstmt, inside a transaction (catalog lookups).
unsafe fn relations_json(qd: *mut pg_sys::QueryDesc) -> String {
    let mut items = Vec::new();
    // SAFETY: the range table is a List of RangeTblEntry owned by the plan; the lookups read the
    // syscache and return palloc'd strings (or NULL for a relation dropped meanwhile).
    unsafe {
        let stmt = (*qd).plannedstmt;
        if stmt.is_null() {
            return "[]".into();
        }
        let rtable = (*stmt).rtable;
        if rtable.is_null() {
            return "[]".into();
        }
        for i in 0..(*rtable).length.max(0) as usize {
            let rte = (*(*rtable).elements.add(i))
                .ptr_value
                .cast::<pg_sys::RangeTblEntry>();
            if rte.is_null() || (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION {
                continue;
            }
            let relid = (*rte).relid;
            let name = pg_sys::get_rel_name(relid);
            let schema = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
            if name.is_null() || schema.is_null() {
                continue;
            }
            let item = format!(
                "{{\"name\": {}, \"schema\": {}}}",
                json_string(&CStr::from_ptr(name).to_string_lossy()),
                json_string(&CStr::from_ptr(schema).to_string_lossy())
            );
            if !items.contains(&item) {
                items.push(item);
            }
        }
    }
    format!("[{}]", items.join(", "))
}

/// The client's address as `inet_client_addr()` shows it ("" over a Unix socket).
fn client_addr() -> String {
    // SAFETY: both are ordinary SQL-callable functions of this backend's connection.
    unsafe {
        let Some(addr) = pgrx::fcinfo::direct_function_call_as_datum(pg_sys::inet_client_addr, &[])
        else {
            return String::new();
        };
        pgrx::fcinfo::direct_function_call::<&CStr>(pg_sys::inet_out, &[Some(addr)])
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// JSON string literal for `s`.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Top-level executions left before the next plan sample. A backend is one single-threaded
/// process: a plain process-wide counter (no thread-local lookup on every statement).
static UNTIL_SAMPLE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Is this execution's plan due for a sample (`dbopt.plan_sample_every`)? A countdown, not a
/// random draw: one decrement per statement.
pub fn sample_due() -> bool {
    let Some(every) = gucs::plan_sample_every() else {
        return false;
    };
    use std::sync::atomic::Ordering::Relaxed;
    let n = UNTIL_SAMPLE.load(Relaxed);
    if n == 0 || n > every {
        UNTIL_SAMPLE.store(every - 1, Relaxed);
        n == 0
    } else {
        UNTIL_SAMPLE.store(n - 1, Relaxed);
        false
    }
}

/// Keeps the plan of one (fast) execution for index advice over the whole workload. Nothing is
/// logged; the text is the normalised one.
///
/// # Safety
/// As for [`explain_json`].
pub unsafe fn sample(qd: *mut pg_sys::QueryDesc, key: &StatsKey, ms: f64, rows: u64) {
    // SAFETY: the caller's QueryDesc is valid.
    unsafe {
        let plan = explain_json(qd, false);
        if plan.len() > PLAN_MAX {
            return;
        }
        let text = shmem::text_of(key)
            .unwrap_or_else(|| dbopt_querystats::normalize::normalize(&statement_text(qd)).0);
        let now = pg_sys::GetCurrentTimestamp();
        shmem::push_sample(key, |r| fill(r, key, now, ms, rows, false, &text, &plan));
    }
}

/// The fields a slow capture and a plan sample share.
#[allow(clippy::too_many_arguments)]
fn fill(
    r: &mut shmem::SlowRecord,
    key: &StatsKey,
    at: i64,
    ms: f64,
    rows: u64,
    analyzed: bool,
    text: &str,
    plan: &str,
) {
    r.at = at;
    r.duration_ms = ms;
    r.userid = key.userid;
    r.dbid = key.dbid;
    r.queryid = key.queryid;
    r.rows = rows;
    r.analyzed = analyzed;
    r.text.set(text);
    r.plan.set(plan);
}

/// Keeps one slow execution (ring + server log).
///
/// # Safety
/// As for [`explain_json`].
pub unsafe fn capture(
    qd: *mut pg_sys::QueryDesc,
    key: &StatsKey,
    ms: f64,
    rows: u64,
    b: &pg_sys::BufferUsage,
) {
    // SAFETY: the caller's QueryDesc is valid; globals are backend-local.
    unsafe {
        let analyzed =
            (*qd).instrument_options & pg_sys::InstrumentOption::INSTRUMENT_TIMER as i32 != 0;
        let mut plan = explain_json(qd, analyzed);
        if plan.len() > PLAN_MAX {
            plan = format!("{{\"truncated\": true, \"bytes\": {}}}", plan.len());
        }
        let text = if gucs::slow_query_log_parameters() {
            statement_text(qd)
        } else {
            shmem::text_of(key)
                .unwrap_or_else(|| dbopt_querystats::normalize::normalize(&statement_text(qd)).0)
        };
        let app = application_name();
        let client = client_addr();
        let now = pg_sys::GetCurrentTimestamp();
        shmem::push_slow(|r| {
            fill(r, key, now, ms, rows, analyzed, &text, &plan);
            r.shared_blks_hit = b.shared_blks_hit;
            r.shared_blks_read = b.shared_blks_read;
            r.temp_blks_written = b.temp_blks_written;
            r.app.set(&app);
            r.client.set(&client);
        });
        let line = format!(
            "{{\"duration_ms\": {ms:.3}, \"user\": {}, \"database\": {}, \"application_name\": {}, \
             \"client_addr\": {}, \"queryid\": {}, \"rows\": {rows}, \"shared_blks_hit\": {}, \
             \"shared_blks_read\": {}, \"query\": {}, \"plan\": {}}}",
            json_string(&role_name(key.userid)),
            json_string(&database_name(key.dbid)),
            json_string(&app),
            json_string(&client),
            key.queryid,
            b.shared_blks_hit,
            b.shared_blks_read,
            json_string(&text),
            plan.split_whitespace().collect::<Vec<_>>().join(" "),
        );
        log_without_statement(&format!("dbopt slow query: {line}"));
    }
}

/// Writes `line` to the server log at LOG level without PostgreSQL's `STATEMENT:` line (which
/// would repeat the raw text, literals included, whatever `dbopt.slow_query_log_parameters` says).
fn log_without_statement(line: &str) {
    let Ok(text) = std::ffi::CString::new(line) else {
        return;
    };
    // SAFETY: the elog protocol as PostgreSQL's ereport() macro runs it: errstart, the message
    // (through "%s", so nothing in it is a format), errhidestmt, errfinish. LOG never longjmps.
    unsafe {
        if crate::fast_ffi::errstart(pg_sys::LOG as i32, std::ptr::null()) {
            crate::fast_ffi::errmsg_internal(c"%s".as_ptr(), text.as_ptr());
            crate::fast_ffi::errhidestmt(true);
            crate::fast_ffi::errfinish(c"slow.rs".as_ptr(), line!() as i32, c"log_slow".as_ptr());
        }
    }
}

/// Slow executions kept in the ring, newest first.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn slow_queries() -> TableIterator<
    'static,
    (
        name!(captured_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(duration_ms, f64),
        name!(username, String),
        name!(datname, String),
        name!(application_name, String),
        name!(client_addr, Option<String>),
        name!(queryid, i64),
        name!(query, String),
        name!(rows, i64),
        name!(shared_blks_hit, i64),
        name!(shared_blks_read, i64),
        name!(temp_blks_written, i64),
        name!(analyzed, bool),
        name!(plan, Option<pgrx::datum::Json>),
    ),
> {
    let mut rows = Vec::new();
    shmem::each_slow(|r| {
        let visible = may_see(r.userid);
        rows.push((
            timestamp(r.at),
            r.duration_ms,
            role_name(r.userid),
            database_name(r.dbid),
            r.app.get(),
            // Hidden as pg_stat_activity hides other users' addresses.
            visible.then(|| r.client.get()),
            r.queryid,
            if visible {
                r.text.get()
            } else {
                HIDDEN.to_string()
            },
            r.rows as i64,
            r.shared_blks_hit,
            r.shared_blks_read,
            r.temp_blks_written,
            r.analyzed,
            visible.then(|| {
                let plan = r.plan.get();
                pgrx::datum::Json(
                    serde_json::from_str(&plan).unwrap_or(serde_json::Value::String(plan)),
                )
            }),
        ));
    });
    TableIterator::new(rows)
}

/// Empties the slow-query ring; returns how many records it held.
/// Executions over `dbopt.slow_query_ms` since the server started (also those the ring no longer
/// holds): a counter a monitor turns into slow statements per minute.
#[pg_extern(volatile, parallel_safe)]
fn slow_queries_total() -> i64 {
    i64::try_from(shmem::slow_total()).unwrap_or(i64::MAX)
}

#[pg_extern(volatile)]
fn slow_queries_reset() -> i64 {
    shmem::reset_slow() as i64
}

#[cfg(test)]
mod tests {
    use super::json_string;

    #[test]
    fn json_strings_escape_what_they_must() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }
}
