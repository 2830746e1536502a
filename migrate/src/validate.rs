//! Validation on staging: a throwaway database gets the production schema (built from the
//! production snapshot by the same generator), then every pending migration is applied, its
//! generated rollback run and the schema compared with the one before, and the migration applied
//! again and compared with the one after. A successful run is recorded on production for the
//! production schema it started from, so `apply` can insist on it.

use sha2::{Digest, Sha256};

use dbopt_schemadiff::{transform, Schema};
use postgres::Client;

use crate::files::Migration;
use crate::snapshot::snapshot;

pub(crate) const VALIDATIONS_SQL: &str = "
CREATE TABLE IF NOT EXISTS dbopt_migrate.validations (
    id          bigserial PRIMARY KEY,
    schema_hash text NOT NULL,     -- the production schema the run started from
    checksums   text[] NOT NULL,   -- the pending migrations validated, in order
    by_user     text NOT NULL DEFAULT current_user,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);";

/// A fingerprint of a schema (views' creation order left out: it is not part of the schema).
pub fn schema_hash(s: &Schema) -> String {
    let mut s = s.clone();
    for v in s.views.values_mut() {
        v.order = 0;
    }
    // Column numbers only tell renames apart; a rebuilt schema numbers its columns anew.
    for t in s.tables.values_mut() {
        for c in &mut t.columns {
            c.number = dbopt_schemadiff::model::ColumnNumber::default();
        }
    }
    Sha256::digest(format!("{s:?}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The schema with every table's columns in name order.
fn column_order_aside(s: &Schema) -> Schema {
    let mut s = s.clone();
    for t in s.tables.values_mut() {
        t.columns.sort_by(|a, b| a.name.cmp(&b.name));
    }
    s
}

fn same(a: &Schema, b: &Schema) -> bool {
    schema_hash(a) == schema_hash(b)
}

fn err(e: postgres::Error) -> String {
    crate::run::db_error(&e)
}

/// Validates `pending` (in order) against production's current schema on a throwaway database
/// `staging_db` created and dropped through `staging` (a connection to the staging server).
/// Returns one line per migration.
pub fn validate(
    prod: &mut Client,
    staging: &mut Client,
    staging_url: &crate::connect::Target,
    staging_db: &str,
    pending: &[&Migration],
) -> Result<Vec<String>, String> {
    let production = snapshot(prod).map_err(err)?;
    let extensions: Vec<String> = prod
        .query(
            "SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql'",
            &[],
        )
        .map_err(err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let quoted = dbopt_schemadiff::model::ident(staging_db);
    staging
        .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted}"))
        .map_err(|e| format!("staging server: {}", err(e)))?;
    staging
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .map_err(|e| {
            format!(
                "staging server: cannot create the staging database: {}",
                err(e)
            )
        })?;
    let target = staging_url.with_dbname(staging_db);
    let result = (|| {
        let mut s = target
            .connect()
            .map_err(|e| format!("staging database: {e}"))?;
        for x in &extensions {
            let _ = s.batch_execute(&format!(
                "CREATE EXTENSION IF NOT EXISTS {}",
                dbopt_schemadiff::model::ident(x)
            ));
        }
        let empty = snapshot(&mut s).map_err(err)?;
        let build = transform(&empty, &production);
        let mut tx = s.transaction().map_err(err)?;
        for st in &build.statements {
            tx.batch_execute(st).map_err(|e| {
                format!(
                    "staging cannot reproduce production's schema: {st}: {}",
                    err(e)
                )
            })?;
        }
        tx.commit().map_err(err)?;
        let copy = snapshot(&mut s).map_err(err)?;
        if !same(&copy, &production) {
            return Err("staging cannot reproduce production's schema exactly (see README: what the generator cannot do)".to_string());
        }
        let mut lines = Vec::new();
        for m in pending {
            let before = snapshot(&mut s).map_err(err)?;
            let mut tx = s.transaction().map_err(err)?;
            tx.batch_execute(&m.sql)
                .map_err(|e| crate::run::describe_failure(m, &e))?;
            tx.commit().map_err(err)?;
            let after = snapshot(&mut s).map_err(err)?;
            let plan = transform(&after, &before);
            let mut tx = s.transaction().map_err(err)?;
            for st in &plan.statements {
                tx.batch_execute(st).map_err(|e| {
                    format!(
                        "{}: its generated rollback fails on staging: {st}: {}",
                        m.file_name,
                        err(e)
                    )
                })?;
            }
            tx.commit().map_err(err)?;
            let rolled = snapshot(&mut s).map_err(err)?;
            // A column that comes back last is the one difference a rollback may leave (the
            // plan says so): accepted, and named in the notes.
            let exact = same(&rolled, &before);
            if !exact && !same(&column_order_aside(&rolled), &column_order_aside(&before)) {
                return Err(format!(
                    "{}: its rollback does not restore the schema before it{}",
                    m.file_name,
                    plan.losses
                        .iter()
                        .chain(&plan.caveats)
                        .map(|n| format!("\n  note: {n}"))
                        .collect::<String>()
                ));
            }
            s.batch_execute(&m.sql).map_err(|e| {
                format!(
                    "{} applied again after its rollback: {}",
                    m.file_name,
                    err(e)
                )
            })?;
            if !same(&snapshot(&mut s).map_err(err)?, &after) {
                return Err(format!(
                    "{}: applied again, it does not give the same schema",
                    m.file_name
                ));
            }
            lines.push(format!(
                "V{} ({}): applied, rolled back ({} statement(s)) and applied again on staging: {}{}",
                m.version,
                m.name,
                plan.statements.len(),
                if exact {
                    "identical"
                } else {
                    "identical but for the order of columns"
                },
                plan.losses
                    .iter()
                    .chain(&plan.caveats)
                    .map(|n| format!("\n  note: {n}"))
                    .collect::<String>()
            ));
        }
        Ok(lines)
    })();
    let _ = staging.batch_execute(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"));
    let lines = result?;
    crate::run::ensure_history(prod)?;
    let checksums: Vec<String> = pending.iter().map(|m| m.checksum.clone()).collect();
    prod.execute(
        "INSERT INTO dbopt_migrate.validations (schema_hash, checksums) VALUES ($1, $2)",
        &[&schema_hash(&production), &checksums],
    )
    .map_err(err)?;
    Ok(lines)
}

/// Whether `pending` was validated against production's current schema.
pub fn validated(prod: &mut Client, pending: &[&Migration]) -> Result<bool, String> {
    crate::run::ensure_history(prod)?;
    let production = snapshot(prod).map_err(err)?;
    let checksums: Vec<String> = pending.iter().map(|m| m.checksum.clone()).collect();
    let row = prod
        .query_opt(
            "SELECT 1 FROM dbopt_migrate.validations WHERE schema_hash = $1 AND checksums = $2 LIMIT 1",
            &[&schema_hash(&production), &checksums],
        )
        .map_err(err)?;
    Ok(row.is_some())
}
