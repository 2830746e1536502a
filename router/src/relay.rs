//! The attached half of a session: translating client messages for the server connection it
//! holds (prepared-statement names), relaying replies in order (with the ones the router answers
//! or swallows), giving the connection back when the server is idle, and a lost server.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::classify::Class;
use crate::config::PoolMode;
use crate::isolation::{custom_names, names_array, parse_state, plan_sync, STATE_SQL};
use crate::log;
use crate::pools::AcquireError;
use crate::protocol::{self as p, body, Reader};
use crate::route::Target;
use crate::server::{ServerConn, SetupError};
use crate::session::{Attached, Close, Session, Step};
use crate::shared::Counters;
use crate::sqlstate;

/// How a pump ended without closing the session.
pub(crate) enum PumpEnd {
    /// The server connection went back to its pool.
    Detached,
    /// The server broke before any reply of a read: run this batch again, avoiding that node.
    Retry(crate::spare::Batch, usize),
}

impl Session {
    /// Tells the client why its batch got no server; the session goes on.
    pub(crate) async fn refuse(&mut self, batch: &[(u8, Vec<u8>)], e: AcquireError) -> Step<()> {
        Counters::inc(&self.shared.counters.acquire_errors);
        log::warn(&format!(
            "client {}: {} (SQLSTATE {})",
            self.peer, e.message, e.code
        ));
        p::put_error(&mut self.out, "ERROR", e.code, &e.message);
        self.finish_refusal(batch);
        self.flush_client().await
    }

    /// A refused batch still owes the client its ReadyForQuery when it ended with Query/Sync.
    pub(crate) fn finish_refusal(&mut self, batch: &[(u8, Vec<u8>)]) {
        if matches!(batch.last(), Some((b'Q' | b'S', _))) {
            p::put_ready(&mut self.out, b'I');
        }
    }

    /// Gives the connection exactly the client's session settings (see [`crate::isolation`]):
    /// resets what another client left, applies what this one set. No round trip when they match.
    pub(crate) async fn sync_settings(&mut self, conn: &mut ServerConn) -> Result<(), SetupError> {
        // Usually the connection has the client's settings already: one pass over both (any
        // difference makes a non-empty plan).
        if conn.session == self.settings {
            return Ok(());
        }
        let plan = plan_sync(&conn.session, &self.settings);
        Counters::inc(&self.shared.counters.settings_syncs);
        conn.apply(&plan).await?;
        conn.session = self.settings.clone();
        Ok(())
    }

    /// One client message, rewritten for the attached server connection into `out`
    /// ([`crate::translate`]). `classify`: note what the statement does to the session and
    /// whether it writes (the first batch of an attachment was classified as a whole already).
    pub(crate) fn translate(
        &mut self,
        att: &mut Attached,
        tag: u8,
        msg: &[u8],
        out: &mut Vec<u8>,
        classify: bool,
    ) {
        // A new statement of an attachment (the first batch's time is the attachment's own).
        if classify && att.link.pending.is_empty() {
            att.started = Instant::now();
        }
        // Borrows only the shared state (disjoint from the statements map): no Arc clone per
        // message.
        let shared = &self.shared;
        let mut class_of = |text: &[u8]| crate::session::class_of(shared, text);
        let class = att.link.client_message(
            tag,
            msg,
            &mut self.statements,
            &mut att.conn.prepared,
            &mut class_of,
            classify,
            out,
        );
        if matches!(tag, b'Q' | b'S') {
            att.batch_open = false;
        }
        att.executed |= matches!(tag, b'Q' | b'E');
        if let (Some(class), true) = (class, classify) {
            att.wrote |= class.writes();
            if class.session {
                if let Some(text) = statement_text(tag, msg, &self.statements) {
                    self.note_session_change(att, class, &text);
                }
            }
        }
    }

    /// A statement that may change the session: a plain `SET`/`RESET` only needs its setting read
    /// back; anything else needs the full check. Dotted names are remembered (custom settings).
    pub(crate) fn note_session_change(&mut self, att: &mut Attached, class: Class, text: &[u8]) {
        let sql = String::from_utf8_lossy(text);
        match class
            .simple_set
            .then(|| crate::classify::set_name(&sql))
            .flatten()
        {
            Some(name) => {
                if !att.quick_sets.contains(&name) {
                    att.quick_sets.push(name);
                }
            }
            None => att.touched = true,
        }
        custom_names(&sql, &mut self.custom_names);
    }

    /// Replies the router owes at the head of the queue go out now.
    pub(crate) fn emit_synthetic(&mut self, att: &mut Attached) {
        if att.link.synthetic_replies(&mut self.out) {
            att.relayed = true;
        }
    }

    fn on_server_message(&mut self, att: &mut Attached, tag: u8, msg: &[u8]) {
        self.emit_synthetic(att);
        let relay = att.link.server_message(tag, msg, &mut att.conn.prepared);
        if let crate::translate::Relay::Replace(error) = &relay {
            // A refused statement: the router's error, in the server's place.
            self.out.extend_from_slice(error);
            att.relayed = true;
        }
        let relay = relay == crate::translate::Relay::Pass;
        match tag {
            b'Z' => {
                att.tx_status = body(msg).first().copied().unwrap_or(b'I');
                att.saw_transaction |= att.tx_status != b'I';
                att.copy_in = false;
                let now = Instant::now();
                att.ready_ms = self.shared.ms_at(now);
                if att.decision.target == Target::Replica {
                    let ms = now.saturating_duration_since(att.started).as_secs_f64() * 1000.0;
                    self.shared
                        .topology()
                        .observe_latency(att.node, ms, att.ready_ms);
                }
            }
            b'G' => att.copy_in = true,
            b'S' => {
                // The client's own statement changed a reported setting: it sees the report;
                // its settings map is read back after the batch (the statement was flagged).
                let mut r = Reader::new(body(msg));
                if let (Ok(k), Ok(v)) = (r.cstr("name"), r.cstr("value")) {
                    att.conn.params.insert(
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    );
                }
            }
            _ => {}
        }
        if relay {
            self.out.extend_from_slice(msg);
            att.relayed = true;
            if let Some(c) = att.capture.as_mut() {
                c.message(tag, msg);
            }
        }
        self.emit_synthetic(att);
    }

    /// May the session read more client messages for the attached server now? A read batch
    /// on a replica ends at its Sync/Query: the next batch is routed on its own.
    fn takes_more(&self, att: &Attached) -> bool {
        att.decision.target == Target::Primary
            || att.batch_open
            || att.tx_status != b'I'
            || att.copy_in
            || !att.pins.is_empty()
    }

    fn session_mode(&self) -> bool {
        self.auth
            .as_ref()
            .is_some_and(|a| a.pool_mode == PoolMode::Session)
    }

    /// Relays until the connection is given back (transaction pooling) or the session ends.
    pub(crate) async fn pump(&mut self) -> Step<PumpEnd> {
        enum Event {
            Server(std::io::Result<usize>),
            Client(std::io::Result<usize>),
            IdleInTransaction,
            ClientIdle,
        }
        loop {
            let Some(mut att) = self.attached.take() else {
                return Ok(PumpEnd::Detached);
            };
            let readable = self.takes_more(&att);
            // Only the client can be idle: the server has answered everything and waits.
            let waiting_for_client = att.link.pending.is_empty() && !att.batch_open && !att.copy_in;
            let limits = self.limits;
            let timer = match (waiting_for_client, att.tx_status != b'I') {
                (true, true) if limits.idle_in_transaction_s > 0 => {
                    Some((limits.idle_in_transaction_s, Event::IdleInTransaction))
                }
                (true, false) if limits.client_idle_s > 0 => {
                    Some((limits.client_idle_s, Event::ClientIdle))
                }
                _ => None,
            };
            // Notifications that came during the router's own statements go to the client now.
            if !att.conn.notifications.is_empty() {
                self.out.append(&mut att.conn.notifications);
                if let Err(c) = self.flush_client().await {
                    self.attached = Some(att);
                    return Err(c);
                }
            }
            // Messages the router's own exchange left behind (a notification that came right after
            // its ReadyForQuery) are handled before waiting for more.
            let buffered = matches!(p::frame(&att.conn.rbuf), Ok(Some(_)));
            let event = if buffered {
                Event::Server(Ok(usize::MAX))
            } else {
                let client = &mut self.client;
                let cbuf = &mut self.cbuf;
                let conn = &mut att.conn;
                let expire = async {
                    match timer {
                        Some((s, e)) => {
                            tokio::time::sleep(std::time::Duration::from_secs(s)).await;
                            e
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    r = conn.stream.read_buf(&mut conn.rbuf) => Event::Server(r),
                    r = client.read_buf(cbuf), if readable => Event::Client(r),
                    e = expire => e,
                }
            };
            match event {
                Event::IdleInTransaction | Event::ClientIdle => {
                    Counters::inc(&self.shared.counters.idle_timeouts);
                    let in_tx = matches!(event, Event::IdleInTransaction);
                    log::warn(&format!(
                        "client {} (user \"{}\"): {}; disconnected",
                        self.peer,
                        self.user,
                        if in_tx {
                            "idle in transaction too long"
                        } else {
                            "idle too long"
                        }
                    ));
                    if in_tx {
                        // Roll back so the connection can serve others; leave() checks it.
                        let ok = att.conn.run_silently("ROLLBACK").await.is_ok();
                        att.tx_status = if ok { b'I' } else { b'E' };
                    }
                    self.attached = Some(att);
                    return Err(if in_tx {
                        self.fatal(
                            sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                            "terminating connection due to idle-in-transaction timeout (dbopt-router pool.idle_in_transaction_timeout_s)",
                        )
                    } else {
                        self.fatal(
                            sqlstate::IDLE_SESSION_TIMEOUT,
                            "terminating connection due to idle-session timeout (dbopt-router pool.client_idle_timeout_s)",
                        )
                    });
                }
                Event::Server(Ok(n)) if n > 0 => {
                    if att.relayed {
                        self.drop_retry_batch();
                    }
                    // Relayed from the read buffer in place (no handle split off per message),
                    // which then moves past all of them at once.
                    let rbuf = std::mem::take(&mut att.conn.rbuf);
                    let mut at = 0;
                    let bad = loop {
                        match p::frame(&rbuf[at..]) {
                            Ok(Some((tag, len))) => {
                                self.on_server_message(&mut att, tag, &rbuf[at..at + len]);
                                at += len;
                            }
                            Ok(None) => break None,
                            Err(e) => break Some(e),
                        }
                    };
                    att.conn.rbuf = rbuf;
                    bytes::Buf::advance(&mut att.conn.rbuf, at);
                    if let Some(e) = bad {
                        self.attached = Some(att);
                        return self.server_lost(&format!("bad message from server: {e}"));
                    }
                    if att.relayed {
                        self.drop_retry_batch();
                    }
                    let idle = att.link.pending.is_empty()
                        && att.tx_status == b'I'
                        && !att.batch_open
                        && !att.copy_in;
                    if idle && (att.wrote || att.decision.writes) {
                        // Before the acknowledgement leaves: read-your-writes and invalidation.
                        att.wrote = false;
                        att.decision.writes = false;
                        att.wrote_here = true;
                        self.after_commit().await;
                    }
                    if idle {
                        self.finish_fill(&mut att);
                    }
                    if idle && !self.session_mode() {
                        self.flush_client().await?;
                        // A SET inside a transaction block may have been rolled back: check all.
                        let needs_check = att.touched
                            || !att.pins.is_empty()
                            || (att.saw_transaction && !att.quick_sets.is_empty());
                        let clean = if needs_check {
                            self.check_session(&mut att).await
                        } else if !att.quick_sets.is_empty() {
                            self.read_back_settings(&mut att).await
                        } else {
                            true
                        };
                        att.saw_transaction = false;
                        if clean && !att.pins.is_empty() {
                            // Pinned: the client keeps this connection until it undoes that.
                            self.attached = Some(att);
                            continue;
                        }
                        self.detach(att, clean);
                        self.flush_client().await?;
                        // During a shutdown the serve loop now tells the client (57P01).
                        return Ok(PumpEnd::Detached);
                    }
                    self.attached = Some(att);
                    self.flush_client().await?;
                }
                Event::Server(_) => {
                    self.attached = Some(att);
                    return self.server_lost("the server closed the connection");
                }
                Event::Client(Ok(n)) if n > 0 => {
                    let mut to_server = Vec::new();
                    while self.takes_more(&att) {
                        match p::frame(&self.cbuf) {
                            Ok(Some((tag, len))) => {
                                let msg = self.cbuf.split_to(len);
                                if let Err(e) = p::check_frontend(tag, body(&msg)) {
                                    self.attached = Some(att);
                                    return Err(self.protocol_error(e));
                                }
                                if tag == b'X' {
                                    self.attached = Some(att);
                                    return Err(Close);
                                }
                                if att.link.pending.is_empty() && !att.batch_open {
                                    att.batch_open = true;
                                }
                                self.note_portal_text(tag, &msg);
                                if matches!(tag, b'Q' | b'E') {
                                    if let Err(error) = self
                                        .check_statement(tag, &msg, att.node, att.tx_status)
                                        .await
                                    {
                                        att.link.refuse(tag, error, &mut to_server);
                                        if tag == b'Q' {
                                            att.batch_open = false;
                                        }
                                        continue;
                                    }
                                }
                                self.translate(&mut att, tag, &msg, &mut to_server, true);
                            }
                            Ok(None) => break,
                            Err(e) => {
                                self.attached = Some(att);
                                return Err(self.protocol_error(e));
                            }
                        }
                    }
                    self.emit_synthetic(&mut att);
                    let write = att.conn.stream.write_all(&to_server).await;
                    self.attached = Some(att);
                    if write.is_err() {
                        return self.server_lost("writing to the server failed");
                    }
                    self.flush_client().await?;
                }
                Event::Client(_) => {
                    self.attached = Some(att);
                    return Err(Close);
                }
            }
        }
    }

    /// After a statement that may have changed the session: read the client's settings back
    /// and find what pins it ([`crate::isolation::STATE_SQL`]). False when that failed (the
    /// connection is then closed rather than pooled).
    async fn check_session(&mut self, att: &mut Attached) -> bool {
        Counters::inc(&self.shared.counters.session_checks);
        let mut names = std::mem::take(&mut self.custom_names);
        // Custom settings the client has keep being checked (a RESET removes them).
        names.extend(self.settings.keys().filter(|k| k.contains('.')).cloned());
        let array = names_array(&names);
        self.custom_names = names;
        let role = att.pool.login.role.clone();
        let state = match att
            .conn
            .statements(&[(STATE_SQL, &[array.as_bytes(), role.as_bytes()])])
            .await
        {
            Ok(rows) => parse_state(&rows),
            Err(e) => {
                log::warn(&format!(
                    "client {}: checking its server session failed ({e:?}); the connection is closed",
                    self.peer
                ));
                None
            }
        };
        let Some(state) = state else {
            return false;
        };
        if att.pins.is_empty() && !state.pins.is_empty() {
            Counters::inc(&self.shared.counters.pins);
        }
        att.conn.session = state.settings.clone();
        self.settings = state.settings;
        att.pins = state.pins;
        att.touched = false;
        att.quick_sets.clear();
        true
    }

    /// After plain `SET`/`RESET`s outside a transaction block: reads just those settings back
    /// (`current_setting`, one statement each, one round trip) into the client's map and the
    /// connection's. False when that failed (the connection is then closed).
    async fn read_back_settings(&mut self, att: &mut Attached) -> bool {
        Counters::inc(&self.shared.counters.settings_read_backs);
        let names = std::mem::take(&mut att.quick_sets);
        let list: Vec<(&str, [&[u8]; 1])> = names
            .iter()
            .map(|n| {
                (
                    "SELECT pg_catalog.current_setting($1, true)",
                    [n.as_bytes()],
                )
            })
            .collect();
        let list: Vec<(&str, &[&[u8]])> = list.iter().map(|(sql, p)| (*sql, &p[..])).collect();
        let rows = match att.conn.statements(&list).await {
            Ok(rows) if rows.len() == names.len() => rows,
            _ => return false,
        };
        for (name, row) in names.iter().zip(rows) {
            match row.into_iter().next().flatten() {
                // A custom setting that was reset reads as empty: it is gone.
                Some(v) if !(v.is_empty() && name.contains('.')) => {
                    self.settings.insert(name.clone(), v.clone());
                    att.conn.session.insert(name.clone(), v);
                }
                _ => {
                    self.settings.remove(name);
                    att.conn.session.remove(name);
                }
            }
        }
        true
    }

    /// Gives the attached connection back (or closes it) and notes a write for read-your-writes.
    // Boxed on purpose: taking it by value would copy the attachment out of its box.
    #[allow(clippy::boxed_local)]
    pub(crate) fn detach(&mut self, mut att: Box<Attached>, reusable: bool) {
        att.link.clear();
        self.spare_link = std::mem::take(&mut att.link);
        self.shared.set_cancel_target(self.key, None);
        // The reply's time: the client has seen data as of then (the router's own statements
        // after it, if any, read nothing for the client).
        let now = att.ready_ms;
        if !att.wrote_here && att.executed {
            self.floor.after_read(att.node, now);
        }
        self.drop_retry_batch();
        att.pool.release(att.conn, reusable, now);
    }

    /// The attached server connection broke. A read that has sent nothing to the client yet is
    /// retried once on another node; otherwise the client is told and disconnected (its
    /// transaction, if any, is gone).
    pub(crate) fn server_lost(&mut self, reason: &str) -> Step<PumpEnd> {
        let Some(att) = self.attached.take() else {
            return Err(Close);
        };
        let node = att.node;
        let name = self.shared.node_name(node);
        self.shared.topology().record(node, false);
        Counters::inc(&self.shared.counters.server_errors);
        att.pool.forget();
        drop(att.conn);
        self.shared.set_cancel_target(self.key, None);
        if let Some(batch) = self.retry_batch.take() {
            if !att.relayed {
                Counters::inc(&self.shared.counters.read_retries);
                log::warn(&format!(
                    "client {}: {name}: {reason}; retrying the read on another node",
                    self.peer
                ));
                return Ok(PumpEnd::Retry(batch, node));
            }
        }
        log::warn(&format!(
            "client {}: server connection to {name} lost: {reason}",
            self.peer
        ));
        Err(self.fatal(
            sqlstate::CONNECTION_FAILURE,
            &format!("dbopt-router: server connection to {name} lost: {reason}"),
        ))
    }

    /// The session ends: the attached connection goes back only if it is idle and clean.
    pub(crate) async fn leave(&mut self) {
        if let Some(mut att) = self.attached.take() {
            let idle = att.link.pending.is_empty() && att.tx_status == b'I' && !att.copy_in;
            let mut reusable = idle;
            let changed = att.touched || !att.pins.is_empty() || !att.quick_sets.is_empty();
            if idle && (self.session_mode() || changed) {
                // Whatever the client left (role, locks, LISTEN, temporary tables, settings).
                reusable = att.conn.run_silently("DISCARD ALL").await.is_ok();
                att.conn.prepared.clear();
                att.conn.session.clear();
            }
            let now = self.shared.now_ms();
            att.pool.release(att.conn, reusable, now);
        }
        crate::locks::lock(&self.shared.cancel).remove(&self.key);
    }
}

/// The SQL text a client message carries (a Query, a Parse, or a Bind of a named statement).
pub(crate) fn statement_text(
    tag: u8,
    msg: &[u8],
    statements: &crate::translate::Statements,
) -> Option<Vec<u8>> {
    let b = body(msg);
    match tag {
        b'Q' => p::parse_query(b).ok().map(<[u8]>::to_vec),
        b'P' => p::parse_parse(b).ok().map(|m| m.query.to_vec()),
        b'B' => p::bind_names(b)
            .ok()
            .and_then(|m| statements.get(m.statement))
            .map(|s| s.query.clone()),
        _ => None,
    }
}
