//! A catalog snapshot: the user's schemas as a [`Schema`], read inside whatever transaction the
//! caller holds (a migration's own, so that before, after and rollback see one consistent state).
//! System schemas, objects that belong to extensions, and dbopt-migrate's own schema are left out.

use std::collections::BTreeMap;

use dbopt_schemadiff::model::{
    Column, ColumnNumber, Constraint, Enum, Function, FunctionKey, Grant, Schema, Sequence, Table,
    View,
};
use dbopt_schemadiff::QName;
use postgres::GenericClient;

/// dbopt-migrate's own schema (history, data kept aside): never part of a snapshot.
pub const OWN_SCHEMA: &str = "dbopt_migrate";

/// `n` is a user schema (not a system one, not dbopt-migrate's, not an extension's).
const USER_NAMESPACE: &str = "n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' \
     AND n.nspname <> 'dbopt_migrate' AND NOT EXISTS (SELECT 1 FROM pg_depend e \
     WHERE e.classid = 'pg_namespace'::regclass AND e.objid = n.oid AND e.deptype = 'e')";

/// The object `o` of catalog `cat` does not belong to an extension.
fn not_extension(cat: &str, o: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = '{cat}'::regclass \
         AND e.objid = {o} AND e.deptype = 'e')"
    )
}

pub fn snapshot(c: &mut impl GenericClient) -> Result<Schema, postgres::Error> {
    let mut s = Schema::default();
    for r in c.query(
        &format!("SELECT n.nspname::text, obj_description(n.oid, 'pg_namespace') FROM pg_namespace n WHERE {USER_NAMESPACE}"),
        &[],
    )? {
        s.namespaces.insert(r.get(0), r.get(1));
    }

    // Tables (plain and partitioned), views.
    let mut by_oid: BTreeMap<u32, QName> = BTreeMap::new();
    for r in c.query(
        &format!(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, obj_description(c.oid, 'pg_class'), \
                    CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p', 'v', 'm') AND {USER_NAMESPACE} AND {}",
            not_extension("pg_class", "c.oid")
        ),
        &[],
    )? {
        let oid: u32 = r.get(0);
        let name = QName::new(r.get(1), r.get(2));
        let kind: String = r.get(3);
        let comment: Option<String> = r.get(4);
        if kind == "v" || kind == "m" {
            s.views.insert(
                name,
                View {
                    materialized: kind == "m",
                    definition: r.get::<_, Option<String>>(5).unwrap_or_default(),
                    comment,
                    order: u64::from(oid),
                },
            );
        } else {
            s.tables.insert(
                name.clone(),
                Table {
                    comment,
                    ..Table::default()
                },
            );
            by_oid.insert(oid, name);
        }
    }
    let oids: Vec<u32> = by_oid.keys().copied().collect();
    fn table<'a>(
        s: &'a mut Schema,
        by_oid: &BTreeMap<u32, QName>,
        oid: u32,
    ) -> Option<&'a mut Table> {
        by_oid.get(&oid).and_then(|n| s.tables.get_mut(n))
    }

    for r in c.query(
        "SELECT a.attrelid, a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                pg_get_expr(d.adbin, d.adrelid), nullif(a.attidentity::text, ''), \
                col_description(a.attrelid, a.attnum), a.attnum \
         FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attrelid, a.attnum",
        &[&oids],
    )? {
        if let Some(t) = table(&mut s, &by_oid, r.get(0)) {
            let identity: Option<String> = r.get(5);
            t.columns.push(Column {
                name: r.get(1),
                type_sql: r.get(2),
                not_null: r.get(3),
                default: r.get(4),
                identity: identity.and_then(|i| i.chars().next()),
                comment: r.get(6),
                number: ColumnNumber(r.get(7)),
            });
        }
    }
    for r in c.query(
        "SELECT conrelid, conname::text, contype::text, pg_get_constraintdef(oid) \
         FROM pg_constraint WHERE conrelid = ANY($1)",
        &[&oids],
    )? {
        if let Some(t) = table(&mut s, &by_oid, r.get(0)) {
            let kind: String = r.get(2);
            t.constraints.insert(
                r.get(1),
                Constraint {
                    kind: kind.chars().next().unwrap_or('?'),
                    definition: r.get(3),
                },
            );
        }
    }
    for r in c.query(
        "SELECT i.indrelid, c.relname::text, pg_get_indexdef(i.indexrelid) \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = ANY($1) AND NOT EXISTS (SELECT 1 FROM pg_constraint k \
             WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid AND k.contype IN ('p', 'u', 'x'))",
        &[&oids],
    )? {
        if let Some(t) = table(&mut s, &by_oid, r.get(0)) {
            t.indexes.insert(r.get(1), r.get(2));
        }
    }
    for r in c.query(
        "SELECT tgrelid, tgname::text, pg_get_triggerdef(oid) FROM pg_trigger \
         WHERE tgrelid = ANY($1) AND NOT tgisinternal",
        &[&oids],
    )? {
        if let Some(t) = table(&mut s, &by_oid, r.get(0)) {
            t.triggers.insert(r.get(1), r.get(2));
        }
    }
    for r in c.query(
        "SELECT c.oid, coalesce(g.rolname::text, 'PUBLIC'), a.privilege_type \
         FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a \
         LEFT JOIN pg_roles g ON g.oid = a.grantee \
         WHERE c.oid = ANY($1) AND a.grantee <> c.relowner",
        &[&oids],
    )? {
        if let Some(t) = table(&mut s, &by_oid, r.get(0)) {
            t.grants.insert(Grant {
                grantee: r.get(1),
                privilege: r.get(2),
            });
        }
    }

    // Sequences (identity columns' own sequences are part of their column).
    for r in c.query(
        &format!(
            "SELECT n.nspname::text, c.relname::text, format_type(q.seqtypid, NULL), q.seqstart, q.seqincrement, \
                    q.seqmin, q.seqmax, q.seqcache, q.seqcycle, tn.nspname::text, t.relname::text, a.attname::text \
             FROM pg_sequence q JOIN pg_class c ON c.oid = q.seqrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid \
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
             LEFT JOIN pg_class t ON t.oid = d.refobjid \
             LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace \
             LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
             WHERE {USER_NAMESPACE} AND {} AND coalesce(d.deptype, 'a') <> 'i'",
            not_extension("pg_class", "c.oid")
        ),
        &[],
    )? {
        let owner: Option<String> = r.get(9);
        s.sequences.insert(
            QName::new(r.get(0), r.get(1)),
            Sequence {
                type_sql: r.get(2),
                start: r.get(3),
                increment: r.get(4),
                min: r.get(5),
                max: r.get(6),
                cache: r.get(7),
                cycle: r.get(8),
                owned_by: owner.map(|n| (QName::new(&n, r.get(10)), r.get(11))),
            },
        );
    }

    for r in c.query(
        &format!(
            "SELECT n.nspname::text, p.proname::text, pg_get_function_identity_arguments(p.oid), \
                    pg_get_functiondef(p.oid), p.prokind = 'p', obj_description(p.oid, 'pg_proc') \
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.prokind IN ('f', 'p') AND {USER_NAMESPACE} AND {}",
            not_extension("pg_proc", "p.oid")
        ),
        &[],
    )? {
        s.functions.insert(
            FunctionKey {
                name: QName::new(r.get(0), r.get(1)),
                args: r.get(2),
            },
            Function {
                definition: r.get(3),
                procedure: r.get(4),
                comment: r.get(5),
            },
        );
    }

    for r in c.query(
        &format!(
            "SELECT n.nspname::text, t.typname::text, array_agg(e.enumlabel::text ORDER BY e.enumsortorder) \
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
             JOIN pg_enum e ON e.enumtypid = t.oid \
             WHERE {USER_NAMESPACE} AND {} GROUP BY 1, 2",
            not_extension("pg_type", "t.oid")
        ),
        &[],
    )? {
        s.enums.insert(
            QName::new(r.get(0), r.get(1)),
            Enum { labels: r.get(2) },
        );
    }
    Ok(s)
}
