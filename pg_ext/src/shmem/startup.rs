//! Sizing the shared memory (shmem request hook) and creating or attaching to it (shmem startup
//! hook), in the postmaster and in every backend.

use std::ffi::CStr;
use std::ptr;
use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use super::layout::{Header, N1Record, SlowRecord, StatsEntry, StatsKey, N1_EVENTS, PLAN_SAMPLES};
use super::locks::{LOCKS, TRANCHE};
use super::{persist, HEADER, HTAB, N1, SAMPLES, SLOW};
use crate::gucs;

static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

fn fixed_size() -> usize {
    size_of::<Header>()
        + gucs::slow_query_max() * size_of::<SlowRecord>()
        + N1_EVENTS * size_of::<N1Record>()
        + PLAN_SAMPLES * size_of::<SlowRecord>()
}

/// Shared memory of the statement table, per entry (reported by the overhead benchmark).
pub fn bytes_per_statement() -> usize {
    size_of::<StatsEntry>()
}

/// Registers the hooks that size and create the shared memory. Only from `_PG_init`.
pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster before any other process exists.
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster in its shmem request phase; chaining first keeps the
    // order other extensions expect.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        let table =
            pg_sys::hash_estimate_size(gucs::max_statements() as _, size_of::<StatsEntry>());
        pg_sys::RequestAddinShmemSpace(fixed_size() + table);
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), LOCKS);
    }
}

/// Index of AddinShmemInitLock in MainLWLockArray (lwlocknames.h, PostgreSQL 15): the lock that
/// serialises extensions creating their shared memory.
const ADDIN_SHMEM_INIT_LOCK: usize = 21;

/// AddinShmemInitLock.
///
/// # Safety
/// Shared memory must be attached (a shmem startup hook).
pub unsafe fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    // SAFETY: per the contract, MainLWLockArray exists.
    unsafe { &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock }
}

/// Creates, or attaches to, a named shared-memory struct of `size` bytes under AddinShmemInitLock;
/// in the process that creates it the memory is zeroed and `init` runs on it, still under the lock.
///
/// # Safety
/// Only from a shmem startup hook, for a size requested in the shmem request hook.
pub unsafe fn init_struct(name: &CStr, size: usize, init: impl FnOnce(*mut u8)) -> *mut u8 {
    // SAFETY: per the contract; `found` says whether another process created it already.
    unsafe {
        let lock = addin_shmem_init_lock();
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let base = pg_sys::ShmemInitStruct(name.as_ptr(), size, &mut found).cast::<u8>();
        if !found {
            ptr::write_bytes(base, 0, size);
            init(base);
        }
        pg_sys::LWLockRelease(lock);
        base
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: runs in the postmaster (and in EXEC_BACKEND children) with shared memory attached;
    // AddinShmemInitLock serialises creation, `found` tells whether another process made it.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        let init_lock = addin_shmem_init_lock();
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let base =
            pg_sys::ShmemInitStruct(c"dbopt state".as_ptr(), fixed_size(), &mut found).cast::<u8>();
        HEADER = base.cast::<Header>();
        SLOW = base.add(size_of::<Header>()).cast::<SlowRecord>();
        N1 = base
            .add(size_of::<Header>() + gucs::slow_query_max() * size_of::<SlowRecord>())
            .cast::<N1Record>();
        SAMPLES = base
            .add(
                size_of::<Header>()
                    + gucs::slow_query_max() * size_of::<SlowRecord>()
                    + N1_EVENTS * size_of::<N1Record>(),
            )
            .cast::<SlowRecord>();
        if !found {
            ptr::write_bytes(base, 0, fixed_size());
            (*HEADER).locks = pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr());
            (*HEADER).slow_cap = gucs::slow_query_max();
            (*HEADER).max_statements = gucs::max_statements();
            (*HEADER)
                .stats_reset
                .store(pg_sys::GetCurrentTimestamp(), Ordering::Relaxed);
        }
        let mut info: pg_sys::HASHCTL = std::mem::zeroed();
        info.keysize = size_of::<StatsKey>();
        info.entrysize = size_of::<StatsEntry>();
        let max = gucs::max_statements() as _;
        HTAB = pg_sys::ShmemInitHash(
            c"dbopt statements".as_ptr(),
            max,
            max,
            &mut info,
            (pg_sys::HASH_ELEM | pg_sys::HASH_BLOBS) as i32,
        );
        if !found {
            // First start of the shared memory (postmaster): load what the last clean shutdown
            // saved, and save again at the next one. No backend exists yet, so no lock is needed.
            persist::load_saved();
            if !pg_sys::IsUnderPostmaster {
                pg_sys::on_shmem_exit(Some(persist::save_at_shutdown), pg_sys::Datum::from(0));
            }
        }
        pg_sys::LWLockRelease(init_lock);
    }
}
