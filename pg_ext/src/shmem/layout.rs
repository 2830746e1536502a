//! The records as they lie in shared memory (`#[repr(C)]`, fixed sizes) and their limits.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64};

use dbopt_querystats::histogram::Histogram;
use pgrx::pg_sys;

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

/// Plans sampled from the whole workload for index advice (one per statement, see
/// [`push_sample`]). Each slot is a SlowRecord (≈ 18.6 KB): 64 of them take ≈ 1.2 MB.
pub const PLAN_SAMPLES: usize = 64;
/// Hash key of a statement: who ran it where, which statement, top-level or nested.
/// Compared as raw bytes (HASH_BLOBS), so padding is explicit and always zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StatsKey {
    pub userid: u32,
    pub dbid: u32,
    pub queryid: i64,
    pub toplevel: u8,
    pub(super) pad: [u8; 7],
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
    pub(super) spin: AtomicU32,
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

/// The fixed part: the locks, counters and ids every process shares.
#[repr(C)]
pub(super) struct Header {
    pub(super) locks: *mut pg_sys::LWLockPadded,
    pub(super) evictions: AtomicU64,
    pub(super) stats_reset: AtomicI64,
    pub(super) slow_next_id: AtomicU64,
    pub(super) n1_next_id: AtomicU64,
    pub(super) sample_next_id: AtomicU64,
    pub(super) slow_cap: usize,
    pub(super) max_statements: usize,
}
