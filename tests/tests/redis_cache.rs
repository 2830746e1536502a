//! The Redis module's tag-indexed cache on a live server: the five guarantees of the issue, each
//! with its own test, plus bad input, pattern invalidation and cluster key declaration.

use std::time::{Duration, Instant};

use dbopt_e2e::e2e_port;
use dbopt_e2e::redis_server::{error_of, RedisServer};
use dbopt_e2e::wait_for;

fn set(
    c: &mut redis::Connection,
    key: &str,
    ttl: u64,
    value: &str,
    tags: &[&str],
    token: Option<&str>,
) -> i64 {
    let mut cmd = redis::cmd("DBOPT.CACHE.SET");
    cmd.arg(key).arg(ttl).arg(value);
    if !tags.is_empty() {
        cmd.arg("TAGS").arg(tags.len()).arg(tags);
    }
    if let Some(t) = token {
        cmd.arg("TOKEN").arg(t);
    }
    cmd.query(c).expect("DBOPT.CACHE.SET")
}

fn get(c: &mut redis::Connection, key: &str) -> Option<String> {
    redis::cmd("DBOPT.CACHE.GET")
        .arg(key)
        .query(c)
        .expect("DBOPT.CACHE.GET")
}

fn token(c: &mut redis::Connection, tags: &[&str]) -> String {
    redis::cmd("DBOPT.TAG.TOKEN")
        .arg(tags)
        .query(c)
        .expect("DBOPT.TAG.TOKEN")
}

fn invalidate(c: &mut redis::Connection, tags: &[&str]) -> i64 {
    redis::cmd("DBOPT.TAG.INVALIDATE")
        .arg(tags)
        .query(c)
        .expect("DBOPT.TAG.INVALIDATE")
}

fn stat(c: &mut redis::Connection, name: &str) -> i64 {
    let flat: Vec<redis::Value> = redis::cmd("DBOPT.STATS").query(c).expect("stats");
    let mut it = flat.iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if matches!(k, redis::Value::SimpleString(s) if s == name) {
            if let redis::Value::Int(n) = v {
                return *n;
            }
        }
    }
    panic!("no stat {name}");
}

fn info_field(c: &mut redis::Connection, section: &str, field: &str) -> i64 {
    let info: String = redis::cmd("INFO").arg(section).query(c).expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
}

/// Guarantee 1: after INVALIDATE t returns, no GET returns an entry stored before it under t.
#[test]
fn invalidation_hides_every_entry_of_the_tag_at_once() {
    let server = RedisServer::start(e2e_port(60), &[]);
    let mut c = server.conn();
    for i in 0..500 {
        let tags: &[&str] = if i % 2 == 0 {
            &["t:users", "t:all"]
        } else {
            &["t:orders", "t:all"]
        };
        assert_eq!(
            set(
                &mut c,
                &format!("q:{i}"),
                60_000,
                &format!("v{i}"),
                tags,
                None
            ),
            1
        );
    }
    assert_eq!(get(&mut c, "q:0").as_deref(), Some("v0"));
    assert_eq!(invalidate(&mut c, &["t:users"]), 1);
    for i in 0..500 {
        let got = get(&mut c, &format!("q:{i}"));
        if i % 2 == 0 {
            assert_eq!(got, None, "q:{i} was under t:users");
        } else {
            assert_eq!(
                got.as_deref(),
                Some(format!("v{i}").as_str()),
                "q:{i} is unaffected"
            );
        }
    }
    // New entries under the tag are served again; the old ones stay invisible.
    set(&mut c, "q:new", 60_000, "fresh", &["t:users"], None);
    assert_eq!(get(&mut c, "q:new").as_deref(), Some("fresh"));
    assert_eq!(get(&mut c, "q:0"), None);
    assert_eq!(
        invalidate(&mut c, &["t:all", "t:missing"]),
        1,
        "only existing tags count"
    );
    assert_eq!(get(&mut c, "q:1"), None);
    assert!(stat(&mut c, "tag_invalidations") >= 2);
    assert!(stat(&mut c, "cache_stale_entries_skipped") >= 250);
}

/// Guarantee 2: a fill that took its token before an invalidation of one of its tags is refused.
#[test]
fn a_fill_that_raced_an_invalidation_is_refused() {
    let server = RedisServer::start(e2e_port(61), &[]);
    let mut reader = server.conn();
    let mut writer = server.conn();
    // The slow reader takes its token, reads the database...
    let t = token(&mut reader, &["t:product:7", "t:prices"]);
    // ...meanwhile the writer commits and invalidates...
    assert_eq!(invalidate(&mut writer, &["t:prices"]), 1);
    // ...and the reader's stale result must not be stored.
    assert_eq!(
        set(
            &mut reader,
            "page:7",
            60_000,
            "old price",
            &["t:prices", "t:product:7"],
            Some(&t)
        ),
        0
    );
    assert_eq!(get(&mut reader, "page:7"), None);
    assert_eq!(stat(&mut reader, "cache_fills_refused"), 1);

    // A fill with a token taken after the invalidation is stored (tag order does not matter).
    let t = token(&mut reader, &["t:prices", "t:product:7"]);
    assert_eq!(
        set(
            &mut reader,
            "page:7",
            60_000,
            "new price",
            &["t:product:7", "t:prices"],
            Some(&t)
        ),
        1
    );
    assert_eq!(get(&mut reader, "page:7").as_deref(), Some("new price"));
    // A token names exactly its tags: presenting it for another tag set is refused.
    assert_eq!(
        set(&mut reader, "page:8", 60_000, "x", &["t:prices"], Some(&t)),
        0
    );
    // Many interleavings: invalidation between token and fill always wins.
    for i in 0..200 {
        let t = token(&mut reader, &["t:hot"]);
        if i % 2 == 0 {
            invalidate(&mut writer, &["t:hot"]);
        }
        let stored = set(
            &mut reader,
            &format!("hot:{i}"),
            60_000,
            "v",
            &["t:hot"],
            Some(&t),
        );
        assert_eq!(stored, i64::from(i % 2 == 1), "round {i}");
    }
}

/// Guarantee 3: tag bookkeeping does not grow with expired entries. One million entries under
/// 100 tags expire; afterwards the keyspace and the memory return to their baseline.
#[test]
fn tag_bookkeeping_returns_to_baseline_after_a_million_entries_expire() {
    let server = RedisServer::start(e2e_port(62), &[]);
    let mut c = server.conn();
    let baseline = info_field(&mut c, "memory", "used_memory");
    let total = 1_000_000;
    // The entries must outlive the fill, however busy the machine is: time one batch of 10,000
    // first (its entries expire within a second), then give the million twice the estimated fill
    // time (3 s at least).
    let calibration = Instant::now();
    let mut pipe = redis::pipe();
    for i in 0..10_000 {
        pipe.cmd("DBOPT.CACHE.SET")
            .arg(format!("cal:{i}"))
            .arg(1000)
            .arg("0123456789abcdef")
            .arg("TAGS")
            .arg(1)
            .arg(format!("tag:{}", i % 100))
            .ignore();
    }
    pipe.query::<()>(&mut c).expect("calibration pipeline");
    let estimate_ms = calibration.elapsed().as_millis() as u64 * (total / 10_000);
    let ttl = (2 * estimate_ms).max(3_000);
    let started = Instant::now();
    for batch in 0..(total / 10_000) {
        let mut pipe = redis::pipe();
        for i in 0..10_000 {
            let n = batch * 10_000 + i;
            pipe.cmd("DBOPT.CACHE.SET")
                .arg(format!("e:{n}"))
                .arg(ttl)
                .arg("0123456789abcdef")
                .arg("TAGS")
                .arg(1)
                .arg(format!("tag:{}", n % 100))
                .ignore();
        }
        pipe.query::<()>(&mut c).expect("pipeline");
    }
    let peak = info_field(&mut c, "memory", "used_memory");
    let keys: i64 = redis::cmd("DBSIZE").query(&mut c).expect("dbsize");
    eprintln!(
        "1M entries stored in {:.1}s: {keys} keys, used_memory {} -> {} bytes",
        started.elapsed().as_secs_f64(),
        baseline,
        peak
    );
    // Entries of the first batches may already have expired while the last ones were stored.
    assert_eq!(stat(&mut c, "cache_sets"), total as i64 + 10_000);
    assert!(
        peak > baseline + 50 * 1024 * 1024,
        "the entries really took memory"
    );

    // Entries expire after 3 s, tag keys at most 2 TTLs after their last fill. Walking the
    // keyspace with SCAN makes Redis reclaim expired keys it meets (as clients would over time).
    std::thread::sleep(Duration::from_millis(2 * ttl + 500));
    wait_for(
        Duration::from_secs(120),
        "every expired key to be reclaimed",
        || {
            let mut cursor = 0u64;
            loop {
                let (next, _): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(10_000)
                    .query(&mut c)
                    .ok()?;
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            let left: i64 = redis::cmd("DBSIZE").query(&mut c).ok()?;
            (left == 0).then_some(())
        },
    );
    let after = info_field(&mut c, "memory", "used_memory");
    eprintln!("after expiry: used_memory {after} bytes (baseline {baseline})");
    // "Near the baseline": within 2 MiB, against ~100 MiB at the peak.
    assert!(
        after < baseline + 2 * 1024 * 1024,
        "memory did not return: {baseline} -> {peak} -> {after}"
    );
    assert!(stat(&mut c, "keys_expired_seen") >= total as i64);
}

/// Guarantee 4: with maxmemory and allkeys-lru, evicting any key (entry or tag) never makes a stale
/// entry visible: a missing tag key means a miss.
#[test]
fn eviction_never_serves_a_stale_entry() {
    let server = RedisServer::start(
        e2e_port(63),
        &["--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru"],
    );
    let mut c = server.conn();
    let payload = "x".repeat(512);
    // Values say which tag version they were computed from.
    for round in 0..6 {
        for t in 0..20 {
            let tag = format!("t:{t}");
            for i in 0..300 {
                let key = format!("k:{t}:{i}");
                let value = format!("{tag}@{round}:{payload}");
                let _ = redis::cmd("DBOPT.CACHE.SET")
                    .arg(&key)
                    .arg(600_000)
                    .arg(&value)
                    .arg("TAGS")
                    .arg(1)
                    .arg(&tag)
                    .query::<i64>(&mut c);
            }
        }
        // Invalidate every tag: everything stored in this round is now stale.
        for t in 0..20 {
            invalidate(&mut c, &[&format!("t:{t}")]);
        }
        // Filler pushes memory over the limit: LRU evicts entries and tag keys alike.
        for i in 0..2000 {
            let _ = redis::cmd("SET")
                .arg(format!("filler:{round}:{i}"))
                .arg(&payload)
                .query::<()>(&mut c);
        }
        for t in 0..20 {
            for i in 0..300 {
                let got = get(&mut c, &format!("k:{t}:{i}"));
                assert_eq!(
                    got, None,
                    "round {round}: a stale entry was served for k:{t}:{i}"
                );
            }
        }
    }
    let evicted = info_field(&mut c, "stats", "evicted_keys");
    assert!(evicted > 1000, "the test really evicted keys ({evicted})");
    assert!(stat(&mut c, "keys_evicted_seen") > 0);
    eprintln!("eviction test: {evicted} keys evicted, no stale entry served");
}

/// Guarantee 5: entries and tag state survive RDB and AOF restarts.
#[test]
fn entries_and_tag_state_survive_restarts() {
    let mut server = RedisServer::start(
        e2e_port(64),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let mut c = server.conn();
    set(&mut c, "a", 600_000, "alpha", &["t:1"], None);
    set(&mut c, "b", 600_000, "beta", &["t:2"], None);
    let t = token(&mut c, &["t:3"]);
    let stale_token = token(&mut c, &["t:2"]);
    drop(c);
    server.restart("NOSAVE"); // from the AOF only
    let mut c = server.conn();
    assert_eq!(get(&mut c, "a").as_deref(), Some("alpha"));
    assert_eq!(
        set(&mut c, "c", 600_000, "gamma", &["t:3"], Some(&t)),
        1,
        "tokens survive"
    );
    invalidate(&mut c, &["t:2"]);
    redis::cmd("SAVE").query::<()>(&mut c).expect("save");
    drop(c);
    server.restart("SAVE");
    let mut c = server.conn();
    assert_eq!(get(&mut c, "a").as_deref(), Some("alpha"));
    assert_eq!(get(&mut c, "c").as_deref(), Some("gamma"));
    assert_eq!(get(&mut c, "b"), None, "the invalidation survived");
    assert_eq!(
        set(&mut c, "b", 600_000, "old", &["t:2"], Some(&stale_token)),
        0
    );
}

#[test]
fn pattern_invalidation_works_in_bounded_chunks() {
    let server = RedisServer::start(e2e_port(65), &[]);
    let mut c = server.conn();
    let mut pipe = redis::pipe();
    for i in 0..20_000 {
        pipe.cmd("DBOPT.CACHE.SET")
            .arg(format!("user:{i}:profile"))
            .arg(600_000)
            .arg("v")
            .ignore();
    }
    pipe.cmd("SET")
        .arg("user:plain")
        .arg("not an entry")
        .ignore();
    pipe.query::<()>(&mut c).expect("fill");
    let mut cursor = "0".to_string();
    let (mut deleted, mut calls, mut slowest) = (0, 0, Duration::ZERO);
    loop {
        let started = Instant::now();
        let (next, n): (String, i64) = redis::cmd("DBOPT.CACHE.INVALIDATE")
            .arg(&cursor)
            .arg("MATCH")
            .arg("user:*")
            .arg("COUNT")
            .arg(1000)
            .query(&mut c)
            .expect("invalidate");
        slowest = slowest.max(started.elapsed());
        deleted += n;
        calls += 1;
        cursor = next;
        if cursor == "0" {
            break;
        }
    }
    eprintln!("pattern invalidation: {deleted} entries in {calls} calls, slowest call {slowest:?}");
    assert_eq!(deleted, 20_000);
    assert!(calls > 10, "the work was chunked");
    let plain: String = redis::cmd("GET")
        .arg("user:plain")
        .query(&mut c)
        .expect("get");
    assert_eq!(
        plain, "not an entry",
        "keys that are not entries are left alone"
    );
}

#[test]
fn bad_input_gets_precise_errors_and_changes_nothing() {
    let server = RedisServer::start(e2e_port(66), &[]);
    let mut c = server.conn();
    redis::cmd("SET")
        .arg("plain")
        .arg("x")
        .query::<()>(&mut c)
        .expect("set");
    set(&mut c, "entry", 600_000, "v", &["t:a"], None);
    let cases: &[(&[&str], &str)] = &[
        (
            &["DBOPT.CACHE.SET", "k", "1000"],
            "wrong number of arguments",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "0", "v"],
            "ttl_ms must be an integer between 1 and",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "-5", "v"],
            "ttl_ms must be an integer",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "1000", "v", "TAGS"],
            "TAGS needs a count",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "1000", "v", "TAGS", "0"],
            "the TAGS count must be an integer between 1 and 1024",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "1000", "v", "TAGS", "3", "a", "b"],
            "TAGS says 3 tags but 2 arguments follow",
        ),
        (
            &[
                "DBOPT.CACHE.SET",
                "k",
                "1000",
                "v",
                "TAGS",
                "1",
                "a",
                "TAGS",
                "1",
                "b",
            ],
            "TAGS given twice",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "1000", "v", "TAGS", "1", "k"],
            "a tag cannot be the entry's own key",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "1000", "v", "TOKEN", "nonsense"],
            "malformed TOKEN",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "1000", "v", "TOKEN"],
            "TOKEN needs a value",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "1000", "v", "EX", "5"],
            "unknown option 'EX' (expected TAGS or TOKEN)",
        ),
        (&["DBOPT.CACHE.SET", "plain", "1000", "v"], "WRONGTYPE"),
        (
            &["DBOPT.CACHE.SET", "k", "1000", "v", "TAGS", "1", "plain"],
            "WRONGTYPE",
        ),
        (
            &["DBOPT.CACHE.SET", "k", "1000", "v", "TAGS", "1", "entry"],
            "WRONGTYPE",
        ),
        (&["DBOPT.CACHE.GET"], "wrong number of arguments"),
        (&["DBOPT.CACHE.GET", "plain"], "WRONGTYPE"),
        (&["DBOPT.CACHE.DEL"], "wrong number of arguments"),
        (&["DBOPT.CACHE.DEL", "entry", "plain"], "WRONGTYPE"),
        (&["DBOPT.TAG.TOKEN"], "wrong number of arguments"),
        (&["DBOPT.TAG.TOKEN", "plain"], "WRONGTYPE"),
        (&["DBOPT.TAG.INVALIDATE", "entry"], "WRONGTYPE"),
        (
            &["DBOPT.CACHE.INVALIDATE", "0"],
            "wrong number of arguments",
        ),
        (
            &["DBOPT.CACHE.INVALIDATE", "x", "MATCH", "*"],
            "cursor must be an integer",
        ),
        (
            &["DBOPT.CACHE.INVALIDATE", "0", "FIND", "*"],
            "expected MATCH",
        ),
        (
            &["DBOPT.CACHE.INVALIDATE", "0", "MATCH", "*", "COUNT", "0"],
            "COUNT must be an integer between 1 and 4096",
        ),
        (
            &["DBOPT.CACHE.INVALIDATE", "0", "MATCH", "*", "LIMIT", "5"],
            "unknown option 'LIMIT'",
        ),
        (&["DBOPT.STATS", "x"], "wrong number of arguments"),
    ];
    for (args, want) in cases {
        let e = error_of(&mut c, &args[..]);
        assert!(e.contains(want), "{args:?}: got {e:?}, want {want:?}");
    }
    let long_tag = "t".repeat(2000);
    let e = redis::cmd("DBOPT.TAG.TOKEN")
        .arg(&long_tag)
        .query::<String>(&mut c)
        .expect_err("long")
        .to_string();
    assert!(e.contains("at most 1024 allowed"), "{e}");
    // Nothing lost: the entry, the plain key and the tag are as they were; nothing was created.
    assert_eq!(
        get(&mut c, "entry").as_deref(),
        Some("v"),
        "DEL with a foreign key deleted nothing"
    );
    let plain: String = redis::cmd("GET").arg("plain").query(&mut c).expect("get");
    assert_eq!(plain, "x");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("k")
        .arg("a")
        .arg("b")
        .query(&mut c)
        .expect("exists");
    assert_eq!(exists, 0);
}

/// Every command declares its keys: cluster clients route them, and a command whose keys live in
/// different slots fails with CROSSSLOT instead of writing to the wrong node.
#[test]
fn keys_are_declared_for_redis_cluster() {
    let server = RedisServer::start(
        e2e_port(67),
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ],
    );
    let mut c = server.conn();
    redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query::<()>(&mut c)
        .expect("addslots");
    wait_for(Duration::from_secs(20), "cluster_state:ok", || {
        let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok()?;
        info.contains("cluster_state:ok").then_some(())
    });
    let keys: Vec<String> = redis::cmd("COMMAND")
        .arg("GETKEYS")
        .arg("DBOPT.CACHE.SET")
        .arg("{u1}:page")
        .arg(1000)
        .arg("v")
        .arg("TAGS")
        .arg(2)
        .arg("{u1}:t:a")
        .arg("{u1}:t:b")
        .arg("TOKEN")
        .arg("1")
        .query(&mut c)
        .expect("getkeys");
    assert_eq!(keys, ["{u1}:page", "{u1}:t:a", "{u1}:t:b"]);
    // Same slot (hash tag): works.
    assert_eq!(
        set(&mut c, "{u1}:page", 60_000, "v", &["{u1}:t:a"], None),
        1
    );
    // Different slots: CROSSSLOT, nothing written.
    for args in [
        vec![
            "DBOPT.CACHE.SET",
            "{u1}:page2",
            "1000",
            "v",
            "TAGS",
            "1",
            "{u2}:t",
        ],
        vec!["DBOPT.TAG.INVALIDATE", "{u1}:t:a", "{u2}:t"],
        vec!["DBOPT.TAG.TOKEN", "{u1}:t:a", "{u2}:t"],
        vec!["DBOPT.CACHE.DEL", "{u1}:page", "{u2}:page"],
    ] {
        let e = error_of(&mut c, &args[..]);
        assert!(e.to_lowercase().contains("crossslot"), "{args:?}: {e}");
    }
    assert_eq!(get(&mut c, "{u1}:page").as_deref(), Some("v"));
}

#[test]
fn info_section_and_stats_agree() {
    let server = RedisServer::start(e2e_port(68), &[]);
    let mut c = server.conn();
    set(&mut c, "k", 60_000, "v", &[], None);
    get(&mut c, "k");
    get(&mut c, "missing");
    assert_eq!(stat(&mut c, "cache_hits"), 1);
    assert_eq!(stat(&mut c, "cache_misses"), 1);
    assert_eq!(stat(&mut c, "cache_sets"), 1);
    assert_eq!(info_field(&mut c, "dbopt", "dbopt_cache_hits"), 1);
    assert_eq!(info_field(&mut c, "dbopt", "dbopt_cache_sets"), 1);
}

#[test]
fn pattern_invalidation_respects_acl_key_patterns() {
    let server = RedisServer::start(e2e_port(69), &[]);
    let mut admin = server.conn();
    for i in 0..50 {
        for tenant in ["tenantA", "tenantB"] {
            set(&mut admin, &format!("{tenant}:{i}"), 60_000, "v", &[], None);
        }
    }
    redis::cmd("ACL")
        .arg(&["SETUSER", "alice", "on", ">alice-pw", "~tenantA:*", "+@all"])
        .query::<()>(&mut admin)
        .expect("acl user");
    let alice = redis::Client::open(format!("redis://alice:alice-pw@127.0.0.1:{}/", server.port))
        .expect("url");
    let mut alice = alice.get_connection().expect("alice logs in");
    // A pattern that matches both tenants deletes only what alice may touch.
    let mut cursor = "0".to_string();
    let mut deleted = 0;
    loop {
        let (next, n): (String, i64) = redis::cmd("DBOPT.CACHE.INVALIDATE")
            .arg(&cursor)
            .arg("MATCH")
            .arg("*")
            .arg("COUNT")
            .arg(4096)
            .query(&mut alice)
            .expect("invalidate as alice");
        deleted += n;
        cursor = next;
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(deleted, 50, "only tenantA's entries");
    for i in 0..50 {
        assert_eq!(
            get(&mut admin, &format!("tenantB:{i}")).as_deref(),
            Some("v")
        );
        assert_eq!(get(&mut admin, &format!("tenantA:{i}")), None);
    }
    // One call does bounded work: COUNT above 4096 is refused.
    let e = redis::cmd("DBOPT.CACHE.INVALIDATE")
        .arg(&["0", "MATCH", "*", "COUNT", "100000"])
        .query::<redis::Value>(&mut admin)
        .expect_err("too large");
    assert!(e.to_string().contains("between 1 and 4096"), "{e}");
}
