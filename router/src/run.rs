//! The running router: listeners, the node watchers, pool maintenance, signals.
//!
//! SIGHUP re-reads the configuration file and applies users, pool sizes, weights and thresholds
//! without dropping anyone (listen addresses, nodes and the server login need a restart).
//! SIGTERM/SIGINT stop accepting, let clients finish their current transaction (each is told
//! 57P01 when it is idle) and exit when the last one left or after `drain_s` seconds.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::config::Config;
use crate::log;
use crate::session::Session;
use crate::shared::{reload_problem, Counters, Shared};

/// Seconds a shutdown waits for clients before exiting anyway.
pub const DRAIN_S: u64 = 30;
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);

pub async fn run(config: Config, path: PathBuf) -> std::io::Result<()> {
    let listener = TcpListener::bind(&config.listen.address).await?;
    let admin = match &config.listen.admin_address {
        Some(a) => Some(TcpListener::bind(a).await?),
        None => None,
    };
    let tls = match &config.listen.tls {
        Some(t) => Some(
            crate::tls::acceptor(t)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        ),
        None => None,
    };
    let shared = Shared::new(config.clone(), tls);
    // Pools open when their first client comes (one per node, database and role).
    for node in 0..config.nodes.len() {
        tokio::spawn(crate::monitor::watch_node(shared.clone(), node));
    }
    if let Some(l) = admin {
        tokio::spawn(crate::admin::serve(shared.clone(), l));
    }
    tokio::spawn(crate::alerts::run(shared.clone()));
    if let Some(cache) = &shared.cache {
        // One invalidation feed per database clients may use.
        let databases = if config.databases.is_empty() {
            vec![config.server.database.clone()]
        } else {
            config.databases.clone()
        };
        for db in databases {
            tokio::spawn(crate::cache::listener::run(
                shared.clone(),
                cache.clone(),
                db,
            ));
        }
        // Warm statements are registered before any listener resynchronises (which queues them).
        if let Some(r) = &cache.refresher {
            for spec in crate::cache::refresh::warm_specs(&shared) {
                r.register(spec);
            }
        }
        let queue = crate::locks::lock(&cache.refresh_queue).take();
        if let Some(rx) = queue {
            tokio::spawn(crate::cache::refresh::run(
                shared.clone(),
                cache.clone(),
                rx,
            ));
        }
    }
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            // Let the watchers find the roles before the first warm-up.
            tokio::time::sleep(Duration::from_millis(300)).await;
            loop {
                shared.maintain_pools().await;
                tokio::time::sleep(MAINTENANCE_EVERY).await;
            }
        });
    }
    log::info(&format!(
        "dbopt-router {} listening on {}{}",
        env!("CARGO_PKG_VERSION"),
        config.listen.address,
        config
            .listen
            .admin_address
            .as_ref()
            .map(|a| format!(", admin on http://{a}/metrics"))
            .unwrap_or_default()
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let c = &shared.counters;
                Counters::inc(&c.clients_total);
                // Connections still starting up have a budget of their own (crate::handshake).
                let (handshake, displaced) = shared.handshakes.admit();
                if displaced {
                    Counters::inc(&c.handshake_evictions);
                }
                c.clients_active.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let stop = stop_rx.clone();
                tokio::spawn(async move {
                    // Counts the client out even if its task panics.
                    let _active = Active(shared.clone());
                    Session::new(shared.clone(), stream, peer, stop).run(handshake).await;
                });
            }
            _ = hup.recv() => reload(&shared, &path),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    drop(listener);
    shared.shutting_down.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let clients = shared.counters.clients_active.load(Ordering::Relaxed);
    log::info(&format!(
        "shutting down: no new clients; draining {clients} client(s) for up to {DRAIN_S} s"
    ));
    let deadline = Instant::now() + Duration::from_secs(DRAIN_S);
    while shared.counters.clients_active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log::info(&format!(
        "stopped with {} client(s) left",
        shared.counters.clients_active.load(Ordering::Relaxed)
    ));
    Ok(())
}

/// One open client connection, in `clients_active` while it lives.
struct Active(Arc<Shared>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0
            .counters
            .clients_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

fn reload(shared: &Arc<Shared>, path: &std::path::Path) {
    match Config::load(path) {
        Err(e) => log::error(&format!("SIGHUP: keeping the running configuration: {e}")),
        Ok(new) => {
            if let Some(problem) = reload_problem(&shared.config(), &new) {
                log::error(&format!(
                    "SIGHUP: keeping the running configuration: {problem}"
                ));
            } else {
                shared.alerts.reconfigure(shared, &new);
                shared.reload(new);
                log::info(&format!(
                    "SIGHUP: configuration reloaded from {}",
                    path.display()
                ));
            }
        }
    }
}
