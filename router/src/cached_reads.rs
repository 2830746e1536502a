//! The session's side of the result cache ([`crate::cache`]): answering a batch from the cache,
//! preparing a fill on the server connection the batch got, capturing the reply, and storing it.
//! Also the session's consistency floor: writes raise it before their acknowledgement, reads and
//! hits after them ([`crate::route::Floor`]).

use std::sync::Arc;

use crate::cache::key::{self, Request};
use crate::cache::policy::{self, Hint};
use crate::cache::{Analysis, Cache, Fill};
use crate::classify::Kind;
use crate::config::{PoolMode, ReadYourWrites};
use crate::protocol as p;
use crate::server::ServerConn;
use crate::session::{Attached, Session, Step};
use crate::sqlstate;

/// What the cache does with a batch.
pub(crate) enum CachePlan {
    /// Not a cache matter: relay as usual.
    None,
    /// Answered from the cache (or refused for a malformed hint).
    Answered,
    /// A miss (or not analysed yet): run it, and store the reply if it may be cached.
    Fill(Box<PendingFill>),
}

pub(crate) struct PendingFill {
    req: Request,
    hint: Option<Hint>,
    analysis_key: (String, String, String, Vec<u8>),
}

/// A reply being captured for the cache.
pub(crate) struct Capture {
    fill: Fill,
    /// For a write-through rule's entry: what refreshes it (registered once it stored).
    spec: Option<crate::cache::refresh::Spec>,
    relations: Vec<u32>,
    buf: Vec<u8>,
    spoiled: bool,
    max_bytes: usize,
}

impl Capture {
    /// One server message relayed to the client. Anything but plain result messages (an error,
    /// a notice, a notification, a setting report) spoils the capture.
    pub(crate) fn message(&mut self, tag: u8, msg: &[u8]) {
        match tag {
            b'Z' => {}
            b'E' | b'N' | b'A' | b'S' | b'G' | b'H' | b'W' => self.spoiled = true,
            _ => {
                if self.buf.len() + msg.len() > self.max_bytes {
                    self.spoiled = true;
                } else {
                    self.buf.extend_from_slice(msg);
                }
            }
        }
    }
}

impl Session {
    /// Folds the user's latest write into the floor (read-your-writes across its connections).
    pub(crate) fn absorb_user_writes(&mut self) {
        if self.limits.read_your_writes != ReadYourWrites::User {
            return;
        }
        if let Some(t) = self.shared.user_write(&self.user) {
            if t > self.user_write_seen {
                self.user_write_seen = t;
                self.floor.after_write(t);
            }
        }
    }

    /// A write was just committed (the server is idle, the acknowledgement not sent yet): raise
    /// the floor (and the user's), and wait until the cache has applied its invalidation.
    pub(crate) async fn after_commit(&mut self) {
        let now = self.shared.now_ms();
        match self.shared.config().pool.read_your_writes {
            ReadYourWrites::Off => {}
            ReadYourWrites::Connection => self.floor.after_write(now),
            ReadYourWrites::User => {
                self.floor.after_write(now);
                self.user_write_seen = self.user_write_seen.max(now);
                self.shared.note_user_write(&self.user, now);
            }
        }
        if let Some(cache) = &self.shared.cache {
            // On failure the database is bypassed until resynchronised: never stale.
            let _ = cache.barrier(&self.database).await;
        }
    }

    /// Decides what the cache does with a batch read outside a transaction; answers hits.
    pub(crate) async fn cache_plan(&mut self, batch: &[(u8, Vec<u8>)]) -> Step<CachePlan> {
        let Some(cache) = self.shared.cache.clone() else {
            return Ok(CachePlan::None);
        };
        let Some(auth) = self.auth.clone() else {
            return Ok(CachePlan::None);
        };
        if auth.pool_mode == PoolMode::Session {
            return Ok(CachePlan::None);
        }
        // Without rules or warm statements only a hint makes a statement cacheable: skip the key's
        // hashing for every batch that cannot carry one (the common case).
        if cache.settings.rules.is_empty()
            && cache.settings.warm.is_empty()
            && !mentions_cache_hint(batch, &self.statements)
        {
            return Ok(CachePlan::None);
        }
        let Some(req) = key::request(
            batch,
            &self.statements,
            &self.database,
            &auth.login.role,
            &self.settings,
        ) else {
            return Ok(CachePlan::None);
        };
        let text = String::from_utf8_lossy(&req.text).into_owned();
        let hint = match policy::hint(&text) {
            Ok(h) => h,
            Err(e) => {
                p::put_error(
                    &mut self.out,
                    "ERROR",
                    sqlstate::INVALID_PARAMETER_VALUE,
                    &e,
                );
                self.finish_refusal(batch);
                self.flush_client().await?;
                return Ok(CachePlan::Answered);
            }
        };
        // A `[[cache.warm]]` statement is cached by configuration, like a rule's.
        let warm = cache
            .refresher
            .as_ref()
            .is_some_and(|r| r.spec(&req.key).is_some());
        if hint.is_none() && cache.settings.rules.is_empty() && !warm {
            return Ok(CachePlan::None);
        }
        if self.class_of_text(&req.text).kind != Kind::Read {
            return Ok(CachePlan::None);
        }
        if !cache.synced(&self.database) {
            cache.count_bypass();
            return Ok(CachePlan::None);
        }
        let search_path = self
            .settings
            .get("search_path")
            .cloned()
            .unwrap_or_default();
        let analysis_key = (
            self.database.clone(),
            auth.login.role.clone(),
            search_path,
            req.shape.clone(),
        );
        let analysis = cache.analysis(&analysis_key);
        if let Some(a) = &analysis {
            if !a.cacheable {
                cache.count_uncacheable();
                return Ok(CachePlan::None);
            }
            if hint.is_none() && !warm && rule_for(&cache, &text, a).is_none() {
                return Ok(CachePlan::None);
            }
        }
        // Not analysed here yet: only a warm statement's entry may exist (the router analysed it
        // under this very key when it filled it).
        if analysis.is_some() || warm {
            if self.may_hit(&cache).await {
                let extra = self.limit_commands_for_cache();
                let (hit, replies) = cache.lookup_with(&req.key, &extra).await;
                if let Some(hit) = hit {
                    // The statement is counted even when the cache answers it.
                    if !self.settle_limit(batch, replies).await? {
                        return Ok(CachePlan::Answered);
                    }
                    // A named Parse answered from the cache still defines the statement.
                    let class = self.class_of_text(&req.text);
                    for (_, msg) in batch.iter().filter(|(t, _)| *t == b'P') {
                        crate::translate::remember_parse(&mut self.statements, msg, class);
                    }
                    self.out.extend_from_slice(&hit.reply.reply);
                    p::put_ready(&mut self.out, b'I');
                    self.floor.after_hit(hit.reply.fill_lsn);
                    self.flush_client().await?;
                    return Ok(CachePlan::Answered);
                }
                // A miss: the check rode along; decide it now (the statement runs next).
                if replies.is_some() && !self.settle_limit(batch, replies).await? {
                    return Ok(CachePlan::Answered);
                }
            } else {
                cache.count_bypass();
            }
        }
        Ok(CachePlan::Fill(Box::new(PendingFill {
            req,
            hint,
            analysis_key,
        })))
    }

    /// May an entry serve this client now (never back in time)? Waits for one barrier if the
    /// applied invalidations are behind the client's floor.
    async fn may_hit(&mut self, cache: &Arc<Cache>) -> bool {
        self.absorb_user_writes();
        self.floor.resolve(&self.shared.topology().lsn_history);
        let processed = cache.feed(&self.database, |f| f.processed_lsn);
        if self.floor.allows_hit(processed) {
            return true;
        }
        let Some(lsn) = cache.barrier(&self.database).await else {
            return false;
        };
        // The barrier went out after this session asked for it — after its last read and its
        // user's writes it absorbed above ended — and carries the primary's position read then.
        self.floor.resolve(&self.shared.topology().lsn_history);
        self.floor.cover_pending(lsn);
        self.floor.allows_hit(lsn)
    }

    /// On the connection the batch got, before it is sent: the analysis (asked once per
    /// statement shape), the decision, and the fill's versions and token.
    pub(crate) async fn prepare_fill(
        &mut self,
        conn: &mut ServerConn,
        plan: PendingFill,
        batch: &[(u8, Vec<u8>)],
        node: usize,
        is_primary: bool,
    ) -> Option<Capture> {
        let cache = self.shared.cache.clone()?;
        let PendingFill {
            req,
            hint,
            analysis_key,
        } = plan;
        let analysis = match cache.analysis(&analysis_key) {
            Some(a) => a,
            None => {
                let a = crate::cache::analyse_on(conn, &req.text, &req.param_types).await?;
                cache.remember_analysis(analysis_key, a)
            }
        };
        let text = String::from_utf8_lossy(&req.text);
        let rule = rule_for(&cache, &text, &analysis);
        let warm = cache
            .refresher
            .as_ref()
            .is_some_and(|r| r.spec(&req.key).is_some());
        if !analysis.cacheable {
            cache.count_uncacheable();
            return None;
        }
        if hint.is_none() && rule.is_none() && !warm {
            return None;
        }
        // The primary must announce writes to these tables before anything read from them is
        // stored (only watched tables are announced).
        let now = self.shared.now_ms();
        if !cache
            .ensure_watched(&self.database, &analysis.relations, now)
            .await
        {
            return None;
        }
        let ttl = policy::ttl(&cache.settings, hint.as_ref(), rule.as_ref());
        let mut replay = self.shared.topology().nodes[node].replay_lsn;
        if !is_primary {
            let sampled = replay?;
            let proven = {
                let t = self.shared.topology();
                cache.replica_covers(&self.database, &analysis.relations, sampled, |ms| {
                    t.lsn_history.covering(ms)
                })
            };
            // The router's sample of this replica is up to `health.lsn_poll_ms` old, and a table
            // watched or written moments ago needs a position newer than that: a client reading
            // right after (every miss within one poll interval) would never fill. Asked here, on
            // the fill's own connection before the fill runs, the position bounds what the fill
            // reads from below — as the sample does, only fresher.
            if !proven {
                cache.count_replay_probe();
                replay = Some(replayed_position(conn).await?.max(sampled));
            }
        }
        let tags = hint.map(|h| h.tags).unwrap_or_default();
        let tags = Cache::tags_for(&self.database, &analysis.relations, &tags);
        let spec = match (rule.as_ref().is_some_and(|r| r.write_through), &self.auth) {
            (true, Some(auth)) => crate::cache::refresh::self_contained(batch, &self.statements)
                .map(|(b, added_parse)| crate::cache::refresh::Spec {
                    key: req.key.clone(),
                    database: self.database.clone(),
                    login: auth.login.clone(),
                    settings: self.settings.clone(),
                    batch: b,
                    added_parse,
                    tags: Some(tags.clone()),
                    ttl,
                    write_through: true,
                }),
            _ => None,
        };
        let fill = cache
            .begin_fill(
                &req.key,
                &self.database,
                tags,
                ttl,
                if is_primary { None } else { replay },
            )
            .await;
        Some(Capture {
            fill,
            spec,
            relations: analysis.relations.clone(),
            buf: Vec::new(),
            spoiled: false,
            max_bytes: cache.settings.max_entry_bytes as usize,
        })
    }

    /// The batch is done: store its reply if nothing spoiled it (after a barrier, so the entry
    /// carries a fill position and any invalidation committed before it has refused it).
    pub(crate) fn finish_fill(&self, att: &mut Attached) {
        let Some(capture) = att.capture.take() else {
            return;
        };
        let Some(cache) = self.shared.cache.clone() else {
            return;
        };
        if capture.spoiled || att.saw_transaction || capture.buf.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let Capture {
                fill,
                relations,
                buf,
                spec,
                ..
            } = *capture;
            let Some(lsn) = cache.barrier(&fill.database).await else {
                return;
            };
            let admitted = {
                let t = shared.topology();
                cache.admits(&fill, &relations, |ms| t.lsn_history.covering(ms))
            };
            if !admitted {
                cache.count_not_admitted();
                return;
            }
            cache.store(fill, buf, lsn).await;
            if let (Some(spec), Some(r)) = (spec, &cache.refresher) {
                r.register(spec);
            }
        });
    }
}

/// The replica's replayed WAL position, asked on `conn` (any role may call the function); `None`
/// when the connection broke or the node no longer replays (promoted): no fill then.
async fn replayed_position(conn: &mut ServerConn) -> Option<u64> {
    let rows = conn
        .statements(&[("SELECT pg_catalog.pg_last_wal_replay_lsn()::text", &[])])
        .await
        .ok()?;
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|s| dbopt_invalidation::parse_lsn(&s))
}

/// Whether a batch's statement text may carry a `dbopt:cache` hint (its messages, or the text of
/// a named statement it binds).
fn mentions_cache_hint(batch: &[(u8, Vec<u8>)], statements: &crate::translate::Statements) -> bool {
    static HINT: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"dbopt:cache"));
    let has = |b: &[u8]| HINT.find(b).is_some();
    batch.iter().any(|(tag, msg)| {
        has(msg)
            || (*tag == b'B'
                && p::bind_names(p::body(msg))
                    .ok()
                    .and_then(|m| statements.get(m.statement))
                    .is_some_and(|s| has(&s.query)))
    })
}

fn rule_for(cache: &Cache, text: &str, a: &Analysis) -> Option<crate::cache::settings::CacheRule> {
    let rules = &cache.settings.rules;
    if rules.is_empty() {
        return None;
    }
    let fingerprint = rules
        .iter()
        .any(|r| r.fingerprint.is_some())
        .then(|| pg_query::fingerprint(text).ok().map(|f| f.hex))
        .flatten();
    policy::matching_rule(rules, fingerprint.as_deref(), &a.names).cloned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hint_mentions_are_found_in_the_batch_or_its_statement() {
        let mut q = Vec::new();
        p::put_msg(&mut q, b'Q', |b| {
            p::put_cstr(b, b"/* dbopt:cache */ SELECT 1")
        });
        assert!(mentions_cache_hint(&[(b'Q', q)], &Default::default()));
        let mut plain = Vec::new();
        p::put_msg(&mut plain, b'Q', |b| p::put_cstr(b, b"SELECT 1"));
        assert!(!mentions_cache_hint(&[(b'Q', plain)], &Default::default()));
        let mut statements = crate::translate::Statements::default();
        statements.insert(
            b"s1".to_vec(),
            Arc::new(crate::translate::Statement {
                hash: 1,
                server_name: b"dbopt_1".to_vec(),
                query: b"/* dbopt:cache */ SELECT $1".to_vec(),
                param_types: vec![0, 0],
                class: crate::classify::Class::write("test"),
            }),
        );
        let mut bind = Vec::new();
        p::put_bind(&mut bind, b"", b"s1", &[0, 0, 0, 0, 0, 0]);
        assert!(mentions_cache_hint(&[(b'B', bind)], &statements));
    }

    #[test]
    fn captures_only_plain_results() {
        let fill = Fill {
            key: "k".into(),
            database: "d".into(),
            tags: vec![],
            versions: vec![],
            token: None,
            ttl: std::time::Duration::from_secs(1),
            replica_replay: None,
        };
        let mut c = Capture {
            fill,
            spec: None,
            relations: vec![],
            buf: vec![],
            spoiled: false,
            max_bytes: 10,
        };
        c.message(b'T', b"T1234");
        c.message(b'Z', b"Z");
        assert_eq!(c.buf, b"T1234");
        c.message(b'D', b"D123456");
        assert!(c.spoiled, "over the size bound");
        c.spoiled = false;
        c.message(b'N', b"N");
        assert!(c.spoiled, "a notice is not cached");
    }
}
