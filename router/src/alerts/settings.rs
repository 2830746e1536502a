//! Re-exported from `dbopt-routerconf` (the configuration lives in its own crate, which
//! `dbopt-stackconf` uses without linking the router): the router keeps its paths.

pub use dbopt_routerconf::alerts::*;
