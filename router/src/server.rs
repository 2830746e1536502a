//! One connection from the router to a PostgreSQL node: connect, authenticate as the server
//! asks (SCRAM-SHA-256, md5, cleartext or trust), collect ParameterStatus and BackendKeyData,
//! and the per-connection caches the session relies on (prepared statements, settings).

use std::collections::HashMap;

use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::{self, body, frame, put_msg, put_startup, Reader};
use crate::sqlstate;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    pub node: usize,
    pub addr: String,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

pub struct ServerConn {
    pub stream: TcpStream,
    pub node: usize,
    /// Shared with the cancel-key registry, which points at it for every batch.
    pub addr: std::sync::Arc<str>,
    pub pid: i32,
    pub secret: i32,
    /// Values the server reported with ParameterStatus, plus settings the router applied.
    pub params: HashMap<String, String>,
    /// Hashes of the statements prepared on this connection under `dbopt_<hash>` names.
    pub prepared: crate::translate::Prepared,
    /// Session-level settings on this connection, as far as the router knows (see
    /// [`crate::isolation`]): what the last client set, read back or applied.
    pub session: crate::isolation::Settings,
    /// Bytes read from the server but not yet handled.
    pub rbuf: BytesMut,
    /// Notifications (NotificationResponse messages) that arrived during the router's own
    /// statements: they belong to the client, which gets them next.
    pub notifications: Vec<u8>,
    pub created: Instant,
    /// (topology epoch, node generation) when opened: a role change, or the node going away,
    /// retires older connections.
    pub epoch: (u64, u64),
}

#[derive(Debug)]
pub enum ConnectError {
    /// Could not reach the node (refused, timeout, reset): counts against its breaker.
    Unreachable(String),
    /// The node answered with an error (authentication, database missing, too many clients).
    Refused { code: String, message: String },
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Unreachable(m) => write!(f, "{m}"),
            ConnectError::Refused { code, message } => write!(f, "{message} (SQLSTATE {code})"),
        }
    }
}

fn unreachable_err(e: impl std::fmt::Display) -> ConnectError {
    ConnectError::Unreachable(e.to_string())
}

impl ServerConn {
    /// Opens and authenticates a connection, waiting at most `timeout`.
    pub async fn connect(
        t: &ServerTarget,
        timeout: Duration,
        epoch: (u64, u64),
    ) -> Result<ServerConn, ConnectError> {
        match tokio::time::timeout(timeout, Self::connect_inner(t, epoch)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Unreachable(format!(
                "connecting to {} timed out after {} ms",
                t.addr,
                timeout.as_millis()
            ))),
        }
    }

    async fn connect_inner(
        t: &ServerTarget,
        epoch: (u64, u64),
    ) -> Result<ServerConn, ConnectError> {
        let stream = TcpStream::connect(&t.addr).await.map_err(unreachable_err)?;
        stream.set_nodelay(true).map_err(unreachable_err)?;
        let mut c = ServerConn {
            stream,
            node: t.node,
            addr: std::sync::Arc::from(t.addr.as_str()),
            pid: 0,
            secret: 0,
            params: HashMap::new(),
            prepared: Default::default(),
            session: Default::default(),
            rbuf: BytesMut::with_capacity(16 * 1024),
            notifications: Vec::new(),
            created: Instant::now(),
            epoch,
        };
        let mut out = Vec::new();
        put_startup(
            &mut out,
            &[
                ("user", &t.user),
                ("database", &t.database),
                ("application_name", "dbopt-router"),
            ],
        );
        c.stream.write_all(&out).await.map_err(unreachable_err)?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, msg) = c.read_message().await.map_err(unreachable_err)?;
            let b = body(&msg);
            match tag {
                b'R' => {
                    let mut r = Reader::new(b);
                    let code = r.i32("authentication code").map_err(unreachable_err)?;
                    let mut reply = Vec::new();
                    let password = || {
                        t.password.clone().ok_or_else(|| ConnectError::Refused {
                            code: sqlstate::INVALID_PASSWORD.into(),
                            message: format!(
                                "{} asks for a password and server.password is not set",
                                t.addr
                            ),
                        })
                    };
                    match code {
                        0 => continue,
                        3 => {
                            let pw = password()?;
                            put_msg(&mut reply, b'p', |m| protocol::put_cstr(m, pw.as_bytes()));
                        }
                        5 => {
                            let pw = password()?;
                            let s = r.take(4, "md5 salt").map_err(unreachable_err)?;
                            let salt = [s[0], s[1], s[2], s[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                t.user.as_bytes(),
                                pw.as_bytes(),
                                salt,
                            );
                            put_msg(&mut reply, b'p', |m| protocol::put_cstr(m, hash.as_bytes()));
                        }
                        10 => {
                            let pw = password()?;
                            let mut offers_scram = false;
                            while let Ok(m) = r.cstr("SASL mechanism") {
                                if m.is_empty() {
                                    break;
                                }
                                offers_scram |= m == b"SCRAM-SHA-256";
                            }
                            if !offers_scram {
                                return Err(unreachable_err("server offers no SCRAM-SHA-256"));
                            }
                            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                            put_msg(&mut reply, b'p', |m| {
                                protocol::put_cstr(m, b"SCRAM-SHA-256");
                                m.extend_from_slice(&(s.message().len() as i32).to_be_bytes());
                                m.extend_from_slice(s.message());
                            });
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| unreachable_err("SASLContinue before SASL"))?;
                            s.update(r.rest()).map_err(unreachable_err)?;
                            put_msg(&mut reply, b'p', |m| m.extend_from_slice(s.message()));
                        }
                        12 => {
                            let mut s = scram
                                .take()
                                .ok_or_else(|| unreachable_err("SASLFinal before SASL"))?;
                            s.finish(r.rest()).map_err(unreachable_err)?;
                            continue;
                        }
                        other => {
                            return Err(unreachable_err(format!(
                                "unsupported authentication request {other}"
                            )))
                        }
                    }
                    c.stream.write_all(&reply).await.map_err(unreachable_err)?;
                }
                b'S' => {
                    let mut r = Reader::new(b);
                    if let (Ok(k), Ok(v)) = (r.cstr("name"), r.cstr("value")) {
                        c.params.insert(
                            String::from_utf8_lossy(k).into_owned(),
                            String::from_utf8_lossy(v).into_owned(),
                        );
                    }
                }
                b'K' => {
                    let mut r = Reader::new(b);
                    c.pid = r.i32("pid").map_err(unreachable_err)?;
                    c.secret = r.i32("secret").map_err(unreachable_err)?;
                }
                b'E' => {
                    let (code, message) = protocol::error_fields(b);
                    return Err(ConnectError::Refused { code, message });
                }
                b'Z' => return Ok(c),
                _ => {} // NoticeResponse and anything else harmless
            }
        }
    }

    /// Reads one whole message (tag + length + body) into a fresh Vec.
    pub async fn read_message(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        loop {
            match frame(&self.rbuf) {
                Ok(Some((tag, len))) => {
                    let msg = self.rbuf[..len].to_vec();
                    self.rbuf.advance(len);
                    return Ok((tag, msg));
                }
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ));
            }
        }
    }

    /// Runs a simple query whose results nobody needs (DISCARD ALL); fails on an error.
    pub async fn run_silently(&mut self, sql: &str) -> Result<(), SetupError> {
        let mut out = Vec::new();
        protocol::put_query(&mut out, sql);
        self.exchange(&out, 1).await.map(|_| ())
    }

    /// Runs the router's own statements in order, each with its text parameters, in one round
    /// trip (one Sync); returns every data row, in order.
    pub async fn statements(
        &mut self,
        list: &[(&str, &[&[u8]])],
    ) -> Result<Vec<Vec<Option<String>>>, SetupError> {
        let mut out = Vec::new();
        for (sql, params) in list {
            protocol::put_parse(&mut out, b"", sql.as_bytes(), &[0, 0]);
            put_bind_text(&mut out, params);
            put_execute(&mut out);
        }
        put_msg(&mut out, b'S', |_| {});
        self.exchange(&out, 1).await
    }

    /// Brings the connection's session settings to `plan`: `RESET` of quoted names, and
    /// `set_config($1, $2, false)` with the names and values as parameters, in one round trip.
    pub async fn apply(&mut self, plan: &crate::isolation::SyncPlan) -> Result<(), SetupError> {
        let mut out = Vec::new();
        for name in &plan.reset {
            protocol::put_parse(
                &mut out,
                b"",
                crate::isolation::reset_sql(name).as_bytes(),
                &[0, 0],
            );
            put_bind_text(&mut out, &[]);
            put_execute(&mut out);
        }
        if !plan.set.is_empty() {
            protocol::put_parse(
                &mut out,
                b"",
                b"SELECT pg_catalog.set_config($1, $2, false)",
                &[0, 0],
            );
            for (name, value) in &plan.set {
                put_bind_text(&mut out, &[name.as_bytes(), value.as_bytes()]);
                put_execute(&mut out);
            }
        }
        put_msg(&mut out, b'S', |_| {});
        self.exchange(&out, 1).await.map(|_| ())
    }

    /// Sends a client batch as it is (ending in Sync or a Query) and returns the server's reply
    /// bytes up to its ReadyForQuery (excluded): the cache's fills done by the router itself.
    /// A notice or a setting report is not part of a cacheable answer: it fails the replay.
    pub async fn replay(&mut self, batch: &[u8]) -> Result<Vec<u8>, SetupError> {
        let mut reply = Vec::new();
        self.exchange_with(batch, 1, |tag, msg| match tag {
            b'N' | b'S' => Err(Refusal {
                code: sqlstate::WARNING.into(),
                message: "the statement sent a notice or changed a setting".into(),
            }),
            _ => {
                reply.extend_from_slice(msg);
                Ok(())
            }
        })
        .await?;
        Ok(reply)
    }

    /// Sends `out` and reads until `ready` ReadyForQuery messages came back: ParameterStatus is
    /// recorded, an error or a transaction left open fails it; returns the data rows.
    async fn exchange(
        &mut self,
        out: &[u8],
        ready: usize,
    ) -> Result<Vec<Vec<Option<String>>>, SetupError> {
        let mut rows = Vec::new();
        self.exchange_with(out, ready, |tag, msg| {
            if tag == b'D' {
                rows.push(data_row(body(msg)).ok_or_else(|| Refusal {
                    code: sqlstate::PROTOCOL_VIOLATION.into(),
                    message: "malformed DataRow from the server".into(),
                })?);
            }
            Ok(())
        })
        .await?;
        Ok(rows)
    }

    /// The loop under [`ServerConn::exchange`] and [`ServerConn::replay`]: sends `out`, reads until
    /// `ready` ReadyForQuery messages. Notifications are kept for the next client, ParameterStatus
    /// is recorded; the first ErrorResponse, or the first message `each` refuses, fails it, and so
    /// does a transaction left open. `each` sees every message but those three kinds.
    async fn exchange_with(
        &mut self,
        out: &[u8],
        mut ready: usize,
        mut each: impl FnMut(u8, &[u8]) -> Result<(), Refusal>,
    ) -> Result<(), SetupError> {
        self.stream
            .write_all(out)
            .await
            .map_err(|e| SetupError::Lost(e.to_string()))?;
        let mut failure = None;
        loop {
            let (tag, msg) = self
                .read_message()
                .await
                .map_err(|e| SetupError::Lost(e.to_string()))?;
            match tag {
                b'A' => self.notifications.extend_from_slice(&msg),
                b'E' => {
                    let (code, message) = protocol::error_fields(body(&msg));
                    failure.get_or_insert(Refusal { code, message });
                }
                b'Z' => {
                    ready -= 1;
                    if ready > 0 {
                        continue;
                    }
                    return match failure {
                        Some(f) => Err(SetupError::Refused(f)),
                        None if body(&msg) == b"I" => Ok(()),
                        None => Err(SetupError::Refused(Refusal {
                            code: sqlstate::ACTIVE_SQL_TRANSACTION.into(),
                            message: "connection left inside a transaction".into(),
                        })),
                    };
                }
                _ => {
                    if tag == b'S' {
                        let mut r = Reader::new(body(&msg));
                        if let (Ok(k), Ok(v)) = (r.cstr("name"), r.cstr("value")) {
                            self.params.insert(
                                String::from_utf8_lossy(k).into_owned(),
                                String::from_utf8_lossy(v).into_owned(),
                            );
                        }
                    }
                    if let Err(r) = each(tag, &msg) {
                        failure.get_or_insert(r);
                    }
                }
            }
        }
    }
}

fn put_bind_text(out: &mut Vec<u8>, params: &[&[u8]]) {
    put_msg(out, b'B', |b| {
        protocol::put_cstr(b, b"");
        protocol::put_cstr(b, b"");
        b.extend_from_slice(&0i16.to_be_bytes()); // all parameters in text
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p);
        }
        b.extend_from_slice(&0i16.to_be_bytes()); // results in text
    });
}

fn put_execute(out: &mut Vec<u8>) {
    put_msg(out, b'E', |b| {
        protocol::put_cstr(b, b"");
        b.extend_from_slice(&0i32.to_be_bytes());
    });
}

/// The columns of a DataRow body as text.
fn data_row(b: &[u8]) -> Option<Vec<Option<String>>> {
    let mut r = Reader::new(b);
    let cols = r.i16("column count").ok()?;
    let mut row = Vec::with_capacity(cols.max(0) as usize);
    for _ in 0..cols {
        let len = r.i32("value length").ok()?;
        if len < 0 {
            row.push(None);
        } else {
            let v = r.take(len as usize, "value").ok()?;
            row.push(Some(String::from_utf8_lossy(v).into_owned()));
        }
    }
    Some(row)
}

/// An error the server answered with.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

/// Why preparing a connection for a client failed.
#[derive(Debug)]
pub enum SetupError {
    /// The connection broke: use another one.
    Lost(String),
    /// The server refused the statement (e.g. a client setting with a bad value).
    Refused(Refusal),
}

/// Sends a CancelRequest for backend `pid` to `addr` (a fresh connection, as the protocol wants).
pub async fn send_cancel(addr: &str, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&16i32.to_be_bytes());
    out.extend_from_slice(&protocol::CANCEL_REQUEST.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&secret.to_be_bytes());
    s.write_all(&out).await?;
    // The server closes the connection when done; wait for that (bounded).
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
    Ok(())
}
