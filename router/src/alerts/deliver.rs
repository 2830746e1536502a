//! One task per channel: notifications queue up (bounded; a full queue drops and counts), each is
//! tried, and retried with backoff (1 s, doubling, at most 60 s) `retries` times before it is
//! given up — every failure logged and counted. Order is kept within a channel, so a resolution
//! never overtakes its firing.
//!
//! The history channel (`notify`) writes to the primary, which is exactly what a failover takes
//! away — when alerts matter most. While no primary answers it holds its queue and waits, checking
//! once a second, without spending retries ([`DeliveryError::NoPrimary`]); only the queue's bound
//! (1,000) limits what it keeps. Once the channel is replaced (SIGHUP) or the router stops, it
//! stops waiting and gives up after its retries as any channel does.

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
use crate::sqlstate;

/// Notifications a channel may have waiting; more are dropped (and counted).
const QUEUE_MAX: usize = 1000;
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often a channel waiting for a primary looks again (the router's topology follows a
/// failover within its `health.lsn_poll_ms`).
const PRIMARY_POLL: Duration = Duration::from_secs(1);

/// Why one delivery attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    /// The history has nowhere to go now: no primary is known, or the node the router follows
    /// cannot be reached, does not answer, or no longer takes writes (a failover under way).
    NoPrimary(String),
    /// Anything else (an HTTP status, an SMTP refusal, an SQL error): retried with backoff.
    Failed(String),
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::NoPrimary(e) | DeliveryError::Failed(e) => f.write_str(e),
        }
    }
}

impl From<String> for DeliveryError {
    fn from(e: String) -> Self {
        DeliveryError::Failed(e)
    }
}

/// What a channel does after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Hold the notification (and the queue behind it) until a primary answers.
    WaitForPrimary,
    RetryIn(Duration),
    GiveUp,
}

/// The retry policy (pure): `attempt` counts failed attempts that spent a retry (0-based),
/// `backoff` is the wait before the next one, `queue_open` whether the channel is still in use.
fn after_failure(
    e: &DeliveryError,
    attempt: u32,
    retries: u32,
    backoff: Duration,
    queue_open: bool,
) -> Next {
    match e {
        DeliveryError::NoPrimary(_) if queue_open => Next::WaitForPrimary,
        _ if attempt >= retries => Next::GiveUp,
        _ => Next::RetryIn(backoff),
    }
}

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
    /// Holding its queue until a primary answers (history channel during a failover).
    waiting: std::sync::atomic::AtomicBool,
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
            "waiting_for_primary": self.counts.waiting.load(Ordering::Relaxed),
            "last_error": *crate::locks::lock(&self.counts.last_error),
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
        let mut attempt = 0u32;
        let mut waiting_since: Option<std::time::Instant> = None;
        loop {
            let e = match send(&shared, &channel, &source, &item, &mut pg).await {
                Ok(()) => {
                    counts.sent.fetch_add(1, Ordering::Relaxed);
                    if let Some(since) = waiting_since {
                        log::info(&format!(
                            "alerts: channel {:?} delivered {what} after waiting {:.1} s for a primary",
                            channel.name,
                            since.elapsed().as_secs_f64()
                        ));
                    } else if attempt > 0 {
                        log::info(&format!(
                            "alerts: channel {:?} delivered {what} at attempt {}",
                            channel.name,
                            attempt + 1
                        ));
                    }
                    break;
                }
                Err(e) => e,
            };
            *crate::locks::lock(&counts.last_error) = Some(e.to_string());
            match after_failure(&e, attempt, channel.retries, backoff, !rx.is_closed()) {
                Next::WaitForPrimary => {
                    if waiting_since.is_none() {
                        waiting_since = Some(std::time::Instant::now());
                        log::warn(&format!(
                            "alerts: channel {:?} holds {what} (and what queues behind it) until a primary answers: {e}",
                            channel.name
                        ));
                    }
                    counts.waiting.store(true, Ordering::Relaxed);
                    tokio::time::sleep(PRIMARY_POLL).await;
                    counts.waiting.store(false, Ordering::Relaxed);
                }
                Next::RetryIn(wait) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    log::warn(&format!(
                        "alerts: channel {:?} could not deliver {what} (attempt {} of {}): {e}; retrying in {} s",
                        channel.name,
                        attempt + 1,
                        channel.retries + 1,
                        wait.as_secs()
                    ));
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    attempt += 1;
                }
                Next::GiveUp => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    counts.dropped.fetch_add(1, Ordering::Relaxed);
                    log::error(&format!(
                        "alerts: channel {:?} gave up on {what} after {} attempts: {e}",
                        channel.name,
                        attempt + 1
                    ));
                    break;
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
) -> Result<(), DeliveryError> {
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
) -> Result<(), DeliveryError> {
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
            .map_err(DeliveryError::Failed)
        }
        ChannelKind::Smtp => {
            let (subject, body) = payload::mail(n, external);
            super::smtp::send(c, &subject, &body, super::wall_ms())
                .await
                .map_err(DeliveryError::Failed)
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
) -> Result<(), DeliveryError> {
    // Through the router, a primary that is missing, unreachable or read-only is one a failover
    // is replacing; Patroni's callback (a connection string) just reports the error.
    let follows_topology = matches!(primary, Primary::Router(_));
    let unavailable = |e: String| {
        if follows_topology {
            DeliveryError::NoPrimary(e)
        } else {
            DeliveryError::Failed(e)
        }
    };
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
            .map_err(|_| unavailable("connecting to the primary timed out".to_string()))?
            .map_err(unavailable)?;
        *pg = Some((epoch, client));
    }
    let Some((_, client)) = pg.as_ref() else {
        return Err(unavailable("no connection".into()));
    };
    let labels = serde_json::to_string(&n.labels).unwrap_or_default();
    let annotations = payload::annotations(n).to_string();
    let starts = crate::log::utc_ms(n.starts_at_ms);
    let ends = n.ends_at_ms.map(crate::log::utc_ms);
    let channel = c.notify_channel.as_deref().unwrap_or("dbopt_alerts");
    let result = tokio::time::timeout(
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
    .map_err(|_| unavailable(format!("no answer within {} ms", timeout.as_millis())))?;
    match result {
        Ok(_) => Ok(()),
        Err(e) => match e.as_db_error() {
            Some(db) => {
                let text = format!("{}: {}", db.code().code(), db.message());
                if primary_unavailable(db.code().code()) {
                    Err(unavailable(text))
                } else {
                    Err(DeliveryError::Failed(text))
                }
            }
            // The connection broke (the node went away).
            None => Err(unavailable(e.to_string())),
        },
    }
}

/// SQLSTATEs that say the node is not (or no longer) a primary that takes writes: read-only
/// (a demoted node, 25006), shutting down or starting (57P01–57P03), connection failures (08…).
fn primary_unavailable(code: &str) -> bool {
    code == sqlstate::READ_ONLY_SQL_TRANSACTION
        || matches!(
            code,
            sqlstate::ADMIN_SHUTDOWN | sqlstate::CRASH_SHUTDOWN | sqlstate::CANNOT_CONNECT_NOW
        )
        || code.starts_with("08")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn no_primary_waits_without_spending_retries_while_the_channel_is_in_use() {
        let e = DeliveryError::NoPrimary("no primary to keep the alert history on".into());
        // However many attempts already failed, a missing primary is waited for.
        for attempt in [0, 5, 100] {
            assert_eq!(after_failure(&e, attempt, 5, S, true), Next::WaitForPrimary);
        }
        // A channel replaced by a reload, or a router stopping, stops waiting.
        assert_eq!(after_failure(&e, 0, 5, S, false), Next::RetryIn(S));
        assert_eq!(after_failure(&e, 5, 5, S, false), Next::GiveUp);
    }

    #[test]
    fn other_failures_retry_with_backoff_then_give_up() {
        let e = DeliveryError::Failed("HTTP 500".into());
        assert_eq!(after_failure(&e, 0, 2, S, true), Next::RetryIn(S));
        assert_eq!(after_failure(&e, 1, 2, 2 * S, true), Next::RetryIn(2 * S));
        assert_eq!(after_failure(&e, 2, 2, 4 * S, true), Next::GiveUp);
        assert_eq!(after_failure(&e, 0, 0, S, true), Next::GiveUp);
    }

    #[test]
    fn a_demoted_or_restarting_node_is_no_primary_but_a_broken_statement_is_an_error() {
        for code in ["25006", "57P01", "57P02", "57P03", "08006", "08001"] {
            assert!(primary_unavailable(code), "{code}");
        }
        for code in ["42P01", "42501", "23505", "22P02", "53400"] {
            assert!(!primary_unavailable(code), "{code}");
        }
    }
}
