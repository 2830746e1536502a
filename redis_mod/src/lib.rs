//! dbopt, the Redis 7.0 module (`MODULE LOAD /path/libdbopt_redis.so`).
//!
//! # Layout
//! - `lib.rs` (this file): the command table and module registration only.
//! - [`version`] — `DBOPT.VERSION`.
//!
//! Command table rows have the redis-module 2.0.8 shape `[name, handler, flags, first_key,
//! last_key, key_step, acl_categories]`. The ACL-categories field stays `""`: a non-empty value
//! makes MODULE LOAD fail on Redis 7.0 (that API arrived in 7.2).

use redis_module::redis_module;

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
    commands: [
        ["dbopt.version", version::version_command, "readonly fast", 0, 0, 0, ""],
    ],
}
