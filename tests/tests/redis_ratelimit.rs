//! The Redis module's rate limiter on a live server: replies, bad input, replication of effects,
//! persistence, memory per key.

use std::time::Duration;

use dbopt_e2e::e2e_port;
use dbopt_e2e::redis_server::{error_of as error, RedisServer};
use dbopt_e2e::wait_for;

fn hit(c: &mut redis::Connection, key: &str, limit: u64, window: u64, cost: u64) -> Vec<i64> {
    redis::cmd("DBOPT.RL.HIT")
        .arg(key)
        .arg(limit)
        .arg(window)
        .arg("COST")
        .arg(cost)
        .query(c)
        .expect("hit")
}

#[test]
fn replies_carry_everything_a_429_needs() {
    let server = RedisServer::start(e2e_port(50), &[]);
    let mut c = server.conn();
    let r = hit(&mut c, "user:1", 3, 60_000, 1);
    assert_eq!(&r[..4], &[1, 3, 2, -1]);
    assert!(
        r[4] > 59_000 && r[4] <= 60_000 + 60_000 / 32,
        "reset_after {}",
        r[4]
    );
    let r = hit(&mut c, "user:1", 3, 60_000, 2);
    assert_eq!(&r[..4], &[1, 3, 0, -1]);
    let r = hit(&mut c, "user:1", 3, 60_000, 1);
    assert_eq!(&r[..3], &[0, 3, 0], "denied");
    assert!(
        r[3] > 0 && r[3] <= r[4],
        "retry_after {} within reset_after {}",
        r[3],
        r[4]
    );
    let peek: Vec<i64> = redis::cmd("DBOPT.RL.PEEK")
        .arg("user:1")
        .arg(3)
        .arg(60_000)
        .query(&mut c)
        .expect("peek");
    assert_eq!(&peek[..3], &[0, 3, 0]);
    let pttl: i64 = redis::cmd("PTTL")
        .arg("user:1")
        .query(&mut c)
        .expect("pttl");
    assert!(
        pttl > 0 && pttl <= r[4] + 5,
        "key expires by itself ({pttl} ms)"
    );
    let n: i64 = redis::cmd("DBOPT.RL.RESET")
        .arg("user:1")
        .query(&mut c)
        .expect("reset");
    assert_eq!(n, 1);
    assert_eq!(
        hit(&mut c, "user:1", 3, 60_000, 3)[0],
        1,
        "fresh after reset"
    );
    let n: i64 = redis::cmd("DBOPT.RL.RESET")
        .arg("nobody")
        .query(&mut c)
        .expect("reset");
    assert_eq!(n, 0);

    // Memory per limiter key is constant, whatever the limit (target: <= 256 bytes).
    for (key, limit) in [("small", 1u64), ("large", 4_000_000_000)] {
        hit(&mut c, key, limit, 3_600_000, 1);
        let bytes: i64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .query(&mut c)
            .expect("memory usage");
        assert!(bytes <= 256, "{key}: {bytes} bytes");
        eprintln!("MEMORY USAGE of a limiter key with limit {limit}: {bytes} bytes");
    }
}

#[test]
fn bad_input_gets_precise_errors() {
    let server = RedisServer::start(e2e_port(51), &[]);
    let mut c = server.conn();
    redis::cmd("SET")
        .arg("plain")
        .arg("x")
        .query::<()>(&mut c)
        .expect("set");
    redis::cmd("LPUSH")
        .arg("list")
        .arg("x")
        .query::<()>(&mut c)
        .expect("lpush");
    let cases: &[(&[&str], &str)] = &[
        (&["DBOPT.RL.HIT", "k", "10"], "wrong number of arguments"),
        (
            &["DBOPT.RL.HIT", "k", "10", "1000", "COST"],
            "wrong number of arguments",
        ),
        (
            &["DBOPT.RL.HIT", "k", "ten", "1000"],
            "limit must be an integer between 1 and 4294967295",
        ),
        (
            &["DBOPT.RL.HIT", "k", "-1", "1000"],
            "limit must be an integer between 1 and 4294967295",
        ),
        (
            &["DBOPT.RL.HIT", "k", "0", "1000"],
            "limit must be an integer between 1 and 4294967295",
        ),
        (
            &["DBOPT.RL.HIT", "k", "4294967296", "1000"],
            "limit must be an integer between 1 and 4294967295",
        ),
        (
            &["DBOPT.RL.HIT", "k", "99999999999999999999999", "1"],
            "limit must be an integer",
        ),
        (
            &["DBOPT.RL.HIT", "k", "10", "0"],
            "window_ms must be an integer between 1 and 31536000000",
        ),
        (
            &["DBOPT.RL.HIT", "k", "10", "1.5"],
            "window_ms must be an integer",
        ),
        (
            &["DBOPT.RL.HIT", "k", "10", "1000", "COST", "0"],
            "COST must be an integer between 1 and 10",
        ),
        (
            &["DBOPT.RL.HIT", "k", "10", "1000", "COST", "11"],
            "COST must be an integer between 1 and 10",
        ),
        (
            &["DBOPT.RL.HIT", "k", "10", "1000", "WEIGHT", "1"],
            "unknown option 'WEIGHT' (expected COST)",
        ),
        (&["DBOPT.RL.HIT", "plain", "10", "1000"], "WRONGTYPE"),
        (&["DBOPT.RL.HIT", "list", "10", "1000"], "WRONGTYPE"),
        (&["DBOPT.RL.PEEK", "plain", "10", "1000"], "WRONGTYPE"),
        (&["DBOPT.RL.PEEK", "k", "10"], "wrong number of arguments"),
        (&["DBOPT.RL.RESET", "plain"], "WRONGTYPE"),
        (&["DBOPT.RL.RESET"], "wrong number of arguments"),
        (&["DBOPT.RL.RESET", "a", "b"], "wrong number of arguments"),
        (&["DBOPT.RL.HITALL", "1", "k"], "wrong number of arguments"),
        (
            &["DBOPT.RL.HITALL", "1", "k", "10", "1000", "j"],
            "wrong number of arguments",
        ),
        (
            &["DBOPT.RL.HITALL", "0", "k", "10", "1000"],
            "cost must be an integer between 1 and 4294967295",
        ),
        (
            &["DBOPT.RL.HITALL", "11", "k", "10", "1000"],
            "COST must be between 1 and the limit (10), got 11",
        ),
        (
            &["DBOPT.RL.HITALL", "1", "k", "10", "1000", "k", "5", "1000"],
            "key 'k' is given twice",
        ),
        (
            &[
                "DBOPT.RL.HITALL",
                "1",
                "k",
                "10",
                "1000",
                "plain",
                "5",
                "1000",
            ],
            "WRONGTYPE",
        ),
        (
            &["DBOPT.RL.HITALL", "1", "k", "10", "-5"],
            "window_ms must be an integer",
        ),
    ];
    for (args, want) in cases {
        let e = error(&mut c, args);
        assert!(e.contains(want), "{args:?}: got {e:?}, want {want:?}");
    }
    // Nothing was lost or created by the failures.
    let v: String = redis::cmd("GET").arg("plain").query(&mut c).expect("get");
    assert_eq!(v, "x");
    let exists: i64 = redis::cmd("EXISTS").arg("k").query(&mut c).expect("exists");
    assert_eq!(exists, 0);
}

/// One statement under several limits: admitted by all of them or charged to none.
#[test]
fn hitall_admits_on_every_limiter_or_on_none() {
    let server = RedisServer::start(e2e_port(54), &[]);
    let mut c = server.conn();
    let all = |c: &mut redis::Connection, cost: u64| -> Vec<i64> {
        redis::cmd("DBOPT.RL.HITALL")
            .arg(cost)
            .arg("user")
            .arg(3)
            .arg(60_000)
            .arg("global")
            .arg(10)
            .arg(60_000)
            .query(c)
            .expect("hitall")
    };
    let r = all(&mut c, 1);
    assert_eq!(&r[..4], &[1, -1, 3, 2], "the tightest limiter is described");
    let r = all(&mut c, 2);
    assert_eq!(&r[..4], &[1, -1, 3, 0]);
    let r = all(&mut c, 1);
    assert_eq!(&r[..4], &[0, 0, 3, 0], "the user's limiter refuses");
    assert!(r[4] > 0, "retry_after {}", r[4]);
    // The refusal charged nothing to the global limiter: 3 of 10 used.
    let peek: Vec<i64> = redis::cmd("DBOPT.RL.PEEK")
        .arg("global")
        .arg(10)
        .arg(60_000)
        .query(&mut c)
        .expect("peek");
    assert_eq!(&peek[..3], &[1, 10, 7]);
    // Three limiters: 11 arguments, more than the module views on the stack (its other path).
    let three: Vec<i64> = redis::cmd("DBOPT.RL.HITALL")
        .arg(1)
        .arg("a")
        .arg(5)
        .arg(60_000)
        .arg("b")
        .arg(4)
        .arg(60_000)
        .arg("c")
        .arg(6)
        .arg(60_000)
        .query(&mut c)
        .expect("hitall of three");
    assert_eq!(
        &three[..4],
        &[1, -1, 4, 3],
        "the tightest of three is described"
    );
    // A lease takes what every limiter has room for, between min and max.
    let lease = |c: &mut redis::Connection, min: u64, max: u64| -> Vec<i64> {
        redis::cmd("DBOPT.RL.LEASE")
            .arg(min)
            .arg(max)
            .arg("user2")
            .arg(5)
            .arg(60_000)
            .arg("global")
            .arg(10)
            .arg(60_000)
            .query(c)
            .expect("lease")
    };
    let r = lease(&mut c, 1, 4);
    assert_eq!((r[0], r[1], r[6]), (1, -1, 4), "{r:?}");
    let r = lease(&mut c, 1, 4);
    assert_eq!((r[0], r[6]), (1, 1), "the user's room: {r:?}");
    let r = lease(&mut c, 1, 4);
    assert_eq!((r[0], r[1], r[6]), (0, 0, 0), "{r:?}");
    let peek: Vec<i64> = redis::cmd("DBOPT.RL.PEEK")
        .arg("global")
        .arg(10)
        .arg(60_000)
        .query(&mut c)
        .expect("peek");
    assert_eq!(peek[2], 2, "3 + 4 + 1 of 10 used");
    let e =
        dbopt_e2e::redis_server::error_of(&mut c, &["DBOPT.RL.LEASE", "5", "4", "k", "10", "1000"]);
    assert!(e.contains("max must be an integer between 5"), "{e}");
    // Both keys expire by themselves.
    for key in ["user", "global"] {
        let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut c).expect("pttl");
        assert!(pttl > 0, "{key} expires ({pttl})");
    }
}

/// Replicas and the AOF receive the new state (SET … PXAT), never the command: a replica never
/// recomputes a decision with its own clock, and a restart reloads the identical state.
#[test]
fn replicas_and_aof_get_the_effect_and_restarts_keep_the_state() {
    let mut primary = RedisServer::start(
        e2e_port(52),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let port = primary.port.to_string();
    let replica = RedisServer::start(e2e_port(53), &["--replicaof", "127.0.0.1", &port]);
    let mut p = primary.conn();
    let mut r = replica.conn();
    wait_for(Duration::from_secs(20), "the replica to sync", || {
        let info: String = redis::cmd("INFO").arg("replication").query(&mut r).ok()?;
        info.contains("master_link_status:up").then_some(())
    });

    let mut spent = 0;
    for i in 0..50 {
        hit(&mut p, "api:global", 1000, 60_000, 1 + i % 3);
        spent += 1 + i % 3;
    }
    let _: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut p)
        .expect("wait");
    let on_primary: Vec<u8> = redis::cmd("GET")
        .arg("api:global")
        .query(&mut p)
        .expect("get");
    let on_replica: Vec<u8> = redis::cmd("GET")
        .arg("api:global")
        .query(&mut r)
        .expect("get");
    assert_eq!(on_primary.len(), 152);
    assert_eq!(
        on_primary, on_replica,
        "the replica holds the primary's exact state"
    );
    let peek: Vec<i64> = redis::cmd("DBOPT.RL.PEEK")
        .arg("api:global")
        .arg(1000)
        .arg(60_000)
        .query(&mut r)
        .expect("peek");
    assert_eq!(
        peek[2],
        1000 - spent as i64,
        "a replica answers PEEK from the replicated state"
    );
    let e = error(&mut r, &["DBOPT.RL.HIT", "api:global", "1000", "60000"]);
    assert!(
        e.contains("read only replica"),
        "replicas refuse writes: {e}"
    );

    // The AOF holds SETs, not the module command.
    let mut aof = String::new();
    for entry in std::fs::read_dir(primary.dir().join("appendonlydir"))
        .expect("aof dir")
        .flatten()
    {
        aof += &String::from_utf8_lossy(&std::fs::read(entry.path()).expect("read aof"));
    }
    assert!(aof.contains("PXAT"), "effects are logged as SET … PXAT");
    assert!(
        !aof.to_lowercase().contains("dbopt.rl.hit"),
        "the command itself is never logged"
    );

    drop(p);
    primary.restart("NOSAVE"); // reload from the AOF alone
    let mut p = primary.conn();
    let reloaded: Vec<u8> = redis::cmd("GET")
        .arg("api:global")
        .query(&mut p)
        .expect("get");
    assert_eq!(
        reloaded, on_primary,
        "AOF restart restores the identical state"
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg("api:global")
        .query(&mut p)
        .expect("pttl");
    assert!(pttl > 0, "and its expiry");

    // RDB too.
    redis::cmd("SAVE").query::<()>(&mut p).expect("save");
    drop(p);
    primary.restart("SAVE");
    let mut p = primary.conn();
    let reloaded: Vec<u8> = redis::cmd("GET")
        .arg("api:global")
        .query(&mut p)
        .expect("get");
    assert_eq!(
        reloaded, on_primary,
        "RDB restart restores the identical state"
    );
}
