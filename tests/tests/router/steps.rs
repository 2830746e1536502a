//! dbopt-router on the local stack (`scripts/stack up` starts it): real clients through it, and
//! where each statement ran checked on the server side (`inet_server_port()`,
//! `pg_is_in_recovery()`).

// A failed call is the test failure; `unwrap` says so as well as `expect` would here.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use dbopt_e2e::stack::Stack;
use dbopt_e2e::{http, repo_root, wait_for};

fn port_of(stack: &Stack, name: &str) -> i32 {
    i32::from(stack.node(name).port)
}

fn replica_ports(stack: &Stack, primary: &str) -> HashSet<i32> {
    stack
        .info
        .nodes
        .iter()
        .filter(|n| n.name != primary)
        .map(|n| i32::from(n.port))
        .collect()
}

fn routed(stack: &Stack, route: &str) -> u64 {
    stack.router_status()["routed"][route].as_u64().unwrap_or(0)
}

/// Waits until the router has found the roles and every replica is usable.
pub fn router_is_ready(stack: &Stack) {
    wait_for(
        Duration::from_secs(30),
        "the router to see all four nodes",
        || {
            let s = stack.router_status();
            let nodes = s["nodes"].as_array()?;
            (s["primary"] == "node0"
                && nodes
                    .iter()
                    .all(|n| n["reachable"] == true && n["replay_lag_s"].is_number()))
            .then_some(())
        },
    );
}

pub fn reads_go_to_replicas_and_writes_to_the_primary(stack: &Stack) {
    let replicas = replica_ports(stack, "node0");
    // Clients are spread over the replicas; one client's burst of reads stays on the node that
    // served it (another node may be behind what it has read: never back in time).
    // Balancing weighs in each node's response time, so a replica that was slow at start gets few
    // clients: connect until every replica has served some (at most 300 clients).
    let mut seen = HashSet::new();
    for _ in 0..300 {
        if seen == replicas {
            break;
        }
        let mut c = stack.router("app").expect("connect through the router");
        let mut first = None;
        for _ in 0..3 {
            let row = c
                .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
                .expect("read");
            let port: i32 = row.get(0);
            assert!(row.get::<_, bool>(1), "read ran on a replica");
            assert!(replicas.contains(&port), "read on {port}");
            assert_eq!(
                *first.get_or_insert(port),
                port,
                "a burst stays on one node"
            );
            seen.insert(port);
        }
    }
    assert_eq!(seen, replicas, "reads are spread over all three replicas");
    let mut c = stack.router("app").expect("connect through the router");

    // BEGIN READ ONLY may use a replica (before this client writes: after a write its reads
    // stay on the primary until a replica has replayed it).
    c.batch_execute("BEGIN READ ONLY").unwrap();
    let a: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    let b: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    c.batch_execute("COMMIT").unwrap();
    assert!(
        replicas.contains(&a) && a == b,
        "a read-only transaction on one replica: {a} {b}"
    );

    c.batch_execute("CREATE TABLE IF NOT EXISTS router_rows (id int PRIMARY KEY, note text)")
        .expect("DDL through the router");
    let port: i32 = c
        .query_one(
            "INSERT INTO router_rows VALUES (1, 'one') RETURNING inet_server_port()",
            &[],
        )
        .expect("insert")
        .get(0);
    assert_eq!(
        port,
        port_of(stack, "node0"),
        "the write ran on the primary"
    );

    // A transaction stays on the primary.
    let mut tx = c.transaction().expect("begin");
    let port: i32 = tx
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    assert_eq!(port, port_of(stack, "node0"));
    tx.commit().unwrap();
    // Locking reads, sequences and hints.
    let p: i32 = c
        .query_one(
            "SELECT inet_server_port() FROM router_rows WHERE id = 1 FOR UPDATE",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(p, port_of(stack, "node0"), "SELECT … FOR UPDATE");
    let p: i32 = c
        .query_one("/* dbopt:primary */ SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    assert_eq!(p, port_of(stack, "node0"), "dbopt:primary hint");
    let before = routed(stack, "critical");
    let mut ops = stack.router("ops").expect("connect as the critical user");
    let p: i32 = ops
        .query_one("SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        p,
        port_of(stack, "node0"),
        "a critical user's read uses the primary"
    );
    let p: i32 = c
        .query_one("/* dbopt:critical */ SELECT inet_server_port()", &[])
        .unwrap()
        .get(0);
    assert_eq!(p, port_of(stack, "node0"));
    assert!(routed(stack, "critical") >= before + 2);
}

pub fn prepared_statements_work_under_transaction_pooling(stack: &Stack) {
    // rust-postgres prepares named statements; with transaction pooling each execution may run
    // on another server connection (and for reads, another replica).
    let mut c = stack.router("app").expect("connect");
    let read = c
        .prepare("SELECT $1::int + 1, inet_server_port()")
        .expect("prepare read");
    let write = c
        .prepare("INSERT INTO router_rows VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET note = excluded.note")
        .expect("prepare write");
    // Reads first: once this client writes, its reads stay on the primary until replayed. A
    // burst of reads stays on one node; after a pause (the router has sampled the primary's
    // position since, and every replica is past it) the client may move.
    let mut ports = HashSet::new();
    for i in 0..60 {
        if i % 10 == 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let row = c.query_one(&read, &[&i]).expect("execute prepared read");
        assert_eq!(row.get::<_, i32>(0), i + 1);
        ports.insert(row.get::<_, i32>(1));
    }
    for i in 0..60 {
        c.execute(&write, &[&(1000 + i), &format!("p{i}")])
            .expect("execute prepared write");
    }
    assert!(
        ports.len() >= 2,
        "the prepared read ran on several replicas: {ports:?}"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM router_rows WHERE id >= 1000", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 60);
    // Two clients preparing the same text share one server-side statement; closing one client's
    // statement does not disturb the other.
    let mut d = stack.router("app").expect("second client");
    let mine = d.prepare("SELECT $1::int + 1, inet_server_port()").unwrap();
    drop(read);
    for i in 0..10 {
        assert_eq!(d.query_one(&mine, &[&i]).unwrap().get::<_, i32>(0), i + 1);
    }
    // A statement that fails to prepare is reported and the session goes on.
    let e = c.prepare("SELEC nonsense").unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42601"), "{e}");
    assert_eq!(c.query_one("SELECT 7", &[]).unwrap().get::<_, i32>(0), 7);
}

pub fn reads_see_the_clients_own_writes(stack: &Stack) {
    let mut c = stack.router("app").expect("connect");
    c.batch_execute("CREATE TABLE IF NOT EXISTS ryw (id int PRIMARY KEY, v int)")
        .unwrap();
    let mut on_replica = 0;
    for i in 0..200 {
        c.execute("INSERT INTO ryw VALUES ($1, $1)", &[&i])
            .expect("write");
        let row = c
            .query_opt(
                "SELECT v, pg_is_in_recovery() FROM ryw WHERE id = $1",
                &[&i],
            )
            .expect("read back");
        let row = row.unwrap_or_else(|| panic!("row {i} written and not read back"));
        assert_eq!(row.get::<_, i32>(0), i);
        on_replica += usize::from(row.get::<_, bool>(1));
    }
    eprintln!("read-your-writes: 200 writes each read back at once; {on_replica} of the reads ran on a replica");
    // Once the replicas have replayed, reads use them again.
    wait_for(Duration::from_secs(15), "reads back on replicas", || {
        let r: bool = c.query_one("SELECT pg_is_in_recovery()", &[]).ok()?.get(0);
        r.then_some(())
    });
}

/// `SET search_path` (django-tenants does it on every request) follows the client to every server
/// connection, reads on replicas included, and never leaks to another client (who runs the same
/// prepared text: PostgreSQL re-plans it under that client's search_path).
pub fn search_path_follows_its_client_only(stack: &Stack) {
    let mut a = stack.router("app").expect("connect");
    a.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS tenant1;
         CREATE TABLE IF NOT EXISTS tenant1.items (n int);
         TRUNCATE tenant1.items; INSERT INTO tenant1.items VALUES (42)",
    )
    .unwrap();
    a.batch_execute("SET search_path = tenant1, public")
        .unwrap();
    // Let the replicas replay the table so the reads below can use them.
    std::thread::sleep(Duration::from_millis(300));
    let mut on_replica = 0;
    for _ in 0..20 {
        let row = a
            .query_one("SELECT n, pg_is_in_recovery() FROM items", &[])
            .expect("unqualified name resolved through the client's search_path");
        assert_eq!(row.get::<_, i32>(0), 42);
        on_replica += usize::from(row.get::<_, bool>(1));
    }
    assert!(on_replica > 0, "some of the reads ran on replicas");
    let sp: String = a.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(sp, "tenant1, public");

    let mut b = stack.router("app").expect("connect");
    for _ in 0..20 {
        let e = b
            .query_one("SELECT n, pg_is_in_recovery() FROM items", &[])
            .unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("42P01"), "{e}");
    }
    let sp: String = b.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(
        sp, "\"$user\", public",
        "the other client keeps the default"
    );
    a.batch_execute("RESET search_path").unwrap();
    let e = a.query_one("SELECT n FROM items", &[]).unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42P01"), "{e}");
}

pub fn psql_pgbench_and_psycopg_work_through_the_router(stack: &Stack) {
    let dsn = stack.router_dsn("app");
    let psql = |args: &[&str], input: &str| {
        let mut child = Command::new("psql")
            .arg(&dsn)
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "psql {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Multi-statement simple query, COPY out and in.
    let out = psql(&["-c", "SELECT 1; SELECT 2"], "");
    assert_eq!(out.trim(), "1\n2");
    let out = psql(
        &["-c", "COPY (SELECT generate_series(1, 1000)) TO STDOUT"],
        "",
    );
    assert_eq!(out.lines().count(), 1000);
    psql(&["-c", "CREATE TABLE IF NOT EXISTS copied (n int)"], "");
    let rows: String = (1..=500).map(|i| format!("{i}\n")).collect();
    psql(&["-c", "COPY copied FROM STDIN"], &rows);
    let out = psql(&["-c", "SELECT count(*), sum(n) FROM copied"], "");
    assert_eq!(out.trim(), "500|125250");
    // A notice and an error come through; the error does not end the session.
    let out = psql(
        &[
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            "SELECT 1/0",
            "-c",
            "SELECT 'after'",
        ],
        "",
    );
    assert_eq!(out.trim(), "after");

    // pgbench: initialise through the router (DDL, COPY, VACUUM), then every protocol.
    let pgbench = |args: &[&str]| {
        let out = Command::new("pgbench")
            .args(args)
            .arg(&dsn)
            .output()
            .expect("pgbench runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench {args:?}:\n{text}");
        text
    };
    pgbench(&["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        for workload in [&["-S"][..], &[][..]] {
            let mut args = vec!["-n", "-c", "4", "-j", "2", "-T", "2", "-M", mode];
            args.extend_from_slice(workload);
            let text = pgbench(&args);
            assert!(text.contains("number of failed transactions: 0"), "{text}");
        }
    }

    // psycopg 3, as Django uses it (the Debian package the scripts install).
    let out = Command::new("/usr/bin/python3")
        .arg(repo_root().join("tests/python/psycopg_router.py"))
        .arg(&dsn)
        .arg(stack.node("node0").port.to_string())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "psycopg script:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
}

pub fn auth_cancel_and_bad_input(stack: &Stack) {
    // Wrong password, unknown user: 28P01 either way (no user enumeration).
    for (user, pw) in [("app", "wrong"), ("nobody", "app-secret")] {
        let dsn = format!(
            "host=127.0.0.1 port={} user={user} password={pw} dbname=postgres",
            stack.info.router_port
        );
        let Err(e) = postgres::Client::connect(&dsn, postgres::NoTls) else {
            panic!("{user} logged in with password {pw}");
        };
        assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{user}: {e}");
    }
    // md5 and session pooling users.
    let mut m = stack.router("app_md5").expect("md5 login");
    assert_eq!(m.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0), 1);
    let mut s = stack.router("app_session").expect("session-mode login");
    s.batch_execute("SET work_mem = '7MB'").unwrap();
    let w: String = s.query_one("SHOW work_mem", &[]).unwrap().get(0);
    assert_eq!(w, "7MB", "session mode keeps session state");
    drop(s);

    // Cancel: forwarded to the server backend running the statement.
    let mut c = stack.router("app").expect("connect");
    let token = c.cancel_token();
    let started = Instant::now();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        token.cancel_query(postgres::NoTls)
    });
    let e = c.query_one("SELECT pg_sleep(20)", &[]).unwrap_err();
    canceller.join().unwrap().expect("cancel request sent");
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(c.query_one("SELECT 2", &[]).unwrap().get::<_, i32>(0), 2);

    // Malformed protocol input gets an ErrorResponse and a closed connection; the router lives.
    let addr = ([127, 0, 0, 1], stack.info.router_port).into();
    let cases: Vec<Vec<u8>> = vec![
        vec![0, 0, 0, 3],                                      // startup length too small
        vec![0, 1, 0, 0, 0, 3, 0, 0],                          // startup length too large
        vec![0, 0, 0, 8, 0, 2, 0, 0],                          // protocol 2.0
        vec![0, 0, 0, 12, 0, 3, 0, 0, b'u', b's', b'e', b'r'], // unterminated parameter
    ];
    for bytes in cases {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        assert_eq!(reply.first(), Some(&b'E'), "ErrorResponse for {bytes:?}");
        assert!(String::from_utf8_lossy(&reply).contains("08P01"));
    }
    // After login: an oversized message and an unknown message type.
    let mut raw = Vec::new();
    fuzz_session(stack, &mut raw, &[b'Q', 0x7f, 0xff, 0xff, 0xff]);
    assert!(
        String::from_utf8_lossy(&raw).contains("more than the limit"),
        "{raw:?}"
    );
    fuzz_session(stack, &mut raw, &[b'!', 0, 0, 0, 4]);
    assert!(String::from_utf8_lossy(&raw).contains("unknown frontend message type"));
    // Random bytes after login, many times.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        let len = (seed % 64) as usize + 1;
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        fuzz_session(stack, &mut raw, &junk);
    }
    let mut c = stack.router("app").expect("the router still serves");
    assert_eq!(c.query_one("SELECT 3", &[]).unwrap().get::<_, i32>(0), 3);
}

/// Logs in by hand as the md5 user (a SCRAM exchange written by hand would be longer), sends
/// `junk`, and collects what the router answers into `out`.
fn fuzz_session(stack: &Stack, out: &mut Vec<u8>, junk: &[u8]) {
    out.clear();
    let mut s = raw_login(stack);
    let _ = s.write_all(junk);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.read_to_end(out);
}

/// A raw protocol connection logged in as the md5 user, after its first ReadyForQuery.
pub fn raw_login(stack: &Stack) -> TcpStream {
    let addr = ([127, 0, 0, 1], stack.info.router_port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut startup = Vec::new();
    let params = b"user\0app_md5\0database\0postgres\0\0";
    startup.extend_from_slice(&((8 + params.len()) as i32).to_be_bytes());
    startup.extend_from_slice(&196_608i32.to_be_bytes());
    startup.extend_from_slice(params);
    s.write_all(&startup).unwrap();
    let mut head = [0u8; 13];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[..9], &[b'R', 0, 0, 0, 12, 0, 0, 0, 5], "md5 request");
    let salt = [head[9], head[10], head[11], head[12]];
    let response = format!(
        "{}\0",
        dbopt_router::auth::md5_response("app_md5", &stack.info.app_password, salt)
    );
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&((4 + response.len()) as i32).to_be_bytes());
    msg.extend_from_slice(response.as_bytes());
    s.write_all(&msg).unwrap();
    // Read up to ReadyForQuery.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = s.read(&mut chunk).expect("login reply");
        assert!(
            n > 0,
            "router closed during login: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    s
}

pub fn metrics_and_reload(stack: &Stack) {
    let (code, body) = http::get(stack.info.router_admin_port, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
    let names: HashSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for m in [
        "dbopt_router_routed_total",
        "dbopt_router_pool_in_use",
        "dbopt_router_pool_waiting",
        "dbopt_router_node_up",
        "dbopt_router_node_breaker_open",
        "dbopt_router_node_replay_lag_seconds",
    ] {
        assert!(names.contains(m), "{m} missing from /metrics");
    }

    // SIGHUP: a user added to the file can log in; an open session is not dropped.
    let mut open = stack.router("app").expect("connect");
    let path = format!("{}/router.toml", stack.info.dir);
    let mut text = std::fs::read_to_string(&path).unwrap();
    // It runs as the existing role app (mapped: its own password to the router, app's to PostgreSQL).
    text.push_str(&format!(
        "\n[[users]]\nname = \"late\"\npassword = \"late-pw\"\nserver_user = \"app\"\nserver_password = \"{}\"\n",
        stack.info.app_password
    ));
    std::fs::write(&path, text).unwrap();
    let pid = std::fs::read_to_string(format!("{}/run/router.pid", stack.info.dir)).unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", pid.trim()])
        .status()
        .unwrap();
    assert!(ok.success());
    let dsn = format!(
        "host=127.0.0.1 port={} user=late password=late-pw dbname=postgres",
        stack.info.router_port
    );
    wait_for(
        Duration::from_secs(10),
        "the reloaded user to log in",
        || postgres::Client::connect(&dsn, postgres::NoTls).ok(),
    );
    let mut late = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
    let who: String = late
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(who, "app", "late runs as the role it is mapped to");
    assert_eq!(open.query_one("SELECT 5", &[]).unwrap().get::<_, i32>(0), 5);
}

pub fn a_stopped_replica_leaves_and_rejoins(stack: &Stack) {
    let node2 = port_of(stack, "node2");
    let out = stack.script(&["kill", "node2"]);
    assert!(out.status.success(), "kill node2");
    let node_state = |field: &str| stack.router_status()["nodes"][2][field].clone();
    wait_for(Duration::from_secs(20), "node2 to leave", || {
        (node_state("reachable") == false).then_some(())
    });
    // Failures (a check per second, failed connects) must outweigh the successes still in the
    // 60 s window: allow for a slow machine.
    wait_for(Duration::from_secs(75), "node2's breaker to open", || {
        (node_state("breaker") == "open").then_some(())
    });
    // Reads go on, on the other replicas.
    let mut c = stack.router("app").expect("connect");
    for _ in 0..20 {
        let p: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .expect("read")
            .get(0);
        assert_ne!(p, node2);
    }
    let out = stack.script(&["start", "node2"]);
    assert!(out.status.success(), "start node2");
    stack.wait_healthy(Duration::from_secs(120));
    let back = Instant::now();
    wait_for(Duration::from_secs(60), "reads on node2 again", || {
        let p: i32 = c.query_one("SELECT inet_server_port()", &[]).ok()?.get(0);
        (p == node2).then_some(())
    });
    assert_eq!(
        node_state("breaker"),
        "closed",
        "the trial closed the breaker"
    );
    eprintln!(
        "node2 back in the read rotation {:.1} s after it was healthy again",
        back.elapsed().as_secs_f64()
    );
}

/// After Patroni promoted `new_primary`: writes through the router resume there.
pub fn writes_resume_through_the_router(stack: &Stack, new_primary: &str, killed: Instant) {
    let took = wait_for(Duration::from_secs(60), "writes through the router", || {
        let mut c = stack.router("app").ok()?;
        let p: i32 = c
            .query_one(
                "INSERT INTO router_rows VALUES (2, 'after failover') RETURNING inet_server_port()",
                &[],
            )
            .ok()?
            .get(0);
        Some((p, killed.elapsed()))
    });
    assert_eq!(took.0, port_of(stack, new_primary));
    eprintln!(
        "failover: writes through dbopt-router accepted on {new_primary} {:.1} s after node0 was killed",
        took.1.as_secs_f64()
    );
    assert_eq!(stack.router_status()["primary"], new_primary);
}
