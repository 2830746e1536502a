//! Which limits a statement is under, and the key of each one's window (pure).

use super::settings::{LimitSettings, Mode, Rule, Scope};

/// Who and where a statement runs.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub end_user: Option<&'a [u8]>,
    /// The node, once routing chose it; node-scoped rules apply only then.
    pub node: Option<&'a str>,
}

/// One window a statement is counted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Index of the rule in `limits.rules`.
    pub rule: usize,
    pub name: String,
    /// The window's key (Redis and local): unambiguous, lengths prefixed.
    pub key: Vec<u8>,
    pub limit: u64,
    pub window_ms: u64,
    pub warn: bool,
    /// Whose statements the window counts, for messages: `user "app"`.
    pub counts: String,
}

/// Prefix of every window key in Redis.
pub const KEY_PREFIX: &str = "dbopt:rl:";

fn part(out: &mut Vec<u8>, tag: &str, value: &[u8]) {
    out.extend_from_slice(format!(":{tag}{}:", value.len()).as_bytes());
    out.extend_from_slice(value);
}

/// An identifier as messages show it (control characters never reach a client's terminal).
pub fn shown(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The user- or end-user-scoped rules for `user`: those naming it, else the defaults.
fn per_user<'s>(
    rules: &'s [Rule],
    scope: Scope,
    user: &str,
) -> impl Iterator<Item = (usize, &'s Rule)> + 's {
    let named = rules
        .iter()
        .any(|r| r.scope == scope && r.users.iter().any(|u| u == user));
    let user = user.to_string();
    rules.iter().enumerate().filter(move |(_, r)| {
        r.scope == scope
            && if named {
                r.users.contains(&user)
            } else {
                r.users.is_empty()
            }
    })
}

/// The windows a statement of `s` is counted in. Node-scoped rules only with `s.node`;
/// `only_node` keeps just those (the check made once routing chose the node).
pub fn applicable(settings: &LimitSettings, s: Subject<'_>, only_node: bool) -> Vec<Applied> {
    let mut out = Vec::new();
    let rules = &settings.rules;
    let applies = |r: &Rule| {
        (r.users.is_empty() || r.users.iter().any(|u| u == s.user))
            && (r.databases.is_empty() || r.databases.iter().any(|d| d == s.database))
    };
    let mut push = |i: usize, r: &Rule, key: Vec<u8>, counts: String| {
        out.push(Applied {
            rule: i,
            name: r.name.clone(),
            key,
            limit: r.limit,
            window_ms: r.window_ms,
            warn: r.mode(settings.mode) == Mode::Warn,
            counts,
        })
    };
    let base = |r: &Rule| {
        let mut k = Vec::with_capacity(64);
        k.extend_from_slice(KEY_PREFIX.as_bytes());
        k.extend_from_slice(r.name.as_bytes());
        k
    };
    if !only_node {
        for (i, r) in rules.iter().enumerate() {
            if !applies(r) {
                continue;
            }
            match r.scope {
                Scope::Global => {
                    let mut k = base(r);
                    k.extend_from_slice(b":g");
                    push(i, r, k, "all statements".into());
                }
                Scope::Database => {
                    let mut k = base(r);
                    part(&mut k, "d", s.database.as_bytes());
                    push(
                        i,
                        r,
                        k,
                        format!("database \"{}\"", shown(s.database.as_bytes())),
                    );
                }
                _ => {}
            }
        }
        for (i, r) in per_user(rules, Scope::User, s.user) {
            if r.databases.is_empty() || r.databases.iter().any(|d| d == s.database) {
                let mut k = base(r);
                part(&mut k, "u", s.user.as_bytes());
                push(i, r, k, format!("user \"{}\"", shown(s.user.as_bytes())));
            }
        }
        if let Some(e) = s.end_user {
            for (i, r) in per_user(rules, Scope::EndUser, s.user) {
                if r.databases.is_empty() || r.databases.iter().any(|d| d == s.database) {
                    let mut k = base(r);
                    part(&mut k, "u", s.user.as_bytes());
                    part(&mut k, "e", e);
                    push(
                        i,
                        r,
                        k,
                        format!(
                            "end user \"{}\" of user \"{}\"",
                            shown(e),
                            shown(s.user.as_bytes())
                        ),
                    );
                }
            }
        }
    }
    if let Some(node) = s.node {
        for (i, r) in rules.iter().enumerate() {
            if r.scope == Scope::Node
                && applies(r)
                && (r.nodes.is_empty() || r.nodes.iter().any(|n| n == node))
            {
                let mut k = base(r);
                part(&mut k, "n", node.as_bytes());
                push(i, r, k, format!("node \"{}\"", shown(node.as_bytes())));
            }
        }
    }
    out
}

/// Whether any rule needs the end user (so the statement's comments are worth scanning).
pub fn wants_end_user(settings: &LimitSettings) -> bool {
    settings.rules.iter().any(|r| r.scope == Scope::EndUser)
}

/// Whether any rule is node-scoped (checked once routing chose the node).
pub fn has_node_rules(settings: &LimitSettings) -> bool {
    settings.rules.iter().any(|r| r.scope == Scope::Node)
}

/// A window length as people write it: `1s`, `250ms`, `1m`, `1h`.
pub fn window_text(ms: u64) -> String {
    match ms {
        m if m % 3_600_000 == 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 => format!("{}m", m / 60_000),
        m if m % 1000 == 0 => format!("{}s", m / 1000),
        m => format!("{m}ms"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(name: &str, scope: Scope, limit: u64, users: &[&str]) -> Rule {
        Rule {
            name: name.into(),
            scope,
            limit,
            window_ms: 1000,
            users: users.iter().map(|u| u.to_string()).collect(),
            databases: Vec::new(),
            nodes: Vec::new(),
            mode: None,
        }
    }

    fn settings(rules: Vec<Rule>) -> LimitSettings {
        LimitSettings {
            rules,
            ..LimitSettings::default()
        }
    }

    fn subject<'a>(user: &'a str, end_user: Option<&'a [u8]>) -> Subject<'a> {
        Subject {
            user,
            database: "app",
            end_user,
            node: None,
        }
    }

    fn names(v: &[Applied]) -> Vec<&str> {
        v.iter().map(|a| a.name.as_str()).collect()
    }

    #[test]
    fn user_rules_are_defaults_unless_a_rule_names_the_user() {
        let s = settings(vec![
            rule("per-user", Scope::User, 100, &[]),
            rule("limited", Scope::User, 20, &["app_limited"]),
            rule("everything", Scope::Global, 5000, &[]),
        ]);
        let a = applicable(&s, subject("app", None), false);
        assert_eq!(names(&a), ["everything", "per-user"]);
        assert_eq!(a[1].key, b"dbopt:rl:per-user:u3:app".to_vec());
        assert_eq!(a[1].counts, "user \"app\"");
        let a = applicable(&s, subject("app_limited", None), false);
        assert_eq!(names(&a), ["everything", "limited"]);
        assert_eq!(a[1].limit, 20);
        assert_eq!(a[0].key, b"dbopt:rl:everything:g".to_vec());
    }

    #[test]
    fn end_user_windows_are_per_router_user_and_only_when_named() {
        let s = settings(vec![rule("per-person", Scope::EndUser, 10, &[])]);
        assert!(applicable(&s, subject("app", None), false).is_empty());
        let a = applicable(&s, subject("app", Some(b"42")), false);
        assert_eq!(a[0].key, b"dbopt:rl:per-person:u3:app:e2:42".to_vec());
        assert_eq!(a[0].counts, "end user \"42\" of user \"app\"");
        // Lengths keep hostile identifiers from colliding with other keys.
        let b = applicable(&s, subject("app:e2:4", Some(b"2")), false);
        assert_ne!(a[0].key, b[0].key);
        let c = applicable(&s, subject("app", Some(b"4\x1b2")), false);
        assert_eq!(c[0].counts, "end user \"4?2\" of user \"app\"");
    }

    #[test]
    fn databases_nodes_and_filters() {
        let mut db = rule("per-db", Scope::Database, 10, &[]);
        db.databases = vec!["app".into()];
        let mut node = rule("per-node", Scope::Node, 10, &[]);
        node.nodes = vec!["pg1".into()];
        let filtered = rule("batch-jobs", Scope::Global, 10, &["etl"]);
        let s = settings(vec![db, node, filtered]);
        let mut sub = subject("app", None);
        assert_eq!(names(&applicable(&s, sub, false)), ["per-db"]);
        sub.database = "other";
        assert!(applicable(&s, sub, false).is_empty());
        sub.node = Some("pg1");
        assert_eq!(names(&applicable(&s, sub, true)), ["per-node"]);
        sub.node = Some("pg2");
        assert!(applicable(&s, sub, true).is_empty());
        let etl = subject("etl", None);
        assert_eq!(names(&applicable(&s, etl, false)), ["per-db", "batch-jobs"]);
    }

    #[test]
    fn warn_mode_per_rule_or_default() {
        let mut r = rule("soft", Scope::Global, 10, &[]);
        r.mode = Some(Mode::Warn);
        let mut s = settings(vec![r, rule("hard", Scope::Global, 10, &[])]);
        let a = applicable(&s, subject("app", None), false);
        assert_eq!((a[0].warn, a[1].warn), (true, false));
        s.mode = Mode::Warn;
        s.rules[0].mode = Some(Mode::Enforce);
        let a = applicable(&s, subject("app", None), false);
        assert_eq!((a[0].warn, a[1].warn), (false, true));
    }

    #[test]
    fn windows_read_as_people_write_them() {
        assert_eq!(window_text(1000), "1s");
        assert_eq!(window_text(250), "250ms");
        assert_eq!(window_text(60_000), "1m");
        assert_eq!(window_text(7_200_000), "2h");
        assert_eq!(window_text(1500), "1500ms");
    }
}
