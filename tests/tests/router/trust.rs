//! dbopt-router tried as an attacker and a careless user would (issue #9): every finding is a
//! step here that failed before the fix. Runs on the HA stack of `cluster.rs`, before the failover.
//!
//! - identities: each router user is its own least-privileged role; only an `admin` user may be
//!   a superuser; databases are an allow-list;
//! - isolation under transaction pooling: settings, roles, replication role, temp tables,
//!   advisory locks, LISTEN, SQL PREPARE, WITH HOLD cursors never reach another client;
//! - routing: pipelines with writes, hints inside strings, xid-assigning functions;
//! - limits: idle-in-transaction timeout, half-open sockets;
//! - TLS (psql and a Django app with sslmode=require); log lines cannot be forged; bad startup
//!   settings fail the login.

// A failed call is the test failure; `unwrap` says so as well as `expect` would here.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use dbopt_e2e::stack::Stack;
use dbopt_e2e::{repo_root, wait_for};

fn code(e: &postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

fn one<T: for<'a> postgres::types::FromSql<'a>>(c: &mut postgres::Client, sql: &str) -> T {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

fn dsn_with(stack: &Stack, user: &str, extra: &str) -> String {
    format!("{} {extra}", stack.router_dsn(user))
}

pub fn every_client_runs_as_itself(stack: &Stack) {
    let mut app = stack.router("app").unwrap();
    let row = app
        .query_one(
            "/* dbopt:primary */ SELECT current_user::text, usesuper FROM pg_user WHERE usename = current_user",
            &[],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, bool>(1)),
        ("app".into(), false)
    );
    for (sql, expected) in [
        (
            "COPY (SELECT 1) TO PROGRAM 'touch /tmp/dbopt-pwned'",
            "42501",
        ),
        ("SELECT pg_read_file('router.toml')", "42501"),
        ("CREATE ROLE evil SUPERUSER", "42501"),
        ("ALTER SYSTEM SET work_mem = '1GB'", "42501"),
    ] {
        let e = app.batch_execute(sql).unwrap_err();
        assert_eq!(code(&e), expected, "{sql}: {e}");
    }
    assert!(!std::path::Path::new("/tmp/dbopt-pwned").exists());
    // Reads on replicas run as the same role.
    let who: String = one(&mut app, "SELECT current_user::text");
    assert_eq!(who, "app");
    // The one admin user is a superuser, explicitly.
    let mut dba = stack.router("dba").unwrap();
    let sup: String = one(&mut dba, "SHOW is_superuser");
    assert_eq!(sup, "on");

    // Databases are an allow-list: template1 is refused before any pool is made for it.
    let e = postgres::Client::connect(
        &stack
            .router_dsn("app")
            .replace("dbname=postgres", "dbname=template1"),
        postgres::NoTls,
    )
    .err()
    .expect("template1 refused");
    assert_eq!(code(&e), "3D000", "{e}");
    let pools = stack.router_status()["pools"].to_string();
    assert!(!pools.contains("template1"), "{pools}");
}

/// Two clients of the same user take turns 1,000 times, each with its own TimeZone, on the same
/// pools: each always sees its own, in SHOW and in the text of a timestamptz.
pub fn settings_never_cross_clients(stack: &Stack) {
    let mut a = stack.router("app").unwrap();
    let mut b = stack.router("app").unwrap();
    for i in 0..1000 {
        let (c, tz) = if i % 2 == 0 {
            (&mut a, "Asia/Tokyo")
        } else {
            (&mut b, "America/New_York")
        };
        if i < 2 {
            c.batch_execute(&format!("SET TimeZone = '{tz}'")).unwrap();
        }
        let row = c
            .query_one(
                "SELECT current_setting('TimeZone'), to_char('2026-01-01 00:00:00+00'::timestamptz, 'HH24')",
                &[],
            )
            .unwrap();
        let expected_hour = if tz == "Asia/Tokyo" { "09" } else { "19" };
        assert_eq!(
            (
                row.get::<_, String>(0).as_str(),
                row.get::<_, String>(1).as_str()
            ),
            (tz, expected_hour),
            "turn {i}"
        );
    }
    // A third client that never set anything has the server's default.
    let mut fresh = stack.router("app").unwrap();
    for _ in 0..20 {
        let tz: String = one(&mut fresh, "SELECT current_setting('TimeZone')");
        assert!(tz != "Asia/Tokyo" && tz != "America/New_York", "{tz}");
    }

    // statement_timeout, default_transaction_read_only, DateStyle, application_name and a custom
    // setting stay with the client that set them.
    a.batch_execute(
        "SET statement_timeout = '300ms'; SET default_transaction_read_only = on; \
         SET DateStyle = 'SQL, DMY'; SET application_name = 'mallory'; SET myapp.tenant = '7'",
    )
    .unwrap();
    fresh
        .batch_execute("CREATE TABLE IF NOT EXISTS trust_rows (id int)")
        .unwrap();
    for _ in 0..30 {
        fresh
            .batch_execute("INSERT INTO trust_rows VALUES (1)")
            .unwrap();
        let row = fresh
            .query_one(
                "SELECT current_setting('statement_timeout'), current_setting('DateStyle'), \
                 current_setting('application_name'), coalesce(current_setting('myapp.tenant', true), '')",
                &[],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "0");
        assert_eq!(row.get::<_, String>(1), "ISO, MDY");
        assert_ne!(row.get::<_, String>(2), "mallory");
        assert_eq!(row.get::<_, String>(3), "");
    }
    // ... and a keeps them, on every connection it gets.
    let e = a
        .batch_execute("INSERT INTO trust_rows VALUES (2)")
        .unwrap_err();
    assert_eq!(code(&e), "25006", "{e}");
    let tenant: String = one(&mut a, "SELECT current_setting('myapp.tenant')");
    assert_eq!(tenant, "7");
    a.batch_execute("RESET ALL").unwrap();
    a.batch_execute("INSERT INTO trust_rows VALUES (3)")
        .unwrap();
}

/// A bad setting in the startup packet fails the login with PostgreSQL's own error.
pub fn bad_startup_settings_fail_the_login(stack: &Stack) {
    for (extra, expected) in [
        ("options='-c TimeZone=Mars/Olympus'", "22023"),
        ("options='-c no_such_setting=1'", "42704"),
        ("options='-D /tmp'", "08P01"),
        ("application_name=ok options='-c work_mem=-5'", "22023"),
    ] {
        let e = postgres::Client::connect(&dsn_with(stack, "app", extra), postgres::NoTls)
            .err()
            .unwrap_or_else(|| panic!("{extra} logged in"));
        assert_eq!(code(&e), expected, "{extra}: {e}");
    }
    let mut ok = postgres::Client::connect(
        &dsn_with(stack, "app", "options='-c statement_timeout=4s'"),
        postgres::NoTls,
    )
    .unwrap();
    let v: String = one(&mut ok, "SHOW statement_timeout");
    assert_eq!(v, "4s");
}

/// State that cannot be copied pins the client to its connection until undone, and never
/// reaches another client.
pub fn session_state_pins_or_is_reset(stack: &Stack) {
    let mut dba = stack.router("dba").unwrap();
    dba.batch_execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trust_tenant') \
         THEN CREATE ROLE trust_tenant NOLOGIN; END IF; END $$; \
         GRANT trust_tenant TO app; \
         CREATE TABLE IF NOT EXISTS trust_parent (id int PRIMARY KEY); \
         CREATE TABLE IF NOT EXISTS trust_child (parent int REFERENCES trust_parent); \
         DELETE FROM trust_child",
    )
    .unwrap();

    // SET ROLE: the client keeps its role; nobody else gets it.
    let mut a = stack.router("app").unwrap();
    let mut b = stack.router("app").unwrap();
    a.batch_execute("SET ROLE trust_tenant").unwrap();
    for _ in 0..20 {
        let who: String = one(&mut b, "/* dbopt:primary */ SELECT current_user::text");
        assert_eq!(who, "app");
        let who: String = one(&mut a, "SELECT current_user::text");
        assert_eq!(who, "trust_tenant");
    }
    a.batch_execute("RESET ROLE").unwrap();
    let who: String = one(&mut a, "SELECT current_user::text");
    assert_eq!(who, "app");

    // session_replication_role (a superuser's setting) does not switch off another client's
    // foreign keys.
    let mut d1 = stack.router("dba").unwrap();
    let mut d2 = stack.router("dba").unwrap();
    d1.batch_execute("SET session_replication_role = replica")
        .unwrap();
    for _ in 0..10 {
        let e = d2
            .batch_execute("INSERT INTO trust_child VALUES (12345)")
            .unwrap_err();
        assert_eq!(code(&e), "23503", "{e}");
    }
    let orphans: i64 = one(
        &mut d2,
        "/* dbopt:primary */ SELECT count(*) FROM trust_child",
    );
    assert_eq!(orphans, 0);
    drop(d1);

    // Temporary tables: each client its own, kept across its transactions.
    a.batch_execute("CREATE TEMP TABLE scratch (n int); INSERT INTO scratch VALUES (1)")
        .unwrap();
    b.batch_execute("CREATE TEMP TABLE scratch (n int)")
        .expect("no 'already exists' for b");
    for _ in 0..5 {
        let n: i64 = one(&mut a, "SELECT count(*) FROM scratch");
        assert_eq!(n, 1);
        let n: i64 = one(&mut b, "SELECT count(*) FROM scratch");
        assert_eq!(n, 0);
    }
    a.batch_execute("DROP TABLE scratch").unwrap();
    b.batch_execute("DROP TABLE scratch").unwrap();

    // Session advisory locks: the unlock runs where the lock is.
    a.batch_execute("SELECT pg_advisory_lock(4242)").unwrap();
    let taken: bool = one(
        &mut b,
        "SELECT pg_try_advisory_lock(4243) AND pg_advisory_unlock(4243)",
    );
    assert!(taken);
    let other: bool = one(&mut b, "SELECT pg_try_advisory_lock(4242)");
    assert!(!other, "a holds 4242");
    let unlocked: bool = one(&mut a, "SELECT pg_advisory_unlock(4242)");
    assert!(unlocked, "a's unlock ran on the backend holding its lock");
    let other: bool = one(&mut b, "SELECT pg_try_advisory_lock(4242)");
    assert!(other);
    let _: bool = one(&mut b, "SELECT pg_advisory_unlock(4242)");

    // SQL PREPARE and WITH HOLD cursors belong to their client.
    a.batch_execute("PREPARE trust_q AS SELECT 41 + 1").unwrap();
    let e = b.batch_execute("EXECUTE trust_q").unwrap_err();
    assert_eq!(code(&e), "26000", "{e}");
    let v: i32 = one(&mut a, "EXECUTE trust_q");
    assert_eq!(v, 42);
    a.batch_execute("DEALLOCATE trust_q").unwrap();
    a.batch_execute("DECLARE trust_c CURSOR WITH HOLD FOR SELECT generate_series(1, 3)")
        .unwrap();
    let v: i32 = one(&mut a, "FETCH trust_c");
    assert_eq!(v, 1);
    let v: i32 = one(&mut a, "FETCH trust_c");
    assert_eq!(v, 2);
    a.batch_execute("CLOSE trust_c").unwrap();

    // LISTEN under transaction pooling: the listener keeps its connection and gets the NOTIFY.
    a.batch_execute("LISTEN trust_channel").unwrap();
    b.batch_execute("NOTIFY trust_channel, 'hello'").unwrap();
    let _: i32 = one(&mut a, "SELECT 1");
    use postgres::fallible_iterator::FallibleIterator;
    let note = a
        .notifications()
        .timeout_iter(Duration::from_secs(5))
        .next()
        .unwrap()
        .expect("a notification");
    assert_eq!(note.payload(), "hello");
    a.batch_execute("UNLISTEN *").unwrap();
    let pins = stack.router_status()["sessions"]["pins"]
        .as_u64()
        .unwrap_or(0);
    assert!(pins >= 6, "pins counted: {pins}");
}

/// Pipelines are routed as a whole: a read before a Flush then a write before the Sync.
pub fn pipelines_with_writes_reach_the_primary(stack: &Stack) {
    let mut c = stack.router("app").unwrap();
    // The raw client below logs in as app_md5, a role of its own.
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS trust_pipe (n int); GRANT ALL ON trust_pipe TO app_md5",
    )
    .unwrap();
    let mut s = super::router::raw_login(stack);
    let mut out = Vec::new();
    msg(&mut out, b'P', b"\0SELECT 1\0\0\0");
    msg(&mut out, b'B', b"\0\0\0\0\0\0\0\0");
    msg(&mut out, b'D', b"P\0");
    msg(&mut out, b'E', b"\0\0\0\0\0");
    msg(&mut out, b'H', b"");
    s.write_all(&out).unwrap();
    let first = read_until(&mut s, b'C');
    assert!(
        !tags(&first).contains(&b'E'),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    out.clear();
    msg(&mut out, b'P', b"\0INSERT INTO trust_pipe VALUES (7)\0\0\0");
    msg(&mut out, b'B', b"\0\0\0\0\0\0\0\0");
    msg(&mut out, b'E', b"\0\0\0\0\0");
    msg(&mut out, b'S', b"");
    s.write_all(&out).unwrap();
    let rest = read_until(&mut s, b'Z');
    let text = String::from_utf8_lossy(&rest);
    assert!(
        !text.contains("25006"),
        "the INSERT ran on a replica: {text}"
    );
    assert!(text.contains("INSERT 0 1"), "{text}");

    // psycopg 3 in pipeline mode, reads and writes mixed (in tests/python/psycopg_router.py).
    // Hints are read by PostgreSQL's scanner, and never move a write.
    c.batch_execute("CREATE SEQUENCE IF NOT EXISTS trust_seq")
        .unwrap();
    for sql in [
        "select $$ /* dbopt:replica */ $$, nextval('trust_seq')",
        "/* dbopt:replica */ INSERT INTO trust_pipe VALUES (8)",
        "/* dbopt:replica */ SELECT txid_current()",
        "SELECT pg_current_xact_id()",
    ] {
        c.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

/// The tags of the whole messages in `buf`.
fn tags(buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() >= at + 5 {
        let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]);
        out.push(buf[at]);
        at += 1 + len.max(4) as usize;
    }
    out
}

/// Reads whole messages until one with tag `last` arrived; returns the bytes.
fn read_until(s: &mut TcpStream, last: u8) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Walk the complete messages so far.
        let mut at = 0;
        while buf.len() >= at + 5 {
            let len = i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]);
            let end = at + 1 + len as usize;
            if buf.len() < end {
                break;
            }
            if buf[at] == last {
                return buf;
            }
            at = end;
        }
        let n = s.read(&mut chunk).expect("router reply");
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Idle transactions are ended by the router; half-open sockets cannot lock clients out.
pub fn limits_hold_under_abuse(stack: &Stack) {
    let config = std::path::Path::new(&stack.info.dir).join("router.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    // The stack writes every setting (defaults included): change the one.
    let default = "idle_in_transaction_timeout_s = 60\n";
    assert!(good.contains(default), "{good}");
    std::fs::write(
        &config,
        good.replace(default, "idle_in_transaction_timeout_s = 2\n"),
    )
    .unwrap();
    hup_router(stack);
    std::thread::sleep(Duration::from_millis(500));

    let mut c = stack.router("app").unwrap();
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS trust_locked (id int PRIMARY KEY); \
                     INSERT INTO trust_locked VALUES (1) ON CONFLICT DO NOTHING",
    )
    .unwrap();
    // 45 clients open a transaction, lock the row or not, and go to sleep.
    let mut sleepers: Vec<postgres::Client> = (0..45)
        .map(|i| {
            let mut s = stack.router("app").unwrap();
            s.batch_execute(if i == 0 {
                "BEGIN; SELECT * FROM trust_locked WHERE id = 1 FOR UPDATE"
            } else {
                "BEGIN; SELECT 1"
            })
            .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    // The timeout rolled them back: the row lock is gone and writes work.
    c.batch_execute(
        "SET lock_timeout = '2s'; UPDATE trust_locked SET id = 1 WHERE id = 1; RESET lock_timeout",
    )
    .expect("the sleepers' transactions were rolled back");
    let e = sleepers[0].batch_execute("COMMIT").unwrap_err();
    assert!(
        e.is_closed() || code(&e) == "25P03",
        "the sleeper was told: {e}"
    );
    sleepers.clear();
    std::fs::write(&config, good).unwrap();
    hup_router(stack);

    // 1,000 half-open sockets (connected, silent) while real clients log in and work.
    let addr = ([127, 0, 0, 1], stack.info.router_port).into();
    let started = Instant::now();
    let silent: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect();
    assert!(silent.len() > 900, "{} sockets", silent.len());
    for i in 0..20 {
        let mut real = stack
            .router("app")
            .unwrap_or_else(|e| panic!("client {i} locked out: {e}"));
        let v: i32 = one(&mut real, "SELECT 5");
        assert_eq!(v, 5);
    }
    eprintln!(
        "20 real clients served while {} half-open sockets were open ({:?})",
        silent.len(),
        started.elapsed()
    );
    drop(silent);
    let evictions = stack.router_status()["sessions"]["handshake_evictions"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        evictions > 0,
        "the half-open flood displaced itself at max_handshakes"
    );
}

fn hup_router(stack: &Stack) {
    let pid = std::fs::read_to_string(std::path::Path::new(&stack.info.dir).join("run/router.pid"))
        .unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", pid.trim()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// TLS: psql and a Django app with sslmode=require.
pub fn tls_clients_work(stack: &Stack) {
    let dsn = format!("{} sslmode=require", stack.router_dsn("app"));
    let out = Command::new("psql")
        .arg(&dsn)
        .args(["-X", "-At", "-c", "SELECT current_user"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");
    let out = Command::new("psql")
        .arg(format!(
            "{} sslmode=verify-full sslrootcert={}/tls/router.crt",
            stack.router_dsn("app"),
            stack.info.dir
        ))
        .args(["-X", "-At", "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verify-full: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("/usr/bin/python3")
        .arg(repo_root().join("tests/python/django_tls.py"))
        .args([
            "127.0.0.1",
            &stack.info.router_port.to_string(),
            "app",
            &stack.info.app_password,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("django ok"),
        "django over TLS:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A user name with a newline cannot forge a line in the router's log.
pub fn log_lines_cannot_be_forged(stack: &Stack) {
    let forged = "FORGED-LINE dbopt-router accepted root";
    let e = postgres::Config::new()
        .host("127.0.0.1")
        .port(stack.info.router_port)
        .user(&format!("x\n{forged}"))
        .password("wrong")
        .dbname("postgres")
        .connect(postgres::NoTls)
        .err()
        .expect("a wrong password is refused");
    assert_eq!(code(&e), "28P01", "{e}");
    let log = std::path::Path::new(&stack.info.dir).join("log/router.log");
    let text = wait_for(
        Duration::from_secs(5),
        "the attempt in the router log",
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains(forged).then_some(text)
        },
    );
    for line in text.lines().filter(|l| l.contains(forged)) {
        assert!(
            !line.starts_with("FORGED"),
            "a client wrote its own log line: {line}"
        );
        assert!(line.contains("x\\nFORGED"), "{line}");
    }
}
