//! State shared by every task of a running router: configuration (swapped on SIGHUP), client
//! credentials, topology, pools, counters and the cancel-key registry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use rustc_hash::FxHashMap;

use crate::auth::ScramVerifier;
use crate::classify::{classify, Class, FunctionCatalog};
use crate::config::{AuthMethod, Config, PoolMode};
use crate::pool::PoolLimits;
use crate::pools::{Login, Pools};
use crate::topology::Topology;

/// A configured client user, with its SCRAM verifier derived once.
#[derive(Debug, Clone)]
pub struct UserAuth {
    pub method: AuthMethod,
    pub password: Option<String>,
    pub scram: Option<ScramVerifier>,
    pub pool_mode: PoolMode,
    pub critical: bool,
    /// How this user's work logs in to PostgreSQL.
    pub login: Login,
}

pub fn users_of(config: &Config) -> HashMap<String, UserAuth> {
    config
        .users
        .iter()
        .map(|u| {
            let scram = match (u.auth, &u.password) {
                (AuthMethod::ScramSha256, Some(p)) => Some(ScramVerifier::with_random_salt(p)),
                _ => None,
            };
            (
                u.name.clone(),
                UserAuth {
                    method: u.auth,
                    password: u.password.clone(),
                    scram,
                    pool_mode: u.pool_mode.unwrap_or(config.pool.mode),
                    critical: u.critical,
                    login: Login {
                        role: u.server_role().to_string(),
                        password: u.server_secret().map(str::to_string),
                        admin: u.admin,
                    },
                },
            )
        })
        .collect()
}

/// Where a client's current server backend is, for its CancelRequest.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: std::sync::Arc<str>,
    pub pid: i32,
    pub secret: i32,
}

/// Counters for /metrics.
#[derive(Default)]
pub struct Counters {
    pub clients_total: AtomicU64,
    pub clients_active: AtomicU64,
    pub routed_replica: AtomicU64,
    pub routed_primary: AtomicU64,
    pub routed_critical: AtomicU64,
    pub routed_primary_fallback: AtomicU64,
    pub read_retries: AtomicU64,
    pub auth_failures: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub acquire_errors: AtomicU64,
    pub server_errors: AtomicU64,
    pub cancels: AtomicU64,
    /// Authenticated sessions now (what `listen.max_clients` limits).
    pub sessions: AtomicU64,
    /// Connections still starting up that a newer one displaced (`listen.max_handshakes`).
    pub handshake_evictions: AtomicU64,
    /// Clients disconnected by the idle or idle-in-transaction timeout.
    pub idle_timeouts: AtomicU64,
    /// Round trips that brought a connection's settings to its client's.
    pub settings_syncs: AtomicU64,
    /// Session checks after statements that may have changed the session.
    pub session_checks: AtomicU64,
    /// Read-backs of the settings a plain SET/RESET changed (no full check needed).
    pub settings_read_backs: AtomicU64,
    /// Times a client got pinned to its connection.
    pub pins: AtomicU64,
    /// Re-clones of lost replicas Patroni accepted (`health.reclone_lost_replicas`).
    pub reclones: AtomicU64,
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Shared {
    config: RwLock<Arc<Config>>,
    users: RwLock<Arc<HashMap<String, UserAuth>>>,
    topology: Mutex<Topology>,
    /// The topology's clock origin (fixed at start).
    started: std::time::Instant,
    /// How many nodes the topology has (the node list is fixed until a restart).
    pub node_count: usize,
    pub pools: Pools,
    pub counters: Counters,
    /// Client cancel key → the server backend it is using right now. Set and cleared on every
    /// batch, so FxHash: the keys are the router's own random numbers (a client's CancelRequest
    /// only looks one up), so no client can choose colliding keys.
    pub cancel: Mutex<FxHashMap<(i32, i32), Option<CancelTarget>>>,
    pub shutting_down: AtomicBool,
    /// Client TLS, when configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Connections that have not authenticated yet (`listen.max_handshakes`).
    pub handshakes: Arc<crate::handshake::Handshakes>,
    /// ParameterStatus a login got, by (server role, the client's startup settings): a client
    /// whose settings were already accepted logs in without a server round trip.
    pub login_reports: Mutex<HashMap<LoginKey, Vec<(String, String)>>>,
    /// Classification by normalised text (literals do not change whether a statement reads).
    /// Looked up twice per statement with client-sent keys: foldhash, seeded per process
    /// (SipHash was ~600 instructions per statement).
    class_cache: Mutex<foldhash::HashMap<String, Class>>,
    /// The result cache, when `[cache] enabled`.
    pub cache: Option<Arc<crate::cache::Cache>>,
    /// Router user → router time of its last acknowledged write (read-your-writes, user scope).
    pub user_writes: Mutex<foldhash::HashMap<String, u64>>,
    /// Rate limits (`[limits]`); the rules are read from the configuration at each check.
    pub limiter: crate::limits::Limiter,
    /// Alerts (`[alerts]`): evaluation state, history and channel queues.
    pub alerts: Arc<crate::alerts::Alerts>,
    /// The dashboard's statement figures, gathered at most every few seconds.
    pub statements: crate::dashboard::Statements,
}

/// (server role, the client's startup settings): what a login's ParameterStatus depends on.
pub type LoginKey = (String, crate::isolation::Settings);

/// Entries in the login report cache before it is emptied.
pub const LOGIN_REPORTS_MAX: usize = 1000;

/// Entries in the classification cache before it is emptied.
pub const CLASS_CACHE_MAX: usize = 10_000;

use crate::locks::lock;

impl Shared {
    pub fn new(config: Config, tls: Option<tokio_rustls::TlsAcceptor>) -> Arc<Shared> {
        let cache = config
            .cache
            .enabled
            .then(|| Arc::new(crate::cache::Cache::new(&config.cache)));
        let limiter = crate::limits::Limiter::new(
            &config.limits,
            cache.as_ref().and_then(|c| c.redis.as_ref()),
        );
        let topology = Topology::new(&config);
        Arc::new(Shared {
            limiter,
            alerts: crate::alerts::Alerts::new(&config),
            statements: crate::dashboard::Statements::default(),
            tls,
            handshakes: crate::handshake::Handshakes::new(config.listen.max_handshakes),
            users: RwLock::new(Arc::new(users_of(&config))),
            started: topology.started(),
            node_count: topology.nodes.len(),
            topology: Mutex::new(topology),
            config: RwLock::new(Arc::new(config)),
            pools: Pools::default(),
            counters: Counters::default(),
            cancel: Mutex::new(FxHashMap::default()),
            shutting_down: AtomicBool::new(false),
            class_cache: Mutex::new(foldhash::HashMap::default()),
            login_reports: Mutex::new(HashMap::new()),
            cache,
            user_writes: Mutex::new(foldhash::HashMap::default()),
        })
    }

    pub fn config(&self) -> Arc<Config> {
        crate::locks::read(&self.config).clone()
    }

    pub fn users(&self) -> Arc<HashMap<String, UserAuth>> {
        crate::locks::read(&self.users).clone()
    }

    /// Applies a reloaded configuration: users, pool sizes, thresholds, weights. Listen
    /// addresses and the node list need a restart (`reload_problem` says so).
    pub fn reload(&self, config: Config) {
        *crate::locks::write(&self.users) = Arc::new(users_of(&config));
        self.topology().reconfigure(&config);
        let limits = pool_limits(&config);
        for pool in self.pools.all() {
            pool.lock().limits = limits;
        }
        *crate::locks::write(&self.config) = Arc::new(config);
    }

    /// Classifies `sql`, from the cache when a text of the same shape was seen. A text without
    /// literals (bound parameters: the extended protocol, ORMs) is its own shape: it is found by
    /// its exact text, without normalising it again.
    pub fn classify_cached(&self, sql: &str) -> Class {
        if let Some(c) = lock(&self.class_cache).get(sql) {
            return *c;
        }
        // The normalised text goes into this thread's buffer: no allocation per statement.
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        KEY.with_borrow_mut(|key| {
            let literals = dbopt_querystats::normalize::normalize_into(sql, key);
            // (Without literals the key is the text just looked up.)
            let hit = match literals {
                0 => None,
                _ => lock(&self.class_cache).get(key.as_str()).copied(),
            };
            let c = hit.unwrap_or_else(|| {
                let functions = self.topology().functions.clone();
                let c = classify(sql, &functions);
                let mut cache = lock(&self.class_cache);
                if cache.len() >= CLASS_CACHE_MAX {
                    cache.clear();
                }
                // Without literals the normalised text is the text itself (layout and comments
                // kept).
                cache.insert(key.clone(), c);
                c
            });
            if key.capacity() > 64 * 1024 {
                // A huge statement's buffer is not kept for the thread's lifetime.
                *key = String::new();
            }
            c
        })
    }

    /// Installs the function catalogue of the primary; cached classifications are redone.
    pub fn set_functions(&self, f: FunctionCatalog) {
        self.topology().functions = Arc::new(f);
        lock(&self.class_cache).clear();
    }

    pub fn topology(&self) -> MutexGuard<'_, Topology> {
        lock(&self.topology)
    }

    /// [`Topology::now_ms`], without taking the topology lock.
    pub fn now_ms(&self) -> u64 {
        self.ms_at(std::time::Instant::now())
    }

    /// `at` on the same clock as [`Shared::now_ms`] (a caller that has read the time already).
    pub fn ms_at(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }

    pub fn node_name(&self, node: usize) -> String {
        self.topology().nodes[node].name.clone()
    }

    pub fn pool_limits(&self) -> PoolLimits {
        pool_limits(&self.config())
    }

    /// Points a client's cancel key at the server backend it uses now (`None`: no backend).
    pub fn set_cancel_target(&self, key: (i32, i32), target: Option<CancelTarget>) {
        if let Some(slot) = lock(&self.cancel).get_mut(&key) {
            *slot = target;
        }
    }

    /// Notes a write acknowledged now for `user` (read-your-writes across its connections).
    pub fn note_user_write(&self, user: &str, at_ms: u64) {
        let mut m = lock(&self.user_writes);
        let t = m.entry(user.to_string()).or_insert(0);
        *t = (*t).max(at_ms);
    }

    /// The time of `user`'s last acknowledged write.
    pub fn user_write(&self, user: &str) -> Option<u64> {
        lock(&self.user_writes).get(user).copied()
    }

    /// What a login with these settings reported before, if it was accepted.
    pub fn login_report(
        &self,
        role: &str,
        settings: &crate::isolation::Settings,
    ) -> Option<Vec<(String, String)>> {
        lock(&self.login_reports)
            .get(&(role.to_string(), settings.clone()))
            .cloned()
    }

    pub fn remember_login_report(
        &self,
        role: &str,
        settings: &crate::isolation::Settings,
        report: Vec<(String, String)>,
    ) {
        let mut cache = lock(&self.login_reports);
        if cache.len() >= LOGIN_REPORTS_MAX {
            cache.clear();
        }
        cache.insert((role.to_string(), settings.clone()), report);
    }
}

/// Why a reloaded configuration cannot be applied without a restart, if it cannot.
pub fn reload_problem(old: &Config, new: &Config) -> Option<String> {
    if old.listen != new.listen {
        return Some("[listen] changed: restart the router to apply it".into());
    }
    if old.nodes.len() != new.nodes.len()
        || old
            .nodes
            .iter()
            .zip(&new.nodes)
            .any(|(a, b)| a.name != b.name || a.host != b.host || a.port != b.port)
    {
        return Some("the node list changed: restart the router to apply it".into());
    }
    if old.server != new.server {
        return Some("[server] changed: restart the router to apply it".into());
    }
    if old.cache != new.cache {
        return Some("[cache] changed: restart the router to apply it".into());
    }
    let (a, b) = (&old.limits, &new.limits);
    if (
        &a.redis,
        &a.redis_user,
        &a.redis_password,
        a.redis_timeout_ms,
    ) != (
        &b.redis,
        &b.redis_user,
        &b.redis_password,
        b.redis_timeout_ms,
    ) {
        return Some(
            "limits.redis or its credentials changed: restart the router to apply it \
             (rules, modes and the fallback reload)"
                .into(),
        );
    }
    None
}

pub fn pool_limits(c: &Config) -> PoolLimits {
    PoolLimits {
        min: c.pool.min_size,
        max: c.pool.max_size,
        critical_reserve: c.pool.critical_reserve,
        idle_timeout_ms: c.pool.idle_timeout_s * 1000,
        warn_percent: c.pool.warn_utilisation_percent,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [listen]
        address = "127.0.0.1:6432"
        [server]
        user = "postgres"
        [[nodes]]
        name = "n"
        host = "127.0.0.1"
        port = 5
        [[users]]
        name = "app"
        password = "x"
    "#;

    #[test]
    fn limit_rules_reload_but_their_redis_needs_a_restart() {
        let old = Config::parse(BASE).unwrap();
        let rules = Config::parse(&format!(
            "{BASE}\n[[limits.rules]]\nname = \"r\"\nscope = \"global\"\nlimit = 5\nwindow_ms = 1000"
        ))
        .unwrap();
        assert_eq!(reload_problem(&old, &rules), None);
        let redis = Config::parse(&format!("[limits]\nredis = \"127.0.0.1:1\"\n{BASE}")).unwrap();
        assert!(reload_problem(&old, &redis)
            .unwrap()
            .contains("limits.redis"));
    }
}
