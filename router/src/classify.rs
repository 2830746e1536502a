//! Statement classification with PostgreSQL's own parser (libpg_query through `pg_query`).
//!
//! A statement is a [`Kind::Read`] only when it is provably read-only: a plain `SELECT` (or
//! `VALUES`, `TABLE`, `EXPLAIN` of one) with no locking clause, no `INTO`, no data-modifying CTE
//! and no call of a function that might write. A function might write unless it is known to be
//! non-volatile (PostgreSQL forbids writes in STABLE and IMMUTABLE functions): the router loads
//! that list from `pg_proc` of the primary ([`FunctionCatalog`]) and starts from a built-in list
//! of common ones. Everything else — DML, DDL, `SET`, `SHOW`, `LISTEN`, `COPY`, `CALL`, `DO`, a text
//! the parser rejects — is a [`Kind::Write`] and goes to the primary.
//!
//! Routing hints in comments: `/* dbopt:primary */`, `/* dbopt:replica */`, `/* dbopt:critical */`,
//! found with PostgreSQL's own scanner (so text inside `'…'`, `E'…'`, `$$…$$` or `"…"` is never a
//! hint). A replica hint can only move a statement whose one doubt is a function call
//! ([`Kind::MayWrite`]); DML, DDL and the rest stay on the primary whatever a comment says.
//!
//! Each class also says whether the statement may leave state in the server session beyond its
//! transaction ([`Class::session`]: `SET`, `RESET`, `set_config`, `DISCARD`, `LISTEN`, temporary
//! objects, SQL `PREPARE`, cursors, `DO`/`CALL`, functions that are not known to be harmless).
//! The session then checks the connection before another client may use it.

use std::collections::HashSet;

use pg_query::protobuf::TransactionStmtKind;
use pg_query::NodeEnum;
use serde_json::Value;

/// What one query text does, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Provably read-only.
    Read,
    /// Anything else; the reason is shown in logs and tests.
    Write(&'static str),
    /// Reads, except that it calls a function not known to be read-only: goes to the primary,
    /// unless a `dbopt:replica` hint vouches for the function.
    MayWrite(&'static str),
    /// `BEGIN READ ONLY` / `START TRANSACTION READ ONLY`.
    BeginReadOnly,
    /// Any other `BEGIN` / `START TRANSACTION`.
    Begin,
    /// An empty query (only comments or semicolons).
    Empty,
}

/// A hint written in an SQL comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub kind: Kind,
    pub hint: Option<Hint>,
    pub critical: bool,
    /// May leave state in the server session (settings, locks, temporary objects, ...).
    pub session: bool,
    /// Exactly one `SET name …`/`RESET name` of an ordinary setting (no role, no `LOCAL`): the
    /// session only needs that setting read back ([`set_name`] gives it), not a full check.
    pub simple_set: bool,
}

/// Why `SET`/`SHOW` go to the primary: session state, not data (they write no WAL).
pub const SESSION_SET: &str = "SET changes session state";
pub const SESSION_SHOW: &str = "SHOW reads session state";

impl Class {
    /// May this change data (so a read-your-writes barrier must follow its commit)? `SET` and
    /// `SHOW` run on the primary but write nothing a replica would have to replay.
    pub fn writes(&self) -> bool {
        !matches!(
            self.kind,
            Kind::Read
                | Kind::Empty
                | Kind::BeginReadOnly
                | Kind::Write(SESSION_SET | SESSION_SHOW)
        )
    }

    /// A batch that must go to the primary, for `reason`, with no hint.
    pub fn write(reason: &'static str) -> Class {
        Class {
            kind: Kind::Write(reason),
            hint: None,
            critical: false,
            session: true,
            simple_set: false,
        }
    }
}

/// Names of functions known not to write: non-volatile ones, plus read-only volatile ones.
#[derive(Debug, Clone, Default)]
pub struct FunctionCatalog {
    /// Lower-case names, unqualified (`count`) and qualified (`pg_catalog.count`).
    safe: HashSet<String>,
}

/// Functions that certainly write (a sequence, a notification) or assign a transaction id (so
/// fail on a replica although `pg_proc` marks `txid_current` STABLE): no hint moves them.
const XID_ASSIGNING: &[&str] = &[
    "txid_current",
    "pg_current_xact_id",
    "nextval",
    "setval",
    "pg_notify",
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_unlink",
    "lo_from_bytea",
    "lo_put",
];

/// Functions that are volatile or write but leave nothing in the session beyond the transaction
/// (no settings, session locks, temporary objects): calling them needs no session check.
const SESSION_HARMLESS: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "txid_current",
    "pg_current_xact_id",
    "pg_notify",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_sleep",
    "random",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "pg_cancel_backend",
];

/// Built-in functions that are read-only, used until the catalogue of the primary is loaded.
const BUILTIN_SAFE: &[&str] = &[
    "abs",
    "age",
    "array_agg",
    "array_length",
    "array_position",
    "array_to_string",
    "avg",
    "bool_and",
    "bool_or",
    "btrim",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "clock_timestamp",
    "concat",
    "concat_ws",
    "count",
    "current_database",
    "current_schema",
    "current_setting",
    "date_part",
    "date_trunc",
    "extract",
    "floor",
    "format",
    "gen_random_uuid",
    "generate_series",
    "greatest",
    "inet_server_addr",
    "inet_server_port",
    "initcap",
    "json_agg",
    "json_build_array",
    "json_build_object",
    "jsonb_agg",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_typeof",
    "least",
    "left",
    "length",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "max",
    "md5",
    "min",
    "mod",
    "now",
    "octet_length",
    "pg_backend_pid",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "pg_postmaster_start_time",
    "pg_sleep",
    "position",
    "power",
    "random",
    "regexp_replace",
    "regexp_match",
    "repeat",
    "replace",
    "right",
    "round",
    "row_number",
    "rank",
    "dense_rank",
    "rpad",
    "rtrim",
    "split_part",
    "sqrt",
    "statement_timestamp",
    "stddev",
    "string_agg",
    "strpos",
    "substr",
    "substring",
    "sum",
    "timeofday",
    "to_char",
    "to_date",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "trim",
    "trunc",
    "unnest",
    "upper",
    "variance",
    "version",
];

/// Volatile functions PostgreSQL marks so but that never write (kept when loading pg_proc).
const VOLATILE_READ_ONLY: &[&str] = &[
    "clock_timestamp",
    "gen_random_uuid",
    "pg_is_in_recovery",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_sleep",
    "random",
    "timeofday",
];

impl FunctionCatalog {
    pub fn builtin() -> Self {
        FunctionCatalog {
            safe: BUILTIN_SAFE
                .iter()
                .flat_map(|s| [s.to_string(), format!("pg_catalog.{s}")])
                .collect(),
        }
    }

    /// From rows `(schema, name, all_overloads_non_volatile)` as read from `pg_proc`.
    pub fn from_rows(rows: impl IntoIterator<Item = (String, String, bool)>) -> Self {
        let mut safe = HashSet::new();
        let mut unsafe_names = HashSet::new();
        for (schema, name, non_volatile) in rows {
            let (schema, name) = (schema.to_lowercase(), name.to_lowercase());
            let read_only = (non_volatile || VOLATILE_READ_ONLY.contains(&name.as_str()))
                && !XID_ASSIGNING.contains(&name.as_str());
            if read_only {
                safe.insert(format!("{schema}.{name}"));
                safe.insert(name);
            } else {
                unsafe_names.insert(name);
            }
        }
        // An unqualified name is safe only when no schema has a writing function of that name.
        safe.retain(|n| n.contains('.') || !unsafe_names.contains(n));
        FunctionCatalog { safe }
    }

    pub fn is_safe(&self, qualified: &[String]) -> bool {
        let key = qualified.join(".").to_lowercase();
        self.safe.contains(&key)
    }

    pub fn len(&self) -> usize {
        self.safe.len()
    }

    pub fn is_empty(&self) -> bool {
        self.safe.is_empty()
    }
}

/// Classifies a whole query text (one or more statements).
pub fn classify(sql: &str, functions: &FunctionCatalog) -> Class {
    let (hint, critical) = hints(sql);
    let (kind, session) = kind_of(sql, functions);
    Class {
        kind,
        hint,
        critical,
        session,
        simple_set: session && set_name(sql).is_some(),
    }
}

/// Settings a plain SET may not change without a full session check (they pin, or belong to
/// the transaction).
const NOT_SIMPLE: &[&str] = &[
    "role",
    "session_authorization",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
];

/// The setting a text that is exactly one `SET name …`, `SET name TO DEFAULT` or `RESET name`
/// changes (lower case), when it is an ordinary one and not `LOCAL`.
pub fn set_name(sql: &str) -> Option<String> {
    use pg_query::protobuf::VariableSetKind;
    let parsed = pg_query::parse(sql).ok()?;
    let [stmt] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    let Some(NodeEnum::VariableSetStmt(v)) = stmt.stmt.as_ref().and_then(|n| n.node.as_ref())
    else {
        return None;
    };
    let simple_kind = matches!(
        v.kind(),
        VariableSetKind::VarSetValue | VariableSetKind::VarSetDefault | VariableSetKind::VarReset
    );
    let name = v.name.to_lowercase();
    (simple_kind && !v.is_local && !name.is_empty() && !NOT_SIMPLE.contains(&name.as_str()))
        .then_some(name)
}

fn kind_of(sql: &str, functions: &FunctionCatalog) -> (Kind, bool) {
    let parsed = match pg_query::parse(sql) {
        Ok(p) => p,
        // PostgreSQL will reject it too; nothing runs, but check the session all the same.
        Err(_) => return (Kind::Write("the parser rejected it"), true),
    };
    let stmts = &parsed.protobuf.stmts;
    let nodes: Vec<&NodeEnum> = stmts
        .iter()
        .filter_map(|s| s.stmt.as_ref().and_then(|n| n.node.as_ref()))
        .collect();
    let kinds: Vec<Kind> = nodes.iter().map(|n| statement_kind(n, functions)).collect();
    let session = nodes.iter().any(|n| touches_session(n, functions));
    let kind = match kinds.as_slice() {
        [] => Kind::Empty,
        [one] => *one,
        many => {
            if let Some(w) = many.iter().find(|k| matches!(k, Kind::Write(_))) {
                *w
            } else if let Some(m) = many.iter().find(|k| matches!(k, Kind::MayWrite(_))) {
                if many
                    .iter()
                    .all(|k| matches!(k, Kind::Read | Kind::Empty | Kind::MayWrite(_)))
                {
                    *m
                } else {
                    Kind::Write("several statements including transaction control")
                }
            } else if many.iter().all(|k| matches!(k, Kind::Read | Kind::Empty)) {
                Kind::Read
            } else {
                Kind::Write("several statements including transaction control")
            }
        }
    };
    (kind, session)
}

/// May `node` leave state in the session beyond its transaction?
fn touches_session(node: &NodeEnum, functions: &FunctionCatalog) -> bool {
    match node {
        NodeEnum::VariableSetStmt(v) => !v.is_local,
        NodeEnum::DiscardStmt(_)
        | NodeEnum::ListenStmt(_)
        | NodeEnum::UnlistenStmt(_)
        | NodeEnum::PrepareStmt(_)
        | NodeEnum::DeallocateStmt(_)
        | NodeEnum::DeclareCursorStmt(_)
        | NodeEnum::ClosePortalStmt(_)
        | NodeEnum::DoStmt(_)
        | NodeEnum::CallStmt(_)
        | NodeEnum::LoadStmt(_)
        | NodeEnum::ExecuteStmt(_)
        | NodeEnum::AlterSystemStmt(_) => true,
        NodeEnum::ExplainStmt(e) => e
            .query
            .as_ref()
            .and_then(|q| q.node.as_ref())
            .is_some_and(|inner| touches_session(inner, functions)),
        _ => {
            let json = match serde_json::to_value(node) {
                Ok(v) => v,
                Err(_) => return true,
            };
            let mut touches = false;
            visit(&json, &mut |key, v| {
                if touches {
                    return;
                }
                match key {
                    // CREATE TEMP TABLE / VIEW / SEQUENCE, SELECT INTO TEMP.
                    "relpersistence" if v.as_str() == Some("t") => touches = true,
                    "FuncCall" => {
                        let name = function_name(v);
                        let bare = name.last().map(|n| n.to_lowercase()).unwrap_or_default();
                        touches =
                            !functions.is_safe(&name) && !SESSION_HARMLESS.contains(&bare.as_str());
                    }
                    _ => {}
                }
            });
            touches
        }
    }
}

fn function_name(call: &Value) -> Vec<String> {
    call.get("funcname")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.pointer("/node/String/sval").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn statement_kind(node: &NodeEnum, functions: &FunctionCatalog) -> Kind {
    match node {
        NodeEnum::SelectStmt(_) => query_kind(node, functions),
        NodeEnum::ExplainStmt(e) => match e.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => statement_kind(inner, functions),
            None => Kind::Write("EXPLAIN without a statement"),
        },
        NodeEnum::TransactionStmt(t) => match t.kind() {
            TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart => {
                if read_only_option(&t.options) {
                    Kind::BeginReadOnly
                } else {
                    Kind::Begin
                }
            }
            _ => Kind::Write("transaction control"),
        },
        NodeEnum::InsertStmt(_)
        | NodeEnum::UpdateStmt(_)
        | NodeEnum::DeleteStmt(_)
        | NodeEnum::MergeStmt(_) => Kind::Write("data modification"),
        NodeEnum::VariableSetStmt(_) => Kind::Write(SESSION_SET),
        NodeEnum::VariableShowStmt(_) => Kind::Write(SESSION_SHOW),
        NodeEnum::CopyStmt(_) => Kind::Write("COPY"),
        NodeEnum::ListenStmt(_) | NodeEnum::UnlistenStmt(_) | NodeEnum::NotifyStmt(_) => {
            Kind::Write("LISTEN/NOTIFY")
        }
        NodeEnum::LockStmt(_) => Kind::Write("LOCK"),
        NodeEnum::CallStmt(_) | NodeEnum::DoStmt(_) => Kind::Write("procedure or DO block"),
        NodeEnum::PrepareStmt(_) | NodeEnum::ExecuteStmt(_) | NodeEnum::DeallocateStmt(_) => {
            Kind::Write("SQL-level prepared statement")
        }
        NodeEnum::DeclareCursorStmt(_) | NodeEnum::FetchStmt(_) | NodeEnum::ClosePortalStmt(_) => {
            Kind::Write("cursor")
        }
        _ => Kind::Write("DDL or utility statement"),
    }
}

fn read_only_option(options: &[pg_query::protobuf::Node]) -> bool {
    let json = serde_json::to_value(options).unwrap_or(Value::Null);
    let mut read_only = false;
    visit(&json, &mut |key, v| {
        if key == "DefElem"
            && v.get("defname").and_then(Value::as_str) == Some("transaction_read_only")
        {
            read_only = v
                .pointer("/arg/node/AConst/val/Ival/ival")
                .and_then(Value::as_i64)
                == Some(1);
        }
    });
    read_only
}

/// A SELECT (or set operation, VALUES): read unless something inside can write or lock.
fn query_kind(node: &NodeEnum, functions: &FunctionCatalog) -> Kind {
    let json = match serde_json::to_value(node) {
        Ok(v) => v,
        Err(_) => return Kind::Write("the parse tree could not be inspected"),
    };
    let mut verdict = Kind::Read;
    visit(&json, &mut |key, v| {
        if verdict != Kind::Read {
            return;
        }
        match key {
            "LockingClause" => verdict = Kind::Write("SELECT … FOR UPDATE/SHARE"),
            "into_clause" if !v.is_null() => verdict = Kind::Write("SELECT INTO"),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                verdict = Kind::Write("data-modifying CTE")
            }
            "FuncCall" => {
                let name = function_name(v);
                let bare = name.last().map(|n| n.to_lowercase()).unwrap_or_default();
                if XID_ASSIGNING.contains(&bare.as_str()) {
                    verdict =
                        Kind::Write("calls a function that writes or assigns a transaction id");
                } else if !functions.is_safe(&name) {
                    verdict =
                        Kind::MayWrite("calls a function that may write (volatile or unknown)");
                }
            }
            _ => {}
        }
    });
    verdict
}

fn visit(v: &Value, f: &mut impl FnMut(&str, &Value)) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                f(k, child);
                visit(child, f);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| visit(i, f)),
        _ => {}
    }
}

/// Routing hints and the critical flag from comments (`/* dbopt:replica */`, `-- dbopt:primary`),
/// found by PostgreSQL's scanner: only real comments count, never text in a string or identifier.
pub fn hints(sql: &str) -> (Option<Hint>, bool) {
    let mut hint = None;
    let mut critical = false;
    for text in dbopt_comments(sql) {
        let words = text.split(|c: char| c.is_whitespace() || matches!(c, ',' | '*' | '/' | '-'));
        for word in words {
            match word {
                "dbopt:primary" => hint = Some(Hint::Primary),
                "dbopt:replica" if hint.is_none() => hint = Some(Hint::Replica),
                "dbopt:critical" => critical = true,
                _ => {}
            }
        }
    }
    (hint, critical)
}

/// The comments of `sql` that mention `dbopt:`, as PostgreSQL's scanner finds them (never text in
/// a string or an identifier). Empty when the text does not scan.
pub fn dbopt_comments(sql: &str) -> Vec<&str> {
    comments_mentioning(sql, "dbopt:")
}

/// The comments of `sql` that contain `needle`, as PostgreSQL's scanner finds them (never text in
/// a string or an identifier). Empty when the text does not scan.
pub fn comments_mentioning<'a>(sql: &'a str, needle: &str) -> Vec<&'a str> {
    if !sql.contains(needle) {
        return Vec::new();
    }
    let Ok(scanned) = pg_query::scan(sql) else {
        // Unterminated comment or string, NUL byte: no hints (the statement fails anyway).
        return Vec::new();
    };
    let comment = |t: i32| {
        t == pg_query::protobuf::Token::SqlComment as i32
            || t == pg_query::protobuf::Token::CComment as i32
    };
    scanned
        .tokens
        .iter()
        .filter(|t| comment(t.token))
        .filter_map(|t| sql.get(t.start as usize..t.end as usize))
        .filter(|text| text.contains(needle))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "classify_tests.rs"]
mod tests;
