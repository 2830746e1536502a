//! A session's start: the startup packet (TLS, cancel requests, parameters), authentication,
//! the database allow-list, and the client's settings checked on a real server before it is told
//! "ready" — so a bad `TimeZone` fails the login, as PostgreSQL does, instead of every query after.

use std::sync::atomic::Ordering;

use bytes::Buf;
use tokio::io::AsyncWriteExt;

use crate::auth::{md5_check, ScramExchange, ScramVerifier};
use crate::config::AuthMethod;
use crate::isolation::{parse_options, valid_setting_name};
use crate::log;
use crate::protocol::{self as p, body, ProtocolError, Reader, Startup};
use crate::session::{Close, Session, Step};
use crate::shared::Counters;
use crate::sqlstate;
use crate::tls::ClientStream;

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

impl Session {
    /// Reads the startup packet (after TLS, if the client asks for it) and authenticates.
    pub(crate) async fn startup(&mut self) -> Step<()> {
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
                Ok(Startup::Ssl) => self.start_tls().await?,
                Ok(Startup::GssEnc) => {
                    self.client.write_all(b"N").await.map_err(|_| Close)?;
                }
                Ok(Startup::Cancel { pid, secret }) => {
                    self.forward_cancel(pid, secret).await;
                    return Err(Close);
                }
                Ok(Startup::Params(params)) => break params,
            }
        };
        let config = self.shared.config();
        if config.listen.tls.as_ref().is_some_and(|t| t.required) && !self.client.is_tls() {
            return Err(self.fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "dbopt-router requires TLS (sslmode=require)",
            ));
        }
        let mut user = None;
        let mut database = None;
        for (k, v) in params {
            match k.as_str() {
                "user" => user = Some(v),
                "database" => database = Some(v),
                "replication" if v != "false" && v != "0" => {
                    return Err(self.fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "replication connections are not supported through dbopt-router",
                    ));
                }
                "replication" => {}
                "options" => match parse_options(&v) {
                    Ok(settings) => self.settings.extend(settings),
                    Err(e) => return Err(self.fatal(sqlstate::PROTOCOL_VIOLATION, &e.0)),
                },
                _ => {
                    let name = k.to_lowercase();
                    if NOT_SETTINGS.contains(&name.as_str()) || name.starts_with("_pq_.") {
                        continue;
                    }
                    if !valid_setting_name(&name) {
                        return Err(self.fatal(
                            sqlstate::UNDEFINED_OBJECT,
                            &format!("unrecognized configuration parameter \"{name}\""),
                        ));
                    }
                    self.settings.insert(name, v);
                }
            }
        }
        let Some(user) = user.filter(|u| !u.is_empty()) else {
            return Err(self.fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            ));
        };
        self.database = database
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| user.clone());
        self.user = user;
        if self.shared.shutting_down.load(Ordering::Relaxed) {
            return Err(self.fatal(sqlstate::ADMIN_SHUTDOWN, "dbopt-router is shutting down"));
        }
        self.authenticate().await?;
        // After authentication, so that the allow-list is not disclosed to strangers.
        if !config.allowed_databases().contains(&self.database) {
            log::warn(&format!(
                "client {}: user \"{}\" asked for database \"{}\", which is not in databases",
                self.peer, self.user, self.database
            ));
            return Err(self.fatal(
                sqlstate::INVALID_CATALOG_NAME,
                &format!(
                    "database \"{}\" is not served by dbopt-router",
                    self.database
                ),
            ));
        }
        Ok(())
    }

    /// Answers an SSLRequest: `S` and a TLS handshake when TLS is configured, else `N`.
    async fn start_tls(&mut self) -> Step<()> {
        let Some(acceptor) = self.shared.tls.clone() else {
            return self.client.write_all(b"N").await.map_err(|_| Close);
        };
        if self.client.is_tls() || !self.cbuf.is_empty() {
            // A second SSLRequest, or bytes sent before the handshake (a man in the middle
            // could have injected them): refuse, as PostgreSQL does.
            return Err(self.protocol_error(ProtocolError(
                "unexpected data around the SSL request".into(),
            )));
        }
        self.client.write_all(b"S").await.map_err(|_| Close)?;
        let ClientStream::Plain(tcp) = std::mem::replace(&mut self.client, ClientStream::Gone)
        else {
            return Err(Close);
        };
        match acceptor.accept(tcp).await {
            Ok(tls) => {
                self.client = ClientStream::Tls(Box::new(tls));
                Ok(())
            }
            Err(e) => {
                log::warn(&format!("client {}: TLS handshake failed: {e}", self.peer));
                Err(Close)
            }
        }
    }

    /// Tells the client it is in: AuthenticationOk, its settings checked on a server (a bad value
    /// is a FATAL error with the server's own SQLSTATE), ParameterStatus as that server reports
    /// them with the client's settings applied, BackendKeyData and ReadyForQuery. Settings a
    /// login of the same role already had accepted need no server (the report is remembered), so
    /// logging in does not wait for a busy pool.
    pub(crate) async fn finish_login(&mut self) -> Step<()> {
        p::put_auth(&mut self.out, 0, &[]);
        let auth = self.auth.clone().ok_or(Close)?;
        let reported = match self.shared.login_report(&auth.login.role, &self.settings) {
            Some(r) => r,
            None => {
                let r = self.check_settings_on_a_server(&auth).await?;
                self.shared
                    .remember_login_report(&auth.login.role, &self.settings, r.clone());
                r
            }
        };
        for (k, v) in &reported {
            // Writes go to the primary whichever node answered the check.
            let v = match k.as_str() {
                "in_hot_standby" => "off",
                "application_name" if !self.settings.contains_key("application_name") => "",
                _ => v.as_str(),
            };
            p::put_parameter_status(&mut self.out, k, v);
        }
        self.key = self.register_cancel_key();
        p::put_backend_key(&mut self.out, self.key.0, self.key.1);
        p::put_ready(&mut self.out, b'I');
        self.flush_client().await
    }

    /// Applies the client's startup settings on a pooled connection; returns what the server then
    /// reports (sorted), or ends the login with the server's error.
    async fn check_settings_on_a_server(
        &mut self,
        auth: &crate::shared::UserAuth,
    ) -> Step<Vec<(String, String)>> {
        let node = {
            let mut t = self.shared.topology();
            let now = t.now_ms();
            t.pick_for_read(&crate::route::Floor::default(), None, |_| true, now)
        };
        let node = match node {
            Ok(n) => n,
            Err(u) => {
                let e = crate::pools::unavailable_error(u);
                return Err(self.fatal(e.code, &e.message));
            }
        };
        let (pool, mut conn) = match self
            .shared
            .acquire(
                node,
                &self.database,
                &auth.login,
                auth.critical,
                self.shared.now_ms(),
            )
            .await
        {
            Ok(x) => x,
            Err(e) => return Err(self.fatal(e.code, &e.message)),
        };
        if let Err(e) = self.sync_settings(&mut conn).await {
            pool.release(conn, false, 0);
            return Err(match e {
                crate::server::SetupError::Refused(r) => self.fatal(&r.code, &r.message),
                crate::server::SetupError::Lost(m) => self.fatal(sqlstate::CONNECTION_FAILURE, &m),
            });
        }
        let mut reported: Vec<(String, String)> = conn
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let now = self.shared.now_ms();
        pool.release(conn, true, now);
        reported.sort();
        Ok(reported)
    }

    fn register_cancel_key(&self) -> (i32, i32) {
        let mut map = crate::locks::lock(&self.shared.cancel);
        loop {
            let key: (i32, i32) = (rand::random::<i32>() & 0x7fff_ffff, rand::random());
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(key) {
                e.insert(None);
                return key;
            }
        }
    }

    async fn forward_cancel(&self, pid: i32, secret: i32) {
        let target = crate::locks::lock(&self.shared.cancel)
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
            sqlstate::INVALID_PASSWORD,
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
                    return Err(self.fatal(
                        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                        "SASL mechanism SCRAM-SHA-256 is required",
                    ));
                }
                let len = r.i32("SASL data length").unwrap_or(-1);
                if len < 0 || len as usize != r.rest().len() {
                    return Err(
                        self.protocol_error(ProtocolError("malformed SASLInitialResponse".into()))
                    );
                }
                let (exchange, server_first) = match ScramExchange::start(&verifier, r.rest()) {
                    Ok(x) => x,
                    Err(e) => return Err(self.fatal(sqlstate::PROTOCOL_VIOLATION, &e)),
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
                self.auth = Some(std::sync::Arc::new(a));
                Ok(())
            }
            None => Err(self.auth_failed()),
        }
    }
}
