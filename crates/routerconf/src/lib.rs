//! dbopt-router's configuration: what the TOML file may say, its defaults, and the one
//! `validate()` that names the field at fault ([`ConfigError`]). Plain data, no I/O beyond reading
//! the file: the router and the tools that write router configurations (`dbopt-stackconf`) both
//! use it, and neither needs the other.
//!
//! # Layout
//! - [`config`] — the file ([`Config`]): listener, pools, health, breaker, server login, nodes,
//!   users, and the sections below; re-exported at the crate root.
//! - [`cache`] — `[cache]`: the result cache (Redis, layers, rules, warm statements).
//! - [`limits`] — `[limits]`: rate-limit rules and what happens when Redis fails.
//! - [`alerts`] — `[alerts]`: channels, rules, and the alert kinds.
//! - [`url`] — `http(s)://` targets (webhooks, Patroni's REST API), checked when the file is read.

pub mod alerts;
pub mod cache;
pub mod config;
pub mod limits;
pub mod url;

pub use config::*;
