use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum R {
    /// May go to a replica.
    Rd,
    /// Primary.
    Wr,
    /// BEGIN READ ONLY.
    Bro,
    /// Other BEGIN.
    Bg,
    Em,
}

const TABLE: &[(&str, R)] = &[
    // Plain reads.
    ("SELECT 1", R::Rd),
    ("select * from accounts where id = 42", R::Rd),
    ("SELECT a, b FROM t WHERE a = $1 AND b > $2 ORDER BY b LIMIT 10", R::Rd),
    ("SELECT count(*) FROM t", R::Rd),
    ("SELECT pg_catalog.count(*) FROM t", R::Rd),
    ("SELECT sum(x), avg(x), min(x), max(x) FROM t GROUP BY y HAVING count(*) > 1", R::Rd),
    ("SELECT lower(name), upper(name) FROM users", R::Rd),
    ("SELECT now()", R::Rd),
    ("SELECT current_timestamp", R::Rd),
    ("SELECT CURRENT_USER", R::Rd),
    ("SELECT coalesce(a, 0) FROM t", R::Rd),
    ("SELECT CASE WHEN a > 0 THEN 'pos' ELSE 'neg' END FROM t", R::Rd),
    ("SELECT * FROM t1 JOIN t2 USING (id)", R::Rd),
    ("SELECT * FROM t1 LEFT JOIN t2 ON t1.id = t2.t1_id WHERE t2.id IS NULL", R::Rd),
    ("SELECT * FROM t WHERE id IN (SELECT t_id FROM u)", R::Rd),
    ("SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.t_id = t.id)", R::Rd),
    ("SELECT a FROM t UNION SELECT a FROM u", R::Rd),
    ("SELECT a FROM t UNION ALL SELECT a FROM u", R::Rd),
    ("SELECT a FROM t INTERSECT SELECT a FROM u", R::Rd),
    ("SELECT a FROM t EXCEPT SELECT a FROM u", R::Rd),
    ("WITH x AS (SELECT * FROM t) SELECT * FROM x", R::Rd),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r", R::Rd),
    ("VALUES (1), (2)", R::Rd),
    ("TABLE accounts", R::Rd),
    ("SELECT * FROM generate_series(1, 10)", R::Rd),
    ("SELECT row_number() OVER (ORDER BY a) FROM t", R::Rd),
    ("SELECT string_agg(name, ',') FROM users", R::Rd),
    ("SELECT json_build_object('a', 1)", R::Rd),
    ("SELECT data->>'k' FROM docs WHERE data @> '{\"a\":1}'", R::Rd),
    ("SELECT * FROM t WHERE id = ANY($1)", R::Rd),
    ("SELECT date_trunc('day', created) FROM t", R::Rd),
    ("SELECT extract(year FROM created) FROM t", R::Rd),
    ("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b", R::Rd),
    ("SELECT * FROM t LIMIT 5 OFFSET 10", R::Rd),
    ("SELECT * FROM t TABLESAMPLE SYSTEM (10)", R::Rd),
    ("SELECT random()", R::Rd),
    ("SELECT pg_is_in_recovery()", R::Rd),
    ("SELECT inet_server_port()", R::Rd),
    ("select 1; select 2", R::Rd),
    ("EXPLAIN SELECT * FROM t", R::Rd),
    ("EXPLAIN ANALYZE SELECT * FROM t", R::Rd),
    ("SELECT \"user\".\"id\" FROM \"auth_user\" \"user\" WHERE \"user\".\"id\" = 1", R::Rd),
    ("SELECT 'nextval(1)' AS not_a_call", R::Rd),
    ("SELECT a::text, b::int FROM t", R::Rd),
    ("SELECT * FROM t WHERE name ILIKE '%x%'", R::Rd),
    ("SELECT * FROM t WHERE created > now() - interval '1 day'", R::Rd),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;", R::Rd),
    ("SELECT * FROM t ORDER BY a NULLS LAST FETCH FIRST 3 ROWS ONLY", R::Rd),
    ("SELECT ARRAY[1,2,3]", R::Rd),
    ("SELECT (SELECT max(id) FROM t) AS m", R::Rd),
    // Reads that lock or write.
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE", R::Wr),
    ("SELECT * FROM t FOR SHARE", R::Wr),
    ("SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", R::Wr),
    ("SELECT * FROM t FOR KEY SHARE NOWAIT", R::Wr),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", R::Wr),
    ("SELECT * INTO t2 FROM t", R::Wr),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", R::Wr),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM u", R::Wr),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i", R::Wr),
    ("SELECT nextval('seq')", R::Wr),
    ("SELECT setval('seq', 10)", R::Wr),
    ("SELECT currval('seq')", R::Wr),
    ("SELECT pg_advisory_lock(1)", R::Wr),
    ("SELECT pg_try_advisory_xact_lock(1)", R::Wr),
    ("SELECT set_config('work_mem', '64MB', false)", R::Wr),
    ("SELECT pg_notify('ch', 'x')", R::Wr),
    ("SELECT my_unknown_function(1)", R::Wr),
    ("SELECT app.do_things()", R::Wr),
    ("SELECT * FROM my_set_returning_function()", R::Wr),
    ("SELECT txid_current()", R::Wr),
    ("SELECT lo_create(0)", R::Wr),
    ("SELECT 1; UPDATE t SET a = 1", R::Wr),
    ("SELECT CASE WHEN true THEN nextval('s') END", R::Wr),
    ("SELECT * FROM t WHERE id = (SELECT nextval('s'))", R::Wr),
    ("EXPLAIN ANALYZE DELETE FROM t", R::Wr),
    // DML.
    ("INSERT INTO t VALUES (1)", R::Wr),
    ("INSERT INTO t SELECT * FROM u", R::Wr),
    ("INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO NOTHING", R::Wr),
    ("INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET b = excluded.b", R::Wr),
    ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1", R::Wr),
    ("UPDATE t SET a = u.a FROM u WHERE t.id = u.id", R::Wr),
    ("DELETE FROM t WHERE id = 1", R::Wr),
    ("DELETE FROM t USING u WHERE t.id = u.id RETURNING t.*", R::Wr),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.a", R::Wr),
    ("TRUNCATE t", R::Wr),
    ("COPY t FROM STDIN", R::Wr),
    ("COPY t TO STDOUT", R::Wr),
    ("COPY (SELECT 1) TO STDOUT", R::Wr),
    // DDL and utility.
    ("CREATE TABLE t (id int primary key)", R::Wr),
    ("CREATE TABLE t2 AS SELECT * FROM t", R::Wr),
    ("CREATE INDEX CONCURRENTLY i ON t (a)", R::Wr),
    ("ALTER TABLE t ADD COLUMN b text", R::Wr),
    ("DROP TABLE t", R::Wr),
    ("CREATE VIEW v AS SELECT 1", R::Wr),
    ("CREATE EXTENSION dbopt", R::Wr),
    ("GRANT SELECT ON t TO app", R::Wr),
    ("VACUUM t", R::Wr),
    ("ANALYZE t", R::Wr),
    ("REINDEX TABLE t", R::Wr),
    ("CLUSTER t", R::Wr),
    ("REFRESH MATERIALIZED VIEW mv", R::Wr),
    ("COMMENT ON TABLE t IS 'x'", R::Wr),
    ("CREATE SEQUENCE s", R::Wr),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'", R::Wr),
    ("CHECKPOINT", R::Wr),
    // Session state and others.
    ("SET search_path TO app", R::Wr),
    ("SET LOCAL statement_timeout = '5s'", R::Wr),
    ("RESET ALL", R::Wr),
    ("SHOW work_mem", R::Wr),
    ("LISTEN ch", R::Wr),
    ("UNLISTEN *", R::Wr),
    ("NOTIFY ch, 'x'", R::Wr),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", R::Wr),
    ("CALL proc()", R::Wr),
    ("DO $$BEGIN PERFORM 1; END$$", R::Wr),
    ("PREPARE p AS SELECT 1", R::Wr),
    ("EXECUTE p", R::Wr),
    ("DEALLOCATE ALL", R::Wr),
    ("DECLARE c CURSOR FOR SELECT 1", R::Wr),
    ("FETCH 10 FROM c", R::Wr),
    ("DISCARD ALL", R::Wr),
    ("COMMIT", R::Wr),
    ("ROLLBACK", R::Wr),
    ("SAVEPOINT s1", R::Wr),
    ("RELEASE SAVEPOINT s1", R::Wr),
    ("SELEC 1", R::Wr),
    ("SELECT * FROM", R::Wr),
    ("BEGIN; SELECT 1; COMMIT", R::Wr),
    // Transactions.
    ("BEGIN", R::Bg),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", R::Bg),
    ("START TRANSACTION", R::Bg),
    ("BEGIN READ WRITE", R::Bg),
    ("BEGIN READ ONLY", R::Bro),
    ("begin transaction read only", R::Bro),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", R::Bro),
    ("START TRANSACTION READ ONLY, DEFERRABLE", R::Bro),
    // Empty.
    ("", R::Em),
    (";", R::Em),
    ("-- only a comment", R::Em),
];

fn short(k: Kind) -> R {
    match k {
        Kind::Read => R::Rd,
        Kind::Write(_) | Kind::MayWrite(_) => R::Wr,
        Kind::BeginReadOnly => R::Bro,
        Kind::Begin => R::Bg,
        Kind::Empty => R::Em,
    }
}

#[test]
fn classification_table() {
    assert!(TABLE.len() >= 100, "{} statements", TABLE.len());
    let catalog = FunctionCatalog::builtin();
    let wrong: Vec<String> = TABLE
        .iter()
        .filter_map(|(sql, want)| {
            let got = classify(sql, &catalog).kind;
            (short(got) != *want).then(|| format!("{sql:?}: want {want:?}, got {got:?}"))
        })
        .collect();
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn catalogue_decides_unknown_functions() {
    let catalog = FunctionCatalog::from_rows([
        ("app".to_string(), "price_of".to_string(), true),
        ("app".to_string(), "bump".to_string(), false),
        ("public".to_string(), "price_of".to_string(), true),
        ("pg_catalog".to_string(), "random".to_string(), false),
        (
            "pg_catalog".to_string(),
            "pg_is_in_recovery".to_string(),
            false,
        ),
        ("pg_catalog".to_string(), "nextval".to_string(), false),
        ("other".to_string(), "mixed".to_string(), true),
        ("public".to_string(), "mixed".to_string(), false),
    ]);
    let k = |sql: &str| classify(sql, &catalog).kind;
    assert_eq!(k("SELECT price_of(1)"), Kind::Read);
    assert_eq!(k("SELECT app.price_of(1)"), Kind::Read);
    assert!(matches!(k("SELECT app.bump()"), Kind::MayWrite(_)));
    assert!(matches!(k("SELECT bump()"), Kind::MayWrite(_)));
    // Volatile but read-only.
    assert_eq!(k("SELECT random()"), Kind::Read);
    assert_eq!(k("SELECT pg_is_in_recovery()"), Kind::Read);
    assert!(matches!(k("SELECT nextval('s')"), Kind::Write(_)));
    // Safe in one schema only: unqualified is not provably safe.
    assert!(matches!(k("SELECT mixed()"), Kind::MayWrite(_)));
    assert_eq!(k("SELECT other.mixed()"), Kind::Read);
}

#[test]
fn hints_in_comments() {
    assert_eq!(hints("SELECT 1"), (None, false));
    assert_eq!(
        hints("/* dbopt:primary */ SELECT 1"),
        (Some(Hint::Primary), false)
    );
    assert_eq!(
        hints("SELECT 1 -- dbopt:replica"),
        (Some(Hint::Replica), false)
    );
    assert_eq!(
        hints("/* dbopt:critical, dbopt:replica */ UPDATE t SET a = 1"),
        (Some(Hint::Replica), true)
    );
    // Primary wins over replica when both are written.
    assert_eq!(
        hints("/* dbopt:replica */ /* dbopt:primary */ SELECT 1"),
        (Some(Hint::Primary), false)
    );
    // Inside a string literal it is data, not a hint.
    assert_eq!(hints("SELECT '/* dbopt:primary */'"), (None, false));
    assert_eq!(hints("/*dbopt:critical*/SELECT 1"), (None, true));
    // An unterminated comment does not panic; the statement fails on the server anyway.
    assert_eq!(hints("SELECT 1 /* dbopt:primary"), (None, false));
    // Dollar-quoted, escape-string and identifier text is data, whatever it looks like.
    assert_eq!(hints("select $$ /* dbopt:replica */ $$, 1"), (None, false));
    assert_eq!(hints("select $x$ -- dbopt:replica\n $x$"), (None, false));
    assert_eq!(hints("select E'\\' /* dbopt:replica */ '"), (None, false));
    assert_eq!(hints("select 1 as \"/* dbopt:critical */\""), (None, false));
    assert_eq!(
        hints("select 1 -- dbopt:replica\n"),
        (Some(Hint::Replica), false)
    );
    assert_eq!(hints("select\0 1 /* dbopt:replica */"), (None, false));
}

#[test]
fn a_replica_hint_never_moves_a_write() {
    use crate::route::{decide, Target};
    let f = FunctionCatalog::builtin();
    let target = |sql: &str| decide(&classify(sql, &f), false, false).target;
    assert_eq!(
        target("/* dbopt:replica */ SELECT report()"),
        Target::Replica
    );
    for sql in [
        "/* dbopt:replica */ INSERT INTO t VALUES (1)",
        "/* dbopt:replica */ CREATE TABLE t (a int)",
        "/* dbopt:replica */ DROP TABLE t",
        "/* dbopt:replica */ SELECT nextval('s')",
        "/* dbopt:replica */ SELECT txid_current()",
        "/* dbopt:replica */ SELECT pg_current_xact_id()",
        "/* dbopt:replica */ SELECT * FROM t FOR UPDATE",
        "/* dbopt:replica */ BEGIN",
        "/* dbopt:replica */ SET x.y = 1",
        "select $$ /* dbopt:replica */ $$, nextval('s')",
        "/* dbopt:replica */ WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d",
    ] {
        assert_eq!(target(sql), Target::Primary, "{sql}");
    }
    // STABLE in pg_proc, but assigns an xid: never read-only, even from the loaded catalogue.
    let catalog = FunctionCatalog::from_rows([
        ("pg_catalog".to_string(), "txid_current".to_string(), true),
        (
            "pg_catalog".to_string(),
            "pg_current_xact_id".to_string(),
            true,
        ),
    ]);
    assert!(matches!(
        classify("SELECT txid_current()", &catalog).kind,
        Kind::Write(_)
    ));
    assert!(matches!(
        classify("SELECT pg_current_xact_id()", &catalog).kind,
        Kind::Write(_)
    ));
}

#[test]
fn statements_that_leave_session_state_are_flagged() {
    let f = FunctionCatalog::builtin();
    let session = |sql: &str| classify(sql, &f).session;
    for sql in [
        "SET TimeZone = 'UTC'",
        "RESET ALL",
        "SET ROLE other",
        "SET SESSION AUTHORIZATION other",
        "SET session_replication_role = replica",
        "SELECT set_config('a.b', 'c', false)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock(1)",
        "LISTEN ch",
        "CREATE TEMP TABLE t (a int)",
        "CREATE TEMPORARY VIEW v AS SELECT 1",
        "SELECT 1 INTO TEMP t2",
        "PREPARE p AS SELECT 1",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "DISCARD ALL",
        "DO $$ BEGIN PERFORM 1; END $$",
        "CALL proc()",
        "SELECT my_function()",
        "UPDATE t SET a = 1; SET work_mem = '1GB'",
        "this is not sql",
    ] {
        assert!(session(sql), "{sql}");
    }
    for sql in [
        "SELECT 1",
        "SET LOCAL statement_timeout = 5",
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 2",
        "INSERT INTO t VALUES (nextval('s'), now())",
        "SELECT pg_advisory_xact_lock(1)",
        "CREATE TABLE t (a int)",
        "BEGIN",
        "COMMIT",
    ] {
        assert!(!session(sql), "{sql}");
    }
}

#[test]
fn plain_sets_need_only_their_setting_read_back() {
    let f = FunctionCatalog::builtin();
    for (sql, name) in [
        ("SET TimeZone = 'UTC'", Some("timezone")),
        ("SET TIME ZONE 'UTC'", Some("timezone")),
        ("set statement_timeout to 5000", Some("statement_timeout")),
        ("SET myapp.tenant = '7'", Some("myapp.tenant")),
        ("RESET search_path", Some("search_path")),
        ("SET work_mem TO DEFAULT", Some("work_mem")),
        ("SET LOCAL work_mem = '1MB'", None),
        ("SET ROLE other", None),
        ("SET SESSION AUTHORIZATION other", None),
        ("RESET ALL", None),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", None),
        ("SET a = 1; SET b = 2", None),
        ("SELECT set_config('a.b', 'c', false)", None),
    ] {
        assert_eq!(set_name(sql).as_deref(), name, "{sql}");
        assert_eq!(classify(sql, &f).simple_set, name.is_some(), "{sql}");
    }
}
