//! dbopt-migrate's apply / rollback / history against a real PostgreSQL: rollbacks restore the
//! `pg_dump --schema-only` byte for byte, failures change nothing and say where, changed and
//! out-of-order files are refused, statements that cannot run in a transaction are recognised,
//! and two concurrent runs never apply a version twice.

use dbopt_e2e::e2e_port;
use dbopt_e2e::migrations::{count, migrations, options};
use dbopt_e2e::plain::PlainPostgres;
use dbopt_migrate::connect::Target;
use dbopt_migrate::files::{Migration, NO_TRANSACTION};
use dbopt_migrate::run;
use dbopt_migrate::validate;

const V1: (&str, &str) = (
    "V1__users.sql",
    "CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, nickname text);\n\
     CREATE INDEX users_nickname_idx ON users (nickname);",
);
const V2: (&str, &str) = (
    "V2__orders.sql",
    "CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL REFERENCES users (id),\n\
     total numeric(10, 2) NOT NULL DEFAULT 0);\n\
     CREATE VIEW big_orders AS SELECT id, total FROM orders WHERE total > 100;\n\
     COMMENT ON TABLE orders IS 'purchases';",
);
const V3: (&str, &str) = (
    "V3__drop_nickname.sql",
    "DROP INDEX users_nickname_idx;\nALTER TABLE users DROP COLUMN nickname;",
);

fn history_count(c: &mut postgres::Client) -> i64 {
    count(c, "SELECT count(*) FROM dbopt_migrate.history")
}

#[test]
fn apply_rollback_and_the_bad_paths() {
    let pg = PlainPostgres::start(e2e_port(57), &[]);
    let mut admin = pg.connect();
    admin.batch_execute("CREATE DATABASE app").expect("db");
    let mut c = pg.connect_to("app");
    let empty = pg.dump_schema("app");

    // V1, then V2 and V3.
    let r = run::apply(&mut c, &migrations(&[V1]), &options()).expect("apply V1");
    assert_eq!(r.len(), 1);
    let after_v1 = pg.dump_schema("app");
    let all = migrations(&[V1, V2, V3]);
    let r = run::apply(&mut c, &all, &options()).expect("apply V2, V3");
    assert_eq!(
        r.iter().map(|r| r.version.as_str()).collect::<Vec<_>>(),
        ["2", "3"]
    );
    assert!(
        r[1].notes.iter().any(|n| n.contains("nickname")),
        "dropping a column says its data cannot come back: {:?}",
        r[1].notes
    );
    let after_v3 = pg.dump_schema("app");
    assert!(run::apply(&mut c, &all, &options())
        .expect("nothing to do")
        .is_empty());

    // Rollback to V1: the dump is the one after V1, byte for byte; then forward again.
    let undone = run::rollback(&mut c, "1").expect("rollback");
    assert_eq!(undone, ["V3 (drop nickname)", "V2 (orders)"]);
    assert_eq!(pg.dump_schema("app"), after_v1);
    run::apply(&mut c, &all, &options()).expect("apply again");
    assert_eq!(pg.dump_schema("app"), after_v3);

    // A failing migration: nothing of it stays, the history is unchanged, the error says where.
    let before = pg.dump_schema("app");
    let rows = history_count(&mut c);
    let bad = (
        "V4__bad.sql",
        "CREATE TABLE audit (id int);\nALTER TABLE users ADD COLUMN x int;\nSELEC 1;\n",
    );
    let e = run::apply(&mut c, &migrations(&[V1, V2, V3, bad]), &options()).expect_err("refused");
    assert!(e.contains("V4__bad.sql failed"), "{e}");
    assert!(e.contains("syntax error"), "{e}");
    assert!(e.contains("at line 3, column 1: SELEC 1;"), "{e}");
    assert_eq!(pg.dump_schema("app"), before);
    assert_eq!(history_count(&mut c), rows);

    // A changed applied file, an out-of-order version: refused before anything runs.
    let changed = ("V2__orders.sql", "CREATE TABLE orders (id int);");
    let e = run::apply(&mut c, &migrations(&[V1, changed, V3]), &options()).expect_err("refused");
    assert!(
        e.contains("V2 (orders) changed since it was applied"),
        "{e}"
    );
    let late = ("V1.5__late.sql", "CREATE TABLE late (id int);");
    let e = run::apply(&mut c, &migrations(&[V1, late, V2, V3]), &options()).expect_err("refused");
    assert!(
        e.contains("V1.5 (late) is pending but V3 is already applied"),
        "{e}"
    );
    assert_eq!(pg.dump_schema("app"), before);
    let e = run::rollback(&mut c, "9").expect_err("refused");
    assert!(e.contains("V9 is not an applied version"), "{e}");

    // CONCURRENTLY in a transactional migration: recognised, with the way out.
    let conc = (
        "V4__concurrent.sql",
        "CREATE INDEX CONCURRENTLY users_email_lower ON users (lower(email));",
    );
    let e = run::apply(&mut c, &migrations(&[V1, V2, V3, conc]), &options()).expect_err("refused");
    assert!(e.contains(NO_TRANSACTION), "{e}");
    let marked = format!("{NO_TRANSACTION}\n{}", conc.1);
    let r = run::apply(
        &mut c,
        &migrations(&[V1, V2, V3, ("V4__concurrent.sql", &marked)]),
        &options(),
    )
    .expect("a no-transaction migration");
    assert_eq!(r[0].rollback_statements, 1);
    run::rollback(&mut c, "0").expect("roll back everything");
    // Only dbopt-migrate's own schema is left: the dump of an empty database that has it.
    admin.batch_execute("CREATE DATABASE probe").expect("db");
    let mut p = pg.connect_to("probe");
    assert_eq!(pg.dump_schema("probe"), empty);
    run::ensure_history(&mut p).expect("history");
    assert_eq!(pg.dump_schema("app"), pg.dump_schema("probe"));
}

#[test]
fn two_concurrent_runs_apply_each_version_once() {
    let pg = PlainPostgres::start(e2e_port(58), &[]);
    pg.connect()
        .batch_execute("CREATE DATABASE app")
        .expect("db");
    let dsn = format!("host=127.0.0.1 port={} user=postgres dbname=app", pg.port);
    let slow = (
        "V2__slow.sql",
        "SELECT pg_sleep(1); CREATE TABLE slow (id int);",
    );
    let all = migrations(&[V1, slow, V3]);
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let dsn = dsn.clone();
            let all = all.clone();
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&dsn, postgres::NoTls).expect("connect");
                run::apply(&mut c, &all, &options()).map(|r| r.len())
            })
        })
        .collect();
    let applied: Vec<usize> = runs
        .into_iter()
        .map(|h| h.join().expect("thread").expect("apply"))
        .collect();
    assert_eq!(applied.iter().sum::<usize>(), 3, "{applied:?}");
    let mut c = pg.connect_to("app");
    let twice: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT version FROM dbopt_migrate.history WHERE action = 'apply' \
             GROUP BY version HAVING count(*) > 1) d",
            &[],
        )
        .expect("history")
        .get(0);
    assert_eq!(twice, 0);
}

#[test]
fn validate_on_staging_before_apply() {
    let pg = PlainPostgres::start(e2e_port(59), &[]);
    pg.connect()
        .batch_execute("CREATE DATABASE app")
        .expect("db");
    let mut prod = pg.connect_to("app");
    run::apply(&mut prod, &migrations(&[V1]), &options()).expect("V1");
    let all = migrations(&[V1, V2, V3]);
    let pending: Vec<&Migration> = all[1..].iter().collect();
    let staging_config = Target::parse(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            pg.port
        ),
        "--staging-url",
    )
    .expect("config");
    let mut staging = pg.connect();
    assert!(!validate::validated(&mut prod, &pending).expect("check"));
    let lines = validate::validate(
        &mut prod,
        &mut staging,
        &staging_config,
        "dbopt_validate_t",
        &pending,
    )
    .expect("validate");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].contains("V3 (drop nickname)") && lines[1].contains("identical"),
        "{lines:?}"
    );
    assert!(validate::validated(&mut prod, &pending).expect("check"));
    // The staging database is gone, production untouched by it.
    let left: i64 = staging
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'dbopt_validate_t'",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(left, 0);
    // Once production's schema changes, the validation no longer holds.
    prod.batch_execute("CREATE TABLE adhoc (id int)")
        .expect("ad-hoc DDL");
    assert!(!validate::validated(&mut prod, &pending).expect("check"));

    // A migration whose rollback cannot restore the schema fails validation, naming it.
    prod.batch_execute("DROP TABLE adhoc; CREATE TYPE mood AS ENUM ('sad', 'happy')")
        .expect("enum");
    let grow = migrations(&[V1, ("V2__mood.sql", "ALTER TYPE mood ADD VALUE 'ok'")]);
    let pending: Vec<&Migration> = grow[1..].iter().collect();
    let e = validate::validate(
        &mut prod,
        &mut staging,
        &staging_config,
        "dbopt_validate_t",
        &pending,
    )
    .expect_err("an enum label cannot be rolled back");
    assert!(
        e.contains("V2__mood.sql: its rollback does not restore the schema"),
        "{e}"
    );
    assert!(!validate::validated(&mut prod, &pending).expect("check"));
}

/// libpq's sslmode and sslrootcert: TLS used when asked, the certificate checked as the mode says.
#[test]
fn tls_is_used_and_checked_as_sslmode_says() {
    let dir = std::env::temp_dir().join(format!("dbopt-migrate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
    // A self-signed certificate for localhost only (not for 127.0.0.1), given to clients as the
    // root the way libpq users do.
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl runs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let chown = std::process::Command::new("chown")
        .arg("-R")
        .arg("postgres:")
        .arg(&dir)
        .status()
        .expect("chown");
    assert!(chown.success());
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let pg = PlainPostgres::start(
        e2e_port(74),
        &[
            "ssl = on",
            &format!("ssl_cert_file = '{}'", crt.display()),
            &format!("ssl_key_file = '{}'", key.display()),
        ],
    );
    let base = format!("postgresql://postgres@127.0.0.1:{}/postgres", pg.port);
    let ssl = |url: &str| -> Result<bool, String> {
        let mut c = Target::parse(url, "--url")?.connect()?;
        Ok(c.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .map_err(|e| e.to_string())?
        .get(0))
    };
    let root = crt.display().to_string();
    assert_eq!(ssl(&format!("{base}?sslmode=disable")), Ok(false));
    assert_eq!(ssl(&base), Ok(true), "prefer: TLS when offered");
    assert_eq!(ssl(&format!("{base}?sslmode=require")), Ok(true));
    assert_eq!(
        ssl(&format!("{base}?sslmode=verify-ca&sslrootcert={root}")),
        Ok(true),
        "the chain is trusted; the name is not checked"
    );
    let e = ssl(&format!("{base}?sslmode=verify-full&sslrootcert={root}")).expect_err("wrong name");
    assert!(
        e.contains("certificate") && e.contains("not valid for name"),
        "{e}"
    );
    let by_name = format!(
        "postgresql://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={root}",
        pg.port
    );
    assert_eq!(
        ssl(&by_name),
        Ok(true),
        "verify-full by the certificate's name"
    );
    let e = ssl(&format!("{base}?sslmode=verify-full")).expect_err("not a trusted root");
    assert!(e.contains("invalid peer certificate"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
