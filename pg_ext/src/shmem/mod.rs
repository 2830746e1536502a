//! Shared memory: the statement table (a PostgreSQL shared hash table), the slow-query ring, the
//! N+1 event ring and the plan-sample ring, each behind its own LWLock, sized from the `dbopt.*`
//! settings at server start.
//!
//! - [`layout`] — the records as they lie in shared memory;
//! - [`startup`] — sizing and creating the memory (the shmem hooks), attaching to it;
//! - [`persist`] — the statement table saved at shutdown and loaded at start;
//! - [`locks`] — the LWLocks and the per-entry spinlock;
//! - [`statements`] — the statement table: find, create, update, evict, scan ([`statements::Entries`]);
//! - [`rings`] — the fixed-size rings of slow queries, N+1 bursts and plan samples.
//!
//! Locking follows pg_stat_statements: counters of an existing entry are updated under the
//! *shared* table lock plus the entry's own spinlock, so executions never wait on each other for
//! long; only creating entries (once per new statement) and eviction (once per 5% of the table)
//! take the lock exclusively.

use std::ptr;

use pgrx::pg_sys;

mod layout;
mod locks;
mod persist;
mod rings;
mod startup;
mod statements;

pub use layout::*;
pub use rings::*;
pub use startup::{addin_shmem_init_lock, bytes_per_statement, init, init_struct};
pub use statements::*;

use layout::Header;

// Pointers into shared memory, set in every process by the startup hook (postmaster and backends
// inherit them by fork). Backends are single-threaded, so plain statics are not raced.
static mut HEADER: *mut Header = ptr::null_mut();
static mut HTAB: *mut pg_sys::HTAB = ptr::null_mut();
static mut SLOW: *mut SlowRecord = ptr::null_mut();
static mut N1: *mut N1Record = ptr::null_mut();
static mut SAMPLES: *mut SlowRecord = ptr::null_mut();

/// Whether the shared memory exists (false when the library was not preloaded).
#[inline]
pub fn ready() -> bool {
    // SAFETY: a plain read of a pointer set once at startup.
    unsafe { !HEADER.is_null() && !HTAB.is_null() }
}
