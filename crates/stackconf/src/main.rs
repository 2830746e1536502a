//! `dbopt-stackconf`: prints one of the local stack's generated files (see the library), or a
//! router configuration derived from the stack's for a benchmark's own router.
//!
//!   dbopt-stackconf router --dir /var/tmp/dbopt-stack --port-base 25400 ... > router.toml
//!   dbopt-stackconf derive --from /var/tmp/dbopt-stack/router.toml --port 25466 --without alerts

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use dbopt_routerconf::limits::Fallback;
use dbopt_routerconf::Config;
use dbopt_stackconf::{Layout, NodeInfo, Section, StackInfo};

/// Prints the router's configuration, Patroni's alerts file or stack.json for the local stack
/// (scripts/stack runs it; every value comes from its environment), or a router configuration
/// derived from an existing one (the benchmarks' own routers). Exits 1 with the field at fault
/// when the result would not be valid.
#[derive(Parser, Debug)]
#[command(name = "dbopt-stackconf", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The router's configuration (TOML).
    Router(StackArgs),
    /// [listen] and [alerts] for Patroni's on_role_change callback (TOML).
    PatroniAlerts(StackArgs),
    /// The stack's layout for tests and tools (JSON).
    StackJson(StackArgs),
    /// A router configuration derived from FILE, for a router process of its own: clients on
    /// 127.0.0.1:PORT, admin endpoint on PORT+1, sections left out, TOML merged in (TOML).
    Derive(DeriveArgs),
}

#[derive(Args, Debug)]
struct DeriveArgs {
    /// The configuration to start from (e.g. the stack's router.toml); it is only read.
    #[arg(long)]
    from: PathBuf,
    /// Port for clients (the admin endpoint takes the next one).
    #[arg(long)]
    port: u16,
    /// A section to turn off; repeat.
    #[arg(long, value_enum)]
    without: Vec<SectionArg>,
    /// TOML merged in: keys replace (`[pool]` `max_size = 20`), arrays of tables append
    /// (`[[cache.rules]]`).
    #[arg(long, default_value = "")]
    extra: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SectionArg {
    Cache,
    Alerts,
    Limits,
}

#[derive(Args, Debug)]
struct StackArgs {
    #[arg(long)]
    dir: String,
    #[arg(long)]
    port_base: u16,
    /// A node as NAME:PORT:REST_PORT[:UPSTREAM] (UPSTREAM for a cascading replica); repeat.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    #[arg(long)]
    etcd_port: u16,
    #[arg(long)]
    redis_port: u16,
    #[arg(long)]
    router_port: u16,
    #[arg(long)]
    pg_password: String,
    #[arg(long)]
    app_password: String,
    #[arg(long)]
    admin_token: String,
    /// Patroni's scope (the alerts' cluster label).
    #[arg(long)]
    scope: String,
    #[arg(long, default_value_t = 4)]
    pool_min: u32,
    #[arg(long, default_value_t = 50)]
    pool_max: u32,
    #[arg(long, default_value_t = 2)]
    health_s: u64,
    #[arg(long, default_value_t = 30)]
    reclone_after_s: u64,
    #[arg(long, default_value_t = 64 << 20)]
    cache_local_bytes: u64,
    #[arg(long, value_enum, default_value_t = FallbackArg::Local)]
    limits_fallback: FallbackArg,
    #[arg(long, default_value_t = 1)]
    limits_routers: u32,
    #[arg(long, default_value_t = 1000)]
    alerts_interval_ms: u64,
    /// TOML added to the configuration (DBOPT_ROUTER_EXTRA).
    #[arg(long, default_value = "")]
    router_extra: String,
    /// TOML added to [alerts] (DBOPT_ALERTS_EXTRA).
    #[arg(long, default_value = "")]
    alerts_extra: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FallbackArg {
    Local,
    Open,
    Closed,
}

fn node(spec: &str) -> Result<NodeInfo, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let bad = || format!("--node {spec:?}: expected NAME:PORT:REST_PORT[:UPSTREAM]");
    if !(3..=4).contains(&parts.len()) || parts[0].is_empty() {
        return Err(bad());
    }
    Ok(NodeInfo {
        name: parts[0].to_string(),
        port: parts[1].parse().map_err(|_| bad())?,
        rest_port: parts[2].parse().map_err(|_| bad())?,
        replicate_from: parts.get(3).map_or(String::new(), |s| (*s).to_string()),
    })
}

fn run(cli: Cli) -> Result<String, String> {
    match cli.command {
        Command::Router(a) => {
            let layout = layout(a)?;
            let c = dbopt_stackconf::router_config(&layout)?;
            let text = toml::to_string_pretty(&c).map_err(|e| e.to_string())?;
            Ok(format!(
                "# Written by scripts/stack (dbopt-stackconf) for the local stack in {}.\n{text}",
                layout.info.dir
            ))
        }
        Command::PatroniAlerts(a) => Ok(format!(
            "# Written by scripts/stack: read by dbopt-router on-role-change (Patroni callback).\n{}",
            dbopt_stackconf::patroni_alerts(&layout(a)?)?
        )),
        Command::StackJson(a) => {
            serde_json::to_string_pretty(&layout(a)?.info).map_err(|e| e.to_string())
        }
        Command::Derive(d) => {
            let text = std::fs::read_to_string(&d.from)
                .map_err(|e| format!("--from {}: {e}", d.from.display()))?;
            let base =
                Config::parse(&text).map_err(|e| format!("--from {}: {e}", d.from.display()))?;
            let without: Vec<Section> = d
                .without
                .iter()
                .map(|s| match s {
                    SectionArg::Cache => Section::Cache,
                    SectionArg::Alerts => Section::Alerts,
                    SectionArg::Limits => Section::Limits,
                })
                .collect();
            let c = dbopt_stackconf::derive(&base, d.port, &without, &d.extra)?;
            let text = toml::to_string_pretty(&c).map_err(|e| e.to_string())?;
            Ok(format!(
                "# Derived from {} by dbopt-stackconf derive.\n{text}",
                d.from.display()
            ))
        }
    }
}

fn layout(cli: StackArgs) -> Result<Layout, String> {
    Ok(Layout {
        info: StackInfo {
            dir: cli.dir,
            port_base: cli.port_base,
            pg_password: cli.pg_password,
            nodes: cli
                .nodes
                .iter()
                .map(|s| node(s))
                .collect::<Result<_, _>>()?,
            etcd_port: cli.etcd_port,
            redis_port: cli.redis_port,
            router_port: cli.router_port,
            router_admin_port: cli
                .router_port
                .checked_add(1)
                .ok_or("--router-port: no room for the admin port above it")?,
            app_password: cli.app_password,
        },
        scope: cli.scope,
        admin_token: cli.admin_token,
        pool_min: cli.pool_min,
        pool_max: cli.pool_max,
        health_interval_s: cli.health_s,
        reclone_after_s: cli.reclone_after_s,
        cache_local_bytes: cli.cache_local_bytes,
        limits_fallback: match cli.limits_fallback {
            FallbackArg::Local => Fallback::Local,
            FallbackArg::Open => Fallback::Open,
            FallbackArg::Closed => Fallback::Closed,
        },
        limits_routers: cli.limits_routers,
        alerts_interval_ms: cli.alerts_interval_ms,
        alerts_extra: cli.alerts_extra,
        router_extra: cli.router_extra,
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dbopt-stackconf: {e}");
            ExitCode::FAILURE
        }
    }
}
