//! The attached half of a session: translating client messages for the server connection it
//! holds (prepared-statement names), relaying replies in order (with the ones the router answers
//! or swallows), giving the connection back when the server is idle, and a lost server.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::classify::{Class, Kind};
use crate::config::PoolMode;
use crate::isolation::{
    custom_names, names_array, parse_state, plan_sync, unmask, MASKED_SQL, MASK_SQL, STATE_SQL,
};
use crate::log;
use crate::pools::AcquireError;
use crate::protocol::{self as p, body, Reader};
use crate::route::{Barrier, Target};
use crate::server::{ServerConn, SetupError};
use crate::session::{statement_hash, Attached, Close, Expect, Session, Statement, Step};
use crate::shared::Counters;

/// How a pump ended without closing the session.
pub(crate) enum PumpEnd {
    /// The server connection went back to its pool.
    Detached,
    /// The server broke before any reply of a read: run this batch again, avoiding that node.
    Retry(Vec<(u8, Vec<u8>)>, usize),
}

fn server_name(hash: u64) -> Vec<u8> {
    format!("dbopt_{hash:016x}").into_bytes()
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
        let plan = plan_sync(&conn.session, &self.settings);
        if plan.is_empty() {
            return Ok(());
        }
        Counters::inc(&self.shared.counters.settings_syncs);
        conn.apply(&plan).await?;
        conn.session = self.settings.clone();
        Ok(())
    }

    /// Makes sure `stmt` exists on the connection, adding a hidden Parse when it does not.
    fn ensure_prepared(att: &mut Attached, stmt: &Statement, out: &mut Vec<u8>) {
        if att.conn.prepared.insert(stmt.hash) {
            p::put_parse(out, &stmt.server_name, &stmt.query, &stmt.param_types);
            att.pending.push_back(Expect::HiddenParse(stmt.hash));
        }
    }

    /// One client message, rewritten for the attached server connection into `out`.
    /// `classify`: note what the statement does to the session and whether it writes (the
    /// first batch of an attachment was classified as a whole already).
    pub(crate) fn translate(
        &mut self,
        att: &mut Attached,
        tag: u8,
        msg: &[u8],
        out: &mut Vec<u8>,
        classify: bool,
    ) {
        if att.pending.is_empty() {
            att.started = Instant::now();
        }
        let b = body(msg);
        let note = |att: &mut Attached, class: Class| {
            if classify {
                att.touched |= class.session;
                att.wrote |= !matches!(class.kind, Kind::Read | Kind::Empty | Kind::BeginReadOnly);
            }
        };
        match tag {
            b'Q' => {
                if let Ok(q) = p::parse_query(b) {
                    let class = if classify {
                        Some(self.class_of_text(q))
                    } else {
                        None
                    };
                    if let Some(c) = class {
                        note(att, c);
                    }
                    if att.touched {
                        self.note_custom_names(q);
                    }
                }
                out.extend_from_slice(msg);
                att.pending.push_back(Expect::Query);
                att.batch_open = false;
            }
            b'P' => match p::parse_parse(b) {
                Ok(m) if !m.name.is_empty() => {
                    let hash = statement_hash(m.query, m.param_types);
                    let class = self.class_of_text(m.query);
                    note(att, class);
                    if class.session {
                        self.note_custom_names(m.query);
                    }
                    let stmt = Statement {
                        hash,
                        server_name: server_name(hash),
                        query: m.query.to_vec(),
                        param_types: m.param_types.to_vec(),
                        class,
                    };
                    if att.conn.prepared.insert(hash) {
                        p::put_parse(out, &stmt.server_name, m.query, m.param_types);
                        att.pending.push_back(Expect::Parse(Some(hash)));
                    } else {
                        att.pending.push_back(Expect::SyntheticParse);
                    }
                    self.statements
                        .insert(m.name.to_vec(), std::sync::Arc::new(stmt));
                }
                other => {
                    if let (true, Ok(m)) = (classify || att.touched, other) {
                        let class = self.class_of_text(m.query);
                        note(att, class);
                        if class.session {
                            self.note_custom_names(m.query);
                        }
                    }
                    out.extend_from_slice(msg);
                    att.pending.push_back(Expect::Parse(None));
                }
            },
            b'B' => {
                match p::parse_bind(b)
                    .ok()
                    .and_then(|m| Some((m, self.statements.get(m.statement)?.clone())))
                {
                    Some((m, stmt)) => {
                        note(att, stmt.class);
                        Self::ensure_prepared(att, &stmt, out);
                        p::put_bind(out, m.portal, &stmt.server_name, m.rest);
                    }
                    // Unnamed, or unknown (the server then reports it does not exist).
                    None => out.extend_from_slice(msg),
                }
                att.pending.push_back(Expect::Bind);
            }
            b'D' => {
                match p::parse_target(b, "Describe")
                    .ok()
                    .filter(|(kind, name)| *kind == b'S' && !name.is_empty())
                    .and_then(|(_, name)| self.statements.get(name).cloned())
                {
                    Some(stmt) => {
                        Self::ensure_prepared(att, &stmt, out);
                        p::put_target(out, b'D', b'S', &stmt.server_name);
                    }
                    None => out.extend_from_slice(msg),
                }
                att.pending.push_back(Expect::Describe);
            }
            b'C' => match p::parse_target(b, "Close") {
                Ok((b'S', name)) if !name.is_empty() => {
                    // The statement stays prepared on the server for other clients.
                    self.statements.remove(name);
                    att.pending.push_back(Expect::SyntheticClose);
                }
                _ => {
                    out.extend_from_slice(msg);
                    att.pending.push_back(Expect::Close);
                }
            },
            b'E' => {
                out.extend_from_slice(msg);
                att.pending.push_back(Expect::Execute);
            }
            b'S' => {
                out.extend_from_slice(msg);
                att.pending.push_back(Expect::Sync);
                att.batch_open = false;
            }
            // Flush and COPY data go through as they are.
            _ => out.extend_from_slice(msg),
        }
    }

    /// Remembers the dotted names in a statement that may set a custom setting.
    fn note_custom_names(&mut self, sql: &[u8]) {
        if let Ok(text) = std::str::from_utf8(sql) {
            custom_names(text, &mut self.custom_names);
        }
    }

    /// Replies the router owes at the head of the queue go out now.
    pub(crate) fn emit_synthetic(&mut self, att: &mut Attached) {
        while let Some(front) = att.pending.front() {
            let tag = match front {
                Expect::SyntheticParse => b'1',
                Expect::SyntheticClose => b'3',
                _ => break,
            };
            att.pending.pop_front();
            p::put_msg(&mut self.out, tag, |_| {});
            att.relayed = true;
        }
    }

    fn on_server_message(&mut self, att: &mut Attached, tag: u8, msg: &[u8]) {
        self.emit_synthetic(att);
        let relay = match tag {
            b'1' => !matches!(att.pending.pop_front(), Some(Expect::HiddenParse(_))),
            b'2' | b'3' => {
                att.pending.pop_front();
                true
            }
            b'T' | b'n' => {
                if att.pending.front() == Some(&Expect::Describe) {
                    att.pending.pop_front();
                }
                true
            }
            b'C' | b'I' | b's' => {
                if att.pending.front() == Some(&Expect::Execute) {
                    att.pending.pop_front();
                }
                let b = body(msg);
                if tag == b'C'
                    && (b.starts_with(b"DISCARD ALL") || b.starts_with(b"DEALLOCATE ALL"))
                {
                    att.conn.prepared.clear();
                }
                true
            }
            b'E' => {
                // In the extended protocol the server skips to the next Sync after an error.
                while let Some(&front) = att.pending.front() {
                    match front {
                        Expect::Sync | Expect::Query => break,
                        Expect::Parse(Some(h)) | Expect::HiddenParse(h) => {
                            att.conn.prepared.remove(&h);
                        }
                        _ => {}
                    }
                    att.pending.pop_front();
                }
                true
            }
            b'Z' => {
                att.pending.pop_front();
                att.tx_status = body(msg).first().copied().unwrap_or(b'I');
                att.copy_in = false;
                if att.decision.target == Target::Replica {
                    let ms = att.started.elapsed().as_secs_f64() * 1000.0;
                    self.shared.topology().observe_latency(att.node, ms);
                }
                true
            }
            b'G' => {
                att.copy_in = true;
                true
            }
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
                true
            }
            _ => true,
        };
        if relay {
            self.out.extend_from_slice(msg);
            att.relayed = true;
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
            let waiting_for_client = att.pending.is_empty() && !att.batch_open && !att.copy_in;
            let pool = &self.shared.config().pool;
            let timer = match (waiting_for_client, att.tx_status != b'I') {
                (true, true) if pool.idle_in_transaction_timeout_s > 0 => {
                    Some((pool.idle_in_transaction_timeout_s, Event::IdleInTransaction))
                }
                (true, false) if pool.client_idle_timeout_s > 0 => {
                    Some((pool.client_idle_timeout_s, Event::ClientIdle))
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
                            "25P03",
                            "terminating connection due to idle-in-transaction timeout (dbopt-router pool.idle_in_transaction_timeout_s)",
                        )
                    } else {
                        self.fatal(
                            "57P05",
                            "terminating connection due to idle-session timeout (dbopt-router pool.client_idle_timeout_s)",
                        )
                    });
                }
                Event::Server(Ok(n)) if n > 0 => {
                    if self.retry_batch.is_some() && att.relayed {
                        self.retry_batch = None;
                    }
                    loop {
                        match p::frame(&att.conn.rbuf) {
                            Ok(Some((tag, len))) => {
                                let msg = att.conn.rbuf.split_to(len);
                                self.on_server_message(&mut att, tag, &msg);
                            }
                            Ok(None) => break,
                            Err(e) => {
                                self.attached = Some(att);
                                return self.server_lost(&format!("bad message from server: {e}"));
                            }
                        }
                    }
                    if att.relayed {
                        self.retry_batch = None;
                    }
                    let idle = att.pending.is_empty()
                        && att.tx_status == b'I'
                        && !att.batch_open
                        && !att.copy_in;
                    if idle && !self.session_mode() {
                        self.flush_client().await?;
                        let needs_check = att.touched || !att.pins.is_empty();
                        let clean = !needs_check || self.check_session(&mut att).await;
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
                                if att.pending.is_empty() && !att.batch_open {
                                    att.batch_open = true;
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
        // In a transaction of the router's own, with the client's timeouts and search_path masked
        // (their session values read first).
        let mut list: Vec<(&str, &[&[u8]])> = vec![
            ("BEGIN ISOLATION LEVEL READ COMMITTED", &[]),
            (MASKED_SQL, &[]),
        ];
        list.extend(MASK_SQL.split("; ").map(|s| (s, &[] as &[&[u8]])));
        let params = [array.as_bytes()];
        list.push((STATE_SQL, &params));
        list.push(("COMMIT", &[]));
        let state = match att.conn.statements(&list).await {
            Ok(rows) => {
                let (masked, rest): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.len() == 3);
                parse_state(&rest).map(|mut s| {
                    unmask(&mut s, &masked);
                    s
                })
            }
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
        true
    }

    /// Gives the attached connection back (or closes it) and notes a write for read-your-writes.
    pub(crate) fn detach(&mut self, att: Attached, reusable: bool) {
        self.shared.set_cancel_target(self.key, None);
        let now = self.shared.now_ms();
        if att.decision.writes || att.wrote {
            self.barrier = Barrier::WroteAt(now);
        }
        self.retry_batch = None;
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
            "08006",
            &format!("dbopt-router: server connection to {name} lost: {reason}"),
        ))
    }

    /// The session ends: the attached connection goes back only if it is idle and clean.
    pub(crate) async fn leave(&mut self) {
        if let Some(mut att) = self.attached.take() {
            let idle = att.pending.is_empty() && att.tx_status == b'I' && !att.copy_in;
            let mut reusable = idle;
            if idle && (self.session_mode() || att.touched || !att.pins.is_empty()) {
                // Whatever the client left (role, locks, LISTEN, temporary tables, settings).
                reusable = att.conn.run_silently("DISCARD ALL").await.is_ok();
                att.conn.prepared.clear();
                att.conn.session.clear();
            }
            let now = self.shared.now_ms();
            att.pool.release(att.conn, reusable, now);
        }
        self.shared
            .cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}
