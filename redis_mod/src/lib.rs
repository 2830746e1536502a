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
//! - [`key_names`] — tag key names kept between calls (no string made per tag per hit).
//! - [`dispatch`] — the commands' entry point: arguments borrowed, panics turned into `ERR`.
//!
//! Command table rows are `[name, handler, flags, first_key, last_key, key_step]`
//! (`RedisModule_CreateCommand`'s; no ACL categories: that API arrived in Redis 7.2).
//!
//! Handlers return `Result`s; nothing a client sends reaches an `unwrap` (a panic would kill Redis).

// The names below are used by code the `redis_module!` macro expands to.
#[allow(unused_imports)]
use redis_module::{
    redis_module, Context, InfoContext, NotifyEvent, RedisError, RedisResult, RedisString, Status,
};
use stats::info as dbopt_info;

pub mod args;
pub mod cache;
pub mod dispatch;
pub mod key_names;
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

// Commands are registered by `register` (below) rather than the macro's command list: their entry
// functions borrow the arguments instead of copying them (see `dispatch`).
redis_module! {
    name: "dbopt",
    version: version::MODULE_VERSION,
    allocator: (ModuleAlloc, MODULE_ALLOC),
    data_types: [],
    init: init,
    deinit: deinit,
    info: dbopt_info,
    commands: [],
    event_handlers: [
        [@EXPIRED @EVICTED: stats::on_key_gone],
    ],
}

fn init(ctx: &Context, _args: &[RedisString]) -> Status {
    register(ctx)
}

fn deinit(_ctx: &Context) -> Status {
    key_names::clear();
    store::release_words();
    Status::Ok
}

command_table! {
    [c"dbopt.version", version::version_command, c"readonly fast", 0, 0, 0],
    [c"dbopt.stats", stats::stats_command, c"readonly fast", 0, 0, 0],
    [c"dbopt.rl.hit", ratelimit::hit, c"write deny-oom fast", 1, 1, 1],
    [c"dbopt.rl.peek", ratelimit::peek, c"readonly fast", 1, 1, 1],
    [c"dbopt.rl.hitall", ratelimit::hit_all, c"write deny-oom fast", 2, -1, 3],
    [c"dbopt.rl.lease", ratelimit::lease, c"write deny-oom fast", 3, -1, 3],
    [c"dbopt.rl.reset", ratelimit::reset, c"write fast", 1, 1, 1],
    [c"dbopt.cache.set", cache::set, c"write deny-oom getkeys-api", 1, 1, 1],
    [c"dbopt.cache.get", cache::get, c"readonly fast", 1, 1, 1],
    [c"dbopt.cache.del", cache::del, c"write", 1, -1, 1],
    [c"dbopt.cache.invalidate", cache::invalidate_match, c"write", 0, 0, 0],
    [c"dbopt.tag.token", tags::token_command, c"write deny-oom", 1, -1, 1],
    [c"dbopt.tag.invalidate", tags::invalidate_command, c"write", 1, -1, 1],
}
