//! `dbopt-router` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
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
/// SQLSTATE 53400 with the wait in DETAIL). SIGHUP reloads the configuration; SIGTERM drains
/// clients and exits. Metrics: GET /metrics and /status on listen.admin_address.
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
}

const EXAMPLES: &str = "Examples:
  dbopt-router --config router/dbopt-router.example.toml --check-config
  dbopt-router --config router/dbopt-router.example.toml
  psql 'host=127.0.0.1 port=25450 user=app password=app-secret dbname=postgres'
  psql 'host=127.0.0.1 port=25450 user=app password=app-secret dbname=postgres sslmode=require'
  curl -s http://127.0.0.1:25451/status";

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        match toml::to_string_pretty(&config) {
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
