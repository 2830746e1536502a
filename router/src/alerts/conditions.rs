//! From what the router sees (a [`Snapshot`] taken every evaluation) to the conditions that hold,
//! pure. Counters become per-minute rates over a sliding minute; a change of primary becomes a
//! condition that holds until the new primary has kept the role for `resolve_after`.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::engine::Condition;
use super::settings::{AlertKind, Effective};

/// The router's view at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub now_ms: u64,
    pub primary: Option<String>,
    pub nodes: Vec<NodeView>,
    pub pools: Vec<PoolView>,
    /// Server errors and pool acquisition failures since start.
    pub errors_total: u64,
    /// Refused statements since start, per `[limits]` rule.
    pub refusals: BTreeMap<String, u64>,
    pub invalidation_failures: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub reachable: bool,
    pub replica: bool,
    pub lag_s: Option<f64>,
    pub breaker: &'static str,
    pub last_error: Option<String>,
    pub slow_total: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolView {
    pub node: String,
    pub database: String,
    pub role: String,
    pub in_use: u32,
    pub max: u32,
}

/// The last primary change, held until the new primary has kept the role long enough.
#[derive(Debug, Clone, PartialEq)]
struct Change {
    old: String,
    new: String,
    /// When the old primary was last seen in the role.
    lost_ms: u64,
    at_ms: u64,
}

const MINUTE_MS: u64 = 60_000;

/// State kept between evaluations.
#[derive(Debug, Default)]
pub struct Watch {
    last_primary: Option<String>,
    /// When `last_primary` was last seen as the primary.
    last_primary_seen_ms: u64,
    change: Option<Change>,
    /// (time, value) samples over the last minute, per counter.
    series: HashMap<String, VecDeque<(u64, u64)>>,
}

impl Watch {
    /// The conditions holding in `s`; `effective` gives each kind's settings (disabled kinds are
    /// left out).
    pub fn conditions(
        &mut self,
        s: &Snapshot,
        effective: impl Fn(AlertKind) -> Effective,
    ) -> Vec<Condition> {
        let now = s.now_ms;
        let mut out = Vec::new();
        let on = |k: AlertKind| {
            let e = effective(k);
            e.enabled.then_some(e)
        };

        // The primary: a change from a known primary to another.
        if let Some(p) = &s.primary {
            match &self.last_primary {
                Some(old) if old != p => {
                    self.change = Some(Change {
                        old: old.clone(),
                        new: p.clone(),
                        lost_ms: self.last_primary_seen_ms,
                        at_ms: now,
                    });
                }
                _ => {}
            }
            self.last_primary = Some(p.clone());
            self.last_primary_seen_ms = now;
        }
        if let (Some(e), Some(c)) = (on(AlertKind::PrimaryChanged), &self.change) {
            let held = s.primary.as_deref() == Some(c.new.as_str());
            if held && now.saturating_sub(c.at_ms) < e.resolve_after_ms {
                let took = c.at_ms.saturating_sub(c.lost_ms) as f64 / 1000.0;
                out.push(Condition {
                    kind: AlertKind::PrimaryChanged,
                    labels: labels(&[("old_primary", &c.old), ("new_primary", &c.new)]),
                    summary: format!(
                        "primary moved from {} to {}: writes served again {took:.1} s after {} was last seen as primary",
                        c.old, c.new, c.old
                    ),
                    value: took,
                });
            }
        }

        for n in &s.nodes {
            if on(AlertKind::NodeDown).is_some() && !n.reachable {
                out.push(Condition {
                    kind: AlertKind::NodeDown,
                    labels: labels(&[("node", &n.name)]),
                    summary: format!(
                        "node {} is unreachable: {}",
                        n.name,
                        n.last_error.as_deref().unwrap_or("no answer")
                    ),
                    value: 1.0,
                });
            }
            if on(AlertKind::BreakerOpen).is_some() && n.breaker != "closed" {
                out.push(Condition {
                    kind: AlertKind::BreakerOpen,
                    labels: labels(&[("node", &n.name)]),
                    summary: format!("circuit breaker of node {} is {}", n.name, n.breaker),
                    value: 1.0,
                });
            }
            if let Some(e) = on(AlertKind::ReplicaLag) {
                if let (true, true, Some(lag)) = (n.reachable, n.replica, n.lag_s) {
                    if lag > e.threshold {
                        out.push(Condition {
                            kind: AlertKind::ReplicaLag,
                            labels: labels(&[("node", &n.name)]),
                            summary: format!(
                                "replica {} replays {lag:.1} s behind (threshold {} s)",
                                n.name, e.threshold
                            ),
                            value: lag,
                        });
                    }
                }
            }
            if let (Some(e), Some(total)) = (on(AlertKind::SlowStatements), n.slow_total) {
                let per_min = self.per_minute(&format!("slow/{}", n.name), now, total);
                if per_min > e.threshold {
                    out.push(Condition {
                        kind: AlertKind::SlowStatements,
                        labels: labels(&[("node", &n.name)]),
                        summary: format!(
                            "{per_min:.0} slow statements in the last minute on {} (threshold {})",
                            n.name, e.threshold
                        ),
                        value: per_min,
                    });
                }
            }
        }

        if let Some(e) = on(AlertKind::PoolSaturation) {
            for p in s.pools.iter().filter(|p| p.max > 0) {
                let used = f64::from(p.in_use) / f64::from(p.max);
                if used > e.threshold {
                    out.push(Condition {
                        kind: AlertKind::PoolSaturation,
                        labels: labels(&[("node", &p.node), ("database", &p.database), ("role", &p.role)]),
                        summary: format!(
                            "pool {}/{} on {} has {} of {} connections in use ({:.0} %, threshold {:.0} %)",
                            p.role,
                            p.database,
                            p.node,
                            p.in_use,
                            p.max,
                            used * 100.0,
                            e.threshold * 100.0
                        ),
                        value: used,
                    });
                }
            }
        }

        let errors_per_min = self.per_minute("errors", now, s.errors_total);
        if let Some(e) = on(AlertKind::ErrorRate) {
            let per_s = errors_per_min / 60.0;
            if per_s > e.threshold {
                out.push(Condition {
                    kind: AlertKind::ErrorRate,
                    labels: BTreeMap::new(),
                    summary: format!(
                        "{per_s:.1} errors per second over the last minute (threshold {})",
                        e.threshold
                    ),
                    value: per_s,
                });
            }
        }
        let failures = self.per_minute("invalidation", now, s.invalidation_failures);
        if let Some(e) = on(AlertKind::CacheInvalidationFailures) {
            if failures > e.threshold {
                out.push(Condition {
                    kind: AlertKind::CacheInvalidationFailures,
                    labels: BTreeMap::new(),
                    summary: format!(
                        "{failures:.0} cache invalidations may have been missed in the last minute \
                         (the cache is bypassed until resynchronised)"
                    ),
                    value: failures,
                });
            }
        }
        for (rule, total) in &s.refusals {
            let per_min = self.per_minute(&format!("refused/{rule}"), now, *total);
            if let Some(e) = on(AlertKind::RateLimitRefusals) {
                if per_min > e.threshold {
                    out.push(Condition {
                        kind: AlertKind::RateLimitRefusals,
                        labels: labels(&[("rule", rule)]),
                        summary: format!(
                            "rate-limit rule {rule:?} refused {per_min:.0} statements in the last minute (threshold {})",
                            e.threshold
                        ),
                        value: per_min,
                    });
                }
            }
        }
        out
    }

    /// How much `value` (a counter) grew over the last minute (less when less history is kept;
    /// a counter that went down — a restarted server — starts over).
    fn per_minute(&mut self, key: &str, now: u64, value: u64) -> f64 {
        let q = self.series.entry(key.to_string()).or_default();
        if q.back().is_some_and(|&(_, v)| v > value) {
            q.clear();
        }
        q.push_back((now, value));
        while q.len() > 1
            && q.front()
                .is_some_and(|&(t, _)| now.saturating_sub(t) > MINUTE_MS)
        {
            q.pop_front();
        }
        let first = q.front().map_or(value, |&(_, v)| v);
        value.saturating_sub(first) as f64
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::alerts::settings::{AlertSettings, Severity};

    fn node(name: &str, replica: bool) -> NodeView {
        NodeView {
            name: name.into(),
            reachable: true,
            replica,
            lag_s: Some(0.0),
            breaker: "closed",
            last_error: None,
            slow_total: Some(0),
        }
    }

    fn snap(now_ms: u64, primary: &str) -> Snapshot {
        Snapshot {
            now_ms,
            primary: Some(primary.into()),
            nodes: vec![
                node("node0", primary != "node0"),
                node("node1", primary != "node1"),
            ],
            pools: vec![PoolView {
                node: "node0".into(),
                database: "postgres".into(),
                role: "app".into(),
                in_use: 1,
                max: 10,
            }],
            ..Snapshot::default()
        }
    }

    fn settings(extra: &str) -> AlertSettings {
        let s: AlertSettings = toml::from_str(&format!(
            "[[channels]]\nname = \"l\"\nkind = \"log\"\n{extra}"
        ))
        .unwrap();
        s.validate().unwrap();
        s
    }

    fn kinds(c: &[Condition]) -> Vec<AlertKind> {
        c.iter().map(|c| c.kind).collect()
    }

    #[test]
    fn a_quiet_cluster_holds_no_condition() {
        let s = settings("");
        let mut w = Watch::default();
        for t in 0..5 {
            assert!(w
                .conditions(&snap(t * 1000, "node0"), |k| s.effective(k))
                .is_empty());
        }
    }

    #[test]
    fn a_primary_change_holds_until_the_new_one_kept_the_role() {
        let s = settings("[[rules]]\nalert = \"primary_changed\"\nresolve_after_s = 5\n");
        let mut w = Watch::default();
        assert!(w
            .conditions(&snap(0, "node0"), |k| s.effective(k))
            .is_empty());
        // node0 lost: no primary for a while, then node1.
        let mut gap = snap(1000, "node0");
        gap.primary = None;
        gap.nodes[0].reachable = false;
        assert_eq!(
            kinds(&w.conditions(&gap, |k| s.effective(k))),
            vec![AlertKind::NodeDown]
        );
        let mut after = snap(13_000, "node1");
        after.nodes[0].reachable = false;
        let c = w.conditions(&after, |k| s.effective(k));
        assert_eq!(
            kinds(&c),
            vec![AlertKind::PrimaryChanged, AlertKind::NodeDown]
        );
        assert_eq!(c[0].labels["old_primary"], "node0");
        assert_eq!(c[0].labels["new_primary"], "node1");
        assert_eq!(
            c[0].value, 13.0,
            "from node0 last seen (0 s) to node1 (13 s)"
        );
        assert!(c[0].summary.contains("13.0 s"), "{}", c[0].summary);
        let c = w.conditions(&snap(17_999, "node1"), |k| s.effective(k));
        assert_eq!(kinds(&c), vec![AlertKind::PrimaryChanged]);
        assert!(w
            .conditions(&snap(18_000, "node1"), |k| s.effective(k))
            .is_empty());
        // The first primary seen is not a change.
        let mut w = Watch::default();
        assert!(w
            .conditions(&snap(0, "node1"), |k| s.effective(k))
            .is_empty());
    }

    #[test]
    fn thresholds_apply_per_kind() {
        let s = settings(
            "[[rules]]\nalert = \"replica_lag\"\nthreshold = 5\n\
             [[rules]]\nalert = \"slow_statements\"\nthreshold = 2\n\
             [[rules]]\nalert = \"rate_limit_refusals\"\nthreshold = 10\n\
             [[rules]]\nalert = \"error_rate\"\nthreshold = 0.5\n",
        );
        let mut w = Watch::default();
        let mut a = snap(0, "node0");
        a.refusals.insert("r1".into(), 100);
        a.errors_total = 7;
        assert!(w.conditions(&a, |k| s.effective(k)).is_empty());
        let mut b = snap(30_000, "node0");
        b.nodes[1].lag_s = Some(5.5);
        b.nodes[0].lag_s = Some(99.0); // the primary: never a lag alert
        b.nodes[0].breaker = "open";
        b.nodes[1].slow_total = Some(3);
        b.pools[0].in_use = 9;
        b.refusals.insert("r1".into(), 111);
        b.errors_total = 7 + 31; // 31 in 30 s: 0.52/s over the minute
        b.invalidation_failures = 1;
        let c = w.conditions(&b, |k| s.effective(k));
        let mut k = kinds(&c);
        k.sort();
        assert_eq!(
            k,
            vec![
                AlertKind::ReplicaLag,
                AlertKind::BreakerOpen,
                AlertKind::PoolSaturation,
                AlertKind::ErrorRate,
                AlertKind::SlowStatements,
                AlertKind::CacheInvalidationFailures,
                AlertKind::RateLimitRefusals,
            ]
        );
        let pool = c
            .iter()
            .find(|c| c.kind == AlertKind::PoolSaturation)
            .unwrap();
        assert_eq!(pool.labels["role"], "app");
        assert!((pool.value - 0.9).abs() < 1e-9);
        // A minute later with no new events the rates are back to nothing.
        let mut d = b.clone();
        d.now_ms = 95_000;
        d.nodes[1].lag_s = Some(0.1);
        d.nodes[0].breaker = "closed";
        d.pools[0].in_use = 8; // 80 % is not above 80 %
        assert!(w.conditions(&d, |k| s.effective(k)).is_empty());
    }

    #[test]
    fn disabled_kinds_and_restarted_counters() {
        let s =
            settings("[[rules]]\nalert = \"node_down\"\nenabled = false\nseverity = \"info\"\n");
        assert_eq!(s.effective(AlertKind::NodeDown).severity, Severity::Info);
        let mut w = Watch::default();
        let mut a = snap(0, "node0");
        a.nodes[1].reachable = false;
        a.nodes[1].slow_total = Some(500);
        assert!(w.conditions(&a, |k| s.effective(k)).is_empty());
        // The node restarted: its counter starts from 0 again, no negative or huge rate.
        a.now_ms = 1000;
        a.nodes[1].slow_total = Some(3);
        assert!(w.conditions(&a, |k| s.effective(k)).is_empty());
    }
}
