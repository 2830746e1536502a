//! The session's side of the rate limits ([`crate::limits`]): which windows a batch or a statement
//! is counted in, the check (pipelined with the cache lookup when both go to Redis), and how a
//! refusal or a warning reaches the client.
//!
//! Outside a transaction a batch is checked whole (cost: its Query and Execute messages) before it
//! is routed; refused, nothing of it reaches PostgreSQL and the client gets SQLSTATE 53400 and its
//! ReadyForQuery. Inside a transaction (or on a pinned connection) each Query or Execute is checked
//! as it arrives; refused, it is replaced by a statement that fails on the server, so the server's
//! transaction fails exactly as the client is told (the client sees the 53400 error in its place,
//! and a later COMMIT rolls back).

use std::sync::Arc;

use crate::limits::rules::{self, Subject};
use crate::limits::{end_user, Check, Over, Source, Verdict};
use crate::protocol::{self as p, body};
use crate::session::{Session, Step};
use crate::sqlstate;

/// SQLSTATE of a refusal: configuration_limit_exceeded (class 53, insufficient resources).
pub const REFUSED: &str = sqlstate::CONFIGURATION_LIMIT_EXCEEDED;

/// The error's primary message, DETAIL and HINT.
pub fn refusal_text(o: &Over, warn: bool) -> (String, String, String) {
    let a = &o.applied;
    let window = rules::window_text(a.window_ms);
    let message = if warn {
        format!(
            "dbopt-router: rate limit \"{}\" exceeded (warn mode: the statement runs anyway): {} may run {} statements per {window}",
            a.name, a.counts, o.limit
        )
    } else {
        format!(
            "dbopt-router: rate limit \"{}\" exceeded: {} may run {} statements per {window}; retry after {} ms",
            a.name, a.counts, o.limit, o.retry_after_ms
        )
    };
    let mut detail = format!(
        "Retry after {} ms (limit {}, window {} ms).",
        o.retry_after_ms, o.limit, a.window_ms
    );
    match o.source {
        Source::Shared => {}
        Source::Local => detail.push_str(
            " Decided by this router alone while Redis is unreachable (limits.on_redis_error = \"local\").",
        ),
        Source::Closed => detail = format!(
            "Retry after {} ms. Redis, where the limits are kept, is unreachable and limits.on_redis_error = \"closed\".",
            o.retry_after_ms
        ),
    }
    let hint = format!(
        "Slow down, or ask for a higher limit (rule \"{}\" in [[limits.rules]] of the dbopt-router configuration).",
        a.name
    );
    (message, detail, hint)
}

/// Statements a batch runs: its Query and Execute messages.
pub fn statements_in(batch: &[(u8, Vec<u8>)]) -> u64 {
    batch
        .iter()
        .filter(|(tag, _)| matches!(tag, b'Q' | b'E'))
        .count() as u64
}

/// Whether a statement ends a transaction block (`COMMIT`, `ROLLBACK`, `END`, `ABORT`, also
/// `COMMIT AND CHAIN` and `ROLLBACK TO SAVEPOINT`), judged by its first word after comments.
pub fn ends_transaction(text: &[u8]) -> bool {
    let mut t = text;
    loop {
        t = t.trim_ascii_start();
        if let Some(rest) = t.strip_prefix(b"--") {
            t = rest.split(|&b| b == b'\n').nth(1).unwrap_or_default();
        } else if let Some(rest) = t.strip_prefix(b"/*") {
            match rest.windows(2).position(|w| w == b"*/") {
                Some(i) => t = &rest[i + 2..],
                None => return false,
            }
        } else {
            break;
        }
    }
    let word: Vec<u8> = t
        .iter()
        .take_while(|b| b.is_ascii_alphabetic())
        .map(u8::to_ascii_uppercase)
        .collect();
    matches!(word.as_slice(), b"COMMIT" | b"ROLLBACK" | b"END" | b"ABORT")
}

/// A statement's text, where it already is: in the batch, or in a prepared statement.
enum Text<'b> {
    Batch(&'b [u8]),
    Prepared(Arc<crate::translate::Statement>),
}

impl Text<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Text::Batch(b) => b,
            Text::Prepared(s) => &s.query,
        }
    }
}

/// The windows a session's last check used, and what they depended on.
pub(crate) struct LimitMemo {
    config: Arc<crate::config::Config>,
    end_user: Option<Vec<u8>>,
    node: Option<usize>,
    only_node: bool,
    check: Option<Check>,
}

impl Session {
    /// The check for `cost` statements of this session; `text`: a statement's text (its comment
    /// may name the end user); `node`: where it runs, once known (`only_node`: just the
    /// node-scoped windows). `None` when no window applies or the user is an admin (counted as
    /// bypassed). An invalid end user is an error message.
    pub(crate) fn limit_check(
        &mut self,
        cost: u64,
        text: Option<&[u8]>,
        node: Option<usize>,
        only_node: bool,
    ) -> Result<Option<Check>, String> {
        let config = self.shared.config();
        let ls = &config.limits;
        if ls.rules.is_empty() || cost == 0 {
            return Ok(None);
        }
        let Some(admin) = self.auth.as_ref().map(|a| a.login.admin) else {
            return Ok(None);
        };
        let end_user = if self.limits.end_users {
            self.end_user(text, ls)?
        } else {
            None
        };
        // The windows of the previous statement, when nothing they depend on changed (the common
        // case: no allocation per statement).
        let memo = self.limit_memo.as_ref().filter(|m| {
            Arc::ptr_eq(&m.config, &config)
                && m.end_user == end_user
                && m.node == node
                && m.only_node == only_node
        });
        let check = match memo {
            Some(m) => m.check.clone(),
            None => {
                let node_name = node.map(|n| self.shared.node_name(n));
                let applied = rules::applicable(
                    ls,
                    Subject {
                        user: &self.user,
                        database: &self.database,
                        end_user: end_user.as_deref(),
                        node: node_name.as_deref(),
                    },
                    only_node,
                );
                let check = (!applied.is_empty()).then(|| {
                    let (warn, enforce) = applied.into_iter().partition(|a| a.warn);
                    Check::new(1, enforce, warn)
                });
                self.limit_memo = Some(LimitMemo {
                    config: config.clone(),
                    end_user,
                    node,
                    only_node,
                    check: check.clone(),
                });
                check
            }
        };
        let Some(check) = check else {
            return Ok(None);
        };
        if admin {
            self.shared.limiter.bypassed(&check.enforce);
            self.shared.limiter.bypassed(&check.warn);
            return Ok(None);
        }
        Ok(Some(check.with_cost(cost)))
    }

    /// The end user: the statement's SQLCommenter comment, else the session setting.
    fn end_user(
        &self,
        text: Option<&[u8]>,
        ls: &crate::limits::settings::LimitSettings,
    ) -> Result<Option<Vec<u8>>, String> {
        if let Some(t) = text {
            let sql = String::from_utf8_lossy(t);
            if let Some(v) = end_user::from_comments(&sql, &ls.end_user_key)
                .map_err(|e| format!("invalid end user in the statement's comment: {e}"))?
            {
                return Ok(Some(v));
            }
        }
        match self.settings.get(&ls.end_user_setting) {
            Some(v) if !v.is_empty() => {
                end_user::check(v.as_bytes()).map_err(|e| {
                    format!("invalid end user in setting {}: {e}", ls.end_user_setting)
                })?;
                Ok(Some(v.as_bytes().to_vec()))
            }
            _ => Ok(None),
        }
    }

    /// The statement text of a batch that may name its end user (the first one found).
    /// Only looked for when a rule needs the end user; never copied.
    fn batch_text<'b>(&self, batch: &'b [(u8, Vec<u8>)]) -> Option<Text<'b>> {
        if !self.limits.end_users {
            return None;
        }
        batch.iter().find_map(|(tag, msg)| {
            let b = body(msg);
            match tag {
                b'Q' => p::parse_query(b).ok().map(Text::Batch),
                b'P' => p::parse_parse(b).ok().map(|m| Text::Batch(m.query)),
                b'B' => p::bind_names(b)
                    .ok()
                    .and_then(|m| self.statements.get(m.statement).cloned())
                    .map(Text::Prepared),
                _ => None,
            }
        })
    }

    /// Before a batch read outside a transaction is answered or routed: its check, kept in
    /// `pending_limit` for [`Session::settle_limit`]. False when the batch was answered already
    /// (an invalid end user: 22023).
    pub(crate) async fn prepare_limit(&mut self, batch: &[(u8, Vec<u8>)]) -> Step<bool> {
        self.pending_limit = None;
        if !self.limits.rate_limited {
            return Ok(true);
        }
        let text = self.batch_text(batch);
        let text = text.as_ref().map(Text::bytes);
        match self.limit_check(statements_in(batch), text, None, false) {
            Ok(c) => {
                self.pending_limit = c.map(|c| self.shared.limiter.begin(c));
                Ok(true)
            }
            Err(e) => {
                p::put_error(
                    &mut self.out,
                    "ERROR",
                    sqlstate::INVALID_PARAMETER_VALUE,
                    &e,
                );
                self.finish_refusal(batch);
                self.skip_if_unsynced(batch).await?;
                self.flush_client().await?;
                Ok(false)
            }
        }
    }

    /// The Redis commands of the pending check, when they may ride with a cache lookup.
    pub(crate) fn limit_commands_for_cache(&self) -> Vec<Vec<u8>> {
        let l = &self.shared.limiter;
        match &self.pending_limit {
            Some(p) if p.needs_redis() && l.shares_cache_redis && l.try_redis() => {
                crate::limits::Limiter::commands(p)
            }
            _ => Vec::new(),
        }
    }

    /// Decides the pending check (with the replies of a pipelined lookup, if any). False when the
    /// batch was refused: the client has its error (and ReadyForQuery) and nothing was sent.
    pub(crate) async fn settle_limit(
        &mut self,
        batch: &[(u8, Vec<u8>)],
        replies: Option<Result<Vec<crate::cache::redis::Reply>, crate::cache::redis::RedisError>>,
    ) -> Step<bool> {
        let Some(pending) = self.pending_limit.take() else {
            return Ok(true);
        };
        let config = self.shared.config();
        let verdict = self
            .shared
            .limiter
            .finish(&config.limits, pending, replies)
            .await;
        if self.report_limit(&verdict).is_none() {
            return Ok(true);
        }
        self.finish_refusal(batch);
        self.skip_if_unsynced(batch).await?;
        self.flush_client().await?;
        Ok(false)
    }

    /// Writes a warning for a warn-mode window and the error for a refusal into `out`; returns
    /// the refusal's ErrorResponse bytes (already written) when refused.
    pub(crate) fn report_limit(&mut self, v: &Verdict) -> Option<Vec<u8>> {
        if let Some(w) = &v.warned {
            let (m, d, h) = refusal_text(w, true);
            p::put_report(&mut self.out, b'N', "WARNING", REFUSED, &m, &d, &h);
        }
        let r = v.refused.as_ref()?;
        let (m, d, h) = refusal_text(r, false);
        let mut error = Vec::new();
        p::put_report(&mut error, b'E', "ERROR", REFUSED, &m, &d, &h);
        self.out.extend_from_slice(&error);
        Some(error)
    }

    /// A refused batch that ended with a Flush: like PostgreSQL after an error, the messages that
    /// follow are ignored up to the Sync, which gets the ReadyForQuery.
    async fn skip_if_unsynced(&mut self, batch: &[(u8, Vec<u8>)]) -> Step<()> {
        if !matches!(batch.last(), Some((b'H', _))) {
            return Ok(());
        }
        self.flush_client().await?;
        loop {
            let (tag, _) = self.next_message().await?;
            match tag {
                b'X' => return Err(crate::session::Close),
                b'S' => {
                    p::put_ready(&mut self.out, b'I');
                    return Ok(());
                }
                _ => {}
            }
        }
    }

    /// Inside an attachment: the check for one Query or Execute about to be relayed (node known).
    /// `Err` carries an ErrorResponse to send in the statement's place (refused, or an invalid end
    /// user). Never refused: anything in a failed transaction (the server runs nothing there but
    /// its end) and the statements that end a transaction (refusing them would keep it open).
    pub(crate) async fn check_statement(
        &mut self,
        tag: u8,
        msg: &[u8],
        node: usize,
        tx_status: u8,
    ) -> Result<(), Vec<u8>> {
        if tx_status == b'E' || !self.limits.rate_limited {
            return Ok(());
        }
        let text = match tag {
            b'Q' => p::parse_query(body(msg)).ok().map(<[u8]>::to_vec),
            _ => self.portal_text.clone(),
        };
        if tx_status == b'T' && text.as_deref().is_some_and(ends_transaction) {
            return Ok(());
        }
        let check = match self.limit_check(1, text.as_deref(), Some(node), false) {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(()),
            Err(e) => {
                let mut error = Vec::new();
                p::put_error(&mut error, "ERROR", sqlstate::INVALID_PARAMETER_VALUE, &e);
                return Err(error);
            }
        };
        let config = self.shared.config();
        let verdict = self.shared.limiter.decide(&config.limits, check).await;
        match self.report_limit(&verdict) {
            None => Ok(()),
            Some(error) => {
                // The error goes out in the statement's place, not now (a warning stays).
                self.out.truncate(self.out.len() - error.len());
                Err(error)
            }
        }
    }

    /// Remembers the text of what the client is about to execute in the extended protocol (its
    /// comment may name the end user): the last Parse, or a Bind of a named statement.
    pub(crate) fn note_portal_text(&mut self, tag: u8, msg: &[u8]) {
        if !matches!(tag, b'P' | b'B') || !self.limits.end_users {
            return;
        }
        if let Some(t) = crate::relay::statement_text(tag, msg, &self.statements) {
            self.portal_text = Some(t);
        }
    }

    /// Once routing chose the node: the node-scoped windows. False when refused (answered).
    pub(crate) async fn check_node_limit(
        &mut self,
        batch: &[(u8, Vec<u8>)],
        node: usize,
    ) -> Step<bool> {
        if !self.limits.node_rules {
            return Ok(true);
        }
        let text = self.batch_text(batch);
        let text = text.as_ref().map(Text::bytes);
        self.pending_limit = self
            .limit_check(statements_in(batch), text, Some(node), true)
            .ok()
            .flatten()
            .map(|c| self.shared.limiter.begin(c));
        self.settle_limit(batch, None).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::limits::rules::Applied;

    fn over(source: Source) -> Over {
        Over {
            applied: Applied {
                rule: 0,
                name: "app_limited".into(),
                key: Vec::new(),
                limit: 20,
                window_ms: 1000,
                warn: false,
                counts: "user \"app_limited\"".into(),
            },
            limit: 20,
            retry_after_ms: 37,
            source,
        }
    }

    #[test]
    fn refusals_name_the_limit_the_window_and_the_wait() {
        let (m, d, h) = refusal_text(&over(Source::Shared), false);
        assert_eq!(
            m,
            "dbopt-router: rate limit \"app_limited\" exceeded: user \"app_limited\" may run 20 statements per 1s; retry after 37 ms"
        );
        assert_eq!(d, "Retry after 37 ms (limit 20, window 1000 ms).");
        assert!(h.contains("[[limits.rules]]"), "{h}");
        let (_, d, _) = refusal_text(&over(Source::Local), false);
        assert!(d.contains("Redis is unreachable"), "{d}");
        let (_, d, _) = refusal_text(&over(Source::Closed), false);
        assert!(d.contains("\"closed\""), "{d}");
        let (m, _, _) = refusal_text(&over(Source::Shared), true);
        assert!(m.contains("warn mode"), "{m}");
    }

    #[test]
    fn transaction_ends_are_recognised() {
        for t in [
            "COMMIT",
            "commit;",
            " /* app */ ROLLBACK",
            "-- x\nEND",
            "abort",
            "ROLLBACK TO SAVEPOINT a",
        ] {
            assert!(ends_transaction(t.as_bytes()), "{t}");
        }
        for t in [
            "SELECT 1",
            "COMMITTED",
            "/* COMMIT */ SELECT 1",
            "/* unterminated COMMIT",
            "-- COMMIT",
            "BEGIN",
        ] {
            assert!(!ends_transaction(t.as_bytes()), "{t}");
        }
    }

    #[test]
    fn a_batch_costs_its_executions() {
        let b = |t: u8| (t, vec![t, 0, 0, 0, 4]);
        assert_eq!(statements_in(&[b(b'P'), b(b'B'), b(b'E'), b(b'S')]), 1);
        assert_eq!(statements_in(&[b(b'Q')]), 1);
        assert_eq!(statements_in(&[b(b'E'), b(b'E'), b(b'H')]), 2);
        assert_eq!(statements_in(&[b(b'P'), b(b'D'), b(b'S')]), 0);
    }
}
