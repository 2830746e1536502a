//! The `[limits]` section of the router's configuration: sliding-window rate limits on statements.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Redis with the dbopt module (`host:port`) where windows are kept, shared by every router
    /// that uses it. Default: `cache.redis` (then one connection pool, and a cache lookup and a
    /// limit check share one round trip). None anywhere: windows are local to this router.
    pub redis: Option<String>,
    pub redis_user: Option<String>,
    pub redis_password: Option<String>,
    /// A Redis call slower than this counts as Redis being unreachable.
    pub redis_timeout_ms: u64,
    /// While Redis is unreachable: `local` windows in this router (each router enforcing
    /// `ceil(limit / routers)`), `open` (admit everything) or `closed` (refuse everything).
    pub on_redis_error: Fallback,
    /// How many routers share the limits; the local fallback divides each limit by it.
    pub routers: u32,
    /// `enforce` refuses statements over a limit; `warn` lets them through with a WARNING notice.
    /// A rule may override it.
    pub mode: Mode,
    /// The SQLCommenter key naming the application's end user in a statement comment
    /// (`/*dbopt_user='42'*/`).
    pub end_user_key: String,
    /// The session setting naming the end user when no comment does (`SET dbopt.end_user = '42'`).
    pub end_user_setting: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    #[default]
    Local,
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Warn,
}

/// What one window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One window per router user. A rule without `users` is the default for every user that no
    /// other `user` rule names; a rule with `users` overrides it for them.
    User,
    /// One window per (router user, end user). Defaults and overrides as for `user`. Statements
    /// that name no end user are not counted by it.
    EndUser,
    /// One window for every statement (of the `users` listed, if any).
    Global,
    /// One window per database (of `databases`, if listed).
    Database,
    /// One window per node the statement runs on (of `nodes`, if listed).
    Node,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Names the rule in errors, metrics and Redis keys (letters, digits, `_`, `-`, `.`).
    pub name: String,
    pub scope: Scope,
    /// Statements admitted per window.
    pub limit: u64,
    /// The sliding window, in milliseconds.
    pub window_ms: u64,
    /// Router users the rule applies to (empty: all).
    #[serde(default)]
    pub users: Vec<String>,
    /// Databases the rule applies to (empty: all).
    #[serde(default)]
    pub databases: Vec<String>,
    /// Nodes the rule applies to (empty: all; `node` scope only).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Overrides `limits.mode` for this rule.
    #[serde(default)]
    pub mode: Option<Mode>,
}

impl Rule {
    pub fn mode(&self, default: Mode) -> Mode {
        self.mode.unwrap_or(default)
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            redis: None,
            redis_user: None,
            redis_password: None,
            redis_timeout_ms: 100,
            on_redis_error: Fallback::Local,
            routers: 1,
            mode: Mode::Enforce,
            end_user_key: "dbopt_user".into(),
            end_user_setting: "dbopt.end_user".into(),
            rules: Vec::new(),
        }
    }
}

fn bad(field: String, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: Some(field),
        message: message.into(),
    }
}

/// Longest rule name.
pub const MAX_NAME: usize = 64;

impl LimitSettings {
    /// `users`, `databases`, `nodes`: what the rest of the configuration defines.
    pub fn validate(
        &self,
        users: &[&str],
        databases: &[String],
        nodes: &[&str],
    ) -> Result<(), ConfigError> {
        if let Some(r) = &self.redis {
            crate::config::check_host_port("limits.redis", r)?;
        }
        if !(5..=60_000).contains(&self.redis_timeout_ms) {
            return Err(bad("limits.redis_timeout_ms".into(), "must be 5..=60000"));
        }
        if !(1..=1000).contains(&self.routers) {
            return Err(bad("limits.routers".into(), "must be 1..=1000"));
        }
        let key_ok = |k: &str| {
            !k.is_empty()
                && k.len() <= 64
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !key_ok(&self.end_user_key) {
            return Err(bad(
                "limits.end_user_key".into(),
                "must be 1 to 64 letters, digits, '_' or '-'",
            ));
        }
        let setting_ok = self
            .end_user_setting
            .split_once('.')
            .is_some_and(|(a, b)| key_ok(a) && key_ok(b) && !a.contains('-') && !b.contains('-'));
        if !setting_ok {
            return Err(bad(
                "limits.end_user_setting".into(),
                "must be a custom setting name such as \"dbopt.end_user\"",
            ));
        }
        let mut names = HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let f = |k: &str| format!("limits.rules[{i}].{k}");
            let name_ok = !r.name.is_empty()
                && r.name.len() <= MAX_NAME
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !name_ok {
                return Err(bad(
                    f("name"),
                    format!("must be 1 to {MAX_NAME} letters, digits, '_', '-' or '.'"),
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(bad(f("name"), format!("{:?} is used twice", r.name)));
            }
            dbopt_ratelimit::validate(r.limit, r.window_ms, 1).map_err(|e| {
                let field = if matches!(e, dbopt_ratelimit::Error::Window(_)) {
                    "window_ms"
                } else {
                    "limit"
                };
                bad(f(field), e.to_string())
            })?;
            for u in &r.users {
                if !users.contains(&u.as_str()) {
                    return Err(bad(f("users"), format!("no user {u:?} is configured")));
                }
            }
            for d in &r.databases {
                if !databases.contains(d) {
                    return Err(bad(
                        f("databases"),
                        format!("{d:?} is not a database clients may use"),
                    ));
                }
            }
            if !r.nodes.is_empty() && r.scope != Scope::Node {
                return Err(bad(f("nodes"), "only a node-scoped rule lists nodes"));
            }
            for n in &r.nodes {
                if !nodes.contains(&n.as_str()) {
                    return Err(bad(f("nodes"), format!("no node {n:?} is configured")));
                }
            }
        }
        Ok(())
    }

    /// Whether windows are kept in Redis, and where.
    pub fn redis_address<'a>(&'a self, cache_redis: Option<&'a str>) -> Option<&'a str> {
        self.redis.as_deref().or(cache_redis)
    }
}
