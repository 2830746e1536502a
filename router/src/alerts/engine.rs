//! The alert state machine, pure: conditions in, notifications out.
//!
//! An alert is identified by its fingerprint (a hash of its name and labels, stable across
//! restarts and routers, like Alertmanager's). A condition that holds for its rule's `for` fires
//! the alert once; while it keeps holding, the alert is sent again only every `renotify` interval;
//! once it no longer holds, the alert resolves once.

use std::collections::{BTreeMap, HashMap};

use super::settings::{AlertKind, Severity};

/// A condition that holds now.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub kind: AlertKind,
    /// Identifying labels (besides alertname, cluster and severity), e.g. `node`.
    pub labels: BTreeMap<String, String>,
    /// One line for humans: what, where, how much.
    pub summary: String,
    /// The measured value (lag seconds, fraction of the pool, rate...), for receivers.
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Firing,
    Resolved,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

/// One notification to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub fingerprint: String,
    pub kind: AlertKind,
    pub status: Status,
    pub severity: Severity,
    /// Every label, alertname, cluster and severity included.
    pub labels: BTreeMap<String, String>,
    pub summary: String,
    pub value: f64,
    pub starts_at_ms: u64,
    pub ends_at_ms: Option<u64>,
    pub sent_at_ms: u64,
    /// A repeat of a still-firing alert.
    pub repeat: bool,
}

/// What the engine needs of a kind's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindPolicy {
    pub for_ms: u64,
    pub severity: Severity,
}

#[derive(Debug)]
struct Tracked {
    condition: Condition,
    since_ms: u64,
    firing: bool,
    last_sent_ms: u64,
}

#[derive(Debug)]
pub struct Engine {
    cluster: String,
    renotify_ms: u64,
    tracked: HashMap<String, Tracked>,
}

impl Engine {
    pub fn new(cluster: &str, renotify_ms: u64) -> Engine {
        Engine {
            cluster: cluster.to_string(),
            renotify_ms,
            tracked: HashMap::new(),
        }
    }

    pub fn reconfigure(&mut self, cluster: &str, renotify_ms: u64) {
        self.cluster = cluster.to_string();
        self.renotify_ms = renotify_ms;
    }

    /// Feeds the conditions holding at `now_ms` (those of disabled kinds left out); returns what to
    /// send, in a stable order (resolutions first, then by fingerprint).
    pub fn evaluate(
        &mut self,
        now_ms: u64,
        conditions: Vec<Condition>,
        policy: impl Fn(AlertKind) -> KindPolicy,
    ) -> Vec<Notification> {
        let mut out = Vec::new();
        let mut holding: HashMap<String, Condition> = HashMap::new();
        for c in conditions {
            holding.insert(fingerprint(c.kind, &self.cluster, &c.labels), c);
        }
        let gone: Vec<String> = self
            .tracked
            .keys()
            .filter(|f| !holding.contains_key(*f))
            .cloned()
            .collect();
        for f in gone {
            let Some(t) = self.tracked.remove(&f) else {
                continue;
            };
            if t.firing {
                let p = policy(t.condition.kind);
                out.push(self.notification(&f, &t, p.severity, Status::Resolved, now_ms, false));
            }
        }
        let mut fresh: Vec<Notification> = Vec::new();
        for (f, c) in holding {
            let p = policy(c.kind);
            let t = self.tracked.entry(f.clone()).or_insert_with(|| Tracked {
                condition: c.clone(),
                since_ms: now_ms,
                firing: false,
                last_sent_ms: 0,
            });
            // The latest figures go out with the next notification; the identity stays.
            t.condition.summary = c.summary;
            t.condition.value = c.value;
            if !t.firing {
                if now_ms.saturating_sub(t.since_ms) >= p.for_ms {
                    t.firing = true;
                    t.last_sent_ms = now_ms;
                    let t = &self.tracked[&f];
                    fresh.push(self.notification(&f, t, p.severity, Status::Firing, now_ms, false));
                }
            } else if now_ms.saturating_sub(t.last_sent_ms) >= self.renotify_ms {
                t.last_sent_ms = now_ms;
                let t = &self.tracked[&f];
                fresh.push(self.notification(&f, t, p.severity, Status::Firing, now_ms, true));
            }
        }
        fresh.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        out.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        out.extend(fresh);
        out
    }

    /// The alerts firing now.
    pub fn firing(
        &self,
        policy: impl Fn(AlertKind) -> KindPolicy,
        now_ms: u64,
    ) -> Vec<Notification> {
        let mut v: Vec<Notification> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.firing)
            .map(|(f, t)| {
                let mut n = self.notification(
                    f,
                    t,
                    policy(t.condition.kind).severity,
                    Status::Firing,
                    now_ms,
                    false,
                );
                n.sent_at_ms = t.last_sent_ms;
                n
            })
            .collect();
        v.sort_by(|a, b| {
            a.starts_at_ms
                .cmp(&b.starts_at_ms)
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        v
    }

    fn notification(
        &self,
        f: &str,
        t: &Tracked,
        severity: Severity,
        status: Status,
        now_ms: u64,
        repeat: bool,
    ) -> Notification {
        let mut labels = t.condition.labels.clone();
        labels.insert("alertname".into(), t.condition.kind.alertname().into());
        labels.insert("cluster".into(), self.cluster.clone());
        labels.insert("severity".into(), severity.name().into());
        Notification {
            fingerprint: f.to_string(),
            kind: t.condition.kind,
            status,
            severity,
            labels,
            summary: t.condition.summary.clone(),
            value: t.condition.value,
            starts_at_ms: t.since_ms,
            ends_at_ms: (status == Status::Resolved).then_some(now_ms),
            sent_at_ms: now_ms,
            repeat,
        }
    }
}

/// 16 hex digits of FNV-1a over the name, the cluster and the labels in order (each part
/// length-prefixed, so no two label sets collide by concatenation).
pub fn fingerprint(kind: AlertKind, cluster: &str, labels: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |s: &str| {
        for b in (s.len() as u64).to_le_bytes().iter().chain(s.as_bytes()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(kind.alertname());
    feed(cluster);
    for (k, v) in labels {
        feed(k);
        feed(v);
    }
    format!("{h:016x}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lag(node: &str, v: f64) -> Condition {
        Condition {
            kind: AlertKind::ReplicaLag,
            labels: [("node".to_string(), node.to_string())].into(),
            summary: format!("{node} lags {v} s"),
            value: v,
        }
    }

    fn policy(for_ms: u64) -> impl Fn(AlertKind) -> KindPolicy {
        move |_| KindPolicy {
            for_ms,
            severity: Severity::Warning,
        }
    }

    #[test]
    fn fires_once_renotifies_at_the_interval_and_resolves_once() {
        let mut e = Engine::new("c", 10_000);
        let n = e.evaluate(1000, vec![lag("node1", 6.0)], policy(0));
        assert_eq!(n.len(), 1);
        assert_eq!(
            (n[0].status, n[0].repeat, n[0].starts_at_ms),
            (Status::Firing, false, 1000)
        );
        assert_eq!(n[0].labels["alertname"], "ReplicaLag");
        assert_eq!(n[0].labels["severity"], "warning");
        let f = n[0].fingerprint.clone();
        for t in (2000..11_000).step_by(1000) {
            assert!(
                e.evaluate(t, vec![lag("node1", 7.0)], policy(0)).is_empty(),
                "{t}"
            );
        }
        let n = e.evaluate(11_000, vec![lag("node1", 8.0)], policy(0));
        assert_eq!(
            (n.len(), n[0].repeat, n[0].value, &n[0].fingerprint),
            (1, true, 8.0, &f)
        );
        assert_eq!(e.firing(policy(0), 11_500).len(), 1);
        let n = e.evaluate(12_000, vec![], policy(0));
        assert_eq!(
            (n.len(), n[0].status, n[0].ends_at_ms),
            (1, Status::Resolved, Some(12_000))
        );
        assert_eq!(n[0].fingerprint, f);
        assert!(e.evaluate(13_000, vec![], policy(0)).is_empty());
        assert!(e.firing(policy(0), 13_000).is_empty());
    }

    #[test]
    fn for_delays_firing_and_a_blip_never_fires_or_resolves() {
        let mut e = Engine::new("c", 60_000);
        assert!(e.evaluate(0, vec![lag("n", 9.0)], policy(3000)).is_empty());
        assert!(
            e.evaluate(1000, vec![], policy(3000)).is_empty(),
            "no resolution of what never fired"
        );
        assert!(e
            .evaluate(2000, vec![lag("n", 9.0)], policy(3000))
            .is_empty());
        assert!(e
            .evaluate(4000, vec![lag("n", 9.0)], policy(3000))
            .is_empty());
        let n = e.evaluate(5000, vec![lag("n", 9.0)], policy(3000));
        assert_eq!((n.len(), n[0].starts_at_ms), (1, 2000));
    }

    #[test]
    fn fingerprints_are_stable_and_distinct() {
        let a = fingerprint(
            AlertKind::ReplicaLag,
            "c",
            &[("node".into(), "n1".into())].into(),
        );
        assert_eq!(
            a,
            fingerprint(
                AlertKind::ReplicaLag,
                "c",
                &[("node".into(), "n1".into())].into()
            )
        );
        assert_eq!(a.len(), 16);
        assert_ne!(
            a,
            fingerprint(
                AlertKind::ReplicaLag,
                "c",
                &[("node".into(), "n2".into())].into()
            )
        );
        assert_ne!(
            a,
            fingerprint(
                AlertKind::NodeDown,
                "c",
                &[("node".into(), "n1".into())].into()
            )
        );
        assert_ne!(
            a,
            fingerprint(
                AlertKind::ReplicaLag,
                "d",
                &[("node".into(), "n1".into())].into()
            )
        );
        // Concatenation cannot collide: ("ab","c") vs ("a","bc").
        assert_ne!(
            fingerprint(
                AlertKind::NodeDown,
                "c",
                &[("ab".into(), "c".into())].into()
            ),
            fingerprint(
                AlertKind::NodeDown,
                "c",
                &[("a".into(), "bc".into())].into()
            )
        );
    }

    #[test]
    fn two_alerts_are_independent_and_ordered() {
        let mut e = Engine::new("c", 60_000);
        let n = e.evaluate(0, vec![lag("b", 6.0), lag("a", 6.0)], policy(0));
        assert_eq!(n.len(), 2);
        assert!(n[0].fingerprint < n[1].fingerprint);
        let n = e.evaluate(1000, vec![lag("a", 6.0), lag("c", 6.0)], policy(0));
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].status, Status::Resolved);
        assert_eq!(n[0].labels["node"], "b");
        assert_eq!(
            (n[1].status, n[1].labels["node"].as_str()),
            (Status::Firing, "c")
        );
    }
}
