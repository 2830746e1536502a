//! Missing-index advice from plans: find sequential scans whose filter an index could serve, turn
//! the filter into index columns (equality columns first, then one range column), and drop what an
//! existing index already covers.
//!
//! Input is EXPLAIN (FORMAT JSON) output as captured for slow queries; table sizes and existing
//! indexes are passed in by the caller (the extension reads them from the catalog).

use serde_json::Value;

/// A sequential scan with a filter, found in a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqScan {
    pub schema: String,
    pub table: String,
    pub filter: String,
    /// Rows the scan returned (actual when the plan was analysed, else the planner's estimate).
    pub rows_returned: f64,
    /// Rows the filter removed (only known from an analysed plan).
    pub rows_removed: Option<f64>,
    /// The scan's share of the plan's total cost (0..=1): how much of the query it is.
    pub cost_share: f64,
}

/// Columns an index on the filter should have, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub equality: Vec<String>,
    /// The range column to put after the equality columns (the first one the filter names).
    pub range: Option<String>,
    /// Every range column of the filter: which one serves best depends on selectivity the plan
    /// does not show, so the caller asks the planner about each ([`Columns::range_conditions`]).
    pub range_options: Vec<String>,
    /// The filter's condition on each range column, as text (same order as `range_options`).
    pub range_conditions: Vec<String>,
}

impl Columns {
    pub fn ordered(&self) -> Vec<String> {
        let mut v = self.equality.clone();
        v.extend(self.range.clone());
        v
    }

    /// Puts the range columns in the order given by `rank` (lower first), e.g. estimated rows.
    pub fn rank_ranges(&mut self, rank: &[f64]) {
        let mut order: Vec<usize> = (0..self.range_options.len()).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (
                rank.get(a).copied().unwrap_or(f64::MAX),
                rank.get(b).copied().unwrap_or(f64::MAX),
            );
            ra.total_cmp(&rb)
        });
        self.range_options = order
            .iter()
            .map(|&i| self.range_options[i].clone())
            .collect();
        self.range_conditions = order
            .iter()
            .filter_map(|&i| self.range_conditions.get(i).cloned())
            .collect();
        self.range = self.range_options.first().cloned();
    }

    /// The same equality columns with each possible range column.
    pub fn variants(&self) -> Vec<Columns> {
        if self.range_options.len() <= 1 {
            return vec![self.clone()];
        }
        self.range_options
            .iter()
            .map(|r| Columns {
                range: Some(r.clone()),
                ..self.clone()
            })
            .collect()
    }
}

/// Every sequential scan with a filter in a plan document (`{"Plan": …}` or `[{"Plan": …}]`).
///
/// A scan's schema is its `Schema` field (VERBOSE plans) or, for the plans dbopt captures, the
/// document's `Relations` list (`[{"name": …, "schema": …}]`, every table the statement reads, taken
/// from its range table); a scan whose table name is not there, or is there twice (two schemas),
/// is skipped rather than guessed.
pub fn seq_scans(plan: &Value) -> Vec<SeqScan> {
    let doc = match plan {
        Value::Array(a) => a.first().unwrap_or(&Value::Null),
        v => v,
    };
    let relations: Vec<(&str, &str)> = doc
        .get("Relations")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|r| {
                    Some((
                        r.get("name").and_then(Value::as_str)?,
                        r.get("schema").and_then(Value::as_str)?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    if let Some(root) = doc.get("Plan") {
        let total = root
            .get("Total Cost")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        walk(root, total, &relations, &mut out);
    }
    out
}

/// The schema of `table` in a plan's relation list, when it names exactly one.
fn schema_of<'a>(relations: &[(&str, &'a str)], table: &str) -> Option<&'a str> {
    let mut found = relations
        .iter()
        .filter(|(n, _)| *n == table)
        .map(|(_, s)| *s);
    let first = found.next()?;
    found.all(|s| s == first).then_some(first)
}

fn walk(node: &Value, total_cost: f64, relations: &[(&str, &str)], out: &mut Vec<SeqScan>) {
    let kind = node.get("Node Type").and_then(Value::as_str).unwrap_or("");
    if kind == "Seq Scan" {
        if let (Some(table), Some(filter)) = (
            node.get("Relation Name").and_then(Value::as_str),
            node.get("Filter").and_then(Value::as_str),
        ) {
            let actual = node.get("Actual Rows").and_then(Value::as_f64);
            let loops = node
                .get("Actual Loops")
                .and_then(Value::as_f64)
                .unwrap_or(1.0)
                .max(1.0);
            let cost = node
                .get("Total Cost")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            let schema = node
                .get("Schema")
                .and_then(Value::as_str)
                .or_else(|| schema_of(relations, table));
            if let Some(schema) = schema {
                out.push(SeqScan {
                    schema: schema.to_string(),
                    table: table.to_string(),
                    filter: filter.to_string(),
                    rows_returned: actual.map_or_else(
                        || node.get("Plan Rows").and_then(Value::as_f64).unwrap_or(0.0),
                        |a| a * loops,
                    ),
                    rows_removed: node
                        .get("Rows Removed by Filter")
                        .and_then(Value::as_f64)
                        .map(|r| r * loops),
                    cost_share: if total_cost > 0.0 {
                        (cost / total_cost).clamp(0.0, 1.0)
                    } else {
                        1.0
                    },
                });
            }
        }
    }
    if let Some(children) = node.get("Plans").and_then(Value::as_array) {
        for c in children {
            walk(c, total_cost, relations, out);
        }
    }
}

/// Splits `s` on a top-level keyword (outside parentheses, string literals and quoted identifiers).
fn split_top(s: &str, keyword: &str) -> Vec<String> {
    let (mut depth, mut quote, mut start) = (0i32, None::<u8>, 0usize);
    let mut parts = Vec::new();
    let b = s.as_bytes();
    let k = keyword.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            // A doubled quote inside a quoted run toggles twice: it stays inside.
            q @ (b'\'' | b'"') if quote.is_none_or(|open| open == q) => {
                quote = if quote.is_some() { None } else { Some(q) };
            }
            _ if quote.is_some() => {}
            b'(' => depth += 1,
            b')' => depth -= 1,
            _ if depth == 0 && b[i..].starts_with(k) => {
                parts.push(s[start..i].trim().to_string());
                i += k.len();
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(s[start..].trim().to_string());
    parts
}

/// The first position of `pat` in `s` outside string literals and quoted identifiers.
fn find_unquoted(s: &str, pat: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut quote = None::<u8>;
    for i in 0..b.len() {
        match b[i] {
            q @ (b'\'' | b'"') if quote.is_none_or(|open| open == q) => {
                quote = if quote.is_some() { None } else { Some(q) };
            }
            _ if quote.is_none() && b[i..].starts_with(pat.as_bytes()) => return Some(i),
            _ => {}
        }
    }
    None
}

/// Removes parentheses that enclose the whole expression.
fn strip_parens(s: &str) -> &str {
    let mut s = s.trim();
    while s.starts_with('(') && s.ends_with(')') {
        // Only if the first '(' closes at the very end (parentheses inside quotes do not count).
        let mut depth = 0;
        let mut closes_at_end = true;
        let mut quote = None::<char>;
        for (i, c) in s.char_indices() {
            match c {
                q @ ('\'' | '"') if quote.is_none_or(|open| open == q) => {
                    quote = if quote.is_some() { None } else { Some(q) };
                }
                _ if quote.is_some() => {}
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 && i != s.len() - 1 {
                        closes_at_end = false;
                        break;
                    }
                }
                _ => {}
            }
        }
        if !closes_at_end {
            break;
        }
        s = s[1..s.len() - 1].trim();
    }
    s
}

/// A plain column reference: `col`, `"Col"`, or `alias.col` (the alias dropped).
fn column(s: &str) -> Option<String> {
    let s = s.trim();
    let last = s.rsplit('.').next()?;
    if let Some(q) = last.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        return Some(q.to_string());
    }
    let ok = !last.is_empty()
        && last
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && last.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then(|| last.to_string())
}

/// The index columns a scan filter asks for; `None` when no plain B-tree index can serve it
/// (an OR at the top, or no condition on a plain column).
pub fn filter_columns(filter: &str) -> Option<Columns> {
    let body = strip_parens(filter);
    if split_top(body, " OR ").len() > 1 {
        return None;
    }
    let mut cols = Columns {
        equality: Vec::new(),
        range: None,
        range_options: Vec::new(),
        range_conditions: Vec::new(),
    };
    for conjunct in split_top(body, " AND ") {
        let c = strip_parens(&conjunct);
        if let Some(lhs) = c.strip_suffix(" IS NULL") {
            if let Some(col) = column(lhs) {
                push_unique(&mut cols.equality, col);
            }
            continue;
        }
        let ops = [" = ANY ", " <= ", " >= ", " = ", " < ", " > "];
        let Some((op, at)) = ops
            .iter()
            .filter_map(|op| find_unquoted(c, op).map(|at| (*op, at)))
            .min_by_key(|(_, at)| *at)
        else {
            continue;
        };
        let Some(col) = column(&c[..at]) else {
            continue;
        };
        match op.trim() {
            "=" | "= ANY" => push_unique(&mut cols.equality, col),
            _ => {
                if !cols.range_options.contains(&col) {
                    cols.range_options.push(col);
                    cols.range_conditions.push(c.to_string());
                }
            }
        }
    }
    let keep: Vec<bool> = cols
        .range_options
        .iter()
        .map(|r| !cols.equality.contains(r))
        .collect();
    let mut k = keep.iter();
    cols.range_options.retain(|_| *k.next().unwrap_or(&true));
    let mut k = keep.iter();
    cols.range_conditions.retain(|_| *k.next().unwrap_or(&true));
    cols.range = cols.range_options.first().cloned();
    (!cols.equality.is_empty() || cols.range.is_some()).then_some(cols)
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// Whether an existing index (its column names in order; `None` for an expression) already serves
/// `wanted`: the wanted columns are a prefix of the index's, or its leading columns are the same
/// equality columns in another order followed by the same rest.
pub fn covered(wanted: &Columns, existing: &[Vec<Option<String>>]) -> bool {
    let want = wanted.ordered();
    existing.iter().any(|idx| {
        if idx.len() < want.len() {
            return false;
        }
        let head: Vec<Option<&str>> = idx[..want.len()].iter().map(|c| c.as_deref()).collect();
        let exact = head.iter().zip(&want).all(|(h, w)| *h == Some(w.as_str()));
        let n_eq = wanted.equality.len();
        let eq_permuted = {
            let mut a: Vec<Option<&str>> = head[..n_eq].to_vec();
            let mut b: Vec<Option<&str>> =
                wanted.equality.iter().map(|s| Some(s.as_str())).collect();
            a.sort();
            b.sort();
            a == b
                && head[n_eq..]
                    .iter()
                    .zip(&want[n_eq..])
                    .all(|(h, w)| *h == Some(w.as_str()))
        };
        exact || eq_permuted
    })
}

/// Merges candidates on one table that one index can serve together: when a narrower candidate's
/// equality columns are a subset of a wider one's (and it has no range column of its own), the
/// wider index is reordered to start with them, and the narrower needs no index of its own.
/// Returns each kept candidate with the positions of the inputs it now serves (itself included).
pub fn consolidate(cands: &[Columns]) -> Vec<(Columns, Vec<usize>)> {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by_key(|&i| {
        std::cmp::Reverse(cands[i].equality.len() + usize::from(cands[i].range.is_some()))
    });
    // (candidate, inputs served, how many leading equality columns are already promised)
    let mut kept: Vec<(Columns, Vec<usize>, usize)> = Vec::new();
    for i in order {
        let narrow = &cands[i];
        let host = kept.iter_mut().find(|(wide, _, fixed)| {
            narrow.range.is_none()
                && narrow.equality.iter().all(|c| wide.equality.contains(c))
                && wide.equality[..*fixed]
                    .iter()
                    .all(|c| narrow.equality.contains(c))
        });
        match host {
            Some((wide, served, fixed)) => {
                let mut reordered: Vec<String> = wide.equality[..*fixed].to_vec();
                for c in narrow.equality.iter().chain(&wide.equality) {
                    if !reordered.contains(c) {
                        reordered.push(c.clone());
                    }
                }
                wide.equality = reordered;
                *fixed = narrow.equality.len().max(*fixed);
                served.push(i);
            }
            None => kept.push((narrow.clone(), vec![i], 0)),
        }
    }
    kept.into_iter().map(|(c, served, _)| (c, served)).collect()
}

/// `CREATE INDEX CONCURRENTLY ON schema.table (a, b)` with identifiers quoted when they must be.
pub fn create_statement(schema: &str, table: &str, columns: &[String]) -> String {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    format!(
        "CREATE INDEX CONCURRENTLY ON {}.{} ({})",
        quote_ident(schema),
        quote_ident(table),
        cols.join(", ")
    )
}

fn quote_ident(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(eq: &[&str], range: Option<&str>) -> Columns {
        Columns {
            equality: eq.iter().map(|s| s.to_string()).collect(),
            range: range.map(str::to_string),
            range_options: range.iter().map(|s| s.to_string()).collect(),
            range_conditions: Vec::new(),
        }
    }

    #[test]
    fn filters_to_columns() {
        let strip = |c: Option<Columns>| {
            c.map(|c| Columns {
                range_conditions: Vec::new(),
                ..c
            })
        };
        let cases: &[(&str, Option<Columns>)] = &[
            ("(customer_id = 42)", Some(cols(&["customer_id"], None))),
            ("(customer_id = $1)", Some(cols(&["customer_id"], None))),
            (
                "((created_at > '2024-01-01 00:00:00'::timestamp without time zone) AND (status = 'open'::text))",
                Some(cols(&["status"], Some("created_at"))),
            ),
            ("((a >= 1) AND (a <= 9) AND (b = 2))", Some(cols(&["b"], Some("a")))),
            ("(o.customer_id = c.id)", Some(cols(&["customer_id"], None))),
            ("(region = ANY ('{eu,us}'::text[]))", Some(cols(&["region"], None))),
            ("(deleted_at IS NULL)", Some(cols(&["deleted_at"], None))),
            ("(\"Status\" = 'x'::text)", Some(cols(&["Status"], None))),
            ("((a = 1) OR (b = 2))", None),
            ("(lower(email) = 'x'::text)", None),
            ("((email)::text ~~ 'abc%'::text)", None),
            ("(a <> 5)", None),
            ("((note = 'a AND b'::text) AND (kind = 3))", Some(cols(&["note", "kind"], None))),
        ];
        for (filter, want) in cases {
            assert_eq!(&strip(filter_columns(filter)), want, "{filter}");
        }
    }

    #[test]
    fn several_range_columns_are_all_offered() {
        let c = filter_columns("((id > 4) AND (status = 'open'::text) AND (created_at > now()))")
            .expect("cols");
        assert_eq!(c.ordered(), vec!["status".to_string(), "id".to_string()]);
        let v: Vec<Vec<String>> = c.variants().iter().map(Columns::ordered).collect();
        assert_eq!(
            v,
            vec![
                vec!["status".to_string(), "id".into()],
                vec!["status".to_string(), "created_at".into()]
            ]
        );
        assert_eq!(
            c.range_conditions,
            vec!["id > 4".to_string(), "created_at > now()".to_string()]
        );
        let mut ranked = c.clone();
        ranked.rank_ranges(&[200_000.0, 60.0]);
        assert_eq!(
            ranked.ordered(),
            vec!["status".to_string(), "created_at".to_string()]
        );
        assert_eq!(ranked.range_conditions[0], "created_at > now()");
    }

    #[test]
    fn existing_indexes_cover_prefixes() {
        let idx = |c: &[&str]| c.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>();
        let want = cols(&["customer_id"], None);
        assert!(covered(&want, &[idx(&["customer_id"])]));
        assert!(
            covered(&want, &[idx(&["customer_id", "created_at"])]),
            "prefix of a wider index"
        );
        assert!(
            !covered(&want, &[idx(&["created_at", "customer_id"])]),
            "not a prefix"
        );
        let two = cols(&["a", "b"], Some("t"));
        assert!(
            covered(&two, &[idx(&["b", "a", "t"])]),
            "equality columns in any order"
        );
        assert!(!covered(&two, &[idx(&["a", "t", "b"])]));
        assert!(!covered(&want, &[vec![None]]), "expression index");
        assert!(
            !covered(&cols(&["a", "b"], None), &[idx(&["a"])]),
            "narrower index"
        );
    }

    #[test]
    fn plans_yield_their_seq_scans() {
        let plan: Value = serde_json::from_str(
            r#"{"Plan": {"Node Type": "Hash Join", "Total Cost": 100.0, "Plans": [
                {"Node Type": "Seq Scan", "Relation Name": "orders", "Schema": "shop", "Total Cost": 80.0,
                 "Plan Rows": 10, "Filter": "(customer_id = 42)", "Actual Rows": 5, "Actual Loops": 2,
                 "Rows Removed by Filter": 99995},
                {"Node Type": "Seq Scan", "Relation Name": "customers", "Total Cost": 20.0, "Plan Rows": 1000},
                {"Node Type": "Index Scan", "Relation Name": "x", "Filter": "(a = 1)"}]}}"#,
        )
        .expect("json");
        let scans = seq_scans(&plan);
        assert_eq!(scans.len(), 1, "only filtered sequential scans");
        let s = &scans[0];
        assert_eq!((s.schema.as_str(), s.table.as_str()), ("shop", "orders"));
        assert_eq!((s.rows_returned, s.rows_removed), (10.0, Some(199_990.0)));
        assert!((s.cost_share - 0.8).abs() < 1e-9);
        let arr = Value::Array(vec![plan]);
        assert_eq!(seq_scans(&arr).len(), 1, "the [ {{Plan}} ] form too");
        assert!(seq_scans(&Value::Null).is_empty());
    }

    #[test]
    fn schemas_come_from_the_plan_never_a_guess() {
        let scan = |relations: &str| {
            let plan: Value = serde_json::from_str(&format!(
                r#"{{"Relations": {relations}, "Plan": {{"Node Type": "Seq Scan",
                   "Relation Name": "orders", "Total Cost": 1.0, "Plan Rows": 1,
                   "Filter": "(a = 1)"}}}}"#
            ))
            .expect("json");
            seq_scans(&plan).first().map(|s| s.schema.clone())
        };
        assert_eq!(
            scan(r#"[{"name": "orders", "schema": "tenant_7"}]"#).as_deref(),
            Some("tenant_7")
        );
        assert_eq!(scan("[]"), None, "unknown: skipped, not assumed public");
        assert_eq!(
            scan(r#"[{"name": "orders", "schema": "a"}, {"name": "orders", "schema": "b"}]"#),
            None,
            "two schemas: ambiguous"
        );
    }

    #[test]
    fn quoted_identifiers_do_not_split_a_filter() {
        // A column named to look like two conditions stays one column.
        let c = filter_columns(r#"(("x AND y = 1" = 5) AND (b = 2))"#).expect("columns");
        assert_eq!(c.equality, vec!["x AND y = 1".to_string(), "b".to_string()]);
        let c = filter_columns(r#"(("it's" = 'a '' AND b = 1'))"#).expect("columns");
        assert_eq!(c.equality, vec!["it's".to_string()]);
        // Parentheses inside a quoted identifier do not unbalance the expression.
        let hostile = r#"b) >= 0; DROP TABLE victim; SELECT (1"#;
        let c = filter_columns(&format!(r#"(("{hostile}" = 5) AND (c < 100))"#)).expect("columns");
        assert_eq!(c.equality, vec![hostile.to_string()]);
        assert_eq!(c.range.as_deref(), Some("c"));
        assert_eq!(
            create_statement("public", "trap", &c.ordered()),
            format!(r#"CREATE INDEX CONCURRENTLY ON public.trap ("{hostile}", c)"#)
        );
    }

    #[test]
    fn one_index_serves_nested_equality_sets() {
        let a = cols(&["customer_id"], None);
        let ab = cols(&["region", "customer_id"], None);
        let other = cols(&["status"], Some("created_at"));
        let merged = consolidate(&[a.clone(), ab, other.clone()]);
        let got: Vec<(Vec<String>, Vec<usize>)> = merged
            .iter()
            .map(|(c, s)| (c.ordered(), s.clone()))
            .collect();
        assert!(
            got.contains(&(vec!["customer_id".into(), "region".into()], vec![1, 0])),
            "{got:?}"
        );
        assert!(got.contains(&(other.ordered(), vec![2])), "{got:?}");
        // A range-only candidate is not served by an index that leads with other columns.
        let merged = consolidate(&[cols(&[], Some("t")), cols(&["a"], Some("t"))]);
        assert_eq!(merged.len(), 2);
        // Incompatible prefixes stay apart.
        let merged = consolidate(&[
            cols(&["a", "b", "c"], None),
            cols(&["a"], None),
            cols(&["b"], None),
        ]);
        assert_eq!(merged.len(), 2, "{merged:?}");
    }

    #[test]
    fn statements_quote_what_needs_it() {
        assert_eq!(
            create_statement(
                "public",
                "orders",
                &["customer_id".into(), "created_at".into()]
            ),
            "CREATE INDEX CONCURRENTLY ON public.orders (customer_id, created_at)"
        );
        assert_eq!(
            create_statement("Shop", "t", &["Status".into()]),
            "CREATE INDEX CONCURRENTLY ON \"Shop\".t (\"Status\")"
        );
    }
}
