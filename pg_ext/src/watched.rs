//! The tables some cache watches: only writes to them are announced at commit (NOTIFY serialises
//! the commits of notifying transactions, so a workload writing tables nobody caches should not
//! notify at all — measured: −20 % on pgbench tpcb -M prepared when every commit notified).
//!
//! A router registers the tables a result reads (`dbopt.watch_tables(oid[])`, on the primary)
//! before its first fill of them. The race to close: a transaction that decided at pre-commit
//! that its tables were not watched, and becomes visible only after a registration — a fill
//! started after the registration could read the old rows and store them, and the write would
//! never be announced. So deciding transactions are counted, per epoch, from the decision until
//! their commit is visible (the commit callback), and a registration moves the epoch on and waits
//! until the transactions of the old epoch have finished (read-copy-update style): no lock is held
//! across a commit, and deciders pay two atomic operations and a share lock to read the set.
//!
//! The set lives in shared memory (8,192 tables for the whole server); when full, every table
//! counts as watched (announcing more is always safe). It is emptied by a restart; the router's
//! listener reconnects then and registers again.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// Most (database, table) pairs watched before every table counts as watched.
pub const WATCH_MAX: usize = 8192;

/// How long a registration waits for transactions of the old epoch before it gives up.
const WAIT_LIMIT_MS: u64 = 10_000;

#[repr(C)]
struct Watched {
    /// Guards `count`, `overflow` and `entries` (held only while reading or changing them).
    lock: *mut pg_sys::LWLockPadded,
    epoch: AtomicU64,
    /// Transactions between their decision and their visible commit, by epoch parity.
    deciding: [AtomicU64; 2],
    count: usize,
    overflow: bool,
    /// `(database OID << 32) | table OID`, sorted.
    entries: [u64; WATCH_MAX],
}

// Set by the startup hook in every process (inherited by fork); backends are single-threaded.
static mut WATCHED: *mut Watched = ptr::null_mut();
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
// The epoch parity this backend's transaction is counted under, between decision and commit.
static HELD: crate::backend_local::BackendLocal<Cell<Option<usize>>> =
    crate::backend_local::BackendLocal::new(Cell::default);
const TRANCHE: &std::ffi::CStr = c"dbopt watched tables";

pub fn init() {
    // SAFETY: _PG_init, once, in the postmaster.
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: the postmaster's shmem request phase; previous hooks first.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Watched>());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: shared memory is attached (the startup hook); previous hooks first.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        WATCHED = crate::shmem::init_struct(
            c"dbopt watched tables",
            std::mem::size_of::<Watched>(),
            |base| {
                (*base.cast::<Watched>()).lock = pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr());
            },
        )
        .cast::<Watched>();
    }
}

fn key(db: pg_sys::Oid, table: u32) -> u64 {
    (u64::from(u32::from(db)) << 32) | u64::from(table)
}

fn shared() -> Option<&'static Watched> {
    // SAFETY: a pointer set once at startup to memory that lives as long as the server.
    unsafe { WATCHED.as_ref() }
}

fn the_lock(w: &Watched) -> *mut pg_sys::LWLock {
    // SAFETY: the tranche's one lock, in shared memory.
    unsafe { &raw mut (*w.lock).lock }
}

/// Counts this transaction as deciding (see the module docs) and keeps the written tables that
/// are watched. Call [`release`] once the commit is visible (or the transaction aborted).
pub fn hold_and_filter(tables: &[u32]) -> Vec<u32> {
    let Some(w) = shared() else {
        return tables.to_vec();
    };
    release();
    loop {
        let e = w.epoch.load(Ordering::SeqCst);
        w.deciding[(e & 1) as usize].fetch_add(1, Ordering::SeqCst);
        if w.epoch.load(Ordering::SeqCst) == e {
            HELD.with(|h| h.set(Some((e & 1) as usize)));
            break;
        }
        w.deciding[(e & 1) as usize].fetch_sub(1, Ordering::SeqCst);
    }
    // SAFETY: the set is read under its lock in share mode.
    unsafe {
        let lock = the_lock(w);
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_SHARED);
        let kept = if w.overflow {
            tables.to_vec()
        } else {
            let entries = &w.entries[..w.count.min(WATCH_MAX)];
            let db = pg_sys::MyDatabaseId;
            tables
                .iter()
                .copied()
                .filter(|&t| entries.binary_search(&key(db, t)).is_ok())
                .collect()
        };
        pg_sys::LWLockRelease(lock);
        kept
    }
}

/// This transaction's commit is visible (or it aborted): it no longer counts as deciding.
pub fn release() {
    if let (Some(w), Some(i)) = (shared(), HELD.with(Cell::take)) {
        w.deciding[i].fetch_sub(1, Ordering::SeqCst);
    }
}

/// Registers tables of the current database as watched; returns (the number newly added) once
/// every transaction that decided its announcement without them has finished committing.
#[pg_extern(volatile, parallel_unsafe)]
fn watch_tables(tables: Vec<pg_sys::Oid>) -> i64 {
    let Some(w) = shared() else {
        return 0;
    };
    let mut added = 0i64;
    // SAFETY: the set is changed under its lock held exclusively, within its bound.
    unsafe {
        let db = pg_sys::MyDatabaseId;
        let lock = the_lock(w);
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let set = &mut *WATCHED;
        for t in tables {
            let k = key(db, u32::from(t));
            let n = set.count.min(WATCH_MAX);
            match set.entries[..n].binary_search(&k) {
                Ok(_) => {}
                Err(_) if n == WATCH_MAX => set.overflow = true,
                Err(pos) => {
                    set.entries.copy_within(pos..n, pos + 1);
                    set.entries[pos] = k;
                    set.count = n + 1;
                    added += 1;
                }
            }
        }
        pg_sys::LWLockRelease(lock);
    }
    // New deciders count under the next epoch (and see the tables); wait out the old one.
    let old = w.epoch.fetch_add(1, Ordering::SeqCst);
    let counter = &w.deciding[(old & 1) as usize];
    let started = std::time::Instant::now();
    while counter.load(Ordering::SeqCst) > 0 {
        if started.elapsed().as_millis() as u64 > WAIT_LIMIT_MS {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
                "dbopt.watch_tables: transactions committing meanwhile did not finish in 10 s",
                function_name!(),
            )
            .report(PgLogLevel::ERROR);
        }
        // SAFETY: a plain sleep; interrupts (cancel) are served.
        unsafe {
            pg_sys::pg_usleep(100);
            pg_sys::check_for_interrupts!();
        }
    }
    added
}
