//! The migration directory: Flyway's naming, so existing directories work —
//! `V<version>__<description>.sql`, the version made of numbers separated by `.` or `_`
//! (`V1__init.sql`, `V1.2__add_index.sql`, `V2_1__x.sql`), ordered numerically part by part.
//! A file whose first line is `-- dbopt:no-transaction` runs outside a transaction (statements
//! such as `CREATE INDEX CONCURRENTLY` need that). Everything here is pure.

use std::cmp::Ordering;
use std::fmt;

use sha2::{Digest, Sha256};

/// A version: its numeric parts (`1.2` → [1, 2]); trailing zeros do not count (`1` = `1.0`).
#[derive(Debug, Clone, Eq)]
pub struct Version {
    pub parts: Vec<u64>,
    /// As written in the file name.
    pub text: String,
}

impl Version {
    pub fn parse(s: &str) -> Result<Version, String> {
        if s.is_empty() {
            return Err("empty version".into());
        }
        let parts = s
            .split(['.', '_'])
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 18 {
                    Err(format!(
                        "version {s:?}: parts must be numbers (e.g. 1, 1.2, 2_1)"
                    ))
                } else {
                    p.parse::<u64>().map_err(|e| format!("version {s:?}: {e}"))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Version {
            parts,
            text: s.to_string(),
        })
    }

    fn trimmed(&self) -> &[u64] {
        let mut n = self.parts.len();
        while n > 1 && self.parts[n - 1] == 0 {
            n -= 1;
        }
        &self.parts[..n]
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.trimmed() == other.trimmed()
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.trimmed().cmp(other.trimmed())
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One migration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub version: Version,
    /// The description (underscores as spaces, as Flyway shows it).
    pub name: String,
    pub file_name: String,
    pub sql: String,
    /// SHA-256 of the file's bytes, hex.
    pub checksum: String,
    pub transactional: bool,
}

/// The marker of a migration that must run outside a transaction.
pub const NO_TRANSACTION: &str = "-- dbopt:no-transaction";

/// Parses one file (name and content).
pub fn parse(file_name: &str, sql: &str) -> Result<Migration, String> {
    let stem = file_name
        .strip_suffix(".sql")
        .ok_or_else(|| format!("{file_name}: migration files end in .sql"))?;
    let rest = stem.strip_prefix('V').ok_or_else(|| {
        format!("{file_name}: a versioned migration is named V<version>__<description>.sql")
    })?;
    let (version, name) = rest.split_once("__").ok_or_else(|| {
        format!("{file_name}: missing \"__\" between the version and the description")
    })?;
    let version = Version::parse(version).map_err(|e| format!("{file_name}: {e}"))?;
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(format!("{file_name}: the description must not be empty"));
    }
    let checksum = Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let transactional = sql.lines().next().map(str::trim) != Some(NO_TRANSACTION);
    let run = if transactional {
        without_transaction_wrapper(sql).map_err(|e| format!("{file_name}: {e}"))?
    } else {
        sql.to_string()
    };
    Ok(Migration {
        version,
        name: name.replace('_', " "),
        file_name: file_name.to_string(),
        sql: run,
        checksum,
        transactional,
    })
}

/// The SQL of a transactional migration without a `BEGIN; … COMMIT;` around it (Django's
/// `sqlmigrate` and many hand-written files have one; dbopt-migrate opens the transaction itself).
/// The two statements are blanked, not cut, so positions in errors still point into the file.
/// Any other statement that ends or opens a transaction is refused: it would commit half a
/// migration. Savepoints stay. SQL that does not parse is left for the server to report.
fn without_transaction_wrapper(sql: &str) -> Result<String, String> {
    use pg_query::protobuf::TransactionStmtKind as K;
    let Ok(parsed) = pg_query::parse(sql) else {
        return Ok(sql.to_string());
    };
    let stmts = &parsed.protobuf.stmts;
    let kind = |i: usize| match stmts[i].stmt.as_ref().and_then(|n| n.node.as_ref()) {
        Some(pg_query::NodeEnum::TransactionStmt(t)) => K::try_from(t.kind).ok(),
        _ => None,
    };
    let opens = |k: Option<K>| matches!(k, Some(K::TransStmtBegin | K::TransStmtStart));
    let last = stmts.len().saturating_sub(1);
    let wrapped = stmts.len() >= 2 && opens(kind(0)) && kind(last) == Some(K::TransStmtCommit);
    for i in 0..stmts.len() {
        if wrapped && (i == 0 || i == last) {
            continue;
        }
        let control = matches!(
            kind(i),
            Some(
                K::TransStmtBegin
                    | K::TransStmtStart
                    | K::TransStmtCommit
                    | K::TransStmtRollback
                    | K::TransStmtPrepare
                    | K::TransStmtCommitPrepared
                    | K::TransStmtRollbackPrepared
            )
        );
        if control {
            return Err(format!(
                "statement {} opens or ends a transaction: dbopt-migrate runs each migration in a \
                 transaction of its own (a BEGIN … COMMIT around the whole file is accepted); \
                 remove it, or mark the file {NO_TRANSACTION}",
                i + 1
            ));
        }
    }
    if !wrapped {
        return Ok(sql.to_string());
    }
    let blank: Vec<(usize, usize)> = [0, last]
        .iter()
        .map(|&i| {
            let start = usize::try_from(stmts[i].stmt_location).unwrap_or(0);
            let len = usize::try_from(stmts[i].stmt_len).unwrap_or(0);
            (start, if len == 0 { sql.len() } else { start + len })
        })
        .collect();
    // Character for character, so that positions (in characters) stay where they were.
    Ok(sql
        .char_indices()
        .map(|(at, ch)| {
            if ch != '\n' && blank.iter().any(|(s, e)| (*s..*e).contains(&at)) {
                ' '
            } else {
                ch
            }
        })
        .collect())
}

/// Orders the files of a directory (name, content) by version; files that are not `*.sql` are
/// ignored, two files with one version are an error.
pub fn ordered(files: Vec<(String, String)>) -> Result<Vec<Migration>, String> {
    let mut out: Vec<Migration> = files
        .iter()
        .filter(|(n, _)| n.ends_with(".sql"))
        .map(|(n, s)| parse(n, s))
        .collect::<Result<_, _>>()?;
    out.sort_by(|a, b| a.version.cmp(&b.version));
    for w in out.windows(2) {
        if w[0].version == w[1].version {
            return Err(format!(
                "{} and {} have the same version {}",
                w[0].file_name, w[1].file_name, w[0].version
            ));
        }
    }
    Ok(out)
}

/// The file name `new NAME` creates after `latest` (next whole version).
pub fn next_file_name(latest: Option<&Version>, name: &str) -> Result<String, String> {
    let clean: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_matches('_').to_string();
    if clean.is_empty() {
        return Err(format!(
            "{name:?}: a migration needs a name of letters or digits"
        ));
    }
    let next = latest.map_or(1, |v| v.parts[0] + 1);
    Ok(format!("V{next}__{clean}.sql"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_begin_commit_wrapper_is_blanked_and_other_transaction_commands_refused() {
        let django = "--\n-- Create model Shop\n--\nBEGIN;\nCREATE TABLE shop (id int);\nCOMMIT;\n";
        let m = parse("V1__shop.sql", django).expect("wrapped");
        assert_eq!(m.sql.chars().count(), django.chars().count());
        assert!(
            !m.sql.contains("BEGIN") && !m.sql.contains("COMMIT"),
            "{}",
            m.sql
        );
        assert!(m.sql.contains("CREATE TABLE shop (id int);"));
        assert_eq!(m.sql.lines().count(), django.lines().count());
        let half = "CREATE TABLE a (id int);\nCOMMIT;\nCREATE TABLE b (id int);";
        let e = parse("V2__half.sql", half).expect_err("a commit in the middle");
        assert!(
            e.contains("V2__half.sql: statement 2 opens or ends a transaction"),
            "{e}"
        );
        let savepoints = "SAVEPOINT s; CREATE TABLE c (id int); RELEASE SAVEPOINT s;";
        assert_eq!(parse("V3__s.sql", savepoints).unwrap().sql, savepoints);
        // Unparsable SQL is the server's to report, with its position.
        assert_eq!(parse("V4__bad.sql", "SELEC 1").unwrap().sql, "SELEC 1");
        // Outside a transaction, BEGIN … COMMIT means what it says.
        let marked = format!("{NO_TRANSACTION}\nBEGIN; SELECT 1; COMMIT;");
        assert_eq!(parse("V5__m.sql", &marked).unwrap().sql, marked);
    }

    #[test]
    fn flyway_names_parse_and_order_numerically() {
        let files = vec![
            ("V10__later.sql".to_string(), "SELECT 10".to_string()),
            (
                "V2__add_users.sql".to_string(),
                "CREATE TABLE u ()".to_string(),
            ),
            ("V1.1__fix.sql".to_string(), "SELECT 1".to_string()),
            ("README.md".to_string(), "not a migration".to_string()),
            (
                "V1__init.sql".to_string(),
                format!("{NO_TRANSACTION}\nCREATE INDEX CONCURRENTLY i ON t (a)"),
            ),
        ];
        let m = ordered(files).unwrap();
        let names: Vec<_> = m.iter().map(|m| m.file_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "V1__init.sql",
                "V1.1__fix.sql",
                "V2__add_users.sql",
                "V10__later.sql"
            ]
        );
        assert!(!m[0].transactional);
        assert!(m[1].transactional);
        assert_eq!(m[2].name, "add users");
        assert_eq!(m[2].checksum.len(), 64);
        assert_eq!(Version::parse("1.0").unwrap(), Version::parse("1").unwrap());
        assert!(Version::parse("2_1").unwrap() > Version::parse("2").unwrap());
    }

    #[test]
    fn bad_names_and_duplicates_are_refused_with_the_file_named() {
        for (bad, why) in [
            ("V1_init.sql", "missing \"__\""),
            ("1__init.sql", "V<version>__"),
            ("Vx__init.sql", "parts must be numbers"),
            ("V1..2__a.sql", "parts must be numbers"),
            ("V1__.sql", "description"),
            ("V1__a.txt", "end in .sql"),
        ] {
            let e = parse(bad, "").unwrap_err();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
        let e = ordered(vec![
            ("V1__a.sql".into(), String::new()),
            ("V1.0__b.sql".into(), String::new()),
        ])
        .unwrap_err();
        assert!(e.contains("same version"), "{e}");
    }

    #[test]
    fn new_names_follow_the_latest() {
        assert_eq!(
            next_file_name(None, "Add users!").unwrap(),
            "V1__add_users.sql"
        );
        let v = Version::parse("7.3").unwrap();
        assert_eq!(next_file_name(Some(&v), "index").unwrap(), "V8__index.sql");
        assert!(next_file_name(None, " !! ").is_err());
    }
}
