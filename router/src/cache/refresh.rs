//! Fills the router does on its own: write-through refreshes and warming.
//!
//! A [`Spec`] is what re-runs one cached statement exactly as a client ran it: the database, the
//! server login, the session settings and the batch (a simple Query, or `Parse Bind [Describe]
//! Execute Sync` of the unnamed statement), with its tags and TTL. Specs are kept for entries of
//! `write_through` rules (registered when a client's fill stores) and for `[[cache.warm]]`
//! statements.
//!
//! - Write-through: when the listener applies an announcement whose tags meet a write-through
//!   spec, it re-runs the spec on the primary *before* it handles the next notification — the
//!   barrier a writer waits for comes after, so the writer's COMMIT is acknowledged with the entry
//!   already refreshed. At most [`INLINE_MAX`] inline per announcement; the rest are queued.
//! - Warming: warm specs are queued at every (re)synchronisation — start, failover, reconnection —
//!   and after their invalidation; one worker runs the queue at `warm_per_second`.
//!
//! A refresh is an ordinary fill: versions and token taken first, the answer read on the primary,
//! stored with the primary's WAL position read after it — so a refresh that raced another write is
//! refused like any other fill.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::cache::{key, lock, Cache, Tag};
use crate::isolation::{plan_sync, Settings};
use crate::log;
use crate::pools::Login;
use crate::protocol as p;
use crate::shared::Shared;

/// Write-through refreshes done inline per announcement (the rest are queued).
pub const INLINE_MAX: usize = 16;
/// Specs remembered at most (write-through entries beyond are not refreshed, only invalidated).
pub const SPECS_MAX: usize = 10_000;
/// A refresh slower than this is abandoned (the entry stays invalidated).
const REFRESH_TIMEOUT: Duration = Duration::from_millis(500);

/// What re-runs one cached statement.
#[derive(Debug, Clone)]
pub struct Spec {
    pub key: String,
    pub database: String,
    pub login: Login,
    pub settings: Settings,
    /// The client messages, framed, ending in Sync or being one Query.
    pub batch: Vec<u8>,
    /// The batch parses a statement the client's own batch did not (a named statement prepared
    /// earlier): its ParseComplete is not part of the client's answer.
    pub added_parse: bool,
    /// `None` for a warm statement not analysed yet (its first refresh asks PostgreSQL).
    pub tags: Option<Vec<String>>,
    pub ttl: Duration,
    pub write_through: bool,
}

#[derive(Default)]
struct Registry {
    specs: HashMap<String, Arc<Spec>>,
    by_tag: HashMap<String, HashSet<String>>,
}

pub struct Refresher {
    registry: Mutex<Registry>,
    queue: mpsc::UnboundedSender<String>,
}

/// The batch as a self-contained one the router can replay on any connection: a simple Query as
/// it is; an extended-protocol execution with its statement parsed in the batch as the unnamed
/// statement (a named statement's text comes from the client's `statements`). `None` otherwise.
pub(crate) fn self_contained(
    batch: &[(u8, Vec<u8>)],
    statements: &crate::translate::Statements,
) -> Option<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut added_parse = false;
    if let [(b'Q', m)] = batch {
        return Some((m.clone(), false));
    }
    for (tag, m) in batch {
        let b = p::body(m);
        match tag {
            b'P' => {
                let pm = p::parse_parse(b).ok()?;
                p::put_parse(&mut out, b"", pm.query, pm.param_types);
            }
            b'B' => {
                let bm = p::parse_bind(b).ok()?;
                if !bm.statement.is_empty() && !batch.iter().any(|(t, _)| *t == b'P') {
                    let s = statements.get(bm.statement)?;
                    p::put_parse(&mut out, b"", &s.query, &s.param_types);
                    added_parse = true;
                }
                p::put_bind(&mut out, b"", b"", bm.rest);
            }
            b'D' => {
                let (kind, _) = p::parse_target(b, "Describe").ok()?;
                p::put_target(&mut out, b'D', kind, b"");
            }
            b'E' => p::put_msg(&mut out, b'E', |o| {
                o.push(0);
                o.extend_from_slice(&0i32.to_be_bytes());
            }),
            b'S' => p::put_msg(&mut out, b'S', |_| {}),
            _ => return None,
        }
    }
    Some((out, added_parse))
}

/// The reply as the client's own batch gets it: without the ParseComplete of an added Parse.
fn client_reply(mut reply: Vec<u8>, added_parse: bool) -> Vec<u8> {
    if added_parse && reply.first() == Some(&b'1') && reply.len() >= 5 {
        reply.drain(..5);
    }
    reply
}

impl Refresher {
    pub fn new() -> (Refresher, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Refresher {
                registry: Mutex::new(Registry::default()),
                queue: tx,
            },
            rx,
        )
    }

    /// Remembers a spec (replacing one with the same key).
    pub fn register(&self, spec: Spec) {
        let mut r = lock(&self.registry);
        if r.specs.len() >= SPECS_MAX && !r.specs.contains_key(&spec.key) {
            return;
        }
        if let Some(old) = r.specs.remove(&spec.key) {
            for t in old.tags.iter().flatten() {
                if let Some(set) = r.by_tag.get_mut(t) {
                    set.remove(&old.key);
                }
            }
        }
        for t in spec.tags.iter().flatten() {
            r.by_tag
                .entry(t.clone())
                .or_default()
                .insert(spec.key.clone());
        }
        r.specs.insert(spec.key.clone(), Arc::new(spec));
    }

    pub fn spec(&self, key: &str) -> Option<Arc<Spec>> {
        lock(&self.registry).specs.get(key).cloned()
    }

    /// Specs of a database meeting any of `tags` (all of the database's for its own tag), split
    /// into write-through ones and the others.
    pub fn affected(&self, db: &str, tags: &[Tag]) -> (Vec<Arc<Spec>>, Vec<Arc<Spec>>) {
        let r = lock(&self.registry);
        let mut keys: HashSet<&String> = HashSet::new();
        for t in tags {
            if matches!(t, Tag::Database(_)) {
                keys.extend(
                    r.specs
                        .values()
                        .filter(|s| s.database == db)
                        .map(|s| &s.key),
                );
            } else if let Some(set) = r.by_tag.get(&t.key()) {
                keys.extend(set.iter());
            }
        }
        let specs: Vec<Arc<Spec>> = keys
            .into_iter()
            .filter_map(|k| r.specs.get(k).cloned())
            .collect();
        specs.into_iter().partition(|s| s.write_through)
    }

    /// Every warm spec of a database (after a resynchronisation).
    pub fn warm_of(&self, db: &str) -> Vec<Arc<Spec>> {
        lock(&self.registry)
            .specs
            .values()
            .filter(|s| s.database == db && !s.write_through)
            .cloned()
            .collect()
    }

    pub fn enqueue(&self, key: &str) {
        let _ = self.queue.send(key.to_string());
    }
}

/// The specs of `[[cache.warm]]`.
pub fn warm_specs(shared: &Shared) -> Vec<Spec> {
    let config = shared.config();
    let users = shared.users();
    config
        .cache
        .warm
        .iter()
        .filter_map(|w| {
            let u = users.get(&w.user)?;
            let mut batch = Vec::new();
            p::put_msg(&mut batch, b'Q', |b| p::put_cstr(b, w.sql.as_bytes()));
            let settings: Settings = w
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>();
            let framed = [(b'Q', batch.clone())];
            let req = key::request(
                &framed,
                &Default::default(),
                &w.database,
                &u.login.role,
                &settings,
            )?;
            Some(Spec {
                key: req.key,
                database: w.database.clone(),
                login: u.login.clone(),
                settings,
                batch,
                added_parse: false,
                tags: None,
                ttl: Duration::from_secs(config.cache.default_ttl_s),
                write_through: false,
            })
        })
        .collect()
}

/// Re-runs a spec on the primary and stores its answer. `Err` says why not (logged by callers).
/// `register`: analyse the statement and make sure its tables are watched on the primary first
/// (the warming worker); the listener's inline write-through refreshes pass false — their tables
/// are watched already (an announcement for them is what triggered the refresh).
pub async fn refresh(
    shared: &Arc<Shared>,
    cache: &Cache,
    spec: &Spec,
    register: bool,
) -> Result<(), String> {
    let work = async {
        let node = shared.topology().primary.ok_or("no primary")?;
        let (pool, mut conn) = shared
            .acquire(node, &spec.database, &spec.login, true, shared.now_ms())
            .await
            .map_err(|e| e.message)?;
        let result = async {
            let plan = plan_sync(&conn.session, &spec.settings);
            if !plan.is_empty() {
                conn.apply(&plan).await.map_err(|e| format!("{e:?}"))?;
                conn.session = spec.settings.clone();
            }
            let tags = match (&spec.tags, register) {
                (Some(t), false) => t.clone(),
                (None, false) => return Err("not analysed yet".into()),
                (_, true) => {
                    let text = p::parse_query(p::body(&spec.batch)).map_err(|e| e.to_string())?;
                    let a = crate::cache::analyse_on(&mut conn, text, &[])
                        .await
                        .ok_or("connection lost")?;
                    if !a.cacheable {
                        return Err(format!("not cacheable: {}", a.reason.unwrap_or_default()));
                    }
                    if !cache
                        .ensure_watched(&spec.database, &a.relations, shared.now_ms())
                        .await
                    {
                        return Err("its tables could not be registered as watched".into());
                    }
                    Cache::tags_for(&spec.database, &a.relations, &[])
                }
            };
            let fill = cache
                .begin_fill(&spec.key, &spec.database, tags.clone(), spec.ttl, None)
                .await;
            let reply = conn
                .replay(&spec.batch)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let reply = client_reply(reply, spec.added_parse);
            let rows = conn
                .statements(&[("SELECT pg_catalog.pg_current_wal_lsn()::text", &[])])
                .await
                .map_err(|e| format!("{e:?}"))?;
            let lsn = rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .and_then(|s| dbopt_invalidation::parse_lsn(&s))
                .ok_or("no WAL position")?;
            cache.store(fill, reply, lsn).await;
            Ok(tags)
        }
        .await;
        let now = shared.now_ms();
        pool.release(conn, result.is_ok(), now);
        let tags = result?;
        if spec.tags.is_none() {
            // The warm statement is analysed now: later invalidations find it by its tags.
            if let Some(r) = &cache.refresher {
                r.register(Spec {
                    tags: Some(tags),
                    ..spec.clone()
                });
            }
        }
        Ok::<(), String>(())
    };
    let r = match tokio::time::timeout(REFRESH_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    };
    let c = &cache.counters;
    let counter = if r.is_ok() {
        &c.refreshes
    } else {
        &c.refresh_failures
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    r
}

/// The warming worker: runs queued refreshes at `warm_per_second`.
pub async fn run(shared: Arc<Shared>, cache: Arc<Cache>, mut rx: mpsc::UnboundedReceiver<String>) {
    let every = Duration::from_secs_f64(1.0 / f64::from(cache.settings.warm_per_second.max(1)));
    let mut pending: Vec<String> = Vec::new();
    while let Some(k) = rx.recv().await {
        pending.push(k);
        while let Ok(k) = rx.try_recv() {
            if !pending.contains(&k) {
                pending.push(k);
            }
        }
        for key in std::mem::take(&mut pending) {
            let Some(r) = &cache.refresher else { return };
            let Some(spec) = r.spec(&key) else { continue };
            if !cache.synced(&spec.database) {
                continue;
            }
            if let Err(e) = refresh(&shared, &cache, &spec, true).await {
                log::warn(&format!("cache: warming a statement failed: {e}"));
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(key: &str, tags: &[&str], wt: bool) -> Spec {
        Spec {
            key: key.into(),
            database: "db".into(),
            login: Login {
                role: "app".into(),
                password: None,
                admin: false,
            },
            settings: Settings::new(),
            batch: vec![],
            added_parse: false,
            tags: Some(tags.iter().map(|t| t.to_string()).collect()),
            ttl: Duration::from_secs(1),
            write_through: wt,
        }
    }

    #[test]
    fn affected_specs_by_tag() {
        let (r, _rx) = Refresher::new();
        let t1 = Tag::Table("db".into(), 1);
        let t2 = Tag::Table("db".into(), 2);
        r.register(spec("a", &[&t1.key()], true));
        r.register(spec("b", &[&t2.key()], false));
        let (wt, other) = r.affected("db", std::slice::from_ref(&t1));
        assert_eq!((wt.len(), other.len()), (1, 0));
        let (wt, other) = r.affected("db", &[Tag::Database("db".into())]);
        assert_eq!((wt.len(), other.len()), (1, 1));
        // Re-registering moves the spec to its new tags.
        r.register(spec("a", &[&t2.key()], true));
        assert_eq!(r.affected("db", &[t1]).0.len(), 0);
        assert_eq!(r.affected("db", &[t2]).0.len(), 1);
    }

    #[test]
    fn batches_are_made_self_contained() {
        let mut q = Vec::new();
        p::put_msg(&mut q, b'Q', |b| p::put_cstr(b, b"SELECT 1"));
        assert_eq!(
            self_contained(&[(b'Q', q.clone())], &Default::default()),
            Some((q, false))
        );
        // A Bind of a named statement the client prepared earlier: parsed again, unnamed.
        let mut statements = crate::translate::Statements::default();
        statements.insert(
            b"s1".to_vec(),
            std::sync::Arc::new(crate::translate::Statement {
                hash: 1,
                server_name: b"dbopt_1".to_vec(),
                query: b"SELECT $1".to_vec(),
                param_types: vec![0, 0],
                class: crate::classify::Class::write("test"),
            }),
        );
        let mut bind = Vec::new();
        p::put_bind(&mut bind, b"", b"s1", &[0, 0, 0, 0, 0, 0]);
        let mut exec = Vec::new();
        p::put_msg(&mut exec, b'E', |o| o.extend_from_slice(&[0, 0, 0, 0, 0]));
        let mut sync = Vec::new();
        p::put_msg(&mut sync, b'S', |_| {});
        let out = self_contained(
            &[(b'B', bind.clone()), (b'E', exec), (b'S', sync)],
            &statements,
        )
        .unwrap();
        assert!(out.1, "a Parse was added");
        let out = out.0;
        assert_eq!(out[0], b'P', "the statement is parsed first");
        // Its ParseComplete is not replayed to the client.
        assert_eq!(
            client_reply(b"1\0\0\0\x042\0\0\0\x04".to_vec(), true),
            b"2\0\0\0\x04"
        );
        assert_eq!(client_reply(b"2\0\0\0\x04".to_vec(), false), b"2\0\0\0\x04");
        assert!(out.windows(9).any(|w| w == b"SELECT $1"));
        // Unknown statement: not replayable.
        assert!(self_contained(&[(b'B', bind)], &Default::default()).is_none());
    }
}
