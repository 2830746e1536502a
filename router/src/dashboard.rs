//! The dashboard: `GET /dashboard` serves one self-contained page (no CDN, no build step; it polls
//! `/status`, `/alerts` and `/statements` every 2 s, sending the read token the user typed when the
//! endpoint needs one — the page itself holds no data). `GET /statements` gathers the top
//! statements by total time and the latest slow statements from every reachable node
//! (`dbopt.query_stats`, `dbopt.slow_queries()`), at most once per [`FRESH_FOR`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::shared::Shared;

pub const PAGE: &str = include_str!("dashboard.html");

/// A gathered answer is served again for this long (several open dashboards cost one round).
pub const FRESH_FOR: Duration = Duration::from_secs(5);

/// One row per statement text (its entries of every user and database, and of tables dropped and
/// created again, summed; p95: the highest of them).
const TOP_SQL: &str = "SELECT query, sum(calls)::int8, sum(total_exec_time), \
     sum(total_exec_time) / greatest(sum(calls), 1), max(p95_exec_time), sum(rows)::int8 \
     FROM dbopt.query_stats WHERE toplevel GROUP BY query \
     ORDER BY sum(total_exec_time) DESC LIMIT 10";

const SLOW_SQL: &str = "SELECT captured_at::text, duration_ms, username, query \
     FROM dbopt.slow_queries() ORDER BY captured_at DESC NULLS LAST LIMIT 10";

#[derive(Default)]
pub struct Statements {
    last: Mutex<Option<(Instant, Value)>>,
}

impl Statements {
    pub async fn get(&self, shared: &Shared) -> Value {
        if let Some((at, v)) = &*crate::locks::lock(&self.last) {
            if at.elapsed() < FRESH_FOR {
                return v.clone();
            }
        }
        let v = gather(shared).await;
        *crate::locks::lock(&self.last) = Some((Instant::now(), v.clone()));
        v
    }
}

async fn gather(shared: &Shared) -> Value {
    let config = shared.config();
    let nodes: Vec<(usize, String, bool)> = {
        let t = shared.topology();
        t.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (i, n.name.clone(), n.reachable))
            .collect()
    };
    let limit = Duration::from_millis(config.health.timeout_ms);
    let mut out = Vec::new();
    for (i, name, reachable) in nodes {
        if !reachable {
            continue;
        }
        let one = async {
            let c = crate::monitor::connect_as_router(&config, i, "dbopt-router dashboard").await?;
            let top = c.query(TOP_SQL, &[]).await.map_err(|e| db_error(&e))?;
            let slow = c.query(SLOW_SQL, &[]).await.map_err(|e| db_error(&e))?;
            Ok::<_, String>((top, slow))
        };
        let entry = match tokio::time::timeout(limit * 2, one).await {
            Ok(Ok((top, slow))) => json!({
                "node": name,
                "top": top.iter().map(|r| json!({
                    "query": r.get::<_, String>(0),
                    "calls": r.get::<_, i64>(1),
                    "total_ms": r.get::<_, f64>(2),
                    "mean_ms": r.get::<_, f64>(3),
                    "p95_ms": r.get::<_, Option<f64>>(4),
                    "rows": r.get::<_, i64>(5),
                })).collect::<Vec<_>>(),
                "slow": slow.iter().map(|r| json!({
                    "captured_at": r.get::<_, Option<String>>(0),
                    "duration_ms": r.get::<_, f64>(1),
                    "username": r.get::<_, String>(2),
                    "query": r.get::<_, String>(3),
                })).collect::<Vec<_>>(),
            }),
            Ok(Err(e)) => json!({"node": name, "top": [], "slow": [], "error": e}),
            Err(_) => json!({"node": name, "top": [], "slow": [], "error": "timed out"}),
        };
        out.push(entry);
    }
    json!({ "nodes": out })
}

fn db_error(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}
