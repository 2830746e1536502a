//! `dbopt-router` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dbopt_router::config::Config;

/// dbopt-router: a PostgreSQL wire-protocol router — pooling, read/write split, replica
/// balancing, health checks and circuit breaking in front of a primary and its replicas.
///
/// This build validates configuration files; the proxy itself is not part of it yet.
#[derive(Parser, Debug)]
#[command(name = "dbopt-router", version, after_help = EXAMPLES)]
struct Cli {
    /// Path of the TOML configuration file.
    #[arg(short, long, value_name = "FILE", default_value = "dbopt-router.toml")]
    config: PathBuf,

    /// Parse and validate the configuration, print the effective settings (defaults filled in)
    /// and exit: 0 when valid, 1 with a message naming the bad field otherwise.
    #[arg(long)]
    check_config: bool,
}

const EXAMPLES: &str = "Examples:
  dbopt-router --config router/dbopt-router.example.toml --check-config";

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
        eprintln!(
            "dbopt-router: configuration {} is valid, but this build has no proxy yet; \
             only --check-config is available",
            cli.config.display()
        );
        ExitCode::from(2)
    }
}
