//! The result cache: two layers (in-process [`local`], Redis with the dbopt module), filled by
//! clients' reads and emptied by the database's own commit announcements.
//!
//! # Layout
//! - [`key`] — which batches can be answered from the cache, and their keys (pure).
//! - [`policy`] — `dbopt:cache` hints, `[[cache.rules]]`, TTLs (pure).
//! - [`local`] — the in-process LRU with tag versions (pure).
//! - [`redis`] — the Redis client.
//! - [`listener`] — one task per database on the primary: LISTEN for announcements, invalidate
//!   both layers, answer barriers, resynchronise after anything was missed.
//! - [`refresh`] — fills the router does itself: write-through refreshes and warming.
//! - [`settings`] — the `[cache]` configuration.
//! - [`report`] — `/metrics`, `/status`, and manual invalidation from the admin endpoint.
//! - this file — the shared state and the three operations a session uses: [`Cache::lookup`],
//!   [`Cache::begin_fill`] / [`Cache::store`], and [`Cache::barrier`].
//!
//! # The consistency promise, and why it holds
//! 1. *Invalidation before acknowledgement.* A write through the router is acknowledged only after
//!    a barrier: the listener NOTIFYs itself; PostgreSQL delivers notifications in commit order, so
//!    when the barrier comes back every announcement committed before it — the writer's included —
//!    has been applied to both layers.
//! 2. *No stale fill.* A fill records its tags' versions (local) and a token (Redis) before it
//!    reads; an invalidation in between refuses the store. A fill read on a replica is stored only
//!    if the replica had replayed, before the fill began, past every invalidation of the tables
//!    it read that the router has applied.
//! 3. *Never back in time.* A hit is served only when invalidations are applied up to the client's
//!    floor ([`crate::route::Floor`]); the hit raises the floor to the entry's fill position.
//! 4. *When in doubt, bypass.* A database whose listener is not connected, or whose barrier timed
//!    out, is bypassed until its listener has reconnected and invalidated everything it had; Redis
//!    is bypassed from its first failure until it answers again and has been emptied of this
//!    router's databases.

pub mod key;
pub mod listener;
pub mod local;
pub mod policy;
pub mod redis;
pub mod refresh;
pub mod report;
pub mod settings;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use dbopt_invalidation::Tag;
use dbopt_querystats::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use self::local::{Entry, Local};
use self::redis::{Redis, Reply};
use self::settings::CacheSettings;

/// Unix time in milliseconds (entries carry absolute expiries: Redis values outlive a process).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) use crate::locks::lock;

/// PostgreSQL's verdict on a statement shape (`dbopt.cache_analysis`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub cacheable: bool,
    pub reason: Option<String>,
    pub relations: Vec<u32>,
    pub names: Vec<String>,
}

/// PostgreSQL's verdict on a statement, asked on a server connection of the client's role.
const ANALYSIS_SQL: &str = "SELECT cacheable, reason, relations::text, relation_names::text \
     FROM dbopt.cache_analysis($1, $2::oid[])";

/// `{1,2}` (PostgreSQL's text form of an array of numbers) as numbers.
fn parse_oid_array(s: &str) -> Option<Vec<u32>> {
    let inner = s.strip_prefix('{')?.strip_suffix('}')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner.split(',').map(|x| x.parse().ok()).collect()
}

/// `{a.b,"c d.e"}` as strings (names with special characters come quoted).
fn parse_text_array(s: &str) -> Vec<String> {
    let inner = s.trim_start_matches('{').trim_end_matches('}');
    if inner.is_empty() {
        return Vec::new();
    }
    inner
        .split(',')
        .map(|x| {
            x.trim_matches('"')
                .replace("\\\"", "\"")
                .replace("\\\\", "\\")
        })
        .collect()
}

/// Asks PostgreSQL, on `conn` (the client's role and settings), whether a statement may be cached.
/// A statement that does not analyse (a syntax error, an unknown table, the extension missing) is
/// not cacheable; `None` when the connection broke.
pub async fn analyse_on(
    conn: &mut crate::server::ServerConn,
    text: &[u8],
    param_types: &[u32],
) -> Option<Analysis> {
    let types = format!(
        "{{{}}}",
        param_types
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    match conn
        .statements(&[(ANALYSIS_SQL, &[text, types.as_bytes()])])
        .await
    {
        Ok(rows) => {
            let row = rows.into_iter().next().unwrap_or_default();
            let col = |i: usize| row.get(i).cloned().flatten();
            Some(Analysis {
                cacheable: col(0).as_deref() == Some("t"),
                reason: col(1),
                relations: col(2)
                    .as_deref()
                    .and_then(parse_oid_array)
                    .unwrap_or_default(),
                names: col(3).as_deref().map(parse_text_array).unwrap_or_default(),
            })
        }
        Err(crate::server::SetupError::Refused(r)) => Some(Analysis {
            cacheable: false,
            reason: Some(format!("{} ({})", r.message, r.code)),
            relations: Vec::new(),
            names: Vec::new(),
        }),
        Err(crate::server::SetupError::Lost(_)) => None,
    }
}

/// Memo key of an analysis: database, role, search_path, statement shape.
type AnalysisKey = (String, String, String, Vec<u8>);

/// Most analyses remembered before the memo is emptied.
const ANALYSES_MAX: usize = 10_000;

/// The state of one database's invalidation feed.
#[derive(Debug, Default)]
pub struct DbFeed {
    /// The listener is connected and everything before its connection was invalidated.
    pub synced: bool,
    /// Announcements are applied up to this LSN (from the last barrier).
    pub processed_lsn: u64,
    /// Router time (topology clock) a table was last invalidated, for replica fills.
    pub invalidated_at: HashMap<u32, u64>,
    /// Router time the whole database was last invalidated.
    pub all_at: u64,
    /// Where barrier requests go (the listener task).
    pub barriers: Option<mpsc::UnboundedSender<oneshot::Sender<u64>>>,
    /// Tables registered as watched on the current primary (`dbopt.watch_tables`): only writes
    /// to watched tables are announced.
    pub watched: std::collections::HashSet<u32>,
    /// Where registrations go (the listener task, on the primary's connection).
    pub registrations: Option<mpsc::UnboundedSender<(Vec<u32>, oneshot::Sender<bool>)>>,
}

/// Most tables whose invalidation time is remembered; beyond, the database-wide time is used.
const INVALIDATED_MAX: usize = 100_000;

/// Counters for `/metrics` and `/status`.
#[derive(Default)]
pub struct CacheCounters {
    pub redis_hits: AtomicU64,
    pub redis_misses: AtomicU64,
    pub redis_fills: AtomicU64,
    pub redis_refused: AtomicU64,
    pub redis_errors: AtomicU64,
    pub fills_not_admitted: AtomicU64,
    /// Replica fills that asked the replica for its replayed position first (the router's
    /// sample did not show that it had a recent invalidation).
    pub replay_probes: AtomicU64,
    pub bypassed: AtomicU64,
    pub uncacheable: AtomicU64,
    pub invalidations: AtomicU64,
    pub resyncs: AtomicU64,
    pub barrier_timeouts: AtomicU64,
    /// Fills the router did itself (write-through and warming), and those that failed.
    pub refreshes: AtomicU64,
    pub refresh_failures: AtomicU64,
    /// Invalidations that may not have reached every layer: a Redis invalidation that failed, or
    /// the listener losing its connection while synchronised (announcements may be missed; the
    /// cache is bypassed until resynchronised). Alerted on (`[alerts]`).
    pub invalidation_failures: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub struct Cache {
    pub local: Mutex<Local>,
    pub redis: Option<Arc<Redis>>,
    /// Redis answered its last call, and was emptied of our databases after its last failure.
    redis_up: AtomicBool,
    pub feeds: Mutex<HashMap<String, DbFeed>>,
    analyses: Mutex<HashMap<AnalysisKey, Arc<Analysis>>>,
    pub counters: CacheCounters,
    /// Commit → both layers invalidated, in milliseconds.
    pub delay: Mutex<Histogram>,
    pub settings: CacheSettings,
    /// Write-through and warm specs.
    pub refresher: Option<refresh::Refresher>,
    /// The refresher's queue, taken by its worker when the router starts.
    pub refresh_queue: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

/// What a hit returns.
pub struct Hit {
    pub reply: Arc<Entry>,
    pub layer: &'static str,
}

/// A fill in progress: what it must present when it stores.
pub struct Fill {
    pub key: String,
    pub database: String,
    pub tags: Vec<String>,
    pub versions: Vec<u64>,
    pub token: Option<Vec<u8>>,
    pub ttl: Duration,
    /// Set when the fill reads on a replica: its replayed LSN before the fill began.
    pub replica_replay: Option<u64>,
}

/// Magic of the router's Redis values (format version 1): fill LSN, expiry, tags, reply.
const VALUE_MAGIC: &[u8; 4] = b"DRC1";

fn encode_value(e: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(e.reply.len() + 64);
    out.extend_from_slice(VALUE_MAGIC);
    out.extend_from_slice(&e.fill_lsn.to_le_bytes());
    out.extend_from_slice(&e.expires_ms.to_le_bytes());
    out.extend_from_slice(&(e.tags.len() as u16).to_le_bytes());
    for t in &e.tags {
        out.extend_from_slice(&(t.len() as u16).to_le_bytes());
        out.extend_from_slice(t.as_bytes());
    }
    out.extend_from_slice(&e.reply);
    out
}

/// (fill LSN, expiry, tags, reply); `None` for anything malformed (treated as a miss).
fn decode_value(v: &[u8]) -> Option<(u64, u64, Vec<String>, Vec<u8>)> {
    fn take(r: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
        (r.len() >= n).then(|| r.split_at(n))
    }
    let rest = v.strip_prefix(VALUE_MAGIC)?;
    let (lsn, rest) = take(rest, 8)?;
    let (exp, rest) = take(rest, 8)?;
    let (n, mut rest) = take(rest, 2)?;
    let mut tags = Vec::new();
    for _ in 0..u16::from_le_bytes([n[0], n[1]]) {
        let (len, r) = take(rest, 2)?;
        let (t, r) = take(r, usize::from(u16::from_le_bytes([len[0], len[1]])))?;
        tags.push(String::from_utf8(t.to_vec()).ok()?);
        rest = r;
    }
    Some((
        u64::from_le_bytes(lsn.try_into().ok()?),
        u64::from_le_bytes(exp.try_into().ok()?),
        tags,
        rest.to_vec(),
    ))
}

/// Most tags one module command takes (the module's `MAX_TAGS`).
const MODULE_MAX_TAGS: usize = 1024;

fn entry_key(key: &str) -> String {
    format!("dbopt:entry:{key}")
}

impl Cache {
    pub fn new(settings: &CacheSettings) -> Cache {
        let redis = settings.redis.as_ref().map(|a| {
            Arc::new(Redis::new(
                a,
                settings.redis_user.clone(),
                settings.redis_password.clone(),
                settings.redis_timeout_ms,
            ))
        });
        let (refresher, queue) = refresh::Refresher::new();
        Cache {
            local: Mutex::new(Local::new(settings.local_max_bytes as usize)),
            redis,
            redis_up: AtomicBool::new(false),
            feeds: Mutex::new(HashMap::new()),
            analyses: Mutex::new(HashMap::new()),
            counters: CacheCounters::default(),
            delay: Mutex::new(Histogram::default()),
            settings: settings.clone(),
            refresher: Some(refresher),
            refresh_queue: Mutex::new(Some(queue)),
        }
    }

    pub fn redis_up(&self) -> bool {
        self.redis.is_some() && self.redis_up.load(Ordering::Relaxed)
    }

    /// A Redis call failed: bypass it until [`Cache::recover_redis`] succeeds.
    fn redis_failed(&self, what: &str, e: &redis::RedisError) {
        inc(&self.counters.redis_errors);
        if self.redis_up.swap(false, Ordering::Relaxed) {
            crate::log::warn(&format!(
                "cache: Redis {what} failed ({e}); bypassing Redis until it answers and is resynchronised"
            ));
        }
        if let Some(r) = &self.redis {
            r.reset();
        }
    }

    /// Brings Redis back after a failure: every database's tag is dropped first (invalidations may
    /// have been missed meanwhile), then it is used again.
    pub async fn recover_redis(&self, databases: &[String]) {
        let Some(r) = &self.redis else { return };
        if self.redis_up.load(Ordering::Relaxed) {
            return;
        }
        let mut args: Vec<Vec<u8>> = vec![b"DBOPT.TAG.INVALIDATE".to_vec()];
        args.extend(
            databases
                .iter()
                .map(|d| Tag::Database(d.clone()).key().into_bytes()),
        );
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        match r.call(&refs).await {
            Ok(Reply::Int(_)) => {
                self.redis_up.store(true, Ordering::Relaxed);
                inc(&self.counters.resyncs);
                crate::log::info("cache: Redis answers and was resynchronised; using it again");
            }
            Ok(other) => self.redis_failed(
                "resynchronisation",
                &redis::RedisError(format!("{other:?}")),
            ),
            Err(e) => self.redis_failed("resynchronisation", &e),
        }
    }

    pub fn feed<T>(&self, db: &str, f: impl FnOnce(&mut DbFeed) -> T) -> T {
        let mut feeds = lock(&self.feeds);
        f(feeds.entry(db.to_string()).or_default())
    }

    pub fn synced(&self, db: &str) -> bool {
        self.feed(db, |f| f.synced)
    }

    /// Makes sure the primary announces writes to `relations` (`dbopt.watch_tables`), once per
    /// table and listener connection; false when that could not be done (then nothing is filled).
    /// A newly watched table counts as invalidated now: writes before the registration were not
    /// announced, so a replica fill must have replayed past this moment.
    pub async fn ensure_watched(&self, db: &str, relations: &[u32], now_ms: u64) -> bool {
        let (missing, tx) = self.feed(db, |f| {
            let missing: Vec<u32> = relations
                .iter()
                .copied()
                .filter(|r| !f.watched.contains(r))
                .collect();
            (missing, f.registrations.clone())
        });
        if missing.is_empty() {
            return true;
        }
        let Some(tx) = tx else { return false };
        let (done, answer) = oneshot::channel();
        if tx.send((missing.clone(), done)).is_err() {
            return false;
        }
        let limit = Duration::from_millis(self.settings.invalidation_timeout_ms.max(2000));
        let ok = matches!(tokio::time::timeout(limit, answer).await, Ok(Ok(true)));
        if ok {
            self.feed(db, |f| {
                for r in missing {
                    f.watched.insert(r);
                    f.invalidated_at.insert(r, now_ms);
                }
            });
        }
        ok
    }

    /// Marks a database unsynchronised (bypassed) until its listener resynchronises it.
    pub fn desync(&self, db: &str, why: &str) {
        let was = self.feed(db, |f| std::mem::replace(&mut f.synced, false));
        if was {
            inc(&self.counters.invalidation_failures);
            crate::log::warn(&format!(
                "cache: database \"{db}\" bypassed until resynchronised: {why}"
            ));
        }
    }

    pub fn analysis(&self, key: &AnalysisKey) -> Option<Arc<Analysis>> {
        lock(&self.analyses).get(key).cloned()
    }

    pub fn remember_analysis(&self, key: AnalysisKey, a: Analysis) -> Arc<Analysis> {
        let a = Arc::new(a);
        let mut m = lock(&self.analyses);
        if m.len() >= ANALYSES_MAX {
            m.clear();
        }
        m.insert(key, a.clone());
        a
    }

    /// Forgets the analyses of a database (its schema changed).
    pub fn forget_analyses(&self, db: &str) {
        lock(&self.analyses).retain(|k, _| k.0 != db);
    }

    /// Applies an announcement's tags to both layers (Redis failures bypass Redis).
    pub async fn invalidate(&self, db: &str, tags: &[Tag], now_ms: u64) {
        let keys: Vec<String> = tags.iter().map(Tag::key).collect();
        lock(&self.local).invalidate(&keys);
        self.feed(db, |f| {
            for t in tags {
                match t {
                    Tag::Table(_, oid) => {
                        f.invalidated_at.insert(*oid, now_ms);
                    }
                    Tag::Database(_) => {
                        f.all_at = now_ms;
                        f.invalidated_at.clear();
                    }
                    Tag::User(..) => {}
                }
            }
            if f.invalidated_at.len() > INVALIDATED_MAX {
                f.all_at = now_ms;
                f.invalidated_at.clear();
            }
        });
        inc(&self.counters.invalidations);
        if !self.redis_up() || keys.is_empty() {
            return;
        }
        let Some(r) = &self.redis else { return };
        // The module takes at most MAX_TAGS tags per call.
        for chunk in keys.chunks(MODULE_MAX_TAGS) {
            let mut args: Vec<&[u8]> = vec![b"DBOPT.TAG.INVALIDATE"];
            args.extend(chunk.iter().map(|k| k.as_bytes()));
            let failure = match r.call(&args).await {
                Ok(Reply::Int(_)) => continue,
                Ok(other) => redis::RedisError(format!("{other:?}")),
                Err(e) => e,
            };
            inc(&self.counters.invalidation_failures);
            return self.redis_failed("invalidation", &failure);
        }
    }

    /// Drops the Redis tag keys matching a glob (every entry under them becomes invalid).
    pub async fn invalidate_redis_matching(&self, pattern: &str) {
        let (Some(r), true) = (&self.redis, self.redis_up()) else {
            return;
        };
        let mut cursor = b"0".to_vec();
        loop {
            let reply = r
                .call(&[
                    b"SCAN",
                    &cursor,
                    b"MATCH",
                    pattern.as_bytes(),
                    b"COUNT",
                    b"1000",
                ])
                .await;
            let (next, keys) = match reply {
                Ok(Reply::Array(parts)) if parts.len() == 2 => {
                    let next = match &parts[0] {
                        Reply::Bulk(Some(c)) => c.clone(),
                        _ => return,
                    };
                    let keys: Vec<Vec<u8>> = match &parts[1] {
                        Reply::Array(k) => k
                            .iter()
                            .filter_map(|k| match k {
                                Reply::Bulk(Some(k)) => Some(k.clone()),
                                _ => None,
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    (next, keys)
                }
                Ok(other) => {
                    return self.redis_failed("SCAN", &redis::RedisError(format!("{other:?}")))
                }
                Err(e) => return self.redis_failed("SCAN", &e),
            };
            for chunk in keys.chunks(MODULE_MAX_TAGS) {
                let mut args: Vec<&[u8]> = vec![b"DBOPT.TAG.INVALIDATE"];
                args.extend(chunk.iter().map(Vec::as_slice));
                if let Err(e) = r.call(&args).await {
                    return self.redis_failed("invalidation", &e);
                }
            }
            if next == b"0" {
                return;
            }
            cursor = next;
        }
    }

    /// Waits until every announcement committed before now is applied; the LSN it is applied to.
    /// `None` when the database's listener is not connected or does not answer in time (the
    /// database is then bypassed until resynchronised).
    pub async fn barrier(&self, db: &str) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        let sent = self.feed(db, |f| {
            f.synced && f.barriers.as_ref().is_some_and(|b| b.send(tx).is_ok())
        });
        if !sent {
            return None;
        }
        let limit = Duration::from_millis(self.settings.invalidation_timeout_ms);
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(lsn)) => Some(lsn),
            _ => {
                inc(&self.counters.barrier_timeouts);
                self.desync(db, "a barrier was not answered in time");
                None
            }
        }
    }

    /// The entry for `key`, from the local layer or else Redis (which then fills the local one).
    /// A lookup; when it goes to Redis, `extra` commands (a rate-limit check) ride in the same
    /// round trip, and their replies (or the failure) come back. Nothing is sent for them when
    /// the in-process layer answers or Redis is bypassed.
    pub async fn lookup_with(
        &self,
        key: &str,
        extra: &[Vec<u8>],
    ) -> (Option<Hit>, Option<Result<Vec<Reply>, redis::RedisError>>) {
        let now = unix_ms();
        if let Some(e) = lock(&self.local).get(key, now) {
            let hit = Hit {
                reply: e,
                layer: "local",
            };
            return (Some(hit), None);
        }
        let Some(r) = self.redis.as_ref().filter(|_| self.redis_up()) else {
            return (None, None);
        };
        let rkey = entry_key(key);
        let mut commands = vec![redis::encode(&[b"DBOPT.CACHE.GET", rkey.as_bytes()])];
        commands.extend_from_slice(extra);
        let (get, rest) = match r.pipeline(&commands).await {
            Ok(mut replies) if replies.len() == commands.len() => {
                let rest = replies.split_off(1);
                (
                    replies
                        .pop()
                        .ok_or_else(|| redis::RedisError("no reply".into())),
                    rest,
                )
            }
            Ok(_) => (Err(redis::RedisError("missing replies".into())), Vec::new()),
            Err(e) => {
                let extra_result = (!extra.is_empty()).then(|| Err(e.clone()));
                self.redis_failed("GET", &e);
                return (None, extra_result);
            }
        };
        let extra_result = (!extra.is_empty()).then_some(Ok(rest));
        (self.hit_from_redis(key, get, now), extra_result)
    }

    fn hit_from_redis(
        &self,
        key: &str,
        get: Result<Reply, redis::RedisError>,
        now: u64,
    ) -> Option<Hit> {
        match get {
            Ok(Reply::Bulk(Some(v))) => {
                let Some((fill_lsn, expires_ms, tags, reply)) = decode_value(&v) else {
                    inc(&self.counters.redis_misses);
                    return None;
                };
                // Versions now: an invalidation applied since the GET answered refuses the copy.
                let versions = lock(&self.local).versions(&tags);
                let entry = Arc::new(Entry {
                    reply,
                    tags,
                    versions,
                    expires_ms,
                    fill_lsn,
                });
                if entry.expires_ms <= now {
                    inc(&self.counters.redis_misses);
                    return None;
                }
                inc(&self.counters.redis_hits);
                lock(&self.local).insert(key, entry.clone(), now);
                Some(Hit {
                    reply: entry,
                    layer: "redis",
                })
            }
            Ok(Reply::Bulk(None)) => {
                inc(&self.counters.redis_misses);
                None
            }
            Ok(other) => {
                self.redis_failed("GET", &redis::RedisError(format!("{other:?}")));
                None
            }
            Err(e) => {
                self.redis_failed("GET", &e);
                None
            }
        }
    }

    /// The tags of an entry: its database's, its tables', and the hint's application tags.
    pub fn tags_for(database: &str, relations: &[u32], user_tags: &[String]) -> Vec<String> {
        let mut tags: Vec<String> = vec![Tag::Database(database.to_string()).key()];
        tags.extend(
            relations
                .iter()
                .map(|&oid| Tag::Table(database.to_string(), oid).key()),
        );
        tags.extend(
            user_tags
                .iter()
                .map(|t| Tag::User(database.to_string(), t.clone()).key()),
        );
        tags.sort_unstable();
        tags.dedup();
        tags
    }

    /// Takes the versions (local) and token (Redis) a fill must present when it stores.
    /// `replica_replay`: the replica's replayed LSN before the fill began (`None` on the primary).
    pub async fn begin_fill(
        &self,
        key: &str,
        database: &str,
        tags: Vec<String>,
        ttl: Duration,
        replica_replay: Option<u64>,
    ) -> Fill {
        let versions = lock(&self.local).versions(&tags);
        let mut token = None;
        // More tags than the module takes in one call: the entry stays local.
        if self.redis_up() && tags.len() <= MODULE_MAX_TAGS {
            if let Some(r) = &self.redis {
                let mut args: Vec<&[u8]> = vec![b"DBOPT.TAG.TOKEN"];
                args.extend(tags.iter().map(|t| t.as_bytes()));
                match r.call(&args).await {
                    Ok(Reply::Bulk(Some(t))) => token = Some(t),
                    Ok(Reply::Status(t)) => token = Some(t.into_bytes()),
                    Ok(other) => {
                        self.redis_failed("TOKEN", &redis::RedisError(format!("{other:?}")))
                    }
                    Err(e) => self.redis_failed("TOKEN", &e),
                }
            }
        }
        Fill {
            key: key.to_string(),
            database: database.to_string(),
            tags,
            versions,
            token,
            ttl,
            replica_replay,
        }
    }

    /// May a fill read on a replica be stored? Only if the replica had replayed past every
    /// invalidation of its tables the router applied (`covering` turns a router time into an
    /// LSN that covers it).
    pub fn admits(
        &self,
        fill: &Fill,
        relations: &[u32],
        covering: impl Fn(u64) -> Option<u64>,
    ) -> bool {
        match fill.replica_replay {
            None => true,
            Some(replay) => self.replica_covers(&fill.database, relations, replay, covering),
        }
    }

    /// Had a replica that replayed up to `replay` seen every invalidation of `relations` the
    /// router applied (per table and database-wide)? False while an invalidation's covering
    /// position is not known yet.
    pub fn replica_covers(
        &self,
        database: &str,
        relations: &[u32],
        replay: u64,
        covering: impl Fn(u64) -> Option<u64>,
    ) -> bool {
        let times: Vec<u64> = self.feed(database, |f| {
            let mut t: Vec<u64> = relations
                .iter()
                .filter_map(|r| f.invalidated_at.get(r).copied())
                .collect();
            if f.all_at > 0 {
                t.push(f.all_at);
            }
            t
        });
        times
            .into_iter()
            .all(|t| covering(t).is_some_and(|lsn| replay >= lsn))
    }

    /// Stores a finished fill in both layers (each refuses it if a tag changed since it began).
    pub async fn store(&self, fill: Fill, reply: Vec<u8>, fill_lsn: u64) {
        let now = unix_ms();
        let entry = Arc::new(Entry {
            reply,
            tags: fill.tags.clone(),
            versions: fill.versions,
            expires_ms: now + fill.ttl.as_millis() as u64,
            fill_lsn,
        });
        lock(&self.local).insert(&fill.key, entry.clone(), now);
        let (Some(r), Some(token), true) = (&self.redis, &fill.token, self.redis_up()) else {
            return;
        };
        let value = encode_value(&entry);
        let rkey = entry_key(&fill.key);
        let ttl = fill.ttl.as_millis().max(1).to_string();
        let n = fill.tags.len().to_string();
        let mut args: Vec<&[u8]> = vec![
            b"DBOPT.CACHE.SET",
            rkey.as_bytes(),
            ttl.as_bytes(),
            &value,
            b"TAGS",
            n.as_bytes(),
        ];
        args.extend(fill.tags.iter().map(|t| t.as_bytes()));
        args.push(b"TOKEN");
        args.push(token);
        match r.call(&args).await {
            Ok(Reply::Int(1)) => inc(&self.counters.redis_fills),
            Ok(Reply::Int(_)) => inc(&self.counters.redis_refused),
            Ok(other) => self.redis_failed("SET", &redis::RedisError(format!("{other:?}"))),
            Err(e) => self.redis_failed("SET", &e),
        }
    }

    pub fn record_delay(&self, ms: f64) {
        lock(&self.delay).record(ms);
    }

    pub fn count_bypass(&self) {
        inc(&self.counters.bypassed);
    }

    pub fn count_uncacheable(&self) {
        inc(&self.counters.uncacheable);
    }

    pub fn count_not_admitted(&self) {
        inc(&self.counters.fills_not_admitted);
    }

    pub fn count_replay_probe(&self) {
        inc(&self.counters.replay_probes);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A table watched (or written) at router time 1000 needs a replica position at least as far
    /// as the first primary sample sent after it; until such a sample exists, nothing is proven.
    #[test]
    fn a_replica_covers_an_invalidation_once_past_its_covering_sample() {
        let cache = Cache::new(&CacheSettings::default());
        cache.feed("db", |f| {
            f.invalidated_at.insert(7, 1000);
        });
        let mut h = crate::route::LsnHistory::default();
        let covers = |h: &crate::route::LsnHistory, replay: u64| {
            cache.replica_covers("db", &[7], replay, |ms| h.covering(ms))
        };
        h.push(crate::route::LsnSample {
            sent_ms: 1000,
            lsn: 400,
        });
        assert!(
            !covers(&h, u64::MAX),
            "no sample sent after the invalidation yet"
        );
        h.push(crate::route::LsnSample {
            sent_ms: 1001,
            lsn: 500,
        });
        assert!(!covers(&h, 499));
        assert!(covers(&h, 500));
        // Tables never invalidated need nothing; a database-wide invalidation counts for all.
        assert!(cache.replica_covers("db", &[8], 0, |ms| h.covering(ms)));
        cache.feed("db", |f| f.all_at = 1001);
        assert!(!cache.replica_covers("db", &[8], 499, |ms| h.covering(ms)));
        h.push(crate::route::LsnSample {
            sent_ms: 1002,
            lsn: 600,
        });
        assert!(cache.replica_covers("db", &[8], 600, |ms| h.covering(ms)));
        // A fill on the primary is always admitted; on a replica, by its position.
        let fill = |replica_replay| Fill {
            key: "k".into(),
            database: "db".into(),
            tags: Vec::new(),
            versions: Vec::new(),
            token: None,
            ttl: Duration::from_secs(1),
            replica_replay,
        };
        assert!(cache.admits(&fill(None), &[7], |_| None));
        assert!(!cache.admits(&fill(Some(599)), &[7], |ms| h.covering(ms)));
        assert!(cache.admits(&fill(Some(600)), &[7], |ms| h.covering(ms)));
    }

    #[test]
    fn arrays_from_text() {
        assert_eq!(parse_oid_array("{1,22}"), Some(vec![1, 22]));
        assert_eq!(parse_oid_array("{}"), Some(vec![]));
        assert_eq!(parse_oid_array("{x}"), None);
        assert_eq!(
            parse_text_array("{public.a,\"odd schema.b\"}"),
            vec!["public.a", "odd schema.b"]
        );
    }

    #[test]
    fn redis_values_round_trip_and_reject_garbage() {
        let e = Entry {
            reply: b"T...D...C...".to_vec(),
            tags: vec!["a".into(), "bb".into()],
            versions: vec![],
            expires_ms: 77,
            fill_lsn: 99,
        };
        let v = encode_value(&e);
        let (lsn, exp, tags, reply) = decode_value(&v).unwrap();
        assert_eq!(
            (lsn, exp, tags, reply),
            (99, 77, e.tags.clone(), e.reply.clone())
        );
        assert!(decode_value(b"not an entry").is_none());
        assert!(decode_value(&v[..20]).is_none());
        let mut bad = v.clone();
        bad[20] = 0xff; // tag count far beyond the value
        assert!(decode_value(&bad).is_none());
    }
}
