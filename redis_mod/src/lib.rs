//! dbopt, the Redis 7.0 module (`MODULE LOAD /path/libdbopt_redis.so`): sliding-window rate limits
//! and tag-indexed cache entries with safe invalidation.
//!
//! # Layout
//! - `lib.rs` (this file): the command table and module registration only.
//! - [`ratelimit`] — `DBOPT.RL.HIT` / `PEEK` / `RESET` over `dbopt-ratelimit`.
//! - [`cache`] — `DBOPT.CACHE.SET` / `GET` / `DEL` / `INVALIDATE`; [`tags`] — `DBOPT.TAG.TOKEN` /
//!   `INVALIDATE`; both over `dbopt-tagcache`.
//! - [`store`] — the only place keys are written: each write replicates its *effect*.
//! - [`stats`] — counters, `DBOPT.STATS`, the `INFO dbopt` section.
//! - [`args`] — argument parsing with precise `ERR` messages; [`version`] — `DBOPT.VERSION`.
//!
//! Command table rows have the redis-module 2.0.8 shape `[name, handler, flags, first_key,
//! last_key, key_step, acl_categories]`. The ACL-categories field stays `""`: a non-empty value
//! makes MODULE LOAD fail on Redis 7.0 (that API arrived in 7.2).
//!
//! Handlers return `Result`s; nothing a client sends reaches an `unwrap` (a panic would kill Redis).

// The names below are used by code the `redis_module!` macro expands to.
#[allow(unused_imports)]
use redis_module::{redis_module, InfoContext, NotifyEvent, RedisResult};
use stats::info as dbopt_info;

pub mod args;
pub mod cache;
pub mod ratelimit;
pub mod stats;
pub mod store;
pub mod tags;
pub mod version;

/// Inside Redis every allocation goes through Redis (so `INFO memory` and `maxmemory` see it);
/// unit tests run outside Redis, where `RedisAlloc` has nothing behind it, so they use the system one.
#[cfg(not(test))]
type ModuleAlloc = redis_module::alloc::RedisAlloc;
#[cfg(test)]
type ModuleAlloc = std::alloc::System;
#[cfg(not(test))]
const MODULE_ALLOC: ModuleAlloc = redis_module::alloc::RedisAlloc;
#[cfg(test)]
const MODULE_ALLOC: ModuleAlloc = std::alloc::System;

redis_module! {
    name: "dbopt",
    version: version::MODULE_VERSION,
    allocator: (ModuleAlloc, MODULE_ALLOC),
    data_types: [],
    info: dbopt_info,
    commands: [
        ["dbopt.version", version::version_command, "readonly fast", 0, 0, 0, ""],
        ["dbopt.stats", stats::stats_command, "readonly fast", 0, 0, 0, ""],
        ["dbopt.rl.hit", ratelimit::hit, "write deny-oom fast", 1, 1, 1, ""],
        ["dbopt.rl.peek", ratelimit::peek, "readonly fast", 1, 1, 1, ""],
        ["dbopt.rl.reset", ratelimit::reset, "write fast", 1, 1, 1, ""],
        ["dbopt.cache.set", cache::set, "write deny-oom getkeys-api", 1, 1, 1, ""],
        ["dbopt.cache.get", cache::get, "readonly fast", 1, 1, 1, ""],
        ["dbopt.cache.del", cache::del, "write", 1, -1, 1, ""],
        ["dbopt.cache.invalidate", cache::invalidate_match, "write", 0, 0, 0, ""],
        ["dbopt.tag.token", tags::token_command, "write deny-oom", 1, -1, 1, ""],
        ["dbopt.tag.invalidate", tags::invalidate_command, "write", 1, -1, 1, ""],
    ],
    event_handlers: [
        [@EXPIRED @EVICTED: stats::on_key_gone],
    ],
}
