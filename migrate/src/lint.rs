//! What a migration does to a live table, from PostgreSQL's own parse tree (pure): statements that
//! rewrite a table or hold a long lock on it, with the reason and the safer way. Tables the same
//! migration creates are exempt (nobody uses them yet); index builds and constraint validations
//! are flagged on tables at least `big_rows` large (estimates from the database, when known).

use std::collections::{HashMap, HashSet};

use pg_query::protobuf::{AlterTableType, ConstrType};
use pg_query::NodeEnum;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// 1-based statement number in the file.
    pub statement: usize,
    pub rule: &'static str,
    pub table: String,
    pub reason: String,
}

/// Functions whose result differs per row: a column default calling one makes ADD COLUMN
/// rewrite the table.
const VOLATILE: &[&str] = &[
    "random",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v4",
    "nextval",
    "txid_current",
    "statement_timestamp",
    "setseed",
];

/// `rows`: estimated rows per table (`schema.table` or `table`); a table it does not list counts
/// as big (the lint cannot tell).
pub fn lint(sql: &str, rows: &HashMap<String, f64>, big_rows: f64) -> Result<Vec<Finding>, String> {
    let parsed = pg_query::parse(sql).map_err(|e| e.to_string())?;
    let mut created: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    let big = |t: &str| rows.get(t).is_none_or(|r| *r >= big_rows);
    for (i, raw) in parsed.protobuf.stmts.iter().enumerate() {
        let n = i + 1;
        let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        match node {
            NodeEnum::CreateStmt(c) => {
                if let Some(r) = &c.relation {
                    created.insert(name_of(&r.schemaname, &r.relname));
                }
            }
            NodeEnum::IndexStmt(ix) => {
                let Some(r) = &ix.relation else { continue };
                let t = name_of(&r.schemaname, &r.relname);
                if !ix.concurrent && !created.contains(&t) && big(&t) {
                    out.push(Finding {
                        statement: n,
                        rule: "index-without-concurrently",
                        table: t.clone(),
                        reason: format!(
                            "CREATE INDEX blocks writes to {t} for the whole build: use CREATE INDEX \
                             CONCURRENTLY in a migration marked {}",
                            crate::files::NO_TRANSACTION
                        ),
                    });
                }
            }
            NodeEnum::AlterTableStmt(a) => {
                let Some(r) = &a.relation else { continue };
                let t = name_of(&r.schemaname, &r.relname);
                if created.contains(&t) {
                    continue;
                }
                for cmd in &a.cmds {
                    let Some(NodeEnum::AlterTableCmd(c)) = cmd.node.as_ref() else {
                        continue;
                    };
                    alter(&mut out, n, &t, c, big(&t));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn alter(
    out: &mut Vec<Finding>,
    n: usize,
    t: &str,
    c: &pg_query::protobuf::AlterTableCmd,
    big: bool,
) {
    let mut push = |rule: &'static str, reason: String| {
        out.push(Finding {
            statement: n,
            rule,
            table: t.to_string(),
            reason,
        })
    };
    match c.subtype() {
        AlterTableType::AtAddColumn => {
            let Some(NodeEnum::ColumnDef(col)) = c.def.as_ref().and_then(|d| d.node.as_ref()) else { return };
            let serial = col
                .type_name
                .as_ref()
                .and_then(|tn| tn.names.last())
                .and_then(|x| match x.node.as_ref() {
                    Some(NodeEnum::String(s)) => Some(s.sval.to_ascii_lowercase()),
                    _ => None,
                })
                .is_some_and(|s| s.ends_with("serial") || s.starts_with("serial"));
            let mut rewrites = serial;
            for k in &col.constraints {
                let Some(NodeEnum::Constraint(k)) = k.node.as_ref() else { continue };
                rewrites |= match k.contype() {
                    ConstrType::ConstrDefault => k.raw_expr.as_ref().is_some_and(|e| calls_volatile(e)),
                    ConstrType::ConstrIdentity | ConstrType::ConstrGenerated => true,
                    _ => false,
                };
            }
            if rewrites {
                push(
                    "add-column-rewrite",
                    format!(
                        "adding {} with a volatile default, an identity or a stored generated value rewrites \
                         all of {t} under an ACCESS EXCLUSIVE lock: add it without a default, fill it in \
                         batches, then set the default",
                        col.colname
                    ),
                );
            }
        }
        AlterTableType::AtSetNotNull => push(
            "set-not-null",
            format!(
                "SET NOT NULL on {}.{} scans the whole table under an ACCESS EXCLUSIVE lock: add CHECK ({} IS \
                 NOT NULL) NOT VALID, VALIDATE CONSTRAINT, then SET NOT NULL (no scan then)",
                t, c.name, c.name
            ),
        ),
        AlterTableType::AtAlterColumnType => push(
            "column-type-change",
            format!(
                "changing the type of {}.{} rewrites the table and its indexes under an ACCESS EXCLUSIVE \
                 lock unless the types are binary-compatible (varchar(n) → text, a larger varchar)",
                t, c.name
            ),
        ),
        AlterTableType::AtAddConstraint => {
            let Some(NodeEnum::Constraint(k)) = c.def.as_ref().and_then(|d| d.node.as_ref()) else { return };
            let validates = matches!(k.contype(), ConstrType::ConstrForeign | ConstrType::ConstrCheck);
            if validates && !k.skip_validation && big {
                push(
                    "constraint-validation",
                    format!(
                        "adding {} checks every row of {t} while holding its lock: add it NOT VALID, then \
                         ALTER TABLE … VALIDATE CONSTRAINT in a later migration (only a SHARE UPDATE \
                         EXCLUSIVE lock)",
                        if k.contype() == ConstrType::ConstrForeign { "a foreign key" } else { "a check" }
                    ),
                );
            }
            if matches!(k.contype(), ConstrType::ConstrPrimary | ConstrType::ConstrUnique)
                && k.indexname.is_empty()
                && big
            {
                push(
                    "constraint-index-build",
                    format!(
                        "adding a primary key or unique constraint builds its index while writes to {t} \
                         wait: build a unique index CONCURRENTLY first, then ADD CONSTRAINT … USING INDEX"
                    ),
                );
            }
        }
        _ => {}
    }
}

/// Whether an expression calls one of the volatile functions.
fn calls_volatile(e: &pg_query::protobuf::Node) -> bool {
    let text = format!("{e:?}");
    // The debug form holds every function name as `sval: "name"` inside FuncCall nodes.
    text.contains("FuncCall")
        && VOLATILE
            .iter()
            .any(|f| text.contains(&format!("sval: \"{f}\"")))
}

fn name_of(schema: &str, rel: &str) -> String {
    if schema.is_empty() {
        rel.to_string()
    } else {
        format!("{schema}.{rel}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rules(sql: &str, rows: &[(&str, f64)]) -> Vec<(usize, &'static str)> {
        let rows: HashMap<String, f64> = rows.iter().map(|(t, r)| ((*t).to_string(), *r)).collect();
        lint(sql, &rows, 100_000.0)
            .unwrap()
            .into_iter()
            .map(|f| (f.statement, f.rule))
            .collect()
    }

    #[test]
    fn long_locks_and_rewrites_are_flagged_with_the_statement() {
        let sql = "ALTER TABLE users ADD COLUMN token uuid DEFAULT gen_random_uuid();
                   ALTER TABLE users ADD COLUMN created timestamptz DEFAULT now();
                   ALTER TABLE users ALTER COLUMN email SET NOT NULL;
                   ALTER TABLE users ALTER COLUMN age TYPE bigint;
                   CREATE INDEX users_email ON users (email);
                   CREATE INDEX CONCURRENTLY users_age ON users (age);
                   ALTER TABLE orders ADD CONSTRAINT o_fk FOREIGN KEY (user_id) REFERENCES users (id);
                   ALTER TABLE orders ADD CONSTRAINT o_fk2 FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID;
                   ALTER TABLE users ADD COLUMN n bigserial;";
        assert_eq!(
            rules(sql, &[]),
            [
                (1, "add-column-rewrite"),
                (3, "set-not-null"),
                (4, "column-type-change"),
                (5, "index-without-concurrently"),
                (7, "constraint-validation"),
                (9, "add-column-rewrite"),
            ]
        );
    }

    #[test]
    fn new_and_small_tables_are_exempt() {
        let sql = "CREATE TABLE t (id int);
                   ALTER TABLE t ALTER COLUMN id SET NOT NULL;
                   CREATE INDEX t_id ON t (id);
                   CREATE INDEX small_x ON small (x);
                   ALTER TABLE small ADD CONSTRAINT c CHECK (x > 0);";
        assert!(rules(sql, &[("small", 10.0)]).is_empty());
        assert_eq!(
            rules("CREATE INDEX ON big (x)", &[("big", 5e6)]),
            [(1, "index-without-concurrently")]
        );
        assert!(lint("CREATE TABL x", &HashMap::new(), 1.0)
            .unwrap_err()
            .contains("syntax error"));
    }
}
