//! Executor hooks: statistics for every statement, slow-query capture and N+1 observation.
//!
//! Each hook chains to the one installed before it (or to PostgreSQL's standard function). The
//! nesting level is kept with drop guards, so it is right again when an error unwinds; the
//! transaction-abort callbacks count the failed statement and reset the level as a last resort.
//! Parallel workers are skipped: their leader accounts for the whole statement.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::ptr;

use dbopt_querystats::normalize::normalize;
use pgrx::pg_sys;

use crate::backend_local::BackendLocal;
use crate::query_desc::{statement_text, Fnv};
use crate::shmem::{self, StatsKey};
use crate::{fast_ffi, gucs, nplusone, slow};

static mut PREV_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREV_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREV_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Backend-local state. Backends are single-threaded processes, so a thread-local is all the
/// synchronisation needed; borrows are never held across calls back into PostgreSQL.
struct Local {
    nesting: Cell<i32>,
    /// The top-level statement being executed, to charge an error to if the transaction aborts.
    current: Cell<Option<StatsKey>>,
    /// Statements this backend has already made sure exist in the shared table.
    known: RefCell<HashSet<StatsKey, BuildHasherDefault<Fnv>>>,
    /// The last of them: ORM and benchmark loops repeat one statement, so this is the usual hit.
    last_known: Cell<Option<StatsKey>>,
    /// The nesting level at the start of each open subtransaction, innermost last: an error caught
    /// by a PL/pgSQL EXCEPTION block rolls its subtransaction back, and the level returns to this.
    sub_levels: RefCell<Vec<i32>>,
}

static LOCAL: BackendLocal<Local> = BackendLocal::new(|| Local {
    nesting: Cell::new(0),
    current: Cell::new(None),
    known: RefCell::new(HashSet::default()),
    last_known: Cell::new(None),
    sub_levels: RefCell::new(Vec::new()),
});

/// Bound on `Local::known` (it only saves a lookup; forgetting is harmless).
const KNOWN_MAX: usize = 10_000;

pub fn init() {
    // SAFETY: _PG_init, once, in the postmaster.
    unsafe {
        PREV_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        PREV_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREV_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        pg_sys::RegisterXactCallback(Some(xact_callback), ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), ptr::null_mut());
    }
}

fn nesting() -> i32 {
    LOCAL.with(|l| l.nesting.get())
}

fn is_parallel_worker() -> bool {
    // SAFETY: plain read of a backend-global.
    unsafe { pg_sys::ParallelWorkerNumber >= 0 }
}

/// The key of a statement about to run or just run, if it is tracked.
///
/// # Safety
/// `qd` must be a valid QueryDesc.
unsafe fn key_of(qd: *mut pg_sys::QueryDesc) -> Option<StatsKey> {
    // SAFETY: the caller passes the executor's QueryDesc.
    unsafe {
        let stmt = (*qd).plannedstmt;
        if stmt.is_null() || (*stmt).queryId == 0 || !shmem::ready() || is_parallel_worker() {
            return None;
        }
        let top = nesting() == 0;
        if !top && !gucs::track_nested() {
            return None;
        }
        Some(StatsKey::new(
            u32::from(fast_ffi::GetUserId()),
            u32::from(pg_sys::MyDatabaseId),
            (*stmt).queryId as i64,
            top,
        ))
    }
}

// Start and End do their own work in guarded functions (a panic there becomes an ERROR, as with
// any pgrx function) and call the executor directly, without pgrx's per-call guard (sigsetjmp):
// when the executor raises an error, the longjmp passes a frame that holds nothing to clean up.
unsafe extern "C-unwind" fn executor_start(qd: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: called by PostgreSQL with a valid QueryDesc.
    let tracked = unsafe { before_start(qd) };
    // SAFETY: chaining with PostgreSQL's own arguments; see above for errors.
    unsafe {
        match PREV_START {
            Some(prev) => prev(qd, eflags),
            None => fast_ffi::standard_ExecutorStart(qd, eflags),
        }
        if tracked && (*qd).totaltime.is_null() {
            // Our own timer and buffer/WAL counters for the whole statement, in the query's memory.
            let old = pg_sys::MemoryContextSwitchTo((*(*qd).estate).es_query_cxt);
            (*qd).totaltime =
                fast_ffi::InstrAlloc(1, pg_sys::InstrumentOption::INSTRUMENT_ALL as i32, false);
            pg_sys::MemoryContextSwitchTo(old);
        }
    }
}

/// ExecutorStart's own work; true when the statement is tracked.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn before_start(qd: *mut pg_sys::QueryDesc) -> bool {
    // SAFETY: called with the hook's valid QueryDesc.
    unsafe {
        let Some(k) = key_of(qd) else {
            return false;
        };
        if k.toplevel == 1 {
            LOCAL.with(|l| l.current.set(Some(k)));
        }
        // Make sure the statement has an entry (with its text) before it can fail, so an error
        // has somewhere to be counted. Once per statement and backend.
        let new = LOCAL.with(|l| l.last_known.get() != Some(k) && !l.known.borrow().contains(&k));
        if new {
            let text = statement_text(qd);
            shmem::update(&k, || normalize(&text).0, |_| {});
            LOCAL.with(|l| {
                let mut known = l.known.borrow_mut();
                if known.len() >= KNOWN_MAX {
                    known.clear();
                }
                known.insert(k);
            });
        }
        LOCAL.with(|l| l.last_known.set(Some(k)));
        if k.toplevel == 1 {
            slow::maybe_instrument(qd);
        }
        true
    }
}

/// Moves the nesting level by `delta` (never below 0). Must not panic: the Run and Finish hooks
/// that call it have no guard.
fn shift_nesting(delta: i32) {
    LOCAL.with(|l| l.nesting.set((l.nesting.get() + delta).max(0)));
}

// The Run and Finish hooks only count the nesting level, on every statement, so they run without
// pgrx's guard (see `fast_ffi`): if the executor raises an error, the decrement below is skipped
// and the (sub)transaction-abort callbacks put the level back.
unsafe extern "C-unwind" fn executor_run(
    qd: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    shift_nesting(1);
    // SAFETY: chaining with PostgreSQL's own arguments; this frame owns nothing to clean up.
    unsafe {
        match PREV_RUN {
            Some(prev) => prev(qd, direction, count, execute_once),
            None => fast_ffi::standard_ExecutorRun(qd, direction, count, execute_once),
        }
    }
    shift_nesting(-1);
}

unsafe extern "C-unwind" fn executor_finish(qd: *mut pg_sys::QueryDesc) {
    shift_nesting(1);
    // SAFETY: as for `executor_run`.
    unsafe {
        match PREV_FINISH {
            Some(prev) => prev(qd),
            None => fast_ffi::standard_ExecutorFinish(qd),
        }
    }
    shift_nesting(-1);
}

unsafe extern "C-unwind" fn executor_end(qd: *mut pg_sys::QueryDesc) {
    // SAFETY: the QueryDesc is valid until standard_ExecutorEnd, which runs last; see
    // `executor_start` for the unguarded call.
    unsafe {
        before_end(qd);
        match PREV_END {
            Some(prev) => prev(qd),
            None => fast_ffi::standard_ExecutorEnd(qd),
        }
    }
}

/// ExecutorEnd's own work: record the statement.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn before_end(qd: *mut pg_sys::QueryDesc) {
    // SAFETY: called with the hook's valid QueryDesc.
    unsafe {
        if let Some(key) = key_of(qd) {
            if !(*qd).totaltime.is_null() {
                record(qd, &key);
            }
            if key.toplevel == 1 {
                LOCAL.with(|l| l.current.set(None));
            }
        }
    }
}

/// Utility statements (DO, CALL, CREATE EXTENSION, …) run their inner statements one level down,
/// so those count as nested, not as top-level statements of their own.
///
/// No pgrx guard, as for Run and Finish: an error raised below passes through unchanged (all its
/// fields, no backtrace), the frame owns nothing to clean up, and the abort callbacks restore the
/// nesting level the decrement below would have.
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    shift_nesting(1);
    // SAFETY: chaining with PostgreSQL's own arguments; this frame owns nothing to clean up.
    unsafe {
        crate::invalidate::before_utility(pstmt);
        match PREV_UTILITY {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => fast_ffi::standard_ProcessUtility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                env,
                dest,
                qc,
            ),
        }
    }
    shift_nesting(-1);
}

/// Adds one execution to the statement's counters; captures it if slow; feeds the N+1 detector.
///
/// # Safety
/// `qd` must be a valid QueryDesc with `totaltime` set.
unsafe fn record(qd: *mut pg_sys::QueryDesc, key: &StatsKey) {
    // SAFETY: the caller guarantees qd and its totaltime/estate.
    unsafe {
        let t = (*qd).totaltime;
        fast_ffi::InstrEndLoop(t);
        let ms = (*t).total * 1000.0;
        let rows = if (*qd).estate.is_null() {
            0
        } else {
            (*(*qd).estate).es_processed
        };
        let b = (*t).bufusage;
        let w = (*t).walusage;
        // When the statement ended: its message's start time (PostgreSQL keeps it; no clock read)
        // plus its duration. It serves the statistics and the N+1 detector (→ Unix ms).
        let now = fast_ffi::GetCurrentStatementStartTimestamp() + (ms * 1000.0) as i64;
        let now_unix_ms = ((now + 946_684_800_000_000) / 1000).max(0) as u64;
        let text = || normalize(&statement_text(qd)).0;
        shmem::update(key, text, |c| {
            c.calls += 1;
            c.rows += rows;
            c.exec.record(ms);
            c.shared_blks_hit += b.shared_blks_hit;
            c.shared_blks_read += b.shared_blks_read;
            c.shared_blks_dirtied += b.shared_blks_dirtied;
            c.shared_blks_written += b.shared_blks_written;
            c.local_blks_hit += b.local_blks_hit;
            c.local_blks_read += b.local_blks_read;
            c.local_blks_written += b.local_blks_written;
            c.temp_blks_read += b.temp_blks_read;
            c.temp_blks_written += b.temp_blks_written;
            c.wal_records += w.wal_records;
            c.wal_fpi += w.wal_fpi;
            c.wal_bytes += w.wal_bytes;
            c.last_seen = now;
        });
        if key.toplevel == 1 {
            match gucs::slow_query_ms() {
                Some(threshold) if ms >= threshold => slow::capture(qd, key, ms, rows, &b),
                _ if slow::sample_due() => slow::sample(qd, key, ms, rows),
                _ => {}
            }
            nplusone::observe(qd, key, now_unix_ms);
        }
    }
}

/// Counts an error against the top-level statement that was running when the (sub)transaction
/// aborted, and resets the nesting level.
fn charge_error() {
    let failed = LOCAL.with(|l| l.current.take());
    if let Some(key) = failed {
        // SAFETY: a plain call; we are in the abort path of a backend with shared memory.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        // Only existing entries (ExecutorStart made it): no text to create one from here.
        shmem::update_existing(&key, |c| {
            c.errors += 1;
            c.last_seen = now;
        });
    }
}

/// The extension's one transaction callback (one call per event for statistics, N+1 bursts and
/// cache invalidation), for every event (pre-commit, commit, …): only pre-commit, abort and
/// commit matter, and the others return before pgrx's guard is set up.
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    // SAFETY: forwarded from PostgreSQL's transaction callback.
    unsafe { crate::invalidate::xact_event(event) };
    let ends = match event {
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => true,
        // A commit with no subtransaction levels and no burst to close (every autocommit
        // statement) has nothing to do: no guard set up for it.
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            LOCAL.with(|l| l.sub_levels.try_borrow().map_or(true, |s| !s.is_empty()))
                || nplusone::transaction_open()
        }
        _ => false,
    };
    if ends {
        // SAFETY: forwarded from PostgreSQL.
        unsafe { xact_end(event, arg) }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn xact_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            charge_error();
            LOCAL.with(|l| {
                l.nesting.set(0);
                l.sub_levels.borrow_mut().clear();
            });
            nplusone::end_transaction();
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            LOCAL.with(|l| l.sub_levels.borrow_mut().clear());
            nplusone::end_transaction();
        }
        _ => {}
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_START_SUB => {
            LOCAL.with(|l| l.sub_levels.borrow_mut().push(l.nesting.get()));
        }
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
            LOCAL.with(|l| l.sub_levels.borrow_mut().pop());
        }
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            // Back to the level the subtransaction started at. If that is 0, a top-level statement
            // failed inside a savepoint: count it. Otherwise a nested statement failed and was
            // caught (PL/pgSQL EXCEPTION): not the top-level statement's failure.
            let at = LOCAL.with(|l| {
                let at = l.sub_levels.borrow_mut().pop().unwrap_or(0);
                l.nesting.set(at);
                at
            });
            if at == 0 {
                charge_error();
            }
        }
        _ => {}
    }
}
