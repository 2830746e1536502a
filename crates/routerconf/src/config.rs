//! Router configuration: TOML → typed structs → [`Config::validate`].
//!
//! Unknown keys are errors (a typo must not silently fall back to a default). Every default below is
//! the documented one; `dbopt-router --check-config` prints the effective configuration.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Databases clients may connect to (an allow-list; any other name is refused with 3D000
    /// before a server is contacted). Empty: only `server.database`. Must come before the first
    /// `[table]` of the file, as TOML wants for top-level keys.
    #[serde(default)]
    pub databases: Vec<String>,
    /// Where clients connect, and the admin HTTP endpoint.
    pub listen: Listen,
    /// Pool sizes and timeouts, for every pool unless a user overrides the mode.
    #[serde(default)]
    pub pool: PoolSettings,
    /// How nodes are checked.
    #[serde(default)]
    pub health: HealthSettings,
    /// Per-node circuit breaker.
    #[serde(default)]
    pub breaker: BreakerSettings,
    /// How the router logs in to PostgreSQL nodes.
    pub server: ServerLogin,
    /// The PostgreSQL nodes (roles are discovered, not configured).
    pub nodes: Vec<Node>,
    /// Client users the router accepts.
    pub users: Vec<User>,
    /// The result cache.
    #[serde(default)]
    pub cache: crate::cache::CacheSettings,
    /// Rate limits on statements.
    #[serde(default)]
    pub limits: crate::limits::LimitSettings,
    /// Alerts through channels (webhook, Slack, SMTP, log, NOTIFY + history table).
    #[serde(default)]
    pub alerts: crate::alerts::AlertSettings,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// PostgreSQL protocol listener, e.g. `"127.0.0.1:6432"`.
    pub address: String,
    /// HTTP listener for `/metrics` and `/status`; none when absent.
    #[serde(default)]
    pub admin_address: Option<String>,
    /// Most client connections accepted at once.
    #[serde(default = "defaults::max_clients")]
    pub max_clients: u32,
    /// A connection must finish its startup and authentication within this many milliseconds.
    #[serde(default = "defaults::handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Most connections still in their startup/authentication at once; a newer one displaces
    /// the one starting up longest. Kept apart from `max_clients`, so half-open sockets cannot
    /// lock authenticated clients out.
    #[serde(default = "defaults::max_handshakes")]
    pub max_handshakes: u32,
    /// TLS for clients; none when absent (SSLRequest is then answered `N`).
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Bearer token the admin endpoint's POST requests (cache invalidation) must present
    /// (`Authorization: Bearer …`); without one they are refused.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// When set, GET requests (`/metrics`, `/status`) must present this bearer token (or
    /// `admin_token`); without it they are open to whoever reaches `admin_address`.
    #[serde(default)]
    pub admin_read_token: Option<String>,
}

/// Client TLS: PEM files, read at start.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificate chain (PEM), leaf first.
    pub cert_file: String,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// Refuse clients that do not ask for TLS (28000), except on loopback when false.
    #[serde(default)]
    pub required: bool,
}

/// Pooling mode: a server connection per transaction (default) or per client session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    #[default]
    Transaction,
    Session,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    pub mode: PoolMode,
    /// Connections opened at start and kept open, per pool.
    pub min_size: u32,
    /// Most connections per pool.
    pub max_size: u32,
    /// Primary connections reserved for statements flagged `/* dbopt:critical */`.
    pub critical_reserve: u32,
    /// Idle connections above `min_size` are closed after this many seconds.
    pub idle_timeout_s: u64,
    /// A client waits at most this long for a connection, then gets SQLSTATE 53300.
    pub wait_timeout_ms: u64,
    /// Most clients waiting per pool; more are refused at once with 53300.
    pub max_waiting: u32,
    /// A warning is logged (rate-limited) when a pool is busier than this.
    pub warn_utilisation_percent: u8,
    /// A client idle inside a transaction this long is disconnected (25P03), its transaction
    /// rolled back and its server connection returned. 0: never.
    pub idle_in_transaction_timeout_s: u64,
    /// A client idle outside a transaction this long is disconnected (57P05). 0: never.
    pub client_idle_timeout_s: u64,
    /// Whose writes a read must see: the client connection's own, those of every connection of
    /// the same router user (an application's pool), or none (reads may lag writes).
    pub read_your_writes: ReadYourWrites,
    /// How reads are shared among the usable replicas: `spread` (smooth weighted round-robin
    /// on each replica's effective weight) or `pack` (the replica with the highest effective
    /// weight takes the reads until it has `pack_in_flight` running, then the next one — for
    /// replicas that share a host's cores, where spreading costs throughput).
    pub read_balance: ReadBalance,
    /// `pack`: reads running on a replica before the next one gets any (1..=10000).
    pub pack_in_flight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadBalance {
    #[default]
    Spread,
    Pack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadYourWrites {
    Connection,
    #[default]
    User,
    Off,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// Full check of every node (`dbopt.node_status()`: role, lag, CPU) every this many seconds.
    pub interval_s: u64,
    pub timeout_ms: u64,
    /// Light poll of every node's role and WAL position (read-your-writes, fast role changes).
    pub lsn_poll_ms: u64,
    /// Replicas further behind than this get no reads.
    pub max_replica_lag_s: f64,
    /// A replica at or above this CPU % gets a reduced weight.
    pub cpu_high_percent: f64,
    /// Ask a node's Patroni (`nodes[].patroni`) to re-clone a replica that has not streamed for
    /// `reclone_after_s` and needs WAL the primary no longer keeps (it could never catch up).
    pub reclone_lost_replicas: bool,
    pub reclone_after_s: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Open when more than this share of attempts failed in the window (0 < ratio < 1).
    pub failure_ratio: f64,
    pub window_s: u64,
    /// Fewer attempts than this in the window never open the breaker.
    pub min_attempts: u32,
    /// After this long open, one trial connection is let through.
    pub open_s: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerLogin {
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default = "defaults::database")]
    pub database: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Relative read capacity for weighted balancing.
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// The node's Patroni REST API (`http://host:8008`), for `health.reclone_lost_replicas`.
    #[serde(default)]
    pub patroni: Option<String>,
}

/// How a client user proves who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    #[default]
    ScramSha256,
    Md5,
    /// No password at all; only when the config says so, never by default.
    Trust,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    #[serde(default)]
    pub auth: AuthMethod,
    /// Clear-text password (required unless `auth = "trust"`).
    #[serde(default)]
    pub password: Option<String>,
    /// Overrides `pool.mode` for this user.
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// Every statement of this user uses the critical pool.
    #[serde(default)]
    pub critical: bool,
    /// The PostgreSQL role this user's work runs as (default: the user's own name). Pools are
    /// per role, so no client runs with another's privileges.
    #[serde(default)]
    pub server_user: Option<String>,
    /// Password of `server_user` (default: the user's own password).
    #[serde(default)]
    pub server_password: Option<String>,
    /// A trusted operator: may run as a superuser role, and is never refused by `[limits]` (its
    /// statements are counted as bypassed). Without it the router refuses a server login that
    /// turns out to be a superuser, and `--check-config` refuses a superuser name it can see.
    #[serde(default)]
    pub admin: bool,
}

impl User {
    /// The PostgreSQL role this user's work runs as.
    pub fn server_role(&self) -> &str {
        self.server_user.as_deref().unwrap_or(&self.name)
    }

    /// The password the router gives PostgreSQL for [`User::server_role`].
    pub fn server_secret(&self) -> Option<&str> {
        self.server_password.as_deref().or(self.password.as_deref())
    }
}

mod defaults {
    pub fn max_clients() -> u32 {
        1000
    }
    pub fn handshake_timeout_ms() -> u64 {
        5000
    }
    pub fn max_handshakes() -> u32 {
        64
    }
    pub fn database() -> String {
        "postgres".into()
    }
    pub fn weight() -> u32 {
        1
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            mode: PoolMode::Transaction,
            min_size: 10,
            max_size: 50,
            critical_reserve: 5,
            idle_timeout_s: 300,
            wait_timeout_ms: 5000,
            max_waiting: 1000,
            warn_utilisation_percent: 80,
            idle_in_transaction_timeout_s: 60,
            client_idle_timeout_s: 0,
            read_your_writes: ReadYourWrites::User,
            read_balance: ReadBalance::Spread,
            pack_in_flight: 4,
        }
    }
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval_s: 10,
            timeout_ms: 2000,
            lsn_poll_ms: 100,
            max_replica_lag_s: 5.0,
            cpu_high_percent: 80.0,
            reclone_lost_replicas: false,
            reclone_after_s: 60,
        }
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_ratio: 0.5,
            window_s: 60,
            min_attempts: 20,
            open_s: 30,
        }
    }
}

/// A configuration that could not be read, parsed or validated. `field` is the dotted path
/// (`nodes[1].port`) of the value at fault when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

fn bad(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: Some(field.into()),
        message: message.into(),
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Config::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            field: None,
            // toml's message names the key and shows the line, e.g. "unknown field `sise`".
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value a type cannot express; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_addr("listen.address", &self.listen.address)?;
        if let Some(a) = &self.listen.admin_address {
            check_addr("listen.admin_address", a)?;
            if *a == self.listen.address {
                return Err(bad(
                    "listen.admin_address",
                    "must differ from listen.address",
                ));
            }
        }
        if self.listen.max_clients == 0 {
            return Err(bad("listen.max_clients", "must be at least 1"));
        }
        if self.listen.max_handshakes == 0 {
            return Err(bad("listen.max_handshakes", "must be at least 1"));
        }
        if !(100..=60_000).contains(&self.listen.handshake_timeout_ms) {
            return Err(bad("listen.handshake_timeout_ms", "must be in 100..=60000"));
        }
        for (field, token) in [
            ("listen.admin_token", &self.listen.admin_token),
            ("listen.admin_read_token", &self.listen.admin_read_token),
        ] {
            if token.as_deref().is_some_and(|t| t.len() < 16) {
                return Err(bad(field, "must be at least 16 characters"));
            }
        }
        if let Some(t) = &self.listen.tls {
            if t.cert_file.is_empty() {
                return Err(bad("listen.tls.cert_file", "must not be empty"));
            }
            if t.key_file.is_empty() {
                return Err(bad("listen.tls.key_file", "must not be empty"));
            }
        }
        let mut dbs = HashSet::new();
        for (i, d) in self.databases.iter().enumerate() {
            if d.is_empty() || d.len() > 63 {
                return Err(bad(format!("databases[{i}]"), "must be 1 to 63 bytes"));
            }
            if !dbs.insert(d.as_str()) {
                return Err(bad(
                    format!("databases[{i}]"),
                    format!("{d:?} is listed twice"),
                ));
            }
        }

        let p = &self.pool;
        if p.max_size == 0 {
            return Err(bad("pool.max_size", "must be at least 1"));
        }
        if p.min_size > p.max_size {
            return Err(bad(
                "pool.min_size",
                format!("{} exceeds pool.max_size {}", p.min_size, p.max_size),
            ));
        }
        if p.critical_reserve >= p.max_size {
            return Err(bad(
                "pool.critical_reserve",
                format!(
                    "{} leaves no connection of pool.max_size {} for other traffic",
                    p.critical_reserve, p.max_size
                ),
            ));
        }
        if p.wait_timeout_ms == 0 {
            return Err(bad("pool.wait_timeout_ms", "must be at least 1"));
        }
        if !(1..=100).contains(&p.warn_utilisation_percent) {
            return Err(bad("pool.warn_utilisation_percent", "must be in 1..=100"));
        }
        if !(1..=10_000).contains(&p.pack_in_flight) {
            return Err(bad("pool.pack_in_flight", "must be in 1..=10000"));
        }

        let h = &self.health;
        if h.interval_s == 0 {
            return Err(bad("health.interval_s", "must be at least 1"));
        }
        if h.timeout_ms == 0 || h.timeout_ms > h.interval_s.saturating_mul(1000) {
            return Err(bad(
                "health.timeout_ms",
                "must be between 1 and health.interval_s * 1000",
            ));
        }
        if h.lsn_poll_ms < 10 || h.lsn_poll_ms > h.interval_s.saturating_mul(1000) {
            return Err(bad(
                "health.lsn_poll_ms",
                "must be between 10 and health.interval_s * 1000",
            ));
        }
        if !(h.max_replica_lag_s.is_finite() && h.max_replica_lag_s >= 0.0) {
            return Err(bad(
                "health.max_replica_lag_s",
                "must be a finite number >= 0",
            ));
        }
        if !(h.cpu_high_percent > 0.0 && h.cpu_high_percent <= 100.0) {
            return Err(bad("health.cpu_high_percent", "must be in (0, 100]"));
        }
        if !(5..=86_400).contains(&h.reclone_after_s) {
            return Err(bad(
                "health.reclone_after_s",
                format!("must be between 5 and 86400, got {}", h.reclone_after_s),
            ));
        }
        if h.reclone_lost_replicas && self.nodes.iter().all(|n| n.patroni.is_none()) {
            return Err(bad(
                "health.reclone_lost_replicas",
                "needs the nodes' Patroni REST API: set nodes[].patroni",
            ));
        }

        let b = &self.breaker;
        if !(b.failure_ratio > 0.0 && b.failure_ratio < 1.0) {
            return Err(bad(
                "breaker.failure_ratio",
                "must be strictly between 0 and 1",
            ));
        }
        if b.window_s == 0 {
            return Err(bad("breaker.window_s", "must be at least 1"));
        }
        if b.min_attempts == 0 {
            return Err(bad("breaker.min_attempts", "must be at least 1"));
        }
        if b.open_s == 0 {
            return Err(bad("breaker.open_s", "must be at least 1"));
        }

        if self.server.user.is_empty() {
            return Err(bad("server.user", "must not be empty"));
        }
        if self.server.database.is_empty() {
            return Err(bad("server.database", "must not be empty"));
        }

        if self.nodes.is_empty() {
            return Err(bad("nodes", "at least one [[nodes]] entry is required"));
        }
        let mut names = HashSet::new();
        let mut endpoints = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.name.is_empty() {
                return Err(bad(format!("nodes[{i}].name"), "must not be empty"));
            }
            if !names.insert(n.name.as_str()) {
                return Err(bad(
                    format!("nodes[{i}].name"),
                    format!("duplicate node name {:?}", n.name),
                ));
            }
            if n.host.is_empty() {
                return Err(bad(format!("nodes[{i}].host"), "must not be empty"));
            }
            if n.port == 0 {
                return Err(bad(format!("nodes[{i}].port"), "must be in 1..=65535"));
            }
            if !endpoints.insert((n.host.as_str(), n.port)) {
                return Err(bad(
                    format!("nodes[{i}]"),
                    format!("{}:{} is listed twice", n.host, n.port),
                ));
            }
            if n.weight == 0 {
                return Err(bad(
                    format!("nodes[{i}].weight"),
                    "must be at least 1 (remove the node instead)",
                ));
            }
            if let Some(p) = &n.patroni {
                crate::url::Target::parse(p).map_err(|m| bad(format!("nodes[{i}].patroni"), m))?;
            }
        }

        if self.users.is_empty() {
            return Err(bad("users", "at least one [[users]] entry is required"));
        }
        let mut user_names = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() {
                return Err(bad(format!("users[{i}].name"), "must not be empty"));
            }
            if !user_names.insert(u.name.as_str()) {
                return Err(bad(
                    format!("users[{i}].name"),
                    format!("duplicate user {:?}", u.name),
                ));
            }
            match (u.auth, &u.password) {
                (AuthMethod::Trust, Some(_)) => {
                    return Err(bad(
                        format!("users[{i}].password"),
                        "is not used with auth = \"trust\"; remove it",
                    ))
                }
                (AuthMethod::ScramSha256 | AuthMethod::Md5, None) => {
                    return Err(bad(
                        format!("users[{i}].password"),
                        "is required unless auth = \"trust\"",
                    ))
                }
                (_, Some(p)) if p.is_empty() => {
                    return Err(bad(format!("users[{i}].password"), "must not be empty"))
                }
                _ => {}
            }
            if u.server_user.as_deref() == Some("") {
                return Err(bad(format!("users[{i}].server_user"), "must not be empty"));
            }
            if !u.admin && u.server_role() == SUPERUSER {
                return Err(bad(
                    format!("users[{i}].server_user"),
                    format!(
                        "user {:?} would run as the superuser {SUPERUSER:?}: map it to a \
                         least-privileged role, or set admin = true",
                        u.name
                    ),
                ));
            }
        }
        let users: Vec<&str> = self.users.iter().map(|u| u.name.as_str()).collect();
        let databases = self.allowed_databases();
        self.cache.validate(&users, &databases)?;
        let nodes: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        self.limits.validate(&users, &databases, &nodes)?;
        self.alerts.validate()?;
        Ok(())
    }

    /// The databases clients may use (the allow-list, or `server.database` alone).
    pub fn allowed_databases(&self) -> Vec<String> {
        if self.databases.is_empty() {
            vec![self.server.database.clone()]
        } else {
            self.databases.clone()
        }
    }

    /// The configuration as the router applies it, for `--check-config`: defaults written out,
    /// and the databases clients may use listed (an empty allow-list means `server.database`).
    pub fn effective(&self) -> Config {
        Config {
            databases: self.allowed_databases(),
            ..self.clone()
        }
    }
}

/// The superuser every cluster has; no non-admin user may be mapped onto it. Other superusers
/// are caught by `--check-config` (it asks the nodes) and at login (`is_superuser`).
pub const SUPERUSER: &str = "postgres";

/// A `host:port` (a name or an address, and a port number), such as a Redis server's.
pub fn check_host_port(field: &str, value: &str) -> Result<(), ConfigError> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(bad(field, "must be host:port")),
    }
}

fn check_addr(field: &str, value: &str) -> Result<(), ConfigError> {
    value.parse::<SocketAddr>().map(|_| ()).map_err(|_| {
        bad(
            field,
            format!("{value:?} is not an IP:port address such as \"127.0.0.1:6432\""),
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [listen]
        address = "127.0.0.1:6432"
        admin_address = "127.0.0.1:9930"

        [server]
        user = "postgres"
        password = "secret"

        [[nodes]]
        name = "node0"
        host = "127.0.0.1"
        port = 25400

        [[nodes]]
        name = "node1"
        host = "127.0.0.1"
        port = 25401
        weight = 2

        [[users]]
        name = "app"
        password = "app-secret"
    "#;

    fn with(extra: &str) -> String {
        format!("{GOOD}\n{extra}")
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.pool, PoolSettings::default());
        assert_eq!(
            (c.pool.min_size, c.pool.max_size, c.pool.idle_timeout_s),
            (10, 50, 300)
        );
        assert_eq!(c.health.interval_s, 10);
        assert_eq!(c.health.max_replica_lag_s, 5.0);
        assert_eq!(
            (
                c.breaker.failure_ratio,
                c.breaker.window_s,
                c.breaker.open_s
            ),
            (0.5, 60, 30)
        );
        assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
        assert_eq!(c.nodes[0].weight, 1);
        assert_eq!(c.server.database, "postgres");
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = Config::parse(&with("[pool]\nmax_sise = 3")).expect_err("typo");
        assert!(e.message.contains("max_sise"), "{e}");
        let e = Config::parse(&GOOD.replace("weight = 2", "wieght = 2")).expect_err("typo");
        assert!(e.message.contains("wieght"), "{e}");
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases: &[(&str, &str)] = &[
            ("[pool]\nmin_size = 60", "pool.min_size"),
            ("[pool]\nmax_size = 0", "pool.max_size"),
            ("[pool]\ncritical_reserve = 50", "pool.critical_reserve"),
            (
                "[pool]\nwarn_utilisation_percent = 0",
                "pool.warn_utilisation_percent",
            ),
            ("[pool]\npack_in_flight = 0", "pool.pack_in_flight"),
            ("[health]\ninterval_s = 0", "health.interval_s"),
            ("[health]\ntimeout_ms = 20000", "health.timeout_ms"),
            (
                "[health]\nmax_replica_lag_s = -1.0",
                "health.max_replica_lag_s",
            ),
            (
                "[health]\ncpu_high_percent = 120.0",
                "health.cpu_high_percent",
            ),
            ("[health]\nreclone_after_s = 1", "health.reclone_after_s"),
            (
                "[health]\nreclone_lost_replicas = true",
                "health.reclone_lost_replicas",
            ),
            (
                "[[nodes]]\nname = \"p\"\nhost = \"h\"\nport = 1\npatroni = \"h:8008\"",
                "nodes[2].patroni",
            ),
            ("[breaker]\nfailure_ratio = 1.0", "breaker.failure_ratio"),
            ("[breaker]\nmin_attempts = 0", "breaker.min_attempts"),
            (
                "[[users]]\nname = \"app\"\npassword = \"x\"",
                "users[1].name",
            ),
            ("[[users]]\nname = \"b\"", "users[1].password"),
            (
                "[[users]]\nname = \"t\"\nauth = \"trust\"\npassword = \"x\"",
                "users[1].password",
            ),
            (
                "[[nodes]]\nname = \"node0\"\nhost = \"h\"\nport = 1",
                "nodes[2].name",
            ),
            (
                "[[nodes]]\nname = \"n\"\nhost = \"127.0.0.1\"\nport = 25400",
                "nodes[2]",
            ),
            (
                "[[nodes]]\nname = \"n\"\nhost = \"h\"\nport = 0",
                "nodes[2].port",
            ),
            (
                "[[nodes]]\nname = \"n\"\nhost = \"h\"\nport = 5\nweight = 0",
                "nodes[2].weight",
            ),
            (
                "[[users]]\nname = \"b\"\npassword = \"x\"\nserver_user = \"postgres\"",
                "users[1].server_user",
            ),
            (
                "[[users]]\nname = \"postgres\"\npassword = \"x\"",
                "users[1].server_user",
            ),
            (
                "[[users]]\nname = \"b\"\npassword = \"x\"\nserver_user = \"\"",
                "users[1].server_user",
            ),
            (
                "[listen.tls]\ncert_file = \"\"\nkey_file = \"k\"",
                "listen.tls.cert_file",
            ),
        ];
        for (extra, field) in cases {
            let e = Config::parse(&with(extra)).expect_err(extra);
            assert_eq!(e.field.as_deref(), Some(*field), "{extra}: {e}");
        }
        let e = Config::parse(&GOOD.replace("127.0.0.1:6432", "localhost")).expect_err("addr");
        assert_eq!(e.field.as_deref(), Some("listen.address"));
        let e = Config::parse(&GOOD.replace("127.0.0.1:9930", "127.0.0.1:6432")).expect_err("same");
        assert_eq!(e.field.as_deref(), Some("listen.admin_address"));
        let short = GOOD.replace(
            "admin_address = \"127.0.0.1:9930\"",
            "admin_address = \"127.0.0.1:9930\"\nadmin_read_token = \"short\"",
        );
        let e = Config::parse(&short).expect_err("short token");
        assert_eq!(e.field.as_deref(), Some("listen.admin_read_token"));
    }

    #[test]
    fn out_of_range_numbers_are_parse_errors() {
        let e = Config::parse(&GOOD.replace("port = 25400", "port = 70000")).expect_err("port");
        assert!(e.to_string().contains("port"), "{e}");
        let e = Config::parse(&with("[pool]\nmax_size = -1")).expect_err("negative");
        assert!(e.to_string().contains("max_size"), "{e}");
    }

    #[test]
    fn users_run_as_their_own_role_unless_mapped() {
        let c = Config::parse(&with(
            "[[users]]\nname = \"dba\"\npassword = \"x\"\nserver_user = \"postgres\"\n\
             server_password = \"y\"\nadmin = true",
        ))
        .expect("an admin may be a superuser");
        assert_eq!(
            (c.users[0].server_role(), c.users[0].server_secret()),
            ("app", Some("app-secret"))
        );
        assert_eq!(
            (c.users[1].server_role(), c.users[1].server_secret()),
            ("postgres", Some("y"))
        );
        assert_eq!(c.allowed_databases(), vec!["postgres".to_string()]);
        let c =
            Config::parse(&format!("databases = [\"app\", \"reports\"]\n{GOOD}")).expect("list");
        assert_eq!(
            c.allowed_databases(),
            vec!["app".to_string(), "reports".to_string()]
        );
        let e = Config::parse(&format!("databases = [\"app\", \"app\"]\n{GOOD}")).expect_err("dup");
        assert_eq!(e.field.as_deref(), Some("databases[1]"));
        // The effective configuration prints (top-level keys before tables) and names the
        // databases actually allowed, also when the file leaves the list empty.
        assert!(toml::to_string_pretty(&c.effective()).is_ok());
        let implicit = Config::parse(GOOD).expect("good");
        let printed = toml::to_string_pretty(&implicit.effective()).expect("prints");
        assert!(printed.contains("databases = [\"postgres\"]"), "{printed}");
        assert_eq!(
            Config::parse(&printed)
                .expect("reads back")
                .allowed_databases(),
            implicit.allowed_databases()
        );
    }

    #[test]
    fn trust_is_only_explicit() {
        let c = Config::parse(&with("[[users]]\nname = \"t\"\nauth = \"trust\"")).expect("trust");
        assert_eq!(c.users[1].auth, AuthMethod::Trust);
        let e = Config::parse(&with("[[users]]\nname = \"t\"\nauth = \"none\""))
            .expect_err("unknown auth");
        assert!(e.message.contains("none"), "{e}");
    }

    #[test]
    fn missing_sections_are_reported() {
        let e = Config::parse("[listen]\naddress = \"127.0.0.1:1\"").expect_err("no server");
        assert!(e.message.contains("server"), "{e}");
        // Top-level keys must come before the first table header.
        let head = GOOD.split("[[nodes]]").next().unwrap_or_default();
        let text = format!("nodes = []\n{head}\n[[users]]\nname = \"a\"\npassword = \"b\"");
        let e = Config::parse(&text).expect_err("no nodes");
        assert_eq!(e.field.as_deref(), Some("nodes"), "{e}");
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let c = Config::parse(include_str!("../../../router/dbopt-router.example.toml"))
            .expect("example");
        assert_eq!(c.limits.rules[0].name, "per-user");
    }

    #[test]
    fn limit_rules_are_checked() {
        let rule = |extra: &str| {
            format!(
                "{GOOD}\n[[limits.rules]]\nname = \"r\"\nscope = \"user\"\nlimit = 5\nwindow_ms = 1000\n{extra}"
            )
        };
        let c = Config::parse(&rule("")).expect("a rule");
        assert_eq!(c.limits.rules[0].limit, 5);
        assert_eq!(c.limits.end_user_setting, "dbopt.end_user");
        let cases: &[(&str, &str)] = &[
            ("users = [\"nobody\"]", "limits.rules[0].users"),
            ("databases = [\"other\"]", "limits.rules[0].databases"),
            ("nodes = [\"node0\"]", "limits.rules[0].nodes"),
            (
                "[[limits.rules]]\nname = \"r\"\nscope = \"global\"\nlimit = 1\nwindow_ms = 1",
                "limits.rules[1].name",
            ),
            (
                "[[limits.rules]]\nname = \"bad name\"\nscope = \"global\"\nlimit = 1\nwindow_ms = 1",
                "limits.rules[1].name",
            ),
            (
                "[[limits.rules]]\nname = \"z\"\nscope = \"global\"\nlimit = 0\nwindow_ms = 1",
                "limits.rules[1].limit",
            ),
            (
                "[[limits.rules]]\nname = \"z\"\nscope = \"node\"\nlimit = 1\nwindow_ms = 0",
                "limits.rules[1].window_ms",
            ),
            (
                "[[limits.rules]]\nname = \"z\"\nscope = \"node\"\nlimit = 1\nwindow_ms = 5\nnodes = [\"nodeX\"]",
                "limits.rules[1].nodes",
            ),
        ];
        for (extra, field) in cases {
            let e = Config::parse(&rule(extra)).expect_err(extra);
            assert_eq!(e.field.as_deref(), Some(*field), "{extra}: {e}");
        }
        let limits = |extra: &str| format!("[limits]\n{extra}\n{GOOD}");
        for (extra, field) in [
            ("routers = 0", "limits.routers"),
            ("redis = \"nowhere\"", "limits.redis"),
            ("redis_timeout_ms = 1", "limits.redis_timeout_ms"),
            ("end_user_key = \"a b\"", "limits.end_user_key"),
            ("end_user_setting = \"nodot\"", "limits.end_user_setting"),
        ] {
            // [limits] must come after the top-level keys; GOOD has none.
            let e = Config::parse(&limits(extra)).expect_err(extra);
            assert_eq!(e.field.as_deref(), Some(field), "{extra}: {e}");
        }
        let e = Config::parse(&rule("scope = \"planet\"")).expect_err("scope");
        assert!(
            e.message.contains("scope") || e.message.contains("planet"),
            "{e}"
        );
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let e = Config::load(Path::new("/nonexistent/dbopt-router.toml")).expect_err("missing");
        assert!(e.message.contains("/nonexistent/dbopt-router.toml"), "{e}");
    }
}
