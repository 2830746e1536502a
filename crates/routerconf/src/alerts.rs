//! The `[alerts]` section: which conditions alert, with what thresholds, through which channels.
//!
//! Every alert kind is on with its default threshold as soon as a channel exists; `[[alerts.rules]]`
//! entries change one kind (threshold, severity, channels, `enabled = false`).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertSettings {
    /// The `cluster` label on every alert (Alertmanager receivers group and route on labels).
    pub cluster: String,
    /// How often conditions are evaluated.
    pub interval_ms: u64,
    /// A still-firing alert is sent again after this long (Alertmanager's `repeat_interval`).
    pub renotify_s: u64,
    /// Notifications kept in memory for `GET /alerts`.
    pub history: usize,
    /// Where a receiver can see more (`externalURL` in webhook payloads); default: the admin
    /// endpoint's `/alerts`.
    pub external_url: Option<String>,
    pub channels: Vec<Channel>,
    pub rules: Vec<RuleSetting>,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            cluster: "dbopt".into(),
            interval_ms: 1000,
            renotify_s: 3600,
            history: 500,
            external_url: None,
            channels: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// What is alerted on. Configuration names are snake_case (`replica_lag`); the `alertname` label
/// (`ReplicaLag`, what README's table and every payload show) is accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The primary moved to another node (failover or switchover); resolves once the new one has
    /// held the role for `resolve_after_s`.
    #[serde(alias = "PrimaryChanged")]
    PrimaryChanged,
    /// A replica's replay lag above `threshold` seconds (default 5).
    #[serde(alias = "ReplicaLag")]
    ReplicaLag,
    /// A node the router cannot reach or check.
    #[serde(alias = "NodeDown")]
    NodeDown,
    /// A node's circuit breaker is open (or half-open, probing).
    #[serde(alias = "BreakerOpen")]
    BreakerOpen,
    /// A pool's connections in use above `threshold` of its maximum (default 0.8).
    #[serde(alias = "PoolSaturation")]
    PoolSaturation,
    /// Errors (server errors, pool timeouts) per second over the last minute above `threshold`
    /// (default 1).
    #[serde(alias = "ErrorRate")]
    ErrorRate,
    /// Slow statements (over `dbopt.slow_query_ms`) on a node in the last minute above
    /// `threshold` (default 10).
    #[serde(alias = "SlowStatements")]
    SlowStatements,
    /// Cache invalidations that may have been missed in the last minute above `threshold`
    /// (default 0: any).
    #[serde(alias = "CacheInvalidationFailures")]
    CacheInvalidationFailures,
    /// Statements refused by a `[limits]` rule in the last minute above `threshold` (default 100).
    #[serde(alias = "RateLimitRefusals")]
    RateLimitRefusals,
}

impl AlertKind {
    pub const ALL: [AlertKind; 9] = [
        AlertKind::PrimaryChanged,
        AlertKind::ReplicaLag,
        AlertKind::NodeDown,
        AlertKind::BreakerOpen,
        AlertKind::PoolSaturation,
        AlertKind::ErrorRate,
        AlertKind::SlowStatements,
        AlertKind::CacheInvalidationFailures,
        AlertKind::RateLimitRefusals,
    ];

    /// The `alertname` label.
    pub fn alertname(self) -> &'static str {
        match self {
            AlertKind::PrimaryChanged => "PrimaryChanged",
            AlertKind::ReplicaLag => "ReplicaLag",
            AlertKind::NodeDown => "NodeDown",
            AlertKind::BreakerOpen => "BreakerOpen",
            AlertKind::PoolSaturation => "PoolSaturation",
            AlertKind::ErrorRate => "ErrorRate",
            AlertKind::SlowStatements => "SlowStatements",
            AlertKind::CacheInvalidationFailures => "CacheInvalidationFailures",
            AlertKind::RateLimitRefusals => "RateLimitRefusals",
        }
    }

    pub fn default_threshold(self) -> f64 {
        match self {
            AlertKind::ReplicaLag => 5.0,
            AlertKind::PoolSaturation => 0.8,
            AlertKind::ErrorRate => 1.0,
            AlertKind::SlowStatements => 10.0,
            AlertKind::RateLimitRefusals => 100.0,
            AlertKind::PrimaryChanged
            | AlertKind::NodeDown
            | AlertKind::BreakerOpen
            | AlertKind::CacheInvalidationFailures => 0.0,
        }
    }

    pub fn default_severity(self) -> Severity {
        match self {
            AlertKind::PrimaryChanged | AlertKind::NodeDown => Severity::Critical,
            AlertKind::RateLimitRefusals => Severity::Info,
            _ => Severity::Warning,
        }
    }

    fn uses_threshold(self) -> bool {
        !matches!(
            self,
            AlertKind::PrimaryChanged | AlertKind::NodeDown | AlertKind::BreakerOpen
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetting {
    pub alert: AlertKind,
    #[serde(default = "yes")]
    pub enabled: bool,
    pub threshold: Option<f64>,
    /// The condition must hold this long before the alert fires (Prometheus' `for`).
    #[serde(default)]
    pub for_s: u64,
    pub severity: Option<Severity>,
    /// Channel names; default: every channel.
    pub channels: Option<Vec<String>>,
    /// `primary_changed` only: resolved once the new primary held the role this long (default 60).
    pub resolve_after_s: Option<u64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// POST of Alertmanager's webhook payload (version 4) to `url`.
    Webhook,
    /// POST of `{"text": …}` to `url` (Slack incoming webhooks and compatibles).
    Slack,
    /// A mail to `to` through the SMTP server `smtp_server`.
    Smtp,
    /// A structured WARN line in the router's log.
    Log,
    /// A row in `dbopt.alert_history` on the primary and `NOTIFY notify_channel`.
    Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (a local relay).
    None,
    /// STARTTLS after EHLO (port 587); the server's certificate is verified.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    pub name: String,
    pub kind: ChannelKind,
    /// webhook, slack: `http://…` or `https://…`.
    pub url: Option<String>,
    /// webhook: a bearer token sent as `Authorization: Bearer …`.
    pub bearer_token: Option<String>,
    /// smtp: `host:port`.
    pub smtp_server: Option<String>,
    #[serde(default)]
    pub smtp_tls: SmtpTls,
    pub smtp_username: Option<String>,
    pub smtp_password: Option<String>,
    /// smtp: the sender and recipients.
    pub from: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    /// notify: the NOTIFY channel (default `dbopt_alerts`).
    pub notify_channel: Option<String>,
    /// One attempt's limit.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts after the first (backoff 1 s, doubling, at most 60 s) before a notification is
    /// given up on (logged and counted).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_timeout_ms() -> u64 {
    5000
}

fn default_retries() -> u32 {
    5
}

/// What one kind does once settings are applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub enabled: bool,
    pub threshold: f64,
    pub for_ms: u64,
    pub severity: Severity,
    /// Indexes into `channels`.
    pub channels: Vec<usize>,
    pub resolve_after_ms: u64,
}

impl AlertSettings {
    pub fn active(&self) -> bool {
        !self.channels.is_empty()
    }

    /// The settings of `kind` (defaults, then its rule).
    pub fn effective(&self, kind: AlertKind) -> Effective {
        let rule = self.rules.iter().find(|r| r.alert == kind);
        let channels = match rule.and_then(|r| r.channels.as_ref()) {
            Some(names) => self
                .channels
                .iter()
                .enumerate()
                .filter(|(_, c)| names.contains(&c.name))
                .map(|(i, _)| i)
                .collect(),
            None => (0..self.channels.len()).collect(),
        };
        Effective {
            enabled: rule.is_none_or(|r| r.enabled),
            threshold: rule
                .and_then(|r| r.threshold)
                .unwrap_or_else(|| kind.default_threshold()),
            for_ms: rule.map_or(0, |r| r.for_s.saturating_mul(1000)),
            severity: rule
                .and_then(|r| r.severity)
                .unwrap_or_else(|| kind.default_severity()),
            channels,
            resolve_after_ms: rule
                .and_then(|r| r.resolve_after_s)
                .unwrap_or(60)
                .saturating_mul(1000),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: String, message: String| ConfigError {
            field: Some(field),
            message,
        };
        if self.cluster.is_empty()
            || self.cluster.len() > 63
            || self.cluster.chars().any(char::is_control)
        {
            return Err(bad(
                "alerts.cluster".into(),
                "must be 1 to 63 characters without control characters".into(),
            ));
        }
        if !(100..=60_000).contains(&self.interval_ms) {
            return Err(bad(
                "alerts.interval_ms".into(),
                format!("must be between 100 and 60000, got {}", self.interval_ms),
            ));
        }
        if !(60..=7 * 86_400).contains(&self.renotify_s) {
            return Err(bad(
                "alerts.renotify_s".into(),
                format!("must be between 60 and 604800, got {}", self.renotify_s),
            ));
        }
        if !(1..=100_000).contains(&self.history) {
            return Err(bad(
                "alerts.history".into(),
                format!("must be between 1 and 100000, got {}", self.history),
            ));
        }
        if let Some(u) = &self.external_url {
            check_url("alerts.external_url", u)?;
        }
        let mut names = HashSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let f = |k: &str| format!("alerts.channels[{i}].{k}");
            if c.name.is_empty()
                || c.name.len() > 63
                || !c
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                return Err(bad(
                    f("name"),
                    "must be 1 to 63 of A-Z a-z 0-9 - _ .".into(),
                ));
            }
            if !names.insert(c.name.as_str()) {
                return Err(bad(
                    f("name"),
                    format!("channel {:?} is defined twice", c.name),
                ));
            }
            if !(100..=120_000).contains(&c.timeout_ms) {
                return Err(bad(
                    f("timeout_ms"),
                    format!("must be between 100 and 120000, got {}", c.timeout_ms),
                ));
            }
            if c.retries > 20 {
                return Err(bad(f("retries"), format!("at most 20, got {}", c.retries)));
            }
            let need = |key: &str, v: &Option<String>| match v {
                Some(s) if !s.is_empty() => Ok(()),
                _ => Err(bad(
                    f(key),
                    format!("required for kind = {:?}", kind_name(c.kind)),
                )),
            };
            let refuse = |key: &str, set: bool| {
                if set {
                    Err(bad(
                        f(key),
                        format!("not used by kind = {:?}", kind_name(c.kind)),
                    ))
                } else {
                    Ok(())
                }
            };
            let is_smtp = c.kind == ChannelKind::Smtp;
            let is_http = matches!(c.kind, ChannelKind::Webhook | ChannelKind::Slack);
            if is_http {
                need("url", &c.url)?;
                check_url(&f("url"), c.url.as_deref().unwrap_or_default())?;
            } else {
                refuse("url", c.url.is_some())?;
            }
            refuse(
                "bearer_token",
                c.kind != ChannelKind::Webhook && c.bearer_token.is_some(),
            )?;
            if let Some(t) = &c.bearer_token {
                if t.is_empty() || !t.chars().all(|ch| ch.is_ascii_graphic()) {
                    return Err(bad(
                        f("bearer_token"),
                        "must be printable ASCII without spaces".into(),
                    ));
                }
            }
            if is_smtp {
                need("smtp_server", &c.smtp_server)?;
                crate::config::check_host_port(
                    &f("smtp_server"),
                    c.smtp_server.as_deref().unwrap_or_default(),
                )?;
                need("from", &c.from)?;
                check_address(&f("from"), c.from.as_deref().unwrap_or_default())?;
                if c.to.is_empty() {
                    return Err(bad(f("to"), "at least one recipient".into()));
                }
                for (j, a) in c.to.iter().enumerate() {
                    check_address(&format!("alerts.channels[{i}].to[{j}]"), a)?;
                }
                if c.smtp_username.is_some() != c.smtp_password.is_some() {
                    return Err(bad(
                        f("smtp_password"),
                        "smtp_username and smtp_password go together".into(),
                    ));
                }
                if c.smtp_username.is_some() && c.smtp_tls == SmtpTls::None {
                    return Err(bad(
                        f("smtp_tls"),
                        "a password is never sent over plain SMTP: use starttls or tls".into(),
                    ));
                }
            } else {
                refuse("smtp_server", c.smtp_server.is_some())?;
                refuse("smtp_username", c.smtp_username.is_some())?;
                refuse("from", c.from.is_some())?;
                refuse("to", !c.to.is_empty())?;
            }
            if c.kind == ChannelKind::Notify {
                if let Some(n) = &c.notify_channel {
                    if n.is_empty() || n.len() > 63 || n.chars().any(char::is_control) {
                        return Err(bad(
                            f("notify_channel"),
                            "must be 1 to 63 characters without control characters".into(),
                        ));
                    }
                }
            } else {
                refuse("notify_channel", c.notify_channel.is_some())?;
            }
        }
        let mut seen = HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let f = |k: &str| format!("alerts.rules[{i}].{k}");
            if !seen.insert(r.alert) {
                return Err(bad(
                    f("alert"),
                    format!("{:?} has a rule already: one rule per alert", r.alert),
                ));
            }
            if let Some(t) = r.threshold {
                if !r.alert.uses_threshold() {
                    return Err(bad(
                        f("threshold"),
                        format!("{:?} takes no threshold", r.alert),
                    ));
                }
                let ok = t.is_finite()
                    && t >= 0.0
                    && (r.alert != AlertKind::PoolSaturation || (t > 0.0 && t <= 1.0));
                if !ok {
                    return Err(bad(
                        f("threshold"),
                        if r.alert == AlertKind::PoolSaturation {
                            format!("a fraction of the pool, above 0 and at most 1, got {t}")
                        } else {
                            format!("must be a finite number ≥ 0, got {t}")
                        },
                    ));
                }
            }
            if r.for_s > 86_400 {
                return Err(bad(f("for_s"), format!("at most 86400, got {}", r.for_s)));
            }
            if let Some(s) = r.resolve_after_s {
                if r.alert != AlertKind::PrimaryChanged {
                    return Err(bad(f("resolve_after_s"), "primary_changed only".into()));
                }
                if !(1..=86_400).contains(&s) {
                    return Err(bad(
                        f("resolve_after_s"),
                        format!("must be between 1 and 86400, got {s}"),
                    ));
                }
            }
            if let Some(chs) = &r.channels {
                for (j, name) in chs.iter().enumerate() {
                    if !self.channels.iter().any(|c| &c.name == name) {
                        return Err(bad(
                            format!("alerts.rules[{i}].channels[{j}]"),
                            format!("no channel named {name:?} in [[alerts.channels]]"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

pub fn kind_name(k: ChannelKind) -> &'static str {
    match k {
        ChannelKind::Webhook => "webhook",
        ChannelKind::Slack => "slack",
        ChannelKind::Smtp => "smtp",
        ChannelKind::Log => "log",
        ChannelKind::Notify => "notify",
    }
}

fn check_url(field: &str, u: &str) -> Result<(), ConfigError> {
    crate::url::Target::parse(u)
        .map(|_| ())
        .map_err(|m| ConfigError {
            field: Some(field.into()),
            message: m,
        })
}

/// A mail address as SMTP carries it: `local@domain`, no spaces, brackets or control characters
/// (they would end the SMTP command).
fn check_address(field: &str, a: &str) -> Result<(), ConfigError> {
    let ok = a.len() <= 254
        && a.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !a
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>\",;".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ConfigError {
            field: Some(field.into()),
            message: format!("not a mail address: {a:?}"),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AlertSettings, ConfigError> {
        let s: AlertSettings = toml::from_str(text).map_err(|e| ConfigError {
            field: None,
            message: e.to_string(),
        })?;
        s.validate()?;
        Ok(s)
    }

    const HOOK: &str =
        "[[channels]]\nname = \"am\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9093/hook\"\n";

    #[test]
    fn every_kind_is_on_with_defaults_and_rules_override_one() {
        let s = parse(&format!(
            "{HOOK}[[channels]]\nname = \"log\"\nkind = \"log\"\n\
             [[rules]]\nalert = \"replica_lag\"\nthreshold = 2.5\nchannels = [\"log\"]\nseverity = \"critical\"\n\
             [[rules]]\nalert = \"rate_limit_refusals\"\nenabled = false\n"
        ))
        .unwrap();
        let lag = s.effective(AlertKind::ReplicaLag);
        assert_eq!(
            (lag.threshold, lag.channels.clone(), lag.severity),
            (2.5, vec![1], Severity::Critical)
        );
        let pool = s.effective(AlertKind::PoolSaturation);
        assert_eq!(
            (pool.threshold, pool.channels, pool.enabled),
            (0.8, vec![0, 1], true)
        );
        assert!(!s.effective(AlertKind::RateLimitRefusals).enabled);
        assert_eq!(
            s.effective(AlertKind::PrimaryChanged).resolve_after_ms,
            60_000
        );
    }

    #[test]
    fn rules_name_a_kind_as_configured_or_as_its_alertname() {
        for kind in AlertKind::ALL {
            let snake = toml::Value::try_from(kind).unwrap();
            let snake = snake.as_str().unwrap();
            for name in [snake, kind.alertname()] {
                let s = parse(&format!(
                    "{HOOK}[[rules]]\nalert = \"{name}\"\nenabled = false\n"
                ))
                .unwrap();
                assert!(!s.effective(kind).enabled, "{name}");
            }
        }
        // The same kind under both names is still one kind named twice.
        let e = parse(&format!(
            "{HOOK}[[rules]]\nalert = \"replica_lag\"\n[[rules]]\nalert = \"ReplicaLag\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("alerts.rules[1].alert"));
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (extra, field) in [
            ("[[channels]]\nname = \"x\"\nkind = \"webhook\"\n", "alerts.channels[1].url"),
            ("[[channels]]\nname = \"x\"\nkind = \"webhook\"\nurl = \"ftp://a/b\"\n", "alerts.channels[1].url"),
            ("[[channels]]\nname = \"am\"\nkind = \"log\"\n", "alerts.channels[1].name"),
            ("[[channels]]\nname = \"x y\"\nkind = \"log\"\n", "alerts.channels[1].name"),
            ("[[channels]]\nname = \"m\"\nkind = \"smtp\"\nsmtp_server = \"127.0.0.1:25\"\nfrom = \"a@b\"\n", "alerts.channels[1].to"),
            ("[[channels]]\nname = \"m\"\nkind = \"smtp\"\nsmtp_server = \"127.0.0.1:25\"\nfrom = \"a@b\"\nto = [\"x@y\\r\\nRCPT TO:<z@q>\"]\n", "alerts.channels[1].to[0]"),
            ("[[channels]]\nname = \"m\"\nkind = \"smtp\"\nsmtp_server = \"127.0.0.1:25\"\nsmtp_tls = \"none\"\nsmtp_username = \"u\"\nsmtp_password = \"p\"\nfrom = \"a@b\"\nto = [\"c@d\"]\n", "alerts.channels[1].smtp_tls"),
            ("[[channels]]\nname = \"l\"\nkind = \"log\"\nurl = \"http://x/\"\n", "alerts.channels[1].url"),
            ("[[channels]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://x/\"\nbearer_token = \"a\\r\\nX: y\"\n", "alerts.channels[1].bearer_token"),
            ("[[rules]]\nalert = \"pool_saturation\"\nthreshold = 80\n", "alerts.rules[0].threshold"),
            ("[[rules]]\nalert = \"node_down\"\nthreshold = 1\n", "alerts.rules[0].threshold"),
            ("[[rules]]\nalert = \"replica_lag\"\nchannels = [\"nope\"]\n", "alerts.rules[0].channels[0]"),
            ("[[rules]]\nalert = \"replica_lag\"\n[[rules]]\nalert = \"replica_lag\"\n", "alerts.rules[1].alert"),
            ("[[rules]]\nalert = \"replica_lag\"\nresolve_after_s = 5\n", "alerts.rules[0].resolve_after_s"),
        ] {
            let e = parse(&format!("{HOOK}{extra}")).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{extra}: {e}");
        }
        let e = parse("interval_ms = 5\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("alerts.interval_ms"));
        let e = parse(&format!("{HOOK}[[rules]]\nalert = \"nope\"\n")).unwrap_err();
        assert!(e.message.contains("unknown variant"), "{e}");
    }
}
