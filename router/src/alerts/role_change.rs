//! `dbopt-router on-role-change`: Patroni's `on_role_change` callback. Patroni runs
//! `<command> on_role_change <role> <cluster>` on a node whose role changed; on a promotion this
//! reports "primary changed" through the `[alerts]` channels — unless a router answers on its
//! admin endpoint, which reports failovers itself (so receivers get the alert once).

use std::time::Duration;

use serde::Deserialize;

use super::deliver::{deliver, Primary};
use super::engine::{fingerprint, Notification, Status};
use super::settings::{AlertKind, AlertSettings};
use crate::log;

/// The parts of a configuration file the callback reads: `[alerts]`, and `[listen]` to find the
/// router (a full router configuration works, or a file with just these sections).
#[derive(Debug, Deserialize)]
struct CallbackFile {
    #[serde(default)]
    alerts: AlertSettings,
    listen: Option<ListenPart>,
}

#[derive(Debug, Deserialize)]
struct ListenPart {
    address: Option<String>,
    admin_address: Option<String>,
    admin_read_token: Option<String>,
}

pub struct Args {
    pub config_text: String,
    pub node: String,
    pub action: String,
    pub role: String,
    pub cluster: String,
    /// A connection string for notify channels (`host=/run/postgresql port=5432 user=postgres`).
    pub pg: Option<String>,
}

/// What happened, for the exit message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    NotAPromotion,
    RouterReports(String),
    Sent {
        channels: usize,
        failed: Vec<String>,
    },
}

pub async fn run(a: Args) -> Result<Outcome, String> {
    let file: CallbackFile =
        toml::from_str(&a.config_text).map_err(|e| e.to_string().trim_end().to_string())?;
    file.alerts.validate().map_err(|e| e.to_string())?;
    let settings = file.alerts;
    if a.action != "on_role_change" || !matches!(a.role.as_str(), "master" | "primary" | "promoted")
    {
        return Ok(Outcome::NotAPromotion);
    }
    for (what, v) in [("--node", &a.node), ("cluster", &a.cluster)] {
        if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
            return Err(format!(
                "{what}: 1 to 128 characters without control characters"
            ));
        }
    }
    let pg_config = match &a.pg {
        Some(s) => Some(
            s.parse::<tokio_postgres::Config>()
                .map_err(|e| format!("--pg: {e}"))?,
        ),
        None => None,
    };
    if let Some(c) = &pg_config {
        if !new_timeline(c).await {
            return Ok(Outcome::NotAPromotion);
        }
    }
    let listen = file.listen;
    if let Some(admin) = listen.as_ref().and_then(|l| l.admin_address.clone()) {
        let token = listen.as_ref().and_then(|l| l.admin_read_token.clone());
        if router_answers(&admin, token.as_deref()).await {
            return Ok(Outcome::RouterReports(admin));
        }
    }
    let effective = settings.effective(AlertKind::PrimaryChanged);
    if !effective.enabled || effective.channels.is_empty() {
        return Ok(Outcome::Sent {
            channels: 0,
            failed: Vec::new(),
        });
    }
    let now = super::wall_ms();
    let mut labels: std::collections::BTreeMap<String, String> =
        [("new_primary".to_string(), a.node.clone())].into();
    let fp = fingerprint(AlertKind::PrimaryChanged, &settings.cluster, &labels);
    labels.insert(
        "alertname".into(),
        AlertKind::PrimaryChanged.alertname().into(),
    );
    labels.insert("cluster".into(), settings.cluster.clone());
    labels.insert("severity".into(), effective.severity.name().into());
    let n = Notification {
        fingerprint: fp,
        kind: AlertKind::PrimaryChanged,
        status: Status::Firing,
        severity: effective.severity,
        labels,
        summary: format!(
            "Patroni promoted {} to primary of {} (reported by Patroni's callback: no router answered{})",
            a.node,
            a.cluster,
            listen
                .as_ref()
                .and_then(|l| l.address.as_deref())
                .map(|x| format!(" at {x}"))
                .unwrap_or_default()
        ),
        value: 0.0,
        starts_at_ms: now,
        ends_at_ms: None,
        sent_at_ms: now,
        repeat: false,
    };
    let external = settings.external_url.clone().unwrap_or_default();
    let source = format!("patroni {}", a.node);
    let mut failed = Vec::new();
    for i in &effective.channels {
        let c = &settings.channels[*i];
        let mut pg = None;
        if let Err(e) = attempt(
            &Primary::Direct(pg_config.as_ref()),
            c,
            &source,
            &n,
            &external,
            &mut pg,
        )
        .await
        {
            failed.push(format!("{}: {e}", c.name));
        }
    }
    Ok(Outcome::Sent {
        channels: effective.channels.len(),
        failed,
    })
}

/// A few quick tries (Patroni kills a callback that a newer role change replaces; a promotion's
/// alert should not wait minutes anyway).
async fn attempt(
    primary: &Primary<'_>,
    c: &super::settings::Channel,
    source: &str,
    n: &Notification,
    external: &str,
    pg: &mut Option<(u64, tokio_postgres::Client)>,
) -> Result<(), String> {
    let mut last = String::new();
    for i in 0..3u32 {
        match deliver(primary, c, source, n, external, pg).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                log::warn(&format!(
                    "on-role-change: channel {:?} failed (attempt {} of 3): {e}",
                    c.name,
                    i + 1
                ));
                last = e.to_string();
                tokio::time::sleep(Duration::from_secs(1 << i)).await;
            }
        }
    }
    Err(last)
}

/// Whether this node switched to a new timeline in the last two minutes (a promotion writes
/// its `.history` file): Patroni also reports `on_role_change master` when a primary is restarted
/// in place, which is no failover. When the node cannot be asked, it counts as a promotion (an
/// alert too many rather than a failover unreported).
async fn new_timeline(config: &tokio_postgres::Config) -> bool {
    let ask = async {
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let row = client
            .query_one(
                "SELECT coalesce((SELECT max(modification) FROM pg_ls_waldir() \
                 WHERE name ~ '^[0-9A-F]{8}\\.history$') > now() - interval '120 seconds', false)",
                &[],
            )
            .await
            .ok()?;
        Some(row.get::<_, bool>(0))
    };
    match tokio::time::timeout(Duration::from_secs(5), ask).await {
        Ok(Some(fresh)) => {
            if !fresh {
                log::info("on-role-change: no new timeline: a restart in place, not a failover");
            }
            fresh
        }
        _ => true,
    }
}

/// Whether a router answers `GET /status` on its admin address within 2 s.
async fn router_answers(admin: &str, token: Option<&str>) -> bool {
    let Ok(target) = super::http_post::Target::parse(&format!("http://{admin}/status")) else {
        return false;
    };
    let get = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .ok()?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req =
            format!("GET /status HTTP/1.1\r\nHost: {admin}\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), get).await,
        Ok(Some(true))
    )
}
