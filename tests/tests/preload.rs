//! End-to-end: dbopt refuses to work unless it is preloaded, and says how to fix it.

use dbopt_e2e::e2e_port;
use dbopt_e2e::plain::PlainPostgres;

#[test]
fn create_extension_without_preload_fails_with_a_hint() {
    let port = e2e_port(90);
    let pg = PlainPostgres::start(port, &[]);
    let mut c = pg.connect();
    let err = c
        .batch_execute("CREATE EXTENSION dbopt")
        .expect_err("must refuse without preload");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        db.code(),
        &postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE
    );
    assert!(
        db.message().contains("shared_preload_libraries"),
        "{}",
        db.message()
    );
    assert!(
        db.hint()
            .unwrap_or_default()
            .contains("shared_preload_libraries"),
        "{:?}",
        db.hint()
    );
    // Nothing half-created is left behind.
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_extension WHERE extname = 'dbopt'",
            &[],
        )
        .expect("query")
        .get(0);
    assert_eq!(n, 0);
}

#[test]
fn preloaded_extension_creates_and_answers() {
    let port = e2e_port(91);
    let pg = PlainPostgres::start(port, &["shared_preload_libraries = 'dbopt'"]);
    let mut c = pg.connect();
    c.batch_execute("CREATE EXTENSION dbopt").expect("create");
    let row = c
        .query_one("SELECT role, in_recovery FROM dbopt.node_status()", &[])
        .expect("status");
    assert_eq!(row.get::<_, String>(0), "primary");
    assert!(!row.get::<_, bool>(1));
}
