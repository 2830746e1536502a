//! Dropped data kept aside: before a migration that drops a table or a column commits, the rows
//! it loses are copied into `dbopt_migrate.kept_<n>` (every value as text), so that its generated
//! rollback puts them back ([`dbopt_schemadiff::transform_keeping`]). `dbopt-migrate purge`
//! drops the copies once nobody will roll back, and swaps in the rollback that does without them.
//!
//! Which rows a migration drops is only known once it ran: [`crate::run`] runs it once under a
//! savepoint, compares the snapshots, and if anything is lost rolls back to the savepoint, copies
//! it, and runs the migration again — all inside the migration's transaction.

use dbopt_schemadiff::{ident, Dropped, Kept, KeptColumn, KeptTable, QName, Schema};
use postgres::{Client, GenericClient};

use crate::run::db_error;

/// The schema of the copies and their registry.
pub const SCHEMA: &str = "dbopt_migrate";

pub(crate) const KEPT_SQL: &str = "
CREATE TABLE IF NOT EXISTS dbopt_migrate.kept (
    id           bigserial PRIMARY KEY,
    history_id   bigint REFERENCES dbopt_migrate.history (id),
    version      text NOT NULL,
    table_schema text NOT NULL,
    table_name   text NOT NULL,
    column_name  text,
    copy_name    text NOT NULL,
    key_columns  text[] NOT NULL DEFAULT '{}',
    row_count    bigint NOT NULL DEFAULT 0,
    kept_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    state        text NOT NULL DEFAULT 'kept' CHECK (state IN ('kept', 'restored', 'purged'))
);
COMMENT ON TABLE dbopt_migrate.kept IS 'dbopt-migrate: copies of rows and values migrations dropped, for their rollbacks';
";

/// What could not be kept, and why (shown with the migration's notes).
#[derive(Debug, Default)]
pub struct Copies {
    pub kept: Kept,
    /// Registry ids of the copies, to tie them to the history entry.
    pub ids: Vec<i64>,
    pub notes: Vec<String>,
}

/// `kept_v<version>_<n>`: the same for the same migration applied again, so that a schema dump
/// after a rollback and a second apply is the one after the first (`kept_<id>` for versions too
/// long for a name).
fn copy_name(version: &str, n: usize, id: i64) -> String {
    let v: String = version
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if v.len() <= 40 {
        format!("kept_v{v}_{n}")
    } else {
        format!("kept_{id}")
    }
}

fn register(
    c: &mut impl GenericClient,
    n: usize,
    version: &str,
    table: &QName,
    column: Option<&str>,
    key: &[String],
) -> Result<(i64, QName), String> {
    let id: i64 = c
        .query_one(
            "INSERT INTO dbopt_migrate.kept (version, table_schema, table_name, column_name, copy_name, key_columns) \
             VALUES ($1, $2, $3, $4, '', $5) RETURNING id",
            &[&version, &table.schema, &table.name, &column, &key],
        )
        .map_err(|e| format!("registering kept data: {}", db_error(&e)))?
        .get(0);
    let copy = copy_name(version, n, id);
    c.execute(
        "UPDATE dbopt_migrate.kept SET copy_name = $2 WHERE id = $1",
        &[&id, &copy],
    )
    .map_err(|e| format!("registering kept data: {}", db_error(&e)))?;
    Ok((id, QName::new(SCHEMA, &copy)))
}

/// `CREATE TABLE copy AS SELECT a::text AS a, … FROM table`; the number of rows copied.
fn copy_rows(
    c: &mut impl GenericClient,
    table: &QName,
    columns: &[String],
    copy: &QName,
) -> Result<i64, String> {
    let list: Vec<String> = columns
        .iter()
        .map(|col| format!("{0}::text AS {0}", ident(col)))
        .collect();
    let n = c
        .execute(
            &format!(
                "CREATE TABLE {} AS SELECT {} FROM {}",
                copy.sql(),
                list.join(", "),
                table.sql()
            ),
            &[],
        )
        .map_err(|e| format!("copying the rows of {}: {}", table.sql(), db_error(&e)))?;
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    c.execute(&format!("REVOKE ALL ON {} FROM PUBLIC", copy.sql()), &[])
        .map_err(|e| db_error(&e))?;
    Ok(n)
}

/// The columns that find a row again: the primary key, else a unique index on NOT NULL columns
/// without expressions or predicate.
fn row_key(c: &mut impl GenericClient, table: &QName) -> Result<Option<Vec<String>>, String> {
    let rows = c
        .query(
            "SELECT array_agg(a.attname::text ORDER BY k.ord) \
               FROM pg_index i \
               CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
              WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indpred IS NULL \
                AND i.indexprs IS NULL \
              GROUP BY i.indexrelid, i.indisprimary \
             HAVING bool_and(a.attnotnull) \
              ORDER BY i.indisprimary DESC, i.indexrelid LIMIT 1",
            &[&table.sql()],
        )
        .map_err(|e| format!("finding the key of {}: {}", table.sql(), db_error(&e)))?;
    Ok(rows.first().map(|r| r.get(0)))
}

/// Where the sequence a column takes its values from stands: (column, last value, is_called).
fn sequence_state(
    c: &mut impl GenericClient,
    table: &QName,
    columns: &[String],
) -> Result<Vec<(String, i64, bool)>, String> {
    let mut out = Vec::new();
    for col in columns {
        let row = c
            .query_opt(
                "SELECT pg_sequence_last_value(s::regclass) FROM pg_get_serial_sequence($1, $2) AS s \
                  WHERE s IS NOT NULL",
                &[&table.sql(), col],
            )
            .map_err(|e| format!("reading the sequence of {}.{}: {}", table.sql(), ident(col), db_error(&e)))?;
        if let Some(last) = row.and_then(|r| r.get::<_, Option<i64>>(0)) {
            out.push((col.clone(), last, true));
        }
    }
    Ok(out)
}

/// Copies what `drops` loses (the schema is still `before`'s: the caller rolled the migration
/// back to its savepoint).
pub fn copy(
    c: &mut impl GenericClient,
    version: &str,
    before: &Schema,
    after: &Schema,
    drops: &[Dropped],
) -> Result<Copies, String> {
    let mut out = Copies::default();
    for d in drops {
        match d {
            Dropped::Table { table, columns } => {
                let (id, copy) = register(c, out.ids.len() + 1, version, table, None, &[])?;
                let sequences = sequence_state(c, table, columns)?;
                let rows = copy_rows(c, table, columns, &copy)?;
                set_rows(c, id, rows)?;
                out.ids.push(id);
                out.kept.tables.insert(
                    table.clone(),
                    KeptTable {
                        copy,
                        columns: columns.clone(),
                        sequences,
                    },
                );
            }
            Dropped::Column { table, column } => {
                let identity = before.tables[table]
                    .columns
                    .iter()
                    .any(|x| x.name == *column && x.identity.is_some());
                if identity {
                    out.notes.push(format!(
                        "values of identity column {}.{} are not kept (a re-created identity numbers rows anew)",
                        table.sql(),
                        ident(column)
                    ));
                    continue;
                }
                let key = row_key(c, table)?.filter(|key| {
                    after
                        .tables
                        .get(table)
                        .is_some_and(|t| key.iter().all(|k| t.columns.iter().any(|x| x.name == *k)))
                });
                let Some(key) = key else {
                    out.notes.push(format!(
                        "values of {}.{} are not kept: the table has no primary key (or NOT NULL unique key) \
                         that outlives the migration",
                        table.sql(),
                        ident(column)
                    ));
                    continue;
                };
                let (id, copy) =
                    register(c, out.ids.len() + 1, version, table, Some(column), &key)?;
                let mut cols = key.clone();
                cols.push(column.clone());
                let rows = copy_rows(c, table, &cols, &copy)?;
                set_rows(c, id, rows)?;
                out.ids.push(id);
                out.kept
                    .columns
                    .insert((table.clone(), column.clone()), KeptColumn { copy, key });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn copies_are_named_after_their_migration() {
        assert_eq!(super::copy_name("3", 1, 17), "kept_v3_1");
        assert_eq!(super::copy_name("1.2", 2, 17), "kept_v1_2_2");
        assert_eq!(super::copy_name(&"9".repeat(41), 1, 17), "kept_17");
    }
}

fn set_rows(c: &mut impl GenericClient, id: i64, rows: i64) -> Result<(), String> {
    c.execute(
        "UPDATE dbopt_migrate.kept SET row_count = $2 WHERE id = $1",
        &[&id, &rows],
    )
    .map(|_| ())
    .map_err(|e| db_error(&e))
}

/// Ties the copies to the history entry of their migration.
pub fn attach(c: &mut impl GenericClient, ids: &[i64], history_id: i64) -> Result<(), String> {
    c.execute(
        "UPDATE dbopt_migrate.kept SET history_id = $2 WHERE id = ANY($1)",
        &[&ids, &history_id],
    )
    .map(|_| ())
    .map_err(|e| db_error(&e))
}

/// Drops the copies of a history entry and marks them `state` (`restored` after its rollback
/// ran, `purged` by command).
pub fn drop_copies(
    c: &mut impl GenericClient,
    history_id: i64,
    state: &str,
) -> Result<i64, String> {
    let rows = c
        .query(
            "UPDATE dbopt_migrate.kept SET state = $2 WHERE history_id = $1 AND state = 'kept' \
             RETURNING copy_name",
            &[&history_id, &state],
        )
        .map_err(|e| db_error(&e))?;
    for r in &rows {
        let copy = QName::new(SCHEMA, r.get::<_, &str>(0));
        c.execute(&format!("DROP TABLE IF EXISTS {}", copy.sql()), &[])
            .map_err(|e| format!("dropping {}: {}", copy.sql(), db_error(&e)))?;
    }
    Ok(rows.len() as i64)
}

/// One kept copy, for `history` and `purge`.
#[derive(Debug, Clone, PartialEq)]
pub struct Copy {
    pub version: String,
    pub object: String,
    pub copy: String,
    pub rows: i64,
    pub kept_at: String,
}

/// The copies still kept, oldest first.
pub fn list(c: &mut impl GenericClient) -> Result<Vec<Copy>, String> {
    let rows = c
        .query(
            "SELECT version, table_schema, table_name, column_name, copy_name, row_count, \
                    to_char(kept_at, 'YYYY-MM-DD HH24:MI:SS') \
               FROM dbopt_migrate.kept WHERE state = 'kept' ORDER BY id",
            &[],
        )
        .map_err(|e| db_error(&e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let table = QName::new(r.get(1), r.get(2));
            let column: Option<String> = r.get(3);
            Copy {
                version: r.get(0),
                object: match column {
                    Some(col) => format!("{}.{}", table.sql(), ident(&col)),
                    None => table.sql(),
                },
                copy: QName::new(SCHEMA, r.get(4)).sql(),
                rows: r.get(5),
                kept_at: r.get(6),
            }
        })
        .collect())
}

/// Drops the copies kept for `version` (all versions: `None`) and puts the rollback that does
/// without them in their migration's history entry. What was purged, oldest first.
pub fn purge(c: &mut Client, version: Option<&str>) -> Result<Vec<Copy>, String> {
    crate::run::ensure_history(c)?;
    crate::run::lock(c)?;
    let out = purge_locked(c, version);
    crate::run::unlock(c);
    out
}

fn purge_locked(c: &mut Client, version: Option<&str>) -> Result<Vec<Copy>, String> {
    let all = list(c)?;
    let chosen: Vec<Copy> = all
        .into_iter()
        .filter(|k| version.is_none_or(|v| k.version == v))
        .collect();
    if let (Some(v), true) = (version, chosen.is_empty()) {
        return Err(format!(
            "V{v} has no kept data (`dbopt-migrate history` lists what is kept)"
        ));
    }
    let mut tx = c.transaction().map_err(|e| db_error(&e))?;
    crate::ddl_log::label(&mut tx, "dbopt-migrate purge", true)?;
    let entries = tx
        .query(
            "SELECT DISTINCT history_id FROM dbopt_migrate.kept \
              WHERE state = 'kept' AND ($1::text IS NULL OR version = $1)",
            &[&version],
        )
        .map_err(|e| db_error(&e))?;
    for r in entries {
        let id: Option<i64> = r.get(0);
        let Some(id) = id else { continue };
        drop_copies(&mut tx, id, "purged")?;
        tx.execute(
            "UPDATE dbopt_migrate.history SET rollback_sql = rollback_sql_unkept, \
                    rollback_notes = rollback_notes_unkept \
              WHERE id = $1 AND rollback_sql_unkept IS NOT NULL",
            &[&id],
        )
        .map_err(|e| db_error(&e))?;
    }
    tx.commit().map_err(|e| db_error(&e))?;
    Ok(chosen)
}
