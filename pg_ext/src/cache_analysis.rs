//! `dbopt.cache_analysis(query, param_types)`: may the result of this statement be cached, and which
//! tables does it read? Answered by PostgreSQL's own parser, rewriter and planner, as the calling
//! role with its search_path — the router asks once per statement shape on the client's own server
//! connection, and tags each cached result with the tables listed here.
//!
//! Cacheable means: exactly one plain SELECT (after rules), no `FOR UPDATE/SHARE`, no data-modifying
//! WITH, no function whose result may change between statements (volatile *or* stable: `now()`,
//! `current_date` and catalog lookups are stable), no user-defined function at all (what a function
//! body reads is invisible to the planner's list), and only ordinary tables, partitioned tables,
//! materialized views and views — no foreign or temporary tables, sequences or system catalogs.
//! The relations include views and, for partitions, their ancestors: a write to a partition is
//! announced with its ancestors too (see [`crate::invalidate`]), so both sides meet.

use std::ffi::{CStr, CString};
use std::ptr;

use pgrx::prelude::*;

use crate::invalidate::{oids, pointers, with_ancestors};

type Verdict = (bool, Option<String>, Vec<i64>, Vec<String>);

fn refuse(reason: &str) -> Verdict {
    (false, Some(reason.to_string()), Vec::new(), Vec::new())
}

/// One row: `cacheable`, `reason` (why not; NULL when cacheable), `relations` (OIDs read, with
/// partitions' ancestors) and `relation_names` (`schema.table` of the relations the plan names).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn cache_analysis(
    query: &str,
    param_types: default!(Vec<pg_sys::Oid>, "'{}'"),
) -> TableIterator<
    'static,
    (
        name!(cacheable, bool),
        name!(reason, Option<String>),
        name!(relations, Vec<i64>),
        name!(relation_names, Vec<String>),
    ),
> {
    TableIterator::once(analyse(query, &param_types))
}

fn analyse(query: &str, param_types: &[pg_sys::Oid]) -> Verdict {
    let Ok(text) = CString::new(query) else {
        return refuse("the text contains a NUL byte");
    };
    // SAFETY: PostgreSQL's own parse/analyse/plan entry points on a NUL-terminated string, in the
    // function's memory context; their errors (syntax, unknown table, undeterminable parameter
    // type) are raised to the caller as they would be for the statement itself. The lists returned
    // are read only here.
    unsafe {
        let raw = pg_sys::pg_parse_query(text.as_ptr());
        let raws: Vec<_> = pointers(raw).collect();
        let [raw_stmt] = raws.as_slice() else {
            return refuse("not exactly one statement");
        };
        let mut count = param_types.len() as std::ffi::c_int;
        let mut types: *mut pg_sys::Oid = ptr::null_mut();
        if !param_types.is_empty() {
            types = pg_sys::palloc0(std::mem::size_of_val(param_types)).cast();
            ptr::copy_nonoverlapping(param_types.as_ptr(), types, param_types.len());
        }
        let queries = pg_sys::pg_analyze_and_rewrite_varparams(
            raw_stmt.cast(),
            text.as_ptr(),
            &mut types,
            &mut count,
            ptr::null_mut(),
        );
        let queries: Vec<_> = pointers(queries)
            .map(|q| q.cast::<pg_sys::Query>())
            .collect();
        let [q] = queries.as_slice() else {
            return refuse("rules rewrite it into several statements");
        };
        let q = *q;
        if (*q).commandType != pg_sys::CmdType::CMD_SELECT || !(*q).utilityStmt.is_null() {
            return refuse("not a SELECT");
        }
        if !(*q).rowMarks.is_null() {
            return refuse("FOR UPDATE/SHARE locks rows");
        }
        if (*q).hasModifyingCTE {
            return refuse("a WITH clause modifies data");
        }
        if pg_sys::contain_mutable_functions(q.cast()) {
            return refuse(
                "calls a function whose result can change between statements (volatile or stable, e.g. now())",
            );
        }
        let plan = pg_sys::pg_plan_query(
            q,
            text.as_ptr(),
            pg_sys::CURSOR_OPT_PARALLEL_OK as i32,
            ptr::null_mut(),
        );
        if plan.is_null() {
            return refuse("no plan");
        }
        for item in pointers((*plan).invalItems).map(|i| i.cast::<pg_sys::PlanInvalItem>()) {
            if !item.is_null()
                && (*item).cacheId == pg_sys::SysCacheIdentifier::PROCOID as std::ffi::c_int
            {
                return refuse("calls a user-defined function (what it reads is not visible)");
            }
        }
        let mut relations = Vec::new();
        let mut names = Vec::new();
        for oid in oids((*plan).relationOids) {
            if u32::from(oid) < pg_sys::FirstNormalObjectId {
                return refuse("reads a system catalog");
            }
            if pg_sys::get_rel_persistence(oid) as u8 == pg_sys::RELPERSISTENCE_TEMP {
                return refuse("reads a temporary table");
            }
            match pg_sys::get_rel_relkind(oid) as u8 {
                pg_sys::RELKIND_RELATION
                | pg_sys::RELKIND_PARTITIONED_TABLE
                | pg_sys::RELKIND_MATVIEW
                | pg_sys::RELKIND_VIEW => {}
                pg_sys::RELKIND_FOREIGN_TABLE => {
                    return refuse("reads a foreign table (its writes are not announced)")
                }
                _ => return refuse("reads a sequence or another kind of relation"),
            }
            relations.extend(with_ancestors(oid).into_iter().map(i64::from));
            let name = pg_sys::get_rel_name(oid);
            let schema = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(oid));
            if !name.is_null() && !schema.is_null() {
                names.push(format!(
                    "{}.{}",
                    CStr::from_ptr(schema).to_string_lossy(),
                    CStr::from_ptr(name).to_string_lossy()
                ));
            }
        }
        relations.sort_unstable();
        relations.dedup();
        names.sort_unstable();
        names.dedup();
        (true, None, relations, names)
    }
}
