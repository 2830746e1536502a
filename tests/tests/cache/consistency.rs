//! The randomized consistency run of `cache.rs`: writers through the router and straight on the
//! primary, readers cached and uncached (and another user's), every read checked against the
//! three promises, through a paused replica, a Redis restart, a dropped listener and a failover.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dbopt_e2e::stack::Stack;
use dbopt_e2e::wait_for;

use super::status;

/// What every reader checks each read against.
struct Truth {
    /// Highest version acknowledged to a router writer, per key (read-your-writes lower bound).
    acked: Vec<AtomicI64>,
    /// Every acknowledged write: (when, key, version, through the router).
    writes: Mutex<Vec<(Instant, i32, i64, bool)>>,
    /// Reads by another router user (`ops`, which reads on the primary when it misses): (started,
    /// key, version read, cached).
    other_reads: Mutex<Vec<(Instant, i32, i64, bool)>>,
    /// Writers hold off while set (around the failover: asynchronous replication may lose the
    /// last commits of a killed primary, which is not the cache's doing).
    hold_writes: AtomicBool,
    violations: Mutex<Vec<String>>,
    ops: AtomicU64,
    stop: AtomicBool,
}

fn connect_retry(f: impl Fn() -> Result<postgres::Client, postgres::Error>) -> postgres::Client {
    wait_for(Duration::from_secs(120), "a connection", || f().ok())
}

pub fn randomized_consistency(stack: &Stack) {
    let total: u64 = std::env::var("DBOPT_CACHE_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // Keys live in four tables (key % 4); writes favour the first, so the others stay cached
    // long enough for hits while the first churns.
    const KEYS: i32 = 32;
    let mut p = stack.connect("node0").unwrap();
    for t in 0..4 {
        p.batch_execute(&format!(
            "DROP TABLE IF EXISTS kv_{t};
             CREATE TABLE kv_{t} (id int PRIMARY KEY, ver bigint NOT NULL);
             GRANT ALL ON kv_{t} TO app;
             INSERT INTO kv_{t} SELECT g, 0 FROM generate_series(0, {KEYS} - 1) g WHERE g % 4 = {t};"
        ))
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let truth = Arc::new(Truth {
        acked: (0..KEYS).map(|_| AtomicI64::new(0)).collect(),
        writes: Mutex::new(Vec::new()),
        other_reads: Mutex::new(Vec::new()),
        hold_writes: AtomicBool::new(false),
        violations: Mutex::new(Vec::new()),
        ops: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let started = Instant::now();
    let mut handles = Vec::new();
    // Writers: one through the router (user app), one straight on the primary.
    for direct in [false, true] {
        let truth = truth.clone();
        let router_dsn = stack.router_dsn("app");
        let info = stack.info.clone();
        handles.push(std::thread::spawn(move || {
            let connect = || -> Result<postgres::Client, postgres::Error> {
                if direct {
                    // Whichever node takes writes now.
                    for n in &info.nodes {
                        let dsn = format!(
                            "host=127.0.0.1 port={} user=postgres password={} dbname=postgres connect_timeout=2",
                            n.port, info.pg_password
                        );
                        if let Ok(mut c) = postgres::Client::connect(&dsn, postgres::NoTls) {
                            let ro: bool = c.query_one("SELECT pg_is_in_recovery()", &[])?.get(0);
                            if !ro {
                                return Ok(c);
                            }
                        }
                    }
                    postgres::Client::connect("host=127.0.0.1 port=1 connect_timeout=1", postgres::NoTls)
                } else {
                    postgres::Client::connect(&router_dsn, postgres::NoTls)
                }
            };
            let mut c = connect_retry(connect);
            let mut i = 0u64;
            while !truth.stop.load(Ordering::Relaxed) {
                if truth.hold_writes.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                i += 1;
                let r = i.wrapping_mul(2_654_435_761);
                // 70 % of writes to table 0, 20 % to 1, 8 % to 2, 2 % to 3.
                let table = match r % 100 {
                    0..=69 => 0,
                    70..=89 => 1,
                    90..=97 => 2,
                    _ => 3,
                };
                let key = ((r / 100) % (KEYS as u64 / 4)) as i32 * 4 + table;
                let sql = format!("UPDATE kv_{table} SET ver = ver + 1 WHERE id = $1 RETURNING ver");
                match c.query_one(&sql, &[&key]) {
                    Ok(r) => {
                        let v: i64 = r.get(0);
                        if !direct {
                            truth.acked[key as usize].fetch_max(v, Ordering::SeqCst);
                        }
                        truth.writes.lock().unwrap().push((Instant::now(), key, v, !direct));
                        truth.ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(50));
                        c = connect_retry(connect);
                    }
                }
            }
        }));
    }
    // Readers through the router: cached and uncached reads mixed, every read checked.
    for reader in 0..3u64 {
        let truth = truth.clone();
        let dsn = stack.router_dsn("app");
        handles.push(std::thread::spawn(move || {
            let connect = || postgres::Client::connect(&dsn, postgres::NoTls);
            let mut c = connect_retry(connect);
            let mut seen: HashMap<i32, i64> = HashMap::new();
            let mut x = reader.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            while !truth.stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key = (x % KEYS as u64) as i32;
                let cached = x % 3 != 0;
                let floor = truth.acked[key as usize].load(Ordering::SeqCst);
                let sql = if cached {
                    format!("/* dbopt:cache */ SELECT ver FROM kv_{} WHERE id = $1", key % 4)
                } else {
                    format!("SELECT ver FROM kv_{} WHERE id = $1", key % 4)
                };
                let v: i64 = match c.query_one(&sql, &[&key]) {
                    Ok(r) => r.get(0),
                    Err(_) => {
                        // A failover or a dropped connection: a new connection is a new client.
                        std::thread::sleep(Duration::from_millis(50));
                        c = connect_retry(connect);
                        seen.clear();
                        continue;
                    }
                };
                truth.ops.fetch_add(1, Ordering::Relaxed);
                let mut bad = Vec::new();
                if v < floor {
                    bad.push(format!("read-your-writes: key {key} read {v} after {floor} was acknowledged (cached {cached})"));
                }
                if let Some(&prev) = seen.get(&key) {
                    if v < prev {
                        bad.push(format!("back in time: key {key} read {v} after {prev} (cached {cached})"));
                    }
                }
                seen.insert(key, v.max(seen.get(&key).copied().unwrap_or(0)));
                if !bad.is_empty() {
                    truth.violations.lock().unwrap().extend(bad);
                }
            }
        }));
    }
    // Another user: no read-your-writes relation with the writers, and critical (its misses
    // read the primary), so what it reads is checked against the acknowledged writes themselves.
    p.batch_execute(
        &(0..4)
            .map(|t| format!("GRANT SELECT ON kv_{t} TO ops;"))
            .collect::<String>(),
    )
    .unwrap();
    {
        let truth = truth.clone();
        let dsn = stack.router_dsn("ops");
        handles.push(std::thread::spawn(move || {
            let connect = || postgres::Client::connect(&dsn, postgres::NoTls);
            let mut c = connect_retry(connect);
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            while !truth.stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key = (x % KEYS as u64) as i32;
                let cached = !x.is_multiple_of(4);
                let sql = format!(
                    "{}SELECT ver FROM kv_{} WHERE id = $1",
                    if cached { "/* dbopt:cache */ " } else { "" },
                    key % 4
                );
                let started = Instant::now();
                match c.query_one(&sql, &[&key]) {
                    Ok(r) => {
                        truth
                            .other_reads
                            .lock()
                            .unwrap()
                            .push((started, key, r.get(0), cached));
                        truth.ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(50));
                        c = connect_retry(connect);
                    }
                }
            }
        }));
    }
    let phase = |name: &str, until: u64| {
        eprintln!(
            "consistency: {name} (ops so far {})",
            truth.ops.load(Ordering::Relaxed)
        );
        wait_for(Duration::from_secs(600), name, || {
            (truth.ops.load(Ordering::Relaxed) >= until).then_some(())
        });
    };
    phase("steady", total / 5);
    // A replica lags on purpose.
    let mut lagging = stack.connect("node2").unwrap();
    lagging
        .batch_execute("SELECT pg_wal_replay_pause()")
        .unwrap();
    phase("node2 paused", 2 * total / 5);
    lagging
        .batch_execute("SELECT pg_wal_replay_resume()")
        .unwrap();
    // Redis restarts (entries and tags gone; the router bypasses it, then resynchronises).
    let out = stack.script(&["restart-redis"]);
    assert!(
        out.status.success(),
        "restart redis: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    phase("after a Redis restart", 3 * total / 5);
    // The listening connection drops.
    let killed: i64 = p
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'dbopt-router cache listener'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(killed >= 1, "the listener was connected");
    phase("after the listener was dropped", 4 * total / 5);
    // A failover: the run goes on until well after the router writes to the new primary.
    truth.hold_writes.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(1));
    let out = stack.script(&["kill", "node0"]);
    assert!(out.status.success(), "kill node0");
    wait_for(
        Duration::from_secs(120),
        "the router to follow the failover",
        || {
            let p = stack.router_status()["primary"]
                .as_str()
                .map(str::to_string);
            p.filter(|p| p != "node0")
        },
    );
    truth.hold_writes.store(false, Ordering::SeqCst);
    let after = truth.ops.load(Ordering::Relaxed);
    phase("after a failover", total.max(after + total / 5));
    truth.stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let st = status(stack);
    eprintln!(
        "consistency: {} operations in {:.1} s; cache status {}",
        truth.ops.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        st
    );
    // No staleness of the cache's own: a read by another user started after a write through the
    // router was acknowledged sees it (no allowance); after a write straight on the primary, the
    // allowance is the invalidation delay the router measured.
    let allowance = Duration::from_secs_f64(
        st["invalidation_delay_ms"]["max"].as_f64().unwrap_or(0.0) / 1000.0,
    );
    let writes = truth.writes.lock().unwrap().clone();
    let reads = truth.other_reads.lock().unwrap().clone();
    let mut stale = Vec::new();
    for (started, key, v, cached) in &reads {
        let required = writes
            .iter()
            .filter(|(at, k, _, routed)| {
                k == key
                    && if *routed {
                        at < started
                    } else {
                        *at + allowance < *started
                    }
            })
            .map(|w| w.2)
            .max()
            .unwrap_or(0);
        if *v < required {
            stale.push(format!(
                "stale: key {key} read {v} by another user, {required} was due (cached {cached})"
            ));
        }
    }
    eprintln!(
        "consistency: {} reads by another user checked against {} acknowledged writes; allowance {:.1} ms after writes straight on the primary",
        reads.len(),
        writes.len(),
        allowance.as_secs_f64() * 1000.0
    );
    let mut v = truth.violations.lock().unwrap().clone();
    v.extend(stale);
    assert!(
        v.is_empty(),
        "{} violations, first: {:?}",
        v.len(),
        &v[..v.len().min(10)]
    );
    assert!(
        st["local"]["hits"].as_u64().unwrap_or(0) > 0,
        "the cache was used"
    );
}
