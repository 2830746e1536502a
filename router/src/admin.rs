//! The admin HTTP endpoint: `GET /metrics` (Prometheus text format), `GET /status` (JSON),
//! `GET /alerts` (firing and recent alerts, JSON), `GET /dashboard` (a page over them) and
//! `GET /statements` (top and slow statements of every node, JSON), and
//! `POST /cache/invalidate` (authenticated with `listen.admin_token`); GETs need
//! `listen.admin_read_token` when one is set.
//! A deliberately small HTTP/1.1 server: one request per connection, bounded request size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dbopt_querystats::exposition::Exposition;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::log;
use crate::shared::Shared;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(&shared, stream)).await;
        });
    }
}

async fn answer(shared: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len())
        + 4;
    let line = String::from_utf8_lossy(&buf[..head_end.min(buf.len())]).into_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // The dashboard page holds no data (it asks the endpoints below with the token the user
    // gives it), so it is served without one.
    let may_read = method != "GET"
        || path == "/dashboard"
        || read_allowed(&shared.config().listen, header(&line, "authorization"));
    let (status, ctype, body) = match (method, path) {
        ("GET", _) if !may_read => (
            "401 Unauthorized",
            "text/plain",
            "a valid Authorization: Bearer token is required (listen.admin_read_token)\n".into(),
        ),
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics(shared)),
        ("GET", "/status") => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&status(shared)).unwrap_or_default(),
        ),
        ("GET", "/dashboard") => (
            "200 OK",
            "text/html; charset=utf-8",
            crate::dashboard::PAGE.to_string(),
        ),
        ("GET", "/statements") => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&shared.statements.get(shared).await).unwrap_or_default(),
        ),
        ("GET", "/alerts") => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&shared.alerts.report()).unwrap_or_default(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /dashboard, /metrics, /status, /alerts or /statements\n".into(),
        ),
        ("POST", p) if p == "/cache/invalidate" || p.starts_with("/cache/invalidate?") => {
            let mut body = buf[head_end.min(buf.len())..].to_vec();
            let want = header(&line, "content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if want > 4096 {
                return reply(
                    &mut stream,
                    "413 Payload Too Large",
                    "text/plain",
                    "at most 4096 bytes\n",
                )
                .await;
            }
            while body.len() < want {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            let form = match p.split_once('?') {
                Some((_, q)) => q.to_string(),
                None => String::from_utf8_lossy(&body).trim().to_string(),
            };
            manual_invalidation(shared, header(&line, "authorization"), &form).await
        }
        ("POST", _) => (
            "404 Not Found",
            "text/plain",
            "POST /cache/invalidate only\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET or POST only\n".into(),
        ),
    };
    if status.starts_with('4') {
        log::info(&format!(
            "admin: {method} {} -> {status}",
            log::escape(path)
        ));
    }
    reply(&mut stream, status, ctype, &body).await
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await
}

/// Whether a GET may be answered: no read token configured, or the request presents it (or the
/// admin token).
fn read_allowed(listen: &crate::config::Listen, authorization: Option<&str>) -> bool {
    let Some(read) = listen.admin_read_token.as_deref() else {
        return true;
    };
    let given = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or("")
        .as_bytes();
    same_secret(given, read.as_bytes())
        || listen
            .admin_token
            .as_deref()
            .is_some_and(|t| same_secret(given, t.as_bytes()))
}

/// A request header's value (name case-insensitive).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Equal in time independent of where they differ (the admin token).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /cache/invalidate` with `Authorization: Bearer <listen.admin_token>` and a form
/// `db=…&tag=…` (or `table=<oid>`, or `all=1`): both layers, at once.
async fn manual_invalidation(
    shared: &Shared,
    authorization: Option<&str>,
    form: &str,
) -> (&'static str, &'static str, String) {
    let config = shared.config();
    let Some(token) = config.listen.admin_token.as_deref() else {
        return (
            "403 Forbidden",
            "text/plain",
            "set listen.admin_token to allow POST requests\n".into(),
        );
    };
    let given = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or("");
    if !same_secret(given.as_bytes(), token.as_bytes()) {
        return (
            "401 Unauthorized",
            "text/plain",
            "a valid Authorization: Bearer token is required\n".into(),
        );
    }
    let Some(cache) = &shared.cache else {
        return (
            "409 Conflict",
            "text/plain",
            "the cache is not enabled\n".into(),
        );
    };
    let (db, what) = match crate::cache::report::parse_manual(form) {
        Ok(x) => x,
        Err(e) => return ("400 Bad Request", "text/plain", format!("{e}\n")),
    };
    let allowed = if config.databases.is_empty() {
        db == config.server.database
    } else {
        config.databases.contains(&db)
    };
    if !allowed {
        return ("404 Not Found", "text/plain", "no such database\n".into());
    }
    crate::cache::report::invalidate(cache, &db, &what, shared.now_ms()).await;
    log::info(&format!(
        "admin: cache invalidated by hand: {} {what:?}",
        log::escape(&db)
    ));
    ("200 OK", "text/plain", "invalidated\n".into())
}

/// The Prometheus exposition (escaping and formatting by `dbopt_querystats::exposition`, the one
/// implementation the extension's metrics use too).
pub fn metrics(shared: &Shared) -> String {
    let mut e = Exposition::default();
    let c = &shared.counters;
    let get = |v: &AtomicU64| v.load(Ordering::Relaxed) as f64;
    let counters: [(&str, &str, &AtomicU64); 14] = [
        (
            "dbopt_router_clients_total",
            "Client connections accepted.",
            &c.clients_total,
        ),
        (
            "dbopt_router_auth_failures_total",
            "Failed client authentications.",
            &c.auth_failures,
        ),
        (
            "dbopt_router_protocol_errors_total",
            "Client connections closed for protocol violations.",
            &c.protocol_errors,
        ),
        (
            "dbopt_router_acquire_errors_total",
            "Batches refused for want of a server connection.",
            &c.acquire_errors,
        ),
        (
            "dbopt_router_server_errors_total",
            "Server connections lost while in use.",
            &c.server_errors,
        ),
        (
            "dbopt_router_read_retries_total",
            "Reads retried on another node after a server failure.",
            &c.read_retries,
        ),
        (
            "dbopt_router_cancels_total",
            "Cancel requests forwarded.",
            &c.cancels,
        ),
        (
            "dbopt_router_handshake_evictions_total",
            "Connections still starting up that a newer one displaced (listen.max_handshakes).",
            &c.handshake_evictions,
        ),
        (
            "dbopt_router_idle_timeouts_total",
            "Clients disconnected by the idle or idle-in-transaction timeout.",
            &c.idle_timeouts,
        ),
        (
            "dbopt_router_settings_syncs_total",
            "Round trips that gave a server connection its client's session settings.",
            &c.settings_syncs,
        ),
        (
            "dbopt_router_session_checks_total",
            "Session checks after statements that may have changed the server session.",
            &c.session_checks,
        ),
        (
            "dbopt_router_settings_read_backs_total",
            "Read-backs of the setting a plain SET/RESET changed (instead of a full session check).",
            &c.settings_read_backs,
        ),
        (
            "dbopt_router_pins_total",
            "Times a client was pinned to its server connection (role, lock, LISTEN, temp table...).",
            &c.pins,
        ),
        (
            "dbopt_router_replica_reclones_total",
            "Re-clones of replicas that could not catch up, requested from Patroni and accepted.",
            &c.reclones,
        ),
    ];
    for (name, help, v) in counters {
        e.counter(name, help, get(v));
    }
    e.gauge(
        "dbopt_router_clients",
        "Client connections open now.",
        get(&c.clients_active),
    );
    let routed: Vec<(Vec<(&str, &str)>, f64)> = [
        ("replica", &c.routed_replica),
        ("primary", &c.routed_primary),
        ("critical", &c.routed_critical),
        ("primary_fallback", &c.routed_primary_fallback),
    ]
    .into_iter()
    .map(|(route, v)| (vec![("route", route)], get(v)))
    .collect();
    e.counters(
        "dbopt_router_routed_total",
        "Batches routed, by route.",
        &routed,
    );

    let pools = shared.pools.all();
    let names: Vec<String> = shared
        .topology()
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    // One row of numbers per pool, read under its lock once.
    let rows: Vec<[f64; 8]> = pools
        .iter()
        .map(|p| {
            let st = p.lock();
            [
                st.open() as f64,
                st.in_use() as f64,
                p.waiting.load(Ordering::Relaxed) as f64,
                f64::from(st.limits.max),
                get(&p.waits),
                get(&p.wait_us_total) / 1e6,
                get(&p.timeouts),
                get(&p.connect_failures),
            ]
        })
        .collect();
    let pool_family = |col: usize| -> Vec<(Vec<(&str, &str)>, f64)> {
        pools
            .iter()
            .zip(&rows)
            .map(|(p, row)| {
                (
                    vec![
                        ("node", names[p.node].as_str()),
                        ("database", p.database.as_str()),
                        ("role", p.login.role.as_str()),
                    ],
                    row[col],
                )
            })
            .collect()
    };
    let pool_gauges = [
        (
            "dbopt_router_pool_connections",
            "Server connections open, per pool.",
        ),
        (
            "dbopt_router_pool_in_use",
            "Server connections lent to clients, per pool.",
        ),
        (
            "dbopt_router_pool_waiting",
            "Clients waiting for a connection, per pool.",
        ),
        ("dbopt_router_pool_max", "Most connections per pool."),
    ];
    for (col, (name, help)) in pool_gauges.into_iter().enumerate() {
        e.gauges(name, help, &pool_family(col));
    }
    let pool_counters = [
        (
            "dbopt_router_pool_waits_total",
            "Acquisitions that had to wait, per pool.",
        ),
        (
            "dbopt_router_pool_wait_seconds_total",
            "Time clients spent waiting, per pool.",
        ),
        (
            "dbopt_router_pool_timeouts_total",
            "Waits that timed out (SQLSTATE 53300), per pool.",
        ),
        (
            "dbopt_router_pool_connect_failures_total",
            "Failed connection openings, per pool.",
        ),
    ];
    for (i, (name, help)) in pool_counters.into_iter().enumerate() {
        e.counters(name, help, &pool_family(4 + i));
    }

    let mut o = e.finish();
    if let Some(cache) = &shared.cache {
        o.push_str(&crate::cache::report::metrics(cache));
    }
    o.push_str(&shared.limiter.metrics());
    o.push_str(&shared.alerts.metrics());
    let mut e = Exposition::default();
    let t = shared.topology();
    let now = t.now_ms();
    let node_gauges: [(&str, &str); 7] = [
        (
            "dbopt_router_node_up",
            "1 when the last check reached the node.",
        ),
        (
            "dbopt_router_node_primary",
            "1 for the node the router writes to.",
        ),
        (
            "dbopt_router_node_replay_lag_seconds",
            "Replay lag from dbopt.node_status().",
        ),
        (
            "dbopt_router_node_cpu_percent",
            "Host CPU busy % from dbopt.node_status().",
        ),
        (
            "dbopt_router_node_latency_ewma_seconds",
            "EWMA of read round trips.",
        ),
        (
            "dbopt_router_node_breaker_open",
            "1 while the node's circuit breaker is open or half-open.",
        ),
        (
            "dbopt_router_node_replay_lag_bytes",
            "WAL received but not yet replayed, from dbopt.node_status().",
        ),
    ];
    for (i, (name, help)) in node_gauges.into_iter().enumerate() {
        let samples: Vec<(Vec<(&str, &str)>, f64)> = t
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(idx, n)| {
                let v = match i {
                    0 => Some(f64::from(u8::from(n.reachable))),
                    1 => Some(f64::from(u8::from(t.primary == Some(idx)))),
                    2 => n.lag_s,
                    3 => n.cpu_percent,
                    4 => n.ewma.get(now).map(|ms| ms / 1000.0),
                    5 => Some(f64::from(u8::from(n.breaker.state().name() != "closed"))),
                    _ => n.lag_bytes,
                };
                v.map(|v| (vec![("node", n.name.as_str())], v))
            })
            .collect();
        e.gauges(name, help, &samples);
    }
    o.push_str(&e.finish());
    o
}

/// The JSON status document.
pub fn status(shared: &Shared) -> serde_json::Value {
    let pools: Vec<serde_json::Value> = {
        let names: Vec<String> = shared
            .topology()
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect();
        shared
            .pools
            .all()
            .iter()
            .map(|p| {
                let st = p.lock();
                let waits = p.waits.load(Ordering::Relaxed);
                json!({
                    "node": names[p.node],
                    "database": p.database,
                    "role": p.login.role,
                    "open": st.open(),
                    "in_use": st.in_use(),
                    "idle": st.idle(),
                    "max": st.limits.max,
                    "waiting": p.waiting.load(Ordering::Relaxed),
                    "waits": waits,
                    "mean_wait_ms": if waits == 0 { 0.0 } else {
                        p.wait_us_total.load(Ordering::Relaxed) as f64 / waits as f64 / 1000.0
                    },
                    "timeouts": p.timeouts.load(Ordering::Relaxed),
                })
            })
            .collect()
    };
    let c = &shared.counters;
    let t = shared.topology();
    let now = t.now_ms();
    let nodes: Vec<serde_json::Value> = t
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({
                "name": n.name,
                "address": n.addr,
                "reachable": n.reachable,
                "role": n.role.map(|r| r.name()),
                "writes_here": t.primary == Some(i),
                "replay_lag_s": n.lag_s,
                "replay_lag_bytes": n.lag_bytes,
                "receiver_state": n.receiver_state,
                "lag_history_s": shared.alerts.lag_history(&n.name),
                "cpu_percent": n.cpu_percent,
                "replayed_lsn": n.replay_lsn,
                "latency_ewma_ms": n.ewma.get(now),
                "breaker": n.breaker.state().name(),
                "weight": n.weight,
                "last_error": n.last_error,
            })
        })
        .collect();
    json!({
        "primary": t.primary.map(|p| t.nodes[p].name.clone()),
        "epoch": t.epoch,
        "nodes": nodes,
        "pools": pools,
        "clients": c.clients_active.load(Ordering::Relaxed),
        "routed": {
            "replica": c.routed_replica.load(Ordering::Relaxed),
            "primary": c.routed_primary.load(Ordering::Relaxed),
            "critical": c.routed_critical.load(Ordering::Relaxed),
            "primary_fallback": c.routed_primary_fallback.load(Ordering::Relaxed),
        },
        "read_retries": c.read_retries.load(Ordering::Relaxed),
        "sessions": {
            "authenticated": c.sessions.load(Ordering::Relaxed),
            "starting_up": shared.handshakes.len(),
            "handshake_evictions": c.handshake_evictions.load(Ordering::Relaxed),
            "idle_timeouts": c.idle_timeouts.load(Ordering::Relaxed),
            "settings_syncs": c.settings_syncs.load(Ordering::Relaxed),
            "session_checks": c.session_checks.load(Ordering::Relaxed),
            "settings_read_backs": c.settings_read_backs.load(Ordering::Relaxed),
            "pins": c.pins.load(Ordering::Relaxed),
        },
        "function_catalogue_names": t.functions.len(),
        "cache": shared.cache.as_ref().map(|c| crate::cache::report::status(c)),
        "limits": shared.limiter.status(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn listen(read: Option<&str>, admin: Option<&str>) -> crate::config::Listen {
        crate::config::Listen {
            address: "127.0.0.1:1".into(),
            admin_address: None,
            max_clients: 1,
            handshake_timeout_ms: 1000,
            max_handshakes: 1,
            tls: None,
            admin_token: admin.map(str::to_string),
            admin_read_token: read.map(str::to_string),
        }
    }

    #[test]
    fn reads_need_the_read_token_only_when_one_is_set() {
        assert!(read_allowed(&listen(None, None), None));
        let l = listen(
            Some("read-token-0123456789"),
            Some("admin-token-0123456789"),
        );
        assert!(!read_allowed(&l, None));
        assert!(!read_allowed(&l, Some("Bearer wrong")));
        assert!(
            !read_allowed(&l, Some("read-token-0123456789")),
            "the scheme is required"
        );
        assert!(read_allowed(&l, Some("Bearer read-token-0123456789")));
        assert!(read_allowed(&l, Some("Bearer admin-token-0123456789")));
    }
}
