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
//! Each filtered sequential scan on a table of at least `dbopt.advisor_min_rows` rows becomes a
//! candidate index (equality columns first, then one range column), unless an existing valid,
//! non-partial index already serves it. With hypopg installed in the database, each candidate is
//! checked with a hypothetical index: the statement's generic-plan cost before and after; a
//! candidate the planner would not use is dropped. Candidates are ranked by estimated time saved:
//! the affected statements' total execution time × the scan's share of their plan cost (× the
//! cost reduction, when hypopg measured it).

use std::collections::BTreeMap;

use dbopt_querystats::advice::{
    consolidate, covered, create_statement, filter_columns, seq_scans, Columns,
};
use dbopt_querystats::normalize::highest_parameter;
use pgrx::prelude::*;

use crate::gucs;
use crate::privilege::{may_see, role_name};
use crate::{read_spi, shmem};

#[derive(Clone)]
struct Candidate {
    columns: Columns,
    filters: Vec<String>,
    queryids: Vec<i64>,
    /// A statement text to verify the candidate with (normalised, `$n` parameters).
    query: String,
    /// The role that ran it (verification plans it as that role).
    owner: u32,
    scans: i64,
    rows_removed: f64,
    rows_returned: f64,
    cost_share: f64,
}

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

/// Rows per distinct value of a column, from `pg_stats` (lower: more selective); `f64::MAX` when
/// the column has no statistics.
fn rows_per_value(schema: &str, table: &str, column: &str) -> f64 {
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
    .unwrap_or(f64::MAX)
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
    let min_rows = gucs::advisor_min_rows() as f64;
    let mut candidates: BTreeMap<(String, String, Vec<String>), Candidate> = BTreeMap::new();
    let mut tables: BTreeMap<(String, String), Option<(f64, IndexColumns)>> = BTreeMap::new();
    for (queryid, plan, text, owner) in plans {
        let Ok(plan) = serde_json::from_str::<serde_json::Value>(&plan) else {
            continue;
        };
        for scan in seq_scans(&plan) {
            let Some(columns) = filter_columns(&scan.filter) else {
                continue;
            };
            let tkey = (scan.schema.clone(), scan.table.clone());
            if !tables.contains_key(&tkey) {
                // A table that cannot be looked up costs its own advice only.
                let info = table_info(&scan.schema, &scan.table).ok().flatten();
                tables.insert(tkey.clone(), info);
            }
            let Some((rows, indexes)) = tables.get(&tkey).and_then(Option::as_ref) else {
                continue;
            };
            // Covered when an existing index serves any choice of range column.
            if *rows < min_rows || columns.variants().iter().any(|v| covered(v, indexes)) {
                continue;
            }
            // Selective: the filter keeps at most half the rows.
            let kept = match scan.rows_removed {
                Some(removed) => scan.rows_returned / (scan.rows_returned + removed).max(1.0),
                None => scan.rows_returned / rows.max(1.0),
            };
            if kept > 0.5 {
                continue;
            }
            let key = (scan.schema.clone(), scan.table.clone(), columns.ordered());
            let c = candidates.entry(key).or_insert_with(|| Candidate {
                columns: columns.clone(),
                filters: Vec::new(),
                queryids: Vec::new(),
                query: text.clone(),
                owner,
                scans: 0,
                rows_removed: 0.0,
                rows_returned: 0.0,
                cost_share: 0.0,
            });
            if !c.filters.contains(&scan.filter) {
                c.filters.push(scan.filter.clone());
            }
            if !c.queryids.contains(&queryid) {
                c.queryids.push(queryid);
            }
            c.scans += 1;
            c.rows_removed += scan.rows_removed.unwrap_or(0.0);
            c.rows_returned += scan.rows_returned;
            c.cost_share = c.cost_share.max(scan.cost_share);
        }
    }

    let totals: BTreeMap<i64, f64> = shmem::snapshot()
        .into_iter()
        .filter(|s| s.key.dbid == db)
        .fold(BTreeMap::new(), |mut m, s| {
            *m.entry(s.key.queryid).or_insert(0.0) += s.counters.exec.total_ms;
            m
        });
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

    // One index for candidates it can serve together (e.g. (a) and (b, a) → (a, b)).
    let mut by_table: BTreeMap<(String, String), Vec<Candidate>> = BTreeMap::new();
    for ((schema, table, _), c) in candidates {
        by_table.entry((schema, table)).or_default().push(c);
    }
    let mut merged = Vec::new();
    for ((schema, table), cands) in by_table {
        let columns: Vec<Columns> = cands.iter().map(|c| c.columns.clone()).collect();
        for (cols, served) in consolidate(&columns) {
            let mut host = Candidate {
                columns: cols,
                ..cands[served[0]].clone()
            };
            for &i in &served[1..] {
                let other = &cands[i];
                for f in &other.filters {
                    if !host.filters.contains(f) {
                        host.filters.push(f.clone());
                    }
                }
                for q in &other.queryids {
                    if !host.queryids.contains(q) {
                        host.queryids.push(*q);
                    }
                }
                host.scans += other.scans;
                host.rows_removed += other.rows_removed;
                host.rows_returned += other.rows_returned;
                host.cost_share = host.cost_share.max(other.cost_share);
            }
            merged.push((schema.clone(), table.clone(), host));
        }
    }

    let mut rows = Vec::new();
    for (schema, table, mut c) in merged {
        if c.columns.range_options.len() > 1 {
            // Most selective range column first, by rows per distinct value in pg_stats (the
            // conditions' text is never run: a catalog lookup with names as parameters).
            let estimates: Vec<f64> = c
                .columns
                .range_options
                .iter()
                .map(|col| rows_per_value(&schema, &table, col))
                .collect();
            c.columns.rank_ranges(&estimates);
        }
        let (mut before, mut after) = (None, None);
        let owner_name = role_name(c.owner);
        if hypopg && may_act_as(c.owner) && single_plannable_statement(&c.query) {
            // Ask the planner about each possible range column; keep the cheapest plan.
            let mut best: Option<(Columns, f64, f64)> = None;
            for variant in c.columns.variants() {
                let hypothetical = create_statement(&schema, &table, &variant.ordered())
                    .replace(" CONCURRENTLY", "");
                let (b, a) = read_spi::two::<f64, f64>(
                    "SELECT cost_before, cost_after FROM dbopt._hypothetical_costs($1, $2, $3, $4)",
                    &[
                        c.query.as_str().into(),
                        (highest_parameter(&c.query) as i32).into(),
                        hypothetical.as_str().into(),
                        owner_name.as_str().into(),
                    ],
                )
                .unwrap_or((None, None));
                if let (Some(b), Some(a)) = (b, a) {
                    // Strictly cheaper only: on a tie the more selective range column (first) stays.
                    if best.as_ref().is_none_or(|(_, _, best_a)| a < *best_a) {
                        best = Some((variant, b, a));
                    }
                }
            }
            if let Some((variant, b, a)) = best {
                if a >= b {
                    continue; // the planner would not use it: not worth recommending
                }
                c.columns = variant;
                (before, after) = (Some(b), Some(a));
            }
        }
        let ordered = c.columns.ordered();
        let statement = create_statement(&schema, &table, &ordered);
        let verified = before.is_some() && after.is_some();
        let gain = match (before, after) {
            (Some(b), Some(a)) if b > 0.0 => (b - a) / b,
            _ => 1.0,
        };
        let time: f64 = c.queryids.iter().filter_map(|q| totals.get(q)).sum();
        let saved = time * c.cost_share * gain;
        let removed = if c.rows_removed > 0.0 {
            format!(
                "{:.0} rows removed by the filter, {:.0} returned",
                c.rows_removed, c.rows_returned
            )
        } else {
            format!("about {:.0} rows returned (estimated)", c.rows_returned)
        };
        let reason = format!(
            "{} sequential scan(s) of {schema}.{table} ({:.0} rows) filtered by {}: {removed}; equality columns {:?} first{}",
            c.scans,
            tables.get(&(schema.clone(), table.clone())).and_then(Option::as_ref).map_or(0.0, |t| t.0),
            c.filters.join(", "),
            c.columns.equality,
            c.columns.range.as_ref().map(|r| format!(", then range column {r}")).unwrap_or_default(),
        );
        rows.push((
            format!("{schema}.{table}"),
            ordered,
            statement,
            reason,
            c.queryids,
            saved,
            before,
            after,
            verified,
        ));
    }
    rows.sort_by(|a, b| b.5.total_cmp(&a.5));
    Ok(TableIterator::new(rows))
}
