//! dbopt, the Redis 7.0 module (`MODULE LOAD /path/libdbopt_redis.so`): sliding-window rate limits
//! and tag-indexed cache entries with safe invalidation.
//!
//! # Layout
//! - `lib.rs` (this file): the command table and module registration only.
//! - [`ratelimit`] — `DBOPT.RL.HIT` / `HITALL` / `LEASE` / `PEEK` / `RESET` over `dbopt-ratelimit`.
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
use redis_module::{
    redis_module, Context, InfoContext, NotifyEvent, RedisError, RedisResult, RedisString,
};
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

/// A command handler as the command table takes it.
type Handler = fn(&Context, Vec<RedisString>) -> RedisResult;

/// Wraps a handler so that a panic becomes an `ERR` reply and a warning in the Redis log instead of
/// unwinding into Redis, which would abort the server. Handlers are written not to panic (the fuzz
/// test checks); this is the net under them.
fn guarded(handler: Handler) -> impl Fn(&Context, Vec<RedisString>) -> RedisResult {
    move |ctx, args| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(ctx, args)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                ctx.log_warning(&format!(
                    "dbopt: internal error in a command handler: {what}"
                ));
                Err(RedisError::String(format!(
                    "ERR dbopt internal error: {what}"
                )))
            })
    }
}

redis_module! {
    name: "dbopt",
    version: version::MODULE_VERSION,
    allocator: (ModuleAlloc, MODULE_ALLOC),
    data_types: [],
    info: dbopt_info,
    commands: [
        ["dbopt.version", guarded(version::version_command), "readonly fast", 0, 0, 0, ""],
        ["dbopt.stats", guarded(stats::stats_command), "readonly fast", 0, 0, 0, ""],
        ["dbopt.rl.hit", guarded(ratelimit::hit), "write deny-oom fast", 1, 1, 1, ""],
        ["dbopt.rl.peek", guarded(ratelimit::peek), "readonly fast", 1, 1, 1, ""],
        ["dbopt.rl.hitall", guarded(ratelimit::hit_all), "write deny-oom fast", 2, -1, 3, ""],
        ["dbopt.rl.lease", guarded(ratelimit::lease), "write deny-oom fast", 3, -1, 3, ""],
        ["dbopt.rl.reset", guarded(ratelimit::reset), "write fast", 1, 1, 1, ""],
        ["dbopt.cache.set", guarded(cache::set), "write deny-oom getkeys-api", 1, 1, 1, ""],
        ["dbopt.cache.get", guarded(cache::get), "readonly fast", 1, 1, 1, ""],
        ["dbopt.cache.del", guarded(cache::del), "write", 1, -1, 1, ""],
        ["dbopt.cache.invalidate", guarded(cache::invalidate_match), "write", 0, 0, 0, ""],
        ["dbopt.tag.token", guarded(tags::token_command), "write deny-oom", 1, -1, 1, ""],
        ["dbopt.tag.invalidate", guarded(tags::invalidate_command), "write", 1, -1, 1, ""],
    ],
    event_handlers: [
        [@EXPIRED @EVICTED: stats::on_key_gone],
    ],
}
