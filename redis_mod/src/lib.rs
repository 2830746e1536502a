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

#[cfg(not(test))]
macro_rules! dbopt_module {
    ($($body:tt)*) => {
        redis_module! {
            name: "dbopt",
            version: version::MODULE_VERSION,
            allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
            $($body)*
        }
    };
}

// Unit tests run outside Redis, where RedisAlloc has no allocator behind it: use the system one.
#[cfg(test)]
macro_rules! dbopt_module {
    ($($body:tt)*) => {
        redis_module! {
            name: "dbopt",
            version: version::MODULE_VERSION,
            allocator: (std::alloc::System, std::alloc::System),
            $($body)*
        }
    };
}

dbopt_module! {
    data_types: [],
    commands: [
        ["dbopt.version", version::version_command, "readonly fast", 0, 0, 0, ""],
    ],
}
