//! End-to-end: rate limits in dbopt-router on the local HA stack, through **two** routers sharing
//! their windows in Redis — per router user, per end user of the application (SQLCommenter comment
//! or the `dbopt.end_user` setting), global (added by SIGHUP), warn mode, the admin bypass, refusals
//! inside transactions, and Redis stopped mid-run (local fallback, fail-closed, then shared again).
//!
//! How "no window ever admits more than the limit" is checked without trusting the router: each
//! admitted statement was decided somewhere between the client sending it (`s`) and reading its
//! answer (`r`). For every window of `window - 2·max(r - s)` ms, the statements whose `[s, r]`
//! intersects it are at least those decided inside it; more than `limit` of them would be a real
//! violation (the check can miss one hidden by latency, never invent one).

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dbopt_e2e::stack::Stack;
use dbopt_e2e::{http, wait_for};

/// One statement as a client saw it.
#[derive(Debug, Clone)]
struct Sample {
    /// Sent and answered, ms since the epoch (the module's clock is the wall clock too).
    s: f64,
    r: f64,
    ok: bool,
    code: String,
    message: String,
    detail: String,
    /// Which router (0 or 1) and which end user.
    router: usize,
    who: String,
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// The second router: the stack's configuration on other ports, same Redis and nodes.
struct SecondRouter {
    child: Child,
    port: u16,
    admin: u16,
    config: std::path::PathBuf,
}

impl Drop for SecondRouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Routers<'a> {
    stack: &'a Stack,
    second: SecondRouter,
}

impl Routers<'_> {
    fn port(&self, i: usize) -> u16 {
        if i == 0 {
            self.stack.info.router_port
        } else {
            self.second.port
        }
    }

    fn admin(&self, i: usize) -> u16 {
        if i == 0 {
            self.stack.info.router_admin_port
        } else {
            self.second.admin
        }
    }

    fn dsn(&self, i: usize, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={} dbname=postgres connect_timeout=5",
            self.port(i),
            self.stack.info.app_password
        )
    }

    fn connect(&self, i: usize, user: &str) -> postgres::Client {
        postgres::Client::connect(&self.dsn(i, user), postgres::NoTls)
            .unwrap_or_else(|e| panic!("router {i} as {user}: {e}"))
    }

    fn metrics(&self, i: usize) -> String {
        let (code, body) = http::get(self.admin(i), "/metrics").unwrap();
        assert_eq!(code, 200);
        body
    }

    fn config_paths(&self) -> [std::path::PathBuf; 2] {
        [
            std::path::Path::new(&self.stack.info.dir).join("router.toml"),
            self.second.config.clone(),
        ]
    }

    /// Rewrites both configurations with `edit` and reloads both routers (SIGHUP).
    fn reload(&self, edit: impl Fn(&str) -> String) {
        let pid0: i32 = std::fs::read_to_string(
            std::path::Path::new(&self.stack.info.dir).join("run/router.pid"),
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
        let pids = [pid0, self.second.child.id() as i32];
        for (path, pid) in self.config_paths().iter().zip(pids) {
            let text = std::fs::read_to_string(path).unwrap();
            std::fs::write(path, edit(&text)).unwrap();
            let ok = Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "SIGHUP to {pid}");
        }
        // Applied by the next batch of each session; give the signal handlers a moment.
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn start_second_router(stack: &Stack) -> SecondRouter {
    let dir = std::path::Path::new(&stack.info.dir);
    let text = std::fs::read_to_string(dir.join("router.toml")).unwrap();
    let (port, admin) = (stack.info.port_base + 60, stack.info.port_base + 61);
    let text = text
        .replace(
            &format!("127.0.0.1:{}\"", stack.info.router_port),
            &format!("127.0.0.1:{port}\""),
        )
        .replace(
            &format!("127.0.0.1:{}\"", stack.info.router_admin_port),
            &format!("127.0.0.1:{admin}\""),
        );
    let config = dir.join("router2.toml");
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(dir.join("log/router2.log")).unwrap();
    let child = Command::new(dir.join("lib/dbopt-router"))
        .arg("--config")
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("second router starts");
    let second = SecondRouter {
        child,
        port,
        admin,
        config,
    };
    wait_for(Duration::from_secs(20), "the second router", || {
        let dsn = format!(
            "host=127.0.0.1 port={port} user=app password={} dbname=postgres connect_timeout=2",
            stack.info.app_password
        );
        let mut c = postgres::Client::connect(&dsn, postgres::NoTls).ok()?;
        c.simple_query("SELECT 1").ok()
    });
    second
}

/// Runs `sql` in bursts from one connection for `secs`, recording every statement.
fn burst(
    dsn: String,
    router: usize,
    who: &str,
    sql: String,
    secs: f64,
    out: Arc<Mutex<Vec<Sample>>>,
) -> std::thread::JoinHandle<()> {
    let who = who.to_string();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
        let end = now_ms() + secs * 1000.0;
        let mut n = 0u64;
        let mut samples = Vec::new();
        while now_ms() < end {
            for _ in 0..5 {
                let s = now_ms();
                let res = c.simple_query(&sql);
                let r = now_ms();
                let (ok, code, message, detail) = match res {
                    Ok(_) => (true, String::new(), String::new(), String::new()),
                    Err(e) => {
                        let db = e.as_db_error().unwrap_or_else(|| panic!("{who}: {e}"));
                        (
                            false,
                            db.code().code().to_string(),
                            db.message().to_string(),
                            db.detail().unwrap_or_default().to_string(),
                        )
                    }
                };
                samples.push(Sample {
                    s,
                    r,
                    ok,
                    code,
                    message,
                    detail,
                    router,
                    who: who.clone(),
                });
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(5 + (n * 7) % 20));
        }
        out.lock().unwrap().extend(samples);
    })
}

/// The sound check described at the top, and the utilisation over the trace.
fn assert_window(samples: &[&Sample], limit: usize, window_ms: f64, what: &str) -> usize {
    let admitted: Vec<(f64, f64)> = samples
        .iter()
        .filter(|x| x.ok)
        .map(|x| (x.s, x.r))
        .collect();
    let jitter = admitted.iter().map(|(s, r)| r - s).fold(0.0, f64::max);
    let w = window_ms - 2.0 * jitter - 2.0;
    assert!(
        w > window_ms / 2.0,
        "{what}: answers took up to {jitter:.1} ms; too slow for a meaningful check"
    );
    for &(_, t) in &admitted {
        let inside = admitted
            .iter()
            .filter(|(s, r)| *r >= t && *s < t + w)
            .count();
        assert!(
            inside <= limit,
            "{what}: {inside} statements admitted within {w:.0} ms (limit {limit} per {window_ms} ms)"
        );
    }
    admitted.len()
}

fn assert_refusals(samples: &[&Sample], needle: &str) {
    for x in samples.iter().filter(|x| !x.ok) {
        assert_eq!(x.code, "53400", "{x:?}");
        assert!(x.message.contains(needle), "{x:?}");
        assert!(x.detail.starts_with("Retry after "), "{x:?}");
    }
}

/// Utilisation: over the whole windows the trace covers from its first statement, the share of
/// `limit` per window that was admitted (demand is always above the limit in these traces).
fn utilisation(samples: &[&Sample], limit: usize, window_ms: f64, what: &str) -> f64 {
    let first = samples.iter().map(|x| x.s).fold(f64::MAX, f64::min);
    let last = samples.iter().map(|x| x.s).fold(0.0, f64::max);
    let windows = ((last - first) / window_ms).floor().max(1.0);
    let admitted = samples
        .iter()
        .filter(|x| x.ok && x.s < first + windows * window_ms)
        .count();
    let u = admitted as f64 / (windows * limit as f64);
    eprintln!(
        "{what}: {} statements, {admitted} admitted in the first {windows} windows: {:.0} % of the limit",
        samples.len(),
        u * 100.0
    );
    assert!(u >= 0.8, "{what}: utilisation {:.0} %", u * 100.0);
    u
}

fn run(threads: Vec<std::thread::JoinHandle<()>>) {
    for t in threads {
        t.join().unwrap();
    }
}

/// Cache hits of both layers.
fn cache_hits(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("dbopt_router_cache_hits_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn rate_limits_end_to_end() {
    std::env::set_var("DBOPT_LIMITS_ROUTERS", "2");
    std::env::set_var(
        "DBOPT_ROUTER_EXTRA",
        "[[limits.rules]]\nname = \"per-person\"\nscope = \"end_user\"\nusers = [\"app\"]\n\
         limit = 10\nwindow_ms = 1000\n",
    );
    let stack = Stack::start(2);
    let routers = Routers {
        second: start_second_router(&stack),
        stack: &stack,
    };
    per_user_limit_across_two_routers(&routers);
    per_end_user_limit(&routers);
    bad_end_users_are_refused_clearly(&routers);
    django_and_prisma_see_the_error(&routers);
    refusals_inside_transactions(&routers);
    global_limit_by_sighup_with_admin_bypass_and_warn_mode(&routers);
    redis_stopped_mid_run(&routers);
}

/// Four clients of `app_limited`, two on each router, in bursts for `secs`; `meanwhile` runs
/// while they do.
fn app_limited_bursts(routers: &Routers, secs: f64, meanwhile: impl FnOnce()) -> Vec<Sample> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let threads = (0..4)
        .map(|i| {
            let r = i % 2;
            let dsn = routers.dsn(r, "app_limited");
            burst(dsn, r, "app_limited", "SELECT 1".into(), secs, out.clone())
        })
        .collect();
    meanwhile();
    run(threads);
    let samples = out.lock().unwrap().clone();
    samples
}

fn per_user_limit_across_two_routers(routers: &Routers) {
    let samples = app_limited_bursts(routers, 2.0, || {});
    let all: Vec<&Sample> = samples.iter().collect();
    assert_refusals(
        &all,
        "rate limit \"app_limited\" exceeded: user \"app_limited\" may run 20 statements per 1s",
    );
    assert_window(&all, 20, 1000.0, "app_limited");
    utilisation(&all, 20, 1000.0, "per user, two routers");
    assert!(
        samples.iter().any(|x| x.router == 1 && x.ok)
            && samples.iter().any(|x| x.router == 0 && x.ok)
    );
    // Refused clients keep their connections: every thread's last statements ran again.
    let mut c = routers.connect(1, "app_limited");
    std::thread::sleep(Duration::from_millis(1100));
    c.simple_query("SELECT 1").expect("usable after refusals");
    // Cache hits count too (the check rides with the cache lookup when both go to Redis).
    let stack = routers.stack;
    let mut admin = stack.connect(&stack.primary().unwrap()).unwrap();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS rl_cached; CREATE TABLE rl_cached (n int);
             INSERT INTO rl_cached VALUES (1); GRANT SELECT ON rl_cached TO app_limited",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    // The second router's cache follows the primary's announcements again (a resynchronisation
    // bypasses the cache until it is done: those reads would not be hits).
    wait_for(
        Duration::from_secs(15),
        "the second router's cache to be in sync",
        || {
            let (_, body) = http::get(routers.admin(1), "/status")?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["cache"]["databases"]["postgres"]["synced"] == true).then_some(())
        },
    );
    let hits_before = cache_hits(&routers.metrics(1));
    let ok = (0..25)
        .filter(|_| {
            c.simple_query("SELECT n FROM rl_cached /* dbopt:cache ttl=60s */")
                .is_ok()
        })
        .count();
    assert_eq!(ok, 20, "20 of 25 cached reads admitted in one window");
    let hits_after = cache_hits(&routers.metrics(1));
    let second_cache = http::get(routers.admin(1), "/status")
        .map(|(_, b)| {
            serde_json::from_str::<serde_json::Value>(&b)
                .map(|v| v["cache"].to_string())
                .unwrap_or(b)
        })
        .unwrap_or_default();
    eprintln!(
        "25 cached reads of a table watched by the first of them: {} hits; the second router's cache: {second_cache}",
        hits_after - hits_before
    );
    assert!(
        hits_after > hits_before + 10.0,
        "most of them were cache hits: {hits_before} → {hits_after}; the second router's cache: {second_cache}"
    );
    // The admin user is never refused, whatever its rate.
    let mut ops = routers.connect(0, "ops");
    for _ in 0..200 {
        ops.simple_query("SELECT 1").expect("ops is never limited");
    }
}

fn per_end_user_limit(routers: &Routers) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for (i, who) in ["42", "42", "43", "42", "43", "none"].iter().enumerate() {
        let r = i % 2;
        let sql = if *who == "none" {
            "SELECT 2".to_string()
        } else {
            format!("SELECT 1 /*controller='orders',dbopt_user='{who}',framework='django%3A5.1'*/")
        };
        threads.push(burst(routers.dsn(r, "app"), r, who, sql, 2.0, out.clone()));
    }
    run(threads);
    let samples = out.lock().unwrap().clone();
    for who in ["42", "43"] {
        let mine: Vec<&Sample> = samples.iter().filter(|x| x.who == who).collect();
        assert_refusals(
            &mine,
            &format!("rate limit \"per-person\" exceeded: end user \"{who}\" of user \"app\" may run 10 statements per 1s"),
        );
        assert_window(&mine, 10, 1000.0, &format!("end user {who}"));
        utilisation(&mine, 10, 1000.0, &format!("end user {who}, two routers"));
    }
    assert!(
        samples.iter().filter(|x| x.who == "none").all(|x| x.ok),
        "statements naming no end user are not counted by an end-user rule"
    );

    // The session setting names the end user too, for that client only.
    let mut a = routers.connect(0, "app");
    let mut b = routers.connect(0, "app");
    std::thread::sleep(Duration::from_millis(1100));
    a.batch_execute("SET dbopt.end_user = '77'").unwrap();
    let refused = (0..15)
        .filter(|_| a.simple_query("SELECT 1").is_err())
        .count();
    assert!(
        refused >= 5,
        "end user 77 (by setting) was refused {refused} times of 15"
    );
    let e = a.simple_query("SELECT 1").unwrap_err();
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("end user \"77\" of user \"app\""),
        "{e}"
    );
    for _ in 0..30 {
        b.simple_query("SELECT 1")
            .expect("the setting never reaches another client");
    }
    // A comment wins over the setting; text in a string literal names nobody.
    a.simple_query("SELECT 1 /*dbopt_user='78'*/")
        .expect("another end user");
    std::thread::sleep(Duration::from_millis(1100));
    a.batch_execute("RESET dbopt.end_user").unwrap();
    let mut fill = routers.connect(1, "app");
    for _ in 0..12 {
        let _ = fill.simple_query("SELECT 1 /*dbopt_user='victim'*/");
    }
    b.simple_query("SELECT '/*dbopt_user=''victim''*/'")
        .expect("a literal is not a comment");
    let e = b
        .simple_query("SELECT 1 /*dbopt_user='victim'*/")
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "53400");
}

fn bad_end_users_are_refused_clearly(routers: &Routers) {
    let mut c = routers.connect(1, "app");
    for (sql, want) in [
        (
            "SELECT 1 /*dbopt_user='%zz'*/",
            "dbopt_user is not URL-encoded",
        ),
        ("SELECT 1 /*dbopt_user=''*/", "dbopt_user is empty"),
        ("SELECT 1 /*dbopt_user='42*/", "no closing quote"),
    ] {
        let e = c.simple_query(sql).unwrap_err();
        let db = e.as_db_error().unwrap();
        assert_eq!(db.code().code(), "22023", "{sql}");
        assert!(db.message().contains(want), "{sql}: {}", db.message());
        // Extended protocol too.
        let e = c.query(sql, &[]).unwrap_err();
        assert_eq!(e.code().unwrap().code(), "22023", "{sql}");
    }
    let long = format!("SELECT 1 /*dbopt_user='{}'*/", "x".repeat(129));
    let e = c.simple_query(&long).unwrap_err();
    let db = e.as_db_error().unwrap();
    assert!(db.message().contains("at most 128"), "{db:?}");
    c.simple_query("SELECT 1")
        .expect("the connection is usable");
}

/// A client program's JSON report of what it saw.
fn client_report(mut cmd: Command, what: &str) -> serde_json::Value {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: {e}: {stdout}"))
}

fn django_and_prisma_see_the_error(routers: &Routers) {
    let stack = routers.stack;
    let mut admin = stack.connect(&stack.primary().unwrap()).unwrap();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS rl_notes;
             CREATE TABLE rl_notes (id serial PRIMARY KEY, body text NOT NULL);
             INSERT INTO rl_notes (body) VALUES ('hello');
             GRANT SELECT ON rl_notes TO app",
        )
        .unwrap();
    let clients = dbopt_e2e::repo_root().join("tests/clients");
    let venv = std::env::var("DBOPT_CLIENTS_VENV")
        .unwrap_or_else(|_| "/var/tmp/dbopt-clients-venv".into());
    let port = routers.port(0).to_string();
    let password = &stack.info.app_password;

    let mut django = Command::new(format!("{venv}/bin/python"));
    django.arg(clients.join("django_limits.py")).args([
        "127.0.0.1",
        &port,
        "app",
        password,
        "django-user-1",
        "40",
    ]);
    let r = client_report(django, "the Django app");
    eprintln!("Django sees: {r}");
    assert_eq!(r["refused"], true, "{r}");
    assert_eq!(r["error"], "OperationalError", "{r}");
    assert_eq!(r["sqlstate"], "53400", "{r}");
    assert!(r["ran"].as_u64().unwrap() >= 8, "{r}");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("rate limit \"per-person\" exceeded: end user \"django-user-1\" of user \"app\" may run 10 statements per 1s; retry after"),
        "{r}"
    );
    assert!(
        r["detail"].as_str().unwrap().starts_with("Retry after "),
        "{r}"
    );

    let url = format!("postgresql://app:{password}@127.0.0.1:{port}/postgres");
    let mut prisma = Command::new(clients.join("node_modules/.bin/tsx"));
    prisma.current_dir(&clients).arg("prisma_limits.ts").args([
        url.as_str(),
        "prisma-user-1",
        "40",
    ]);
    let r = client_report(prisma, "the Prisma client");
    eprintln!("Prisma sees: {r}");
    assert_eq!(r["refused"], true, "{r}");
    assert!(r["ran"].as_u64().unwrap() >= 8, "{r}");
    let text = r.to_string();
    assert!(
        text.contains("rate limit \\\"per-person\\\" exceeded: end user \\\"prisma-user-1\\\"")
            && text.contains("retry after"),
        "{r}"
    );
}

fn refusals_inside_transactions(routers: &Routers) {
    let mut admin = routers
        .stack
        .connect(&routers.stack.primary().unwrap())
        .unwrap();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS rl_tx; CREATE TABLE rl_tx (n int);
             GRANT ALL ON rl_tx TO app_limited",
        )
        .unwrap();
    for extended in [false, true] {
        std::thread::sleep(Duration::from_millis(1100));
        let mut c = routers.connect(usize::from(extended), "app_limited");
        c.batch_execute("BEGIN; INSERT INTO rl_tx VALUES (1)")
            .unwrap();
        let mut refusal = None;
        for _ in 0..40 {
            let r = if extended {
                c.query("SELECT $1::int", &[&1i32]).map(|_| ())
            } else {
                c.simple_query("SELECT 1").map(|_| ())
            };
            if let Err(e) = r {
                refusal = Some(e);
                break;
            }
        }
        let e = refusal.expect("refused within 40 statements");
        assert_eq!(e.code().unwrap().code(), "53400", "{e}");
        // The transaction failed with the refused statement, as the client was told.
        let e = c.simple_query("SELECT 1").unwrap_err();
        assert_eq!(e.code().unwrap().code(), "25P02", "{e}");
        let end = c.simple_query("COMMIT").unwrap();
        assert!(
            matches!(&end[0], postgres::SimpleQueryMessage::CommandComplete(_)),
            "{end:?}"
        );
        let n: i64 = admin
            .query_one("SELECT count(*) FROM rl_tx", &[])
            .unwrap()
            .get(0);
        assert_eq!(
            n, 0,
            "nothing of the failed transaction was committed (extended: {extended})"
        );
        std::thread::sleep(Duration::from_millis(1100));
        c.simple_query("SELECT 1")
            .expect("usable after the refusal");
    }
}

fn global_limit_by_sighup_with_admin_bypass_and_warn_mode(routers: &Routers) {
    let rule = "\n[[limits.rules]]\nname = \"everything\"\nscope = \"global\"\nlimit = 150\nwindow_ms = 1000\n";
    routers.reload(|t| format!("{t}{rule}"));
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for (i, user) in ["app", "app_md5", "app_session", "app", "ops", "ops"]
        .iter()
        .enumerate()
    {
        let r = i % 2;
        threads.push(burst(
            routers.dsn(r, user),
            r,
            user,
            "SELECT 1".into(),
            2.0,
            out.clone(),
        ));
    }
    run(threads);
    let samples = out.lock().unwrap().clone();
    let ops: Vec<&Sample> = samples.iter().filter(|x| x.who == "ops").collect();
    assert!(ops.iter().all(|x| x.ok), "the admin is never refused");
    let others: Vec<&Sample> = samples.iter().filter(|x| x.who != "ops").collect();
    assert_refusals(
        &others,
        "rate limit \"everything\" exceeded: all statements may run 150 statements per 1s",
    );
    assert_window(&others, 150, 1000.0, "global");
    utilisation(&others, 150, 1000.0, "global, two routers");
    eprintln!(
        "global: the admin ran {} statements, none refused",
        ops.len()
    );
    let m = routers.metrics(0) + &routers.metrics(1);
    let bypassed = metric(
        &m,
        "dbopt_router_limit_statements_total{rule=\"everything\",outcome=\"bypassed\"}",
    );
    assert!(bypassed > 0.0, "admin statements counted as bypassed:\n{m}");
    let refused = metric(
        &m,
        "dbopt_router_limit_statements_total{rule=\"everything\",outcome=\"refused\"}",
    );
    assert!(refused > 0.0);

    // Warn mode: over the limit, a WARNING and the statement runs.
    routers.reload(|t| {
        t.replace(
            rule,
            &rule.replace("window_ms = 1000\n", "window_ms = 1000\nmode = \"warn\"\n"),
        )
    });
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = notices.clone();
    let mut config: postgres::Config = routers.dsn(0, "app").parse().unwrap();
    config.notice_callback(move |n| {
        seen.lock()
            .unwrap()
            .push(format!("{} {}", n.code().code(), n.message()))
    });
    let mut c = config.connect(postgres::NoTls).unwrap();
    for _ in 0..400 {
        c.simple_query("SELECT 1").expect("warn mode never refuses");
    }
    let notices = notices.lock().unwrap();
    assert!(
        notices
            .iter()
            .any(|n| n.starts_with("53400 ") && n.contains("warn mode")),
        "{notices:?}"
    );
    routers.reload(|t| {
        t.replace(
            &rule.replace("window_ms = 1000\n", "window_ms = 1000\nmode = \"warn\"\n"),
            "",
        )
    });
}

fn redis_stopped_mid_run(routers: &Routers) {
    let stack = routers.stack;
    // Redis goes away while the clients run.
    let mut stopped_at = 0.0;
    let samples = app_limited_bursts(routers, 4.0, || {
        std::thread::sleep(Duration::from_millis(500));
        assert!(stack.script(&["stop-redis"]).status.success());
        stopped_at = now_ms();
    });
    // Once both routers noticed (their first failed call), each enforces half the limit alone.
    let local: Vec<&Sample> = samples
        .iter()
        .filter(|x| x.s > stopped_at + 300.0)
        .collect();
    let ok = local.iter().filter(|x| x.ok).count();
    eprintln!(
        "Redis stopped: {} statements after it, {ok} admitted, each router alone on half the limit",
        local.len()
    );
    assert!(
        ok > 0,
        "the local fallback admits; last statements: {:?}",
        local.iter().rev().take(3).collect::<Vec<_>>()
    );
    assert!(
        local
            .iter()
            .filter(|x| !x.ok)
            .all(|x| x.detail.contains("Redis is unreachable")),
        "refusals say they were decided locally"
    );
    for r in 0..2 {
        let mine: Vec<&Sample> = local.iter().copied().filter(|x| x.router == r).collect();
        assert_window(&mine, 10, 1000.0, &format!("router {r} alone"));
    }
    assert_window(&local, 20, 1000.0, "both routers without Redis");
    for r in 0..2 {
        let m = routers.metrics(r);
        assert_eq!(metric(&m, "dbopt_router_limit_redis_up "), 0.0, "{m}");
        assert!(
            metric(
                &m,
                "dbopt_router_limit_fallback_total{rule=\"app_limited\"}"
            ) > 0.0
        );
    }

    // Fail-closed, by SIGHUP: nothing under a limit runs while Redis is away.
    routers.reload(|t| t.replace("on_redis_error = \"local\"", "on_redis_error = \"closed\""));
    let mut c = routers.connect(0, "app_limited");
    let e = c.simple_query("SELECT 1").unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "53400");
    assert!(
        db.detail().unwrap_or_default().contains("\"closed\""),
        "{db:?}"
    );
    routers
        .connect(1, "app")
        .simple_query("SELECT 1")
        .expect("statements under no rule run");
    routers.reload(|t| t.replace("on_redis_error = \"closed\"", "on_redis_error = \"local\""));

    // Redis returns: shared windows again.
    assert!(stack.script(&["start-redis"]).status.success());
    wait_for(
        Duration::from_secs(10),
        "both routers back on Redis",
        || {
            for r in 0..2 {
                let _ = routers.connect(r, "app_limited").simple_query("SELECT 1");
            }
            (0..2)
                .all(|r| metric(&routers.metrics(r), "dbopt_router_limit_redis_up ") == 1.0)
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(1100));
    let samples = app_limited_bursts(routers, 2.0, || {});
    let all: Vec<&Sample> = samples.iter().collect();
    assert!(all
        .iter()
        .filter(|x| !x.ok)
        .all(|x| !x.detail.contains("unreachable")));
    assert_window(&all, 20, 1000.0, "shared again");
    utilisation(&all, 20, 1000.0, "per user, Redis back");
}
