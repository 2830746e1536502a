//! One task per database: a connection to the current primary (the router's `[server]` login) that
//! LISTENs for the extension's announcements and applies them to both cache layers, in commit
//! order, and answers barriers.
//!
//! A barrier is `pg_notify(<this listener's own channel>, seq:pg_current_wal_lsn())` sent on the
//! listening connection: PostgreSQL delivers notifications in commit order, so when it comes back,
//! every announcement committed before it has been applied, and the LSN it carries (read after the
//! barrier was sent) covers those commits. Waiting sessions are answered together (one barrier
//! for all that asked while the previous was in flight). Only barriers sent by this connection's
//! own backend count: anyone may NOTIFY any channel.
//!
//! When the connection drops, the primary changes, or it cannot be made, the database is bypassed;
//! once listening again (on the new primary), everything cached for the database is invalidated
//! before it is used again — announcements made meanwhile were lost.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use dbopt_invalidation::{decode, Tag, CHANNEL};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::cache::Cache;
use crate::log;
use crate::route::LsnSample;
use crate::shared::Shared;

/// Without waiters, a barrier still goes out this often (applied position advances).
const HEARTBEAT: Duration = Duration::from_millis(500);
const RETRY: Duration = Duration::from_millis(250);

/// Runs until the process ends.
pub async fn run(shared: Arc<Shared>, cache: Arc<Cache>, db: String) {
    let channel = format!(
        "dbopt_barrier_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut last_error = String::new();
    loop {
        let primary = shared.topology().primary;
        let reason = match primary {
            Some(node) => listen(&shared, &cache, &db, node, &channel).await,
            None => "no primary".to_string(),
        };
        cache.desync(&db, &reason);
        if reason != last_error {
            log::warn(&format!(
                "cache listener for database \"{db}\": {reason}; retrying"
            ));
            last_error = reason;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One listening connection; returns why it ended.
async fn listen(
    shared: &Arc<Shared>,
    cache: &Arc<Cache>,
    db: &str,
    node: usize,
    channel: &str,
) -> String {
    let config = shared.config();
    let n = &config.nodes[node];
    let mut pg = tokio_postgres::Config::new();
    pg.host(&n.host)
        .port(n.port)
        .user(&config.server.user)
        .dbname(db)
        .application_name("dbopt-router cache listener")
        .connect_timeout(Duration::from_millis(config.health.timeout_ms));
    if let Some(p) = &config.server.password {
        pg.password(p);
    }
    let (client, mut connection) = match pg.connect(NoTls).await {
        Ok(x) => x,
        Err(e) => return format!("connecting to {}: {e}", n.name),
    };
    let client = Arc::new(client);
    let setup = {
        let c = client.clone();
        let sql = format!("LISTEN {CHANNEL}; LISTEN \"{channel}\"");
        tokio::spawn(async move {
            c.batch_execute(&sql).await?;
            let row = c
                .query_one("SELECT pg_catalog.pg_backend_pid()", &[])
                .await?;
            Ok::<i32, tokio_postgres::Error>(row.get(0))
        })
    };
    let mut setup = Some(setup);
    let mut own_pid: Option<i32> = None;
    let (btx, mut brx) = mpsc::unbounded_channel::<oneshot::Sender<u64>>();
    let (wtx, mut wrx) = mpsc::unbounded_channel::<(Vec<u32>, oneshot::Sender<bool>)>();
    let mut in_flight: BTreeMap<u64, (Vec<oneshot::Sender<u64>>, u64)> = BTreeMap::new();
    let mut queued: Vec<oneshot::Sender<u64>> = Vec::new();
    let mut seq = 0u64;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let databases = if config.databases.is_empty() {
        vec![config.server.database.clone()]
    } else {
        config.databases.clone()
    };
    let send_barrier = |seq: u64| {
        let c = client.clone();
        let channel = channel.to_string();
        tokio::spawn(async move {
            let _ = c
                .execute(
                    "SELECT pg_catalog.pg_notify($1::text, $2::text || ':' || pg_catalog.pg_current_wal_lsn()::text)",
                    &[&channel, &seq.to_string()],
                )
                .await;
        });
    };
    loop {
        tokio::select! {
            m = poll_fn(|cx| connection.poll_message(cx)) => match m {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    if note.channel() == CHANNEL {
                        apply(shared, cache, db, note.payload()).await;
                    } else if note.channel() == channel && Some(note.process_id()) == own_pid {
                        let Some((s, lsn)) = parse_barrier(note.payload()) else { continue };
                        // Everything up to this barrier is applied.
                        let done: Vec<u64> = in_flight.range(..=s).map(|(k, _)| *k).collect();
                        for k in done {
                            if let Some((waiters, sent_ms)) = in_flight.remove(&k) {
                                if k == s {
                                    shared.topology().lsn_history.push(LsnSample { sent_ms, lsn });
                                }
                                for w in waiters {
                                    let _ = w.send(lsn);
                                }
                            }
                        }
                        cache.feed(db, |f| f.processed_lsn = f.processed_lsn.max(lsn));
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("connection to {} lost: {e}", n.name),
                None => return format!("connection to {} closed", n.name),
            },
            r = async { setup.as_mut().expect("guarded").await }, if setup.is_some() => {
                setup = None;
                match r {
                    Ok(Ok(pid)) => {
                        own_pid = Some(pid);
                        // Announcements made while nobody listened are lost: drop everything.
                        cache.forget_analyses(db);
                        cache.invalidate(db, &[Tag::Database(db.to_string())], shared.now_ms()).await;
                        cache.recover_redis(&databases).await;
                        cache.feed(db, |f| {
                            f.synced = true;
                            f.barriers = Some(btx.clone());
                            f.registrations = Some(wtx.clone());
                            // A new primary (or a restarted one) watches nothing yet.
                            f.watched.clear();
                        });
                        // Warm statements are filled again (start, failover, reconnection).
                        if let Some(r) = &cache.refresher {
                            for spec in r.warm_of(db) {
                                r.enqueue(&spec.key);
                            }
                        }
                        cache.counters.resyncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        log::info(&format!(
                            "cache listener for database \"{db}\": listening on {}; cache resynchronised",
                            n.name
                        ));
                        seq += 1;
                        in_flight.insert(seq, (Vec::new(), shared.now_ms()));
                        send_barrier(seq);
                    }
                    Ok(Err(e)) => return format!("LISTEN on {}: {e}", n.name),
                    Err(e) => return format!("LISTEN on {}: {e}", n.name),
                }
            }
            Some((tables, done)) = wrx.recv() => {
                // Registered on this connection's primary; the answer comes when PostgreSQL has
                // waited out the transactions that decided without these tables.
                let c = client.clone();
                tokio::spawn(async move {
                    let ok = c
                        .execute("SELECT dbopt.watch_tables($1::oid[])", &[&tables])
                        .await
                        .is_ok();
                    let _ = done.send(ok);
                });
            }
            Some(w) = brx.recv() => {
                queued.push(w);
                while let Ok(w) = brx.try_recv() {
                    queued.push(w);
                }
                // One barrier in flight at a time; the waiters that came meanwhile share the next.
                if in_flight.is_empty() {
                    seq += 1;
                    in_flight.insert(seq, (std::mem::take(&mut queued), shared.now_ms()));
                    send_barrier(seq);
                }
            }
            _ = heartbeat.tick() => {
                if shared.topology().primary != Some(node) {
                    return "the primary changed".into();
                }
                if cache.redis.is_some() && !cache.redis_up() && own_pid.is_some() {
                    cache.recover_redis(&databases).await;
                }
                if own_pid.is_some() && in_flight.is_empty() {
                    seq += 1;
                    in_flight.insert(seq, (std::mem::take(&mut queued), shared.now_ms()));
                    send_barrier(seq);
                } else if let Some((_, (_, sent))) = in_flight.iter().next() {
                    if shared.now_ms().saturating_sub(*sent) > 5 * HEARTBEAT.as_millis() as u64 {
                        return "a barrier did not come back".into();
                    }
                }
            }
        }
        // Waiters that arrived while a barrier was in flight go with the next one.
        if in_flight.is_empty() && !queued.is_empty() {
            seq += 1;
            in_flight.insert(seq, (std::mem::take(&mut queued), shared.now_ms()));
            send_barrier(seq);
        }
    }
}

/// `seq:lsn` as the barrier sends it.
fn parse_barrier(payload: &str) -> Option<(u64, u64)> {
    let (s, lsn) = payload.split_once(':')?;
    Some((s.parse().ok()?, dbopt_invalidation::parse_lsn(lsn)?))
}

/// Applies one announcement (a malformed payload on the channel — anyone may NOTIFY it — is
/// logged and ignored: it can only ever ask for more invalidation, never for less).
async fn apply(shared: &Arc<Shared>, cache: &Arc<Cache>, db: &str, payload: &str) {
    let a = match decode(payload) {
        Ok(a) => a,
        Err(e) => {
            log::warn(&format!(
                "cache listener for database \"{db}\": ignored a notification: {e}"
            ));
            return;
        }
    };
    if a.db != db {
        return;
    }
    if a.ddl || a.all {
        cache.forget_analyses(db);
    }
    let tags = a.invalidated();
    cache.invalidate(db, &tags, shared.now_ms()).await;
    if let Some(r) = &cache.refresher {
        let (write_through, warm) = r.affected(db, &tags);
        // Before the next notification (and the writer's barrier behind it): write-through.
        for (i, spec) in write_through.iter().enumerate() {
            if i >= crate::cache::refresh::INLINE_MAX {
                r.enqueue(&spec.key);
                continue;
            }
            if let Err(e) = crate::cache::refresh::refresh(shared, cache, spec, false).await {
                log::warn(&format!("cache: write-through refresh failed: {e}"));
            }
        }
        for spec in warm {
            r.enqueue(&spec.key);
        }
    }
    if a.at_us > 0 {
        let now_us = super::unix_ms() as i64 * 1000;
        cache.record_delay(((now_us - a.at_us).max(0) as f64) / 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_payloads() {
        assert_eq!(parse_barrier("7:0/16B3F28"), Some((7, 0x16B3F28)));
        assert_eq!(parse_barrier("x:0/1"), None);
        assert_eq!(parse_barrier("7"), None);
    }
}
