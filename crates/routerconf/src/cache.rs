//! The `[cache]` section of the router's configuration.

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Off: nothing is cached and `dbopt:cache` hints are ignored.
    pub enabled: bool,
    /// Redis with the dbopt module (`host:port`), the shared layer. Absent: in-process layer only.
    pub redis: Option<String>,
    pub redis_user: Option<String>,
    pub redis_password: Option<String>,
    /// A Redis call slower than this counts as a failure (the cache is bypassed meanwhile).
    pub redis_timeout_ms: u64,
    /// Bytes the in-process layer may hold (replies plus bookkeeping).
    pub local_max_bytes: u64,
    /// Replies larger than this are not cached.
    pub max_entry_bytes: u64,
    /// TTL of an entry whose hint or rule names none.
    pub default_ttl_s: u64,
    /// Longest TTL a hint may ask for.
    pub max_ttl_s: u64,
    /// How long a writer's COMMIT waits for its invalidation to be done before the router gives
    /// up, acknowledges, and bypasses the cache of that database until it has resynchronised.
    pub invalidation_timeout_ms: u64,
    /// Statements cached without a hint: by table read or by statement fingerprint.
    pub rules: Vec<CacheRule>,
    /// Statements filled at start, after a failover or reconnection, and after their invalidation.
    pub warm: Vec<WarmStatement>,
    /// Most refills (warming, write-through beyond the first few) per second, so they never
    /// compete with clients for more than this.
    pub warm_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// `schema.table`: cache every cacheable statement that reads this table.
    #[serde(default)]
    pub table: Option<String>,
    /// A statement fingerprint: the 16 hex digits of libpg_query's fingerprint (pg_query, pganalyze).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// TTL of entries cached by this rule (default: `default_ttl_s`).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// Write-through: when a commit changes what an entry of this rule read, the router fills it
    /// again with the committed data before it acknowledges a write made through it (and soon
    /// after, for writes made elsewhere), so the next read is a hit and current.
    #[serde(default)]
    pub write_through: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WarmStatement {
    /// The router user whose server role runs it.
    pub user: String,
    pub database: String,
    /// A cacheable statement without parameters (simple protocol).
    pub sql: String,
    /// Session settings of the clients that should find it (those in the cache key, e.g.
    /// `client_encoding`, `DateStyle`, `search_path`); default: `client_encoding = "UTF8"`.
    #[serde(default = "default_warm_settings")]
    pub settings: std::collections::BTreeMap<String, String>,
}

fn default_warm_settings() -> std::collections::BTreeMap<String, String> {
    [("client_encoding".to_string(), "UTF8".to_string())].into()
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            enabled: false,
            redis: None,
            redis_user: None,
            redis_password: None,
            redis_timeout_ms: 200,
            local_max_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
            default_ttl_s: 60,
            max_ttl_s: 86_400,
            invalidation_timeout_ms: 1000,
            rules: Vec::new(),
            warm: Vec::new(),
            warm_per_second: 50,
        }
    }
}

fn bad(field: String, message: &str) -> ConfigError {
    ConfigError {
        field: Some(field),
        message: message.to_string(),
    }
}

impl CacheSettings {
    /// `users`: the configured router users; `databases`: the allow-list (empty: any).
    pub fn validate(&self, users: &[&str], databases: &[String]) -> Result<(), ConfigError> {
        if let Some(r) = &self.redis {
            crate::config::check_host_port("cache.redis", r)?;
        }
        if !(10..=60_000).contains(&self.redis_timeout_ms) {
            return Err(bad("cache.redis_timeout_ms".into(), "must be 10..=60000"));
        }
        if self.max_entry_bytes == 0 || self.max_entry_bytes > self.local_max_bytes.max(1 << 20) {
            return Err(bad(
                "cache.max_entry_bytes".into(),
                "must be > 0 and at most local_max_bytes",
            ));
        }
        if self.default_ttl_s == 0 || self.default_ttl_s > self.max_ttl_s {
            return Err(bad(
                "cache.default_ttl_s".into(),
                "must be > 0 and at most max_ttl_s",
            ));
        }
        if self.max_ttl_s > 365 * 86_400 {
            return Err(bad("cache.max_ttl_s".into(), "at most a year"));
        }
        if !(10..=60_000).contains(&self.invalidation_timeout_ms) {
            return Err(bad(
                "cache.invalidation_timeout_ms".into(),
                "must be 10..=60000",
            ));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let f = |k: &str| format!("cache.rules[{i}].{k}");
            match (&r.table, &r.fingerprint) {
                (Some(t), None)
                    if t.split('.').count() == 2 && !t.contains(char::is_whitespace) => {}
                (Some(_), None) => return Err(bad(f("table"), "must be schema.table")),
                (None, Some(fp)) if fp.len() == 16 && fp.chars().all(|c| c.is_ascii_hexdigit()) => {
                }
                (None, Some(_)) => return Err(bad(f("fingerprint"), "must be 16 hex digits")),
                _ => {
                    return Err(bad(
                        format!("cache.rules[{i}]"),
                        "needs exactly one of table or fingerprint",
                    ))
                }
            }
            if r.ttl_s.is_some_and(|t| t == 0 || t > self.max_ttl_s) {
                return Err(bad(f("ttl_s"), "must be > 0 and at most max_ttl_s"));
            }
        }
        for (i, w) in self.warm.iter().enumerate() {
            if !users.contains(&w.user.as_str()) {
                return Err(bad(format!("cache.warm[{i}].user"), "no such user"));
            }
            if !databases.is_empty() && !databases.contains(&w.database) {
                return Err(bad(
                    format!("cache.warm[{i}].database"),
                    "not in the databases allow-list",
                ));
            }
            if w.sql.trim().is_empty() {
                return Err(bad(format!("cache.warm[{i}].sql"), "is empty"));
            }
        }
        if self.warm_per_second == 0 || self.warm_per_second > 10_000 {
            return Err(bad("cache.warm_per_second".into(), "must be 1..=10000"));
        }
        Ok(())
    }
}
