//! One client connection: startup and authentication, then batches.
//!
//! Outside a transaction the session reads one batch (a simple Query, or extended-protocol
//! messages up to Sync/Flush), classifies it, picks a node and takes a server connection from
//! its pool. It then relays in both directions until the server is idle again (ReadyForQuery
//! 'I' with nothing outstanding) and, in transaction pooling, gives the connection back.
//!
//! What the client sends is rewritten for the server connection by [`crate::translate`] (named
//! prepared statements shared across connections); startup and authentication are in
//! [`crate::startup`], the relaying in [`crate::relay`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::cached_reads::{CachePlan, Capture};
use crate::classify::{Class, Kind};
use crate::config::PoolMode;
use crate::isolation::Settings;
use crate::log;
use crate::pools::{unavailable_error, Pool};
use crate::protocol::{self as p, body, ProtocolError};
use crate::relay::PumpEnd;
use crate::route::{combine, decide, Decision, Floor, Target};
use crate::server::{ServerConn, SetupError};
use crate::shared::{CancelTarget, Counters, Shared, UserAuth};
use crate::spare::Batch;
use crate::sqlstate;
use crate::tls::ClientStream;
use crate::translate::{Link, Statements};

pub(crate) struct Attached {
    /// Counts this read on its node while attached (balancing looks at it); held for its Drop.
    #[allow(dead_code)]
    pub(crate) in_flight: Option<InFlight>,
    pub(crate) conn: Box<ServerConn>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) node: usize,
    pub(crate) decision: Decision,
    /// Replies owed to the client and prepared-statement bookkeeping.
    pub(crate) link: Link,
    /// The client's current batch is not complete yet (no Sync/Query seen).
    pub(crate) batch_open: bool,
    pub(crate) tx_status: u8,
    pub(crate) copy_in: bool,
    /// A statement that may have changed the server session ran: check it before the
    /// connection serves another client ([`crate::isolation`]).
    pub(crate) touched: bool,
    /// What pins the client to this connection (a role, a session lock, ...): empty when free.
    pub(crate) pins: Vec<String>,
    /// Settings a plain `SET`/`RESET` changed: read back after the batch (no full check needed
    /// unless a transaction block could have rolled them back).
    pub(crate) quick_sets: Vec<String>,
    /// A transaction block was open at some point of this attachment.
    pub(crate) saw_transaction: bool,
    /// Something that writes ran (a read-your-writes barrier follows), whatever the first batch was.
    pub(crate) wrote: bool,
    /// Something of this batch reached the client (a retry is no longer invisible).
    pub(crate) relayed: bool,
    /// When the current batch started (its first message is being routed or relayed).
    pub(crate) started: Instant,
    /// When the last ReadyForQuery came ([`Shared::now_ms`] clock): the read's time for the
    /// client's floor and the connection's idle-since when it goes back.
    pub(crate) ready_ms: u64,
    /// The reply being captured for the result cache.
    /// Boxed: most batches capture nothing, and the attachment moves with every event.
    pub(crate) capture: Option<Box<Capture>>,
    /// A write was committed during this attachment (the floor was raised for it).
    pub(crate) wrote_here: bool,
    /// Something ran (an Execute or a Query): a Parse/Describe alone reads no data, and leaves
    /// the client's floor where it was.
    pub(crate) executed: bool,
}

pub struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client: ClientStream,
    pub(crate) peer: SocketAddr,
    pub(crate) cbuf: BytesMut,
    pub(crate) out: Vec<u8>,
    pub(crate) user: String,
    pub(crate) database: String,
    /// Shared: cloned per batch (a reference count, not the strings and verifier inside).
    pub(crate) auth: Option<std::sync::Arc<UserAuth>>,
    pub(crate) key: (i32, i32),
    pub(crate) statements: Statements,
    /// The client's session-level settings (startup parameters, then whatever its `SET`s left).
    pub(crate) settings: Settings,
    /// Dotted names the client's session-changing statements mentioned: custom settings it may
    /// have set (PostgreSQL lists those nowhere; see [`crate::isolation::custom_names`]).
    pub(crate) custom_names: std::collections::BTreeSet<String>,
    /// What the client has seen: its reads may not go below it ([`crate::route::Floor`]).
    pub(crate) floor: Floor,
    /// The user's last write already folded into `floor`.
    pub(crate) user_write_seen: u64,
    /// Boxed: the pump takes it out and puts it back on every event (a pointer, not ~460 bytes).
    pub(crate) attached: Option<Box<Attached>>,
    /// The last attachment's reply queue, emptied, for the next one (no allocation per batch).
    pub(crate) spare_link: Link,
    /// Message, batch and outgoing buffers of earlier batches, for the next ones.
    pub(crate) spare: crate::spare::Spare,
    /// The pools this session has used, by node.
    pub(crate) pools: crate::pools::SessionPools,
    /// The current read batch, kept until its first reply so it can be retried once elsewhere.
    pub(crate) retry_batch: Option<Batch>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Idle limits as of the current batch.
    pub(crate) limits: Limits,
    /// The rate-limit check of the batch being handled, until it is decided.
    pub(crate) pending_limit: Option<crate::limits::Pending>,
    /// The text of what the client executes next in the extended protocol (its end user).
    pub(crate) portal_text: Option<Vec<u8>>,
    /// The rate-limit windows of the last check (reused while nothing they depend on changes).
    pub(crate) limit_memo: Option<crate::rate_limited::LimitMemo>,
}

/// The idle timeouts a session applies (seconds, 0: none), copied from the configuration once per
/// batch rather than read from the shared configuration on every relayed message.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Limits {
    pub(crate) client_idle_s: u64,
    pub(crate) idle_in_transaction_s: u64,
    /// Some `[[limits.rules]]` exist (statements are checked).
    pub(crate) rate_limited: bool,
    /// Some rule counts end users (statement texts are looked at).
    pub(crate) end_users: bool,
    /// Some rule is node-scoped (checked again once routing chose the node).
    pub(crate) node_rules: bool,
    /// `pool.read_your_writes`.
    pub(crate) read_your_writes: crate::config::ReadYourWrites,
}

impl Limits {
    fn of(config: &crate::config::Config) -> Limits {
        Limits {
            client_idle_s: config.pool.client_idle_timeout_s,
            idle_in_transaction_s: config.pool.idle_in_transaction_timeout_s,
            rate_limited: !config.limits.rules.is_empty(),
            end_users: crate::limits::rules::wants_end_user(&config.limits),
            node_rules: crate::limits::rules::has_node_rules(&config.limits),
            read_your_writes: config.pool.read_your_writes,
        }
    }
}

/// Ends the session; the message (if any) was already queued for the client.
pub(crate) struct Close;

pub(crate) type Step<T> = Result<T, Close>;

/// The class of a statement text, from the shared cache.
pub(crate) fn class_of(shared: &Shared, text: &[u8]) -> Class {
    match std::str::from_utf8(text) {
        Ok(sql) => shared.classify_cached(sql),
        Err(_) => Class::write("query text is not UTF-8"),
    }
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        client: tokio::net::TcpStream,
        peer: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Session {
            shared,
            client: ClientStream::Plain(client),
            peer,
            cbuf: BytesMut::with_capacity(8192),
            out: Vec::with_capacity(8192),
            user: String::new(),
            database: String::new(),
            auth: None,
            key: (0, 0),
            statements: Statements::default(),
            settings: Settings::new(),
            custom_names: Default::default(),
            floor: Floor::default(),
            user_write_seen: 0,
            attached: None,
            spare_link: Link::default(),
            spare: Default::default(),
            pools: Default::default(),
            retry_batch: None,
            shutdown,
            limits: Limits::default(),
            pending_limit: None,
            portal_text: None,
            limit_memo: None,
        }
    }

    /// Runs the session to its end. `handshake` is this connection's slot among those still
    /// starting up: it is given back once the client has authenticated (or failed to).
    pub async fn run(mut self, mut handshake: crate::handshake::Ticket) {
        let config = self.shared.config();
        let limit = Duration::from_millis(config.listen.handshake_timeout_ms);
        let ok = tokio::select! {
            r = tokio::time::timeout(limit, self.startup()) => match r {
                Ok(r) => r.is_ok(),
                Err(_) => {
                    p::put_error(&mut self.out, "FATAL", sqlstate::PROTOCOL_VIOLATION, "authentication timed out");
                    false
                }
            },
            _ = &mut handshake.displaced => {
                p::put_error(
                    &mut self.out,
                    "FATAL",
                    sqlstate::TOO_MANY_CONNECTIONS,
                    "too many connections are starting up (listen.max_handshakes); this one waited longest",
                );
                false
            }
        };
        drop(handshake);
        if ok {
            let sessions = &self.shared.counters.sessions;
            let n = sessions.fetch_add(1, Ordering::Relaxed) + 1;
            let _counted = SessionCount(self.shared.clone());
            if n > u64::from(config.listen.max_clients) {
                p::put_error(
                    &mut self.out,
                    "FATAL",
                    sqlstate::TOO_MANY_CONNECTIONS,
                    "sorry, too many clients already",
                );
            } else if self.finish_login().await.is_ok() {
                let _ = self.serve().await;
            }
            let _ = self.flush_client().await;
            self.leave().await;
        } else {
            let _ = self.flush_client().await;
        }
    }

    // ---- client I/O ----

    pub(crate) async fn flush_client(&mut self) -> Step<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let mut r = self.client.write_all(&self.out).await;
        if r.is_ok() && self.client.is_tls() {
            r = self.client.flush().await;
        }
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
        self.fatal(
            sqlstate::PROTOCOL_VIOLATION,
            &format!("protocol violation: {e}"),
        )
    }

    /// Reads more bytes from the client; `Close` on EOF.
    pub(crate) async fn fill(&mut self) -> Step<()> {
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
                    let msg = self.spare.message(&self.cbuf[..len]);
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

    // ---- batches ----

    async fn serve(&mut self) -> Step<()> {
        // One wait for the shutdown for the whole session, registered once (a new one per batch
        // cost a registration and a removal under the channel's lock every time).
        let mut stop = self.shutdown.clone();
        let stopping = stop.changed();
        tokio::pin!(stopping);
        loop {
            if self.attached.is_none() {
                // The limits, read once per batch (a SIGHUP applies from the next one).
                self.limits = Limits::of(&self.shared.config());
                let idle_s = self.limits.client_idle_s;
                let idle = async {
                    if idle_s == 0 {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(Duration::from_secs(idle_s)).await;
                };
                enum Wake {
                    Batch(Step<Batch>),
                    Idle,
                    Stop,
                }
                // The client first, in a fixed order (no random number per batch); a shutdown is
                // noticed by a version check before each batch, so a client that always has its
                // next batch ready still sees it, and waited for with the rest.
                let wake = if self.shutdown.has_changed().unwrap_or(true) {
                    Wake::Stop
                } else {
                    tokio::select! {
                        biased;
                        b = self.read_batch() => Wake::Batch(b),
                        _ = idle => Wake::Idle,
                        _ = &mut stopping => Wake::Stop,
                    }
                };
                let batch = match wake {
                    Wake::Batch(b) => b?,
                    Wake::Idle => {
                        Counters::inc(&self.shared.counters.idle_timeouts);
                        return Err(self.fatal(
                            sqlstate::IDLE_SESSION_TIMEOUT,
                            "terminating connection due to idle-session timeout (dbopt-router pool.client_idle_timeout_s)",
                        ));
                    }
                    Wake::Stop => {
                        // A client that has just been answered reads that answer first (an
                        // error right behind a ReadyForQuery confuses some drivers); whatever
                        // it sends meanwhile gets the same refusal.
                        let grace = Duration::from_millis(200);
                        let _ = tokio::time::timeout(grace, self.read_batch()).await;
                        return Err(
                            self.fatal(sqlstate::ADMIN_SHUTDOWN, "dbopt-router is shutting down")
                        );
                    }
                };
                if !self.prepare_limit(&batch).await? {
                    continue;
                }
                let plan = self.cache_plan(&batch).await?;
                if matches!(plan, CachePlan::Answered) {
                    continue;
                }
                if !self.settle_limit(&batch, None).await? {
                    continue;
                }
                self.attach_and_send(batch, None, plan).await?;
            }
            match self.pump().await? {
                PumpEnd::Detached => {}
                PumpEnd::Retry(batch, failed) => {
                    self.attach_and_send(batch, Some(failed), CachePlan::None)
                        .await?
                }
            }
        }
    }

    /// Messages up to and including a Query, Sync or Flush (a Terminate ends the session).
    async fn read_batch(&mut self) -> Step<Batch> {
        let mut batch = self.spare.batch();
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
            // A Flush ends a batch too: the client waits for replies before it goes on (a
            // pipeline). Such a batch goes to the primary, since what follows is unknown.
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

    /// The read batch kept for a retry is done with (answered, or not retried): its buffers go
    /// back to the spares.
    pub(crate) fn drop_retry_batch(&mut self) {
        if let Some(batch) = self.retry_batch.take() {
            self.spare.recycle(batch);
        }
    }

    pub(crate) fn class_of_text(&self, text: &[u8]) -> Class {
        class_of(&self.shared, text)
    }

    fn batch_class(&self, batch: &[(u8, Vec<u8>)]) -> Class {
        // On the stack: a batch is a few messages.
        let mut classes: smallvec::SmallVec<[Class; 4]> = smallvec::SmallVec::new();
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
                    if let Ok(m) = p::bind_names(b) {
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
        batch: Batch,
        retry_of: Option<usize>,
        plan: CachePlan,
    ) -> Step<()> {
        let auth = self.auth.clone().ok_or(Close)?;
        // The clock, read once for the whole routing of the batch (its latency counts from here).
        let began = Instant::now();
        let now_ms = self.shared.ms_at(began);
        let session_mode = auth.pool_mode == PoolMode::Session;
        let class = self.batch_class(&batch);
        let mut decision = decide(&class, auth.critical, session_mode);
        if decision.target == Target::Replica && matches!(batch.last(), Some((b'H', _))) {
            // An unfinished pipeline: whatever comes before its Sync runs on the same connection.
            decision.target = Target::Primary;
        }
        let mut exclude = retry_of;
        let mut broken = 0;
        let node_count = match decision.target {
            Target::Replica => self.shared.node_count,
            Target::Primary => 0,
        };
        if decision.target == Target::Replica {
            self.absorb_user_writes();
        }
        let (pool, conn, node, is_primary) = loop {
            // Only reads choose among nodes (and only they need to know which pools are full):
            // one bit per node, no allocation per batch (nodes past 128 count as having room).
            let room =
                self.pools
                    .room_mask(&self.shared.pools, node_count, &self.database, &auth.login);
            let picked = {
                let mut t = self.shared.topology();
                match decision.target {
                    Target::Replica => {
                        self.floor.resolve(&t.lsn_history);
                        let has_room = |n: usize| n >= 128 || room & (1 << n) != 0;
                        t.pick_for_read(&self.floor, exclude, has_room, now_ms)
                    }
                    Target::Primary => t.primary_for_writes(),
                }
                .map(|n| (n, t.primary == Some(n)))
            };
            let (node, is_primary) = match picked {
                Ok(x) => x,
                Err(u) => return self.refuse(&batch, unavailable_error(u)).await,
            };
            if retry_of.is_none() && broken == 0 && !self.check_node_limit(&batch, node).await? {
                return Ok(());
            }
            let shared = &self.shared;
            let pool = self
                .pools
                .get(&shared.pools, node, &self.database, &auth.login, || {
                    shared.pool_limits()
                });
            match shared.acquire_in(pool, decision.critical, now_ms).await {
                Ok((pool, mut conn)) => {
                    match self.sync_settings(&mut conn).await {
                        Ok(()) => {}
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
                        Err(SetupError::Lost(e)) => {
                            pool.release(conn, false, 0);
                            p::put_error(&mut self.out, "ERROR", sqlstate::CONNECTION_FAILURE, &e);
                            self.finish_refusal(&batch);
                            return self.flush_client().await;
                        }
                        Err(SetupError::Refused(r)) => {
                            pool.release(conn, false, 0);
                            p::put_error(&mut self.out, "ERROR", &r.code, &r.message);
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
                    break (pool, conn, node, is_primary);
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
        let in_flight =
            (decision.target == Target::Replica).then(|| InFlight::start(&self.shared, node));
        let mut att = Box::new(Attached {
            in_flight,
            conn,
            pool,
            node,
            decision,
            link: std::mem::take(&mut self.spare_link),
            batch_open: true,
            tx_status: b'I',
            copy_in: false,
            touched: false,
            pins: Vec::new(),
            quick_sets: Vec::new(),
            saw_transaction: false,
            wrote: decision.writes,
            relayed: false,
            started: began,
            ready_ms: now_ms,
            capture: None,
            wrote_here: false,
            executed: batch.iter().any(|(tag, _)| matches!(tag, b'E' | b'Q')),
        });
        if let CachePlan::Fill(p) = plan {
            att.capture = self
                .prepare_fill(&mut att.conn, *p, &batch, node, is_primary)
                .await
                .map(Box::new);
        }
        self.shared.set_cancel_target(
            self.key,
            Some(CancelTarget {
                addr: att.conn.addr.clone(),
                pid: att.conn.pid,
                secret: att.conn.secret,
            }),
        );
        let mut to_server = self
            .spare
            .out(batch.iter().map(|(_, m)| m.len()).sum::<usize>() + 64);
        if class.session {
            // The batch was classified above as a whole: a lone plain SET only needs its setting
            // read back; anything else gets the full check.
            let texts: Vec<Vec<u8>> = batch
                .iter()
                .filter_map(|(tag, msg)| crate::relay::statement_text(*tag, msg, &self.statements))
                .collect();
            let full = Class {
                simple_set: false,
                ..class
            };
            match texts.as_slice() {
                [one] => self.note_session_change(&mut att, class, one),
                _ => {
                    att.touched = true;
                    for text in &texts {
                        self.note_session_change(&mut att, full, text);
                    }
                }
            }
        }
        for (tag, msg) in &batch {
            self.translate(&mut att, *tag, msg, &mut to_server, false);
        }
        self.emit_synthetic(&mut att);
        self.attached = Some(att);
        if decision.target == Target::Replica && retry_of.is_none() {
            self.retry_batch = Some(batch);
        } else {
            self.drop_retry_batch();
            self.spare.recycle(batch);
        }
        let att = self.attached.as_mut().ok_or(Close)?;
        // A failed write shows up as a failed read in the pump, which handles the loss.
        let _ = att.conn.stream.write_all(&to_server).await;
        self.spare.put_out(to_server);
        self.flush_client().await
    }
}

/// One authenticated session, counted against `listen.max_clients` while it lives.
struct SessionCount(Arc<Shared>);

impl Drop for SessionCount {
    fn drop(&mut self) {
        self.0.counters.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A read running on a node, counted in [`crate::topology::NodeState::in_flight`] until dropped.
pub(crate) struct InFlight(Arc<Shared>, usize);

impl InFlight {
    fn start(shared: &Arc<Shared>, node: usize) -> InFlight {
        shared.topology().nodes[node].in_flight += 1;
        InFlight(shared.clone(), node)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut t = self.0.topology();
        t.nodes[self.1].in_flight = t.nodes[self.1].in_flight.saturating_sub(1);
    }
}
