//! End-to-end: a replica stopped while the primary wrote more WAL than it keeps comes back
//! streaming with no human step — the router sees it not streaming and needing WAL the primary
//! no longer has, and asks its Patroni to re-clone it (`health.reclone_lost_replicas`).

use std::time::{Duration, Instant};

use dbopt_e2e::stack::Stack;
use dbopt_e2e::{http, wait_for};

/// The stack keeps this much WAL for lagging replicas (wal_keep_size) in this test.
const KEEP_MB: i64 = 32;

#[test]
fn a_replica_behind_the_kept_wal_is_recloned() {
    std::env::set_var("DBOPT_WAL_KEEP_MB", KEEP_MB.to_string());
    std::env::set_var("DBOPT_RECLONE_AFTER_S", "10");
    let stack = Stack::start(4);
    let mut p = stack.connect("node0").expect("connect node0");
    p.batch_execute("CREATE TABLE filler (id int, pad text)")
        .expect("create");

    let mut r = stack.connect("node2").expect("connect node2");
    let stopped_at: i64 = r
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::int8",
            &[],
        )
        .expect("node2 position")
        .get(0);
    drop(r);
    assert!(stack.script(&["kill", "node2"]).status.success());
    // Patroni drops a member's replication slot once its key in etcd expires (ttl): from then on
    // only wal_keep_size holds WAL back for node2.
    wait_for(
        Duration::from_secs(90),
        "node2's slot to be dropped",
        || {
            let n: i64 = p
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'node2'",
                    &[],
                )
                .ok()?
                .get(0);
            (n == 0).then_some(())
        },
    );

    // Write until the primary's oldest WAL segment starts after node2's position (≥ 2 × the
    // retention in practice), recycling with checkpoints.
    let mut written_mb = 0i64;
    let oldest = |p: &mut postgres::Client| -> i64 {
        p.query_one(
            "SELECT pg_wal_lsn_diff((SELECT (
                 to_hex(('x' || substr(min(name), 9, 8))::bit(32)::int::int8) || '/' ||
                 to_hex(('x' || substr(min(name), 17, 8))::bit(32)::int::int8 *
                        (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size')))::pg_lsn
               FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'), '0/0')::int8",
            &[],
        )
        .expect("oldest WAL")
        .get(0)
    };
    while written_mb < 2 * KEEP_MB || oldest(&mut p) <= stopped_at {
        assert!(
            written_mb < 40 * KEEP_MB,
            "the primary keeps all WAL: {written_mb} MB written"
        );
        p.batch_execute(
            "INSERT INTO filler SELECT g, repeat('x', 1000) FROM generate_series(1, 16000) g;
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .expect("write WAL");
        written_mb += 16;
    }
    let rows: i64 = p
        .query_one("SELECT count(*) FROM filler", &[])
        .expect("count")
        .get(0);
    eprintln!(
        "resync: ~{written_mb} MB written while node2 was down (wal_keep_size {KEEP_MB} MB); \
         the primary's oldest WAL now starts {} MB after node2's position",
        (oldest(&mut p) - stopped_at) / (1024 * 1024)
    );

    let started = Instant::now();
    assert!(stack.script(&["start", "node2"]).status.success());
    wait_for(
        Duration::from_secs(300),
        "node2 streaming with every row",
        || {
            let mut c = stack.connect("node2").ok()?;
            let state: Option<String> = c
                .query_one("SELECT receiver_state FROM dbopt.node_status()", &[])
                .ok()?
                .get(0);
            let n: i64 = c.query_one("SELECT count(*) FROM filler", &[]).ok()?.get(0);
            (state.as_deref() == Some("streaming") && n == rows).then_some(())
        },
    );
    eprintln!(
        "resync: node2 streams again {:.1} s after it was started",
        started.elapsed().as_secs_f64()
    );
    let (_, metrics) = http::get(stack.info.router_admin_port, "/metrics").expect("metrics");
    let reclones = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dbopt_router_replica_reclones_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        reclones >= 1.0,
        "the router asked for the re-clone: {metrics}"
    );
    let log =
        std::fs::read_to_string(format!("{}/log/router.log", stack.info.dir)).unwrap_or_default();
    assert!(
        log.contains("resync: replica node2 has not streamed"),
        "{log}"
    );
}
