//! Shared memory: the statement table (a PostgreSQL shared hash table), the slow-query ring and the
//! N+1 event ring, each behind its own LWLock, sized from the `dbopt.*` settings at server start.
//!
//! Locking follows pg_stat_statements: counters of an existing entry are updated under the
//! *shared* table lock plus the entry's own spinlock, so executions never wait on each other for
//! long; only creating entries (once per new statement) and eviction (once per 5% of the table)
//! take the lock exclusively.

use std::ffi::CStr;
use std::ptr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use dbopt_querystats::histogram::Histogram;
use pgrx::pg_sys;

use crate::{fast_ffi, gucs};

/// Longest statement text kept per statement (bytes; longer texts are cut at a character boundary).
pub const TEXT_MAX: usize = 2048;
/// Longest EXPLAIN JSON kept per slow query (bytes; longer plans are replaced by a note).
pub const PLAN_MAX: usize = 16384;
/// Short strings (application name, client address).
pub const NAME_MAX: usize = 64;
/// N+1 events kept.
pub const N1_EVENTS: usize = 256;
/// Text kept per N+1 event, for the statement and its parent.
pub const N1_TEXT_MAX: usize = 1024;

const LOCK_STATEMENTS: usize = 0;
const LOCK_SLOW: usize = 1;
const LOCK_N1: usize = 2;
const LOCK_SAMPLES: usize = 3;
/// Plans sampled from the whole workload for index advice (one per statement, see
/// [`push_sample`]). Each slot is a SlowRecord (≈ 18.6 KB): 64 of them take ≈ 1.2 MB.
pub const PLAN_SAMPLES: usize = 64;
const TRANCHE: &CStr = c"dbopt";

/// Hash key of a statement: who ran it where, which statement, top-level or nested.
/// Compared as raw bytes (HASH_BLOBS), so padding is explicit and always zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StatsKey {
    pub userid: u32,
    pub dbid: u32,
    pub queryid: i64,
    pub toplevel: u8,
    pad: [u8; 7],
}

impl StatsKey {
    pub fn new(userid: u32, dbid: u32, queryid: i64, toplevel: bool) -> StatsKey {
        StatsKey {
            userid,
            dbid,
            queryid,
            toplevel: u8::from(toplevel),
            pad: [0; 7],
        }
    }
}

/// Everything counted for one statement.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub exec: Histogram,
    pub shared_blks_hit: i64,
    pub shared_blks_read: i64,
    pub shared_blks_dirtied: i64,
    pub shared_blks_written: i64,
    pub local_blks_hit: i64,
    pub local_blks_read: i64,
    pub local_blks_written: i64,
    pub temp_blks_read: i64,
    pub temp_blks_written: i64,
    pub wal_records: i64,
    pub wal_fpi: i64,
    pub wal_bytes: u64,
    /// TimestampTz of the first and the latest execution (or error).
    pub first_seen: i64,
    pub last_seen: i64,
}

/// One entry of the shared hash table; the key must come first (dynahash's layout).
#[repr(C)]
pub struct StatsEntry {
    pub key: StatsKey,
    spin: AtomicU32,
    pub counters: Counters,
    pub text_len: u32,
    pub text: [u8; TEXT_MAX],
}

/// One captured slow execution.
#[repr(C)]
pub struct SlowRecord {
    /// 0: empty slot.
    pub id: u64,
    pub at: i64,
    pub duration_ms: f64,
    pub userid: u32,
    pub dbid: u32,
    pub queryid: i64,
    pub rows: u64,
    pub shared_blks_hit: i64,
    pub shared_blks_read: i64,
    pub temp_blks_written: i64,
    pub analyzed: bool,
    pub app: ShortText<NAME_MAX>,
    pub client: ShortText<NAME_MAX>,
    pub text: ShortText<TEXT_MAX>,
    pub plan: ShortText<PLAN_MAX>,
}

/// One N+1 burst.
#[repr(C)]
pub struct N1Record {
    pub id: u64,
    pub at: i64,
    pub userid: u32,
    pub dbid: u32,
    pub queryid: i64,
    pub parent_queryid: i64,
    pub count: u32,
    pub first_ms: u64,
    pub last_ms: u64,
    pub app: ShortText<NAME_MAX>,
    pub text: ShortText<N1_TEXT_MAX>,
    pub parent_text: ShortText<N1_TEXT_MAX>,
}

/// A fixed-capacity UTF-8 string for shared memory.
#[repr(C)]
pub struct ShortText<const N: usize> {
    len: u32,
    bytes: [u8; N],
}

impl<const N: usize> ShortText<N> {
    /// Stores `s`, cut at the last character boundary that fits.
    pub fn set(&mut self, s: &str) {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        self.len = end as u32;
    }
    pub fn get(&self) -> String {
        String::from_utf8_lossy(&self.bytes[..(self.len as usize).min(N)]).into_owned()
    }
}

#[repr(C)]
struct Header {
    locks: *mut pg_sys::LWLockPadded,
    evictions: AtomicU64,
    stats_reset: AtomicI64,
    slow_next_id: AtomicU64,
    n1_next_id: AtomicU64,
    sample_next_id: AtomicU64,
    slow_cap: usize,
    max_statements: usize,
}

// Pointers into shared memory, set in every process by the startup hook (postmaster and backends
// inherit them by fork). Backends are single-threaded, so plain statics are not raced.
static mut HEADER: *mut Header = ptr::null_mut();
static mut HTAB: *mut pg_sys::HTAB = ptr::null_mut();
static mut SLOW: *mut SlowRecord = ptr::null_mut();
static mut N1: *mut N1Record = ptr::null_mut();
static mut SAMPLES: *mut SlowRecord = ptr::null_mut();

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
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 4);
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
            load_saved();
            if !pg_sys::IsUnderPostmaster {
                pg_sys::on_shmem_exit(Some(save_at_shutdown), pg_sys::Datum::from(0));
            }
        }
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Where statistics are kept across restarts (relative to the data directory, like
/// pg_stat_statements' file).
const SAVE_FILE: &str = "pg_stat/dbopt.stat";
/// Identifies the file format: magic, then the entry size it was written with.
const SAVE_MAGIC: &[u8; 8] = b"DBOPTST1";

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn save_at_shutdown(code: i32, _arg: pg_sys::Datum) {
    // A crash (non-zero code) must not overwrite the last good file with half-updated counters.
    if code != 0 {
        return;
    }
    if let Err(e) = save() {
        pgrx::log!("dbopt: could not save statement statistics to {SAVE_FILE}: {e}");
    }
}

/// Writes every entry (raw, fixed-size records) to a temporary file, then renames it into place.
fn save() -> std::io::Result<()> {
    use std::io::Write;
    if !ready() {
        return Ok(());
    }
    let tmp = format!("{SAVE_FILE}.tmp");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    out.write_all(SAVE_MAGIC)?;
    out.write_all(&(size_of::<StatsEntry>() as u64).to_le_bytes())?;
    // SAFETY: called in the postmaster at shutdown, after every backend has exited.
    unsafe {
        let mut scan: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
        pg_sys::hash_seq_init(&mut scan, HTAB);
        loop {
            let e = pg_sys::hash_seq_search(&mut scan).cast::<u8>();
            if e.is_null() {
                break;
            }
            out.write_all(std::slice::from_raw_parts(e, size_of::<StatsEntry>()))?;
        }
        out.write_all(&(*HEADER).evictions.load(Ordering::Relaxed).to_le_bytes())?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, SAVE_FILE)
}

/// Loads the file `save` wrote, if it exists and has this build's format; then removes it (as
/// pg_stat_statements does), so a later crash restarts from empty rather than from stale data.
///
/// # Safety
/// Only from the startup hook, before any backend exists.
unsafe fn load_saved() {
    let Ok(bytes) = std::fs::read(SAVE_FILE) else {
        return;
    };
    let _ = std::fs::remove_file(SAVE_FILE);
    let size = size_of::<StatsEntry>();
    let header = SAVE_MAGIC.len() + 8;
    // magic, entry size, entries, then the eviction count.
    let well_formed = bytes.len() >= header + 8
        && &bytes[..8] == SAVE_MAGIC
        && u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default()) == size as u64
        && (bytes.len() - header - 8).is_multiple_of(size);
    if !well_formed {
        pgrx::log!("dbopt: ignoring {SAVE_FILE}: not written by this version of dbopt");
        return;
    }
    let body = &bytes[header..bytes.len() - 8];
    let max = gucs::max_statements();
    let mut loaded = 0;
    // SAFETY: HTAB is attached; records are raw StatsEntry images written by `save`.
    unsafe {
        for rec in body.chunks_exact(size).take(max) {
            let mut key = StatsKey::default();
            ptr::copy_nonoverlapping(
                rec.as_ptr(),
                ptr::from_mut(&mut key).cast::<u8>(),
                size_of::<StatsKey>(),
            );
            let (e, found) = search(&key, pg_sys::HASHACTION::HASH_ENTER_NULL);
            if e.is_null() || found {
                continue;
            }
            ptr::copy_nonoverlapping(rec.as_ptr(), e.cast::<u8>(), size);
            (*e).spin = AtomicU32::new(0);
            (*e).text_len = (*e).text_len.min(TEXT_MAX as u32);
            loaded += 1;
        }
        let tail = &bytes[bytes.len() - 8..];
        (*HEADER).evictions.store(
            u64::from_le_bytes(tail.try_into().unwrap_or_default()),
            Ordering::Relaxed,
        );
    }
    pgrx::log!("dbopt: loaded statistics of {loaded} statements from {SAVE_FILE}");
}

/// Whether the shared memory exists (false when the library was not preloaded).
pub fn ready() -> bool {
    // SAFETY: a plain read of a pointer set once at startup.
    unsafe { !HEADER.is_null() && !HTAB.is_null() }
}

/// Holds one of dbopt's LWLocks; released on drop (also when a PostgreSQL error unwinds).
pub struct Locked(*mut pg_sys::LWLock);

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: the lock was acquired by `lock` in this process.
        unsafe { fast_ffi::LWLockRelease(self.0) };
    }
}

fn lock(which: usize, exclusive: bool) -> Locked {
    let mode = if exclusive {
        pg_sys::LWLockMode::LW_EXCLUSIVE
    } else {
        pg_sys::LWLockMode::LW_SHARED
    };
    // SAFETY: `ready()` was checked by the caller; the tranche holds three locks.
    unsafe {
        let l = &raw mut (*(*HEADER).locks.add(which)).lock;
        fast_ffi::LWLockAcquire(l, mode);
        Locked(l)
    }
}

/// The entry's spinlock: counters of one entry are updated by one backend at a time, while the
/// table itself is only share-locked.
struct Spin<'a>(&'a AtomicU32);

impl<'a> Spin<'a> {
    fn acquire(a: &'a AtomicU32) -> Spin<'a> {
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
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

/// # Safety
/// The statements lock must be held (shared is enough to find; exclusive to enter).
unsafe fn search(key: &StatsKey, action: pg_sys::HASHACTION::Type) -> (*mut StatsEntry, bool) {
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
        let mut all: Vec<(i64, StatsKey)> = Vec::new();
        let mut scan: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
        pg_sys::hash_seq_init(&mut scan, HTAB);
        loop {
            let e = pg_sys::hash_seq_search(&mut scan).cast::<StatsEntry>();
            if e.is_null() {
                break;
            }
            all.push(((*e).counters.last_seen, (*e).key));
        }
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
        let mut scan: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
        pg_sys::hash_seq_init(&mut scan, HTAB);
        loop {
            let e = pg_sys::hash_seq_search(&mut scan).cast::<StatsEntry>();
            if e.is_null() {
                break;
            }
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
        let mut keys = Vec::new();
        let mut scan: pg_sys::HASH_SEQ_STATUS = std::mem::zeroed();
        pg_sys::hash_seq_init(&mut scan, HTAB);
        loop {
            let e = pg_sys::hash_seq_search(&mut scan).cast::<StatsEntry>();
            if e.is_null() {
                break;
            }
            keys.push((*e).key);
        }
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

/// A record kept in one of the shared rings; id 0 marks an empty slot.
pub trait Record {
    fn id(&self) -> u64;
    fn set_id(&mut self, id: u64);
}

impl Record for SlowRecord {
    fn id(&self) -> u64 {
        self.id
    }
    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

impl Record for N1Record {
    fn id(&self) -> u64 {
        self.id
    }
    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

/// One shared ring: its slots, their number, its id counter and the lock that guards it.
/// Record `id` lives in slot `id % cap`; ids only grow, so a slot's id tells whether it still
/// holds a given record.
struct Ring<T: 'static> {
    slots: *mut T,
    cap: usize,
    next_id: &'static AtomicU64,
    lock: usize,
}

fn slow_ring() -> Option<Ring<SlowRecord>> {
    // SAFETY: pointers set at startup; the header lives for the whole server life.
    ready().then(|| unsafe {
        Ring {
            slots: SLOW,
            cap: (*HEADER).slow_cap,
            next_id: &(*HEADER).slow_next_id,
            lock: LOCK_SLOW,
        }
    })
}

fn n1_ring() -> Option<Ring<N1Record>> {
    // SAFETY: as for `slow_ring`.
    ready().then(|| unsafe {
        Ring {
            slots: N1,
            cap: N1_EVENTS,
            next_id: &(*HEADER).n1_next_id,
            lock: LOCK_N1,
        }
    })
}

fn sample_ring() -> Option<Ring<SlowRecord>> {
    // SAFETY: as for `slow_ring`.
    ready().then(|| unsafe {
        Ring {
            slots: SAMPLES,
            cap: PLAN_SAMPLES,
            next_id: &(*HEADER).sample_next_id,
            lock: LOCK_SAMPLES,
        }
    })
}

impl<T: Record> Ring<T> {
    /// Writes a new record over the oldest slot; returns its id.
    fn push(&self, fill: impl FnOnce(&mut T)) -> u64 {
        let _l = lock(self.lock, true);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        // SAFETY: exclusive ring lock held; the index is below the ring's capacity.
        let slot = unsafe { &mut *self.slots.add((id as usize) % self.cap) };
        fill(slot);
        slot.set_id(id);
        id
    }

    /// Changes record `id` if the ring still holds it.
    fn update(&self, id: u64, f: impl FnOnce(&mut T)) {
        let _l = lock(self.lock, true);
        // SAFETY: exclusive ring lock held.
        let slot = unsafe { &mut *self.slots.add((id as usize) % self.cap) };
        if slot.id() == id {
            f(slot);
        }
    }

    /// Every record, newest first.
    fn each(&self, mut f: impl FnMut(&T)) {
        let _l = lock(self.lock, false);
        // SAFETY: shared ring lock held; slots are only written under the exclusive lock.
        unsafe {
            let mut ids: Vec<(u64, usize)> = (0..self.cap)
                .filter_map(|i| {
                    let id = (*self.slots.add(i)).id();
                    (id != 0).then_some((id, i))
                })
                .collect();
            ids.sort_unstable_by_key(|(id, _)| std::cmp::Reverse(*id));
            for (_, i) in ids {
                f(&*self.slots.add(i));
            }
        }
    }

    /// Empties the ring; returns how many records it held.
    fn reset(&self) -> usize {
        let _l = lock(self.lock, true);
        let mut n = 0;
        for i in 0..self.cap {
            // SAFETY: exclusive ring lock held.
            let r = unsafe { &mut *self.slots.add(i) };
            if r.id() != 0 {
                n += 1;
                r.set_id(0);
            }
        }
        n
    }
}

/// Keeps a slow execution (overwriting the oldest); `fill` sets its fields.
pub fn push_slow(fill: impl FnOnce(&mut SlowRecord)) {
    if let Some(r) = slow_ring() {
        r.push(fill);
    }
}

/// Every slow-query record, newest first.
pub fn each_slow(f: impl FnMut(&SlowRecord)) {
    if let Some(r) = slow_ring() {
        r.each(f);
    }
}

/// Slow queries captured since start (including those the ring no longer holds).
pub fn slow_total() -> u64 {
    slow_ring().map_or(0, |r| r.next_id.load(Ordering::Relaxed))
}

pub fn reset_slow() -> usize {
    slow_ring().map_or(0, |r| r.reset())
}

/// Keeps a sampled plan: over the slot of the same statement if the ring holds one (a hot statement
/// must not push every other one out), else over the oldest.
pub fn push_sample(key: &StatsKey, fill: impl FnOnce(&mut SlowRecord)) {
    let Some(ring) = sample_ring() else { return };
    let _l = lock(ring.lock, true);
    // SAFETY: exclusive ring lock held; indexes below the capacity.
    unsafe {
        let same = (0..ring.cap).find(|&i| {
            let r = &*ring.slots.add(i);
            r.id != 0 && r.queryid == key.queryid && r.userid == key.userid && r.dbid == key.dbid
        });
        let id = ring.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = &mut *ring.slots.add(same.unwrap_or((id as usize) % ring.cap));
        fill(slot);
        slot.id = id;
    }
}

/// Every sampled plan, newest first.
pub fn each_sample(f: impl FnMut(&SlowRecord)) {
    if let Some(r) = sample_ring() {
        r.each(f);
    }
}

/// Keeps an N+1 event; returns its id (to update its count later).
pub fn push_n1(fill: impl FnOnce(&mut N1Record)) -> u64 {
    n1_ring().map_or(0, |r| r.push(fill))
}

/// Updates event `id` if the ring still holds it.
pub fn update_n1(id: u64, f: impl FnOnce(&mut N1Record)) {
    if let Some(r) = n1_ring().filter(|_| id != 0) {
        r.update(id, f);
    }
}

/// Every N+1 event, newest first.
pub fn each_n1(f: impl FnMut(&N1Record)) {
    if let Some(r) = n1_ring() {
        r.each(f);
    }
}

pub fn n1_total() -> u64 {
    n1_ring().map_or(0, |r| r.next_id.load(Ordering::Relaxed))
}

pub fn reset_n1() {
    if let Some(r) = n1_ring() {
        r.reset();
    }
}
