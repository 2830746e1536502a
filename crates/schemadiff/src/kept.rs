//! Data a migration drops, and how a rollback brings it back from a copy kept aside.
//!
//! [`dropped`] compares the schema before and after a migration and names the tables and columns
//! whose rows it loses (a renamed table counts: the rollback re-creates it under its old name).
//! The tool copies those rows before the migration runs for good — every value as text, so a copy
//! depends on no type the migration may drop — and [`crate::diff::transform_keeping`] weaves the
//! restore into the rollback: rows go back into a re-created table before its constraints,
//! indexes and triggers return; a re-created column is filled by key before `SET NOT NULL`.

use std::collections::BTreeMap;

use crate::model::{ident, literal, Column, QName, Schema};

/// Rows a migration loses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// The table is gone (dropped or renamed): every column.
    Table { table: QName, columns: Vec<String> },
    /// The column is gone from a table that stays.
    Column { table: QName, column: String },
}

/// What `before` has and `after` lost with its rows.
pub fn dropped(before: &Schema, after: &Schema) -> Vec<Dropped> {
    let mut out = Vec::new();
    for (n, b) in &before.tables {
        let Some(a) = after.tables.get(n) else {
            out.push(Dropped::Table {
                table: n.clone(),
                columns: b.columns.iter().map(|c| c.name.clone()).collect(),
            });
            continue;
        };
        // Renamed columns keep their values.
        let renamed = crate::diff::renames(a, b);
        for c in &b.columns {
            let stays = a.columns.iter().any(|x| x.name == c.name)
                || renamed.iter().any(|(_, old)| *old == c.name);
            if !stays {
                out.push(Dropped::Column {
                    table: n.clone(),
                    column: c.name.clone(),
                });
            }
        }
    }
    out
}

/// A dropped table's rows, kept in `copy` (the same column names, every value as text), and the
/// state of the sequences its columns took values from (column, last value, is_called).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptTable {
    pub copy: QName,
    pub columns: Vec<String>,
    pub sequences: Vec<(String, i64, bool)>,
}

/// A dropped column's values, kept in `copy` beside the key columns that find their rows again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptColumn {
    pub copy: QName,
    pub key: Vec<String>,
}

/// Every copy a rollback may restore from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kept {
    pub tables: BTreeMap<QName, KeptTable>,
    pub columns: BTreeMap<(QName, String), KeptColumn>,
}

impl Kept {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.columns.is_empty()
    }
}

/// `INSERT … SELECT` of a re-created table's rows from its copy (identity values included).
pub(crate) fn insert_rows(n: &QName, cols: &[Column], k: &KeptTable) -> Option<String> {
    let kept: Vec<&Column> = cols
        .iter()
        .filter(|c| k.columns.contains(&c.name))
        .collect();
    if kept.is_empty() {
        return None;
    }
    let names: Vec<String> = kept.iter().map(|c| ident(&c.name)).collect();
    let values: Vec<String> = kept
        .iter()
        .map(|c| format!("k.{}::{}", ident(&c.name), c.type_sql))
        .collect();
    let overriding = if cols.iter().any(|c| c.identity.is_some()) {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    Some(format!(
        "INSERT INTO {} ({}){overriding} SELECT {} FROM {} k",
        n.sql(),
        names.join(", "),
        values.join(", "),
        k.copy.sql()
    ))
}

/// The sequences of a re-created table set to where they were.
pub(crate) fn sequence_values(n: &QName, k: &KeptTable) -> Vec<String> {
    k.sequences
        .iter()
        .map(|(col, last, called)| {
            format!(
                "SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence({}, {}), {last}, {called})",
                literal(&n.sql()),
                literal(col)
            )
        })
        .collect()
}

/// `UPDATE … FROM` that puts a re-created column's values back, row by row through the key.
pub(crate) fn update_column(n: &QName, c: &Column, key: &[&Column], k: &KeptColumn) -> String {
    let matches: Vec<String> = key
        .iter()
        .map(|kc| format!("t.{col} = k.{col}::{}", kc.type_sql, col = ident(&kc.name)))
        .collect();
    format!(
        "UPDATE {} t SET {col} = k.{col}::{} FROM {} k WHERE {}",
        n.sql(),
        c.type_sql,
        k.copy.sql(),
        matches.join(" AND "),
        col = ident(&c.name)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Table;

    fn col(name: &str) -> Column {
        Column {
            name: name.into(),
            type_sql: "integer".into(),
            not_null: false,
            default: None,
            identity: None,
            comment: None,
            number: crate::model::ColumnNumber::default(),
        }
    }

    fn schema(tables: &[(&str, &[&str])]) -> Schema {
        let mut s = Schema::default();
        for (t, cols) in tables {
            s.tables.insert(
                QName::new("public", t),
                Table {
                    columns: cols.iter().map(|c| col(c)).collect(),
                    ..Table::default()
                },
            );
        }
        s
    }

    #[test]
    fn dropped_tables_and_columns_are_found_and_renamed_columns_are_not() {
        let before = schema(&[("a", &["id", "x", "y"]), ("b", &["id"])]);
        let after = schema(&[("a", &["id", "y"]), ("c", &["id"])]);
        assert_eq!(
            dropped(&before, &after),
            vec![
                Dropped::Column {
                    table: QName::new("public", "a"),
                    column: "x".into()
                },
                Dropped::Table {
                    table: QName::new("public", "b"),
                    columns: vec!["id".into()]
                },
            ]
        );
        let renamed = schema(&[("a", &["id", "z", "y"]), ("b", &["id"])]);
        assert!(dropped(&before, &renamed).is_empty());
    }

    #[test]
    fn a_rollback_refills_a_kept_column_before_not_null_and_a_kept_table_before_its_keys() {
        use crate::model::Constraint;
        let mut before = schema(&[("a", &["id", "x", "y"]), ("b", &["id"])]);
        let a = before.tables.get_mut(&QName::new("public", "a")).unwrap();
        a.columns[1].not_null = true;
        a.constraints.insert(
            "a_pkey".into(),
            Constraint {
                kind: 'p',
                definition: "PRIMARY KEY (id)".into(),
            },
        );
        before
            .tables
            .get_mut(&QName::new("public", "b"))
            .unwrap()
            .constraints
            .insert(
                "b_pkey".into(),
                Constraint {
                    kind: 'p',
                    definition: "PRIMARY KEY (id)".into(),
                },
            );
        let mut after = before.clone();
        after.tables.remove(&QName::new("public", "b"));
        after
            .tables
            .get_mut(&QName::new("public", "a"))
            .unwrap()
            .columns
            .remove(1);
        let mut kept = Kept::default();
        kept.columns.insert(
            (QName::new("public", "a"), "x".into()),
            KeptColumn {
                copy: QName::new("dbopt_migrate", "kept_1"),
                key: vec!["id".into()],
            },
        );
        kept.tables.insert(
            QName::new("public", "b"),
            KeptTable {
                copy: QName::new("dbopt_migrate", "kept_2"),
                columns: vec!["id".into()],
                sequences: vec![],
            },
        );
        let p = crate::diff::transform_keeping(&after, &before, &kept);
        assert!(p.losses.is_empty(), "{:?}", p.losses);
        assert_eq!(p.restores.len(), 2);
        let at = |prefix: &str| {
            p.statements
                .iter()
                .position(|s| s.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix}: {:#?}", p.statements))
        };
        assert!(at("CREATE TABLE public.b") < at("INSERT INTO public.b (id) SELECT"));
        assert!(at("INSERT INTO public.b") < at("ALTER TABLE public.b ADD CONSTRAINT b_pkey"));
        assert!(p
            .statements
            .contains(&"ALTER TABLE public.a ADD COLUMN x integer".to_string()));
        assert!(at("ALTER TABLE public.a ADD COLUMN x") < at("UPDATE public.a t SET x"));
        assert!(
            at("UPDATE public.a t SET x") < at("ALTER TABLE public.a ALTER COLUMN x SET NOT NULL")
        );
        // Without copies the same rollback says what it loses.
        let bare = crate::diff::transform(&after, &before);
        assert_eq!(bare.losses.len(), 2);
        assert!(bare.restores.is_empty());
    }

    #[test]
    fn a_refill_turns_the_triggers_of_a_hostile_name_off_and_on() {
        let evil = "we\"ird; DROP TABLE a --";
        let n = QName::new("public", evil);
        let mut before = schema(&[(evil, &["id", "x"])]);
        let t = before.tables.get_mut(&n).unwrap();
        t.triggers
            .insert("t\"g".into(), "CREATE TRIGGER ...".into());
        let mut after = before.clone();
        after.tables.get_mut(&n).unwrap().columns.pop();
        let mut kept = Kept::default();
        kept.columns.insert(
            (n.clone(), "x".into()),
            KeptColumn {
                copy: QName::new("dbopt_migrate", "kept_v1_1"),
                key: vec!["id".into()],
            },
        );
        let p = crate::diff::transform_keeping(&after, &before, &kept);
        let q = "public.\"we\"\"ird; DROP TABLE a --\"";
        let at = |s: &str| {
            p.statements
                .iter()
                .position(|x| x == s)
                .unwrap_or_else(|| panic!("{s}: {:#?}", p.statements))
        };
        let off = at(&format!("ALTER TABLE {q} DISABLE TRIGGER USER"));
        let on = at(&format!("ALTER TABLE {q} ENABLE TRIGGER USER"));
        let update = p
            .statements
            .iter()
            .position(|x| x.starts_with(&format!("UPDATE {q} t SET x = k.x::integer")))
            .unwrap();
        assert!(off < update && update < on, "{:#?}", p.statements);
    }

    #[test]
    fn restores_quote_every_name() {
        let n = QName::new("public", "we\"ird");
        let k = KeptTable {
            copy: QName::new("dbopt_migrate", "kept_1"),
            columns: vec!["a b".into()],
            sequences: vec![("a b".into(), 41, true)],
        };
        let mut c = col("a b");
        c.identity = Some('a');
        assert_eq!(
            insert_rows(&n, &[c.clone()], &k).unwrap(),
            "INSERT INTO public.\"we\"\"ird\" (\"a b\") OVERRIDING SYSTEM VALUE SELECT k.\"a b\"::integer FROM dbopt_migrate.kept_1 k"
        );
        assert_eq!(
            sequence_values(&n, &k),
            vec!["SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence('public.\"we\"\"ird\"', 'a b'), 41, true)"]
        );
        let kc = KeptColumn {
            copy: QName::new("dbopt_migrate", "kept_2"),
            key: vec!["id".into()],
        };
        assert_eq!(
            update_column(&n, &col("x"), &[&col("id")], &kc),
            "UPDATE public.\"we\"\"ird\" t SET x = k.x::integer FROM dbopt_migrate.kept_2 k WHERE t.id = k.id::integer"
        );
    }
}
