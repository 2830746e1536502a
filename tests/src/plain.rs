//! A bare PostgreSQL 15 instance (no Patroni, no preload) for one test, stopped and removed on drop.

use std::path::PathBuf;
use std::process::Command;

/// The PostgreSQL 15 binaries: those of `DBOPT_PG_CONFIG` (scripts/test points it at a copy of the
/// system's), else Debian's.
fn pg_bin() -> String {
    std::env::var("DBOPT_PG_CONFIG")
        .ok()
        .and_then(|c| {
            std::path::Path::new(&c)
                .parent()
                .map(|p| p.display().to_string())
        })
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into())
}

pub struct PlainPostgres {
    dir: PathBuf,
    pub port: u16,
}

/// Runs a PostgreSQL binary as the `postgres` OS user (PostgreSQL refuses root).
fn as_postgres(bin: &str, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
        // As a careless operator might run it: any error that went through pgrx's guard would
        // then carry a Rust backtrace to the client (the tests check that none does).
        .env("RUST_BACKTRACE", "1")
        .arg(format!("{}/{bin}", pg_bin()))
        .args(args)
        .output()
        .expect("setpriv runs")
}

impl PlainPostgres {
    /// initdb + start on `port` with trust auth on loopback; `conf` lines go to postgresql.conf.
    pub fn start(port: u16, conf: &[&str]) -> PlainPostgres {
        let dir = std::env::temp_dir().join(format!("dbopt-plain-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let chown = Command::new("chown")
            .args(["postgres:", &dir.to_string_lossy()])
            .status();
        assert!(
            chown.map(|s| s.success()).unwrap_or(false),
            "chown {}",
            dir.display()
        );
        let pg = PlainPostgres { dir, port };
        let data = pg.data();
        let out = as_postgres(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut settings = vec![
            format!("port = {port}"),
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", pg.dir.display()),
        ];
        settings.extend(conf.iter().map(|s| s.to_string()));
        let conf_path = pg.dir.join("data/postgresql.auto.conf");
        std::fs::write(&conf_path, settings.join("\n") + "\n").expect("write conf");
        let log = pg.dir.join("log").to_string_lossy().into_owned();
        let out = as_postgres(
            "pg_ctl",
            &["start", "-D", &data, "-l", &log, "-w", "-t", "60"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    /// The server's log file so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    /// Clean restart (`pg_ctl restart -m fast`): what a DBA does for a configuration change.
    pub fn restart(&self) {
        let log = self.dir.join("log").to_string_lossy().into_owned();
        let out = as_postgres(
            "pg_ctl",
            &[
                "restart",
                "-D",
                &self.data(),
                "-l",
                &log,
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A connection to database `db`.
    pub fn connect_to(&self, db: &str) -> postgres::Client {
        let dsn = format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        );
        postgres::Client::connect(&dsn, postgres::NoTls).expect("connect to plain PostgreSQL")
    }

    /// `pg_dump --schema-only` of `db`, without the lines that differ between two dumps of one
    /// schema (`\restrict` keys, and the `SET default_tablespace` / `SET
    /// default_table_access_method` lines pg_dump places wherever an object first needs them).
    pub fn dump_schema(&self, db: &str) -> String {
        self.dump_schema_with(db, &[])
    }

    /// [`Self::dump_schema`] with more pg_dump options (e.g. `--exclude-schema=…`).
    pub fn dump_schema_with(&self, db: &str, options: &[&str]) -> String {
        let port = self.port.to_string();
        let mut args = vec![
            "--schema-only",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
        ];
        args.extend_from_slice(options);
        args.push(db);
        let out = as_postgres("pg_dump", &args);
        assert!(
            out.status.success(),
            "pg_dump {db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                !(l.starts_with("\\restrict")
                    || l.starts_with("\\unrestrict")
                    || l.starts_with("SET default_tablespace")
                    || l.starts_with("SET default_table_access_method"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn connect(&self) -> postgres::Client {
        let dsn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        );
        postgres::Client::connect(&dsn, postgres::NoTls).expect("connect to plain PostgreSQL")
    }
}

impl Drop for PlainPostgres {
    fn drop(&mut self) {
        let _ = as_postgres(
            "pg_ctl",
            &["stop", "-D", &self.data(), "-m", "immediate", "-w"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lines only one of two dumps has (`- ` only in `a`, `+ ` only in `b`).
pub fn diff_lines(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out: Vec<String> = la
        .iter()
        .filter(|l| !lb.contains(l))
        .map(|l| format!("- {l}"))
        .collect();
    out.extend(
        lb.iter()
            .filter(|l| !la.contains(l))
            .map(|l| format!("+ {l}")),
    );
    out.join("\n")
}

/// Panics with the differing lines when two dumps differ.
pub fn assert_same_dump(a: &str, b: &str, what: &str) {
    assert!(a == b, "{what}: the dumps differ\n{}", diff_lines(a, b));
}
