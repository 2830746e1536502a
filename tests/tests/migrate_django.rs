//! dbopt-migrate on a real Django project's migrations: `manage.py sqlmigrate` output of the
//! small app in tests/clients/django_shop (models, a FK, an index, a CHECK, a renamed field, a
//! removed field with data, an altered field, a many-to-many) applied as Flyway files. The schema
//! is the one Django's own `migrate` builds (pg_dump compared), the app works on it through the
//! ORM, and the generated rollbacks return to each earlier dump — with the removed field's values.

use std::process::Command;

use dbopt_e2e::e2e_port;
use dbopt_e2e::migrations::options;
use dbopt_e2e::plain::{assert_same_dump, PlainPostgres};
use dbopt_e2e::repo_root;
use dbopt_migrate::files::ordered;
use dbopt_migrate::run;

fn django(pg: &PlainPostgres, db: &str, args: &[&str]) -> String {
    let venv = std::env::var("DBOPT_CLIENTS_VENV")
        .unwrap_or_else(|_| "/var/tmp/dbopt-clients-venv".into());
    let out = Command::new(format!("{venv}/bin/python"))
        .arg(repo_root().join("tests/clients/django_sqlmigrate.py"))
        .args(["127.0.0.1", &pg.port.to_string(), db])
        .args(args)
        .output()
        .expect("the clients' Python runs (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "django {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn django_sqlmigrate_output_applies_and_rolls_back() {
    let pg = PlainPostgres::start(e2e_port(73), &[]);
    let mut admin = pg.connect();
    for db in ["app", "django_ref"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .expect("db");
    }
    django(&pg, "app", &["check"]);
    let dir = std::env::temp_dir().join(format!("dbopt-django-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    django(&pg, "app", &["sql", dir.to_str().expect("utf-8 path")]);
    let mut files = Vec::new();
    for e in std::fs::read_dir(&dir).expect("read") {
        let e = e.expect("entry");
        let text = std::fs::read_to_string(e.path()).expect("file");
        files.push((e.file_name().to_string_lossy().into_owned(), text));
    }
    std::fs::remove_dir_all(&dir).ok();
    let all = ordered(files).expect("Django's files are valid migrations");
    assert_eq!(all.len(), 3);
    assert!(
        all[0].sql.contains("CREATE TABLE \"shop_customer\""),
        "{}",
        all[0].sql
    );

    // Django's own migrate is the reference for the schema.
    django(&pg, "django_ref", &["migrate"]);
    let ours = ["--exclude-schema=dbopt_migrate"];
    let reference = pg.dump_schema_with("django_ref", &["--exclude-table=django_migrations"]);
    let empty = pg.dump_schema_with("app", &ours);

    let mut c = pg.connect_to("app");
    run::apply(&mut c, &all[..2], &options()).expect("0001 and 0002");
    let after_2 = pg.dump_schema_with("app", &ours);
    c.batch_execute(
        "INSERT INTO shop_product (sku, title, price, legacy_code) \
         SELECT 'P' || i, 'product ' || i, i, 'OLD-' || i FROM generate_series(1, 50) i;
         INSERT INTO shop_customer (name, email) VALUES ('Grace', 'grace@example.com')",
    )
    .expect("data under 0002");
    let reports = run::apply(&mut c, &all, &options()).expect("0003");
    assert!(
        reports[0]
            .notes
            .iter()
            .any(|n| n.contains("values of column public.shop_product.legacy_code come back")),
        "{:?}",
        reports[0].notes
    );
    assert_same_dump(
        &pg.dump_schema_with("app", &ours),
        &reference,
        "sqlmigrate applied by dbopt-migrate vs Django's migrate",
    );

    let orm = django(&pg, "app", &["orm"]);
    assert_eq!(
        orm.trim(),
        r#"{"customer": "Ada", "vip": true, "status": "confirmed-paid", "products": ["C-1", "T-1"]}"#
    );

    // Back to 0002: the renamed field has its old name and values, the removed one its values.
    run::rollback(&mut c, "2").expect("rollback 0003");
    assert_same_dump(
        &pg.dump_schema_with("app", &ours),
        &after_2,
        "rolled back to 0002",
    );
    let codes: i64 = c
        .query_one(
            "SELECT count(*) FROM shop_product WHERE legacy_code = 'OLD-' || substr(sku, 2)",
            &[],
        )
        .expect("legacy codes")
        .get(0);
    assert_eq!(codes, 50);
    let names: Vec<String> = c
        .query("SELECT name FROM shop_customer ORDER BY id", &[])
        .expect("names")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["Grace", "Ada"]);

    run::rollback(&mut c, "0").expect("rollback everything");
    assert_same_dump(
        &pg.dump_schema_with("app", &ours),
        &empty,
        "rolled back to nothing",
    );
    run::apply(&mut c, &all, &options()).expect("again");
    assert_same_dump(
        &pg.dump_schema_with("app", &ours),
        &reference,
        "applied again",
    );
}
