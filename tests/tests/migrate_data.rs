//! dbopt-migrate and the data behind the schema: rows of dropped tables and values of dropped
//! columns are kept aside and put back by the rollback (sequences continuing where they were,
//! triggers not fired by the refill), a rollback that cannot put them back fails without changing
//! anything, `purge` forgets them; and with the dbopt extension, every DDL statement — through
//! migrations or by hand — lands in `dbopt.ddl_history` with who ran it and which migration.

use dbopt_e2e::e2e_port;
use dbopt_e2e::migrations::{count, migrations, options};
use dbopt_e2e::plain::{assert_same_dump, PlainPostgres};
use dbopt_migrate::run;
use dbopt_migrate::{ddl_log, keep};

const V1: (&str, &str) = (
    "V1__people.sql",
    r#"CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    touched timestamptz NOT NULL DEFAULT '2000-01-01',
    -- Dropped by V2: last, so that they come back in their place (ADD COLUMN appends).
    nickname text NOT NULL,
    mood mood
);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.touched := now(); RETURN NEW; END $$;
CREATE TRIGGER users_touch BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION touch();
CREATE TABLE notes (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id bigint REFERENCES users (id),
    body text
);
CREATE INDEX notes_user_idx ON notes (user_id);
CREATE TABLE "we""ird; DROP TABLE users --" (k int PRIMARY KEY, keep text, "Nick Name" text);
CREATE FUNCTION "mark; DROP TABLE users --"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.keep := 'touched by the refill'; RETURN NEW; END $$;
CREATE TRIGGER "we""ird trigger" BEFORE UPDATE ON "we""ird; DROP TABLE users --"
    FOR EACH ROW EXECUTE FUNCTION "mark; DROP TABLE users --"();"#,
);

const V2: (&str, &str) = (
    "V2__slim_down.sql",
    r#"ALTER TABLE users DROP COLUMN nickname;
ALTER TABLE users DROP COLUMN mood;
DROP TYPE mood;
DROP TABLE notes;
ALTER TABLE "we""ird; DROP TABLE users --" DROP COLUMN "Nick Name";"#,
);

const DATA: &str = r#"
INSERT INTO users (email, nickname, mood)
SELECT 'u' || i || '@example.com', CASE WHEN i % 7 = 0 THEN 'O''Brien ' || i ELSE 'nick ' || i || ' ✓' END,
       (ARRAY['sad', 'ok', 'happy', NULL])[1 + i % 4]::mood
  FROM generate_series(1, 500) i;
INSERT INTO notes (user_id, body) SELECT 1 + i % 500, 'note ' || i FROM generate_series(1, 40) i;
INSERT INTO "we""ird; DROP TABLE users --" VALUES (1, 'x', 'a"b'), (2, 'y', NULL);
"#;

/// Every row of the tables the test looks at, as text, in key order.
fn contents(c: &mut postgres::Client) -> Vec<String> {
    let mut out = Vec::new();
    for q in [
        "SELECT u::text FROM users u ORDER BY id",
        "SELECT n::text FROM notes n ORDER BY id",
        r#"SELECT w::text FROM "we""ird; DROP TABLE users --" w ORDER BY k"#,
    ] {
        for r in c.query(q, &[]).expect(q) {
            out.push(r.get(0));
        }
    }
    out
}

#[test]
fn dropped_data_comes_back_with_the_rollback_and_purge_forgets_it() {
    let pg = PlainPostgres::start(e2e_port(71), &[]);
    pg.connect()
        .batch_execute("CREATE DATABASE app")
        .expect("db");
    let mut c = pg.connect_to("app");
    run::apply(&mut c, &migrations(&[V1]), &options()).expect("V1");
    c.batch_execute(DATA).expect("data");
    let rows_before = contents(&mut c);
    let dump_v1 = pg.dump_schema("app");

    let all = migrations(&[V1, V2]);
    let r = run::apply(&mut c, &all, &options()).expect("V2");
    let notes = r[0].notes.join("\n");
    for what in [
        "rows of table public.notes come back from dbopt_migrate.kept_v2_",
        "values of column public.users.nickname come back",
        "values of column public.users.mood come back",
        r#"values of column public."we""ird; DROP TABLE users --"."Nick Name" come back"#,
    ] {
        assert!(notes.contains(what), "{what}\n{notes}");
    }
    let dump_v2 = pg.dump_schema("app");
    let kept = keep::list(&mut c).expect("list");
    let mut rows: Vec<(String, i64)> = kept.iter().map(|k| (k.object.clone(), k.rows)).collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            (
                r#"public."we""ird; DROP TABLE users --"."Nick Name""#.to_string(),
                2
            ),
            ("public.notes".to_string(), 40),
            ("public.users.mood".to_string(), 500),
            ("public.users.nickname".to_string(), 500),
        ]
    );

    // A user added since has no nickname: NOT NULL cannot come back, and nothing changes.
    c.batch_execute("INSERT INTO users (email) VALUES ('late@example.com')")
        .expect("late user");
    let e = run::rollback(&mut c, "1").expect_err("a row without a nickname");
    assert!(e.contains("rolling back V2 (slim down)"), "{e}");
    assert!(e.contains("contains null values"), "{e}");
    assert_same_dump(&pg.dump_schema("app"), &dump_v2, "after a failed rollback");
    assert_eq!(keep::list(&mut c).expect("list").len(), 4);
    c.batch_execute("DELETE FROM users WHERE email = 'late@example.com'")
        .expect("delete");

    // Rolled back: the schema of V1 byte for byte, every row and value as it was (the trigger
    // did not stamp the refilled rows), the copies gone, and the sequences continue.
    assert_eq!(
        run::rollback(&mut c, "1").expect("rollback"),
        ["V2 (slim down)"]
    );
    assert_same_dump(&pg.dump_schema("app"), &dump_v1, "after the rollback");
    assert_eq!(contents(&mut c), rows_before);
    assert!(keep::list(&mut c).expect("list").is_empty());
    let note: i32 = c
        .query_one("INSERT INTO notes (body) VALUES ('next') RETURNING id", &[])
        .expect("identity continues")
        .get(0);
    assert_eq!(note, 41);
    let user: i64 = c
        .query_one(
            "INSERT INTO users (email, nickname) VALUES ('next@example.com', 'n') RETURNING id",
            &[],
        )
        .expect("serial continues")
        .get(0);
    assert_eq!(user, 502, "the late user took 501");
    c.batch_execute("DELETE FROM notes WHERE id = 41; DELETE FROM users WHERE id = 502")
        .expect("tidy");

    // Applied again: the same schema as the first time (copies are named after the migration).
    run::apply(&mut c, &all, &options()).expect("V2 again");
    assert_same_dump(&pg.dump_schema("app"), &dump_v2, "applied again");

    // Purge: copies dropped, the stored rollback no longer reads them and says what it loses.
    let e = keep::purge(&mut c, Some("7")).expect_err("nothing kept for V7");
    assert!(e.contains("V7 has no kept data"), "{e}");
    let purged = keep::purge(&mut c, Some("2")).expect("purge");
    assert_eq!(purged.len(), 4);
    assert!(keep::list(&mut c).expect("list").is_empty());
    let (script, notes): (String, Vec<String>) = {
        let r = c
            .query_one(
                "SELECT rollback_sql, rollback_notes FROM dbopt_migrate.history \
                 WHERE version = '2' AND current",
                &[],
            )
            .expect("history");
        (r.get(0), r.get(1))
    };
    assert!(!script.contains("kept_"), "{script}");
    assert!(
        notes.iter().any(|n| n.contains("is created again empty")),
        "{notes:?}"
    );
    let copies: i64 = count(
        &mut c,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'dbopt_migrate' AND tablename LIKE 'kept\\_%'",
    );
    assert_eq!(copies, 0);
}

/// Every row of the DDL history as "command object".
fn recorded(c: &mut postgres::Client) -> Vec<String> {
    c.query(
        "SELECT command_tag || ' ' || object_identity FROM dbopt.ddl_history ORDER BY id",
        &[],
    )
    .expect("history")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn every_ddl_statement_is_in_the_history_with_its_migration() {
    let pg = PlainPostgres::start(e2e_port(72), &["shared_preload_libraries = 'dbopt'"]);
    let mut admin = pg.connect();
    admin.batch_execute("CREATE DATABASE app").expect("db");
    admin
        .batch_execute("CREATE ROLE dba_anna LOGIN")
        .expect("role");
    let mut c = pg.connect_to("app");
    c.batch_execute("CREATE EXTENSION dbopt")
        .expect("extension");
    // The extension's own objects are not schema changes of the application (the triggers exist
    // only from the end of CREATE EXTENSION dbopt; other extensions get one row each).
    let own = recorded(&mut c);
    assert!(own.is_empty(), "{own:?}");
    c.batch_execute("CREATE EXTENSION pg_trgm")
        .expect("another extension");
    let other = recorded(&mut c);
    assert_eq!(other, ["CREATE EXTENSION pg_trgm"]);

    let files = migrations(&[V1]);
    run::apply(&mut c, &files, &options()).expect("V1");
    let labelled: i64 = count(
        &mut c,
        "SELECT count(*) FROM dbopt.ddl_history WHERE migration_version = '1' \
             AND object_identity = 'public.users' AND command_tag = 'CREATE TABLE'",
    );
    assert_eq!(labelled, 1);

    // An ad-hoc change by a DBA who switched role: recorded with both names, no migration.
    c.batch_execute(
        "GRANT CREATE ON SCHEMA public TO dba_anna; ALTER TABLE users OWNER TO dba_anna; \
         SET ROLE dba_anna; ALTER TABLE users ADD COLUMN hotfix int; RESET ROLE",
    )
    .unwrap_or_else(|e| panic!("ad hoc: {:?}", e.as_db_error()));
    let ddl_log::Record::Changes {
        newest,
        since_last_migration,
    } = ddl_log::outside_migrations(&mut c, 10).expect("read")
    else {
        panic!("dbopt.ddl_history is there");
    };
    // GRANT, ALTER TABLE … OWNER and the ADD COLUMN: three statements, one transaction (pg_trgm
    // came before the migration).
    assert_eq!(since_last_migration, 1);
    let hotfix = newest
        .iter()
        .find(|d| d.statement.contains("ADD COLUMN hotfix"))
        .unwrap_or_else(|| panic!("{newest:#?}"));
    assert_eq!(
        (
            hotfix.login.as_str(),
            hotfix.role.as_str(),
            hotfix.command.as_str()
        ),
        ("postgres", "dba_anna", "ALTER TABLE")
    );
    assert_eq!(hotfix.object, "public.users");

    // The rollback is labelled as such; drops are recorded.
    run::rollback(&mut c, "0").expect("rollback");
    let dropped: i64 = count(
        &mut c,
        "SELECT count(*) FROM dbopt.ddl_history WHERE migration_version = '1 rollback' \
             AND command_tag = 'DROP TABLE' AND object_identity = 'public.users'",
    );
    assert_eq!(dropped, 1);

    // Readers need pg_monitor or dbopt_admin; the triggers write for everyone.
    admin
        .batch_execute("CREATE ROLE app_user LOGIN; GRANT CREATE ON DATABASE app TO app_user")
        .expect("role");
    let mut app = postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=app_user dbname=app", pg.port),
        postgres::NoTls,
    )
    .expect("app_user");
    app.batch_execute("CREATE SCHEMA app_owned; CREATE TABLE app_owned.t (x int)")
        .expect("DDL as an unprivileged user is recorded, not refused");
    let e = app
        .query_one("SELECT count(*) FROM dbopt.ddl_history", &[])
        .expect_err("not readable");
    assert!(
        e.as_db_error()
            .is_some_and(|d| d.message().contains("permission denied")),
        "{e:?}"
    );
    assert_eq!(
        ddl_log::outside_migrations(&mut app, 1).expect("probe"),
        ddl_log::Record::NotReadable
    );
    let by_app: i64 = count(
        &mut c,
        "SELECT count(*) FROM dbopt.ddl_history WHERE login = 'app_user' \
             AND object_identity = 'app_owned.t'",
    );
    assert_eq!(by_app, 1);

    // The extension can go and come back; its event triggers go with it.
    c.batch_execute("DROP EXTENSION dbopt; CREATE TABLE after_drop (x int)")
        .expect("drop extension");
    let triggers: i64 = c
        .query_one("SELECT count(*) FROM pg_event_trigger", &[])
        .expect("triggers")
        .get(0);
    assert_eq!(triggers, 0);
    assert_eq!(
        ddl_log::outside_migrations(&mut c, 1).expect("probe"),
        ddl_log::Record::NotRecorded
    );
    c.batch_execute("CREATE EXTENSION dbopt").expect("again");
}
