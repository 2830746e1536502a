//! dbopt-router's pools against one plain PostgreSQL (no HA stack needed): the wait queue's
//! 53300, the critical reserve, session pooling's reset, LISTEN/NOTIFY in session mode, a bad
//! configuration on SIGHUP, a graceful shutdown that lets a transaction finish, and an admin
//! endpoint that wants its read token.

// A failed call is the test failure; `unwrap` says so as well as `expect` would here.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dbopt_e2e::plain::PlainPostgres;
use dbopt_e2e::{e2e_port, http, repo_root, wait_for};
use postgres::fallible_iterator::FallibleIterator;

/// The admin endpoint's read token in this test (`listen.admin_read_token`).
const READ_TOKEN: &str = "metrics-reader-0123456789";
const READ: &str = "Bearer metrics-reader-0123456789";

struct Router {
    child: Child,
    port: u16,
    admin: u16,
    config: std::path::PathBuf,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Router {
    fn dsn(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password=pw dbname=postgres connect_timeout=5",
            self.port
        )
    }

    fn connect(&self, user: &str) -> Result<postgres::Client, postgres::Error> {
        postgres::Client::connect(&self.dsn(user), postgres::NoTls)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

fn config(pg_port: u16, port: u16, admin: u16) -> String {
    format!(
        r#"
[listen]
address = "127.0.0.1:{port}"
admin_address = "127.0.0.1:{admin}"
admin_read_token = "{READ_TOKEN}"

[pool]
min_size = 1
max_size = 3
critical_reserve = 1
wait_timeout_ms = 500

[health]
interval_s = 2

[server]
user = "postgres"

[[nodes]]
name = "solo"
host = "127.0.0.1"
port = {pg_port}

[[users]]
name = "app"
password = "pw"

[[users]]
name = "ops"
password = "pw"
critical = true

[[users]]
name = "sess"
password = "pw"
pool_mode = "session"
"#
    )
}

fn start_router(pg_port: u16) -> Router {
    let (port, admin) = (e2e_port(81), e2e_port(82));
    let dir = std::env::temp_dir().join(format!("dbopt-router-pool-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("router.toml");
    std::fs::write(&path, config(pg_port, port, admin)).unwrap();
    let child = Command::new(repo_root().join("target/release/dbopt-router"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("target/release/dbopt-router (scripts/test builds it)");
    let router = Router {
        child,
        port,
        admin,
        config: path,
    };
    wait_for(
        Duration::from_secs(20),
        "the router to find its primary",
        || {
            let (_, body) = http::get_with(router.admin, "/status", Some(READ))?;
            body.contains("\"primary\": \"solo\"").then_some(())
        },
    );
    router
}

/// With `listen.admin_read_token`, GETs without it (or with a wrong one) get 401 and no data.
fn the_admin_endpoint_wants_its_read_token(router: &Router) {
    for auth in [None, Some("Bearer wrong"), Some(READ_TOKEN)] {
        for path in ["/metrics", "/status", "/nowhere"] {
            let (code, body) = http::get_with(router.admin, path, auth).unwrap();
            assert_eq!(code, 401, "{path} with {auth:?}: {body}");
            assert!(!body.contains("dbopt_router"), "{body}");
        }
    }
    let (code, body) = http::get_with(router.admin, "/metrics", Some(READ)).unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains("# TYPE dbopt_router_routed_total counter"),
        "{body}"
    );
}

#[test]
fn pools_sessions_reload_and_shutdown() {
    let pg = PlainPostgres::start(e2e_port(80), &[]);
    // Every router user runs as its own, unprivileged role.
    pg.connect()
        .batch_execute(
            "CREATE TABLE t (id int);
             CREATE ROLE app LOGIN; CREATE ROLE ops LOGIN; CREATE ROLE sess LOGIN;
             GRANT ALL ON t TO app, ops, sess;",
        )
        .unwrap();
    let mut router = start_router(e2e_port(80));
    the_admin_endpoint_wants_its_read_token(&router);

    // Two ordinary transactions hold two of the three connections; the third is reserved for
    // critical work, so another ordinary client waits and gets 53300 after wait_timeout_ms.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut c = router.connect("app").unwrap();
        c.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({i})"))
            .unwrap();
        held.push(c);
    }
    let mut third = router.connect("app").unwrap();
    let started = Instant::now();
    let e = third.batch_execute("INSERT INTO t VALUES (9)").unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300", "{db}");
    assert!(db.message().contains("free within 500 ms"), "{db}");
    assert!(started.elapsed() >= Duration::from_millis(450));
    // Critical work of the same user still gets the reserved connection at once.
    let mut critical = router.connect("app").unwrap();
    critical
        .batch_execute("/* dbopt:critical */ INSERT INTO t VALUES (100)")
        .unwrap();
    drop(critical);
    // The critical user has a pool of its own (its own role).
    let mut ops = router.connect("ops").unwrap();
    ops.batch_execute("INSERT INTO t VALUES (101)").unwrap();
    let who: String = ops
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(who, "ops");
    drop(ops);
    // Once a transaction ends, ordinary work goes on; the refused client's session survived.
    held[0].batch_execute("COMMIT").unwrap();
    third.batch_execute("INSERT INTO t VALUES (9)").unwrap();
    held[1].batch_execute("COMMIT").unwrap();
    drop(held);

    // Session pooling: state lives for the session and is reset (DISCARD ALL) when it ends.
    let mut s = router.connect("sess").unwrap();
    s.batch_execute("SET work_mem = '7MB'; PREPARE p AS SELECT 1")
        .unwrap();
    let w: String = s.query_one("SHOW work_mem", &[]).unwrap().get(0);
    assert_eq!(w, "7MB");
    drop(s);
    let mut s = router.connect("sess").unwrap();
    let w: String = s.query_one("SHOW work_mem", &[]).unwrap().get(0);
    assert_eq!(w, "4MB", "the next session starts clean");
    let n: i64 = s
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // LISTEN/NOTIFY in session mode.
    s.batch_execute("LISTEN jobs").unwrap();
    let mut app = router.connect("app").unwrap();
    app.batch_execute("NOTIFY jobs, 'job 1'").unwrap();
    let note = s
        .notifications()
        .timeout_iter(Duration::from_secs(5))
        .next()
        .unwrap()
        .expect("a notification");
    assert_eq!((note.channel(), note.payload()), ("jobs", "job 1"));
    drop(s);

    // A broken configuration on SIGHUP is refused; the running one stays.
    let good = std::fs::read_to_string(&router.config).unwrap();
    std::fs::write(&router.config, good.replace("max_size = 3", "max_size = 0")).unwrap();
    router.signal("-HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(app.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0), 1);
    let (_, status) = http::get_with(router.admin, "/status", Some(READ)).unwrap();
    assert!(status.contains("\"max\": 3"), "{status}");
    std::fs::write(&router.config, good).unwrap();

    // Graceful shutdown: no new clients; a transaction in progress may finish; then the client
    // is told 57P01 and the router exits.
    let mut busy = router.connect("app").unwrap();
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (7)")
        .unwrap();
    router.signal("-TERM");
    wait_for(Duration::from_secs(5), "the listener to close", || {
        router.connect("app").is_err().then_some(())
    });
    busy.batch_execute("INSERT INTO t VALUES (8); COMMIT")
        .unwrap();
    let e = busy.batch_execute("SELECT 1").unwrap_err();
    assert!(
        e.as_db_error().map(|d| d.code().code()) == Some("57P01") || e.is_closed(),
        "{e}"
    );
    let status = wait_for(Duration::from_secs(10), "the router to exit", || {
        router.child.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");
    let n: i64 = pg
        .connect()
        .query_one("SELECT count(*) FROM t WHERE id IN (7, 8)", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        n, 2,
        "the transaction that was running at SIGTERM committed"
    );
}
