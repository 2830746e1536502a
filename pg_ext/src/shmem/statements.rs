//! The statement table: a shared dynahash keyed by [`StatsKey`], one [`StatsEntry`] per
//! statement; found under the shared lock, created and evicted under the exclusive one.

use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};

use pgrx::pg_sys;

use super::layout::{Counters, StatsEntry, StatsKey, TEXT_MAX};
use super::locks::{lock, Spin, LOCK_STATEMENTS};
use super::{ready, HEADER, HTAB};
use crate::fast_ffi;

/// Every entry of the statement table, by dynahash's sequential scan.
pub(super) struct Entries {
    scan: pg_sys::HASH_SEQ_STATUS,
    done: bool,
}

impl Entries {
    /// # Safety
    /// The table must be attached, and not change during the scan: the statements lock held
    /// (shared to read, exclusive to remove what the scan returned), or no backend running.
    pub(super) unsafe fn new() -> Entries {
        // SAFETY: per the contract; the status only points at the table.
        unsafe {
            let mut scan: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
            pg_sys::hash_seq_init(&mut scan, HTAB);
            Entries { scan, done: false }
        }
    }
}

impl Iterator for Entries {
    type Item = *mut StatsEntry;

    fn next(&mut self) -> Option<*mut StatsEntry> {
        if self.done {
            return None;
        }
        // SAFETY: the scan was initialised on the attached table (see `new`).
        let e = unsafe { pg_sys::hash_seq_search(&mut self.scan) };
        if e.is_null() {
            // dynahash ended the scan itself.
            self.done = true;
            return None;
        }
        Some(e.cast())
    }
}

impl Drop for Entries {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: a scan left before its end must be deregistered.
            unsafe { pg_sys::hash_seq_term(&mut self.scan) };
        }
    }
}

/// # Safety
/// The statements lock must be held (shared is enough to find; exclusive to enter).
#[inline]
pub(super) unsafe fn search(
    key: &StatsKey,
    action: pg_sys::HASHACTION::Type,
) -> (*mut StatsEntry, bool) {
    let mut found = false;
    // SAFETY: HTAB is the table made at startup; the key is a plain byte blob.
    let e = unsafe { fast_ffi::hash_search(HTAB, ptr::from_ref(key).cast(), action, &mut found) };
    (e.cast::<StatsEntry>(), found)
}

/// Updates a statement's counters, creating its entry (with `text()`) when it is new.
pub fn update(key: &StatsKey, text: impl FnOnce() -> String, f: impl FnOnce(&mut Counters)) {
    if !ready() {
        return;
    }
    {
        let _l = lock(LOCK_STATEMENTS, false);
        // SAFETY: shared lock held; the entry cannot be removed while we hold it.
        let (e, found) = unsafe { search(key, pg_sys::HASHACTION::HASH_FIND) };
        if found && !e.is_null() {
            // SAFETY: entries live in shared memory for as long as the lock is held.
            let e = unsafe { &mut *e };
            let _s = Spin::acquire(&e.spin);
            f(&mut e.counters);
            return;
        }
    }
    // New statement: normalise its text before taking the lock exclusively.
    let text = text();
    let _l = lock(LOCK_STATEMENTS, true);
    // SAFETY: exclusive lock held.
    unsafe {
        if pg_sys::hash_get_num_entries(HTAB) as usize >= (*HEADER).max_statements {
            evict();
        }
        let (e, found) = search(key, pg_sys::HASHACTION::HASH_ENTER_NULL);
        if e.is_null() {
            return; // out of shared memory: drop this sample rather than fail the query
        }
        let e = &mut *e;
        if !found {
            e.spin = AtomicU32::new(0);
            e.counters = Counters {
                first_seen: pg_sys::GetCurrentTimestamp(),
                ..Counters::default()
            };
            let mut end = text.len().min(TEXT_MAX);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            e.text[..end].copy_from_slice(&text.as_bytes()[..end]);
            e.text_len = end as u32;
        }
        let _s = Spin::acquire(&e.spin);
        f(&mut e.counters);
    }
}

/// Updates an entry only if it exists (the error path, which has no text to create one with).
pub fn update_existing(key: &StatsKey, f: impl FnOnce(&mut Counters)) {
    if !ready() {
        return;
    }
    let _l = lock(LOCK_STATEMENTS, false);
    // SAFETY: shared lock held.
    unsafe {
        let (e, found) = search(key, pg_sys::HASHACTION::HASH_FIND);
        if found && !e.is_null() {
            let e = &mut *e;
            let _s = Spin::acquire(&e.spin);
            f(&mut e.counters);
        }
    }
}

/// Drops the least recently used 5% of the statements.
///
/// # Safety
/// The statements lock must be held exclusively.
unsafe fn evict() {
    // SAFETY: exclusive lock held by the caller; the scan sees a stable table.
    unsafe {
        let mut all: Vec<(i64, StatsKey)> = Entries::new()
            .map(|e| ((*e).counters.last_seen, (*e).key))
            .collect();
        all.sort_unstable_by_key(|(seen, _)| *seen);
        let n = (all.len() / 20).max(1);
        for (_, key) in all.iter().take(n) {
            search(key, pg_sys::HASHACTION::HASH_REMOVE);
        }
        (*HEADER).evictions.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A copy of one statement's entry.
pub struct Snapshot {
    pub key: StatsKey,
    pub counters: Counters,
    pub text: String,
}

/// Copies every entry (under the shared lock, each under its spinlock).
pub fn snapshot() -> Vec<Snapshot> {
    if !ready() {
        return Vec::new();
    }
    let _l = lock(LOCK_STATEMENTS, false);
    let mut out = Vec::new();
    // SAFETY: shared lock held for the whole scan.
    unsafe {
        for e in Entries::new() {
            let e = &*e;
            let counters = {
                let _s = Spin::acquire(&e.spin);
                e.counters
            };
            let len = (e.text_len as usize).min(TEXT_MAX);
            out.push(Snapshot {
                key: e.key,
                counters,
                text: String::from_utf8_lossy(&e.text[..len]).into_owned(),
            });
        }
    }
    out
}

/// The stored text of a statement, if tracked.
pub fn text_of(key: &StatsKey) -> Option<String> {
    if !ready() {
        return None;
    }
    let _l = lock(LOCK_STATEMENTS, false);
    // SAFETY: shared lock held.
    unsafe {
        let (e, found) = search(key, pg_sys::HASHACTION::HASH_FIND);
        (found && !e.is_null()).then(|| {
            let e = &*e;
            String::from_utf8_lossy(&e.text[..(e.text_len as usize).min(TEXT_MAX)]).into_owned()
        })
    }
}

/// Removes every statement entry; returns how many there were.
pub fn reset_statements() -> usize {
    if !ready() {
        return 0;
    }
    let _l = lock(LOCK_STATEMENTS, true);
    // SAFETY: exclusive lock held.
    unsafe {
        let keys: Vec<StatsKey> = Entries::new().map(|e| (*e).key).collect();
        for k in &keys {
            search(k, pg_sys::HASHACTION::HASH_REMOVE);
        }
        (*HEADER).evictions.store(0, Ordering::Relaxed);
        (*HEADER)
            .stats_reset
            .store(pg_sys::GetCurrentTimestamp(), Ordering::Relaxed);
        keys.len()
    }
}

/// Table fill, capacity, evictions, and when it was last reset.
pub fn table_info() -> (usize, usize, u64, i64) {
    if !ready() {
        return (0, 0, 0, 0);
    }
    let _l = lock(LOCK_STATEMENTS, false);
    // SAFETY: shared lock held; header fields are atomics or fixed at startup.
    unsafe {
        (
            pg_sys::hash_get_num_entries(HTAB) as usize,
            (*HEADER).max_statements,
            (*HEADER).evictions.load(Ordering::Relaxed),
            (*HEADER).stats_reset.load(Ordering::Relaxed),
        )
    }
}
