//! `dbopt.index_advice()`: missing indexes, from the plans of captured slow queries and of plans
//! sampled from the whole workload (`dbopt.plan_sample_every`), ranked by the time the statements
//! spent in total (`query_stats`).
//!
//! Safe to call as a DBA whatever other roles did: it reads only the captures the caller may see
//! (as `slow_queries()` shows them), builds no SQL from plan or query text (catalog lookups take
//! names as parameters; the hypothetical index is made of quoted identifiers), and plans a captured
//! statement for hypopg only as that statement's owner, only when PostgreSQL's parser reads its text
//! as exactly one SELECT/INSERT/UPDATE/DELETE. A candidate whose lookups fail is skipped; the
//! others are still advised.
//!
//! The policy (candidates, selectivity cut-off, merging, range order, ranking, reasons) lives in
//! `dbopt_querystats::advisor`, tested without a server; this file is its [`Catalog`] over SPI and
//! the SQL function around it.

use std::collections::HashMap;

use dbopt_querystats::advisor::{advise, Capture, Catalog, TableInfo};
use dbopt_querystats::normalize::highest_parameter;
use pgrx::prelude::*;

use crate::gucs;
use crate::privilege::{may_see, role_name};
use crate::{read_spi, shmem};

/// Columns of each usable index of a table, in order (`None` for an expression column).
type IndexColumns = Vec<Vec<Option<String>>>;

/// Table size (rows) and its usable indexes.
fn table_info(
    schema: &str,
    table: &str,
) -> Result<Option<(f64, IndexColumns)>, pgrx::spi::SpiError> {
    let (rows, indexes) = read_spi::two::<f64, String>(
        "SELECT c.reltuples::float8,
                coalesce((SELECT json_agg(s.cols)::text FROM (
                    SELECT array_agg(a.attname::text ORDER BY k.ord) AS cols
                    FROM pg_index i
                    CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                    LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                    WHERE i.indrelid = c.oid AND i.indisvalid AND i.indpred IS NULL
                    GROUP BY i.indexrelid) s), '[]')
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2",
        &[schema.into(), table.into()],
    )?;
    let Some(rows) = rows else { return Ok(None) };
    let indexes: IndexColumns =
        serde_json::from_str(&indexes.unwrap_or_default()).unwrap_or_default();
    Ok(Some((rows, indexes)))
}

/// Rows per distinct value of a column, from `pg_stats` (lower: more selective); `None` when the
/// column has no statistics.
fn rows_per_value(schema: &str, table: &str, column: &str) -> Option<f64> {
    read_spi::one::<f64>(
        "SELECT CASE WHEN s.n_distinct < 0 THEN 1.0 / -s.n_distinct
                     WHEN s.n_distinct > 0 THEN greatest(c.reltuples, 1) / s.n_distinct END
         FROM pg_catalog.pg_stats s
         JOIN pg_catalog.pg_namespace n ON n.nspname = s.schemaname
         JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = s.tablename
         WHERE s.schemaname = $1 AND s.tablename = $2 AND s.attname = $3",
        &[schema.into(), table.into(), column.into()],
    )
    .ok()
    .flatten()
}

/// Is `query` exactly one SELECT, INSERT, UPDATE or DELETE, as PostgreSQL's own parser reads it?
fn single_plannable_statement(query: &str) -> bool {
    let Ok(text) = std::ffi::CString::new(query) else {
        return false;
    };
    pgrx::PgTryBuilder::new(|| {
        // SAFETY: raw_parser only parses (no catalog access); the list it returns is palloc'd in
        // the current memory context; a syntax error is an ERROR, caught below.
        unsafe {
            let list = pg_sys::raw_parser(text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
            if list.is_null() || (*list).length != 1 {
                return false;
            }
            let raw = (*(*list).elements).ptr_value.cast::<pg_sys::RawStmt>();
            if raw.is_null() || (*raw).stmt.is_null() {
                return false;
            }
            matches!(
                (*(*raw).stmt).type_,
                pg_sys::NodeTag::T_SelectStmt
                    | pg_sys::NodeTag::T_InsertStmt
                    | pg_sys::NodeTag::T_UpdateStmt
                    | pg_sys::NodeTag::T_DeleteStmt
            )
        }
    })
    .catch_others(|_| false)
    .execute()
}

/// May the caller plan statements as `owner` (its own, a role it belongs to, or as superuser)?
fn may_act_as(owner: u32) -> bool {
    // SAFETY: privilege checks of the current user, no catalog writes.
    unsafe {
        let me = pg_sys::GetUserId();
        u32::from(me) == owner
            || pg_sys::superuser()
            || pg_sys::has_privs_of_role(me, pg_sys::Oid::from(owner))
    }
}

#[pg_extern(volatile)]
#[allow(clippy::type_complexity)]
fn index_advice() -> Result<
    TableIterator<
        'static,
        (
            name!(table_name, String),
            name!(columns, Vec<String>),
            name!(create_statement, String),
            name!(reason, String),
            name!(queryids, Vec<i64>),
            name!(estimated_saved_ms, f64),
            name!(cost_before, Option<f64>),
            name!(cost_after, Option<f64>),
            name!(verified_with_hypopg, bool),
        ),
    >,
    pgrx::spi::SpiError,
> {
    // SAFETY: a plain read of the current database's oid.
    let db = u32::from(unsafe { pg_sys::MyDatabaseId });
    // Copy the plans out first: no SPI while holding the ring's lock.
    let mut plans = Vec::new();
    shmem::each_slow(|r| {
        // Only what the caller may see in slow_queries() (other roles' literals stay hidden).
        if r.dbid == db && may_see(r.userid) {
            plans.push((r.queryid, r.plan.get(), r.text.get(), r.userid));
        }
    });
    // The whole workload: plans sampled from fast executions (dbopt.plan_sample_every), for
    // statements no slow capture covers — a 13 ms scan run on every request is found here.
    shmem::each_sample(|r| {
        if r.dbid == db && may_see(r.userid) && !plans.iter().any(|p| p.0 == r.queryid) {
            plans.push((r.queryid, r.plan.get(), r.text.get(), r.userid));
        }
    });
    let captures: Vec<Capture> = plans
        .into_iter()
        .filter_map(|(queryid, plan, text, owner)| {
            Some(Capture {
                queryid,
                plan: serde_json::from_str(&plan).ok()?,
                text,
                owner,
            })
        })
        .collect();
    let mut total_ms: HashMap<i64, f64> = HashMap::new();
    for s in shmem::snapshot().into_iter().filter(|s| s.key.dbid == db) {
        *total_ms.entry(s.key.queryid).or_insert(0.0) += s.counters.exec.total_ms;
    }
    // Verification needs hypopg and the right to run the (superuser-only by default) helper.
    let hypopg = read_spi::one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'hypopg')
            AND pg_catalog.has_function_privilege(
                'dbopt._hypothetical_costs(text, integer, text, name)', 'EXECUTE')",
        &[],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    let mut catalog = SpiCatalog { hypopg };
    let rows: Vec<_> = advise(
        &captures,
        &total_ms,
        gucs::advisor_min_rows() as f64,
        &mut catalog,
    )
    .into_iter()
    .map(|a| {
        (
            a.table_name,
            a.columns,
            a.create_statement,
            a.reason,
            a.queryids,
            a.estimated_saved_ms,
            a.cost_before,
            a.cost_after,
            a.verified,
        )
    })
    .collect();
    Ok(TableIterator::new(rows))
}

/// The advisor's view of this database, through SPI (names always as parameters).
struct SpiCatalog {
    hypopg: bool,
}

impl Catalog for SpiCatalog {
    fn table(&mut self, schema: &str, table: &str) -> Option<TableInfo> {
        // A table that cannot be looked up costs its own advice only.
        let (rows, indexes) = table_info(schema, table).ok().flatten()?;
        Some(TableInfo { rows, indexes })
    }

    fn rows_per_value(&mut self, schema: &str, table: &str, column: &str) -> Option<f64> {
        rows_per_value(schema, table, column)
    }

    fn hypothetical_costs(
        &mut self,
        capture: &Capture,
        schema: &str,
        table: &str,
        columns: &[String],
    ) -> Option<(f64, f64)> {
        if !self.hypopg || !may_act_as(capture.owner) || !single_plannable_statement(&capture.text)
        {
            return None;
        }
        let hypothetical = dbopt_querystats::advice::create_statement(schema, table, columns)
            .replace(" CONCURRENTLY", "");
        let (before, after) = read_spi::two::<f64, f64>(
            "SELECT cost_before, cost_after FROM dbopt._hypothetical_costs($1, $2, $3, $4)",
            &[
                capture.text.as_str().into(),
                (highest_parameter(&capture.text) as i32).into(),
                hypothetical.as_str().into(),
                role_name(capture.owner).as_str().into(),
            ],
        )
        .ok()?;
        Some((before?, after?))
    }
}
