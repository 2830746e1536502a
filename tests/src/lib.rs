//! End-to-end harness for dbopt: throwaway stacks on ports and in directories of their own.
//!
//! # Layout
//! - [`stack`] — [`stack::Stack`] starts the full local stack (etcd, Patroni + 4 PostgreSQL nodes,
//!   Redis with the module) through `scripts/stack` — the same script users run, so the tests exercise
//!   the real set-up — hands out connections, and tears everything down on drop, panics included.
//! - [`plain`] — [`plain::PlainPostgres`], a bare PostgreSQL 15 instance for cases the HA stack cannot
//!   show (e.g. loading dbopt *without* `shared_preload_libraries`).
//! - [`redis_server`] — [`redis_server::RedisServer`], a bare `redis-server` with the module (for
//!   replication, persistence, eviction and fuzz tests of the module alone).
//! - [`migrations`] — helpers of the dbopt-migrate tests.
//! - [`http`] — a minimal HTTP/1.0 GET for Patroni's REST API (no client library needed).
//!
//! The harness never builds anything: `scripts/test` builds and installs the extension and the
//! module first (a build from inside `cargo test` would wait forever on cargo's own lock).

pub mod http;
pub mod migrations;
pub mod plain;
pub mod receivers;
pub mod redis_server;
pub mod stack;

use std::time::{Duration, Instant};

/// Polls `f` every 250 ms until it returns `Some`, or panics with `what` after `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A port for this run's end-to-end servers: `DBOPT_E2E_PORT_BASE` (default 26400) + `offset`.
pub fn e2e_port(offset: u16) -> u16 {
    std::env::var("DBOPT_E2E_PORT_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(26400)
        + offset
}

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}
