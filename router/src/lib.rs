//! dbopt-router: a PostgreSQL wire-protocol router.
//!
//! # Layout
//! - [`config`] — the TOML configuration, typed, with `deny_unknown_fields` and a `validate()` whose
//!   messages name the offending field. Everything else receives a validated [`config::Config`].
//! - `main.rs`: the command line (`--help`, `--version`, `--check-config`).

pub mod config;
