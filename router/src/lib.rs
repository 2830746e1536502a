//! dbopt-router: a PostgreSQL wire-protocol router.
//!
//! # Layout
//! - [`config`] — the TOML configuration, typed, with `deny_unknown_fields` and a `validate()` whose
//!   messages name the offending field (re-exported from `dbopt-routerconf`, which the tools that
//!   write router configurations use without linking the router). Everything else receives a
//!   validated [`config::Config`].
//! - [`locks`] — the one way the router takes a lock (a poisoned one is taken as it is).
//! - [`sqlstate`] — the SQLSTATEs the router sends or acts on, by PostgreSQL's names.
//! - [`protocol`] — framing and the messages the router reads or writes (pure, fuzzed).
//! - [`auth`] — SCRAM-SHA-256 and md5, the server side (clients authenticate to the router).
//! - [`classify`] — read/write classification with PostgreSQL's parser, and routing hints.
//! - [`cache`] — the two-layer result cache and its invalidation feed (see its docs for the
//!   consistency promise).
//! - [`limits`] — rate limits on statements (sliding windows shared through the Redis module);
//!   [`rate_limited`] is the session's side.
//! - [`isolation`] — what one client leaves in a server session never reaches another (pure).
//! - [`startup`] — a session's startup packet, TLS, authentication and login checks.
//! - [`tls`] — the TLS acceptor and the client stream.
//! - [`translate`] — client messages rewritten for a server connection, replies owed in order
//!   (prepared statements shared across connections; pure, unit-tested).
//! - `main.rs`: the command line (`--help`, `--version`, `--check-config`).

pub mod admin;
pub mod alerts;
pub mod auth;
pub mod balance;
pub mod breaker;
pub mod cache;
pub mod cached_reads;
pub mod classify;
pub mod config;
pub mod dashboard;
pub mod handshake;
pub mod isolation;
pub mod limits;
pub mod locks;
pub mod log;
pub mod monitor;
pub mod pool;
pub mod pools;
pub mod protocol;
pub mod rate_limited;
pub mod relay;
pub mod resync;
pub mod route;
pub mod run;
pub mod server;
pub mod session;
pub mod shared;
pub mod spare;
pub mod sqlstate;
pub mod startup;
pub mod tls;
pub mod topology;
pub mod translate;
