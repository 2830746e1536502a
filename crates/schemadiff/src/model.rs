//! What a schema is, as far as a rollback needs to know: every object with the text PostgreSQL
//! itself gives for it (`format_type`, `pg_get_expr`, `pg_get_constraintdef`, `pg_get_indexdef`,
//! `pg_get_triggerdef`, `pg_get_viewdef`, `pg_get_functiondef`), so that comparing two snapshots
//! compares what PostgreSQL would dump, and the DDL built from them is PostgreSQL's own wording.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A schema-qualified name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QName {
    pub schema: String,
    pub name: String,
}

impl QName {
    pub fn new(schema: &str, name: &str) -> QName {
        QName {
            schema: schema.to_string(),
            name: name.to_string(),
        }
    }

    /// `"schema"."name"`, both quoted as identifiers.
    pub fn sql(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
}

/// Quotes an identifier the way PostgreSQL's `quote_ident` does: bare when it is a lower-case
/// identifier that is not a keyword we know of, else in double quotes with quotes doubled.
pub fn ident(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !RESERVED.contains(&s);
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// A string literal (standard conforming strings: quotes doubled, nothing else special).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Reserved and type-function keywords that must be quoted as identifiers (PostgreSQL 15's
/// `RESERVED_KEYWORD` and `TYPE_FUNC_NAME_KEYWORD` lists).
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    /// Schemas other than the system ones, with their comments.
    pub namespaces: BTreeMap<String, Option<String>>,
    pub tables: BTreeMap<QName, Table>,
    pub sequences: BTreeMap<QName, Sequence>,
    /// Views in creation order (dependencies first) is kept by `order`.
    pub views: BTreeMap<QName, View>,
    pub functions: BTreeMap<FunctionKey, Function>,
    pub enums: BTreeMap<QName, Enum>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// In attribute order (what a dump shows).
    pub columns: Vec<Column>,
    /// By name: primary keys, unique, check, foreign keys, exclusion.
    pub constraints: BTreeMap<String, Constraint>,
    /// By name: indexes that no constraint owns.
    pub indexes: BTreeMap<String, String>,
    /// By name: `pg_get_triggerdef`.
    pub triggers: BTreeMap<String, String>,
    pub comment: Option<String>,
    pub grants: BTreeSet<Grant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`.
    pub type_sql: String,
    pub not_null: bool,
    /// `pg_get_expr(adbin, adrelid)`.
    pub default: Option<String>,
    /// `a` (always) or `d` (by default) for identity columns.
    pub identity: Option<char>,
    pub comment: Option<String>,
    /// Which column this is across renames (`attnum`); not part of what a schema is.
    #[serde(default)]
    pub number: ColumnNumber,
}

/// A column's `attnum`: it survives `RENAME COLUMN`, so two snapshots of one database tell a
/// renamed column from a dropped one and a new one. Equal to every other number, because a
/// column dropped and added back is the same column of the schema with a new number; 0: unknown.
#[derive(Debug, Clone, Copy, Default, Eq, Serialize, Deserialize)]
pub struct ColumnNumber(pub i16);

impl PartialEq for ColumnNumber {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    /// `p`, `u`, `c`, `f`, `x`.
    pub kind: char,
    /// `pg_get_constraintdef`.
    pub definition: String,
}

/// A privilege granted on an object: (grantee, privilege), `PUBLIC` as the grantee for public.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Grant {
    pub grantee: String,
    pub privilege: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    pub type_sql: String,
    pub start: i64,
    pub increment: i64,
    pub min: i64,
    pub max: i64,
    pub cache: i64,
    pub cycle: bool,
    /// `table.column` when the sequence belongs to a column (serial), else None.
    pub owned_by: Option<(QName, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub materialized: bool,
    /// `pg_get_viewdef`.
    pub definition: String,
    pub comment: Option<String>,
    /// Creation order among views (the oid order): dependencies come first.
    pub order: u64,
}

/// A function or procedure: name and identity arguments (`pg_get_function_identity_arguments`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FunctionKey {
    pub name: QName,
    pub args: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Function {
    /// `pg_get_functiondef`: a complete `CREATE OR REPLACE FUNCTION`.
    pub definition: String,
    pub procedure: bool,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enum {
    pub labels: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(ident("users"), "users");
        assert_eq!(ident("user"), "\"user\"");
        assert_eq!(ident("Users"), "\"Users\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(ident("1st"), "\"1st\"");
        assert_eq!(ident(""), "\"\"");
        assert_eq!(QName::new("public", "order").sql(), "public.\"order\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
