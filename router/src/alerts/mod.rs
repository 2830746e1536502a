//! Alerts: conditions the router sees (failover, lag, nodes, breakers, pools, errors, slow
//! statements, cache invalidation, rate limits) evaluated every `alerts.interval_ms`, deduplicated
//! by fingerprint, and delivered through the configured channels by one task per channel — never on
//! a client's path: a channel that hangs only delays its own queue.
//!
//! - `settings`: the `[alerts]` section; `conditions`: snapshot → conditions; `engine`: firing,
//!   re-notification, resolution; `payload`: what each channel sends; `deliver`: the channel tasks;
//!   `http_post`, `smtp`: the wire; `role_change`: Patroni's callback, for failovers while no
//!   router runs.

pub mod conditions;
pub mod deliver;
pub mod engine;
pub mod http_post;
pub mod payload;
pub mod role_change;
pub mod settings;
pub mod smtp;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dbopt_querystats::exposition::Exposition;
use serde_json::json;

use conditions::{NodeView, PoolView, Snapshot, Watch};
use engine::{Engine, KindPolicy, Notification};
use settings::{AlertKind, AlertSettings};

use crate::shared::Shared;

use crate::locks::lock;

/// Lag samples kept per node (two minutes at the default interval).
pub const LAG_HISTORY: usize = 120;

pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct Alerts {
    settings: Mutex<Arc<AlertSettings>>,
    engine: Mutex<Engine>,
    watch: Mutex<Watch>,
    history: Mutex<VecDeque<Notification>>,
    channels: Mutex<Vec<deliver::Queue>>,
    /// (alertname, status) → notifications made.
    made: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Who sends (in `dbopt.alert_history.source`).
    source: String,
    /// Each node's replay lag at every evaluation, the last [`LAG_HISTORY`] (the dashboard's
    /// sparklines).
    lag_history: Mutex<BTreeMap<String, VecDeque<Option<f64>>>>,
    external_url: Mutex<String>,
}

impl Alerts {
    pub fn new(config: &crate::config::Config) -> Arc<Alerts> {
        let s = &config.alerts;
        Arc::new(Alerts {
            engine: Mutex::new(Engine::new(&s.cluster, s.renotify_s * 1000)),
            watch: Mutex::new(Watch::default()),
            history: Mutex::new(VecDeque::new()),
            channels: Mutex::new(Vec::new()),
            made: Mutex::new(BTreeMap::new()),
            lag_history: Mutex::new(BTreeMap::new()),
            source: format!("router {}", config.listen.address),
            external_url: Mutex::new(external_url(config)),
            settings: Mutex::new(Arc::new(s.clone())),
        })
    }

    pub fn settings(&self) -> Arc<AlertSettings> {
        lock(&self.settings).clone()
    }

    /// Applies reloaded settings; channel tasks are replaced (the old ones finish their queues).
    pub fn reconfigure(&self, shared: &Arc<Shared>, config: &crate::config::Config) {
        let s = &config.alerts;
        lock(&self.engine).reconfigure(&s.cluster, s.renotify_s * 1000);
        *lock(&self.external_url) = external_url(config);
        let changed = *lock(&self.settings).channels != s.channels;
        *lock(&self.settings) = Arc::new(s.clone());
        if changed {
            self.start_channels(shared);
        }
    }

    fn start_channels(&self, shared: &Arc<Shared>) {
        let s = self.settings();
        let queues = s
            .channels
            .iter()
            .map(|c| deliver::Queue::start(shared.clone(), c.clone(), self.source.clone()))
            .collect();
        *lock(&self.channels) = queues;
    }

    fn policy(s: &AlertSettings) -> impl Fn(AlertKind) -> KindPolicy + '_ {
        move |k| {
            let e = s.effective(k);
            KindPolicy {
                for_ms: e.for_ms,
                severity: e.severity,
            }
        }
    }

    /// One evaluation: what the router sees now → notifications → channel queues and history.
    pub fn evaluate(&self, snapshot: &Snapshot) -> Vec<Notification> {
        let s = self.settings();
        {
            let mut h = lock(&self.lag_history);
            h.retain(|name, _| snapshot.nodes.iter().any(|n| &n.name == name));
            for n in &snapshot.nodes {
                let q = h.entry(n.name.clone()).or_default();
                q.push_back(if n.reachable { n.lag_s } else { None });
                while q.len() > LAG_HISTORY {
                    q.pop_front();
                }
            }
        }
        let conditions = lock(&self.watch).conditions(snapshot, |k| s.effective(k));
        let out = lock(&self.engine).evaluate(snapshot.now_ms, conditions, Self::policy(&s));
        if out.is_empty() {
            return out;
        }
        let external = lock(&self.external_url).clone();
        {
            let mut made = lock(&self.made);
            let mut h = lock(&self.history);
            for n in &out {
                *made
                    .entry((n.kind.alertname(), n.status.name()))
                    .or_default() += 1;
                h.push_back(n.clone());
                while h.len() > s.history {
                    h.pop_front();
                }
            }
        }
        let queues = lock(&self.channels);
        for n in &out {
            let n = Arc::new(n.clone());
            for i in s.effective(n.kind).channels {
                if let Some(q) = queues.get(i) {
                    q.push(n.clone(), &external);
                }
            }
        }
        out
    }

    /// A node's recent replay lag, oldest first (one value per evaluation; null: unknown).
    pub fn lag_history(&self, node: &str) -> Vec<Option<f64>> {
        lock(&self.lag_history)
            .get(node)
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default()
    }

    /// `GET /alerts`: firing alerts, recent notifications (newest first), channel counters.
    pub fn report(&self) -> serde_json::Value {
        let s = self.settings();
        let external = lock(&self.external_url).clone();
        let firing: Vec<_> = lock(&self.engine)
            .firing(Self::policy(&s), wall_ms())
            .iter()
            .map(|n| payload::history_json(n, &external))
            .collect();
        let recent: Vec<_> = lock(&self.history)
            .iter()
            .rev()
            .map(|n| payload::history_json(n, &external))
            .collect();
        let channels: Vec<_> = lock(&self.channels)
            .iter()
            .map(deliver::Queue::report)
            .collect();
        json!({ "firing": firing, "recent": recent, "channels": channels })
    }

    pub fn metrics(&self) -> String {
        let s = self.settings();
        let mut firing: BTreeMap<&'static str, u64> =
            AlertKind::ALL.iter().map(|k| (k.alertname(), 0)).collect();
        for n in lock(&self.engine).firing(Self::policy(&s), wall_ms()) {
            *firing.entry(n.kind.alertname()).or_default() += 1;
        }
        let firing: Vec<_> = firing
            .iter()
            .map(|(k, v)| (vec![("alertname", *k)], *v as f64))
            .collect();
        let made: Vec<_> = lock(&self.made)
            .iter()
            .map(|((a, st), v)| (vec![("alertname", *a), ("status", *st)], *v as f64))
            .collect();
        let reports: Vec<_> = lock(&self.channels)
            .iter()
            .map(|q| (q.name().to_string(), q.counts()))
            .collect();
        let mut deliveries = Vec::new();
        for (name, c) in &reports {
            for (outcome, v) in [
                ("sent", c.sent),
                ("failed", c.failed),
                ("dropped", c.dropped),
            ] {
                deliveries.push((
                    vec![("channel", name.as_str()), ("outcome", outcome)],
                    v as f64,
                ));
            }
        }
        let mut e = Exposition::default();
        e.gauges(
            "dbopt_router_alerts_firing",
            "Alerts firing now, per alert name.",
            &firing,
        )
        .counters(
            "dbopt_router_alert_notifications_total",
            "Notifications made (firing, repeated or resolved), per alert name and status.",
            &made,
        )
        .counters(
            "dbopt_router_alert_deliveries_total",
            "Delivery attempts per channel: sent, failed (retried with backoff), dropped (given up or queue full).",
            &deliveries,
        );
        e.finish()
    }
}

fn external_url(config: &crate::config::Config) -> String {
    if let Some(u) = &config.alerts.external_url {
        return u.clone();
    }
    match &config.listen.admin_address {
        Some(a) => format!("http://{a}/alerts"),
        None => String::new(),
    }
}

/// What the router sees now.
pub fn snapshot(shared: &Shared) -> Snapshot {
    let (primary, nodes, names) = {
        let t = shared.topology();
        let names: Vec<String> = t.nodes.iter().map(|n| n.name.clone()).collect();
        let nodes = t
            .nodes
            .iter()
            .map(|n| NodeView {
                name: n.name.clone(),
                // A node not checked yet is not down.
                reachable: n.reachable || n.last_error.is_none(),
                replica: n.role == Some(crate::topology::Role::Replica),
                lag_s: n.lag_s,
                breaker: n.breaker.state().name(),
                last_error: n.last_error.clone(),
                slow_total: n.slow_total,
            })
            .collect();
        (t.primary.map(|p| t.nodes[p].name.clone()), nodes, names)
    };
    let pools = shared
        .pools
        .all()
        .iter()
        .map(|p| {
            let st = p.lock();
            PoolView {
                node: names.get(p.node).cloned().unwrap_or_default(),
                database: p.database.clone(),
                role: p.login.role.clone(),
                in_use: st.in_use(),
                max: st.limits.max,
            }
        })
        .collect();
    let c = &shared.counters;
    Snapshot {
        now_ms: wall_ms(),
        primary,
        nodes,
        pools,
        errors_total: c.server_errors.load(Ordering::Relaxed)
            + c.acquire_errors.load(Ordering::Relaxed),
        refusals: shared
            .limiter
            .stats()
            .into_iter()
            .map(|(rule, s)| (rule, s.refused))
            .collect(),
        invalidation_failures: shared.cache.as_ref().map_or(0, |c| {
            c.counters.invalidation_failures.load(Ordering::Relaxed)
        }),
    }
}

/// The evaluation loop, for the life of the process.
pub async fn run(shared: Arc<Shared>) {
    shared.alerts.start_channels(&shared);
    // Let the watchers find the roles first: a router starting is not a failover.
    tokio::time::sleep(Duration::from_millis(500)).await;
    loop {
        let every = shared.alerts.settings().interval_ms;
        let snap = snapshot(&shared);
        shared.alerts.evaluate(&snap);
        tokio::time::sleep(Duration::from_millis(every)).await;
    }
}
