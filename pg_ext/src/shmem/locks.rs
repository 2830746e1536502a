//! dbopt's LWLocks (one tranche: the statement table and each ring) and the per-entry spinlock.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU32, Ordering};

use pgrx::pg_sys;

use super::HEADER;
use crate::fast_ffi;

pub(super) const LOCK_STATEMENTS: usize = 0;
pub(super) const LOCK_SLOW: usize = 1;
pub(super) const LOCK_N1: usize = 2;
pub(super) const LOCK_SAMPLES: usize = 3;
/// The named tranche of those locks.
pub(super) const TRANCHE: &CStr = c"dbopt";
/// How many locks the tranche holds.
pub(super) const LOCKS: i32 = 4;

/// Holds one of dbopt's LWLocks; released on drop (also when a PostgreSQL error unwinds).
pub struct Locked(*mut pg_sys::LWLock);

impl Drop for Locked {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: the lock was acquired by `lock` in this process.
        unsafe { fast_ffi::LWLockRelease(self.0) };
    }
}

#[inline]
pub(super) fn lock(which: usize, exclusive: bool) -> Locked {
    let mode = if exclusive {
        pg_sys::LWLockMode::LW_EXCLUSIVE
    } else {
        pg_sys::LWLockMode::LW_SHARED
    };
    // SAFETY: `ready()` was checked by the caller; the tranche holds `LOCKS` locks.
    unsafe {
        let l = &raw mut (*(*HEADER).locks.add(which)).lock;
        fast_ffi::LWLockAcquire(l, mode);
        Locked(l)
    }
}

/// The entry's spinlock: counters of one entry are updated by one backend at a time, while the
/// table itself is only share-locked.
pub(super) struct Spin<'a>(&'a AtomicU32);

impl<'a> Spin<'a> {
    #[inline]
    pub(super) fn acquire(a: &'a AtomicU32) -> Spin<'a> {
        while a
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        Spin(a)
    }
}

impl Drop for Spin<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}
