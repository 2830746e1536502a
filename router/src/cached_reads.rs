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
use crate::server::{ServerConn, SetupError};
use crate::session::{Attached, Session, Step};

/// PostgreSQL's verdict on a statement, asked on the client's own server connection.
const ANALYSIS_SQL: &str = "SELECT cacheable, reason, relations::text, relation_names::text \
     FROM dbopt.cache_analysis($1, $2::oid[])";

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

impl Session {
    /// Folds the user's latest write into the floor (read-your-writes across its connections).
    pub(crate) fn absorb_user_writes(&mut self) {
        if self.shared.config().pool.read_your_writes != ReadYourWrites::User {
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
                p::put_error(&mut self.out, "ERROR", "22023", &e);
                self.finish_refusal(batch);
                self.flush_client().await?;
                return Ok(CachePlan::Answered);
            }
        };
        if hint.is_none() && cache.settings.rules.is_empty() {
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
        if let Some(a) = cache.analysis(&analysis_key) {
            if !a.cacheable {
                cache.count_uncacheable();
                return Ok(CachePlan::None);
            }
            if hint.is_none() && rule_for(&cache, &text, &a).is_none() {
                return Ok(CachePlan::None);
            }
            if self.may_hit(&cache).await {
                if let Some(hit) = cache.lookup(&req.key).await {
                    self.out.extend_from_slice(&hit.reply.reply);
                    p::put_ready(&mut self.out, b'I');
                    self.floor.after_hit(hit.reply.fill_lsn);
                    self.flush_client().await?;
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
        self.floor.resolve(&self.shared.topology().lsn_history);
        self.floor.allows_hit(lsn)
    }

    /// On the connection the batch got, before it is sent: the analysis (asked once per
    /// statement shape), the decision, and the fill's versions and token.
    pub(crate) async fn prepare_fill(
        &mut self,
        conn: &mut ServerConn,
        plan: PendingFill,
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
                let types = format!(
                    "{{{}}}",
                    req.param_types
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                );
                let a = match conn
                    .statements(&[(ANALYSIS_SQL, &[&req.text, types.as_bytes()])])
                    .await
                {
                    Ok(rows) => {
                        let row = rows.into_iter().next().unwrap_or_default();
                        let col = |i: usize| row.get(i).cloned().flatten();
                        Analysis {
                            cacheable: col(0).as_deref() == Some("t"),
                            reason: col(1),
                            relations: col(2)
                                .as_deref()
                                .and_then(parse_oid_array)
                                .unwrap_or_default(),
                            names: col(3).as_deref().map(parse_text_array).unwrap_or_default(),
                        }
                    }
                    // The statement does not analyse (a syntax error, an unknown table...), or
                    // the extension is missing: not cacheable; the batch reports its own error.
                    Err(SetupError::Refused(r)) => Analysis {
                        cacheable: false,
                        reason: Some(format!("{} ({})", r.message, r.code)),
                        relations: Vec::new(),
                        names: Vec::new(),
                    },
                    Err(SetupError::Lost(_)) => return None,
                };
                cache.remember_analysis(analysis_key, a)
            }
        };
        let text = String::from_utf8_lossy(&req.text);
        let rule = rule_for(&cache, &text, &analysis);
        if !analysis.cacheable || (hint.is_none() && rule.is_none()) {
            if analysis.cacheable {
                return None;
            }
            cache.count_uncacheable();
            return None;
        }
        let ttl = policy::ttl(&cache.settings, hint.as_ref(), rule.as_ref());
        let replay = self.shared.topology().nodes[node].replay_lsn;
        if !is_primary && replay.is_none() {
            return None;
        }
        let tags = hint.map(|h| h.tags).unwrap_or_default();
        let fill = cache
            .begin_fill(
                &req.key,
                &self.database,
                Cache::tags_for(&self.database, &analysis.relations, &tags),
                ttl,
                if is_primary { None } else { replay },
            )
            .await;
        Some(Capture {
            fill,
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
                ..
            } = capture;
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
        });
    }
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
