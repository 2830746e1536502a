//! Session isolation under transaction pooling: what one client leaves in a server session must
//! never reach another client. Pure: the session runs the SQL and feeds the answers back.
//!
//! # The rule, and why it holds
//! - **Settings** (`SET`, `RESET`, `set_config(…, false)`, startup parameters, `options=-c …`):
//!   each client has its own map of session-level settings ([`Settings`]); each server connection
//!   records the settings the router knows are set on it. Before a batch runs, [`plan_sync`] turns
//!   the difference into `RESET name` and `set_config(name, value, false)` calls, so a connection
//!   always carries exactly its current client's settings. After a batch whose classification says
//!   it may have changed the session, [`STATE_SQL`] reads back every setting whose source is
//!   `session` (PostgreSQL's own record of what `SET` changed, from `pg_settings`) into the
//!   client's map: nothing is guessed from the statement text.
//! - **State that cannot be copied** (a role from `SET ROLE`/`SET SESSION AUTHORIZATION`, session
//!   advisory locks, `LISTEN`, temporary tables, SQL `PREPARE`, `WITH HOLD` cursors) **pins** the
//!   client to its connection. The same query reports which of these the session holds
//!   ([`parse_state`]); while any remains, the connection serves nobody else, and it is re-checked
//!   after each of the client's batches, so undoing it (`RESET ROLE`, `UNLISTEN *`, `DROP TABLE`,
//!   `pg_advisory_unlock_all()`, `DEALLOCATE`, `CLOSE`, `DISCARD ALL`) unpins it. A connection still
//!   pinned when its client leaves is closed, not pooled.
//!
//! Costs: nothing for statements that cannot touch the session (plain DML and queries: decided by
//! the cached classification); one round trip after a statement that may, and one before a batch
//! whose client's settings differ from the connection's.

use std::collections::BTreeMap;

/// Session-level settings: lower-case name → value as PostgreSQL prints it in `pg_settings`.
pub type Settings = BTreeMap<String, String>;

/// Reads the session's own settings and what pins it, in one round trip: rows `(name, value)`
/// for every setting whose source is `session`, then one row `('', reasons)` where `reasons` is a
/// comma-separated list of what pins the session (empty when nothing does).
///
/// `role`/`session_authorization` are not in `pg_settings`; a changed role shows as
/// `current_user`/`session_user` differing from the role that logged in (`$2`).
///
/// One statement, every function, operator and type qualified with `pg_catalog`, so a client's
/// `search_path` cannot put its own objects in the way. It runs under the client's own settings:
/// with a `statement_timeout` of a millisecond or so it can fail, and the check then fails closed
/// (the connection is closed, never handed to another client). Measured warm: ≈ 1 ms, most of it
/// `pg_settings`.
///
/// Custom settings (`myapp.tenant`) are placeholders PostgreSQL keeps out of `pg_settings`: their
/// names come in `$1` (a `text[]` of the dotted names the client's statements mention, see
/// [`custom_names`]) and are read with `current_setting(name, true)`; empty means unset.
pub const STATE_SQL: &str = "SELECT pg_catalog.lower(name), setting FROM pg_catalog.pg_settings \
     WHERE source OPERATOR(pg_catalog.=) 'session' \
     UNION ALL SELECT pg_catalog.lower(n), v FROM (SELECT n, pg_catalog.current_setting(n, true) AS v \
     FROM pg_catalog.unnest($1::pg_catalog.text[]) AS n) AS custom \
     WHERE v OPERATOR(pg_catalog.<>) '' \
     UNION ALL SELECT '', pg_catalog.concat_ws(',', \
     CASE WHEN current_user OPERATOR(pg_catalog.<>) $2::pg_catalog.name \
     OR session_user OPERATOR(pg_catalog.<>) $2::pg_catalog.name THEN 'role' END, \
     CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_locks \
     WHERE locktype OPERATOR(pg_catalog.=) 'advisory' \
     AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()) THEN 'advisory lock' END, \
     CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_listening_channels()) THEN 'LISTEN' END, \
     CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_class \
     WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
     THEN 'temporary table' END, \
     CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
     THEN 'PREPARE' END, \
     CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_cursors WHERE is_holdable) \
     THEN 'WITH HOLD cursor' END)";

/// Most custom setting names remembered per client (a bound on what a client can make the
/// router carry).
pub const MAX_CUSTOM_NAMES: usize = 64;

/// Dotted names (`myapp.tenant`, `"MyApp"."Tenant"` → `myapp.tenant`) in `sql`: candidates for
/// custom settings a statement may have set. Table names (`public.t`) come along too and are
/// harmless: they are not settings, so [`STATE_SQL`] finds no value for them.
pub fn custom_names(sql: &str, into: &mut std::collections::BTreeSet<String>) {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
    let mut i = 0;
    while i < b.len() && into.len() < MAX_CUSTOM_NAMES {
        if !(b[i].is_ascii_alphabetic() || b[i] == b'_') || (i > 0 && ident(b[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && ident(b[i]) {
            i += 1;
        }
        if i + 1 < b.len() && b[i] == b'.' && (b[i + 1].is_ascii_alphabetic() || b[i + 1] == b'_') {
            i += 1;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            if let Some(name) = sql.get(start..i) {
                into.insert(name.to_ascii_lowercase());
            }
        }
    }
}

/// The `$1` of [`STATE_SQL`]: names as a `text[]` literal (they are plain identifiers with a
/// dot, so no element needs quoting).
pub fn names_array(names: &std::collections::BTreeSet<String>) -> String {
    let mut out = String::from("{");
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(n);
    }
    out.push('}');
    out
}

/// What [`STATE_SQL`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionState {
    pub settings: Settings,
    /// Why the session cannot serve another client (empty: it can).
    pub pins: Vec<String>,
}

/// Settings the router manages itself and never copies between connections.
const NOT_COPIED: &[&str] = &[
    // Per connection, set by the router at login; a client's own value is re-applied like any.
    "is_superuser",
    "session_authorization",
    "role",
    // Follows the server, not the client.
    "transaction_read_only",
    "transaction_isolation",
    "transaction_deferrable",
];

/// Turns the rows of [`STATE_SQL`] into a [`SessionState`]. `None` when the answer is not the
/// shape the query produces (the connection is then not trusted).
pub fn parse_state(rows: &[Vec<Option<String>>]) -> Option<SessionState> {
    let (last, settings) = rows.split_last()?;
    let [name, reasons] = last.as_slice() else {
        return None;
    };
    if name.as_deref() != Some("") {
        return None;
    }
    let mut state = SessionState::default();
    for row in settings {
        let [Some(name), value] = row.as_slice() else {
            return None;
        };
        if name.is_empty() || NOT_COPIED.contains(&name.as_str()) {
            continue;
        }
        state
            .settings
            .insert(name.clone(), value.clone().unwrap_or_default());
    }
    state.pins = reasons
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .collect();
    Some(state)
}

/// What the router must run on a connection so that its session settings become `wanted`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncPlan {
    /// Names to `RESET` (set on the connection, not wanted).
    pub reset: Vec<String>,
    /// `(name, value)` pairs for `set_config(name, value, false)`.
    pub set: Vec<(String, String)>,
}

impl SyncPlan {
    pub fn is_empty(&self) -> bool {
        self.reset.is_empty() && self.set.is_empty()
    }
}

/// The difference between a connection's session settings (`current`) and a client's (`wanted`).
pub fn plan_sync(current: &Settings, wanted: &Settings) -> SyncPlan {
    SyncPlan {
        reset: current
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect(),
        set: wanted
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// `RESET name` with the name as quoted identifiers (`"a"."b"` for a custom setting): a name is
/// never pasted into SQL as text.
pub fn reset_sql(name: &str) -> String {
    let quoted: Vec<String> = name
        .split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect();
    format!("RESET {}", quoted.join("."))
}

/// A setting name as a client may give it at startup: letters, digits, `_`, `.` and `$`, at most
/// 127 bytes (two identifiers and a dot).
pub fn valid_setting_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'$'))
        && !name.starts_with('.')
        && !name.ends_with('.')
}

/// Why a startup packet's `options` could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionsError(pub String);

/// Parses the `options` startup parameter the way PostgreSQL does for settings: `-c name=value`,
/// `-cname=value` or `--name=value`, separated by spaces (`\ ` is a literal space). Anything else
/// (other postmaster switches) is refused.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, OptionsError> {
    // Split on unescaped whitespace, honouring backslash escapes as pg_split_opts does.
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
                in_word = true;
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
                .ok_or_else(|| OptionsError("-c without a setting in options".into()))?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(OptionsError(format!(
                "only -c name=value settings are allowed in options, not {w:?}"
            )));
        };
        let Some((name, value)) = setting.split_once('=') else {
            return Err(OptionsError(format!(
                "setting {setting:?} in options has no value"
            )));
        };
        // PostgreSQL treats - and _ alike in option names.
        let name = name.replace('-', "_").to_lowercase();
        if !valid_setting_name(&name) {
            return Err(OptionsError(format!(
                "invalid setting name {name:?} in options"
            )));
        }
        out.push((name, value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(a: &str, b: &str) -> Vec<Option<String>> {
        vec![Some(a.into()), Some(b.into())]
    }

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn state_rows_become_settings_and_pins() {
        let rows = vec![
            row("timezone", "Asia/Tokyo"),
            row("statement_timeout", "5000"),
            row("is_superuser", "off"),
            row("", "role,temporary table"),
        ];
        let s = parse_state(&rows).unwrap();
        assert_eq!(
            s.settings,
            settings(&[("statement_timeout", "5000"), ("timezone", "Asia/Tokyo")])
        );
        assert_eq!(s.pins, vec!["role", "temporary table"]);
        let clean = parse_state(&[row("", "")]).unwrap();
        assert!(clean.pins.is_empty() && clean.settings.is_empty());
        // A NULL setting value (possible for custom placeholders) is kept as empty.
        let null = parse_state(&[vec![Some("a.b".into()), None], row("", "")]).unwrap();
        assert_eq!(null.settings, settings(&[("a.b", "")]));
    }

    #[test]
    fn unexpected_answers_are_not_trusted() {
        assert_eq!(parse_state(&[]), None);
        assert_eq!(parse_state(&[row("timezone", "UTC")]), None);
        assert_eq!(parse_state(&[vec![Some("".into())]]), None);
        assert_eq!(
            parse_state(&[vec![None, Some("x".into())], row("", "")]),
            None
        );
    }

    #[test]
    fn sync_resets_what_the_client_lacks_and_sets_what_differs() {
        let conn = settings(&[("timezone", "Asia/Tokyo"), ("work_mem", "65536")]);
        let client = settings(&[("timezone", "UTC"), ("application_name", "web")]);
        let plan = plan_sync(&conn, &client);
        assert_eq!(plan.reset, vec!["work_mem"]);
        assert_eq!(
            plan.set,
            vec![
                ("application_name".to_string(), "web".to_string()),
                ("timezone".to_string(), "UTC".to_string())
            ]
        );
        assert!(plan_sync(&client, &client).is_empty());
        assert!(plan_sync(&Settings::new(), &Settings::new()).is_empty());
    }

    #[test]
    fn alternating_clients_never_see_each_others_settings() {
        // Two clients take turns on one connection 1,000 times: after each sync the connection
        // carries exactly the current client's settings.
        let a = settings(&[("timezone", "Asia/Tokyo")]);
        let b = settings(&[("timezone", "America/New_York"), ("datestyle", "SQL, DMY")]);
        let mut conn = Settings::new();
        for i in 0..1000 {
            let wanted = if i % 2 == 0 { &a } else { &b };
            let plan = plan_sync(&conn, wanted);
            for name in &plan.reset {
                conn.remove(name);
            }
            for (k, v) in plan.set {
                conn.insert(k, v);
            }
            assert_eq!(&conn, wanted);
        }
    }

    #[test]
    fn reset_quotes_every_part_of_the_name() {
        assert_eq!(reset_sql("timezone"), "RESET \"timezone\"");
        assert_eq!(reset_sql("myapp.tenant"), "RESET \"myapp\".\"tenant\"");
        assert_eq!(
            reset_sql("a\"; DROP TABLE t; --"),
            "RESET \"a\"\"; DROP TABLE t; --\""
        );
    }

    #[test]
    fn custom_setting_names_are_collected() {
        let mut names = std::collections::BTreeSet::new();
        custom_names(
            "SET myapp.tenant = '7'; SELECT set_config('Other.Thing', 'x', false) FROM public.t; \
             select 1.5, a.b",
            &mut names,
        );
        let got: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(got, ["a.b", "myapp.tenant", "other.thing", "public.t"]);
        assert_eq!(
            names_array(&names),
            "{a.b,myapp.tenant,other.thing,public.t}"
        );
        for i in 0..200 {
            custom_names(&format!("SET x{i}.y = 1"), &mut names);
        }
        assert_eq!(names.len(), MAX_CUSTOM_NAMES);
        assert_eq!(names_array(&Default::default()), "{}");
    }

    #[test]
    fn setting_names() {
        assert!(valid_setting_name("timezone"));
        assert!(valid_setting_name("myapp.tenant_id"));
        assert!(!valid_setting_name(""));
        assert!(!valid_setting_name("a b"));
        assert!(!valid_setting_name("x;drop"));
        assert!(!valid_setting_name(".x"));
        assert!(!valid_setting_name(&"a".repeat(200)));
    }

    #[test]
    fn options_like_postgresql() {
        assert_eq!(
            parse_options("-c statement_timeout=5s --search-path=a,b -cwork_mem=64MB").unwrap(),
            vec![
                ("statement_timeout".to_string(), "5s".to_string()),
                ("search_path".to_string(), "a,b".to_string()),
                ("work_mem".to_string(), "64MB".to_string()),
            ]
        );
        assert_eq!(
            parse_options("-c application_name=a\\ b").unwrap(),
            vec![("application_name".to_string(), "a b".to_string())]
        );
        assert_eq!(parse_options("  ").unwrap(), vec![]);
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c novalue").is_err());
        assert!(parse_options("-D /tmp").is_err());
        assert!(parse_options("-c bad;name=1").is_err());
    }
}
