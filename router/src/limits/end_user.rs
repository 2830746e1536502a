//! The application's end user behind a statement: a SQLCommenter key in a real comment of the
//! statement (`SELECT … /*dbopt_user='42',route='%2Fapi'*/`), or a session setting.
//!
//! Only comments PostgreSQL's scanner sees count — never text inside a string literal, so an end
//! user who types `/*dbopt_user='victim'*/` into a form field (interpolated client-side, as Django
//! does by default) names nobody. SQLCommenter values are URL-encoded inside single quotes, a quote
//! in them escaped as `\'`.

/// Longest end-user identifier, after URL decoding.
pub const MAX_LEN: usize = 128;

/// Checks an identifier: 1 to [`MAX_LEN`] bytes, no control characters.
pub fn check(value: &[u8]) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty".into());
    }
    if value.len() > MAX_LEN {
        return Err(format!("is {} bytes long (at most {MAX_LEN})", value.len()));
    }
    if value.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err("contains a control character".into());
    }
    Ok(())
}

/// The end user a statement's comments name under `key`, if any: the last real comment that
/// carries the key wins. A malformed or invalid value is an error.
pub fn from_comments(sql: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
    if !sql.contains(key) {
        return Ok(None);
    }
    let mut found = None;
    for comment in crate::classify::comments_mentioning(sql, key) {
        let body = comment
            .strip_prefix("/*")
            .and_then(|c| c.strip_suffix("*/"))
            .or_else(|| comment.strip_prefix("--"))
            .unwrap_or(comment);
        if let Some(v) = sqlcommenter_value(body, key)? {
            found = Some(v);
        }
    }
    Ok(found)
}

/// The value of `key` in a SQLCommenter comment body (`k1='v1',k2='v2'`), URL-decoded and checked.
/// `None` when the body has no such key (it may be another kind of comment mentioning the word).
fn sqlcommenter_value(body: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
    let b = body.trim().as_bytes();
    let mut i = 0;
    let mut found = None;
    while i < b.len() {
        // key
        let start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let k = std::str::from_utf8(&b[start..i]).unwrap_or("").trim();
        if i >= b.len() || b[i] != b'=' {
            // Not SQLCommenter (no `key=`): only an error if it was meant for us.
            return if k == key {
                Err(format!("{key} has no value (expected {key}='…')"))
            } else {
                Ok(found)
            };
        }
        i += 1;
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i >= b.len() || b[i] != b'\'' {
            return if k == key {
                Err(format!("the value of {key} must be in single quotes"))
            } else {
                Ok(found)
            };
        }
        i += 1;
        let mut raw = Vec::new();
        let mut closed = false;
        while i < b.len() {
            match b[i] {
                b'\\' if i + 1 < b.len() => {
                    raw.push(b[i + 1]);
                    i += 2;
                }
                b'\'' => {
                    closed = true;
                    i += 1;
                    break;
                }
                c => {
                    raw.push(c);
                    i += 1;
                }
            }
        }
        if !closed {
            return if k == key {
                Err(format!("the value of {key} has no closing quote"))
            } else {
                Ok(found)
            };
        }
        if k == key {
            let v = percent_decode(&raw).ok_or_else(|| format!("{key} is not URL-encoded"))?;
            check(&v).map_err(|e| format!("{key} {e}"))?;
            found = Some(v);
        }
        while i < b.len() && (b[i] == b' ' || b[i] == b',') {
            i += 1;
        }
    }
    Ok(found)
}

fn percent_decode(raw: &[u8]) -> Option<Vec<u8>> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hi = hex(*raw.get(i + 1)?)?;
            let lo = hex(*raw.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn user(sql: &str) -> Result<Option<Vec<u8>>, String> {
        from_comments(sql, "dbopt_user")
    }

    #[test]
    fn sqlcommenter_comments_name_the_end_user() {
        assert_eq!(user("SELECT 1").unwrap(), None);
        assert_eq!(
            user("SELECT 1 /*dbopt_user='42'*/").unwrap(),
            Some(b"42".to_vec())
        );
        assert_eq!(
            user("SELECT 1 /*controller='index',dbopt_user='a%40b.c',framework='django%3A5'*/")
                .unwrap(),
            Some(b"a@b.c".to_vec())
        );
        assert_eq!(
            user("/* dbopt_user = 'x\\'y' */ SELECT 1").unwrap(),
            Some(b"x'y".to_vec())
        );
        // The last comment carrying the key wins; other comments do not matter.
        assert_eq!(
            user("/*dbopt_user='1'*/ SELECT 1 /* dbopt:cache */ /*dbopt_user='2'*/").unwrap(),
            Some(b"2".to_vec())
        );
        assert_eq!(
            user("SELECT 1 -- dbopt_user='7'\n").unwrap(),
            Some(b"7".to_vec())
        );
    }

    #[test]
    fn text_in_strings_and_other_comments_names_nobody() {
        assert_eq!(user("SELECT '/*dbopt_user=''victim''*/'").unwrap(), None);
        assert_eq!(user("SELECT $$/*dbopt_user='victim'*/$$").unwrap(), None);
        assert_eq!(user("SELECT 1 AS \"/*dbopt_user='v'*/\"").unwrap(), None);
        assert_eq!(
            user("SELECT 1 /* about dbopt_user in prose */").unwrap(),
            None
        );
        assert_eq!(user("SELECT dbopt_user FROM t").unwrap(), None);
        // Another key that merely contains ours.
        assert_eq!(user("SELECT 1 /*not_dbopt_user='1'*/").unwrap(), None);
    }

    #[test]
    fn malformed_values_are_errors() {
        for (sql, want) in [
            ("SELECT 1 /*dbopt_user=42*/", "single quotes"),
            ("SELECT 1 /*dbopt_user='42*/", "closing quote"),
            ("SELECT 1 /*dbopt_user=''*/", "is empty"),
            ("SELECT 1 /*dbopt_user='%zz'*/", "URL-encoded"),
            ("SELECT 1 /*dbopt_user='%0a'*/", "control character"),
            ("SELECT 1 /*dbopt_user*/", "has no value"),
        ] {
            let e = user(sql).unwrap_err();
            assert!(e.contains(want), "{sql}: {e}");
        }
        let long = format!("SELECT 1 /*dbopt_user='{}'*/", "x".repeat(MAX_LEN + 1));
        assert!(user(&long).unwrap_err().contains("at most 128"));
        let ok = format!("SELECT 1 /*dbopt_user='{}'*/", "x".repeat(MAX_LEN));
        assert!(user(&ok).unwrap().is_some());
    }
}
