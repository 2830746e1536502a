//! `dbopt.index_advice()`: missing indexes, from the plans of captured slow queries.
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
use crate::{read_spi, shmem};

#[derive(Clone)]
struct Candidate {
    columns: Columns,
    filters: Vec<String>,
    queryids: Vec<i64>,
    /// A statement text to verify the candidate with (normalised, `$n` parameters).
    query: String,
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

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
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
        if r.dbid == db {
            plans.push((r.queryid, r.plan.get(), r.text.get()));
        }
    });
    let min_rows = gucs::advisor_min_rows() as f64;
    let mut candidates: BTreeMap<(String, String, Vec<String>), Candidate> = BTreeMap::new();
    let mut tables: BTreeMap<(String, String), Option<(f64, IndexColumns)>> = BTreeMap::new();
    for (queryid, plan, text) in plans {
        let Ok(plan) = serde_json::from_str::<serde_json::Value>(&plan) else {
            continue;
        };
        for scan in seq_scans(&plan) {
            let Some(columns) = filter_columns(&scan.filter) else {
                continue;
            };
            let tkey = (scan.schema.clone(), scan.table.clone());
            if !tables.contains_key(&tkey) {
                tables.insert(tkey.clone(), table_info(&scan.schema, &scan.table)?);
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
    let hypopg = read_spi::one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hypopg')",
        &[],
    )?
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
            // Most selective range column first, as the planner estimates each condition.
            let qualified = format!("{}.{}", quote(&schema), quote(&table));
            let mut estimates = Vec::new();
            for cond in &c.columns.range_conditions {
                estimates.push(
                    read_spi::one::<f64>(
                        "SELECT dbopt._estimated_rows($1, $2)",
                        &[qualified.as_str().into(), cond.as_str().into()],
                    )?
                    .unwrap_or(f64::MAX),
                );
            }
            c.columns.rank_ranges(&estimates);
        }
        let (mut before, mut after) = (None, None);
        if hypopg {
            // Ask the planner about each possible range column; keep the cheapest plan.
            let mut best: Option<(Columns, f64, f64)> = None;
            for variant in c.columns.variants() {
                let hypothetical = create_statement(&schema, &table, &variant.ordered())
                    .replace(" CONCURRENTLY", "");
                let (b, a) = read_spi::two::<f64, f64>(
                    "SELECT cost_before, cost_after FROM dbopt._hypothetical_costs($1, $2, $3)",
                    &[
                        c.query.as_str().into(),
                        (highest_parameter(&c.query) as i32).into(),
                        hypothetical.as_str().into(),
                    ],
                )?;
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
