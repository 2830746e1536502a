//! Direct, unguarded calls to a few PostgreSQL functions on the per-statement path.
//!
//! pgrx wraps every `pg_sys` call in a guard (sigsetjmp + error-context bookkeeping) so that a
//! PostgreSQL ERROR becomes a Rust panic. Measured with callgrind (`scripts/bench/pg_instructions`)
//! those guards were the largest part of dbopt's per-statement cost. The functions below cannot
//! raise an ERROR in the way dbopt calls them, so they are declared here and called directly:
//! - `GetUserId`, `IsTransactionBlock`: read backend-local state, never error.
//! - `LWLockAcquire`/`LWLockRelease` on dbopt's own locks: errors only on internal misuse
//!   (releasing a lock not held, holding more than 200 locks), which dbopt's guards rule out.
//! - `hash_search` with `HASH_FIND`/`HASH_ENTER_NULL`/`HASH_REMOVE` on a shared table: the
//!   `_NULL` form returns NULL instead of raising when memory runs out.
//! - `InstrEndLoop` on the statement's own total-time instrument, which is never running then.
//!
//! `standard_ExecutorRun`/`standard_ExecutorFinish` *can* raise any query error. dbopt's Run and
//! Finish hooks call them directly anyway: those hooks only count the nesting level, their frames
//! hold nothing that needs cleaning up (so a longjmp over them is harmless, as over a C frame), and
//! the level they would have restored is reset by the (sub)transaction-abort callbacks — the
//! equivalent of pg_stat_statements' PG_FINALLY. See `hooks.rs`.

use pgrx::pg_sys;

#[allow(non_snake_case)]
extern "C-unwind" {
    pub fn GetUserId() -> pg_sys::Oid;
    pub fn IsTransactionBlock() -> bool;
    pub fn LWLockAcquire(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> bool;
    pub fn LWLockRelease(lock: *mut pg_sys::LWLock);
    pub fn hash_search(
        hashp: *mut pg_sys::HTAB,
        key: *const std::ffi::c_void,
        action: pg_sys::HASHACTION::Type,
        found: *mut bool,
    ) -> *mut std::ffi::c_void;
    pub fn InstrEndLoop(instr: *mut pg_sys::Instrumentation);
    pub fn standard_ExecutorRun(
        qd: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
        execute_once: bool,
    );
    pub fn standard_ExecutorFinish(qd: *mut pg_sys::QueryDesc);
}
