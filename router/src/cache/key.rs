//! Which batches the cache can answer, and their keys (pure).
//!
//! A cacheable batch is one simple Query, or one extended-protocol execution: `[Parse] Bind
//! [Describe] Execute Sync` of one statement with no row limit. Its reply — everything PostgreSQL
//! sends for it except the final ReadyForQuery — is stored as sent and replayed as is, so a hit is
//! byte-for-byte what the server would have answered (text or binary formats alike).
//!
//! The key is a SHA-256 over everything that can change those bytes: the database, the server
//! role, the client's session settings (search_path, TimeZone, DateStyle, extra_float_digits,
//! bytea_output, custom settings…), the statement text and parameter types, the parameter values
//! and formats, the result formats, and which replies the batch asks for. Left out: names of
//! prepared statements and portals, and the settings listed in [`NEUTRAL_SETTINGS`] (timeouts,
//! logging, planner costs…), which cannot change the answer of a statement the cache accepts (no
//! stable or volatile function may read them: `dbopt.cache_analysis` refuses those) — so clients
//! that differ only in `application_name` share entries.

use sha2::{Digest, Sha256};

use crate::isolation::Settings;
use crate::protocol::{self as p, body};
use crate::translate::Statements;

/// Settings (lower case) that cannot change a cacheable statement's reply bytes.
pub const NEUTRAL_SETTINGS: &[&str] = &[
    "application_name",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "client_min_messages",
    "log_statement",
    "log_min_duration_statement",
    "log_min_messages",
    "log_duration",
    "work_mem",
    "maintenance_work_mem",
    "hash_mem_multiplier",
    "random_page_cost",
    "seq_page_cost",
    "cpu_tuple_cost",
    "cpu_index_tuple_cost",
    "cpu_operator_cost",
    "effective_cache_size",
    "effective_io_concurrency",
    "default_statistics_target",
    "synchronous_commit",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
    "plan_cache_mode",
    "from_collapse_limit",
    "join_collapse_limit",
];

/// Prefixes of settings that cannot change a cacheable statement's reply bytes (planner switches).
pub const NEUTRAL_PREFIXES: &[&str] = &["enable_", "jit", "geqo", "parallel_", "max_parallel_"];

/// Whether a setting takes part in the key.
pub fn keyed_setting(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !(NEUTRAL_SETTINGS.contains(&n.as_str()) || NEUTRAL_PREFIXES.iter().any(|p| n.starts_with(p)))
}

/// A batch the cache may answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The statement text.
    pub text: Vec<u8>,
    /// Parameter type OIDs the client declared (0: let the server infer).
    pub param_types: Vec<u32>,
    /// Hex SHA-256 of everything the answer depends on.
    pub key: String,
    /// A statement shape for the analysis memo: text and parameter types.
    pub shape: Vec<u8>,
}

fn param_type_oids(raw: &[u8]) -> Option<Vec<u32>> {
    let mut r = p::Reader::new(raw);
    let n = r.i16("parameter count").ok()?;
    (0..n.max(0))
        .map(|_| r.i32("parameter type").ok().map(|v| v as u32))
        .collect()
}

/// The cacheable request a batch makes, if it is one (`None`: relay it as usual).
pub(crate) fn request(
    batch: &[(u8, Vec<u8>)],
    statements: &Statements,
    database: &str,
    role: &str,
    settings: &Settings,
) -> Option<Request> {
    let mut h = Sha256::new();
    let field = |h: &mut Sha256, b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(&mut h, b"dbopt-cache-v1");
    field(&mut h, database.as_bytes());
    field(&mut h, role.as_bytes());
    for (k, v) in settings.iter().filter(|(k, _)| keyed_setting(k)) {
        field(&mut h, k.as_bytes());
        field(&mut h, v.as_bytes());
    }
    let tags: Vec<u8> = batch.iter().map(|(t, _)| *t).collect();
    let (text, types) = match tags.as_slice() {
        [b'Q'] => {
            let q = p::parse_query(body(&batch[0].1)).ok()?;
            field(&mut h, b"Q");
            field(&mut h, q);
            (q.to_vec(), Vec::new())
        }
        [b'P', b'B', b'E', b'S']
        | [b'P', b'B', b'D', b'E', b'S']
        | [b'B', b'E', b'S']
        | [b'B', b'D', b'E', b'S'] => {
            let mut parsed: Option<(Vec<u8>, Vec<u8>)> = None;
            let mut portal: &[u8] = b"";
            let mut statement: &[u8] = b"";
            let mut out: Option<(Vec<u8>, Vec<u8>)> = None;
            for (tag, msg) in batch {
                let b = body(msg);
                match tag {
                    b'P' => {
                        let m = p::parse_parse(b).ok()?;
                        field(&mut h, b"P");
                        parsed = Some((m.query.to_vec(), m.param_types.to_vec()));
                    }
                    b'B' => {
                        let m = p::parse_bind(b).ok()?;
                        let (q, types) = if batch[0].0 == b'P' {
                            // The Parse of this batch must be the statement this Bind runs.
                            let pm = p::parse_parse(body(&batch[0].1)).ok()?;
                            if pm.name != m.statement {
                                return None;
                            }
                            parsed.clone()?
                        } else if m.statement.is_empty() {
                            // The unnamed statement of an earlier batch: its text is not known here.
                            return None;
                        } else {
                            let s = statements.get(m.statement)?;
                            (s.query.clone(), s.param_types.clone())
                        };
                        field(&mut h, b"B");
                        field(&mut h, &q);
                        field(&mut h, &types);
                        field(&mut h, m.rest);
                        portal = m.portal;
                        statement = m.statement;
                        out = Some((q, types));
                    }
                    b'D' => {
                        let (kind, name) = p::parse_target(b, "Describe").ok()?;
                        let ok = match kind {
                            b'P' => name == portal,
                            _ => name == statement,
                        };
                        if !ok {
                            return None;
                        }
                        field(&mut h, &[b'D', kind]);
                    }
                    b'E' => {
                        let (name, max_rows) = p::parse_execute(b).ok()?;
                        if name != portal || max_rows != 0 {
                            return None;
                        }
                        field(&mut h, b"E");
                    }
                    b'S' => field(&mut h, b"S"),
                    _ => return None,
                }
            }
            out?
        }
        _ => return None,
    };
    let param_types = param_type_oids(&types).unwrap_or_default();
    let mut shape = text.clone();
    shape.push(0);
    shape.extend_from_slice(&types);
    Some(Request {
        text,
        param_types,
        key: hex(&h.finalize()),
        shape,
    })
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msg(tag: u8, fill: impl FnOnce(&mut Vec<u8>)) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        p::put_msg(&mut out, tag, fill);
        (tag, out)
    }

    fn query(sql: &str) -> (u8, Vec<u8>) {
        msg(b'Q', |b| {
            b.extend_from_slice(sql.as_bytes());
            b.push(0);
        })
    }

    fn parse(name: &str, sql: &str) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        p::put_parse(&mut out, name.as_bytes(), sql.as_bytes(), &[0, 0]);
        (b'P', out)
    }

    fn bind(stmt: &str, value: &str, binary_result: bool) -> (u8, Vec<u8>) {
        msg(b'B', |b| {
            b.push(0); // portal ""
            b.extend_from_slice(stmt.as_bytes());
            b.push(0);
            b.extend_from_slice(&0i16.to_be_bytes()); // param formats
            b.extend_from_slice(&1i16.to_be_bytes());
            b.extend_from_slice(&(value.len() as i32).to_be_bytes());
            b.extend_from_slice(value.as_bytes());
            b.extend_from_slice(&1i16.to_be_bytes());
            b.extend_from_slice(&i16::from(binary_result).to_be_bytes());
        })
    }

    fn execute(max_rows: i32) -> (u8, Vec<u8>) {
        msg(b'E', |b| {
            b.push(0);
            b.extend_from_slice(&max_rows.to_be_bytes());
        })
    }

    fn sync() -> (u8, Vec<u8>) {
        msg(b'S', |_| {})
    }

    fn key(batch: &[(u8, Vec<u8>)], settings: &Settings) -> Option<String> {
        key_as(batch, "db", "app", settings)
    }

    fn key_as(batch: &[(u8, Vec<u8>)], db: &str, role: &str, s: &Settings) -> Option<String> {
        request(batch, &Statements::default(), db, role, s).map(|r| r.key)
    }

    #[test]
    fn simple_and_extended_batches() {
        let s = Settings::new();
        let r = request(
            &[query("SELECT 1")],
            &Statements::default(),
            "db",
            "app",
            &s,
        )
        .unwrap();
        assert_eq!(r.text, b"SELECT 1");
        assert_eq!(r.key.len(), 64);
        let ext = [
            parse("", "SELECT $1"),
            bind("", "7", false),
            execute(0),
            sync(),
        ];
        assert!(key(&ext, &s).is_some());
        // A row limit, a second statement, or a transaction's pieces are not cacheable.
        assert!(key(
            &[
                parse("", "SELECT $1"),
                bind("", "7", false),
                execute(10),
                sync()
            ],
            &s
        )
        .is_none());
        assert!(key(&[query("SELECT 1"), query("SELECT 2")], &s).is_none());
        assert!(key(&[parse("", "SELECT 1"), sync()], &s).is_none());
        // A Bind of an unnamed statement parsed in an earlier batch.
        assert!(key(&[bind("", "7", false), execute(0), sync()], &s).is_none());
    }

    #[test]
    fn the_key_covers_what_changes_the_answer() {
        let mut s = Settings::new();
        let base = key(&[query("SELECT 1")], &s).unwrap();
        assert_ne!(base, key(&[query("SELECT 2")], &s).unwrap());
        assert_ne!(
            base,
            key_as(&[query("SELECT 1")], "db", "other", &s).unwrap()
        );
        assert_ne!(
            base,
            key_as(&[query("SELECT 1")], "db2", "app", &s).unwrap()
        );
        s.insert("application_name".into(), "psql".into());
        s.insert("enable_seqscan".into(), "off".into());
        assert_eq!(
            base,
            key(&[query("SELECT 1")], &s).unwrap(),
            "neutral settings"
        );
        s.insert("TimeZone".into(), "UTC".into());
        assert_ne!(base, key(&[query("SELECT 1")], &s).unwrap());
        s.insert("search_path".into(), "a".into());
        let with_a = key(&[query("SELECT 1")], &s).unwrap();
        s.insert("search_path".into(), "b".into());
        assert_ne!(with_a, key(&[query("SELECT 1")], &s).unwrap());
        let s = Settings::new();
        let a = |v: &str, bin: bool| {
            key(
                &[parse("", "SELECT $1"), bind("", v, bin), execute(0), sync()],
                &s,
            )
            .unwrap()
        };
        assert_ne!(a("1", false), a("2", false), "parameter values");
        assert_ne!(a("1", false), a("1", true), "result formats");
        assert_eq!(a("1", false), a("1", false));
        let named = key(
            &[
                parse("s1", "SELECT $1"),
                bind("s1", "1", false),
                execute(0),
                sync(),
            ],
            &s,
        )
        .unwrap();
        let named2 = key(
            &[
                parse("s2", "SELECT $1"),
                bind("s2", "1", false),
                execute(0),
                sync(),
            ],
            &s,
        )
        .unwrap();
        assert_eq!(named, named2, "statement names do not matter");
    }

    #[test]
    fn lengths_are_delimited() {
        // ("ab","c") and ("a","bc") as database/role must differ.
        let s = Settings::new();
        let x = request(&[query("SELECT 1")], &Statements::default(), "ab", "c", &s).unwrap();
        let y = request(&[query("SELECT 1")], &Statements::default(), "a", "bc", &s).unwrap();
        assert_ne!(x.key, y.key);
    }
}
