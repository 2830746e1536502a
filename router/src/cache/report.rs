//! The cache in `/metrics` (Prometheus text, through `querystats::exposition`) and `/status`, and
//! manual invalidation from the admin endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

use dbopt_invalidation::{check_user_tag, Tag};
use dbopt_querystats::exposition::Exposition;
use serde_json::json;

use crate::cache::{lock, Cache, CacheCounters};

/// The cache's plain counters, once for `/metrics` and `/status`:
/// (metric name, help, `/status` key, counter).
fn plain_counters(
    c: &CacheCounters,
) -> [(&'static str, &'static str, &'static str, &AtomicU64); 11] {
    [
        (
            "dbopt_router_cache_fills_not_admitted_total",
            "Replica fills not stored: the replica had not replayed a recent invalidation.",
            "fills_not_admitted",
            &c.fills_not_admitted,
        ),
        (
            "dbopt_router_cache_replay_probes_total",
            "Replica fills that first asked the replica how far it had replayed (the router's sample was too old to admit them).",
            "replay_probes",
            &c.replay_probes,
        ),
        (
            "dbopt_router_cache_bypassed_total",
            "Cacheable reads sent to PostgreSQL because the cache could not vouch for them.",
            "bypassed",
            &c.bypassed,
        ),
        (
            "dbopt_router_cache_uncacheable_total",
            "Hinted reads PostgreSQL's analysis refused.",
            "uncacheable",
            &c.uncacheable,
        ),
        (
            "dbopt_router_cache_invalidations_total",
            "Announcements applied.",
            "invalidations",
            &c.invalidations,
        ),
        (
            "dbopt_router_cache_resyncs_total",
            "Resynchronisations (listener reconnected, Redis back).",
            "resyncs",
            &c.resyncs,
        ),
        (
            "dbopt_router_cache_redis_errors_total",
            "Failed Redis calls.",
            "redis_errors",
            &c.redis_errors,
        ),
        (
            "dbopt_router_cache_invalidation_failures_total",
            "Invalidations that may have been missed (Redis failed, or the listener lost its connection).",
            "invalidation_failures",
            &c.invalidation_failures,
        ),
        (
            "dbopt_router_cache_barrier_timeouts_total",
            "Barriers not answered in time.",
            "barrier_timeouts",
            &c.barrier_timeouts,
        ),
        (
            "dbopt_router_cache_refreshes_total",
            "Fills the router did itself (write-through, warming).",
            "refreshes",
            &c.refreshes,
        ),
        (
            "dbopt_router_cache_refresh_failures_total",
            "Write-through or warming fills that failed (the entry stays invalidated).",
            "refresh_failures",
            &c.refresh_failures,
        ),
    ]
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// `/metrics` lines for the cache.
pub fn metrics(cache: &Cache) -> String {
    let l = lock(&cache.local).stats;
    let c = &cache.counters;
    let layer = |local: u64, redis: &AtomicU64| {
        vec![
            (vec![("layer", "local")], local as f64),
            (vec![("layer", "redis")], get(redis) as f64),
        ]
    };
    let mut e = Exposition::default();
    e.counters(
        "dbopt_router_cache_hits_total",
        "Cache hits, per layer.",
        &layer(l.hits, &c.redis_hits),
    )
    .counters(
        "dbopt_router_cache_misses_total",
        "Cache misses, per layer.",
        &layer(l.misses, &c.redis_misses),
    )
    .counters(
        "dbopt_router_cache_fills_total",
        "Entries stored, per layer.",
        &layer(l.fills, &c.redis_fills),
    )
    .counters(
        "dbopt_router_cache_refused_fills_total",
        "Fills refused because an invalidation raced them, per layer.",
        &layer(l.refused, &c.redis_refused),
    )
    .counter(
        "dbopt_router_cache_evictions_total",
        "Local entries evicted by the byte bound.",
        l.evictions as f64,
    )
    .gauge(
        "dbopt_router_cache_local_bytes",
        "Bytes held by the local layer.",
        l.bytes as f64,
    )
    .gauge(
        "dbopt_router_cache_local_entries",
        "Entries in the local layer.",
        l.entries as f64,
    )
    .gauge(
        "dbopt_router_cache_redis_up",
        "1 while Redis is used.",
        f64::from(u8::from(cache.redis_up())),
    );
    for (name, help, _, v) in plain_counters(c) {
        e.counter(name, help, get(v) as f64);
    }
    let delay = *lock(&cache.delay);
    e.histogram_seconds(
        "dbopt_router_cache_invalidation_delay_seconds",
        "From a transaction's commit to its invalidation applied in both layers.",
        &delay,
    );
    e.finish()
}

/// The `cache` section of `/status`.
pub fn status(cache: &Cache) -> serde_json::Value {
    let l = lock(&cache.local).stats;
    let c = &cache.counters;
    let delay = *lock(&cache.delay);
    let feeds: serde_json::Map<String, serde_json::Value> = lock(&cache.feeds)
        .iter()
        .map(|(db, f)| {
            (
                db.clone(),
                json!({"synced": f.synced, "processed_lsn": dbopt_invalidation::format_lsn(f.processed_lsn)}),
            )
        })
        .collect();
    let mut out = json!({
        "local": {"hits": l.hits, "misses": l.misses, "fills": l.fills, "refused": l.refused,
                  "evictions": l.evictions, "bytes": l.bytes, "entries": l.entries},
        "redis": {"up": cache.redis_up(), "hits": get(&c.redis_hits), "misses": get(&c.redis_misses),
                  "fills": get(&c.redis_fills), "refused": get(&c.redis_refused)},
        "invalidation_delay_ms": {"count": delay.n, "p50": delay.quantile_ms(0.5), "p99": delay.quantile_ms(0.99),
                                  "max": (delay.n > 0).then_some(delay.max_ms)},
        "databases": feeds,
    });
    for (_, _, key, v) in plain_counters(c) {
        out[key] = json!(get(v));
    }
    out
}

/// What a manual invalidation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manual {
    Tag(String),
    /// Application tags matching a glob (`*` any run, `?` one character): `user:*`.
    TagPattern(String),
    Table(u32),
    All,
}

/// Glob match of `*` and `?` (no classes, no escapes), iterative with one backtrack point.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Parses `db=…&tag=…` / `db=…&table=<oid>` / `db=…&all=1` (a form body or query string).
pub fn parse_manual(form: &str) -> Result<(String, Manual), String> {
    let mut db = None;
    let mut what = None;
    for pair in form.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let v = percent_decode(v).ok_or_else(|| format!("bad percent-encoding in {k}"))?;
        let next = match k {
            "db" => {
                db = Some(v);
                continue;
            }
            "tag" => {
                check_user_tag(&v).map_err(|e| e.to_string())?;
                Manual::Tag(v)
            }
            "tag_pattern" => {
                if v.is_empty() || v.len() > dbopt_invalidation::MAX_USER_TAG {
                    return Err("tag_pattern must be 1 to 256 bytes".into());
                }
                Manual::TagPattern(v)
            }
            "table" => Manual::Table(
                v.parse()
                    .map_err(|_| "table must be an OID (a number)".to_string())?,
            ),
            "all" => Manual::All,
            other => {
                return Err(format!(
                    "unknown field {other:?} (db, tag, tag_pattern, table, all)"
                ))
            }
        };
        if what.replace(next).is_some() {
            return Err("give exactly one of tag, tag_pattern, table, all".into());
        }
    }
    let db = db.filter(|d| !d.is_empty()).ok_or("db is required")?;
    Ok((db, what.ok_or("give one of tag, tag_pattern, table, all")?))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Applies a manual invalidation to both layers. A pattern reaches the tags the local layer holds
/// and the tag keys Redis holds (walked with SCAN, 1,000 keys a call); a fill running meanwhile
/// under a matching tag nobody held yet is not stopped (an operator's action, not a commit).
pub async fn invalidate(cache: &Cache, db: &str, what: &Manual, now_ms: u64) {
    let tag = match what {
        Manual::Tag(t) => Tag::User(db.to_string(), t.clone()),
        Manual::Table(oid) => Tag::Table(db.to_string(), *oid),
        Manual::All => Tag::Database(db.to_string()),
        Manual::TagPattern(p) => {
            let prefix = Tag::User(db.to_string(), String::new()).key();
            let full = format!("{prefix}{p}");
            lock(&cache.local).invalidate_matching(|t| glob(full.as_bytes(), t.as_bytes()));
            cache.invalidate_redis_matching(&full).await;
            return;
        }
    };
    cache.invalidate(db, &[tag], now_ms).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"user:*", b"user:42"));
        assert!(glob(b"user:?2", b"user:42"));
        assert!(!glob(b"user:?", b"user:42"));
        assert!(glob(b"*:4*", b"user:42"));
        assert!(!glob(b"team:*", b"user:42"));
        assert!(glob(b"*", b""));
        assert!(glob(b"a*b*c", b"aXXbYYc") && !glob(b"a*b*c", b"aXXbYY"));
    }

    #[test]
    fn manual_requests() {
        assert_eq!(
            parse_manual("db=shop&tag=user%3A42").unwrap(),
            ("shop".into(), Manual::Tag("user:42".into()))
        );
        assert_eq!(
            parse_manual("db=shop&table=16384").unwrap().1,
            Manual::Table(16384)
        );
        assert_eq!(parse_manual("db=shop&all=1").unwrap().1, Manual::All);
        assert_eq!(
            parse_manual("db=shop&tag_pattern=user%3A*").unwrap().1,
            Manual::TagPattern("user:*".into())
        );
        assert!(parse_manual("db=shop&tag_pattern=").is_err());
        assert!(parse_manual("tag=x").is_err());
        assert!(parse_manual("db=shop").is_err());
        assert!(parse_manual("db=shop&tag=a&all=1").is_err());
        assert!(parse_manual("db=shop&table=t").is_err());
        assert!(parse_manual("db=shop&tag=%ZZ").is_err());
        assert!(parse_manual("db=shop&evil=1").is_err());
        assert!(parse_manual("db=shop&tag=").is_err());
    }
}
