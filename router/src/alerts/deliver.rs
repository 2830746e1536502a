//! One task per channel: notifications queue up (bounded; a full queue drops and counts), each is
//! tried, and retried with backoff (1 s, doubling, at most 60 s) `retries` times before it is
//! given up — every failure logged and counted. Order is kept within a channel, so a resolution
//! never overtakes its firing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::engine::Notification;
use super::http_post::{post_json, Target};
use super::payload;
use super::settings::{kind_name, Channel, ChannelKind};
use crate::log;
use crate::shared::Shared;

/// Notifications a channel may have waiting; more are dropped (and counted).
const QUEUE_MAX: usize = 1000;
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The history row and its announcement, in one statement (the NOTIFY is sent at commit).
const NOTIFY_SQL: &str = "WITH saved AS (
        INSERT INTO dbopt.alert_history
            (fingerprint, alertname, status, severity, labels, annotations, starts_at, ends_at, source)
        VALUES ($1, $2, $3, $4, $5::text::jsonb, $6::text::jsonb, $7::text::timestamptz,
                $8::text::timestamptz, $9)
        RETURNING id)
    SELECT pg_notify($10, json_build_object('id', id, 'fingerprint', $1::text, 'alertname', $2::text,
        'status', $3::text, 'severity', $4::text, 'labels', $5::text::jsonb,
        'summary', left($11::text, 1000))::text)
    FROM saved";

struct Item {
    n: Arc<Notification>,
    external: String,
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountsNow {
    pub sent: u64,
    pub failed: u64,
    pub dropped: u64,
}

/// A channel's queue and counters; dropping it lets its task finish what is queued and end.
pub struct Queue {
    name: String,
    kind: ChannelKind,
    tx: mpsc::Sender<Item>,
    counts: Arc<Counts>,
}

impl Queue {
    pub fn start(shared: Arc<Shared>, channel: Channel, source: String) -> Queue {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        let counts = Arc::new(Counts::default());
        let q = Queue {
            name: channel.name.clone(),
            kind: channel.kind,
            tx,
            counts: counts.clone(),
        };
        tokio::spawn(work(shared, channel, source, rx, counts));
        q
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn push(&self, n: Arc<Notification>, external: &str) {
        let item = Item {
            n,
            external: external.to_string(),
        };
        if let Err(e) = self.tx.try_send(item) {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            let n = match &e {
                mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => &i.n,
            };
            log::error(&format!(
                "alerts: channel {:?} has {QUEUE_MAX} notifications waiting; dropped {} {} {}",
                self.name,
                n.kind.alertname(),
                n.status.name(),
                n.fingerprint
            ));
        }
    }

    pub fn counts(&self) -> CountsNow {
        CountsNow {
            sent: self.counts.sent.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
            dropped: self.counts.dropped.load(Ordering::Relaxed),
        }
    }

    pub fn report(&self) -> serde_json::Value {
        let c = self.counts();
        json!({
            "name": self.name,
            "kind": kind_name(self.kind),
            "sent": c.sent,
            "failed": c.failed,
            "dropped": c.dropped,
            "queued": QUEUE_MAX - self.tx.capacity(),
            "last_error": *self.counts.last_error.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }
}

async fn work(
    shared: Arc<Shared>,
    channel: Channel,
    source: String,
    mut rx: mpsc::Receiver<Item>,
    counts: Arc<Counts>,
) {
    let mut pg: Option<(u64, Client)> = None;
    while let Some(item) = rx.recv().await {
        let what = format!(
            "{} {} {}",
            item.n.kind.alertname(),
            item.n.status.name(),
            item.n.fingerprint
        );
        let mut backoff = Duration::from_secs(1);
        for attempt in 0..=channel.retries {
            match send(&shared, &channel, &source, &item, &mut pg).await {
                Ok(()) => {
                    counts.sent.fetch_add(1, Ordering::Relaxed);
                    if attempt > 0 {
                        log::info(&format!(
                            "alerts: channel {:?} delivered {what} at attempt {}",
                            channel.name,
                            attempt + 1
                        ));
                    }
                    break;
                }
                Err(e) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    *counts.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                    if attempt == channel.retries {
                        counts.dropped.fetch_add(1, Ordering::Relaxed);
                        log::error(&format!(
                            "alerts: channel {:?} gave up on {what} after {} attempts: {e}",
                            channel.name,
                            attempt + 1
                        ));
                    } else {
                        log::warn(&format!(
                            "alerts: channel {:?} could not deliver {what} (attempt {} of {}): {e}; retrying in {} s",
                            channel.name,
                            attempt + 1,
                            channel.retries + 1,
                            backoff.as_secs()
                        ));
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
    }
}

/// Where a notify channel writes: the primary the router follows, or (Patroni's callback) a
/// connection string.
pub enum Primary<'a> {
    Router(&'a Shared),
    Direct(Option<&'a tokio_postgres::Config>),
}

async fn send(
    shared: &Shared,
    c: &Channel,
    source: &str,
    item: &Item,
    pg: &mut Option<(u64, Client)>,
) -> Result<(), String> {
    deliver(
        &Primary::Router(shared),
        c,
        source,
        &item.n,
        &item.external,
        pg,
    )
    .await
}

/// Sends one notification through `c` (one attempt).
pub async fn deliver(
    primary: &Primary<'_>,
    c: &Channel,
    source: &str,
    n: &Notification,
    external: &str,
    pg: &mut Option<(u64, Client)>,
) -> Result<(), String> {
    let timeout = Duration::from_millis(c.timeout_ms);
    match c.kind {
        ChannelKind::Webhook | ChannelKind::Slack => {
            let target = Target::parse(c.url.as_deref().unwrap_or_default())?;
            let body = if c.kind == ChannelKind::Webhook {
                payload::alertmanager_webhook(n, &c.name, external)
            } else {
                payload::slack(n)
            };
            post_json(
                &target,
                body.to_string().as_bytes(),
                c.bearer_token.as_deref(),
                timeout,
            )
            .await
            .map(|_| ())
        }
        ChannelKind::Smtp => {
            let (subject, body) = payload::mail(n, external);
            super::smtp::send(c, &subject, &body, super::wall_ms()).await
        }
        ChannelKind::Log => {
            log::warn(&payload::log_line(n));
            Ok(())
        }
        ChannelKind::Notify => {
            let result = notify(primary, c, source, n, pg, timeout).await;
            if result.is_err() {
                *pg = None;
            }
            result
        }
    }
}

async fn notify(
    primary: &Primary<'_>,
    c: &Channel,
    source: &str,
    n: &Notification,
    pg: &mut Option<(u64, Client)>,
    timeout: Duration,
) -> Result<(), String> {
    let (node, epoch) = match primary {
        Primary::Router(shared) => {
            let t = shared.topology();
            (t.primary, t.epoch)
        }
        Primary::Direct(_) => (None, 0),
    };
    let stale = match pg.as_ref() {
        Some((e, client)) => *e != epoch || client.is_closed(),
        None => true,
    };
    if stale {
        let connecting = async {
            match primary {
                Primary::Router(shared) => {
                    let node = node.ok_or("no primary to keep the alert history on")?;
                    crate::monitor::connect_as_router(&shared.config(), node, "dbopt-router alerts")
                        .await
                }
                Primary::Direct(config) => {
                    let config =
                        config.ok_or("a notify channel needs a connection string (--pg)")?;
                    let (client, conn) = config
                        .connect(tokio_postgres::NoTls)
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Ok(client)
                }
            }
        };
        let client = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| "connecting to the primary timed out".to_string())??;
        *pg = Some((epoch, client));
    }
    let Some((_, client)) = pg.as_ref() else {
        return Err("no connection".into());
    };
    let labels = serde_json::to_string(&n.labels).unwrap_or_default();
    let annotations = payload::annotations(n).to_string();
    let starts = crate::log::utc_ms(n.starts_at_ms);
    let ends = n.ends_at_ms.map(crate::log::utc_ms);
    let channel = c.notify_channel.as_deref().unwrap_or("dbopt_alerts");
    tokio::time::timeout(
        timeout,
        client.execute(
            NOTIFY_SQL,
            &[
                &n.fingerprint,
                &n.kind.alertname(),
                &n.status.name(),
                &n.severity.name(),
                &labels,
                &annotations,
                &starts,
                &ends,
                &source,
                &channel,
                &n.summary,
            ],
        ),
    )
    .await
    .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
    .map(|_| ())
    .map_err(|e| match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    })
}
