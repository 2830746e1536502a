//! `dbopt-migrate` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dbopt_migrate::{connect, ddl_log, files, keep, lint, run, status, validate};

/// dbopt-migrate: versioned PostgreSQL schema migrations (Flyway's V<version>__<name>.sql files),
/// each applied in a transaction under an advisory lock, recorded in dbopt_migrate.history with a
/// rollback script generated from catalog snapshots before and after it (no hand-written undo).
#[derive(Parser, Debug)]
#[command(name = "dbopt-migrate", version, after_help = EXAMPLES)]
struct Cli {
    /// The database (postgresql:// URL or key=value string; sslmode disable | prefer | require |
    /// verify-ca | verify-full and sslrootcert as in libpq); default: $DATABASE_URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    url: String,
    /// The migrations directory.
    #[arg(long, default_value = "migrations")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the next migration file (V<n>__<name>.sql) in --dir.
    New { name: String },
    /// Applied, pending, changed-since-applied and missing migrations.
    Status,
    /// Apply every pending migration (one transaction each; a failure leaves the schema and the
    /// history as they were and names the file, line and column).
    Apply {
        /// All pending migrations in one transaction.
        #[arg(long)]
        single_transaction: bool,
        /// Apply even though `validate` did not pass these migrations on the current schema.
        #[arg(long)]
        no_validate: bool,
        /// Give up on a lock after this long instead of queueing traffic behind it.
        #[arg(long, default_value_t = 5000)]
        lock_timeout_ms: u64,
    },
    /// Run the stored rollback scripts of every version after VERSION (0: all), newest first, in
    /// one transaction.
    Rollback {
        #[arg(long)]
        to: String,
    },
    /// Every apply and rollback, oldest first; then the newest schema changes made outside
    /// migrations (with the dbopt extension installed: dbopt.ddl_history).
    History,
    /// Drop the copies of data that migrations dropped (kept so that their rollback restores
    /// it); their rollbacks then re-create the tables and columns empty.
    Purge {
        /// Only the copies of this version.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        version: Option<String>,
        /// Every copy.
        #[arg(long)]
        all: bool,
    },
    /// Apply every pending migration on a throwaway staging database with the production schema,
    /// run its generated rollback and compare, apply it again and compare; record the result so
    /// that `apply` accepts these migrations on this schema.
    Validate {
        /// The staging server (its database is only used to create and drop the throwaway one);
        /// default: the production server.
        #[arg(long)]
        staging_url: Option<String>,
    },
    /// Flag what pending migrations do to live tables (rewrites, long locks) with the reason and
    /// the safer way; table sizes are the database's estimates. Exit 1 when anything is flagged.
    Lint {
        /// Index builds and constraint validations are flagged on tables from this many rows.
        #[arg(long, default_value_t = 100_000.0)]
        big_rows: f64,
    },
}

const EXAMPLES: &str = "Examples:
  # the local stack's primary, whichever node it is now (port 25400 is only the first one)
  export DATABASE_URL='postgresql://postgres@127.0.0.1:25400,127.0.0.1:25401,127.0.0.1:25402,127.0.0.1:25403/postgres?target_session_attrs=read-write'
  dbopt-migrate --dir migrations new add_users
  dbopt-migrate --dir migrations status
  dbopt-migrate --dir migrations lint
  dbopt-migrate --dir migrations validate
  dbopt-migrate --dir migrations apply
  dbopt-migrate --dir migrations rollback --to 3
  dbopt-migrate history
  dbopt-migrate purge --version 4";

/// Ad-hoc schema changes `history` lists.
const HISTORY_DDL_ROWS: i64 = 20;

fn read_dir(dir: &Path) -> Result<Vec<files::Migration>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".sql") {
            continue;
        }
        let text = std::fs::read_to_string(e.path())
            .map_err(|x| format!("{}: {x}", e.path().display()))?;
        out.push((name, text));
    }
    files::ordered(out)
}

fn connect(url: &str) -> Result<postgres::Client, String> {
    connect::Target::parse(url, "--url")?
        .connect()
        .map_err(|e| format!("cannot connect: {e}"))
}

/// The pending migrations (the history created when missing); changed or out-of-order files are
/// an error.
fn pending<'a>(
    c: &mut postgres::Client,
    files: &'a [files::Migration],
) -> Result<Vec<&'a files::Migration>, String> {
    run::ensure_history(c)?;
    let done = run::applied(c)?;
    status::pending(files, &done)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_cli(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dbopt-migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_cli(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::New { name } => {
            std::fs::create_dir_all(&cli.dir).map_err(|e| format!("{}: {e}", cli.dir.display()))?;
            let existing = read_dir(&cli.dir)?;
            let file = files::next_file_name(existing.last().map(|m| &m.version), &name)?;
            let path = cli.dir.join(&file);
            std::fs::write(&path, format!("-- {file}: {name}\n"))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            println!("{}", path.display());
        }
        Command::Status => {
            let files = read_dir(&cli.dir)?;
            let mut c = connect(&cli.url)?;
            run::ensure_history(&mut c)?;
            let done = run::applied(&mut c)?;
            println!("{:<10} {:<22} name", "version", "state");
            for r in status::status(&files, &done) {
                println!("{:<10} {:<22} {}", r.version, r.state.name(), r.name);
            }
            if let ddl_log::Record::Changes {
                since_last_migration: n,
                ..
            } = ddl_log::outside_migrations(&mut c, 0)?
            {
                if n > 0 {
                    println!(
                        "\n{n} schema change(s) outside migrations since the last one ran \
                         (dbopt.ddl_history; `dbopt-migrate history` lists them)"
                    );
                }
            }
        }
        Command::Apply {
            single_transaction,
            no_validate,
            lock_timeout_ms,
        } => {
            let files = read_dir(&cli.dir)?;
            let mut c = connect(&cli.url)?;
            if !no_validate {
                let todo = pending(&mut c, &files)?;
                if !todo.is_empty() && !validate::validated(&mut c, &todo)? {
                    return Err(
                        "these pending migrations were not validated against the current schema: run \
                         `dbopt-migrate validate` first (or apply --no-validate)"
                            .into(),
                    );
                }
            }
            let o = run::Options {
                lock_timeout_ms,
                single_transaction,
            };
            let reports = run::apply(&mut c, &files, &o)?;
            if reports.is_empty() {
                println!("nothing to apply");
            }
            for r in reports {
                println!(
                    "applied V{} ({}) in {:.1} ms; rollback: {} statement(s){}",
                    r.version,
                    r.name,
                    r.duration_ms,
                    r.rollback_statements,
                    r.notes
                        .iter()
                        .map(|n| format!("\n  note: {n}"))
                        .collect::<String>()
                );
            }
        }
        Command::Rollback { to } => {
            let mut c = connect(&cli.url)?;
            let undone = run::rollback(&mut c, &to)?;
            if undone.is_empty() {
                println!("nothing to roll back after V{to}");
            }
            for u in undone {
                println!("rolled back {u}");
            }
        }
        Command::Purge { version, all: _ } => {
            let mut c = connect(&cli.url)?;
            let purged = keep::purge(&mut c, version.as_deref())?;
            if purged.is_empty() {
                println!("nothing kept");
            }
            for k in purged {
                println!(
                    "purged V{}: {} ({} rows, kept {})",
                    k.version, k.object, k.rows, k.kept_at
                );
            }
        }
        Command::Lint { big_rows } => {
            let files = read_dir(&cli.dir)?;
            let mut c = connect(&cli.url)?;
            let todo = pending(&mut c, &files)?;
            let mut rows = std::collections::HashMap::new();
            for r in c
                .query(
                    "SELECT n.nspname::text, c.relname::text, c.reltuples::float8 FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')",
                    &[],
                )
                .map_err(|e| e.to_string())?
            {
                let (schema, table, n): (String, String, f64) = (r.get(0), r.get(1), r.get(2));
                if schema == "public" {
                    rows.insert(table.clone(), n.max(0.0));
                }
                rows.insert(format!("{schema}.{table}"), n.max(0.0));
            }
            let mut flagged = 0;
            for m in todo {
                for f in lint::lint(&m.sql, &rows, big_rows)
                    .map_err(|e| format!("{}: {e}", m.file_name))?
                {
                    flagged += 1;
                    println!(
                        "{} statement {}: {} ({})\n  {}",
                        m.file_name, f.statement, f.rule, f.table, f.reason
                    );
                }
            }
            if flagged > 0 {
                return Err(format!("{flagged} statement(s) flagged"));
            }
            println!("nothing flagged");
        }
        Command::Validate { staging_url } => {
            let files = read_dir(&cli.dir)?;
            let mut c = connect(&cli.url)?;
            let todo = pending(&mut c, &files)?;
            if todo.is_empty() {
                println!("nothing pending");
                return Ok(());
            }
            let staging_target = match &staging_url {
                Some(u) => connect::Target::parse(u, "--staging-url")?,
                None => connect::Target::parse(&cli.url, "--url")?,
            };
            let mut staging = staging_target
                .connect()
                .map_err(|e| format!("staging server unreachable: {e}"))?;
            let db = format!("dbopt_validate_{}", std::process::id());
            for line in validate::validate(&mut c, &mut staging, &staging_target, &db, &todo)? {
                println!("{line}");
            }
            println!(
                "validated: `dbopt-migrate apply` accepts these migrations on the current schema"
            );
        }
        Command::History => {
            let mut c = connect(&cli.url)?;
            println!(
                "{:<8} {:<24} {:<9} {:<12} {:<20} {:>10}  now",
                "version", "name", "action", "by", "at", "ms"
            );
            for (v, n, a, by, at, ms, current, notes) in run::history(&mut c)? {
                println!(
                    "{v:<8} {n:<24} {a:<9} {by:<12} {at:<20} {ms:>10.1}  {}{}",
                    if a == "apply" && current {
                        "applied"
                    } else {
                        "-"
                    },
                    notes
                        .iter()
                        .map(|x| format!("\n         note: {x}"))
                        .collect::<String>()
                );
            }
            let kept = keep::list(&mut c)?;
            if !kept.is_empty() {
                println!("\ndropped data kept for rollbacks (`dbopt-migrate purge` drops it):");
                for k in kept {
                    println!(
                        "V{:<7} {:<32} {:>10} rows in {} since {}",
                        k.version, k.object, k.rows, k.copy, k.kept_at
                    );
                }
            }
            match ddl_log::outside_migrations(&mut c, HISTORY_DDL_ROWS)? {
                ddl_log::Record::Changes { newest, .. } if newest.is_empty() => {
                    println!("\nno schema changes outside migrations (dbopt.ddl_history)");
                }
                ddl_log::Record::Changes { newest, .. } => {
                    println!(
                        "\nschema changes outside migrations (dbopt.ddl_history, newest {HISTORY_DDL_ROWS} first):"
                    );
                    for d in newest {
                        println!(
                            "{} {:<12} {:<18} {:<28} {}",
                            d.at,
                            if d.login == d.role {
                                d.login
                            } else {
                                format!("{} as {}", d.login, d.role)
                            },
                            d.command,
                            d.object,
                            ddl_log::one_line(&d.statement, 60)
                        );
                    }
                }
                ddl_log::Record::NotRecorded => println!(
                    "\n(DDL outside migrations is not recorded here: CREATE EXTENSION dbopt records it)"
                ),
                ddl_log::Record::NotReadable => println!(
                    "\n(dbopt.ddl_history is not readable by this login: grant it pg_monitor or dbopt_admin)"
                ),
            }
        }
    }
    Ok(())
}
