//! Applying and rolling back against a database: the history table, the advisory lock that keeps
//! two deployers apart, one transaction per migration (or per run), and the rollback of each
//! migration generated from catalog snapshots taken inside its own transaction.

use std::time::Instant;

use dbopt_schemadiff::{dropped, transform, transform_keeping};
use postgres::{Client, GenericClient};

use crate::files::{Migration, Version};
use crate::snapshot::snapshot;
use crate::status::{pending, AppliedVersion};

/// Only one dbopt-migrate works on a database at a time (`pg_advisory_lock`).
pub const LOCK_KEY: i64 = 0x6462_6f70_745f_6d69; // "dbopt_mi"

const HISTORY_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS dbopt_migrate;
CREATE TABLE IF NOT EXISTS dbopt_migrate.history (
    id             bigserial PRIMARY KEY,
    version        text NOT NULL,
    name           text NOT NULL,
    checksum       text NOT NULL,
    action         text NOT NULL CHECK (action IN ('apply', 'rollback')),
    by_user        text NOT NULL DEFAULT current_user,
    at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    duration_ms    double precision NOT NULL,
    rollback_sql   text,
    rollback_notes text[] NOT NULL DEFAULT '{}',
    current        boolean NOT NULL,
    -- The rollback without the copies of dropped data (dbopt_migrate.kept), once they are purged.
    rollback_sql_unkept   text,
    rollback_notes_unkept text[]
);
COMMENT ON TABLE dbopt_migrate.history IS 'dbopt-migrate: every apply and rollback; current = still applied';
";

#[derive(Debug, Clone)]
pub struct Options {
    pub lock_timeout_ms: u64,
    /// All pending migrations in one transaction (all or none).
    pub single_transaction: bool,
}

/// What an applied migration left in the history.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub version: String,
    pub name: String,
    pub duration_ms: f64,
    pub rollback_statements: usize,
    pub notes: Vec<String>,
}

pub(crate) fn db_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut s = format!("{} (SQLSTATE {})", d.message(), d.code().code());
            if let Some(x) = d.detail() {
                s.push_str(&format!("\nDETAIL: {x}"));
            }
            if let Some(x) = d.hint() {
                s.push_str(&format!("\nHINT: {x}"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// A failed migration: the file, the error, and where in the file (line, column, the line).
pub fn describe_failure(m: &Migration, e: &postgres::Error) -> String {
    let mut s = format!("{} failed: {}", m.file_name, db_error(e));
    if let Some(postgres::error::ErrorPosition::Original(pos)) =
        e.as_db_error().and_then(|d| d.position())
    {
        let upto: String = m
            .sql
            .chars()
            .take((*pos as usize).saturating_sub(1))
            .collect();
        let line = upto.matches('\n').count() + 1;
        let col = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        let text = m.sql.lines().nth(line - 1).unwrap_or_default();
        s.push_str(&format!("\n  at line {line}, column {col}: {text}"));
    }
    if e.code() == Some(&postgres::error::SqlState::ACTIVE_SQL_TRANSACTION) {
        s.push_str(&format!(
            "\n  this statement cannot run inside a transaction: put `{}` as the first line of the file \
             (its statements then run one by one, each committed on its own)",
            crate::files::NO_TRANSACTION
        ));
    }
    s
}

/// Creates the history table when missing — under the migration lock, so that two first runs
/// do not race to create it.
pub fn ensure_history(c: &mut Client) -> Result<(), String> {
    let there: bool = c
        .query_one(
            "SELECT to_regclass('dbopt_migrate.history') IS NOT NULL \
                AND to_regclass('dbopt_migrate.kept') IS NOT NULL \
                AND to_regclass('dbopt_migrate.validations') IS NOT NULL",
            &[],
        )
        .map_err(|e| format!("looking for dbopt_migrate.history: {}", db_error(&e)))?
        .get(0);
    if there {
        return Ok(());
    }
    let mut tx = c.transaction().map_err(|e| db_error(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .map_err(|e| format!("taking the migration lock: {}", db_error(&e)))?;
    // The tool's own tables are not the application's schema changes (dbopt.ddl_history).
    crate::ddl_log::label(&mut tx, "dbopt-migrate", true)?;
    tx.batch_execute(HISTORY_SQL)
        .and_then(|_| tx.batch_execute(crate::keep::KEPT_SQL))
        .and_then(|_| tx.batch_execute(crate::validate::VALIDATIONS_SQL))
        .map_err(|e| format!("creating dbopt_migrate.history: {}", db_error(&e)))?;
    tx.commit().map_err(|e| db_error(&e))
}

/// The versions applied now.
pub fn applied(c: &mut impl GenericClient) -> Result<Vec<AppliedVersion>, String> {
    let rows = c
        .query(
            "SELECT version, name, checksum FROM dbopt_migrate.history \
             WHERE action = 'apply' AND current ORDER BY id",
            &[],
        )
        .map_err(|e| format!("reading the history: {}", db_error(&e)))?;
    Ok(rows
        .iter()
        .map(|r| AppliedVersion {
            version: r.get(0),
            name: r.get(1),
            checksum: r.get(2),
        })
        .collect())
}

pub(crate) fn lock(c: &mut Client) -> Result<(), String> {
    c.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .map(|_| ())
        .map_err(|e| format!("taking the migration lock: {}", db_error(&e)))
}

pub(crate) fn unlock(c: &mut Client) {
    let _ = c.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]);
}

/// Applies every pending migration; on a failure nothing of the failing migration (or, with
/// `single_transaction`, of the run) stays, and the error names the file and the position.
pub fn apply(c: &mut Client, files: &[Migration], o: &Options) -> Result<Vec<Report>, String> {
    ensure_history(c)?;
    lock(c)?;
    let out = apply_locked(c, files, o);
    unlock(c);
    out
}

fn apply_locked(c: &mut Client, files: &[Migration], o: &Options) -> Result<Vec<Report>, String> {
    let done = applied(c)?;
    let todo = pending(files, &done)?;
    let mut reports = Vec::new();
    if o.single_transaction {
        if let Some(m) = todo.iter().find(|m| !m.transactional) {
            return Err(format!(
                "{} is marked {}: it cannot be part of a single-transaction run",
                m.file_name,
                crate::files::NO_TRANSACTION
            ));
        }
        let mut tx = c.transaction().map_err(|e| db_error(&e))?;
        for m in todo {
            reports.push(apply_in(&mut tx, m, o)?);
        }
        tx.commit().map_err(|e| db_error(&e))?;
        return Ok(reports);
    }
    for m in todo {
        if m.transactional {
            let mut tx = c.transaction().map_err(|e| db_error(&e))?;
            reports.push(apply_in(&mut tx, m, o)?);
            tx.commit().map_err(|e| db_error(&e))?;
        } else {
            reports.push(apply_outside(c, m, o)?);
        }
    }
    Ok(reports)
}

fn apply_in(
    tx: &mut postgres::Transaction<'_>,
    m: &Migration,
    o: &Options,
) -> Result<Report, String> {
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {}", o.lock_timeout_ms))
        .map_err(|e| db_error(&e))?;
    crate::ddl_log::label(tx, &m.version.text, true)?;
    let before =
        snapshot(tx).map_err(|e| format!("snapshot before {}: {}", m.file_name, db_error(&e)))?;
    tx.batch_execute("SAVEPOINT dbopt_keep")
        .map_err(|e| db_error(&e))?;
    let (mut duration_ms, mut after) = forward(tx, m)?;
    // Rows the migration drops are copied aside first: back to the savepoint, copy, run again.
    let drops = dropped(&before, &after);
    let mut copies = crate::keep::Copies::default();
    if !drops.is_empty() {
        tx.batch_execute("ROLLBACK TO SAVEPOINT dbopt_keep")
            .map_err(|e| db_error(&e))?;
        copies = crate::keep::copy(tx, &m.version.text, &before, &after, &drops)?;
        (duration_ms, after) = forward(tx, m)?;
    }
    tx.batch_execute("RELEASE SAVEPOINT dbopt_keep")
        .map_err(|e| db_error(&e))?;
    record(tx, m, duration_ms, &after, &before, &copies)
}

/// Runs a migration's SQL: how long it took and the schema after it.
fn forward(
    tx: &mut postgres::Transaction<'_>,
    m: &Migration,
) -> Result<(f64, dbopt_schemadiff::Schema), String> {
    let started = Instant::now();
    tx.batch_execute(&m.sql)
        .map_err(|e| describe_failure(m, &e))?;
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let after =
        snapshot(tx).map_err(|e| format!("snapshot after {}: {}", m.file_name, db_error(&e)))?;
    Ok((duration_ms, after))
}

/// A `-- dbopt:no-transaction` migration: statement by statement, each committed on its own.
fn apply_outside(c: &mut Client, m: &Migration, o: &Options) -> Result<Report, String> {
    let statements = pg_query::split_with_parser(&m.sql)
        .map_err(|e| format!("{}: cannot be split into statements: {e}", m.file_name))?;
    c.batch_execute(&format!("SET lock_timeout = {}", o.lock_timeout_ms))
        .map_err(|e| db_error(&e))?;
    let before = snapshot(c).map_err(|e| db_error(&e))?;
    crate::ddl_log::label(c, &m.version.text, false)?;
    let started = Instant::now();
    for (i, s) in statements.iter().enumerate() {
        if let Err(e) = c.batch_execute(s) {
            let _ = c.batch_execute("RESET dbopt.migration_version");
            let after = snapshot(c).map_err(|e| db_error(&e))?;
            let undo = transform(&after, &before);
            return Err(format!(
                "{} failed at statement {} of {} (no transaction: the {} before it stay applied): {}\n  {}\n  \
                 to undo them:\n{}",
                m.file_name,
                i + 1,
                statements.len(),
                i,
                db_error(&e),
                s.trim(),
                undo.statements.join(";\n")
            ));
        }
    }
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let _ = c.batch_execute("RESET lock_timeout; RESET dbopt.migration_version");
    let after = snapshot(c).map_err(|e| db_error(&e))?;
    let mut tx = c.transaction().map_err(|e| db_error(&e))?;
    let mut copies = crate::keep::Copies::default();
    if !dropped(&before, &after).is_empty() {
        copies.notes.push(format!(
            "dropped data is not kept for a {} migration (it cannot run twice)",
            crate::files::NO_TRANSACTION
        ));
    }
    let r = record(&mut tx, m, duration_ms, &after, &before, &copies)?;
    tx.commit().map_err(|e| db_error(&e))?;
    Ok(r)
}

fn record(
    tx: &mut postgres::Transaction<'_>,
    m: &Migration,
    duration_ms: f64,
    after: &dbopt_schemadiff::Schema,
    before: &dbopt_schemadiff::Schema,
    copies: &crate::keep::Copies,
) -> Result<Report, String> {
    let notes_of = |plan: &dbopt_schemadiff::Plan| -> Vec<String> {
        plan.losses
            .iter()
            .chain(&plan.caveats)
            .chain(&plan.restores)
            .chain(&copies.notes)
            .cloned()
            .collect()
    };
    let script_of = |plan: &dbopt_schemadiff::Plan| -> String {
        plan.statements.iter().map(|s| format!("{s};\n")).collect()
    };
    let plan = transform_keeping(after, before, &copies.kept);
    let (script, notes) = (script_of(&plan), notes_of(&plan));
    // The rollback once the copies are purged.
    let unkept = (!copies.kept.is_empty()).then(|| transform(after, before));
    let script_unkept = unkept.as_ref().map(script_of);
    let notes_unkept = unkept.as_ref().map(notes_of);
    let id: i64 = tx
        .query_one(
            "INSERT INTO dbopt_migrate.history \
             (version, name, checksum, action, duration_ms, rollback_sql, rollback_notes, current, \
              rollback_sql_unkept, rollback_notes_unkept) \
             VALUES ($1, $2, $3, 'apply', $4, $5, $6, true, $7, $8) RETURNING id",
            &[
                &m.version.text,
                &m.name,
                &m.checksum,
                &duration_ms,
                &script,
                &notes,
                &script_unkept,
                &notes_unkept,
            ],
        )
        .map_err(|e| format!("recording {}: {}", m.file_name, db_error(&e)))?
        .get(0);
    crate::keep::attach(tx, &copies.ids, id)?;
    Ok(Report {
        version: m.version.text.clone(),
        name: m.name.clone(),
        duration_ms,
        rollback_statements: plan.statements.len(),
        notes,
    })
}

/// Rolls back every applied version after `to` ("0": all), newest first, in one transaction,
/// with the rollback scripts stored when they were applied; recorded in the history.
pub fn rollback(c: &mut Client, to: &str) -> Result<Vec<String>, String> {
    let target = if to == "0" {
        None
    } else {
        Some(Version::parse(to)?)
    };
    ensure_history(c)?;
    lock(c)?;
    let out = rollback_locked(c, target.as_ref(), to);
    unlock(c);
    out
}

fn rollback_locked(
    c: &mut Client,
    target: Option<&Version>,
    to: &str,
) -> Result<Vec<String>, String> {
    let rows = c
        .query(
            "SELECT id, version, name, checksum, rollback_sql FROM dbopt_migrate.history \
             WHERE action = 'apply' AND current ORDER BY id DESC",
            &[],
        )
        .map_err(|e| db_error(&e))?;
    if let Some(t) = target {
        let known = rows
            .iter()
            .any(|r| Version::parse(&r.get::<_, String>(1)).is_ok_and(|v| v == *t));
        if !known {
            return Err(format!(
                "V{to} is not an applied version (see `dbopt-migrate status`; 0 rolls back everything)"
            ));
        }
    }
    let mut tx = c.transaction().map_err(|e| db_error(&e))?;
    let mut undone = Vec::new();
    for r in &rows {
        let version: String = r.get(1);
        let v = Version::parse(&version)?;
        if target.is_some_and(|t| v <= *t) {
            continue;
        }
        let name: String = r.get(2);
        let script: Option<String> = r.get(4);
        crate::ddl_log::label(&mut tx, &format!("{version} rollback"), true)?;
        let started = Instant::now();
        tx.batch_execute(script.as_deref().unwrap_or_default())
            .map_err(|e| format!("rolling back V{version} ({name}): {}", db_error(&e)))?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let id: i64 = r.get(0);
        let checksum: String = r.get(3);
        tx.execute(
            "UPDATE dbopt_migrate.history SET current = false WHERE id = $1",
            &[&id],
        )
        .map_err(|e| db_error(&e))?;
        crate::keep::drop_copies(&mut tx, id, "restored")?;
        tx.execute(
            "INSERT INTO dbopt_migrate.history (version, name, checksum, action, duration_ms, current) \
             VALUES ($1, $2, $3, 'rollback', $4, false)",
            &[&version, &name, &checksum, &ms],
        )
        .map_err(|e| db_error(&e))?;
        undone.push(format!("V{version} ({name})"));
    }
    tx.commit().map_err(|e| db_error(&e))?;
    Ok(undone)
}

/// The history, oldest first: (version, name, action, by, at, duration ms, still applied, notes).
#[allow(clippy::type_complexity)]
pub fn history(
    c: &mut Client,
) -> Result<
    Vec<(
        String,
        String,
        String,
        String,
        String,
        f64,
        bool,
        Vec<String>,
    )>,
    String,
> {
    ensure_history(c)?;
    let rows = c
        .query(
            "SELECT version, name, action, by_user, to_char(at, 'YYYY-MM-DD HH24:MI:SS'), duration_ms, \
                    current, rollback_notes FROM dbopt_migrate.history ORDER BY id",
            &[],
        )
        .map_err(|e| db_error(&e))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            )
        })
        .collect())
}
