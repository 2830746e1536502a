//! End-to-end: consistent caching on the local HA stack — the extension's commit announcements,
//! the router's two-layer result cache, and the three promises (read-your-writes, never back in
//! time, no staleness of the cache's own) under a randomized workload, through a paused replica,
//! a Redis restart, a dropped listening connection and a failover.
//!
//! Size of the randomized run: `DBOPT_CACHE_OPS` operations (default 20,000; the issue's
//! acceptance run uses 100,000).

// A failed step is a failed test: unwrapping is how it reports.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use dbopt_e2e::stack::Stack;
use dbopt_e2e::wait_for;
use postgres::fallible_iterator::FallibleIterator;

#[path = "cache/consistency.rs"]
mod consistency;

#[test]
fn cache_end_to_end() {
    // A small in-process layer: entries fall out of it often, so Redis serves hits too.
    std::env::set_var("DBOPT_CACHE_LOCAL_BYTES", "3000");
    // A write-through rule and a warm statement for `write_through_and_warming`.
    std::env::set_var(
        "DBOPT_ROUTER_EXTRA",
        "[[cache.rules]]\ntable = \"public.wt\"\nwrite_through = true\n\n\
         [[cache.warm]]\nuser = \"app\"\ndatabase = \"postgres\"\nsql = \"SELECT count(*) FROM warm_t\"\n",
    );
    let stack = Stack::start(1);
    announcements_cover_every_kind_of_write(&stack);
    analysis_says_what_may_be_cached(&stack);
    hits_answer_like_postgresql(&stack);
    bad_hints_and_manual_invalidation(&stack);
    read_your_writes_across_connections(&stack);
    interleaved_reads_still_hit(&stack);
    fills_of_new_tables_while_the_primary_is_busy(&stack);
    write_through_and_warming(&stack);
    consistency::randomized_consistency(&stack);
}

/// Collects announcements on the primary after `f` ran.
fn announced(
    stack: &Stack,
    listener: &mut postgres::Client,
    f: impl FnOnce(),
) -> Vec<serde_json::Value> {
    let _ = stack;
    f();
    std::thread::sleep(Duration::from_millis(200));
    let mut out = Vec::new();
    let mut n = listener.notifications();
    let mut it = n.timeout_iter(Duration::from_millis(300));
    while let Ok(Some(note)) = it.next() {
        if note.channel() == "dbopt_invalidate" {
            out.push(serde_json::from_str(note.payload()).expect("payload is JSON"));
        }
    }
    out
}

fn oid(c: &mut postgres::Client, table: &str) -> i64 {
    let o: u32 = c
        .query_one("SELECT $1::text::regclass::oid", &[&table])
        .expect("oid")
        .get(0);
    i64::from(o)
}

fn tables(a: &[serde_json::Value]) -> Vec<i64> {
    let mut t: Vec<i64> = a
        .iter()
        .flat_map(|v| v["tables"].as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_i64())
        .collect();
    t.sort_unstable();
    t.dedup();
    t
}

fn announcements_cover_every_kind_of_write(stack: &Stack) {
    let mut l = stack.connect("node0").expect("listener");
    l.batch_execute("LISTEN dbopt_invalidate").unwrap();
    let mut w = stack.connect("node0").expect("writer");
    // By default only tables a cache registered are announced; first, everything (what the
    // router does not use here: each kind of write is what this step checks).
    w.batch_execute("SET dbopt.announce_all_tables = on")
        .unwrap();
    w.batch_execute(
        "DROP TABLE IF EXISTS inv_child, inv_parent, inv_t, inv_p CASCADE;
         CREATE TABLE inv_t (id int PRIMARY KEY, v int);
         CREATE TABLE inv_parent (id int PRIMARY KEY);
         CREATE TABLE inv_child (id int, pid int REFERENCES inv_parent (id) ON DELETE CASCADE);
         CREATE TABLE inv_p (id int, k int) PARTITION BY RANGE (k);
         CREATE TABLE inv_p1 PARTITION OF inv_p FOR VALUES FROM (0) TO (10);
         INSERT INTO inv_parent VALUES (1); INSERT INTO inv_child VALUES (1, 1);",
    )
    .unwrap();
    let _ = announced(stack, &mut l, || {});
    let t = oid(&mut w, "inv_t");
    let (parent, child) = (oid(&mut w, "inv_parent"), oid(&mut w, "inv_child"));
    let (p, p1) = (oid(&mut w, "inv_p"), oid(&mut w, "inv_p1"));

    let a = announced(stack, &mut l, || {
        w.batch_execute("SELECT * FROM inv_t; SELECT * FROM inv_t FOR UPDATE")
            .unwrap();
    });
    assert!(a.is_empty(), "reads and row locks announce nothing: {a:?}");
    let a = announced(stack, &mut l, || {
        w.batch_execute("INSERT INTO inv_t VALUES (1, 1)").unwrap();
    });
    assert_eq!(tables(&a), vec![t]);
    assert!(a[0]["lsn"].as_str().is_some_and(|s| s.contains('/')));
    assert_eq!(a[0]["db"], "postgres");
    let a = announced(stack, &mut l, || {
        w.batch_execute(
            "BEGIN; UPDATE inv_t SET v = 2; UPDATE inv_t SET v = 3;
             SELECT dbopt.invalidate_tags('user:42', 'team:7'); COMMIT",
        )
        .unwrap();
    });
    assert_eq!(a.len(), 1, "one announcement per transaction: {a:?}");
    assert_eq!(a[0]["tags"], serde_json::json!(["team:7", "user:42"]));
    let a = announced(stack, &mut l, || {
        w.batch_execute("BEGIN; UPDATE inv_t SET v = 9; ROLLBACK")
            .unwrap();
    });
    assert!(a.is_empty(), "a rollback announces nothing: {a:?}");
    let a = announced(stack, &mut l, || {
        w.batch_execute("DELETE FROM inv_parent").unwrap();
    });
    assert_eq!(
        tables(&a),
        {
            let mut v = vec![parent, child];
            v.sort_unstable();
            v
        },
        "a foreign-key cascade is announced"
    );
    let a = announced(stack, &mut l, || {
        w.batch_execute("INSERT INTO inv_p1 VALUES (1, 1)").unwrap();
    });
    assert_eq!(
        tables(&a),
        vec![p, p1]
            .into_iter()
            .min()
            .into_iter()
            .chain([p.max(p1)])
            .collect::<Vec<_>>(),
        "a partition and its parent"
    );
    let a = announced(stack, &mut l, || {
        w.batch_execute("TRUNCATE inv_t").unwrap();
    });
    assert_eq!(tables(&a), vec![t]);
    let a = announced(stack, &mut l, || {
        let mut writer = w.copy_in("COPY inv_t (id, v) FROM STDIN").unwrap();
        std::io::Write::write_all(&mut writer, b"5\t5\n").unwrap();
        writer.finish().unwrap();
    });
    assert_eq!(tables(&a), vec![t], "COPY FROM");
    let a = announced(stack, &mut l, || {
        w.batch_execute("ALTER TABLE inv_t ADD COLUMN w int")
            .unwrap();
    });
    assert_eq!(tables(&a), vec![t], "a column added");
    assert_eq!(a[0]["ddl"], true);
    let a = announced(stack, &mut l, || {
        w.batch_execute("CREATE TEMP TABLE tt (a int); INSERT INTO tt VALUES (1)")
            .unwrap();
    });
    assert!(
        tables(&a).is_empty(),
        "temporary tables are never announced: {a:?}"
    );
    // A trigger's writes to another table.
    w.batch_execute(
        "CREATE TABLE inv_log (n int);
         CREATE FUNCTION inv_log_f() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO inv_log VALUES (1); RETURN NEW; END $$;
         CREATE TRIGGER inv_log_t AFTER INSERT ON inv_t FOR EACH ROW EXECUTE FUNCTION inv_log_f();",
    )
    .unwrap();
    let _ = announced(stack, &mut l, || {});
    let log = oid(&mut w, "inv_log");
    let a = announced(stack, &mut l, || {
        w.batch_execute("INSERT INTO inv_t VALUES (7, 7)").unwrap();
    });
    assert_eq!(
        tables(&a),
        {
            let mut v = vec![t, log];
            v.sort_unstable();
            v
        },
        "a trigger's write"
    );
    // Overflow: thousands of tables in one transaction become one whole-database announcement.
    let a = announced(stack, &mut l, || {
        w.batch_execute(
            "DO $$ BEGIN FOR i IN 1..1200 LOOP EXECUTE format('CREATE TABLE inv_many_%s (a int)', i); END LOOP; END $$;
             DO $$ BEGIN FOR i IN 1..1200 LOOP EXECUTE format('DROP TABLE inv_many_%s', i); END LOOP; END $$;",
        )
        .unwrap();
        w.batch_execute(
            "BEGIN; SELECT dbopt.invalidate_tags(VARIADIC array_agg('tag-' || g)) FROM generate_series(1, 2000) g; COMMIT",
        )
        .unwrap();
    });
    let last = a.last().expect("an announcement");
    assert_eq!(
        last["all"], true,
        "overflow is a whole-database announcement: {last}"
    );
    assert!(serde_json::to_string(last).unwrap().len() < 8000);

    // Without announce_all_tables, only watched tables are announced (what the router uses).
    w.batch_execute("RESET dbopt.announce_all_tables").unwrap();
    let a = announced(stack, &mut l, || {
        w.batch_execute("INSERT INTO inv_t VALUES (100, 1)")
            .unwrap();
    });
    assert!(
        a.is_empty(),
        "a table nobody watches is not announced: {a:?}"
    );
    let added: i64 = w
        .query_one(
            "SELECT dbopt.watch_tables(ARRAY[$1::text::regclass::oid])",
            &[&"inv_t"],
        )
        .unwrap()
        .get(0);
    assert_eq!(added, 1);
    let a = announced(stack, &mut l, || {
        w.batch_execute("INSERT INTO inv_t VALUES (101, 1)")
            .unwrap();
    });
    assert_eq!(tables(&a), vec![t], "a watched table is announced");

    // Bad input: precise errors.
    for (sql, code) in [
        ("SELECT dbopt.invalidate_tags('')", "22023"),
        ("SELECT dbopt.invalidate_tags(NULL::text)", "22004"),
        ("SELECT dbopt.invalidate_tags(repeat('x', 300))", "22023"),
        ("SELECT dbopt.invalidate_tags(E'a\\nb')", "22023"),
        ("SELECT dbopt.invalidate_table(1)", "42P01"),
    ] {
        let e = w.batch_execute(sql).expect_err(sql);
        assert_eq!(e.code().map(|c| c.code()), Some(code), "{sql}: {e}");
    }
    let mut replica = stack.connect("node1").expect("replica");
    let e = replica
        .batch_execute("SELECT dbopt.invalidate_all()")
        .expect_err("a standby cannot announce");
    assert_eq!(e.code().map(|c| c.code()), Some("25006"));
}

fn analysis_says_what_may_be_cached(stack: &Stack) {
    let mut c = stack.router("app").expect("router");
    let verdict = |c: &mut postgres::Client, q: &str| -> (bool, Option<String>) {
        let r = c
            .query_one(
                "SELECT cacheable, reason FROM dbopt.cache_analysis($1)",
                &[&q],
            )
            .expect(q);
        (r.get(0), r.get(1))
    };
    let mut p = stack.connect("node0").unwrap();
    p.batch_execute(
        "CREATE TABLE IF NOT EXISTS ca (id int PRIMARY KEY, v int);
         GRANT ALL ON ca TO app;
         CREATE OR REPLACE FUNCTION ca_f() RETURNS int LANGUAGE sql STABLE AS 'SELECT count(*)::int FROM inv_t';",
    )
    .unwrap();
    assert_eq!(
        verdict(&mut c, "SELECT v FROM ca WHERE id = $1"),
        (true, None)
    );
    for (q, why) in [
        ("SELECT now()", "stable"),
        ("SELECT random()", "volatile"),
        ("SELECT * FROM ca FOR UPDATE", "FOR UPDATE"),
        ("SELECT * FROM pg_class", "system catalog"),
        ("SELECT ca_f()", "stable"),
        ("SELECT 1; SELECT 2", "one statement"),
        (
            "WITH d AS (DELETE FROM ca RETURNING 1) SELECT * FROM d",
            "modifies",
        ),
    ] {
        let (ok, reason) = verdict(&mut c, q);
        assert!(!ok, "{q} must not be cacheable");
        assert!(
            reason.as_deref().unwrap_or("").contains(why),
            "{q}: {reason:?}"
        );
    }
    let e = c
        .query_one("SELECT * FROM dbopt.cache_analysis('SELEC 1')", &[])
        .expect_err("syntax error");
    assert_eq!(e.code().map(|c| c.code()), Some("42601"));
}

fn status(stack: &Stack) -> serde_json::Value {
    stack.router_status()["cache"].clone()
}

fn local_hits(stack: &Stack) -> u64 {
    status(stack)["local"]["hits"].as_u64().unwrap_or(0)
        + status(stack)["redis"]["hits"].as_u64().unwrap_or(0)
}

fn hits_answer_like_postgresql(stack: &Stack) {
    let mut p = stack.connect("node0").unwrap();
    p.batch_execute(
        "DELETE FROM ca; INSERT INTO ca SELECT g, g * 10 FROM generate_series(1, 100) g;",
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the cache feed", || {
        status(stack)["databases"]["postgres"]["synced"]
            .as_bool()
            .filter(|s| *s)
    });
    let mut c = stack.router("app").expect("router");
    let q = "/* dbopt:cache ttl=60s */ SELECT id, v, v::text || 'x' AS t, 1.5::float8 AS f FROM ca WHERE id <= $1 ORDER BY id";
    let plain =
        "SELECT id, v, v::text || 'x' AS t, 1.5::float8 AS f FROM ca WHERE id <= $1 ORDER BY id";
    let before = local_hits(stack);
    let expected: Vec<(i32, i32, String, f64)> = c
        .query(plain, &[&50])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    // Each kind of read is repeated until the cache answers it (a fill can be refused when an
    // announcement of the setup write is applied meanwhile), and every answer is checked.
    let until_hit = |c: &mut postgres::Client, read: &mut dyn FnMut(&mut postgres::Client)| {
        wait_for(Duration::from_secs(10), "a cache hit", || {
            let before = local_hits(stack);
            read(c);
            (local_hits(stack) > before).then_some(())
        });
    };
    // Binary results (the postgres crate asks for binary) from the cache, equal to uncached.
    until_hit(&mut c, &mut |c| {
        let got: Vec<(i32, i32, String, f64)> = c
            .query(q, &[&50])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        assert_eq!(got, expected);
    });
    // Simple protocol (text) too, and a prepared statement.
    let simple = |c: &mut postgres::Client, sql: &str| -> Vec<Vec<Option<String>>> {
        c.simple_query(sql)
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    };
    let uncached = simple(&mut c, "SELECT id, v FROM ca WHERE id <= 3 ORDER BY id");
    until_hit(&mut c, &mut |c| {
        assert_eq!(
            simple(
                c,
                "/* dbopt:cache */ SELECT id, v FROM ca WHERE id <= 3 ORDER BY id"
            ),
            uncached
        );
    });
    let st = c
        .prepare("/* dbopt:cache */ SELECT v FROM ca WHERE id = $1")
        .unwrap();
    until_hit(&mut c, &mut |c| {
        assert_eq!(c.query_one(&st, &[&7]).unwrap().get::<_, i32>(0), 70);
    });
    eprintln!(
        "cache: {} hits (binary extended, simple text, prepared)",
        local_hits(stack) - before
    );
    // A write through the router is visible at once, from the cache's point of view too.
    c.execute("UPDATE ca SET v = v + 1 WHERE id = 7", &[])
        .unwrap();
    assert_eq!(c.query_one(&st, &[&7]).unwrap().get::<_, i32>(0), 71);
    // Settings change the key: DateStyle changes a date's text.
    c.batch_execute("SET DateStyle = 'ISO, MDY'").unwrap();
    let iso = simple(
        &mut c,
        "/* dbopt:cache */ SELECT DATE '2024-01-02' + id FROM ca WHERE id = 1",
    );
    c.batch_execute("SET DateStyle = 'German'").unwrap();
    let german = simple(
        &mut c,
        "/* dbopt:cache */ SELECT DATE '2024-01-02' + id FROM ca WHERE id = 1",
    );
    assert_ne!(
        iso, german,
        "a setting that changes the text form changes the key"
    );
    c.batch_execute("RESET DateStyle").unwrap();
    // Another role does not share entries (row-level security, privileges).
    let mut ops = stack.router("ops").expect("ops");
    let e = ops
        .query(
            "/* dbopt:cache */ SELECT id, v FROM ca WHERE id <= $1 ORDER BY id",
            &[&50],
        )
        .expect_err("ops may not read ca");
    assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
    // Nothing volatile is cached.
    let a: f64 = c
        .query_one("/* dbopt:cache */ SELECT random()", &[])
        .unwrap()
        .get(0);
    let b: f64 = c
        .query_one("/* dbopt:cache */ SELECT random()", &[])
        .unwrap()
        .get(0);
    assert_ne!(a, b);
}

fn bad_hints_and_manual_invalidation(stack: &Stack) {
    let mut c = stack.router("app").expect("router");
    for bad in [
        "/* dbopt:cache ttl=abc */ SELECT 1",
        "/* dbopt:cache ttl=0 */ SELECT 1",
        "/* dbopt:cache colour=red */ SELECT 1",
        "/* dbopt:cache tags=a,,b */ SELECT 1",
    ] {
        let e = c.simple_query(bad).expect_err(bad);
        assert_eq!(e.code().map(|c| c.code()), Some("22023"), "{bad}: {e}");
    }
    assert!(c.simple_query("SELECT 1").is_ok(), "the session goes on");

    // Application tags: a hinted entry goes when its tag is invalidated in SQL or by hand: the
    // next read is a miss that fills it again.
    let q = "/* dbopt:cache tags=user:42 */ SELECT v FROM ca WHERE id = 9";
    let fills = |stack: &Stack| status(stack)["local"]["fills"].as_u64().unwrap_or(0);
    let refilled = |c: &mut postgres::Client, before: u64| {
        wait_for(
            Duration::from_secs(10),
            "a refill after the invalidation",
            || {
                c.query_one(q, &[]).ok()?;
                (fills(stack) > before).then_some(())
            },
        )
    };
    c.query_one(q, &[]).unwrap();
    wait_for(Duration::from_secs(10), "the tagged entry", || {
        let before = local_hits(stack);
        c.query_one(q, &[]).ok()?;
        (local_hits(stack) > before).then_some(())
    });
    let before = fills(stack);
    let mut p = stack.connect("node0").unwrap();
    p.batch_execute("SELECT dbopt.invalidate_tags('user:42')")
        .unwrap();
    refilled(&mut c, before);
    let admin = stack.info.router_admin_port;
    let post = |path: &str, auth: Option<&str>, body: &str| -> (u16, String) {
        dbopt_e2e::http::post(admin, path, auth, body).expect("admin answers")
    };
    assert_eq!(
        post("/cache/invalidate", None, "db=postgres&tag=user:42").0,
        401
    );
    assert_eq!(
        post(
            "/cache/invalidate",
            Some("Bearer wrong"),
            "db=postgres&tag=user:42"
        )
        .0,
        401
    );
    let token = format!("Bearer {}", "dbopt-admin-token");
    assert_eq!(
        post("/cache/invalidate", Some(&token), "db=postgres&tag=").0,
        400
    );
    assert_eq!(
        post("/cache/invalidate", Some(&token), "db=nope&all=1").0,
        404
    );
    assert_eq!(
        post("/cache/invalidate", Some(&token), "db=postgres&evil=1").0,
        400
    );
    let before = fills(stack);
    let (code, body) = post(
        "/cache/invalidate",
        Some(&token),
        "db=postgres&tag=user%3A42",
    );
    assert_eq!(code, 200, "{body}");
    refilled(&mut c, before);
    let before = fills(stack);
    let (code, body) = post(
        "/cache/invalidate",
        Some(&token),
        "db=postgres&tag_pattern=user%3A*",
    );
    assert_eq!(code, 200, "{body}");
    refilled(&mut c, before);
    let (code, _) = post("/cache/invalidate", Some(&token), "db=postgres&all=1");
    assert_eq!(code, 200);
}

fn read_your_writes_across_connections(stack: &Stack) {
    let mut p = stack.connect("node0").unwrap();
    p.batch_execute(
        "CREATE TABLE IF NOT EXISTS ryw2 (id int PRIMARY KEY, v int);
         GRANT ALL ON ryw2 TO app;
         INSERT INTO ryw2 VALUES (1, 0) ON CONFLICT (id) DO UPDATE SET v = 0;",
    )
    .unwrap();
    let mut a = stack.router("app").expect("a");
    let mut b = stack.router("app").expect("b");
    let cached = b
        .prepare("/* dbopt:cache */ SELECT v FROM ryw2 WHERE id = 1")
        .unwrap();
    let uncached = b.prepare("SELECT v FROM ryw2 WHERE id = 1").unwrap();
    let mut misses = 0;
    for i in 1..=1000 {
        a.execute("UPDATE ryw2 SET v = $1 WHERE id = 1", &[&i])
            .unwrap();
        let st = if i % 2 == 0 { &cached } else { &uncached };
        let v: i32 = b.query_one(st, &[]).unwrap().get(0);
        if v != i {
            misses += 1;
        }
    }
    eprintln!("read-your-writes across two connections of one user: 1000 pairs, {misses} misses");
    assert_eq!(misses, 0);

    // Another user, whose cached entry was a hit just before: once a write through the router is
    // acknowledged, its next read is current (the invalidation was done before the acknowledgement).
    p.batch_execute("GRANT SELECT ON ryw2 TO ops").unwrap();
    let mut other = stack.router("ops").expect("ops");
    // Prepared once: each read is one Bind/Execute/Sync, nothing else goes to a server.
    let q = other
        .prepare("/* dbopt:cache */ SELECT v FROM ryw2 WHERE id = 1")
        .unwrap();
    let mut stale = 0;
    for i in 1001..=1300 {
        // Fill, then hit (the entry is in place and the reader's floor is settled).
        other.query_one(&q, &[]).unwrap();
        other.query_one(&q, &[]).unwrap();
        a.execute("UPDATE ryw2 SET v = $1 WHERE id = 1", &[&i])
            .unwrap();
        let v: i32 = other.query_one(&q, &[]).unwrap().get(0);
        stale += u32::from(v != i);
    }
    eprintln!("another user's cached read right after 300 acknowledged writes: {stale} stale");
    assert_eq!(stale, 0);
}

/// A client that alternates an uncached read and a cached one, back to back: each cached read
/// comes right after a database read of the same client, and is still answered by the cache (the
/// barrier it waits on covers that read, whatever the millisecond).
fn interleaved_reads_still_hit(stack: &Stack) {
    let mut p = stack.connect("node0").unwrap();
    p.batch_execute(
        "CREATE TABLE IF NOT EXISTS il (id int PRIMARY KEY, v int); GRANT SELECT ON il TO app;
         INSERT INTO il VALUES (1, 7) ON CONFLICT (id) DO UPDATE SET v = 7;",
    )
    .unwrap();
    let mut c = stack.router("app").expect("router");
    let cached = c
        .prepare("/* dbopt:cache ttl=300s */ SELECT v FROM il WHERE id = 1")
        .unwrap();
    let uncached = c
        .prepare("SELECT v, 'uncached' FROM il WHERE id = 1")
        .unwrap();
    wait_for(Duration::from_secs(10), "the entry to be cached", || {
        let before = local_hits(stack);
        c.query_one(&cached, &[]).unwrap();
        (local_hits(stack) > before).then_some(())
    });
    let (hits, bypassed) = (local_hits(stack), counter(stack, "bypassed"));
    for _ in 0..200 {
        let v: i32 = c.query_one(&uncached, &[]).unwrap().get(0);
        let w: i32 = c.query_one(&cached, &[]).unwrap().get(0);
        assert_eq!((v, w), (7, 7));
    }
    let (hits, bypassed) = (
        local_hits(stack) - hits,
        counter(stack, "bypassed") - bypassed,
    );
    eprintln!(
        "200 cached reads, each right after an uncached one: {hits} hits, {bypassed} bypassed"
    );
    assert!(hits >= 180, "{hits} hits, {bypassed} bypassed");
}

/// A replica fill is stored only if the replica had replayed past the primary's position just
/// after the table was watched (or last written). With the primary busy (a commit every 2 ms, as
/// production always is), the router's own sample of the replica — up to `health.lsn_poll_ms`
/// old — is always behind that position, so a client reading a new table in a burst never got a
/// fill stored (measured before the fix: 0 hits and 20 of 20 fills refused, for every one of 8
/// tables). The router now asks the replica on the fill's connection: the burst hits.
fn fills_of_new_tables_while_the_primary_is_busy(stack: &Stack) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut p = stack.connect("node0").unwrap();
    p.batch_execute("CREATE TABLE IF NOT EXISTS busy_writes (n int)")
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut w = stack.connect("node0").unwrap();
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                w.batch_execute("INSERT INTO busy_writes VALUES (1)")
                    .unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut c = stack.router("app").expect("router");
    let (probes, refused) = (
        counter(stack, "replay_probes"),
        counter(stack, "fills_not_admitted"),
    );
    let mut per_table = Vec::new();
    for i in 0..5 {
        let table = format!("fresh_{i}");
        p.batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (n int); \
             INSERT INTO {table} VALUES (1); GRANT SELECT ON {table} TO app"
        ))
        .unwrap();
        // Every replica has the table (the reads go to any of them).
        for node in ["node1", "node2", "node3"] {
            wait_for(
                Duration::from_secs(20),
                "the table on every replica",
                || {
                    let mut r = stack.connect(node).ok()?;
                    let row = r
                        .query_one("SELECT to_regclass($1)::text", &[&table])
                        .ok()?;
                    row.get::<_, Option<String>>(0).map(|_| ())
                },
            );
        }
        let before = local_hits(stack);
        for _ in 0..20 {
            let rows = c
                .simple_query(&format!("SELECT n FROM {table} /* dbopt:cache ttl=60s */"))
                .unwrap();
            assert!(rows
                .iter()
                .any(|m| matches!(m, postgres::SimpleQueryMessage::Row(_))));
        }
        per_table.push(local_hits(stack) - before);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let (probes, refused) = (
        counter(stack, "replay_probes") - probes,
        counter(stack, "fills_not_admitted") - refused,
    );
    eprintln!(
        "20 back-to-back cached reads of each of 5 new tables, the primary committing every 2 ms: \
         hits {per_table:?}; {probes} replica positions asked, {refused} fills not admitted"
    );
    assert!(
        per_table.iter().all(|&h| h >= 1) && per_table.iter().sum::<u64>() >= 25,
        "hits per table {per_table:?}; {probes} replica positions asked, {refused} fills not admitted"
    );
}

fn counter(stack: &Stack, name: &str) -> u64 {
    status(stack)[name].as_u64().unwrap_or(0)
}

fn write_through_and_warming(stack: &Stack) {
    let mut p = stack.connect("node0").unwrap();
    p.batch_execute(
        "CREATE TABLE wt (id int PRIMARY KEY, v int); GRANT ALL ON wt TO app;
         INSERT INTO wt VALUES (1, 1);
         CREATE TABLE warm_t (n int); GRANT SELECT ON warm_t TO app;
         INSERT INTO warm_t VALUES (1), (2), (3);",
    )
    .unwrap();
    // Write-through (a rule by table, no hint): after a write through the router, the other
    // connection's next read is a hit, and current.
    let mut a = stack.router("app").unwrap();
    let mut b = stack.router("app").unwrap();
    let q = "SELECT v FROM wt WHERE id = 1";
    assert_eq!(b.query_one(q, &[]).unwrap().get::<_, i32>(0), 1);
    wait_for(Duration::from_secs(10), "the first wt entry", || {
        let before = local_hits(stack);
        b.query_one(q, &[]).ok()?;
        (local_hits(stack) > before).then_some(())
    });
    let mut hits = 0;
    for i in 2..=21 {
        a.execute("UPDATE wt SET v = $1 WHERE id = 1", &[&i])
            .unwrap();
        let before = local_hits(stack);
        assert_eq!(
            b.query_one(q, &[]).unwrap().get::<_, i32>(0),
            i,
            "current after the write"
        );
        hits += u32::from(local_hits(stack) > before);
    }
    eprintln!(
        "write-through: {hits} of 20 reads right after a write were hits ({} refreshes)",
        counter(stack, "refreshes")
    );
    // Without write-through every one of them misses (the write invalidated the entry).
    assert!(
        hits >= 10,
        "write-through refreshed only {hits} of 20 entries"
    );

    // Warming: the warm statement (its table did not exist when the router started) is filled
    // when the router resynchronises; a new client's first read is then a hit.
    let before = counter(stack, "refreshes");
    p.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'dbopt-router cache listener'",
    )
    .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the warm statement to be filled",
        || (counter(stack, "refreshes") > before).then_some(()),
    );
    let mut fresh = stack.router("app").unwrap();
    let before = local_hits(stack);
    let rows = fresh.simple_query("SELECT count(*) FROM warm_t").unwrap();
    let count = rows.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("3"));
    assert_eq!(
        local_hits(stack),
        before + 1,
        "the first read of a warm statement is a hit"
    );
}
