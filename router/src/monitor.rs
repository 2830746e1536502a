//! One watcher task per node, on its own connection (not from the pools):
//! - every `health.lsn_poll_ms`: role (`pg_is_in_recovery()`) and WAL position — the primary's
//!   current LSN feeds read-your-writes, a replica's replayed LSN says how far it is;
//! - every `health.interval_s`: the full check through `dbopt.node_status()` (lag in seconds and
//!   bytes, host CPU), falling back to PostgreSQL's functions when the extension is missing;
//! - on the primary, every minute: the catalogue of non-volatile functions for classification.
//!
//! A failed query or connection marks the node unreachable at once (its pools stop getting
//! traffic) and counts against its breaker; the next success brings it back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::classify::FunctionCatalog;
use crate::log;
use crate::shared::Shared;
use crate::topology::{parse_lsn, Role};

const POLL_SQL: &str = "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() \
     THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text";

const STATUS_SQL: &str = "SELECT replay_lag_s, replay_lag_bytes::float8, cpu_percent, \
     receiver_state FROM dbopt.node_status()";

/// Without the extension: lag 0 when everything received is replayed, else the age of the last
/// replayed transaction; no CPU figure.
const FALLBACK_STATUS_SQL: &str = "SELECT CASE WHEN NOT pg_is_in_recovery() \
     OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0::float8 \
     ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END, \
     CASE WHEN pg_is_in_recovery() THEN pg_wal_lsn_diff(pg_last_wal_receive_lsn(), \
     pg_last_wal_replay_lsn())::float8 ELSE 0::float8 END, NULL::float8, \
     (SELECT status FROM pg_stat_wal_receiver)";

/// The primary's oldest WAL segment and the segment size (`pg_ls_waldir()` needs a superuser or
/// pg_monitor): a replica needing older WAL can never catch up by streaming.
pub(crate) const OLDEST_WAL_SQL: &str = "SELECT (SELECT min(name) FROM pg_ls_waldir() \
     WHERE name ~ '^[0-9A-F]{24}$'), (SELECT setting::int8 FROM pg_settings \
     WHERE name = 'wal_segment_size')";

/// Slow statements since the node started (`[alerts]` turns it into a rate); extension ≥ 0.1 with
/// the counter only, so a failure just leaves the figure out.
const SLOW_TOTAL_SQL: &str = "SELECT dbopt.slow_queries_total()";

const FUNCTIONS_SQL: &str =
    "SELECT n.nspname::text, p.proname::text, bool_and(p.provolatile <> 'v') \
     FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace GROUP BY 1, 2";

const CATALOGUE_EVERY: Duration = Duration::from_secs(60);

/// A connection to `node` with the router's own `[server]` login.
pub(crate) async fn connect_as_router(
    config: &crate::config::Config,
    node: usize,
    application_name: &str,
) -> Result<Client, String> {
    let n = &config.nodes[node];
    let mut pg = tokio_postgres::Config::new();
    pg.host(&n.host)
        .port(n.port)
        .user(&config.server.user)
        .dbname(&config.server.database)
        .application_name(application_name)
        .connect_timeout(Duration::from_millis(config.health.timeout_ms));
    if let Some(p) = &config.server.password {
        pg.password(p);
    }
    let (client, connection) = pg.connect(NoTls).await.map_err(|e| describe(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn connect(shared: &Shared, node: usize) -> Result<Client, String> {
    connect_as_router(&shared.config(), node, "dbopt-router monitor").await
}

/// Non-admin users whose server role is a superuser, as `(index, user, role)`, from the first
/// node that answers (asked with the `[server]` login); `Err` when none answers.
pub async fn superuser_mappings(
    config: &crate::config::Config,
) -> Result<Vec<(usize, String, String)>, String> {
    let roles: Vec<String> = config
        .users
        .iter()
        .filter(|u| !u.admin)
        .map(|u| u.server_role().to_string())
        .collect();
    let mut last = String::from("no nodes");
    for (i, n) in config.nodes.iter().enumerate() {
        let client = match connect_as_router(config, i, "dbopt-router --check-config").await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{}:{}: {e}", n.host, n.port);
                continue;
            }
        };
        let rows = with_timeout(
            config.health.timeout_ms,
            client.query(
                "SELECT rolname::text FROM pg_catalog.pg_roles WHERE rolsuper AND rolname = ANY($1)",
                &[&roles],
            ),
        )
        .await?;
        let supers: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        return Ok(config
            .users
            .iter()
            .enumerate()
            .filter(|(_, u)| !u.admin && supers.iter().any(|s| s == u.server_role()))
            .map(|(i, u)| (i, u.name.clone(), u.server_role().to_string()))
            .collect());
    }
    Err(last)
}

async fn with_timeout<T>(
    ms: u64,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_millis(ms), f).await {
        Ok(r) => r.map_err(|e| describe(&e)),
        Err(_) => Err(format!("no answer within {ms} ms")),
    }
}

/// An error with the server's message: tokio-postgres shows a server error as just "db error",
/// which hid *what* failed — the check for a node without the dbopt extension never matched, so
/// such a node was marked unreachable on every status check and back a moment later.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Watches `node` until the process ends.
pub async fn watch_node(shared: Arc<Shared>, node: usize) {
    let mut client: Option<Client> = None;
    let mut last_status: Option<Instant> = None;
    let mut last_catalogue: Option<Instant> = None;
    let mut has_extension = true;
    let mut has_slow_total = true;
    loop {
        let config = shared.config();
        let poll = Duration::from_millis(config.health.lsn_poll_ms);
        let timeout_ms = config.health.timeout_ms;
        if client.is_none() {
            match connect(&shared, node).await {
                Ok(c) => {
                    client = Some(c);
                    has_extension = true;
                    has_slow_total = true;
                }
                Err(e) => {
                    fail(&shared, node, format!("health connection: {e}"));
                    // Down nodes are retried once a second, not at the poll rate.
                    tokio::time::sleep(poll.max(Duration::from_secs(1))).await;
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let sent_ms = shared.now_ms();
        match with_timeout(timeout_ms, c.query_one(POLL_SQL, &[])).await {
            Ok(row) => {
                let in_recovery: bool = row.get(0);
                let lsn: Option<String> = row.get(1);
                let lsn = lsn.as_deref().and_then(parse_lsn);
                let mut t = shared.topology();
                let role = if in_recovery {
                    Role::Replica
                } else {
                    Role::Primary
                };
                let was_reachable = t.nodes[node].reachable;
                t.set_role(node, role);
                t.nodes[node].last_error = None;
                if !was_reachable {
                    log::info(&format!(
                        "node {} reachable as {}",
                        t.nodes[node].name,
                        role.name()
                    ));
                }
                match role {
                    Role::Primary => {
                        t.nodes[node].replay_lsn = None;
                        t.nodes[node].lag_s = Some(0.0);
                        if t.primary == Some(node) {
                            if let Some(l) = lsn {
                                t.lsn_history
                                    .push(crate::route::LsnSample { sent_ms, lsn: l });
                            }
                        }
                    }
                    Role::Replica => t.nodes[node].replay_lsn = lsn,
                }
            }
            Err(e) => {
                fail(&shared, node, format!("role poll: {e}"));
                client = None;
                tokio::time::sleep(poll).await;
                continue;
            }
        }

        let status_due = last_status
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(config.health.interval_s));
        if status_due {
            last_status = Some(Instant::now());
            let sql = if has_extension {
                STATUS_SQL
            } else {
                FALLBACK_STATUS_SQL
            };
            match with_timeout(timeout_ms, c.query_one(sql, &[])).await {
                Ok(row) => {
                    {
                        let mut t = shared.topology();
                        let n = &mut t.nodes[node];
                        n.lag_s = row.get::<_, Option<f64>>(0);
                        n.lag_bytes = row.get::<_, Option<f64>>(1);
                        n.cpu_percent = row.get::<_, Option<f64>>(2);
                        n.receiver_state = row.get::<_, Option<String>>(3);
                        n.last_check = Some(Instant::now());
                        // A due trial: this successful check closes the breaker.
                        t.health_check_as_trial(node);
                        t.record(node, true);
                    }
                    if has_slow_total {
                        match with_timeout(timeout_ms, c.query_one(SLOW_TOTAL_SQL, &[])).await {
                            Ok(row) => {
                                let total = row.get::<_, Option<i64>>(0);
                                shared.topology().nodes[node].slow_total =
                                    total.and_then(|v| u64::try_from(v).ok());
                            }
                            Err(e) => {
                                log::info(&format!(
                                    "node {}: no slow-statement counter ({e}); slow_statements alerts skip it",
                                    shared.node_name(node)
                                ));
                                has_slow_total = false;
                            }
                        }
                    }
                }
                Err(e) if has_extension && e.contains("dbopt") => {
                    log::warn(&format!(
                        "node {}: dbopt.node_status() unavailable ({e}); using PostgreSQL's functions (no CPU figure)",
                        shared.node_name(node)
                    ));
                    has_extension = false;
                    last_status = None;
                }
                Err(e) => {
                    fail(&shared, node, format!("health check: {e}"));
                    client = None;
                    continue;
                }
            }
        }

        if status_due && config.health.reclone_lost_replicas {
            crate::resync::check(&shared, &config, node, c, timeout_ms).await;
        }

        let is_primary = shared.topology().primary == Some(node);
        if is_primary && last_catalogue.is_none_or(|t| t.elapsed() >= CATALOGUE_EVERY) {
            last_catalogue = Some(Instant::now());
            match with_timeout(timeout_ms * 5, c.query(FUNCTIONS_SQL, &[])).await {
                Ok(rows) => {
                    let f = FunctionCatalog::from_rows(
                        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))),
                    );
                    log::info(&format!(
                        "loaded {} read-only function names from the primary",
                        f.len()
                    ));
                    shared.set_functions(f);
                }
                Err(e) => log::warn(&format!("loading the function catalogue: {e}")),
            }
        }
        tokio::time::sleep(poll).await;
    }
}

fn fail(shared: &Shared, node: usize, error: String) {
    let mut t = shared.topology();
    t.record(node, false);
    t.set_unreachable(node, error);
}
