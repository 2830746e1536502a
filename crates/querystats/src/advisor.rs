//! The index advisor's policy, with the database behind a small trait ([`Catalog`]): which scans
//! become candidates (table size, selectivity cut-off, existing indexes), how candidates on one
//! table merge into one index, which range column goes last, when a hypothetical index rejects a
//! candidate, the ranking by time saved, and the reason text. The extension implements
//! [`Catalog`] with SPI; the tests here implement it with a map.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::advice::{consolidate, covered, create_statement, filter_columns, seq_scans, Columns};

/// A filter keeping more than this share of a table's rows is not worth an index.
pub const MAX_KEPT_SHARE: f64 = 0.5;

/// A statement whose plan was captured (slow, or sampled from the workload).
#[derive(Debug, Clone)]
pub struct Capture {
    pub queryid: i64,
    /// EXPLAIN (FORMAT JSON) as dbopt stores it (with its `Relations` list).
    pub plan: Value,
    /// The normalised statement text (`$n` parameters).
    pub text: String,
    /// The role that ran it.
    pub owner: u32,
}

/// A table as the catalog describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableInfo {
    /// Estimated rows (`reltuples`).
    pub rows: f64,
    /// Columns of each usable (valid, non-partial) index, in order; `None` for an expression.
    pub indexes: Vec<Vec<Option<String>>>,
}

/// What the advisor asks of the database. Every method may fail for one table or statement; the
/// advisor then drops that candidate's verification or the candidate, never the whole answer.
pub trait Catalog {
    /// The table's size and indexes; `None` when it cannot be looked up.
    fn table(&mut self, schema: &str, table: &str) -> Option<TableInfo>;
    /// Rows per distinct value of a column (lower: more selective); `None` without statistics.
    fn rows_per_value(&mut self, schema: &str, table: &str, column: &str) -> Option<f64>;
    /// The statement's planner cost before and after a hypothetical index on `columns`; `None`
    /// when it cannot be verified (no hypopg, not allowed, not plannable).
    fn hypothetical_costs(
        &mut self,
        capture: &Capture,
        schema: &str,
        table: &str,
        columns: &[String],
    ) -> Option<(f64, f64)>;
}

/// One advised index.
#[derive(Debug, Clone, PartialEq)]
pub struct Advice {
    /// `schema.table`.
    pub table_name: String,
    pub columns: Vec<String>,
    pub create_statement: String,
    pub reason: String,
    pub queryids: Vec<i64>,
    /// Total time of the statements it serves × the scan's share of their plans × the cost
    /// reduction (1 when unverified).
    pub estimated_saved_ms: f64,
    pub cost_before: Option<f64>,
    pub cost_after: Option<f64>,
    pub verified: bool,
}

#[derive(Clone)]
struct Candidate {
    columns: Columns,
    filters: Vec<String>,
    queryids: Vec<i64>,
    /// The capture to verify with (the first one seen).
    capture: usize,
    scans: i64,
    rows_removed: f64,
    rows_returned: f64,
    cost_share: f64,
}

impl Candidate {
    fn absorb(&mut self, other: &Candidate) {
        for f in &other.filters {
            if !self.filters.contains(f) {
                self.filters.push(f.clone());
            }
        }
        for q in &other.queryids {
            if !self.queryids.contains(q) {
                self.queryids.push(*q);
            }
        }
        self.scans += other.scans;
        self.rows_removed += other.rows_removed;
        self.rows_returned += other.rows_returned;
        self.cost_share = self.cost_share.max(other.cost_share);
    }
}

/// Advice for `captures`, ranked by estimated time saved (most first). `total_ms` is each
/// statement's total execution time (from the statistics), `min_rows` the smallest table worth
/// an index.
pub fn advise(
    captures: &[Capture],
    total_ms: &HashMap<i64, f64>,
    min_rows: f64,
    catalog: &mut impl Catalog,
) -> Vec<Advice> {
    let mut candidates: BTreeMap<(String, String, Vec<String>), Candidate> = BTreeMap::new();
    let mut tables: BTreeMap<(String, String), Option<TableInfo>> = BTreeMap::new();
    for (ci, capture) in captures.iter().enumerate() {
        for scan in seq_scans(&capture.plan) {
            let Some(columns) = filter_columns(&scan.filter) else {
                continue;
            };
            let tkey = (scan.schema.clone(), scan.table.clone());
            let info = tables
                .entry(tkey)
                .or_insert_with(|| catalog.table(&scan.schema, &scan.table));
            let Some(info) = info.as_ref() else { continue };
            // Covered when an existing index serves any choice of range column.
            if info.rows < min_rows || columns.variants().iter().any(|v| covered(v, &info.indexes))
            {
                continue;
            }
            let kept = match scan.rows_removed {
                Some(removed) => scan.rows_returned / (scan.rows_returned + removed).max(1.0),
                None => scan.rows_returned / info.rows.max(1.0),
            };
            if kept > MAX_KEPT_SHARE {
                continue;
            }
            let key = (scan.schema.clone(), scan.table.clone(), columns.ordered());
            let c = candidates.entry(key).or_insert_with(|| Candidate {
                columns: columns.clone(),
                filters: Vec::new(),
                queryids: Vec::new(),
                capture: ci,
                scans: 0,
                rows_removed: 0.0,
                rows_returned: 0.0,
                cost_share: 0.0,
            });
            c.absorb(&Candidate {
                columns,
                filters: vec![scan.filter.clone()],
                queryids: vec![capture.queryid],
                capture: ci,
                scans: 1,
                rows_removed: scan.rows_removed.unwrap_or(0.0),
                rows_returned: scan.rows_returned,
                cost_share: scan.cost_share,
            });
        }
    }

    // One index for candidates it can serve together (e.g. (a) and (b, a) → (a, b)).
    let mut by_table: BTreeMap<(String, String), Vec<Candidate>> = BTreeMap::new();
    for ((schema, table, _), c) in candidates {
        by_table.entry((schema, table)).or_default().push(c);
    }
    let mut out = Vec::new();
    for ((schema, table), cands) in by_table {
        let columns: Vec<Columns> = cands.iter().map(|c| c.columns.clone()).collect();
        for (cols, served) in consolidate(&columns) {
            let mut host = Candidate {
                columns: cols,
                ..cands[served[0]].clone()
            };
            for &i in &served[1..] {
                host.absorb(&cands[i]);
            }
            let rows = tables
                .get(&(schema.clone(), table.clone()))
                .and_then(Option::as_ref)
                .map_or(0.0, |t| t.rows);
            if let Some(a) = finish(&schema, &table, rows, host, captures, total_ms, catalog) {
                out.push(a);
            }
        }
    }
    out.sort_by(|a, b| b.estimated_saved_ms.total_cmp(&a.estimated_saved_ms));
    out
}

/// Orders the range columns, verifies, ranks and explains one candidate; `None` when the planner
/// would not use the index.
fn finish(
    schema: &str,
    table: &str,
    table_rows: f64,
    mut c: Candidate,
    captures: &[Capture],
    total_ms: &HashMap<i64, f64>,
    catalog: &mut impl Catalog,
) -> Option<Advice> {
    if c.columns.range_options.len() > 1 {
        // Most selective range column first: fewest rows per distinct value.
        let estimates: Vec<f64> = c
            .columns
            .range_options
            .iter()
            .map(|col| {
                catalog
                    .rows_per_value(schema, table, col)
                    .unwrap_or(f64::MAX)
            })
            .collect();
        c.columns.rank_ranges(&estimates);
    }
    // Ask the planner about each possible range column; keep the cheapest plan. Strictly
    // cheaper only: on a tie the more selective range column (first) stays.
    let mut best: Option<(Columns, f64, f64)> = None;
    let mut asked = false;
    if let Some(capture) = captures.get(c.capture) {
        for variant in c.columns.variants() {
            if let Some((b, a)) =
                catalog.hypothetical_costs(capture, schema, table, &variant.ordered())
            {
                asked = true;
                if best.as_ref().is_none_or(|(_, _, best_a)| a < *best_a) {
                    best = Some((variant, b, a));
                }
            }
        }
    }
    let (mut before, mut after) = (None, None);
    if let Some((variant, b, a)) = best {
        if a >= b {
            return None; // the planner would not use it: not worth recommending
        }
        c.columns = variant;
        (before, after) = (Some(b), Some(a));
    }
    let verified = asked && before.is_some();
    let gain = match (before, after) {
        (Some(b), Some(a)) if b > 0.0 => (b - a) / b,
        _ => 1.0,
    };
    let time: f64 = c.queryids.iter().filter_map(|q| total_ms.get(q)).sum();
    let ordered = c.columns.ordered();
    let removed = if c.rows_removed > 0.0 {
        format!(
            "{:.0} rows removed by the filter, {:.0} returned",
            c.rows_removed, c.rows_returned
        )
    } else {
        format!("about {:.0} rows returned (estimated)", c.rows_returned)
    };
    let reason = format!(
        "{} sequential scan(s) of {schema}.{table} ({table_rows:.0} rows) filtered by {}: {removed}; equality columns {:?} first{}",
        c.scans,
        c.filters.join(", "),
        c.columns.equality,
        c.columns
            .range
            .as_ref()
            .map(|r| format!(", then range column {r}"))
            .unwrap_or_default(),
    );
    Some(Advice {
        table_name: format!("{schema}.{table}"),
        create_statement: create_statement(schema, table, &ordered),
        columns: ordered,
        reason,
        queryids: c.queryids,
        estimated_saved_ms: time * c.cost_share * gain,
        cost_before: before,
        cost_after: after,
        verified,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A catalog from maps; hypothetical costs by column list.
    #[derive(Default)]
    struct Fake {
        tables: HashMap<(String, String), TableInfo>,
        per_value: HashMap<String, f64>,
        costs: HashMap<Vec<String>, (f64, f64)>,
        table_lookups: usize,
    }

    impl Catalog for Fake {
        fn table(&mut self, schema: &str, table: &str) -> Option<TableInfo> {
            self.table_lookups += 1;
            self.tables.get(&(schema.into(), table.into())).cloned()
        }
        fn rows_per_value(&mut self, _: &str, _: &str, column: &str) -> Option<f64> {
            self.per_value.get(column).copied()
        }
        fn hypothetical_costs(
            &mut self,
            _: &Capture,
            _: &str,
            _: &str,
            columns: &[String],
        ) -> Option<(f64, f64)> {
            self.costs.get(columns).copied()
        }
    }

    fn capture(queryid: i64, table: &str, filter: &str, plan_rows: f64) -> Capture {
        let plan = serde_json::json!({
            "Relations": [{"name": table, "schema": "public"}],
            "Plan": {"Node Type": "Seq Scan", "Relation Name": table, "Total Cost": 100.0,
                     "Plan Rows": plan_rows, "Filter": filter}
        });
        Capture {
            queryid,
            plan,
            // Never run by the advisor itself: the fake catalog ignores it.
            text: "SELECT * FROM orders WHERE customer_id = $1".to_string(),
            owner: 10,
        }
    }

    fn fake(rows: f64) -> Fake {
        let mut f = Fake::default();
        f.tables.insert(
            ("public".into(), "orders".into()),
            TableInfo {
                rows,
                indexes: vec![vec![Some("note".into())]],
            },
        );
        f
    }

    fn totals(pairs: &[(i64, f64)]) -> HashMap<i64, f64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn selective_filters_on_big_tables_become_ranked_advice() {
        let caps = [
            capture(1, "orders", "(customer_id = 42)", 10.0),
            capture(
                2,
                "orders",
                "((status = 'open') AND (created_at > now()))",
                100.0,
            ),
        ];
        let mut f = fake(100_000.0);
        let got = advise(&caps, &totals(&[(1, 50.0), (2, 500.0)]), 10_000.0, &mut f);
        let stmts: Vec<&str> = got.iter().map(|a| a.create_statement.as_str()).collect();
        assert_eq!(
            stmts,
            [
                "CREATE INDEX CONCURRENTLY ON public.orders (status, created_at)",
                "CREATE INDEX CONCURRENTLY ON public.orders (customer_id)"
            ],
            "ranked by the statements' total time"
        );
        assert_eq!(got[0].estimated_saved_ms, 500.0);
        assert!(!got[0].verified);
        assert!(
            got[1].reason.contains("filtered by (customer_id = 42)"),
            "{}",
            got[1].reason
        );
        assert_eq!(f.table_lookups, 1, "one lookup per table");
    }

    #[test]
    fn small_tables_unselective_filters_and_covered_columns_get_nothing() {
        let caps = [
            capture(1, "orders", "(customer_id = 42)", 10.0),
            capture(2, "orders", "(kind = 'x')", 90_000.0),
            capture(3, "orders", "(note = 'n')", 1.0),
            capture(4, "nowhere", "(a = 1)", 1.0),
        ];
        assert!(advise(&caps[..1], &totals(&[]), 1e9, &mut fake(100_000.0)).is_empty());
        let got = advise(&caps[1..], &totals(&[]), 10.0, &mut fake(100_000.0));
        assert!(
            got.is_empty(),
            "kept 90 %, an existing index, an unknown table: {got:?}"
        );
    }

    #[test]
    fn one_index_serves_candidates_it_can() {
        let caps = [
            capture(1, "orders", "(customer_id = 1)", 10.0),
            capture(2, "orders", "((region = 'eu') AND (customer_id = 1))", 10.0),
        ];
        let got = advise(
            &caps,
            &totals(&[(1, 1.0), (2, 1.0)]),
            10.0,
            &mut fake(100_000.0),
        );
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].columns, ["customer_id", "region"]);
        assert_eq!(got[0].queryids, [2, 1]);
    }

    #[test]
    fn the_more_selective_range_column_goes_last() {
        let caps = [capture(1, "orders", "((a > 5) AND (b < 3))", 10.0)];
        let mut f = fake(100_000.0);
        f.per_value.insert("a".into(), 500.0);
        f.per_value.insert("b".into(), 1.0);
        let got = advise(&caps, &totals(&[]), 10.0, &mut f);
        assert_eq!(got[0].columns, ["b"]);
    }

    #[test]
    fn a_hypothetical_index_the_planner_ignores_drops_the_candidate() {
        let caps = [
            capture(1, "orders", "(customer_id = 1)", 10.0),
            capture(2, "orders", "(status = 'x')", 10.0),
        ];
        let mut f = fake(100_000.0);
        f.costs.insert(vec!["customer_id".into()], (400.0, 100.0));
        f.costs.insert(vec!["status".into()], (400.0, 400.0));
        let got = advise(&caps, &totals(&[(1, 80.0), (2, 80.0)]), 10.0, &mut f);
        assert_eq!(got.len(), 1, "{got:?}");
        let a = &got[0];
        assert_eq!(a.columns, ["customer_id"]);
        assert!(a.verified);
        assert_eq!((a.cost_before, a.cost_after), (Some(400.0), Some(100.0)));
        assert_eq!(
            a.estimated_saved_ms,
            80.0 * 0.75,
            "time × share × cost reduction"
        );
    }
}
