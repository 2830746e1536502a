//! The DDL that turns schema `from` into schema `to` — for a rollback, `from` is the schema after a
//! migration and `to` the one before it. Statements come in an order PostgreSQL accepts
//! (dependents dropped before what they depend on, created after it), and the plan says what it
//! cannot restore (data of dropped tables and columns, column order, enum labels).

use std::collections::BTreeMap;

use crate::kept::{insert_rows, sequence_values, update_column, Kept};
use crate::model::{ident, literal, Column, QName, Schema, Table};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub statements: Vec<String>,
    /// What the statements bring back without its data (a re-created table or column).
    pub losses: Vec<String>,
    /// What the statements cannot make exactly as it was (the plan still does what it can).
    pub caveats: Vec<String>,
    /// Rows and values the statements bring back from copies kept aside ([`Kept`]).
    pub restores: Vec<String>,
}

impl Plan {
    fn push(&mut self, s: String) {
        self.statements.push(s);
    }
}

/// The plan that turns `from` into `to`.
pub fn transform(from: &Schema, to: &Schema) -> Plan {
    transform_keeping(from, to, &Kept::default())
}

/// The plan that turns `from` into `to`, putting back the rows of re-created tables and the
/// values of re-created columns that `kept` has copies of.
pub fn transform_keeping(from: &Schema, to: &Schema, kept: &Kept) -> Plan {
    let mut p = Plan::default();

    for (name, comment) in &to.namespaces {
        if !from.namespaces.contains_key(name) {
            p.push(format!("CREATE SCHEMA {}", ident(name)));
            if let Some(c) = comment {
                p.push(format!(
                    "COMMENT ON SCHEMA {} IS {}",
                    ident(name),
                    literal(c)
                ));
            }
        }
    }

    // Views depend on tables and on each other: drop the ones that go or change, newest first.
    // A column whose type changes cannot be altered under a view that uses it: without the
    // dependencies at hand, every view is then dropped and created again.
    let rebuild = retyped_columns(from, to);
    let mut dropped_views: Vec<(&QName, u64, bool)> = from
        .views
        .iter()
        .filter(|(n, v)| {
            rebuild
                || to.views.get(*n).is_none_or(|t| {
                    t.definition != v.definition || t.materialized != v.materialized
                })
        })
        .map(|(n, v)| (n, v.order, v.materialized))
        .collect();
    dropped_views.sort_by_key(|(_, o, _)| std::cmp::Reverse(*o));
    for (n, _, m) in &dropped_views {
        p.push(format!(
            "DROP {}VIEW {}",
            if *m { "MATERIALIZED " } else { "" },
            n.sql()
        ));
    }

    let both: Vec<(&QName, &Table, &Table)> = from
        .tables
        .iter()
        .filter_map(|(n, f)| to.tables.get(n).map(|t| (n, f, t)))
        .collect();

    // Triggers, then foreign keys, then other constraints, then indexes that go or change.
    for (n, f, t) in &both {
        for (name, def) in &f.triggers {
            if t.triggers.get(name) != Some(def) {
                p.push(format!("DROP TRIGGER {} ON {}", ident(name), n.sql()));
            }
        }
    }
    for pass_fk in [true, false] {
        for (n, f, t) in &both {
            for (name, c) in &f.constraints {
                if (c.kind == 'f') == pass_fk && t.constraints.get(name) != Some(c) {
                    p.push(format!(
                        "ALTER TABLE {} DROP CONSTRAINT {}",
                        n.sql(),
                        ident(name)
                    ));
                }
            }
        }
        // Foreign keys of tables that go, to tables that stay, go with their table below.
    }
    for (n, f, t) in &both {
        for (name, def) in &f.indexes {
            if t.indexes.get(name) != Some(def) {
                p.push(format!("DROP INDEX {}", QName::new(&n.schema, name).sql()));
            }
        }
    }

    // Tables that go: foreign keys between them first, then the tables.
    let gone: Vec<&QName> = from
        .tables
        .keys()
        .filter(|n| !to.tables.contains_key(*n))
        .collect();
    for n in &gone {
        for (name, c) in &from.tables[*n].constraints {
            if c.kind == 'f' {
                p.push(format!(
                    "ALTER TABLE {} DROP CONSTRAINT {}",
                    n.sql(),
                    ident(name)
                ));
            }
        }
    }
    for n in &gone {
        p.push(format!("DROP TABLE {}", n.sql()));
    }

    for (k, _) in from
        .functions
        .iter()
        .filter(|(k, _)| !to.functions.contains_key(*k))
    {
        let what = if from.functions[k].procedure {
            "PROCEDURE"
        } else {
            "FUNCTION"
        };
        p.push(format!("DROP {what} {}({})", k.name.sql(), k.args));
    }

    for (n, e) in &to.enums {
        match from.enums.get(n) {
            None => p.push(format!(
                "CREATE TYPE {} AS ENUM ({})",
                n.sql(),
                e.labels
                    .iter()
                    .map(|l| literal(l))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(f) if f.labels != e.labels => enum_change(&mut p, n, &f.labels, &e.labels),
            Some(_) => {}
        }
    }

    for (n, s) in &to.sequences {
        if !from.sequences.contains_key(n) {
            p.push(format!(
                "CREATE SEQUENCE {} {}",
                n.sql(),
                sequence_options(s)
            ));
        }
    }

    // Tables that come back: columns, then their constraints and indexes below.
    let new: Vec<&QName> = to
        .tables
        .keys()
        .filter(|n| !from.tables.contains_key(*n))
        .collect();
    for n in &new {
        let t = &to.tables[*n];
        let cols: Vec<String> = t.columns.iter().map(column_sql).collect();
        p.push(format!(
            "CREATE TABLE {} (\n    {}\n)",
            n.sql(),
            cols.join(",\n    ")
        ));
        // Rows go back before the constraints, indexes and triggers do.
        match kept
            .tables
            .get(*n)
            .and_then(|k| insert_rows(n, &t.columns, k).map(|i| (k, i)))
        {
            Some((k, insert)) => {
                p.push(insert);
                p.restores.push(format!(
                    "rows of table {} come back from {}",
                    n.sql(),
                    k.copy.sql()
                ));
            }
            None => p.losses.push(format!(
                "table {} is created again empty: its rows were dropped with it",
                n.sql()
            )),
        }
    }

    for (n, f, t) in &both {
        columns(&mut p, n, f, t, kept);
    }

    for (n, s) in &to.sequences {
        let Some(f) = from.sequences.get(n) else {
            continue;
        };
        if sequence_options(f) != sequence_options(s) {
            p.push(format!(
                "ALTER SEQUENCE {} {}",
                n.sql(),
                sequence_options(s)
            ));
        }
    }
    for (n, s) in &to.sequences {
        let was = from.sequences.get(n).map_or(&None, |f| &f.owned_by);
        if *was != s.owned_by {
            p.push(match &s.owned_by {
                Some((t, c)) => format!(
                    "ALTER SEQUENCE {} OWNED BY {}.{}",
                    n.sql(),
                    t.sql(),
                    ident(c)
                ),
                None => format!("ALTER SEQUENCE {} OWNED BY NONE", n.sql()),
            });
        }
    }

    for (k, f) in &to.functions {
        if from.functions.get(k).map(|x| &x.definition) != Some(&f.definition) {
            p.push(f.definition.trim_end().trim_end_matches(';').to_string());
        }
    }

    // Constraints (foreign keys last: they need the keys they reference), indexes, triggers.
    for pass_fk in [false, true] {
        for (n, t) in &to.tables {
            let f = from.tables.get(n);
            for (name, c) in &t.constraints {
                if (c.kind == 'f') == pass_fk && f.and_then(|f| f.constraints.get(name)) != Some(c)
                {
                    p.push(format!(
                        "ALTER TABLE {} ADD CONSTRAINT {} {}",
                        n.sql(),
                        ident(name),
                        c.definition
                    ));
                }
            }
        }
    }
    for (n, t) in &to.tables {
        let f = from.tables.get(n);
        for (name, def) in &t.indexes {
            if f.and_then(|f| f.indexes.get(name)) != Some(def) {
                p.push(def.clone());
            }
        }
        for (name, def) in &t.triggers {
            if f.and_then(|f| f.triggers.get(name)) != Some(def) {
                p.push(def.clone());
            }
        }
    }

    let mut views: Vec<(&QName, &crate::model::View)> = to
        .views
        .iter()
        .filter(|(n, v)| {
            rebuild
                || from.views.get(*n).is_none_or(|f| {
                    f.definition != v.definition || f.materialized != v.materialized
                })
        })
        .collect();
    views.sort_by_key(|(_, v)| v.order);
    let mut recreated = std::collections::BTreeSet::new();
    for (n, v) in views {
        p.push(format!(
            "CREATE {}VIEW {} AS\n{}",
            if v.materialized { "MATERIALIZED " } else { "" },
            n.sql(),
            v.definition.trim_end().trim_end_matches(';')
        ));
        recreated.insert(n);
    }

    comments_and_grants(&mut p, from, to, &recreated);

    for n in from
        .sequences
        .keys()
        .filter(|n| !to.sequences.contains_key(*n))
    {
        // A sequence owned by a dropped table went with it.
        let owned_by_gone = from.sequences[n]
            .owned_by
            .as_ref()
            .is_some_and(|(t, _)| !to.tables.contains_key(t));
        if !owned_by_gone {
            p.push(format!("DROP SEQUENCE {}", n.sql()));
        }
    }
    // Sequences of re-created tables continue where they were (their rows are back).
    for n in &new {
        if let Some(k) = kept.tables.get(*n) {
            for s in sequence_values(n, k) {
                p.push(s);
            }
        }
    }
    for n in from.enums.keys().filter(|n| !to.enums.contains_key(*n)) {
        p.push(format!("DROP TYPE {}", n.sql()));
    }
    for name in from
        .namespaces
        .keys()
        .filter(|n| !to.namespaces.contains_key(*n))
    {
        p.push(format!("DROP SCHEMA {}", ident(name)));
    }
    p
}

/// Whether a column of a table in both schemas changes its type.
fn retyped_columns(from: &Schema, to: &Schema) -> bool {
    from.tables.iter().any(|(n, f)| {
        to.tables.get(n).is_some_and(|t| {
            f.columns.iter().any(|c| {
                t.columns
                    .iter()
                    .any(|d| d.name == c.name && d.type_sql != c.type_sql)
            })
        })
    })
}

/// Everything of a sequence but its name and owner, as CREATE and ALTER SEQUENCE take it.
fn sequence_options(s: &crate::model::Sequence) -> String {
    format!(
        "AS {} INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} CACHE {} {}CYCLE",
        s.type_sql,
        s.increment,
        s.min,
        s.max,
        s.start,
        s.cache,
        if s.cycle { "" } else { "NO " }
    )
}

fn column_sql(c: &Column) -> String {
    let mut s = format!("{} {}", ident(&c.name), c.type_sql);
    match c.identity {
        Some('a') => s.push_str(" GENERATED ALWAYS AS IDENTITY"),
        Some(_) => s.push_str(" GENERATED BY DEFAULT AS IDENTITY"),
        None => {
            if let Some(d) = &c.default {
                s.push_str(&format!(" DEFAULT {d}"));
            }
        }
    }
    if c.not_null {
        s.push_str(" NOT NULL");
    }
    s
}

/// Columns renamed between `f` and `t`: the same column number (`attnum`) under a name only one
/// side has. Without numbers (0): same position, same type, and a name only one side has.
pub(crate) fn renames<'a>(f: &'a Table, t: &'a Table) -> Vec<(&'a str, &'a str)> {
    let in_f = |name: &str| f.columns.iter().any(|c| c.name == name);
    let in_t = |name: &str| t.columns.iter().any(|c| c.name == name);
    if f.columns.iter().chain(&t.columns).all(|c| c.number.0 > 0) {
        return f
            .columns
            .iter()
            .filter_map(|a| {
                t.columns
                    .iter()
                    .find(|b| b.number.0 == a.number.0)
                    .filter(|b| a.name != b.name && !in_t(&a.name) && !in_f(&b.name))
                    .map(|b| (a.name.as_str(), b.name.as_str()))
            })
            .collect();
    }
    if f.columns.len() != t.columns.len() {
        return Vec::new();
    }
    f.columns
        .iter()
        .zip(&t.columns)
        .filter(|(a, b)| {
            a.name != b.name && a.type_sql == b.type_sql && !in_t(&a.name) && !in_f(&b.name)
        })
        .map(|(a, b)| (a.name.as_str(), b.name.as_str()))
        .collect()
}

fn columns(p: &mut Plan, n: &QName, f: &Table, t: &Table, kept: &Kept) {
    let renamed = renames(f, t);
    let mut f = f.clone();
    for (from, to) in &renamed {
        p.push(format!(
            "ALTER TABLE {} RENAME COLUMN {} TO {}",
            n.sql(),
            ident(from),
            ident(to)
        ));
        if let Some(c) = f.columns.iter_mut().find(|c| c.name == *from) {
            c.name = (*to).to_string();
        }
    }
    let f = &f;
    let old: BTreeMap<&str, &Column> = f.columns.iter().map(|c| (c.name.as_str(), c)).collect();
    let new: BTreeMap<&str, &Column> = t.columns.iter().map(|c| (c.name.as_str(), c)).collect();
    for c in &f.columns {
        if !new.contains_key(c.name.as_str()) {
            p.push(format!(
                "ALTER TABLE {} DROP COLUMN {}",
                n.sql(),
                ident(&c.name)
            ));
        }
    }
    let mut appended = false;
    // Re-created columns with kept values: filled by key, then made NOT NULL.
    let mut refill: Vec<(String, &Column)> = Vec::new();
    for c in &t.columns {
        let Some(o) = old.get(c.name.as_str()) else {
            appended = true;
            let restore = kept
                .columns
                .get(&(n.clone(), c.name.clone()))
                .filter(|_| c.identity.is_none())
                .and_then(|k| {
                    let key: Option<Vec<&Column>> = k
                        .key
                        .iter()
                        .map(|name| {
                            t.columns
                                .iter()
                                .find(|x| x.name == *name && old.contains_key(name.as_str()))
                        })
                        .collect();
                    key.filter(|key| !key.is_empty())
                        .map(|key| (update_column(n, c, &key, k), k))
                });
            let Some((update, k)) = restore else {
                p.push(format!(
                    "ALTER TABLE {} ADD COLUMN {}",
                    n.sql(),
                    column_sql(c)
                ));
                p.losses.push(format!(
                    "column {}.{} is added again with its default, not its old values",
                    n.sql(),
                    ident(&c.name)
                ));
                continue;
            };
            let nullable = Column {
                not_null: false,
                ..c.clone()
            };
            p.push(format!(
                "ALTER TABLE {} ADD COLUMN {}",
                n.sql(),
                column_sql(&nullable)
            ));
            p.restores.push(format!(
                "values of column {}.{} come back from {}",
                n.sql(),
                ident(&c.name),
                k.copy.sql()
            ));
            refill.push((update, c));
            continue;
        };
        let col = format!("ALTER TABLE {} ALTER COLUMN {}", n.sql(), ident(&c.name));
        if o.identity != c.identity && o.identity.is_some() {
            p.push(format!("{col} DROP IDENTITY"));
        }
        if o.type_sql != c.type_sql {
            p.push(format!(
                "{col} TYPE {} USING {}::{}",
                c.type_sql,
                ident(&c.name),
                c.type_sql
            ));
        }
        if o.default != c.default && c.identity.is_none() {
            p.push(match &c.default {
                Some(d) => format!("{col} SET DEFAULT {d}"),
                None => format!("{col} DROP DEFAULT"),
            });
        }
        if o.not_null != c.not_null {
            p.push(format!(
                "{col} {} NOT NULL",
                if c.not_null { "SET" } else { "DROP" }
            ));
        }
        if o.identity != c.identity {
            if let Some(kind) = c.identity {
                p.push(format!(
                    "{col} ADD GENERATED {} AS IDENTITY",
                    if kind == 'a' { "ALWAYS" } else { "BY DEFAULT" }
                ));
            }
        }
    }
    if !refill.is_empty() {
        // The table's own triggers (those that stay) must not see the refill as an update.
        let triggers = f
            .triggers
            .iter()
            .any(|(name, def)| t.triggers.get(name) == Some(def));
        if triggers {
            p.push(format!("ALTER TABLE {} DISABLE TRIGGER USER", n.sql()));
        }
        for (update, _) in &refill {
            p.push(update.clone());
        }
        if triggers {
            p.push(format!("ALTER TABLE {} ENABLE TRIGGER USER", n.sql()));
        }
        for (_, c) in refill.iter().filter(|(_, c)| c.not_null) {
            p.push(format!(
                "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL",
                n.sql(),
                ident(&c.name)
            ));
        }
    }
    // Where a column was added back, the order differs from before unless it was the last one.
    let order_after: Vec<&str> = f
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .filter(|c| new.contains_key(c))
        .chain(
            t.columns
                .iter()
                .map(|c| c.name.as_str())
                .filter(|c| !old.contains_key(c)),
        )
        .collect();
    let order_before: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
    if appended && order_after != order_before {
        p.caveats.push(format!(
            "columns of {} come back in another order ({}): ADD COLUMN appends",
            n.sql(),
            order_after.join(", ")
        ));
    }
}

fn enum_change(p: &mut Plan, n: &QName, from: &[String], to: &[String]) {
    // Labels can be added (at their place), never removed or reordered in place.
    let keeps_order = from.iter().all(|l| to.contains(l))
        && to.iter().filter(|l| from.contains(l)).eq(from.iter());
    if !keeps_order {
        p.caveats.push(format!(
            "enum {} cannot get back its labels ({}) in place: PostgreSQL cannot remove or reorder enum values",
            n.sql(),
            to.join(", ")
        ));
        return;
    }
    for (i, l) in to.iter().enumerate() {
        if from.contains(l) {
            continue;
        }
        // After the previous label (or before the next one when first).
        let place = match i.checked_sub(1).map(|j| &to[j]) {
            Some(prev) => format!(" AFTER {}", literal(prev)),
            None => to
                .get(1)
                .map(|next| format!(" BEFORE {}", literal(next)))
                .unwrap_or_default(),
        };
        p.push(format!(
            "ALTER TYPE {} ADD VALUE {}{place}",
            n.sql(),
            literal(l)
        ));
    }
}

/// `recreated`: views created by this plan (a view dropped and created again lost its comment).
fn comments_and_grants(
    p: &mut Plan,
    from: &Schema,
    to: &Schema,
    recreated: &std::collections::BTreeSet<&QName>,
) {
    let comment = |c: &Option<String>| c.as_deref().map_or_else(|| "NULL".to_string(), literal);
    for (n, t) in &to.tables {
        let f = from.tables.get(n);
        if f.map_or(t.comment.is_some(), |f| f.comment != t.comment) {
            p.push(format!(
                "COMMENT ON TABLE {} IS {}",
                n.sql(),
                comment(&t.comment)
            ));
        }
        for c in &t.columns {
            let old = f.and_then(|f| f.columns.iter().find(|o| o.name == c.name));
            if old.map_or(c.comment.is_some(), |o| o.comment != c.comment) {
                p.push(format!(
                    "COMMENT ON COLUMN {}.{} IS {}",
                    n.sql(),
                    ident(&c.name),
                    comment(&c.comment)
                ));
            }
        }
        let empty = Default::default();
        let had = f.map_or(&empty, |f| &f.grants);
        for g in had.difference(&t.grants) {
            p.push(format!(
                "REVOKE {} ON TABLE {} FROM {}",
                g.privilege,
                n.sql(),
                grantee(&g.grantee)
            ));
        }
        for g in t.grants.difference(had) {
            p.push(format!(
                "GRANT {} ON TABLE {} TO {}",
                g.privilege,
                n.sql(),
                grantee(&g.grantee)
            ));
        }
    }
    for (n, v) in &to.views {
        let had = if recreated.contains(n) {
            None
        } else {
            from.views.get(n)
        };
        if had.map_or(v.comment.is_some(), |f| f.comment != v.comment) {
            let kind = if v.materialized {
                "MATERIALIZED VIEW"
            } else {
                "VIEW"
            };
            p.push(format!(
                "COMMENT ON {kind} {} IS {}",
                n.sql(),
                comment(&v.comment)
            ));
        }
    }
    for (k, f) in &to.functions {
        if from
            .functions
            .get(k)
            .map_or(f.comment.is_some(), |o| o.comment != f.comment)
        {
            let kind = if f.procedure { "PROCEDURE" } else { "FUNCTION" };
            p.push(format!(
                "COMMENT ON {kind} {}({}) IS {}",
                k.name.sql(),
                k.args,
                comment(&f.comment)
            ));
        }
    }
    for (name, c) in &to.namespaces {
        if from.namespaces.get(name).is_some_and(|o| o != c) {
            p.push(format!(
                "COMMENT ON SCHEMA {} IS {}",
                ident(name),
                comment(c)
            ));
        }
    }
}

fn grantee(g: &str) -> String {
    if g == "PUBLIC" {
        "PUBLIC".into()
    } else {
        ident(g)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{Constraint, Enum, Grant, View};

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            type_sql: ty.into(),
            not_null: false,
            default: None,
            identity: None,
            comment: None,
            number: crate::model::ColumnNumber::default(),
        }
    }

    fn users() -> Table {
        let mut t = Table {
            columns: vec![
                col("id", "bigint"),
                col("email", "text"),
                col("age", "integer"),
            ],
            ..Table::default()
        };
        t.columns[0].not_null = true;
        t.constraints.insert(
            "users_pkey".into(),
            Constraint {
                kind: 'p',
                definition: "PRIMARY KEY (id)".into(),
            },
        );
        t
    }

    fn schema(tables: Vec<(&str, Table)>) -> Schema {
        Schema {
            tables: tables
                .into_iter()
                .map(|(n, t)| (QName::new("public", n), t))
                .collect(),
            ..Schema::default()
        }
    }

    #[test]
    fn the_same_schema_needs_nothing() {
        let s = schema(vec![("users", users())]);
        assert_eq!(transform(&s, &s), Plan::default());
    }

    #[test]
    fn an_added_column_is_dropped_and_a_dropped_one_comes_back_with_a_caveat() {
        let before = schema(vec![("users", users())]);
        let mut t = users();
        t.columns.push(col("nickname", "character varying(40)"));
        let after = schema(vec![("users", t)]);
        let p = transform(&after, &before);
        assert_eq!(
            p.statements,
            ["ALTER TABLE public.users DROP COLUMN nickname"]
        );
        assert!(p.losses.is_empty() && p.caveats.is_empty());

        let mut t = users();
        t.columns.remove(1);
        let after = schema(vec![("users", t)]);
        let p = transform(&after, &before);
        assert_eq!(
            p.statements,
            ["ALTER TABLE public.users ADD COLUMN email text"]
        );
        assert_eq!(p.losses.len(), 1);
        assert!(p.caveats[0].contains("id, age, email"), "{:?}", p.caveats);
    }

    #[test]
    fn hostile_names_stay_identifiers() {
        let evil = "x\"; DROP TABLE users; --";
        let q = "\"x\"\"; DROP TABLE users; --\"";
        let before = schema(vec![(evil, users())]);
        let mut t = users();
        t.columns.push(col("a\"b c", "text"));
        t.indexes.insert(evil.into(), "CREATE INDEX ...".into());
        t.triggers.insert(evil.into(), "CREATE TRIGGER ...".into());
        let after = schema(vec![(evil, t)]);
        assert_eq!(
            transform(&after, &before).statements,
            [
                format!("DROP TRIGGER {q} ON public.{q}"),
                format!("DROP INDEX public.{q}"),
                format!("ALTER TABLE public.{q} DROP COLUMN \"a\"\"b c\""),
            ]
        );
        assert_eq!(
            transform(&before, &Schema::default()).statements,
            [format!("DROP TABLE public.{q}")]
        );
        let mut c = Schema::default();
        c.enums.insert(
            QName::new("public", "m"),
            Enum {
                labels: vec!["it's".into()],
            },
        );
        assert_eq!(
            transform(&Schema::default(), &c).statements,
            ["CREATE TYPE public.m AS ENUM ('it''s')"]
        );
    }

    #[test]
    fn a_renamed_column_is_renamed_back() {
        let before = schema(vec![("users", users())]);
        let mut t = users();
        t.columns[1].name = "mail".into();
        let after = schema(vec![("users", t)]);
        let p = transform(&after, &before);
        assert_eq!(
            p.statements,
            ["ALTER TABLE public.users RENAME COLUMN mail TO email"]
        );
        assert!(p.losses.is_empty() && p.caveats.is_empty());
    }

    #[test]
    fn a_renamed_column_is_told_by_its_number_when_columns_are_added_too() {
        let numbered = |mut t: Table| {
            for (i, c) in t.columns.iter_mut().enumerate() {
                c.number = crate::model::ColumnNumber(i16::try_from(i + 1).unwrap());
            }
            t
        };
        let before = schema(vec![("users", numbered(users()))]);
        let mut t = numbered(users());
        t.columns[1].name = "mail".into();
        t.columns.push(Column {
            number: crate::model::ColumnNumber(9),
            ..col("vip", "boolean")
        });
        let after = schema(vec![("users", t)]);
        let p = transform(&after, &before);
        assert_eq!(
            p.statements,
            [
                "ALTER TABLE public.users RENAME COLUMN mail TO email",
                "ALTER TABLE public.users DROP COLUMN vip"
            ]
        );
        assert!(crate::kept::dropped(&before, &after).is_empty());
    }

    #[test]
    fn type_default_and_not_null_changes_are_reversed() {
        let before = schema(vec![("users", users())]);
        let mut t = users();
        t.columns[2].type_sql = "bigint".into();
        t.columns[2].default = Some("0".into());
        t.columns[2].not_null = true;
        let after = schema(vec![("users", t)]);
        assert_eq!(
            transform(&after, &before).statements,
            [
                "ALTER TABLE public.users ALTER COLUMN age TYPE integer USING age::integer",
                "ALTER TABLE public.users ALTER COLUMN age DROP DEFAULT",
                "ALTER TABLE public.users ALTER COLUMN age DROP NOT NULL",
            ]
        );
    }

    #[test]
    fn dependents_are_dropped_first_and_created_last() {
        let mut orders = Table {
            columns: vec![col("id", "bigint"), col("user_id", "bigint")],
            ..Table::default()
        };
        orders.constraints.insert(
            "orders_user_id_fkey".into(),
            Constraint {
                kind: 'f',
                definition: "FOREIGN KEY (user_id) REFERENCES users(id)".into(),
            },
        );
        orders.indexes.insert(
            "orders_user_id_idx".into(),
            "CREATE INDEX orders_user_id_idx ON public.orders USING btree (user_id)".into(),
        );
        let mut after = schema(vec![("users", users()), ("orders", orders)]);
        after.views.insert(
            QName::new("public", "big_orders"),
            View {
                materialized: false,
                definition: " SELECT orders.id\n   FROM orders;".into(),
                comment: None,
                order: 1,
            },
        );
        let before = schema(vec![("users", users())]);
        // Rolling back the creation of orders (with its FK, index and a view on it).
        let p = transform(&after, &before);
        assert_eq!(
            p.statements,
            [
                "DROP VIEW public.big_orders",
                "ALTER TABLE public.orders DROP CONSTRAINT orders_user_id_fkey",
                "DROP TABLE public.orders",
            ]
        );
        // And forward: the table, then its FK (after the key it references), index, view.
        let p = transform(&before, &after);
        let s = p.statements.join("\n");
        let pos = |x: &str| s.find(x).unwrap_or_else(|| panic!("{x} in {s}"));
        assert!(pos("CREATE TABLE public.orders") < pos("ADD CONSTRAINT orders_user_id_fkey"));
        assert!(pos("ADD CONSTRAINT orders_user_id_fkey") < pos("CREATE INDEX orders_user_id_idx"));
        assert!(
            pos("CREATE INDEX")
                < pos("CREATE VIEW public.big_orders AS\n SELECT orders.id\n   FROM orders")
        );
        assert_eq!(p.losses.len(), 1, "orders comes back empty");
    }

    #[test]
    fn enums_grow_in_place_but_cannot_shrink() {
        let e = |l: &[&str]| Enum {
            labels: l.iter().map(|s| s.to_string()).collect(),
        };
        let mut before = Schema::default();
        before
            .enums
            .insert(QName::new("public", "mood"), e(&["sad", "ok", "happy"]));
        let mut after = before.clone();
        after
            .enums
            .insert(QName::new("public", "mood"), e(&["sad", "happy"]));
        let p = transform(&after, &before);
        assert_eq!(
            p.statements,
            ["ALTER TYPE public.mood ADD VALUE 'ok' AFTER 'sad'"]
        );
        let p = transform(&before, &after);
        assert!(p.statements.is_empty());
        assert!(p.caveats[0].contains("cannot remove"), "{:?}", p.caveats);
    }

    #[test]
    fn comments_and_grants_are_put_back_and_names_quoted() {
        let mut t = users();
        t.comment = Some("who's who".into());
        t.grants.insert(Grant {
            grantee: "PUBLIC".into(),
            privilege: "SELECT".into(),
        });
        let before = schema(vec![("user", t)]);
        let after = schema(vec![("user", users())]);
        assert_eq!(
            transform(&after, &before).statements,
            [
                "COMMENT ON TABLE public.\"user\" IS 'who''s who'",
                "GRANT SELECT ON TABLE public.\"user\" TO PUBLIC",
            ]
        );
        assert_eq!(
            transform(&before, &after).statements,
            [
                "COMMENT ON TABLE public.\"user\" IS NULL",
                "REVOKE SELECT ON TABLE public.\"user\" FROM PUBLIC",
            ]
        );
    }
}
