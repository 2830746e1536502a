//! What the client asked to cache, and for how long (pure).
//!
//! A statement is cached when it carries a hint — `/* dbopt:cache */`, `/* dbopt:cache ttl=30s */`,
//! optionally `tags=user:42,team:7` (application tags, invalidated by `dbopt.invalidate_tags()`) —
//! or a `[[cache.rules]]` entry matches it (by a table it reads, or by its fingerprint). Whether it
//! *may* be cached is PostgreSQL's answer (`dbopt.cache_analysis`), not decided here.

use std::time::Duration;

use crate::cache::settings::{CacheRule, CacheSettings};

/// A `dbopt:cache` hint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hint {
    pub ttl: Option<Duration>,
    pub tags: Vec<String>,
}

/// Parses a TTL: `30s`, `500ms`, `5m`, `2h`, or a bare number of seconds.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid ttl {s:?}: expected a number with ms, s, m or h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("invalid ttl {s:?}: unit must be ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!("invalid ttl {s:?}: must be more than 0"));
    }
    Ok(d)
}

/// The `dbopt:cache` hint of a statement, if any; `Err` for a malformed one (the client is told,
/// rather than silently getting no caching).
pub fn hint(sql: &str) -> Result<Option<Hint>, String> {
    let mut found: Option<Hint> = None;
    for comment in crate::classify::dbopt_comments(sql) {
        let body = comment
            .trim_start_matches("/*")
            .trim_end_matches("*/")
            .trim_start_matches("--");
        let mut words = body.split_whitespace().peekable();
        while let Some(w) = words.next() {
            if w != "dbopt:cache" {
                continue;
            }
            let mut h = Hint::default();
            while let Some(arg) = words.peek().filter(|a| a.contains('=')) {
                let (k, v) = arg.split_once('=').unwrap_or_default();
                match k {
                    "ttl" => h.ttl = Some(parse_ttl(v)?),
                    "tags" => {
                        for t in v.split(',') {
                            dbopt_invalidation::check_user_tag(t)
                                .map_err(|e| format!("invalid dbopt:cache tag {t:?}: {e}"))?;
                            h.tags.push(t.to_string());
                        }
                    }
                    other => {
                        return Err(format!("unknown dbopt:cache option {other:?} (ttl, tags)"))
                    }
                }
                words.next();
            }
            found = Some(h);
        }
    }
    Ok(found)
}

/// The rule that makes a statement cacheable, if any: by fingerprint first, then by a table read.
pub fn matching_rule<'a>(
    rules: &'a [CacheRule],
    fingerprint: Option<&str>,
    relation_names: &[String],
) -> Option<&'a CacheRule> {
    rules
        .iter()
        .find(|r| r.fingerprint.is_some() && r.fingerprint.as_deref() == fingerprint)
        .or_else(|| {
            rules.iter().find(|r| {
                r.table
                    .as_ref()
                    .is_some_and(|t| relation_names.iter().any(|n| n == t))
            })
        })
}

/// The TTL an entry gets: the hint's, else the rule's, else the default — never above the maximum.
pub fn ttl(settings: &CacheSettings, hint: Option<&Hint>, rule: Option<&CacheRule>) -> Duration {
    let max = Duration::from_secs(settings.max_ttl_s);
    hint.and_then(|h| h.ttl)
        .or_else(|| rule.and_then(|r| r.ttl_s).map(Duration::from_secs))
        .unwrap_or(Duration::from_secs(settings.default_ttl_s))
        .min(max)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hints() {
        assert_eq!(hint("SELECT 1").unwrap(), None);
        assert_eq!(
            hint("/* dbopt:cache */ SELECT 1").unwrap(),
            Some(Hint::default())
        );
        let h = hint("SELECT 1 /* dbopt:cache ttl=30s tags=user:42,team:7 */")
            .unwrap()
            .unwrap();
        assert_eq!(h.ttl, Some(Duration::from_secs(30)));
        assert_eq!(h.tags, vec!["user:42", "team:7"]);
        assert_eq!(
            hint("-- dbopt:cache ttl=500ms\nSELECT 1")
                .unwrap()
                .unwrap()
                .ttl,
            Some(Duration::from_millis(500))
        );
        // Text in a string is not a hint.
        assert_eq!(hint("SELECT '/* dbopt:cache */'").unwrap(), None);
        // Other dbopt hints are not cache hints.
        assert_eq!(hint("/* dbopt:replica */ SELECT 1").unwrap(), None);
    }

    #[test]
    fn malformed_hints_are_errors() {
        assert!(hint("/* dbopt:cache ttl=abc */ SELECT 1")
            .unwrap_err()
            .contains("invalid ttl"));
        assert!(hint("/* dbopt:cache ttl=0 */ SELECT 1").is_err());
        assert!(hint("/* dbopt:cache ttl=5d */ SELECT 1").is_err());
        assert!(hint("/* dbopt:cache colour=red */ SELECT 1")
            .unwrap_err()
            .contains("unknown"));
        assert!(hint("/* dbopt:cache tags=a,,b */ SELECT 1").is_err());
    }

    #[test]
    fn ttls_and_rules() {
        let mut s = CacheSettings {
            max_ttl_s: 100,
            default_ttl_s: 10,
            ..Default::default()
        };
        assert_eq!(parse_ttl("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(ttl(&s, None, None), Duration::from_secs(10));
        let h = Hint {
            ttl: Some(Duration::from_secs(1000)),
            tags: vec![],
        };
        assert_eq!(ttl(&s, Some(&h), None), Duration::from_secs(100), "capped");
        s.rules = vec![
            CacheRule {
                table: Some("public.products".into()),
                fingerprint: None,
                ttl_s: Some(30),
                write_through: false,
            },
            CacheRule {
                table: None,
                fingerprint: Some("0123456789abcdef".into()),
                ttl_s: None,
                write_through: false,
            },
        ];
        let names = vec!["public.products".to_string()];
        let r = matching_rule(&s.rules, None, &names).unwrap();
        assert_eq!(ttl(&s, None, Some(r)), Duration::from_secs(30));
        assert!(matching_rule(&s.rules, Some("0123456789abcdef"), &[]).is_some());
        assert!(matching_rule(&s.rules, Some("ffff"), &["public.orders".into()]).is_none());
    }
}
