//! The async pools: one per (node, database, server role), around the bookkeeping of
//! [`crate::pool`]. A pool holds connections logged in as one role only, so a client never gets a
//! connection with another user's privileges. Getting
//! a connection takes an idle one, opens one (up to 3 tries with exponential backoff and jitter,
//! each admitted by the node's circuit breaker), or waits in a bounded queue until one is given
//! back or `wait_timeout_ms` passes (SQLSTATE 53300).

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::log;
use crate::pool::{backoff_ms, PoolLimits, PoolState, Take};
use crate::server::{ConnectError, ServerConn, ServerTarget};
use crate::shared::Shared;
use crate::sqlstate;
use crate::topology::Unavailable;

/// As whom a pool's connections log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub role: String,
    pub password: Option<String>,
    /// May be a superuser (`users.admin`); otherwise a superuser login is refused.
    pub admin: bool,
}

pub struct Pool {
    pub node: usize,
    pub database: String,
    pub login: Login,
    /// When a client last took a connection (router clock, ms): unused pools are dropped.
    pub last_used_ms: AtomicU64,
    /// The last attempt to open a connection failed (bad database, role, password).
    pub failing: std::sync::atomic::AtomicBool,
    /// Connections are boxed: they move in and out of the pool and the session on every
    /// transaction (a pointer instead of ~270 bytes).
    /// Reached through [`Pool::lock`] only: its guard refreshes `room` when it is dropped.
    state: Mutex<PoolState<Box<ServerConn>>>,
    /// Whether the pool could hand out a connection at once, as of the last time its state was
    /// unlocked: the room check of every read's batch reads it without taking the lock.
    room: std::sync::atomic::AtomicBool,
    notify: Notify,
    pub waiting: AtomicU32,
    pub waits: AtomicU64,
    pub wait_us_total: AtomicU64,
    pub timeouts: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Out of the map (dropped as unused, or replaced for a changed login): a session that kept
    /// it ([`SessionPools`]) looks its pool up again.
    pub retired: std::sync::atomic::AtomicBool,
}

/// Why a client got no server connection; becomes an ErrorResponse.
#[derive(Debug)]
pub struct AcquireError {
    pub code: &'static str,
    pub message: String,
    /// The node could not be reached (the session may try another one for a read).
    pub node_failed: bool,
}

pub const CONNECT_TRIES: u32 = 3;
pub const BACKOFF_BASE_MS: u64 = 100;
pub const BACKOFF_MAX_MS: u64 = 2000;

type ByRole = FxHashMap<String, Arc<Pool>>;

/// node → database → role → pool, looked up several times per batch (once per node for a read's
/// room check): FxHash rather than SipHash. Its keys are configured nodes and the database and
/// role of authenticated logins, never free text from an unauthenticated client.
#[derive(Default)]
pub struct Pools {
    map: Mutex<FxHashMap<usize, FxHashMap<String, ByRole>>>,
    /// Bumped (under the map's lock) whenever a pool enters or leaves the map: a session that
    /// found no pool on a node knows the answer still holds while this has not moved.
    generation: AtomicU64,
}

use crate::locks::lock;

impl Pools {
    /// `limits` is asked only when the pool is new (reading them takes the configuration lock).
    pub fn get(
        &self,
        node: usize,
        database: &str,
        login: &Login,
        limits: impl FnOnce() -> PoolLimits,
    ) -> Arc<Pool> {
        let mut map = lock(&self.map);
        let by_db = map.entry(node).or_default();
        if let Some(p) = by_db.get(database).and_then(|r| r.get(&login.role)) {
            if p.login == *login {
                return p.clone();
            }
        }
        // A new pool, or a login whose password or admin flag changed (SIGHUP): the old pool's
        // connections stay with the clients that hold them and close when given back.
        let state = PoolState::new(limits());
        let room = state.has_room();
        let pool = Arc::new(Pool {
            node,
            database: database.to_string(),
            login: login.clone(),
            last_used_ms: AtomicU64::new(0),
            failing: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(state),
            room: std::sync::atomic::AtomicBool::new(room),
            notify: Notify::new(),
            waiting: AtomicU32::new(0),
            waits: AtomicU64::new(0),
            wait_us_total: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            retired: std::sync::atomic::AtomicBool::new(false),
        });
        let replaced = by_db
            .entry(database.to_string())
            .or_default()
            .insert(login.role.clone(), pool.clone());
        self.generation.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = replaced {
            old.retired.store(true, Ordering::Relaxed);
        }
        pool
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<Arc<Pool>> = lock(&self.map)
            .values()
            .flat_map(|by_db| by_db.values().flat_map(|r| r.values().cloned()))
            .collect();
        v.sort_by(|a, b| {
            (a.node, &a.database, &a.login.role).cmp(&(b.node, &b.database, &b.login.role))
        });
        v
    }

    /// One bit per node asked about in `wanted` (nodes 0..128): whether the login's pool there can
    /// hand out a connection at once (no pool yet counts as room). One lock for all nodes.
    pub fn room_mask(&self, wanted: u128, database: &str, role: &str) -> u128 {
        let mut bits = 0u128;
        self.find_each(wanted, database, role, |n, pool| {
            if pool.is_none_or(|p| p.has_room()) {
                bits |= 1 << n;
            }
        });
        bits
    }

    /// Calls `each` with every node asked about in `wanted` (nodes 0..128) and the role's pool
    /// there, if the map has one — under one lock for all nodes. Returns the map's generation the
    /// answers belong to.
    fn find_each(
        &self,
        wanted: u128,
        database: &str,
        role: &str,
        mut each: impl FnMut(usize, Option<&Arc<Pool>>),
    ) -> u64 {
        let map = lock(&self.map);
        let mut left = wanted;
        while left != 0 {
            let n = left.trailing_zeros() as usize;
            left &= left - 1;
            let pool = map
                .get(&n)
                .and_then(|d| d.get(database))
                .and_then(|r| r.get(role));
            each(n, pool);
        }
        self.generation.load(Ordering::Relaxed)
    }

    /// Drops a pool from the map (its idle connections close with it).
    pub fn remove(&self, pool: &Arc<Pool>) {
        let mut map = lock(&self.map);
        if let Some(by_role) = map
            .get_mut(&pool.node)
            .and_then(|d| d.get_mut(&pool.database))
        {
            if by_role
                .get(&pool.login.role)
                .is_some_and(|p| Arc::ptr_eq(p, pool))
            {
                by_role.remove(&pool.login.role);
                pool.retired.store(true, Ordering::Relaxed);
                self.generation.fetch_add(1, Ordering::Relaxed);
            }
            if by_role.is_empty() {
                if let Some(d) = map.get_mut(&pool.node) {
                    d.remove(&pool.database);
                }
            }
        }
    }
}

/// The pools one session uses, by node (its database and login never change): found without
/// the map's lock and three hash lookups per batch, for as long as they stay in the map.
#[derive(Default)]
pub struct SessionPools {
    kept: smallvec::SmallVec<[Arc<Pool>; 4]>,
    /// Nodes where the map had no pool for the session's login, as of map generation
    /// `absent_gen` (a read that never goes to the primary would otherwise ask about it on
    /// every batch).
    absent: u128,
    absent_gen: u64,
}

impl SessionPools {
    fn cached(&self, node: usize) -> Option<&Arc<Pool>> {
        self.kept
            .iter()
            .find(|p| p.node == node && !p.retired.load(Ordering::Relaxed))
    }

    /// The session's pool on `node` (see [`Pools::get`]).
    pub fn get(
        &mut self,
        pools: &Pools,
        node: usize,
        database: &str,
        login: &Login,
        limits: impl FnOnce() -> PoolLimits,
    ) -> Arc<Pool> {
        if let Some(p) = self.cached(node) {
            return p.clone();
        }
        // Forget what was retired (and this node's entry) before keeping the new one.
        self.kept
            .retain(|p| p.node != node && !p.retired.load(Ordering::Relaxed));
        let p = pools.get(node, database, login, limits);
        self.kept.push(p.clone());
        p
    }

    /// [`Pools::room_mask`], answered by the session's own pools where it has them. What the map
    /// is asked about is remembered: a pool it has for the session's login is kept, and a node
    /// where it has none is not asked about again until a pool enters or leaves the map (a
    /// session whose reads never go to the primary does not lock the map for it on every batch).
    pub fn room_mask(
        &mut self,
        pools: &Pools,
        nodes: usize,
        database: &str,
        login: &Login,
    ) -> u128 {
        let nodes = nodes.min(128);
        let mut bits = 0u128;
        let mut unknown = 0u128;
        let absent = if pools.generation.load(Ordering::Relaxed) == self.absent_gen {
            self.absent
        } else {
            0
        };
        for n in 0..nodes {
            match self.cached(n) {
                Some(p) if p.has_room() => bits |= 1 << n,
                Some(_) => {}
                None if absent & (1 << n) != 0 => bits |= 1 << n, // no pool yet: room
                None => unknown |= 1 << n,
            }
        }
        if unknown != 0 {
            self.kept.retain(|q| !q.retired.load(Ordering::Relaxed));
            let (kept, mut missing) = (&mut self.kept, absent);
            let generation = pools.find_each(unknown, database, &login.role, |n, pool| {
                let Some(p) = pool else {
                    bits |= 1 << n; // no pool yet: the checkout would open a connection
                    missing |= 1 << n;
                    return;
                };
                if p.has_room() {
                    bits |= 1 << n;
                }
                if p.login == *login {
                    kept.push(p.clone());
                }
            });
            // Kept only if nothing entered or left the map since `absent` was true.
            self.absent = if generation == self.absent_gen {
                missing
            } else {
                missing & unknown
            };
            self.absent_gen = generation;
        }
        bits
    }
}

/// The pool's state, locked; on release it notes whether the pool has room (see [`Pool::room`]).
pub struct PoolGuard<'a> {
    state: std::sync::MutexGuard<'a, PoolState<Box<ServerConn>>>,
    room: &'a std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for PoolGuard<'_> {
    type Target = PoolState<Box<ServerConn>>;
    fn deref(&self) -> &Self::Target {
        &self.state
    }
}

impl std::ops::DerefMut for PoolGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.state
    }
}

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        // Still under the lock: every change to the state is followed by this store.
        self.room.store(self.state.has_room(), Ordering::Relaxed);
    }
}

impl Pool {
    /// Can it hand out a connection without waiting? (As of the last unlock: no lock taken.)
    pub fn has_room(&self) -> bool {
        self.room.load(Ordering::Relaxed)
    }

    /// The pool's state; `has_room` follows every change made through the guard.
    pub fn lock(&self) -> PoolGuard<'_> {
        PoolGuard {
            state: lock(&self.state),
            room: &self.room,
        }
    }

    /// Returns a connection; `reusable = false` closes it instead (broken, mid-transaction,
    /// opened before the last role change).
    pub fn release(&self, conn: Box<ServerConn>, reusable: bool, now_ms: u64) {
        let mut st = self.lock();
        if reusable {
            st.give_back(conn, now_ms);
        } else {
            st.discard();
        }
        drop(st);
        self.notify.notify_one();
    }

    /// Forgets a connection that is gone (already dropped by the caller).
    pub fn forget(&self) {
        self.lock().discard();
        self.notify.notify_one();
    }
}

impl Shared {
    fn target(&self, node: usize, database: &str, login: &Login) -> ServerTarget {
        ServerTarget {
            node,
            addr: self.topology().nodes[node].addr.clone(),
            user: login.role.clone(),
            password: login.password.clone(),
            database: database.to_string(),
        }
    }

    /// Opens a server connection to `node` with retries, each admitted by its breaker.
    pub async fn open_server(
        &self,
        node: usize,
        database: &str,
        login: &Login,
    ) -> Result<Box<ServerConn>, AcquireError> {
        let target = self.target(node, database, login);
        let timeout = Duration::from_millis(self.config().health.timeout_ms);
        let mut last = String::new();
        for attempt in 0..CONNECT_TRIES {
            if attempt > 0 {
                let wait = backoff_ms(attempt - 1, BACKOFF_BASE_MS, BACKOFF_MAX_MS, rand::random());
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            let epoch = {
                let mut t = self.topology();
                if let Err(u) = t.admit_attempt(node) {
                    return Err(unavailable_error(u));
                }
                t.stamp(node)
            };
            match ServerConn::connect(&target, timeout, epoch).await {
                Ok(c) => {
                    self.topology().record(node, true);
                    if !login.admin
                        && c.params.get("is_superuser").map(String::as_str) == Some("on")
                    {
                        log::error(&format!(
                            "refusing a server login as {:?} on {}: it is a superuser and the \
                             router user is not admin",
                            login.role, target.addr
                        ));
                        return Err(AcquireError {
                            code: sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                            message: format!(
                                "dbopt-router: role \"{}\" is a superuser; only users with \
                                 admin = true may run as one",
                                login.role
                            ),
                            node_failed: false,
                        });
                    }
                    return Ok(Box::new(c));
                }
                Err(ConnectError::Refused { code, message }) => {
                    // The node is up; the login is wrong. Not the node's fault, not retried —
                    // except "too many connections" / "starting up", which pass with time.
                    self.topology().record(node, true);
                    if code == sqlstate::TOO_MANY_CONNECTIONS
                        || code == sqlstate::CANNOT_CONNECT_NOW
                    {
                        last = format!("{message} (SQLSTATE {code})");
                        continue;
                    }
                    return Err(AcquireError {
                        code: static_code(&code),
                        message: format!("{}: {message}", target.addr),
                        node_failed: false,
                    });
                }
                Err(ConnectError::Unreachable(m)) => {
                    self.topology().record(node, false);
                    last = m;
                }
            }
        }
        let name = self.topology().nodes[node].name.clone();
        Err(AcquireError {
            code: sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            message: format!(
                "could not connect to {name} ({}) after {CONNECT_TRIES} tries: {last}",
                target.addr
            ),
            node_failed: true,
        })
    }

    /// A server connection to `node` for `database`, from its pool. `now_ms`: the caller's
    /// [`Shared::now_ms`] (one clock read per batch).
    pub async fn acquire(
        &self,
        node: usize,
        database: &str,
        login: &Login,
        critical: bool,
        now_ms: u64,
    ) -> Result<(Arc<Pool>, Box<ServerConn>), AcquireError> {
        let pool = self.pools.get(node, database, login, || self.pool_limits());
        self.acquire_in(pool, critical, now_ms).await
    }

    /// A server connection from `pool` (a session's own, [`SessionPools`]).
    pub async fn acquire_in(
        &self,
        pool: Arc<Pool>,
        critical: bool,
        now_ms: u64,
    ) -> Result<(Arc<Pool>, Box<ServerConn>), AcquireError> {
        let (node, database, login) = (pool.node, pool.database.as_str(), &pool.login);
        pool.last_used_ms.store(now_ms, Ordering::Relaxed);
        let (is_primary, epoch) = {
            let t = self.topology();
            (t.primary == Some(node), t.stamp(node))
        };
        // Read only when the pool is full (waiting needs the limits and a deadline).
        let mut wait: Option<(Arc<crate::config::Config>, Instant)> = None;
        let mut waited: Option<Instant> = None;
        let signal = pool.clone();
        loop {
            let notified = signal.notify.notified();
            tokio::pin!(notified);
            let mut take = pool.lock().take(critical, is_primary);
            if matches!(take, Take::Wait) {
                // Registered for a wakeup before looking again: a release in between is not
                // missed. (A connection at hand needs no registration.)
                notified.as_mut().enable();
                take = pool.lock().take(critical, is_primary);
            }
            match take {
                Take::Idle(c) => {
                    if c.epoch != epoch {
                        // Opened before the last role change: its node may have changed role.
                        pool.release(c, false, 0);
                        continue;
                    }
                    let now_ms = if waited.is_some() {
                        self.now_ms()
                    } else {
                        now_ms
                    };
                    self.after_take(&pool, waited, now_ms);
                    return Ok((pool, c));
                }
                Take::Open => match self.open_server(node, database, login).await {
                    Ok(c) => {
                        pool.failing.store(false, Ordering::Relaxed);
                        pool.connects.fetch_add(1, Ordering::Relaxed);
                        self.after_take(&pool, waited, self.now_ms());
                        return Ok((pool, c));
                    }
                    Err(e) => {
                        pool.failing.store(true, Ordering::Relaxed);
                        pool.connect_failures.fetch_add(1, Ordering::Relaxed);
                        pool.forget();
                        return Err(e);
                    }
                },
                Take::Wait => {
                    let (config, deadline) = wait.get_or_insert_with(|| {
                        let config = self.config();
                        let timeout = Duration::from_millis(config.pool.wait_timeout_ms);
                        (config, Instant::now() + timeout)
                    });
                    let (config, deadline) = (config.clone(), *deadline);
                    let max_waiting = config.pool.max_waiting;
                    if waited.is_none() {
                        if pool.waiting.fetch_add(1, Ordering::Relaxed) >= max_waiting {
                            pool.waiting.fetch_sub(1, Ordering::Relaxed);
                            return Err(AcquireError {
                                code: sqlstate::TOO_MANY_CONNECTIONS,
                                message: format!(
                                    "pool {}/{database} is full and {max_waiting} clients are already waiting",
                                    self.node_name(node)
                                ),
                                node_failed: false,
                            });
                        }
                        waited = Some(Instant::now());
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                        pool.waiting.fetch_sub(1, Ordering::Relaxed);
                        pool.timeouts.fetch_add(1, Ordering::Relaxed);
                        let st = pool.lock();
                        return Err(AcquireError {
                            code: sqlstate::TOO_MANY_CONNECTIONS,
                            message: format!(
                                "no server connection to {} free within {} ms ({} of {} in use, {} waiting)",
                                self.node_name(node),
                                config.pool.wait_timeout_ms,
                                st.in_use(),
                                st.limits.max,
                                pool.waiting.load(Ordering::Relaxed)
                            ),
                            node_failed: false,
                        });
                    }
                }
            }
        }
    }

    fn after_take(&self, pool: &Pool, waited: Option<Instant>, now: u64) {
        if let Some(since) = waited {
            pool.waiting.fetch_sub(1, Ordering::Relaxed);
            pool.waits.fetch_add(1, Ordering::Relaxed);
            pool.wait_us_total
                .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        if let Some(pct) = pool.lock().utilisation_warning(now) {
            log::warn(&format!(
                "pool {}/{} is {pct} % busy",
                self.node_name(pool.node),
                pool.database
            ));
        }
    }

    /// Opens connections up to `min_size` in `pool` (pre-warming).
    pub async fn warm(self: &Arc<Self>, pool: &Arc<Pool>) {
        let (node, database) = (pool.node, pool.database.as_str());
        let n = pool.lock().reserve_warm();
        for _ in 0..n {
            match self.open_server(node, database, &pool.login).await {
                Ok(c) => {
                    pool.connects.fetch_add(1, Ordering::Relaxed);
                    let now = self.now_ms();
                    pool.lock().add_warm(c, now);
                    pool.notify.notify_one();
                }
                Err(e) => {
                    pool.lock().warm_failed();
                    log::warn(&format!(
                        "pre-warming {}/{database}: {}",
                        self.node_name(node),
                        e.message
                    ));
                    // The rest would fail the same way; the next maintenance round retries.
                    for _ in 1..n {
                        pool.lock().warm_failed();
                    }
                    break;
                }
            }
        }
    }

    /// Closes idle connections above min that timed out, retires connections of an old
    /// epoch, drops pools nobody used for `idle_timeout_s` or whose logins fail, and tops every
    /// other pool up to min. Runs every few seconds.
    pub async fn maintain_pools(self: &Arc<Self>) {
        let now = self.now_ms();
        let idle_ms = self.config().pool.idle_timeout_s.saturating_mul(1000);
        for pool in self.pools.all() {
            let unused = pool.lock().in_use() == 0 && pool.waiting.load(Ordering::Relaxed) == 0;
            let last = pool.last_used_ms.load(Ordering::Relaxed);
            if unused
                && (pool.failing.load(Ordering::Relaxed) || now.saturating_sub(last) >= idle_ms)
            {
                self.pools.remove(&pool);
                let closed = pool.lock().drain_idle();
                drop(closed);
                continue;
            }
            let epoch = self.topology().stamp(pool.node);
            let closed = {
                let mut st = pool.lock();
                let mut closed = st.remove_idle_where(|c| c.epoch != epoch);
                closed.extend(st.reap(now));
                closed
            };
            drop(closed); // dropping closes the sockets
            let reachable = self.topology().nodes[pool.node].reachable;
            if reachable {
                self.warm(&pool).await;
            }
        }
    }
}

/// The error a client gets when routing found no node to use.
pub fn unavailable_error(u: Unavailable) -> AcquireError {
    match u {
        Unavailable::NoPrimary => AcquireError {
            code: sqlstate::CONNECTION_FAILURE,
            message: "no primary is available".into(),
            node_failed: true,
        },
        Unavailable::BreakerOpen { node, retry_in_ms } => AcquireError {
            code: sqlstate::CANNOT_CONNECT_NOW,
            message: format!(
                "circuit breaker for {node} is open (too many failures); next trial in {} s",
                retry_in_ms.div_ceil(1000)
            ),
            node_failed: true,
        },
    }
}

/// SQLSTATEs the router passes on from a server refusing a login.
fn static_code(code: &str) -> &'static str {
    match code {
        sqlstate::INVALID_PASSWORD => sqlstate::INVALID_PASSWORD,
        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION => {
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION
        }
        sqlstate::INVALID_CATALOG_NAME => sqlstate::INVALID_CATALOG_NAME,
        sqlstate::TOO_MANY_CONNECTIONS => sqlstate::TOO_MANY_CONNECTIONS,
        sqlstate::CANNOT_CONNECT_NOW => sqlstate::CANNOT_CONNECT_NOW,
        _ => sqlstate::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(password: &str) -> Login {
        Login {
            role: "app".into(),
            password: Some(password.into()),
            admin: false,
        }
    }

    fn limits(max: u32) -> impl FnOnce() -> PoolLimits {
        move || PoolLimits {
            min: 0,
            max,
            critical_reserve: 0,
            idle_timeout_ms: 0,
            warn_percent: 90,
        }
    }

    #[test]
    fn a_session_keeps_its_pools_until_they_leave_the_map() {
        let pools = Pools::default();
        let mut mine = SessionPools::default();
        let a = mine.get(&pools, 0, "db", &login("x"), limits(1));
        assert!(Arc::ptr_eq(
            &a,
            &mine.get(&pools, 0, "db", &login("x"), limits(1))
        ));
        assert!(Arc::ptr_eq(&a, &pools.get(0, "db", &login("x"), limits(1))));
        // Dropped as unused: the session gets the pool that replaces it, not the orphan.
        pools.remove(&a);
        let b = mine.get(&pools, 0, "db", &login("x"), limits(1));
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&b, &pools.get(0, "db", &login("x"), limits(1))));
        // Replaced for a changed login (SIGHUP): the old one is retired as well.
        let c = pools.get(0, "db", &login("y"), limits(1));
        assert!(b.retired.load(Ordering::Relaxed));
        assert!(!Arc::ptr_eq(
            &b,
            &mine.get(&pools, 0, "db", &login("x"), limits(1))
        ));
        assert!(c.retired.load(Ordering::Relaxed));
        // One entry per node: retired ones are forgotten.
        mine.get(&pools, 1, "db", &login("x"), limits(1));
        assert_eq!(mine.kept.len(), 2);
    }

    #[test]
    fn room_is_the_same_from_the_session_and_from_the_map() {
        let pools = Pools::default();
        let mut mine = SessionPools::default();
        let full = mine.get(&pools, 1, "db", &login("x"), limits(1));
        assert!(matches!(full.lock().take(false, false), Take::Open));
        pools.get(2, "db", &login("x"), limits(1)); // in the map, not the session's yet
                                                    // Node 0: no pool yet (room); 1: full; 2: the map's answer.
        assert_eq!(mine.room_mask(&pools, 3, "db", &login("x")), 0b101);
        assert_eq!(pools.room_mask(0b111, "db", "app"), 0b101);
        full.lock().discard();
        assert_eq!(mine.room_mask(&pools, 3, "db", &login("x")), 0b111);
    }

    #[test]
    fn a_room_check_keeps_the_pools_it_found_for_the_sessions_login() {
        let pools = Pools::default();
        let mut mine = SessionPools::default();
        let other = pools.get(0, "db", &login("x"), limits(1));
        let theirs = pools.get(1, "db", &login("y"), limits(1)); // same role, another password
        mine.room_mask(&pools, 3, "db", &login("x"));
        assert_eq!(mine.kept.len(), 1);
        assert!(Arc::ptr_eq(&mine.kept[0], &other));
        assert!(!mine.kept.iter().any(|p| Arc::ptr_eq(p, &theirs)));
        // What it keeps answers as the map does, and leaves once retired.
        assert!(matches!(other.lock().take(false, false), Take::Open));
        assert_eq!(mine.room_mask(&pools, 2, "db", &login("x")), 0b10);
        pools.remove(&other);
        assert_eq!(mine.room_mask(&pools, 2, "db", &login("x")), 0b11);
        assert!(!mine.kept.iter().any(|p| Arc::ptr_eq(p, &other)));
    }

    #[test]
    fn a_node_without_a_pool_is_asked_about_again_once_one_appears() {
        let pools = Pools::default();
        let mut mine = SessionPools::default();
        assert_eq!(mine.room_mask(&pools, 2, "db", &login("x")), 0b11);
        assert_eq!(mine.absent, 0b11);
        // Another session's pool appears on node 1, full: the session sees it at once.
        let full = pools.get(1, "db", &login("x"), limits(1));
        assert!(matches!(full.lock().take(false, false), Take::Open));
        assert_eq!(mine.room_mask(&pools, 2, "db", &login("x")), 0b01);
        assert_eq!(mine.absent, 0b01);
        assert!(Arc::ptr_eq(&mine.kept[0], &full));
    }
}
