//! End-to-end: the extension's query observability on a real PostgreSQL 15 with dbopt preloaded —
//! statistics, errors, slow queries with plans, N+1 detection, privileges, settings, metrics.

use dbopt_e2e::e2e_port;
use dbopt_e2e::plain::PlainPostgres;
use postgres::error::SqlState;

fn server(offset: u16, extra: &[&str]) -> (PlainPostgres, postgres::Client) {
    let mut conf = vec![
        "shared_preload_libraries = 'dbopt'",
        "dbopt.slow_query_ms = 100",
    ];
    conf.extend_from_slice(extra);
    let pg = PlainPostgres::start(e2e_port(offset), &conf);
    let mut c = pg.connect();
    c.batch_execute("CREATE EXTENSION dbopt")
        .expect("create extension");
    (pg, c)
}

#[test]
fn every_statement_is_counted_with_normalised_text_and_errors() {
    let (_pg, mut c) = server(92, &[]);
    c.batch_execute("CREATE TABLE items (id int PRIMARY KEY, price int); INSERT INTO items SELECT g, g % 100 FROM generate_series(1, 1000) g")
        .expect("setup");
    c.execute("SELECT dbopt.reset()", &[]).expect("reset");
    for i in 0..20 {
        c.simple_query(&format!("SELECT price FROM items WHERE id = {i}"))
            .expect("select");
    }
    let stmt = c
        .prepare("SELECT count(*) FROM items WHERE price > $1")
        .expect("prepare");
    for p in [10, 20, 30] {
        c.query(&stmt, &[&p]).expect("query");
    }
    for _ in 0..2 {
        let e = c
            .simple_query("SELECT 100 / (price - 7) FROM items")
            .expect_err("division by zero");
        assert_eq!(e.code(), Some(&SqlState::DIVISION_BY_ZERO));
    }
    let rows = c
        .query(
            "SELECT query, calls, errors, rows, mean_exec_time >= 0, p50_exec_time <= p99_exec_time,
                    shared_blks_hit + shared_blks_read > 0, first_seen <= last_seen
             FROM dbopt.query_stats WHERE query LIKE '%items%' ORDER BY query",
            &[],
        )
        .expect("query_stats");
    let got: Vec<(String, i64, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("SELECT $1 / (price - $2) FROM items".to_string(), 0, 2, 0),
            (
                "SELECT count(*) FROM items WHERE price > $1".to_string(),
                3,
                0,
                3
            ),
            (
                "SELECT price FROM items WHERE id = $1".to_string(),
                20,
                0,
                19
            ),
        ],
        "literals are normalised, one entry per statement shape, failures counted"
    );
    for r in &rows[1..] {
        assert!(
            r.get::<_, bool>(4)
                && r.get::<_, bool>(5)
                && r.get::<_, bool>(6)
                && r.get::<_, bool>(7)
        );
    }
    let (n, max, bytes): (i64, i64, i64) = {
        let r = c.query_one("SELECT statements, max_statements, bytes_per_statement FROM dbopt.statements_info()", &[]).expect("info");
        (r.get(0), r.get(1), r.get(2))
    };
    assert!(n >= 3 && max == 5000 && bytes > 0);
    eprintln!("statement table: {n} of {max} entries, {bytes} bytes of shared memory per entry");
}

#[test]
fn slow_queries_are_kept_with_their_plans() {
    let (_pg, mut c) = server(93, &[]);
    c.batch_execute("SELECT pg_sleep(0.15)").expect("sleep");
    c.batch_execute("SELECT 1").expect("fast");
    let row = c
        .query_one(
            "SELECT query, duration_ms, username, datname, analyzed, plan->'Plan'->>'Node Type', client_addr
             FROM dbopt.slow_queries()",
            &[],
        )
        .expect("exactly the slow one");
    assert_eq!(row.get::<_, String>(0), "SELECT pg_sleep($1)");
    assert!(row.get::<_, f64>(1) >= 150.0);
    assert_eq!(
        (row.get::<_, String>(2), row.get::<_, String>(3)),
        ("postgres".into(), "postgres".into())
    );
    assert!(!row.get::<_, bool>(4));
    assert_eq!(row.get::<_, Option<String>>(5).as_deref(), Some("Result"));
    assert_eq!(
        row.get::<_, Option<String>>(6).as_deref(),
        Some("127.0.0.1")
    );
    // The LOG line carries the normalised text only: no STATEMENT line repeats the literal.
    c.batch_execute("SELECT pg_sleep(0.12), 'SECRET-LITERAL-4711'")
        .expect("slow with a literal");
    let log = _pg.log_text();
    assert!(log.contains("dbopt slow query"), "{log}");
    assert!(
        !log.contains("SECRET-LITERAL-4711"),
        "literal in the server log:\n{log}"
    );

    // With slow_query_analyze the plan carries actual rows per node.
    c.batch_execute("SET dbopt.slow_query_analyze = on; SELECT count(*) FROM generate_series(1, 100) g, pg_sleep(0.12)")
        .expect("analyzed");
    let actual: Option<f64> = c
        .query_one(
            "SELECT (plan->'Plan'->>'Actual Rows')::float8 FROM dbopt.slow_queries() WHERE analyzed ORDER BY captured_at DESC LIMIT 1",
            &[],
        )
        .expect("analyzed plan")
        .get(0);
    assert_eq!(actual, Some(1.0));
    let n: i64 = c
        .query_one("SELECT dbopt.slow_queries_reset()", &[])
        .expect("reset")
        .get(0);
    assert_eq!(
        n, 3,
        "the sleep, the sleep with a literal, the analyzed one"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM dbopt.slow_queries()", &[])
        .expect("count")
        .get(0);
    assert_eq!(n, 0);
}

#[test]
fn n_plus_one_loops_are_reported_and_batches_are_not() {
    let (_pg, mut c) = server(94, &[]);
    c.batch_execute(
        "CREATE TABLE author (id int PRIMARY KEY, name text);
         CREATE TABLE book (id int PRIMARY KEY, author_id int, title text);
         INSERT INTO author SELECT g, 'a' || g FROM generate_series(1, 100) g;
         INSERT INTO book SELECT g, g % 100 + 1, 't' || g FROM generate_series(1, 100) g;",
    )
    .expect("setup");
    // The Django loop: one query for the books, then one per book for its author, in a transaction.
    let by_id = c
        .prepare("SELECT id, name FROM author WHERE id = $1")
        .expect("prepare");
    let mut tx = c.transaction().expect("begin");
    let books = tx
        .query("SELECT id, author_id FROM book ORDER BY id LIMIT 50", &[])
        .expect("books");
    for b in &books {
        let author: i32 = b.get(1);
        tx.query(&by_id, &[&author]).expect("author");
    }
    tx.commit().expect("commit");
    // A batch job: one statement, one parameter set, many times. And a loop of distinct statements.
    let same = c
        .prepare("SELECT name FROM author WHERE id = $1")
        .expect("prepare");
    for _ in 0..40 {
        c.query(&same, &[&7i32]).expect("batch");
    }
    for i in 1..40 {
        // Structurally different statements (1, 2, … 39 columns): 39 query ids, one run each.
        let cols: Vec<String> = (0..i).map(|c| format!("{c}")).collect();
        c.simple_query(&format!("SELECT {}", cols.join(", ")))
            .expect("distinct");
    }
    let rows = c
        .query(
            "SELECT query, executions, parent_query, recommendation FROM dbopt.n_plus_one()",
            &[],
        )
        .expect("n_plus_one");
    let texts: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(rows.len(), 1, "only the loop is reported: {texts:?}");
    let r = &rows[0];
    assert_eq!(
        r.get::<_, String>(0),
        "SELECT id, name FROM author WHERE id = $1"
    );
    assert_eq!(r.get::<_, i64>(1), 50);
    assert_eq!(
        r.get::<_, Option<String>>(2).as_deref(),
        Some("SELECT id, author_id FROM book ORDER BY id LIMIT $1")
    );
    let advice: String = r.get(3);
    assert!(
        advice.contains("WHERE id = ANY($1)") && advice.contains("select_related"),
        "{advice}"
    );
}

#[test]
fn privileges_hold_for_a_non_superuser() {
    let (pg, mut c) = server(95, &[]);
    c.batch_execute("CREATE ROLE app LOGIN; CREATE ROLE dba LOGIN; GRANT dbopt_admin TO dba; SELECT 'secret' AS s")
        .expect("roles");
    let mut app = postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=app dbname=postgres", pg.port),
        postgres::NoTls,
    )
    .expect("connect as app");
    app.batch_execute("SELECT 42 AS mine").expect("own query");
    let texts: Vec<String> = app
        .query("SELECT query FROM dbopt.query_stats", &[])
        .expect("stats")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        texts.iter().any(|t| t == "SELECT $1 AS mine"),
        "own texts visible: {texts:?}"
    );
    assert!(
        texts.iter().any(|t| t == "<insufficient privilege>"),
        "others' hidden: {texts:?}"
    );
    assert!(!texts.iter().any(|t| t.contains("AS s")), "{texts:?}");
    for f in [
        "dbopt.reset()",
        "dbopt.slow_queries_reset()",
        "dbopt.n_plus_one_reset()",
    ] {
        let e = app
            .batch_execute(&format!("SELECT {f}"))
            .expect_err("not allowed");
        assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{f}");
    }
    let mut dba = postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=dba dbname=postgres", pg.port),
        postgres::NoTls,
    )
    .expect("connect as dba");
    dba.batch_execute("SELECT dbopt.reset()")
        .expect("dbopt_admin members may reset");
    // Other users' client addresses are hidden, as pg_stat_activity hides them.
    c.batch_execute("SELECT pg_sleep(0.12)").expect("slow");
    let shown: i64 = app
        .query_one(
            "SELECT count(*) FROM dbopt.slow_queries() WHERE username <> 'app' AND client_addr IS NOT NULL",
            &[],
        )
        .expect("slow queries")
        .get(0);
    assert_eq!(shown, 0);
    // pg_read_all_stats members see every text.
    c.batch_execute("GRANT pg_read_all_stats TO app")
        .expect("grant");
    app.batch_execute("SELECT 1").expect("q");
    let hidden: i64 = app
        .query_one(
            "SELECT count(*) FROM dbopt.query_stats WHERE query = '<insufficient privilege>'",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(hidden, 0);
}

#[test]
fn bad_settings_get_clear_errors() {
    let (_pg, mut c) = server(96, &[]);
    let cases = [
        (
            "SET dbopt.slow_query_ms = -5",
            SqlState::INVALID_PARAMETER_VALUE,
            "dbopt.slow_query_ms",
        ),
        (
            "SET dbopt.slow_query_sample_rate = 1.5",
            SqlState::INVALID_PARAMETER_VALUE,
            "dbopt.slow_query_sample_rate",
        ),
        (
            "SET dbopt.n_plus_one_threshold = 'many'",
            SqlState::INVALID_PARAMETER_VALUE,
            "dbopt.n_plus_one_threshold",
        ),
        (
            "SET dbopt.n_plus_one_window_ms = 0",
            SqlState::INVALID_PARAMETER_VALUE,
            "dbopt.n_plus_one_window_ms",
        ),
        (
            "SET dbopt.max_statements = 100",
            SqlState::CANT_CHANGE_RUNTIME_PARAM,
            "dbopt.max_statements",
        ),
    ];
    for (sql, code, name) in cases {
        let e = c.batch_execute(sql).expect_err(sql);
        let db = e.as_db_error().expect("server error");
        assert_eq!(db.code(), &code, "{sql}: {}", db.message());
        assert!(db.message().contains(name), "{sql}: {}", db.message());
    }
    let e = c
        .batch_execute("SELECT * FROM dbopt.query_stats('x')")
        .expect_err("no such signature");
    assert_eq!(e.code(), Some(&SqlState::UNDEFINED_FUNCTION));
    // The dbopt. prefix is reserved: a misspelt setting is an error, not a silent placeholder.
    let e = c
        .batch_execute("SET dbopt.slow_query_mss = 5")
        .expect_err("misspelt");
    let db = e.as_db_error().expect("server error");
    assert!(
        db.message().contains("dbopt.slow_query_mss"),
        "{}",
        db.message()
    );
}

#[test]
fn errors_pass_through_the_utility_hook_unchanged() {
    let (_pg, mut c) = server(88, &[]);
    let e = c
        .batch_execute("DROP TABLE no_such_table")
        .expect_err("missing");
    let db = e.as_db_error().expect("server error");
    assert_eq!(db.code(), &SqlState::UNDEFINED_TABLE);
    assert_eq!(
        db.detail(),
        None,
        "no Rust backtrace or anything else in DETAIL"
    );
    // A failing DDL keeps the fields ORMs read (schema, table, constraint).
    c.batch_execute(
        "CREATE TABLE parent (id int PRIMARY KEY); CREATE TABLE child (p int); \
         INSERT INTO child VALUES (5)",
    )
    .expect("tables");
    let e = c
        .batch_execute(
            "ALTER TABLE child ADD CONSTRAINT child_p_fk FOREIGN KEY (p) REFERENCES parent (id)",
        )
        .expect_err("orphan row");
    let db = e.as_db_error().expect("server error");
    assert_eq!(db.code(), &SqlState::FOREIGN_KEY_VIOLATION);
    assert_eq!(db.schema(), Some("public"));
    assert_eq!(db.table(), Some("child"));
    assert_eq!(db.constraint(), Some("child_p_fk"));
    assert!(
        !db.detail().unwrap_or("").contains("backtrace")
            && !db.detail().unwrap_or("").contains("pgrx"),
        "{:?}",
        db.detail()
    );
    // The session goes on, and nesting is right afterwards (a top-level statement is top-level).
    c.batch_execute("SELECT 1").expect("still usable");
}

#[test]
fn metrics_are_valid_prometheus_text() {
    let (_pg, mut c) = server(97, &[]);
    c.batch_execute("SELECT 1; SELECT pg_sleep(0.11)")
        .expect("work");
    let text: String = c
        .query_one("SELECT dbopt.metrics()", &[])
        .expect("metrics")
        .get(0);
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let scrape =
        prometheus_parse::Scrape::parse(lines.iter().map(|l| Ok(l.clone()))).expect("parses");
    let names: Vec<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for want in [
        "dbopt_queries_total",
        "dbopt_query_errors_total",
        "dbopt_slow_queries_total",
        "dbopt_statements",
        "dbopt_statement_evictions_total",
        "dbopt_node_is_primary",
        "dbopt_replication_replay_lag_seconds",
        "dbopt_replication_replay_lag_bytes",
        "dbopt_query_duration_seconds_count",
    ] {
        assert!(names.contains(&want), "{want} missing from\n{text}");
    }
    // Structure the parser is lenient about: every sample's family was declared before it.
    let mut declared = std::collections::HashSet::new();
    for l in &lines {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            declared.insert(
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            );
        } else if !l.starts_with('#') && !l.is_empty() {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                declared.contains(name) || declared.contains(family),
                "undeclared sample {l}"
            );
            let value = l.rsplit(' ').next().unwrap_or_default();
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "bad value in {l}"
            );
        }
    }
    let slow = scrape
        .samples
        .iter()
        .find(|s| s.metric == "dbopt_slow_queries_total")
        .expect("slow");
    assert!(
        matches!(slow.value, prometheus_parse::Value::Counter(v) if v >= 1.0),
        "{:?}",
        slow.value
    );
}

#[test]
fn index_advice_finds_the_missing_index_and_nothing_once_it_exists() {
    let (_pg, mut c) = server(98, &[]);
    c.batch_execute(
        "CREATE EXTENSION hypopg;
         CREATE TABLE orders (id int PRIMARY KEY, customer_id int, status text, created_at timestamptz, note text);
         INSERT INTO orders
         SELECT g, g % 20000, CASE WHEN g % 10 = 0 THEN 'open' ELSE 'closed' END,
                now() - g * interval '1 minute', 'n'
         FROM generate_series(1, 200000) g;
         CREATE INDEX orders_note ON orders (note);
         ANALYZE orders;",
    )
    .expect("200k rows");
    // Capture every plan for this session (the test's queries are fast on purpose).
    c.batch_execute("SET dbopt.slow_query_ms = 0").expect("set");
    for i in 0..5 {
        c.simple_query(&format!("SELECT * FROM orders WHERE customer_id = {i}"))
            .expect("by customer");
        c.simple_query(&format!(
            "SELECT id FROM orders WHERE created_at > now() - interval '1 hour' AND status = 'open' AND customer_id > {i}"
        ))
        .expect("range");
        c.simple_query("SELECT count(*) FROM orders WHERE note = 'n'")
            .expect("covered by orders_note");
        c.simple_query("SELECT count(*) FROM orders WHERE id % 7 = 3")
            .expect("not indexable");
    }
    let advice = |c: &mut postgres::Client| -> Vec<(Vec<String>, String, String)> {
        c.query(
            "SELECT columns, create_statement, reason FROM dbopt.index_advice()",
            &[],
        )
        .expect("index_advice")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    };
    let got = advice(&mut c);
    let statements: Vec<&str> = got.iter().map(|g| g.1.as_str()).collect();
    assert!(
        statements.contains(&"CREATE INDEX CONCURRENTLY ON public.orders (customer_id)"),
        "equality filter: {got:?}"
    );
    assert!(
        statements.contains(&"CREATE INDEX CONCURRENTLY ON public.orders (status, created_at)"),
        "equality before range: {got:?}"
    );
    assert!(
        !statements.iter().any(|s| s.contains("(note)")),
        "an existing index covers it: {got:?}"
    );
    assert!(
        !statements.iter().any(|s| s.contains("(id)")),
        "expressions are not plain columns: {got:?}"
    );
    assert!(got.iter().all(|g| g.2.contains("orders")), "{got:?}");
    // hypopg confirms what it can plan: the equality statement. The range statement's normalised
    // text (`interval $1`, as pg_stat_statements would show it too) cannot be prepared, so that
    // candidate stays, unverified, ranked by its plan alone.
    let verified: Vec<String> = c
        .query("SELECT create_statement FROM dbopt.index_advice() WHERE verified_with_hypopg AND cost_after < cost_before", &[])
        .expect("verified")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        verified,
        vec!["CREATE INDEX CONCURRENTLY ON public.orders (customer_id)".to_string()]
    );

    c.batch_execute(
        "CREATE INDEX ON orders (customer_id); CREATE INDEX ON orders (status, created_at)",
    )
    .expect("create the advised indexes");
    let got = advice(&mut c);
    assert!(got.is_empty(), "nothing left to advise: {got:?}");
}

#[test]
fn statistics_survive_a_clean_restart() {
    let (pg, mut c) = server(99, &[]);
    for i in 0..7 {
        c.simple_query(&format!("SELECT {i} AS kept_across_restarts"))
            .expect("q");
    }
    drop(c);
    pg.restart();
    let mut c = pg.connect();
    let calls: i64 = c
        .query_one(
            "SELECT calls FROM dbopt.query_stats WHERE query = 'SELECT $1 AS kept_across_restarts'",
            &[],
        )
        .expect("the entry came back")
        .get(0);
    assert_eq!(calls, 7);
}

#[test]
fn errors_caught_inside_functions_keep_the_nesting_right() {
    let (_pg, mut c) = server(89, &[]);
    c.batch_execute(
        "CREATE FUNCTION swallow() RETURNS int LANGUAGE plpgsql AS $$
         BEGIN
             BEGIN
                 PERFORM 1 / (SELECT 0);
             EXCEPTION WHEN division_by_zero THEN NULL;
             END;
             RETURN 1;
         END $$",
    )
    .expect("function");
    for _ in 0..3 {
        c.batch_execute("SELECT swallow()")
            .expect("the error is caught inside");
    }
    c.batch_execute("SELECT 42 AS after_swallow")
        .expect("next statement");
    let rows = c
        .query(
            "SELECT query, calls, errors FROM dbopt.query_stats WHERE toplevel AND query IN ('SELECT swallow()', 'SELECT $1 AS after_swallow') ORDER BY query",
            &[],
        )
        .expect("stats");
    let got: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("SELECT $1 AS after_swallow".to_string(), 1, 0),
            ("SELECT swallow()".to_string(), 3, 0)
        ],
        "a caught inner error neither fails the outer statement nor leaves later statements nested"
    );
}

/// Index advice as a DBA over hostile captures: nothing another role planted runs with the DBA's
/// rights, hidden statements give no advice, and a monitoring role (pg_read_all_stats, not a
/// superuser) gets its answer too.
#[test]
fn index_advice_runs_nothing_a_user_planted() {
    // Every execution is captured (as a busy server's slow ones would be).
    let (pg, mut dba) = server(87, &["dbopt.slow_query_ms = 0"]);
    dba.batch_execute(
        "CREATE EXTENSION hypopg;
         CREATE TABLE victim (id int);
         CREATE ROLE mallory LOGIN; CREATE ROLE monitor LOGIN; GRANT pg_read_all_stats TO monitor;
         GRANT CREATE ON SCHEMA public TO mallory;",
    )
    .expect("setup");
    let mut mallory = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=mallory dbname=postgres",
            pg.port
        ),
        postgres::NoTls,
    )
    .expect("connect as mallory");
    // A table whose column names are SQL, and a function the planner folds at plan time that
    // records whose rights it ran with.
    mallory
        .batch_execute(
            r#"CREATE TABLE trap ("a"" AND 1=1) >= 0; DROP TABLE victim; --" int,
                                  "b) >= 0; DROP TABLE victim; SELECT (1" int, c int);
               INSERT INTO trap SELECT g % 1000, g % 997, g FROM generate_series(1, 30000) g;
               ANALYZE trap;
               CREATE FUNCTION probe() RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$
               BEGIN PERFORM set_config('dbopt_test.planned_as', current_user, false); RETURN 7; END $$;"#,
        )
        .expect("plant");
    for i in 0..3 {
        mallory
            .simple_query(&format!(
                r#"SELECT * FROM trap WHERE "a"" AND 1=1) >= 0; DROP TABLE victim; --" > {i}
                   AND "b) >= 0; DROP TABLE victim; SELECT (1" > {i} AND c < 100"#
            ))
            .expect("hostile filter");
        mallory
            .simple_query("SELECT * FROM trap WHERE c = probe()")
            .expect("folded function");
        mallory
            .simple_query(&format!(
                r#"SELECT * FROM trap WHERE "b) >= 0; DROP TABLE victim; SELECT (1" = {i} AND c < 100"#
            ))
            .expect("hostile column, plain condition");
    }
    let advice: Vec<String> = dba
        .query("SELECT create_statement FROM dbopt.index_advice()", &[])
        .expect("index_advice as the DBA")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let victim: i64 = dba
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'victim'",
            &[],
        )
        .expect("victim")
        .get(0);
    assert_eq!(
        victim, 1,
        "nothing planted was executed; advice: {advice:?}"
    );
    let planned_as: Option<String> = dba
        .query_one("SELECT current_setting('dbopt_test.planned_as', true)", &[])
        .expect("setting")
        .get(0);
    assert_ne!(
        planned_as.as_deref(),
        Some("postgres"),
        "mallory's function never runs as the DBA"
    );
    assert!(
        advice
            .iter()
            .any(|a| a.contains(r#"public.trap ("b) >= 0; DROP TABLE victim; SELECT (1", c)"#)),
        "the hostile name still gets advice, quoted: {advice:?}"
    );
    // A monitoring role that is not a superuser gets advice (unverified), without errors.
    let mut monitor = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=monitor dbname=postgres",
            pg.port
        ),
        postgres::NoTls,
    )
    .expect("connect as monitor");
    let n: i64 = monitor
        .query_one("SELECT count(*) FROM dbopt.index_advice()", &[])
        .expect("index_advice as pg_read_all_stats")
        .get(0);
    assert!(n >= 1, "monitor sees the advice too");
    // A role that may not see mallory's statements gets no advice from them.
    dba.batch_execute("CREATE ROLE nobody LOGIN").expect("role");
    let mut nobody = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=nobody dbname=postgres",
            pg.port
        ),
        postgres::NoTls,
    )
    .expect("connect as nobody");
    let n: i64 = nobody
        .query_one("SELECT count(*) FROM dbopt.index_advice()", &[])
        .expect("index_advice as nobody")
        .get(0);
    assert_eq!(n, 0, "other roles' statements are not advised on");
}

/// Index advice over the whole workload: a statement that is never slow (so never captured as
/// such) but runs often is found from sampled plans and ranked by its total time.
#[test]
fn index_advice_covers_fast_statements_that_run_often() {
    // Nothing here is slow: only sampling can find the scan.
    let (_pg, mut c) = server(
        86,
        &[
            "dbopt.plan_sample_every = 50",
            "dbopt.slow_query_ms = 60000",
        ],
    );
    c.batch_execute(
        "CREATE TABLE events (id int PRIMARY KEY, account int, kind text);
         INSERT INTO events SELECT g, g % 5000, 'k' FROM generate_series(1, 50000) g;
         ANALYZE events;",
    )
    .expect("50k rows");
    for i in 0..400 {
        c.simple_query(&format!(
            "SELECT id FROM events WHERE account = {}",
            i % 5000
        ))
        .expect("fast lookup");
    }
    let slow: i64 = c
        .query_one(
            "SELECT count(*) FROM dbopt.slow_queries() WHERE query LIKE '%events%'",
            &[],
        )
        .expect("slow")
        .get(0);
    assert_eq!(slow, 0, "each lookup is fast (below dbopt.slow_query_ms)");
    let rows = c
        .query(
            "SELECT create_statement, estimated_saved_ms FROM dbopt.index_advice()",
            &[],
        )
        .expect("advice");
    let found = rows
        .iter()
        .find(|r| r.get::<_, String>(0) == "CREATE INDEX CONCURRENTLY ON public.events (account)");
    let found = found.unwrap_or_else(|| {
        panic!(
            "the frequent scan is advised: {:?}",
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        )
    });
    assert!(
        found.get::<_, f64>(1) > 0.0,
        "ranked by the statement's total time"
    );
}
