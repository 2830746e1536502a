//! Rate limits on statements: sliding windows per router user, per end user of the application,
//! globally, per database and per node, shared by every router through the Redis module
//! (`DBOPT.RL.HITALL`: a statement is admitted by all its windows or charged to none), with a
//! local fallback while Redis is unreachable.
//!
//! # Layout
//! - [`settings`] — the `[limits]` configuration; [`rules`] — which windows a statement is
//!   counted in (pure); [`end_user`] — the end user from a SQLCommenter comment (pure);
//!   [`local`] — windows in this router's memory (pure); [`lease`] — admissions taken from Redis
//!   ahead and handed out here (pure).
//! - [`Limiter`] (this file) — the decision: Redis or fallback, counters, logging once per episode.
//! - The session's side (when a batch is checked, how a refusal reaches the client) is in
//!   `crate::rate_limited`.

pub mod end_user;
pub mod lease;
pub mod local;
pub mod rules;
pub mod settings;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dbopt_querystats::exposition::Exposition;

use crate::cache::redis::{encode, Redis, RedisError, Reply};
use crate::cache::{lock, unix_ms};
use rules::Applied;
use settings::{Fallback, LimitSettings};

/// While Redis is unreachable, one statement per this many ms tries it again.
const RETRY_MS: u64 = 1000;

/// A check under way: which of its sets (enforced, warn-mode) still need Redis, and how many
/// units to ask for each (a lease).
#[derive(Debug, Clone)]
pub struct Pending {
    pub check: Check,
    pub need: [Option<u64>; 2],
    /// Router time when the check began (before any request left): leases live from here.
    pub sent_ms: u64,
}

impl Pending {
    pub fn needs_redis(&self) -> bool {
        self.need.iter().any(Option::is_some)
    }
}

/// The windows one check charges: the enforced ones in one all-or-nothing call, the warn-mode
/// ones in another.
#[derive(Debug, Clone)]
pub struct Check {
    pub cost: u64,
    pub enforce: Arc<[Applied]>,
    pub warn: Arc<[Applied]>,
    /// The lease key of each set (enforced, warn-mode).
    pub lease_keys: Arc<[Vec<u8>; 2]>,
}

impl Check {
    pub fn new(cost: u64, enforce: Vec<Applied>, warn: Vec<Applied>) -> Check {
        let lease_keys = Arc::new([lease::set_key(&enforce), lease::set_key(&warn)]);
        Check {
            cost,
            enforce: enforce.into(),
            warn: warn.into(),
            lease_keys,
        }
    }

    /// The same windows for another number of statements (no copy of the windows).
    pub fn with_cost(&self, cost: u64) -> Check {
        Check {
            cost,
            ..self.clone()
        }
    }
}

/// How a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The shared windows in Redis.
    Shared,
    /// This router's windows (no Redis configured, or the fallback while it is unreachable).
    Local,
    /// Redis unreachable and `on_redis_error = "closed"`.
    Closed,
}

/// A window that is full.
#[derive(Debug, Clone)]
pub struct Over {
    pub applied: Applied,
    /// The limit this decision enforced (divided among routers in the local fallback).
    pub limit: u64,
    pub retry_after_ms: u64,
    pub source: Source,
}

/// The decision on a check: refused by an enforced window, and/or over warn-mode windows.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub refused: Option<Over>,
    pub warned: Option<Over>,
}

/// Per rule, for `/metrics` and `/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleStats {
    pub admitted: u64,
    pub refused: u64,
    pub warned: u64,
    pub bypassed: u64,
    /// Decisions made without Redis while it was unreachable (whatever they were).
    pub fallback: u64,
}

pub struct Limiter {
    redis: Option<Arc<Redis>>,
    /// The cache uses the same Redis connections: a lookup and a check can share a round trip.
    pub shares_cache_redis: bool,
    up: AtomicBool,
    retry_at_ms: AtomicU64,
    redis_errors: AtomicU64,
    local: Mutex<local::LocalWindows>,
    leases: Mutex<lease::Leases>,
    stats: Mutex<BTreeMap<String, RuleStats>>,
}

impl Limiter {
    /// `cache_redis`: the cache's Redis client, reused when the limits name the same server.
    pub fn new(settings: &LimitSettings, cache_redis: Option<&Arc<Redis>>) -> Limiter {
        let own = settings.redis.as_deref();
        let (redis, shares) = match (own, cache_redis) {
            (None, Some(r)) => (Some(r.clone()), true),
            (Some(a), Some(r)) if a == r.address() && settings.redis_password.is_none() => {
                (Some(r.clone()), true)
            }
            (Some(a), _) => (
                Some(Arc::new(Redis::new(
                    a,
                    settings.redis_user.clone(),
                    settings.redis_password.clone(),
                    settings.redis_timeout_ms,
                ))),
                false,
            ),
            (None, None) => (None, false),
        };
        Limiter {
            redis,
            shares_cache_redis: shares,
            up: AtomicBool::new(true),
            retry_at_ms: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
            local: Mutex::new(local::LocalWindows::default()),
            leases: Mutex::new(lease::Leases::default()),
            stats: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether the shared windows are in use (Redis configured and answering).
    pub fn redis_up(&self) -> bool {
        self.redis.is_some() && self.up.load(Ordering::Relaxed)
    }

    pub fn uses_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Whether a check should go to Redis now (up, or due for a retry while down).
    /// While down, one caller per [`RETRY_MS`] gets `true` (the probe); the others decide
    /// without Redis.
    pub fn try_redis(&self) -> bool {
        if self.redis.is_none() {
            return false;
        }
        if self.up.load(Ordering::Relaxed) {
            return true;
        }
        let now = unix_ms();
        let at = self.retry_at_ms.load(Ordering::Relaxed);
        now >= at
            && self
                .retry_at_ms
                .compare_exchange(at, now + RETRY_MS, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Starts deciding a check: the windows a valid lease of this router covers are admitted now
    /// (consumed); the others need Redis ([`Limiter::commands`], [`Limiter::finish`]).
    pub fn begin(&self, check: Check) -> Pending {
        let now = unix_ms();
        let mut need = [None, None];
        if self.redis.is_some() {
            let mut leases = lock(&self.leases);
            for (i, set) in [&check.enforce, &check.warn].into_iter().enumerate() {
                if set.is_empty() {
                    continue;
                }
                let key = &check.lease_keys[i];
                let cost = cost_for(check.cost, set);
                if !leases.take(key, cost, now) {
                    need[i] = Some(leases.ask(key, cost, lease::cap(set), now));
                }
            }
        }
        Pending {
            check,
            need,
            sent_ms: now,
        }
    }

    /// The Redis commands a pending check needs, in the order their replies are read (none when
    /// leases covered it).
    pub fn commands(p: &Pending) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(2);
        for (set, need) in [&p.check.enforce, &p.check.warn].into_iter().zip(p.need) {
            let Some(max) = need else { continue };
            let min = cost_for(p.check.cost, set).to_string();
            let max = max.to_string();
            let nums: Vec<(String, String)> = set
                .iter()
                .map(|a| {
                    (
                        a.limit.to_string(),
                        lease::redis_window(a.window_ms).to_string(),
                    )
                })
                .collect();
            let mut args: Vec<&[u8]> = vec![b"DBOPT.RL.LEASE", min.as_bytes(), max.as_bytes()];
            for (a, (l, w)) in set.iter().zip(&nums) {
                args.extend([a.key.as_slice(), l.as_bytes(), w.as_bytes()]);
            }
            out.push(encode(&args));
        }
        out
    }

    /// Decides a pending check. `replies`: the answers to [`Limiter::commands`] when the caller
    /// already sent them (pipelined with a cache lookup).
    pub async fn finish(
        &self,
        settings: &LimitSettings,
        p: Pending,
        replies: Option<Result<Vec<Reply>, RedisError>>,
    ) -> Verdict {
        let needs_redis = p.need.iter().any(Option::is_some);
        let shared = if self.redis.is_none() {
            None
        } else if !needs_redis {
            Some(Ok(Vec::new()))
        } else {
            match (replies, self.try_redis()) {
                (Some(r), _) => Some(r),
                (None, true) => match &self.redis {
                    Some(r) => Some(r.pipeline(&Self::commands(&p)).await),
                    None => None,
                },
                (None, false) => None,
            }
        };
        let verdict = match shared {
            Some(Ok(replies)) => match self.shared_verdict(&p, &replies) {
                Ok(v) => {
                    if needs_redis {
                        self.redis_answered();
                    }
                    Some(v)
                }
                Err(e) => {
                    self.redis_failed(&e);
                    None
                }
            },
            Some(Err(e)) => {
                self.redis_failed(&e);
                None
            }
            None => None,
        };
        let check = &p.check;
        let fallback = verdict.is_none() && self.redis.is_some();
        let verdict =
            verdict.unwrap_or_else(|| match (self.redis.is_some(), settings.on_redis_error) {
                (true, Fallback::Open) => Verdict::default(),
                (true, Fallback::Closed) => Verdict {
                    refused: p.need[0].and(check.enforce.first()).map(|a| Over {
                        applied: a.clone(),
                        limit: a.limit,
                        retry_after_ms: RETRY_MS,
                        source: Source::Closed,
                    }),
                    warned: None,
                },
                (true, Fallback::Local) => self.local_verdict(check, settings.routers, p.need),
                (false, _) => self.local_verdict(check, 1, [Some(0), Some(0)]),
            });
        self.count(check, &verdict, fallback);
        verdict
    }

    /// A check decided at once (no pipelining).
    pub async fn decide(&self, settings: &LimitSettings, check: Check) -> Verdict {
        let p = self.begin(check);
        self.finish(settings, p, None).await
    }

    /// The verdict from Redis's replies; the leases it granted are kept.
    fn shared_verdict(&self, p: &Pending, replies: &[Reply]) -> Result<Verdict, RedisError> {
        let mut it = replies.iter();
        let mut out = [None, None];
        let mut grants = Vec::new();
        for (i, set) in [&p.check.enforce, &p.check.warn].into_iter().enumerate() {
            if p.need[i].is_none() {
                continue;
            }
            let reply = it
                .next()
                .ok_or_else(|| RedisError("missing reply".into()))?;
            match parse_lease(reply, set.len())? {
                Ok(granted) => grants.push((i, set, granted)),
                Err((index, retry_after_ms)) => {
                    out[i] = Some(Over {
                        applied: set[index].clone(),
                        limit: set[index].limit,
                        retry_after_ms,
                        source: Source::Shared,
                    })
                }
            }
        }
        let mut leases = lock(&self.leases);
        for (i, set, granted) in grants {
            let cost = cost_for(p.check.cost, set);
            let key = &p.check.lease_keys[i];
            leases.granted(key, cost, granted, p.sent_ms, lease::set_life_ms(set));
        }
        let [refused, warned] = out;
        Ok(Verdict { refused, warned })
    }

    /// The local windows decide the sets that needed Redis (`need`); the others were admitted by a
    /// lease.
    fn local_verdict(&self, check: &Check, routers: u32, need: [Option<u64>; 2]) -> Verdict {
        let now = unix_ms();
        let mut local = lock(&self.local);
        let mut over = |set: &[Applied], needed: bool| -> Option<Over> {
            if set.is_empty() || !needed {
                return None;
            }
            let limits: Vec<(u64, u64)> = set
                .iter()
                .map(|a| (a.limit.div_ceil(u64::from(routers)).max(1), a.window_ms))
                .collect();
            let least = limits.iter().map(|(l, _)| *l).min().unwrap_or(1);
            let cost = check.cost.clamp(1, least);
            let keyed: Vec<local::Limit> = set
                .iter()
                .zip(&limits)
                .map(|(a, (l, w))| (a.key.as_slice(), *l, *w))
                .collect();
            let o = local.hit_all(now, cost, &keyed);
            o.refused.map(|i| Over {
                applied: set[i].clone(),
                limit: limits[i].0,
                retry_after_ms: o.decision.retry_after_ms.max(0) as u64,
                source: Source::Local,
            })
        };
        Verdict {
            refused: over(&check.enforce, need[0].is_some()),
            warned: over(&check.warn, need[1].is_some()),
        }
    }

    fn redis_answered(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            crate::log::info("limits: Redis answers again; windows are shared again");
        }
    }

    fn redis_failed(&self, e: &RedisError) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
        self.retry_at_ms
            .store(unix_ms() + RETRY_MS, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            crate::log::warn(&format!(
                "limits: Redis unreachable ({e}); deciding without it (limits.on_redis_error) until it answers"
            ));
        }
        if let Some(r) = &self.redis {
            r.reset();
        }
    }

    fn count(&self, check: &Check, v: &Verdict, fallback: bool) {
        let mut stats = lock(&self.stats);
        let refused = v.refused.as_ref().map(|o| o.applied.rule);
        for a in check.enforce.iter() {
            with_stats(&mut stats, &a.name, |s| {
                if refused == Some(a.rule) {
                    s.refused += 1;
                } else if refused.is_none() {
                    s.admitted += 1;
                }
                s.fallback += u64::from(fallback);
            });
        }
        let warned = v.warned.as_ref().map(|o| o.applied.rule);
        for a in check.warn.iter() {
            with_stats(&mut stats, &a.name, |s| {
                if warned == Some(a.rule) {
                    s.warned += 1;
                } else {
                    s.admitted += 1;
                }
                s.fallback += u64::from(fallback);
            });
        }
    }

    /// An admin's statement that these windows would have counted.
    pub fn bypassed(&self, applied: &[Applied]) {
        let mut stats = lock(&self.stats);
        for a in applied {
            with_stats(&mut stats, &a.name, |s| s.bypassed += 1);
        }
    }

    pub fn stats(&self) -> BTreeMap<String, RuleStats> {
        lock(&self.stats).clone()
    }

    pub fn metrics(&self) -> String {
        let stats = self.stats();
        let mut outcomes = Vec::new();
        for (name, s) in &stats {
            for (outcome, v) in [
                ("admitted", s.admitted),
                ("refused", s.refused),
                ("warned", s.warned),
                ("bypassed", s.bypassed),
            ] {
                outcomes.push((
                    vec![("rule", name.as_str()), ("outcome", outcome)],
                    v as f64,
                ));
            }
        }
        let fallback: Vec<_> = stats
            .iter()
            .map(|(name, s)| (vec![("rule", name.as_str())], s.fallback as f64))
            .collect();
        let mut e = Exposition::default();
        e.counters(
            "dbopt_router_limit_statements_total",
            "Statements under a rate limit, per rule and outcome (admitted, refused, warned, bypassed by an admin).",
            &outcomes,
        )
        .counters(
            "dbopt_router_limit_fallback_total",
            "Decisions made without Redis while it was unreachable (limits.on_redis_error), per rule.",
            &fallback,
        )
        .counter(
            "dbopt_router_limit_redis_errors_total",
            "Rate-limit checks Redis did not answer.",
            self.redis_errors.load(Ordering::Relaxed) as f64,
        )
        .gauge(
            "dbopt_router_limit_redis_up",
            "1 while rate-limit windows are shared through Redis.",
            f64::from(u8::from(self.redis_up())),
        );
        e.finish()
    }

    pub fn status(&self) -> serde_json::Value {
        let rules: serde_json::Map<String, serde_json::Value> = self
            .stats()
            .into_iter()
            .map(|(name, s)| {
                (
                    name,
                    serde_json::json!({"admitted": s.admitted, "refused": s.refused,
                        "warned": s.warned, "bypassed": s.bypassed, "fallback": s.fallback}),
                )
            })
            .collect();
        serde_json::json!({
            "shared": self.redis.is_some(),
            "redis": self.redis.as_ref().map(|r| r.address().to_string()),
            "redis_up": self.redis_up(),
            "redis_errors": self.redis_errors.load(Ordering::Relaxed),
            "local_windows": lock(&self.local).len(),
            "leases": lock(&self.leases).len(),
            "rules": rules,
        })
    }
}

/// A rule's counters; allocates only the first time (this runs for every statement).
fn with_stats(stats: &mut BTreeMap<String, RuleStats>, name: &str, f: impl FnOnce(&mut RuleStats)) {
    match stats.get_mut(name) {
        Some(s) => f(s),
        None => {
            let mut s = RuleStats::default();
            f(&mut s);
            stats.insert(name.to_string(), s);
        }
    }
}

/// A batch of more statements than a window's limit costs the whole limit.
fn cost_for(cost: u64, set: &[Applied]) -> u64 {
    let least = set.iter().map(|a| a.limit).min().unwrap_or(1);
    cost.clamp(1, least)
}

/// One `DBOPT.RL.LEASE` reply: the units granted, or the refusing window (index into a set of
/// `n`) and the wait. Anything else is an error (Redis without the module, or an older module).
fn parse_lease(reply: &Reply, n: usize) -> Result<Result<u64, (usize, u64)>, RedisError> {
    let bad = || RedisError(format!("unexpected DBOPT.RL.LEASE reply {reply:?}"));
    let Reply::Array(f) = reply else {
        return Err(bad());
    };
    let v: Vec<i64> = f
        .iter()
        .map(|x| match x {
            Reply::Int(i) => Ok(*i),
            _ => Err(bad()),
        })
        .collect::<Result<_, _>>()?;
    if v.len() != 7 {
        return Err(bad());
    }
    if v[0] == 1 {
        return u64::try_from(v[6])
            .ok()
            .filter(|&g| g >= 1)
            .map(Ok)
            .ok_or_else(bad);
    }
    let i = usize::try_from(v[1])
        .ok()
        .filter(|&i| i < n)
        .ok_or_else(bad)?;
    Ok(Err((i, v[4].max(0) as u64)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn applied(name: &str, rule: usize) -> Applied {
        Applied {
            rule,
            name: name.into(),
            key: format!("dbopt:rl:{name}:g").into_bytes(),
            limit: 2,
            window_ms: 1000,
            warn: false,
            counts: "all statements".into(),
        }
    }

    fn check() -> Check {
        Check::new(
            1,
            vec![applied("a", 0), applied("b", 1)],
            vec![applied("w", 2)],
        )
    }

    fn with_redis() -> Limiter {
        // Never contacted in these tests: replies are given.
        let s = LimitSettings {
            redis: Some("127.0.0.1:1".into()),
            ..LimitSettings::default()
        };
        Limiter::new(&s, None)
    }

    fn lease_reply(fields: [i64; 7]) -> Reply {
        Reply::Array(fields.iter().map(|&i| Reply::Int(i)).collect())
    }

    #[test]
    fn commands_charge_enforced_and_warned_windows_separately() {
        let l = with_redis();
        let p = l.begin(check());
        assert_eq!(p.need, [Some(1), Some(1)]);
        let c = Limiter::commands(&p);
        assert_eq!(c.len(), 2);
        let first = String::from_utf8_lossy(&c[0]);
        assert!(first.contains("DBOPT.RL.LEASE") && first.contains("dbopt:rl:b:g"));
        assert!(!first.contains("dbopt:rl:w:g"));
        // Counted in windows a lease's life longer than the rule's.
        assert!(first.contains("\r\n1032\r\n"), "{first:?}");
    }

    #[tokio::test]
    async fn replies_become_verdicts_and_garbage_is_an_error() {
        let l = with_redis();
        let s = LimitSettings::default();
        let ok = lease_reply([1, -1, 2, 1, -1, 900, 1]);
        let no = lease_reply([0, 1, 2, 0, 250, 900, 0]);
        let v = l
            .finish(&s, l.begin(check()), Some(Ok(vec![no.clone(), ok.clone()])))
            .await;
        let r = v.refused.unwrap();
        assert_eq!((r.applied.name.as_str(), r.retry_after_ms), ("b", 250));
        assert!(v.warned.is_none());
        let no_first = lease_reply([0, 0, 2, 0, 250, 900, 0]);
        let v = l
            .finish(&s, l.begin(check()), Some(Ok(vec![ok.clone(), no_first])))
            .await;
        assert!(v.refused.is_none());
        assert_eq!(v.warned.unwrap().applied.name, "w");
        for garbage in [
            vec![Reply::Error("ERR unknown command".into()), ok.clone()],
            vec![ok.clone()],
            vec![lease_reply([0, 7, 0, 0, 0, 0, 0]), ok.clone()],
            vec![lease_reply([1, -1, 0, 0, 0, 0, 0]), ok.clone()],
        ] {
            assert!(
                l.shared_verdict(&l.begin(check()), &garbage).is_err(),
                "{garbage:?}"
            );
        }
    }

    #[tokio::test]
    async fn leases_admit_without_asking_redis_until_used_up() {
        let l = with_redis();
        let s = LimitSettings::default();
        let mut big = applied("big", 0);
        big.limit = 100_000;
        let c = Check::new(1, vec![big], vec![]);
        // Redis grants 3 units: this statement and two more.
        let p = l.begin(c.clone());
        assert!(p.needs_redis());
        let v = l
            .finish(
                &s,
                p,
                Some(Ok(vec![lease_reply([1, -1, 100_000, 99_997, -1, 1000, 3])])),
            )
            .await;
        assert!(v.refused.is_none());
        for _ in 0..2 {
            let p = l.begin(c.clone());
            assert!(!p.needs_redis(), "covered by the lease");
            assert!(l.finish(&s, p, None).await.refused.is_none());
        }
        let p = l.begin(c.clone());
        assert_eq!(
            p.need,
            [Some(2), None],
            "used up: the next lease is twice as big"
        );
        assert_eq!(l.stats()["big"].admitted, 3);
    }

    #[tokio::test]
    async fn without_redis_windows_are_local_and_exact() {
        let l = Limiter::new(&LimitSettings::default(), None);
        let s = LimitSettings::default();
        let c = Check::new(1, vec![applied("a", 0)], vec![]);
        assert!(l.decide(&s, c.clone()).await.refused.is_none());
        assert!(l.decide(&s, c.clone()).await.refused.is_none());
        let v = l.decide(&s, c.clone()).await;
        assert_eq!(v.refused.unwrap().source, Source::Local);
        let st = l.stats()["a"];
        assert_eq!((st.admitted, st.refused, st.fallback), (2, 1, 0));
    }

    #[tokio::test]
    async fn unreachable_redis_falls_back_as_configured() {
        // A port nothing listens on: connection refused at once.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let c = Check::new(1, vec![applied("a", 0)], vec![]);
        for (fallback, refused_third) in [
            (Fallback::Local, Some(Source::Local)),
            (Fallback::Open, None),
            (Fallback::Closed, Some(Source::Closed)),
        ] {
            let s = LimitSettings {
                redis: Some(addr.clone()),
                on_redis_error: fallback,
                routers: 2,
                ..LimitSettings::default()
            };
            let l = Limiter::new(&s, None);
            let first = l.decide(&s, c.clone()).await;
            assert!(!l.redis_up());
            let third = {
                l.decide(&s, c.clone()).await;
                l.decide(&s, c.clone()).await
            };
            match fallback {
                // Two routers share a limit of 2: each admits 1 on its own.
                Fallback::Local => {
                    assert!(first.refused.is_none());
                    assert_eq!(third.refused.as_ref().map(|o| o.limit), Some(1));
                }
                Fallback::Closed => assert!(first.refused.is_some()),
                Fallback::Open => assert!(first.refused.is_none()),
            }
            assert_eq!(
                third.refused.map(|o| o.source),
                refused_third,
                "{fallback:?}"
            );
            assert_eq!(l.stats()["a"].fallback, 3);
        }
    }
}
