//! One client connection: startup and authentication, then batches.
//!
//! Outside a transaction the session reads one batch (a simple Query, or extended-protocol
//! messages up to Sync/Flush), classifies it, picks a node and takes a server connection from
//! its pool. It then relays in both directions until the server is idle again (ReadyForQuery
//! 'I' with nothing outstanding) and, in transaction pooling, gives the connection back.
//!
//! Named prepared statements are kept per client and prepared on each server connection under a
//! name derived from their text (`dbopt_<hash>`), once per connection: a client's Parse is
//! answered by the router when the server already has the statement, and a Bind on a server
//! that lacks it is preceded by a Parse whose reply is swallowed. `pending` lists the replies
//! owed to the client, in order, so that synthetic and swallowed replies stay in place.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::auth::{md5_check, ScramExchange, ScramVerifier};
use crate::classify::{Class, Kind};
use crate::config::{AuthMethod, PoolMode};
use crate::log;
use crate::pools::{unavailable_error, Pool};
use crate::protocol::{self as p, body, ProtocolError, Reader, Startup};
use crate::relay::PumpEnd;
use crate::route::{combine, decide, Barrier, Decision, Target};
use crate::server::{ServerConn, SetupError};
use crate::shared::{CancelTarget, Counters, Shared, UserAuth};

/// Client settings the router carries over to whichever server connection a client gets.
pub(crate) const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "search_path",
    "extra_float_digits",
];

/// Tracked settings PostgreSQL 15 does not report with ParameterStatus: the router reads them back
/// (`SHOW`) after a client's statement mentions them, and resets them before the server connection
/// goes back to the pool, so one client's `SET search_path` neither leaks to others nor gets lost.
pub(crate) const UNREPORTED: &[&str] = &["search_path", "extra_float_digits"];

/// Does `sql` mention a setting of [`UNREPORTED`] (then it may have changed it)?
pub(crate) fn mentions_unreported(sql: &[u8]) -> bool {
    UNREPORTED.iter().any(|name| {
        sql.windows(name.len())
            .any(|w| w.eq_ignore_ascii_case(name.as_bytes()))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unreported_settings_are_noticed_in_any_case() {
        assert!(mentions_unreported(b"SET search_path = tenant1, public"));
        assert!(mentions_unreported(b"set SEARCH_PATH to default"));
        assert!(mentions_unreported(
            b"SELECT set_config('extra_float_digits', '3', false)"
        ));
        assert!(!mentions_unreported(b"SELECT * FROM paths"));
        assert!(!mentions_unreported(b""));
    }
}

/// A reply owed to the client, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Parse forwarded; on error the hash is forgotten for this connection.
    Parse(Option<u64>),
    /// Parse the router added before a Bind/Describe; its ParseComplete is swallowed.
    HiddenParse(u64),
    /// Parse answered by the router (already prepared on this connection).
    SyntheticParse,
    Bind,
    Describe,
    Execute,
    Close,
    /// Close of a named statement, answered by the router.
    SyntheticClose,
    Sync,
    Query,
}

#[derive(Debug)]
pub(crate) struct Statement {
    pub(crate) hash: u64,
    pub(crate) server_name: Vec<u8>,
    pub(crate) query: Vec<u8>,
    pub(crate) param_types: Vec<u8>,
    pub(crate) class: Class,
}

pub(crate) struct Attached {
    pub(crate) conn: ServerConn,
    pub(crate) pool: Arc<Pool>,
    pub(crate) node: usize,
    pub(crate) decision: Decision,
    pub(crate) pending: VecDeque<Expect>,
    /// The client's current batch is not complete yet (no Sync/Query seen).
    pub(crate) batch_open: bool,
    pub(crate) tx_status: u8,
    pub(crate) copy_in: bool,
    /// A statement of the client mentioned an [`UNREPORTED`] setting.
    pub(crate) touched_unreported: bool,
    /// The router applied an [`UNREPORTED`] setting for the client.
    pub(crate) applied_unreported: bool,
    /// Something of this batch reached the client (a retry is no longer invisible).
    pub(crate) relayed: bool,
    pub(crate) started: Instant,
}

pub struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client: TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) cbuf: BytesMut,
    pub(crate) out: Vec<u8>,
    pub(crate) user: String,
    pub(crate) database: String,
    pub(crate) auth: Option<UserAuth>,
    pub(crate) key: (i32, i32),
    pub(crate) statements: HashMap<Vec<u8>, Arc<Statement>>,
    /// Tracked settings as the client wants them (lower-case names).
    pub(crate) params: Vec<(String, String)>,
    pub(crate) barrier: Barrier,
    pub(crate) attached: Option<Attached>,
    /// The current read batch, kept until its first reply so it can be retried once elsewhere.
    pub(crate) retry_batch: Option<Vec<(u8, Vec<u8>)>>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Ends the session; the message (if any) was already queued for the client.
pub(crate) struct Close;

pub(crate) type Step<T> = Result<T, Close>;

/// The server-side identity of a prepared statement: its text and parameter types. Clients with
/// different search_paths may share one: PostgreSQL re-plans a cached statement, names resolved
/// anew, when it runs under another search_path than it was planned with (plancache.c).
pub(crate) fn statement_hash(query: &[u8], param_types: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut h);
    param_types.hash(&mut h);
    h.finish()
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        client: TcpStream,
        peer: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Session {
            shared,
            client,
            peer,
            cbuf: BytesMut::with_capacity(8192),
            out: Vec::with_capacity(8192),
            user: String::new(),
            database: String::new(),
            auth: None,
            key: (0, 0),
            statements: HashMap::new(),
            params: Vec::new(),
            barrier: Barrier::None,
            attached: None,
            retry_batch: None,
            shutdown,
        }
    }

    pub async fn run(mut self) {
        let handshake = Duration::from_secs(15);
        let ok = match tokio::time::timeout(handshake, self.startup()).await {
            Ok(r) => r.is_ok(),
            Err(_) => {
                p::put_error(&mut self.out, "FATAL", "08P01", "authentication timed out");
                false
            }
        };
        if ok {
            let _ = self.serve().await;
        }
        let _ = self.flush_client().await;
        self.leave().await;
    }

    // ---- client I/O ----

    pub(crate) async fn flush_client(&mut self) -> Step<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.client.write_all(&self.out).await;
        self.out.clear();
        r.map_err(|_| Close)
    }

    pub(crate) fn fatal(&mut self, code: &str, message: &str) -> Close {
        p::put_error(&mut self.out, "FATAL", code, message);
        Close
    }

    pub(crate) fn protocol_error(&mut self, e: ProtocolError) -> Close {
        Counters::inc(&self.shared.counters.protocol_errors);
        log::warn(&format!("client {}: protocol violation: {e}", self.peer));
        self.fatal("08P01", &format!("protocol violation: {e}"))
    }

    /// Reads more bytes from the client; `Close` on EOF.
    async fn fill(&mut self) -> Step<()> {
        match self.client.read_buf(&mut self.cbuf).await {
            Ok(0) | Err(_) => Err(Close),
            Ok(_) => Ok(()),
        }
    }

    /// The next whole typed message from the client.
    pub(crate) async fn next_message(&mut self) -> Step<(u8, Vec<u8>)> {
        loop {
            match p::frame(&self.cbuf) {
                Ok(Some((tag, len))) => {
                    let msg = self.cbuf[..len].to_vec();
                    self.cbuf.advance(len);
                    if let Err(e) = p::check_frontend(tag, body(&msg)) {
                        return Err(self.protocol_error(e));
                    }
                    return Ok((tag, msg));
                }
                Ok(None) => self.fill().await?,
                Err(e) => return Err(self.protocol_error(e)),
            }
        }
    }

    // ---- startup ----

    async fn startup(&mut self) -> Step<()> {
        let params = loop {
            while self.cbuf.len() < 4 {
                self.fill().await?;
            }
            let len = match p::startup_len([self.cbuf[0], self.cbuf[1], self.cbuf[2], self.cbuf[3]])
            {
                Ok(l) => l,
                Err(e) => return Err(self.protocol_error(e)),
            };
            while self.cbuf.len() < len {
                self.fill().await?;
            }
            let packet = self.cbuf[4..len].to_vec();
            self.cbuf.advance(len);
            match p::parse_startup(&packet) {
                Err(e) => return Err(self.protocol_error(e)),
                Ok(Startup::Ssl) | Ok(Startup::GssEnc) => {
                    // No TLS/GSS yet: the client may continue in clear text.
                    self.client.write_all(b"N").await.map_err(|_| Close)?;
                }
                Ok(Startup::Cancel { pid, secret }) => {
                    self.forward_cancel(pid, secret).await;
                    return Err(Close);
                }
                Ok(Startup::Params(params)) => break params,
            }
        };
        let mut user = None;
        let mut database = None;
        for (k, v) in params {
            match k.as_str() {
                "user" => user = Some(v),
                "database" => database = Some(v),
                "replication" if v != "false" && v != "0" => {
                    return Err(self.fatal(
                        "08P01",
                        "replication connections are not supported through dbopt-router",
                    ));
                }
                _ => {
                    let key = k.to_lowercase();
                    if TRACKED.contains(&key.as_str()) {
                        self.params.push((key, v));
                    }
                }
            }
        }
        let Some(user) = user.filter(|u| !u.is_empty()) else {
            return Err(self.fatal(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            ));
        };
        self.database = database
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| user.clone());
        self.user = user;
        if self
            .shared
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(self.fatal("57P01", "dbopt-router is shutting down"));
        }
        self.authenticate().await?;

        // Login done: AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery.
        p::put_auth(&mut self.out, 0, &[]);
        let mut server = self.shared.server_params();
        if server.is_empty() {
            server = vec![
                ("server_version".into(), "15".into()),
                ("server_encoding".into(), "UTF8".into()),
                ("client_encoding".into(), "UTF8".into()),
                ("DateStyle".into(), "ISO, MDY".into()),
                ("integer_datetimes".into(), "on".into()),
                ("standard_conforming_strings".into(), "on".into()),
            ];
        }
        for (k, v) in &server {
            let own = self
                .params
                .iter()
                .find(|(c, _)| *c == k.to_lowercase())
                .map(|(_, v)| v.as_str());
            let v = match (k.as_str(), own) {
                (_, Some(own)) => own,
                ("application_name", None) => "",
                ("session_authorization", None) => &self.user,
                _ => v.as_str(),
            };
            p::put_parameter_status(&mut self.out, k, v);
        }
        self.key = self.register_cancel_key();
        p::put_backend_key(&mut self.out, self.key.0, self.key.1);
        p::put_ready(&mut self.out, b'I');
        self.flush_client().await
    }

    fn register_cancel_key(&self) -> (i32, i32) {
        let mut map = self.shared.cancel.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let key: (i32, i32) = (rand::random::<i32>() & 0x7fff_ffff, rand::random());
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(key) {
                e.insert(None);
                return key;
            }
        }
    }

    async fn forward_cancel(&self, pid: i32, secret: i32) {
        let target = self
            .shared
            .cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(pid, secret))
            .cloned()
            .flatten();
        if let Some(t) = target {
            Counters::inc(&self.shared.counters.cancels);
            if let Err(e) = crate::server::send_cancel(&t.addr, t.pid, t.secret).await {
                log::warn(&format!("forwarding a cancel request to {}: {e}", t.addr));
            }
        }
    }

    async fn read_password_message(&mut self) -> Step<Vec<u8>> {
        let (tag, msg) = loop {
            match p::frame(&self.cbuf) {
                Ok(Some((tag, len))) => {
                    let m = self.cbuf[..len].to_vec();
                    self.cbuf.advance(len);
                    break (tag, m);
                }
                Ok(None) => self.fill().await?,
                Err(e) => return Err(self.protocol_error(e)),
            }
        };
        if tag != b'p' {
            return Err(self.protocol_error(ProtocolError(format!(
                "expected a password message, got '{}'",
                p::shown_tag(tag)
            ))));
        }
        Ok(body(&msg).to_vec())
    }

    fn auth_failed(&mut self) -> Close {
        Counters::inc(&self.shared.counters.auth_failures);
        log::warn(&format!(
            "client {}: password authentication failed for user \"{}\"",
            self.peer, self.user
        ));
        self.fatal(
            "28P01",
            &format!("password authentication failed for user \"{}\"", self.user),
        )
    }

    async fn authenticate(&mut self) -> Step<()> {
        let users = self.shared.users();
        let auth = users.get(&self.user).cloned();
        let method = auth.as_ref().map_or(AuthMethod::ScramSha256, |a| a.method);
        match method {
            AuthMethod::Trust => {}
            AuthMethod::Md5 => {
                let salt: [u8; 4] = rand::random();
                p::put_auth(&mut self.out, 5, &salt);
                self.flush_client().await?;
                let reply = self.read_password_message().await?;
                let mut r = Reader::new(&reply);
                let given = r.cstr("password").unwrap_or(b"");
                let ok = auth
                    .as_ref()
                    .and_then(|a| a.password.as_deref())
                    .is_some_and(|pw| md5_check(&self.user, pw, salt, given));
                if !ok {
                    return Err(self.auth_failed());
                }
            }
            AuthMethod::ScramSha256 => {
                // Unknown users go through an exchange that cannot succeed, as PostgreSQL does,
                // so a client cannot tell which user names exist.
                let verifier = auth
                    .as_ref()
                    .and_then(|a| a.scram.clone())
                    .unwrap_or_else(|| {
                        ScramVerifier::with_random_salt(&format!("{:x}", rand::random::<u128>()))
                    });
                p::put_auth(&mut self.out, 10, b"SCRAM-SHA-256\0\0");
                self.flush_client().await?;
                let first = self.read_password_message().await?;
                let mut r = Reader::new(&first);
                let mech = r.cstr("SASL mechanism").unwrap_or(b"");
                if mech != b"SCRAM-SHA-256" {
                    return Err(self.fatal("28000", "SASL mechanism SCRAM-SHA-256 is required"));
                }
                let len = r.i32("SASL data length").unwrap_or(-1);
                if len < 0 || len as usize != r.rest().len() {
                    return Err(
                        self.protocol_error(ProtocolError("malformed SASLInitialResponse".into()))
                    );
                }
                let (exchange, server_first) = match ScramExchange::start(&verifier, r.rest()) {
                    Ok(x) => x,
                    Err(e) => return Err(self.fatal("08P01", &e)),
                };
                p::put_auth(&mut self.out, 11, server_first.as_bytes());
                self.flush_client().await?;
                let fin = self.read_password_message().await?;
                match exchange.finish(&fin) {
                    Ok(server_final) if auth.is_some() => {
                        p::put_auth(&mut self.out, 12, server_final.as_bytes());
                    }
                    _ => return Err(self.auth_failed()),
                }
            }
        }
        match auth {
            Some(a) => {
                self.auth = Some(a);
                Ok(())
            }
            None => Err(self.auth_failed()),
        }
    }

    // ---- batches ----

    async fn serve(&mut self) -> Step<()> {
        loop {
            if self.attached.is_none() {
                let mut stop = self.shutdown.clone();
                let batch = tokio::select! {
                    b = self.read_batch() => b?,
                    _ = stop.changed() => {
                        // A client that has just been answered reads that answer first (an
                        // error right behind a ReadyForQuery confuses some drivers); whatever
                        // it sends meanwhile gets the same refusal.
                        let grace = Duration::from_millis(200);
                        let _ = tokio::time::timeout(grace, self.read_batch()).await;
                        return Err(self.fatal("57P01", "dbopt-router is shutting down"));
                    }
                };
                self.attach_and_send(batch, None).await?;
            }
            match self.pump().await? {
                PumpEnd::Detached => {}
                PumpEnd::Retry(batch, failed) => self.attach_and_send(batch, Some(failed)).await?,
            }
        }
    }

    /// Messages up to and including a Query, Sync or Flush (a Terminate ends the session).
    async fn read_batch(&mut self) -> Step<Vec<(u8, Vec<u8>)>> {
        let mut batch = Vec::new();
        let mut size = 0usize;
        loop {
            let (tag, msg) = self.next_message().await?;
            match tag {
                b'X' => return Err(Close),
                // Copy messages outside a COPY are ignored, as PostgreSQL does.
                b'd' | b'c' | b'f' => continue,
                _ => {}
            }
            size += msg.len();
            let end = matches!(tag, b'Q' | b'S' | b'H');
            batch.push((tag, msg));
            if end {
                return Ok(batch);
            }
            if size > p::MAX_MESSAGE_LEN {
                return Err(self.protocol_error(ProtocolError(
                    "extended-protocol batch without Sync is too large".into(),
                )));
            }
        }
    }

    pub(crate) fn class_of_text(&self, text: &[u8]) -> Class {
        match std::str::from_utf8(text) {
            Ok(sql) => self.shared.classify_cached(sql),
            Err(_) => Class::write("query text is not UTF-8"),
        }
    }

    fn batch_class(&self, batch: &[(u8, Vec<u8>)]) -> Class {
        let mut classes = Vec::new();
        let mut unnamed: Option<Class> = None;
        for (tag, msg) in batch {
            let b = body(msg);
            match tag {
                b'Q' => {
                    if let Ok(q) = p::parse_query(b) {
                        classes.push(self.class_of_text(q));
                    }
                }
                b'P' => {
                    if let Ok(m) = p::parse_parse(b) {
                        let c = self.class_of_text(m.query);
                        if m.name.is_empty() {
                            unnamed = Some(c);
                        }
                        classes.push(c);
                    }
                }
                b'B' => {
                    if let Ok(m) = p::parse_bind(b) {
                        let c = if m.statement.is_empty() {
                            unnamed.unwrap_or(Class::write("unnamed statement of an earlier batch"))
                        } else {
                            self.statements
                                .get(m.statement)
                                .map_or(Class::write("unknown prepared statement"), |s| s.class)
                        };
                        classes.push(c);
                    }
                }
                b'D' => {
                    if let Ok((b'S', name)) = p::parse_target(b, "Describe") {
                        if let Some(s) = self.statements.get(name) {
                            classes.push(s.class);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut class = combine(&classes);
        // Parse/Describe alone execute nothing: preparing an INSERT is not a write, and any
        // node can answer it (the statement is prepared again where it runs).
        if !batch.iter().any(|(tag, _)| matches!(tag, b'E' | b'Q')) {
            class.kind = Kind::Read;
        }
        class
    }

    /// Routes a batch, takes a server connection and sends the batch. `retry_of` is the node
    /// that failed when this is the one retry of a read.
    pub(crate) async fn attach_and_send(
        &mut self,
        batch: Vec<(u8, Vec<u8>)>,
        retry_of: Option<usize>,
    ) -> Step<()> {
        let auth = self.auth.clone().ok_or(Close)?;
        let session_mode = auth.pool_mode == PoolMode::Session;
        let class = self.batch_class(&batch);
        let decision = decide(&class, auth.critical, session_mode);
        let mut exclude = retry_of;
        let mut broken = 0;
        let applied_unreported: bool;
        let (pool, conn, node) = loop {
            let picked = {
                let mut t = self.shared.topology();
                match decision.target {
                    Target::Replica => {
                        self.barrier = self.barrier.resolve(&t.lsn_history);
                        if self.barrier != Barrier::None
                            && t.nodes
                                .iter()
                                .filter(|n| {
                                    n.role == Some(crate::topology::Role::Replica) && n.reachable
                                })
                                .all(|n| self.barrier.allows(n.replay_lsn))
                        {
                            // Every replica has caught up with this client's writes.
                            self.barrier = Barrier::None;
                        }
                        t.pick_for_read(self.barrier, exclude)
                    }
                    Target::Primary => t.primary_for_writes(),
                }
                .map(|n| (n, t.primary == Some(n)))
            };
            let (node, is_primary) = match picked {
                Ok(x) => x,
                Err(u) => return self.refuse(&batch, unavailable_error(u)).await,
            };
            match self
                .shared
                .acquire(node, &self.database, decision.critical)
                .await
            {
                Ok((pool, mut conn)) => {
                    match self.sync_settings(&mut conn).await {
                        Ok(applied) => applied_unreported = applied,
                        Err(SetupError::Lost(e)) if broken < 3 => {
                            // A connection that died while idle (its node restarted): another.
                            broken += 1;
                            self.shared.topology().record(node, false);
                            pool.forget();
                            log::warn(&format!(
                                "idle connection to {} was broken ({e}); taking another",
                                self.shared.node_name(node)
                            ));
                            continue;
                        }
                        Err(SetupError::Lost(e) | SetupError::Refused(e)) => {
                            let code = "22023";
                            pool.release(conn, false, 0);
                            p::put_error(&mut self.out, "ERROR", code, &e);
                            self.finish_refusal(&batch);
                            return self.flush_client().await;
                        }
                    }
                    let c = &self.shared.counters;
                    Counters::inc(match (decision.target, decision.critical, is_primary) {
                        (_, true, _) => &c.routed_critical,
                        (Target::Replica, _, false) => &c.routed_replica,
                        (Target::Replica, _, true) => &c.routed_primary_fallback,
                        (Target::Primary, _, _) => &c.routed_primary,
                    });
                    break (pool, conn, node);
                }
                // A read may go elsewhere when its replica cannot be reached.
                Err(e)
                    if e.node_failed && decision.target == Target::Replica && exclude.is_none() =>
                {
                    log::warn(&format!(
                        "read for {}: {}; trying another node",
                        self.peer, e.message
                    ));
                    exclude = Some(node);
                }
                Err(e) => return self.refuse(&batch, e).await,
            }
        };
        let mut att = Attached {
            conn,
            pool,
            node,
            decision,
            pending: VecDeque::new(),
            batch_open: true,
            tx_status: b'I',
            copy_in: false,
            touched_unreported: false,
            applied_unreported,
            relayed: false,
            started: Instant::now(),
        };
        self.shared.set_cancel_target(
            self.key,
            Some(CancelTarget {
                addr: att.conn.addr.clone(),
                pid: att.conn.pid,
                secret: att.conn.secret,
            }),
        );
        let mut to_server =
            Vec::with_capacity(batch.iter().map(|(_, m)| m.len()).sum::<usize>() + 64);
        for (tag, msg) in &batch {
            self.translate(&mut att, *tag, msg, &mut to_server);
        }
        self.emit_synthetic(&mut att);
        self.attached = Some(att);
        self.retry_batch = if decision.target == Target::Replica && retry_of.is_none() {
            Some(batch)
        } else {
            None
        };
        let att = self.attached.as_mut().ok_or(Close)?;
        // A failed write shows up as a failed read in the pump, which handles the loss.
        let _ = att.conn.stream.write_all(&to_server).await;
        self.flush_client().await
    }
}
