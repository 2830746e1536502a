//! Query observability logic with no PostgreSQL in sight, used by the `dbopt` extension.
//!
//! # Layout
//! - [`normalize`] — SQL text with literals replaced by `$n`, the form statistics are shown in.
//! - [`histogram`] — fixed-bucket latency histogram (constant size, for shared memory) with
//!   quantiles, plus running mean/stddev.
//! - [`advice`] — missing-index advice from plans: filters to index columns, coverage checks.
//! - [`advisor`] — the advisor's policy over a [`advisor::Catalog`] the extension implements:
//!   candidates, selectivity cut-off, merging, range order, hypothetical checks, ranking, reasons.
//! - [`exposition`] — Prometheus text format for `dbopt.metrics()`.
//! - [`nplusone`] — the per-connection N+1 detector state machine (time is an input).

pub mod advice;
pub mod advisor;
pub mod exposition;
pub mod histogram;
pub mod normalize;
pub mod nplusone;
#[cfg(test)]
mod test_rng;
