//! The rollback generator against PostgreSQL itself: for every migration of a corpus covering each
//! object kind, snapshot the schema, apply the migration, snapshot again, run the generated
//! rollback (`transform(after, before)`), and compare `pg_dump --schema-only` — the independent
//! oracle — with the dump from before: byte-identical (after dropping the lines that differ
//! between any two dumps). Applying the migration again gives the dump from after.

use dbopt_e2e::e2e_port;
use dbopt_e2e::plain::{diff_lines, PlainPostgres};
use dbopt_migrate::snapshot::snapshot;
use dbopt_schemadiff::transform;

const BASE: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE SEQUENCE ticket_seq START 100;
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text,
    age integer CHECK (age >= 0),
    mood mood DEFAULT 'ok',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id),
    total numeric(10, 2) NOT NULL DEFAULT 0,
    note text
);
CREATE INDEX orders_user_id_idx ON orders (user_id);
CREATE VIEW big_orders AS SELECT id, user_id, total FROM orders WHERE total > 100;
COMMENT ON VIEW big_orders IS 'orders over 100';
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.note := coalesce(NEW.note, ''); RETURN NEW; END $$;
CREATE TRIGGER orders_touch BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION touch();
COMMENT ON TABLE users IS 'people';
COMMENT ON COLUMN users.email IS 'login';
GRANT SELECT ON users TO reader;
CREATE SCHEMA billing;
CREATE TABLE billing.invoices (id int PRIMARY KEY, order_id bigint REFERENCES orders (id), amount numeric);
"#;

/// (what it covers, the forward migration).
const CORPUS: &[(&str, &str)] = &[
    ("add a nullable column", "ALTER TABLE users ADD COLUMN nickname text"),
    ("add a column with a default", "ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new'"),
    ("drop the last column", "ALTER TABLE users DROP COLUMN created_at"),
    ("rename a column", "ALTER TABLE users RENAME COLUMN name TO full_name"),
    ("rename a column and add one", "ALTER TABLE users RENAME COLUMN name TO display_name; ALTER TABLE users ADD COLUMN bio text"),
    ("change a column's type under a view", "DROP VIEW big_orders; ALTER TABLE orders ALTER COLUMN total TYPE numeric(12, 2); CREATE VIEW big_orders AS SELECT id, user_id, total FROM orders WHERE total > 100"),
    ("change a column's type", "ALTER TABLE users ALTER COLUMN age TYPE bigint"),
    ("set not null", "ALTER TABLE users ALTER COLUMN name SET NOT NULL"),
    ("drop not null", "ALTER TABLE users ALTER COLUMN email DROP NOT NULL"),
    ("set a default", "ALTER TABLE users ALTER COLUMN name SET DEFAULT 'anon'"),
    ("drop a default", "ALTER TABLE orders ALTER COLUMN total DROP DEFAULT"),
    ("add a check constraint", "ALTER TABLE orders ADD CONSTRAINT total_positive CHECK (total >= 0)"),
    ("drop a check constraint", "ALTER TABLE users DROP CONSTRAINT users_age_check"),
    ("add a unique constraint", "ALTER TABLE users ADD CONSTRAINT users_name_key UNIQUE (name)"),
    ("drop a unique constraint", "ALTER TABLE users DROP CONSTRAINT users_email_key"),
    ("a new table with a foreign key", "CREATE TABLE payments (id int PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE)"),
    ("drop a foreign key", "ALTER TABLE orders DROP CONSTRAINT orders_user_id_fkey"),
    ("create an expression index", "CREATE INDEX users_lower_name_idx ON users (lower(name))"),
    ("drop an index", "DROP INDEX orders_user_id_idx"),
    ("a partial unique index", "CREATE UNIQUE INDEX orders_note_idx ON orders (note) WHERE note IS NOT NULL"),
    ("create a view", "CREATE VIEW happy_users AS SELECT id, email FROM users WHERE mood = 'happy'"),
    ("replace a view", "CREATE OR REPLACE VIEW big_orders AS SELECT id, user_id, total FROM orders WHERE total > 500"),
    ("drop a view", "DROP VIEW big_orders"),
    ("a materialized view", "CREATE MATERIALIZED VIEW order_totals AS SELECT user_id, sum(total) AS total FROM orders GROUP BY user_id"),
    ("create a function", "CREATE FUNCTION add(a int, b int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT a + b'"),
    ("replace a function's body", "CREATE OR REPLACE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.note := upper(coalesce(NEW.note, '')); RETURN NEW; END $$"),
    ("drop a trigger and its function", "DROP TRIGGER orders_touch ON orders; DROP FUNCTION touch()"),
    ("create a trigger", "CREATE TRIGGER orders_touch_update BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch()"),
    ("a new enum and a column of it", "CREATE TYPE status AS ENUM ('new', 'paid'); ALTER TABLE orders ADD COLUMN st status"),
    ("create a sequence", "CREATE SEQUENCE invoice_seq INCREMENT 5"),
    ("alter a sequence", "ALTER SEQUENCE ticket_seq INCREMENT BY 10 MAXVALUE 100000"),
    ("drop a sequence", "DROP SEQUENCE ticket_seq"),
    ("rename a table", "ALTER TABLE billing.invoices RENAME TO bills"),
    ("drop a table", "DROP TABLE billing.invoices"),
    ("comments", "COMMENT ON TABLE orders IS 'purchases'; COMMENT ON COLUMN users.email IS NULL"),
    ("grants", "GRANT INSERT, UPDATE ON orders TO reader; REVOKE SELECT ON users FROM reader"),
    ("a new schema with an identity column", "CREATE SCHEMA audit; CREATE TABLE audit.log (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at timestamptz DEFAULT now())"),
    ("hostile names (quotes, semicolons, comments)", r#"CREATE TABLE "Robert'); DROP TABLE users;--" ("we""ird col" int, "x; y" text DEFAULT 'it''s');
      CREATE INDEX "i"" ; --" ON "Robert'); DROP TABLE users;--" ("we""ird col");
      COMMENT ON TABLE "Robert'); DROP TABLE users;--" IS 'a ''quoted''; comment'"#),
    ("a column's comment and a table's", "COMMENT ON COLUMN orders.note IS 'free text'; COMMENT ON TABLE users IS NULL"),
];

#[test]
fn every_generated_rollback_restores_the_dump_byte_for_byte() {
    let pg = PlainPostgres::start(e2e_port(56), &[]);
    let mut admin = pg.connect();
    admin
        .batch_execute("CREATE ROLE reader NOLOGIN")
        .expect("role");
    admin
        .batch_execute("CREATE DATABASE base")
        .expect("template");
    pg.connect_to("base")
        .batch_execute(BASE)
        .expect("base schema");
    let mut failures = Vec::new();
    for (i, (what, forward)) in CORPUS.iter().enumerate() {
        let db = format!("case{i}");
        admin
            .batch_execute(&format!("CREATE DATABASE {db} TEMPLATE base"))
            .expect("create the case's database");
        let before_dump = pg.dump_schema(&db);
        let mut c = pg.connect_to(&db);
        let before = snapshot(&mut c).expect("snapshot before");
        let mut tx = c.transaction().expect("begin");
        tx.batch_execute(forward)
            .unwrap_or_else(|e| panic!("{what}: the forward migration fails: {e:?}"));
        let after = snapshot(&mut tx).expect("snapshot after");
        tx.commit().expect("commit");
        let after_dump = pg.dump_schema(&db);
        assert_ne!(
            before_dump, after_dump,
            "{what}: the migration changed nothing"
        );

        let plan = transform(&after, &before);
        let mut tx = c.transaction().expect("begin");
        for s in &plan.statements {
            if let Err(e) = tx.batch_execute(s) {
                panic!(
                    "{what}: rollback statement failed: {s}\n{:?}",
                    e.as_db_error()
                );
            }
        }
        tx.commit().expect("commit the rollback");
        let rolled = pg.dump_schema(&db);
        let again_snapshot = snapshot(&mut c).expect("snapshot after the rollback");
        if rolled != before_dump {
            failures.push(format!(
                "{what}: the dump after the rollback differs\n--- rollback\n{}\n--- diff\n{}",
                plan.statements.join(";\n"),
                diff_lines(&before_dump, &rolled)
            ));
            continue;
        }
        assert_eq!(
            creation_order_aside(again_snapshot),
            creation_order_aside(before.clone()),
            "{what}: the snapshot after the rollback"
        );

        // And forward again: the schema the migration made.
        c.batch_execute(forward)
            .unwrap_or_else(|e| panic!("{what}: the migration again: {e:?}"));
        assert_eq!(pg.dump_schema(&db), after_dump, "{what}: applied again");
        eprintln!(
            "ok: {what}: {} rollback statement(s){}",
            plan.statements.len(),
            if plan.losses.is_empty() {
                String::new()
            } else {
                format!("; says: {}", plan.losses.join("; "))
            }
        );
    }
    assert!(CORPUS.len() >= 30);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A snapshot without the views' creation order (their oids: new ones when created again).
fn creation_order_aside(mut s: dbopt_schemadiff::Schema) -> dbopt_schemadiff::Schema {
    for v in s.views.values_mut() {
        v.order = 0;
    }
    s
}
