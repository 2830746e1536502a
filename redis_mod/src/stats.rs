//! Counters of the module: `DBOPT.STATS` (flat name/value array) and the `INFO dbopt` section.
//!
//! Commands run on Redis's main thread; atomics make the statics `Sync` without a lock, and
//! `Relaxed` is enough because each counter is independent.

use std::sync::atomic::{AtomicU64, Ordering};

use redis_module::{
    Context, InfoContext, NotifyEvent, RedisError, RedisResult, RedisString, RedisValue,
};

/// One counter: its name in `DBOPT.STATS` and `INFO`, and its value.
pub struct Counter {
    pub name: &'static str,
    value: AtomicU64,
}

impl Counter {
    const fn new(name: &'static str) -> Counter {
        Counter {
            name,
            value: AtomicU64::new(0),
        }
    }
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }
    pub fn incr(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

pub static CACHE_HITS: Counter = Counter::new("cache_hits");
pub static CACHE_MISSES: Counter = Counter::new("cache_misses");
pub static CACHE_SETS: Counter = Counter::new("cache_sets");
/// Fills refused because a tag changed since their token (the stale-fill race, prevented).
pub static CACHE_FILLS_REFUSED: Counter = Counter::new("cache_fills_refused");
/// Entries found on GET under an outdated or missing tag generation (served as misses).
pub static CACHE_STALE_SKIPPED: Counter = Counter::new("cache_stale_entries_skipped");
/// Entries deleted by `DBOPT.CACHE.DEL` and `DBOPT.CACHE.INVALIDATE … MATCH`.
pub static CACHE_ENTRIES_DELETED: Counter = Counter::new("cache_entries_deleted");
/// Tags invalidated (tag keys dropped) by `DBOPT.TAG.INVALIDATE`.
pub static TAG_INVALIDATIONS: Counter = Counter::new("tag_invalidations");
pub static RL_ALLOWED: Counter = Counter::new("ratelimit_allowed");
pub static RL_DENIED: Counter = Counter::new("ratelimit_denied");
/// Keyspace-wide `expired` / `evicted` events seen by the module (all keys, not only dbopt's:
/// Redis 7.0 reports them after the key is gone, so its kind cannot be told any more).
pub static KEYS_EXPIRED_SEEN: Counter = Counter::new("keys_expired_seen");
pub static KEYS_EVICTED_SEEN: Counter = Counter::new("keys_evicted_seen");

pub static ALL: [&Counter; 11] = [
    &CACHE_HITS,
    &CACHE_MISSES,
    &CACHE_SETS,
    &CACHE_FILLS_REFUSED,
    &CACHE_STALE_SKIPPED,
    &CACHE_ENTRIES_DELETED,
    &TAG_INVALIDATIONS,
    &RL_ALLOWED,
    &RL_DENIED,
    &KEYS_EXPIRED_SEEN,
    &KEYS_EVICTED_SEEN,
];

/// `DBOPT.STATS` → `[name, value, name, value, …]`.
pub fn stats_command(_ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() != 1 {
        return Err(RedisError::WrongArity);
    }
    let mut out = Vec::with_capacity(ALL.len() * 2);
    for c in ALL {
        out.push(RedisValue::SimpleString(c.name.to_string()));
        out.push(RedisValue::Integer(
            i64::try_from(c.get()).unwrap_or(i64::MAX),
        ));
    }
    Ok(RedisValue::Array(out))
}

/// `INFO dbopt` (also part of `INFO modules`/`INFO everything`).
pub fn info(ctx: &InfoContext, _for_crash_report: bool) {
    // Shown as `# dbopt_stats`; `INFO dbopt` lists every section of the module.
    let mut section = ctx.builder().add_section("stats");
    for c in ALL {
        section = match section.field(c.name, c.get().to_string()) {
            Ok(s) => s,
            Err(_) => return,
        };
    }
    if let Ok(done) = section.build_section() {
        let _ = done.build_info();
    }
}

/// Keyspace notification handler for `expired` and `evicted`.
pub fn on_key_gone(_ctx: &Context, event_type: NotifyEvent, _event: &str, _key: &[u8]) {
    if event_type.contains(NotifyEvent::EVICTED) {
        KEYS_EVICTED_SEEN.incr();
    } else {
        KEYS_EXPIRED_SEEN.incr();
    }
}
