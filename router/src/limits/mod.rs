//! Rate limits on statements: sliding windows per router user, per end user of the application,
//! globally, per database and per node, shared by every router through the Redis module
//! (`DBOPT.RL.HITALL`: a statement is admitted by all its windows or charged to none), with a
//! local fallback while Redis is unreachable.
//!
//! # Layout
//! - [`settings`] — the `[limits]` configuration; [`rules`] — which windows a statement is
//!   counted in (pure); [`end_user`] — the end user from a SQLCommenter comment (pure);
//!   [`local`] — windows in this router's memory (pure).
//! - [`Limiter`] (this file) — the decision: Redis or fallback, counters, logging once per episode.
//! - The session's side (when a batch is checked, how a refusal reaches the client) is in
//!   `crate::rate_limited`.

pub mod end_user;
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

/// The windows one check charges: the enforced ones in one all-or-nothing call, the warn-mode
/// ones in another.
#[derive(Debug, Clone)]
pub struct Check {
    pub cost: u64,
    pub enforce: Vec<Applied>,
    pub warn: Vec<Applied>,
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

    /// The Redis commands of a check, in the order their replies are read.
    pub fn commands(check: &Check) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(2);
        for set in [&check.enforce, &check.warn] {
            if set.is_empty() {
                continue;
            }
            // A batch of more statements than a window's limit costs the whole limit.
            let least = set.iter().map(|a| a.limit).min().unwrap_or(1);
            let cost = check.cost.clamp(1, least).to_string();
            let nums: Vec<(String, String)> = set
                .iter()
                .map(|a| (a.limit.to_string(), a.window_ms.to_string()))
                .collect();
            let mut args: Vec<&[u8]> = vec![b"DBOPT.RL.HITALL", cost.as_bytes()];
            for (a, (l, w)) in set.iter().zip(&nums) {
                args.extend([a.key.as_slice(), l.as_bytes(), w.as_bytes()]);
            }
            out.push(encode(&args));
        }
        out
    }

    /// Decides on a check. `replies`: the answers to [`Limiter::commands`] when the caller already
    /// sent them (pipelined with a cache lookup).
    pub async fn decide(
        &self,
        settings: &LimitSettings,
        check: &Check,
        replies: Option<Result<Vec<Reply>, RedisError>>,
    ) -> Verdict {
        let shared = match (replies, self.try_redis()) {
            (Some(r), _) => Some(r),
            (None, true) => match &self.redis {
                Some(r) => Some(r.pipeline(&Self::commands(check)).await),
                None => None,
            },
            (None, false) => None,
        };
        let verdict = match shared {
            Some(Ok(replies)) => match verdict_of(check, &replies) {
                Ok(v) => {
                    self.redis_answered();
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
        let fallback = verdict.is_none() && self.redis.is_some();
        let verdict =
            verdict.unwrap_or_else(|| match (self.redis.is_some(), settings.on_redis_error) {
                (true, Fallback::Open) => Verdict::default(),
                (true, Fallback::Closed) => Verdict {
                    refused: check.enforce.first().map(|a| Over {
                        applied: a.clone(),
                        limit: a.limit,
                        retry_after_ms: RETRY_MS,
                        source: Source::Closed,
                    }),
                    warned: None,
                },
                (redis, _) => self.local_verdict(check, if redis { settings.routers } else { 1 }),
            });
        self.count(check, &verdict, fallback);
        verdict
    }

    fn local_verdict(&self, check: &Check, routers: u32) -> Verdict {
        let now = unix_ms();
        let mut local = lock(&self.local);
        let mut over = |set: &[Applied]| -> Option<Over> {
            if set.is_empty() {
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
            refused: over(&check.enforce),
            warned: over(&check.warn),
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
        for a in &check.enforce {
            let s = stats.entry(a.name.clone()).or_default();
            if refused == Some(a.rule) {
                s.refused += 1;
            } else if refused.is_none() {
                s.admitted += 1;
            }
            s.fallback += u64::from(fallback);
        }
        let warned = v.warned.as_ref().map(|o| o.applied.rule);
        for a in &check.warn {
            let s = stats.entry(a.name.clone()).or_default();
            if warned == Some(a.rule) {
                s.warned += 1;
            } else {
                s.admitted += 1;
            }
            s.fallback += u64::from(fallback);
        }
    }

    /// An admin's statement that these windows would have counted.
    pub fn bypassed(&self, applied: &[Applied]) {
        let mut stats = lock(&self.stats);
        for a in applied {
            stats.entry(a.name.clone()).or_default().bypassed += 1;
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
            "rules": rules,
        })
    }
}

/// The verdict from the replies to [`Limiter::commands`]; an unexpected reply is an error (Redis
/// without the module, or an older module).
fn verdict_of(check: &Check, replies: &[Reply]) -> Result<Verdict, RedisError> {
    let mut it = replies.iter();
    let mut read = |set: &[Applied]| -> Result<Option<Over>, RedisError> {
        if set.is_empty() {
            return Ok(None);
        }
        let bad = |r: &Reply| RedisError(format!("unexpected DBOPT.RL.HITALL reply {r:?}"));
        let reply = it
            .next()
            .ok_or_else(|| RedisError("missing reply".into()))?;
        let Reply::Array(f) = reply else {
            return Err(bad(reply));
        };
        let n: Vec<i64> = f
            .iter()
            .map(|x| match x {
                Reply::Int(i) => Ok(*i),
                _ => Err(bad(reply)),
            })
            .collect::<Result<_, _>>()?;
        if n.len() != 6 {
            return Err(bad(reply));
        }
        if n[0] == 1 {
            return Ok(None);
        }
        let i = usize::try_from(n[1])
            .ok()
            .filter(|&i| i < set.len())
            .ok_or_else(|| bad(reply))?;
        Ok(Some(Over {
            applied: set[i].clone(),
            limit: set[i].limit,
            retry_after_ms: n[4].max(0) as u64,
            source: Source::Shared,
        }))
    };
    Ok(Verdict {
        refused: read(&check.enforce)?,
        warned: read(&check.warn)?,
    })
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
        Check {
            cost: 1,
            enforce: vec![applied("a", 0), applied("b", 1)],
            warn: vec![applied("w", 2)],
        }
    }

    #[test]
    fn commands_charge_enforced_and_warned_windows_separately() {
        let c = Limiter::commands(&check());
        assert_eq!(c.len(), 2);
        let first = String::from_utf8_lossy(&c[0]);
        assert!(first.contains("DBOPT.RL.HITALL") && first.contains("dbopt:rl:b:g"));
        assert!(!first.contains("dbopt:rl:w:g"));
    }

    #[test]
    fn replies_become_verdicts_and_garbage_is_an_error() {
        let ok = Reply::Array(vec![
            Reply::Int(1),
            Reply::Int(-1),
            Reply::Int(2),
            Reply::Int(1),
            Reply::Int(-1),
            Reply::Int(900),
        ]);
        let no = Reply::Array(vec![
            Reply::Int(0),
            Reply::Int(1),
            Reply::Int(2),
            Reply::Int(0),
            Reply::Int(250),
            Reply::Int(900),
        ]);
        let v = verdict_of(&check(), &[no.clone(), ok.clone()]).unwrap();
        let r = v.refused.unwrap();
        assert_eq!((r.applied.name.as_str(), r.retry_after_ms), ("b", 250));
        assert!(v.warned.is_none());
        let no_first = Reply::Array(vec![
            Reply::Int(0),
            Reply::Int(0),
            Reply::Int(2),
            Reply::Int(0),
            Reply::Int(250),
            Reply::Int(900),
        ]);
        let v = verdict_of(&check(), &[ok.clone(), no_first]).unwrap();
        assert!(v.refused.is_none());
        assert_eq!(v.warned.unwrap().applied.name, "w");
        for garbage in [
            vec![Reply::Error("ERR unknown command".into()), ok.clone()],
            vec![ok.clone()],
            vec![
                Reply::Array(vec![
                    Reply::Int(0),
                    Reply::Int(7),
                    Reply::Int(0),
                    Reply::Int(0),
                    Reply::Int(0),
                    Reply::Int(0),
                ]),
                ok.clone(),
            ],
        ] {
            assert!(verdict_of(&check(), &garbage).is_err(), "{garbage:?}");
        }
    }

    #[tokio::test]
    async fn without_redis_windows_are_local_and_exact() {
        let l = Limiter::new(&LimitSettings::default(), None);
        let s = LimitSettings::default();
        let c = Check {
            cost: 1,
            enforce: vec![applied("a", 0)],
            warn: vec![],
        };
        assert!(l.decide(&s, &c, None).await.refused.is_none());
        assert!(l.decide(&s, &c, None).await.refused.is_none());
        let v = l.decide(&s, &c, None).await;
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
        let c = Check {
            cost: 1,
            enforce: vec![applied("a", 0)],
            warn: vec![],
        };
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
            let first = l.decide(&s, &c, None).await;
            assert!(!l.redis_up());
            let third = {
                l.decide(&s, &c, None).await;
                l.decide(&s, &c, None).await
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
