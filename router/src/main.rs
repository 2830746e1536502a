//! `dbopt-router` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dbopt_router::config::Config;

/// dbopt-router: a PostgreSQL wire-protocol router — pooling, read/write split, replica
/// balancing, health checks and circuit breaking in front of a primary and its replicas.
///
/// Applications connect to it as to PostgreSQL. Reads outside transactions go to replicas (by
/// weight, CPU and response time; never to one lagging more than health.max_replica_lag_s or
/// behind the client's own last write); everything else goes to the primary. Each user runs as its
/// own PostgreSQL role (only `admin = true` users may be superusers), and nothing one client sets in
/// a server session (settings, roles, locks, LISTEN, temporary tables) reaches another. Results
/// may be cached ([cache]) and statements rate-limited ([limits]: per user, per end user named by
/// a /*dbopt_user='42'*/ comment, globally, per database or node; over a limit a client gets
/// SQLSTATE 53400 with the wait in DETAIL). Alerts ([alerts]: failover, replica lag, nodes,
/// breakers, pools, errors, slow statements, cache invalidation, rate limits) go to webhooks
/// (Alertmanager's format), Slack, mail, the log and dbopt.alert_history; a replica that can no
/// longer catch up is re-cloned through Patroni (health.reclone_lost_replicas). SIGHUP reloads the
/// configuration; SIGTERM drains clients and exits. On listen.admin_address: GET /dashboard (a
/// page), /metrics (Prometheus), /status, /alerts and /statements (JSON).
#[derive(Parser, Debug)]
#[command(name = "dbopt-router", version, after_help = EXAMPLES)]
struct Cli {
    /// Path of the TOML configuration file.
    #[arg(short, long, value_name = "FILE", default_value = "dbopt-router.toml")]
    config: PathBuf,

    /// Parse and validate the configuration, ask the first node that answers whether a non-admin
    /// user would run as a superuser, print the effective settings (defaults filled in) and exit:
    /// 0 when valid, 1 with a message naming the bad field otherwise.
    #[arg(long)]
    check_config: bool,

    /// Worker threads (default: half the CPUs, at least 1 — the router shares the machine with
    /// the servers or the application; 1 thread runs everything on one event loop, as PgBouncer).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Log warnings and errors only.
    #[arg(short, long)]
    quiet: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Patroni's on_role_change callback: on a promotion, send "primary changed" through the
    /// [alerts] channels of --config — unless a router answers on its listen.admin_address
    /// (it reports failovers itself). Reads only [alerts] and [listen] of the file. Patroni
    /// appends ACTION ROLE CLUSTER: in its configuration write
    /// `callbacks: {on_role_change: "dbopt-router --config /etc/dbopt/alerts.toml on-role-change --node node1"}`.
    OnRoleChange {
        /// This node's name (what the alert reports as the new primary).
        #[arg(long)]
        node: String,
        /// A connection string to this node for channels of kind notify
        /// (e.g. "host=/run/postgresql port=5432 user=postgres dbname=postgres").
        #[arg(long)]
        pg: Option<String>,
        /// What Patroni did (on_role_change; others are ignored).
        action: String,
        /// The node's new role (master/primary: a promotion; others are ignored).
        role: String,
        /// Patroni's scope.
        cluster: String,
    },
}

fn on_role_change(config: &std::path::Path, command: Command) -> ExitCode {
    let Command::OnRoleChange {
        node,
        pg,
        action,
        role,
        cluster,
    } = command;
    let config_text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "dbopt-router on-role-change: cannot read {}: {e}",
                config.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dbopt-router on-role-change: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args = dbopt_router::alerts::role_change::Args {
        config_text,
        node,
        action,
        role,
        cluster,
        pg,
    };
    use dbopt_router::alerts::role_change::Outcome;
    match runtime.block_on(dbopt_router::alerts::role_change::run(args)) {
        Ok(Outcome::NotAPromotion) => ExitCode::SUCCESS,
        Ok(Outcome::RouterReports(at)) => {
            dbopt_router::log::info(&format!(
                "on-role-change: the router at {at} answers and reports the failover itself"
            ));
            ExitCode::SUCCESS
        }
        Ok(Outcome::Sent { channels, failed }) if failed.is_empty() => {
            dbopt_router::log::info(&format!(
                "on-role-change: primary change sent through {channels} channel(s)"
            ));
            ExitCode::SUCCESS
        }
        Ok(Outcome::Sent { channels, failed }) => {
            dbopt_router::log::error(&format!(
                "on-role-change: {} of {channels} channel(s) failed: {}",
                failed.len(),
                failed.join("; ")
            ));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("dbopt-router on-role-change: {}: {e}", config.display());
            ExitCode::FAILURE
        }
    }
}

const EXAMPLES: &str = "Examples:
  dbopt-router --config router/dbopt-router.example.toml --check-config
  dbopt-router --config router/dbopt-router.example.toml
  psql 'host=127.0.0.1 port=25450 user=app password=app-secret dbname=postgres'
  psql 'host=127.0.0.1 port=25450 user=app password=app-secret dbname=postgres sslmode=require'
  curl -s http://127.0.0.1:25451/status
  curl -s http://127.0.0.1:25451/alerts
  chromium http://127.0.0.1:25451/dashboard";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        return on_role_change(&cli.config, command);
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "dbopt-router: invalid configuration {}: {e}",
                cli.config.display()
            );
            return ExitCode::FAILURE;
        }
    };
    if cli.check_config {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dbopt-router: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(dbopt_router::monitor::superuser_mappings(&config)) {
            Ok(bad) if !bad.is_empty() => {
                for (i, user, role) in bad {
                    eprintln!(
                        "dbopt-router: invalid configuration {}: users[{i}].server_user: user {user:?} \
                         would run as {role:?}, a superuser: map it to a least-privileged role, or \
                         set admin = true",
                        cli.config.display()
                    );
                }
                return ExitCode::FAILURE;
            }
            Ok(_) => {}
            Err(e) => eprintln!(
                "dbopt-router: note: could not ask the nodes which roles are superusers ({e}); \
                 the router refuses such logins for non-admin users when it runs"
            ),
        }
        match toml::to_string_pretty(&config.effective()) {
            Ok(text) => {
                println!(
                    "# {}: valid; effective configuration:\n{text}",
                    cli.config.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dbopt-router: cannot print the configuration: {e}");
                ExitCode::FAILURE
            }
        }
    } else {
        dbopt_router::log::set_quiet(cli.quiet);
        let threads = cli.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        });
        let built = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
        };
        let runtime = match built {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dbopt-router: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(dbopt_router::run::run(config, cli.config.clone())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dbopt-router: {e}");
                ExitCode::FAILURE
            }
        }
    }
}
