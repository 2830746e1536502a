//! Direct, unguarded calls to a few PostgreSQL functions on the per-statement path.
//!
//! pgrx wraps every `pg_sys` call in a guard (sigsetjmp + error-context bookkeeping) so that a
//! PostgreSQL ERROR becomes a Rust panic. Measured with callgrind (`scripts/bench/pg_instructions`)
//! those guards were the largest part of dbopt's per-statement cost. The functions below cannot
//! raise an ERROR in the way dbopt calls them, so they are declared here and called directly:
//! - `GetUserId`, `IsTransactionBlock`, `GetCurrentStatementStartTimestamp`: read backend-local
//!   state, never error.
//! - `LWLockAcquire`/`LWLockRelease` on dbopt's own locks: errors only on internal misuse
//!   (releasing a lock not held, holding more than 200 locks), which dbopt's guards rule out.
//! - `hash_search` with `HASH_FIND`/`HASH_ENTER_NULL`/`HASH_REMOVE` on a shared table: the
//!   `_NULL` form returns NULL instead of raising when memory runs out.
//! - `InstrEndLoop` on the statement's own total-time instrument, which is never running then.
//!
//! - `InstrAlloc` for the statement's timer: only raises out-of-memory, as any palloc.
//! - `errstart`/`errmsg_internal`/`errhidestmt`/`errfinish` at LOG level, which returns.
//!
//! `standard_ExecutorStart/Run/Finish/End` and `standard_ProcessUtility` (and a previous hook in
//! their place) *can* raise any
//! query error. dbopt's hooks call them directly anyway: at the call the hook's frame holds nothing
//! that needs cleaning up (its own work is done before, or after, in a separate guarded function),
//! so a longjmp over it is harmless, as over a C frame; the nesting level Run and Finish would have
//! restored is reset by the (sub)transaction-abort callbacks — the equivalent of
//! pg_stat_statements' PG_FINALLY. See `hooks.rs`. Calling them unguarded also means their errors
//! reach the client exactly as PostgreSQL raised them: pgrx's guard would re-raise them as a new
//! error, without the schema/table/constraint fields ORMs read and with a Rust backtrace in DETAIL
//! when the server runs with RUST_BACKTRACE set.

use pgrx::pg_sys;

#[allow(non_snake_case)]
extern "C-unwind" {
    pub fn errstart(elevel: i32, domain: *const std::ffi::c_char) -> bool;
    pub fn errmsg_internal(fmt: *const std::ffi::c_char, ...) -> i32;
    pub fn errhidestmt(hide_stmt: bool) -> i32;
    pub fn errfinish(
        filename: *const std::ffi::c_char,
        lineno: i32,
        funcname: *const std::ffi::c_char,
    );
    pub fn GetUserId() -> pg_sys::Oid;
    pub fn IsTransactionBlock() -> bool;
    pub fn GetCurrentStatementStartTimestamp() -> pg_sys::TimestampTz;
    pub fn LWLockAcquire(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> bool;
    pub fn LWLockRelease(lock: *mut pg_sys::LWLock);
    pub fn hash_search(
        hashp: *mut pg_sys::HTAB,
        key: *const std::ffi::c_void,
        action: pg_sys::HASHACTION::Type,
        found: *mut bool,
    ) -> *mut std::ffi::c_void;
    pub fn InstrEndLoop(instr: *mut pg_sys::Instrumentation);
    pub fn InstrAlloc(
        n: i32,
        instrument_options: i32,
        async_mode: bool,
    ) -> *mut pg_sys::Instrumentation;
    pub fn standard_ExecutorStart(qd: *mut pg_sys::QueryDesc, eflags: i32);
    pub fn standard_ExecutorEnd(qd: *mut pg_sys::QueryDesc);
    pub fn standard_ExecutorRun(
        qd: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
        execute_once: bool,
    );
    pub fn standard_ExecutorFinish(qd: *mut pg_sys::QueryDesc);
    #[allow(clippy::too_many_arguments)]
    pub fn standard_ProcessUtility(
        pstmt: *mut pg_sys::PlannedStmt,
        query: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}
