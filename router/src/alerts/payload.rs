//! What each channel sends, pure: Alertmanager's webhook payload (version 4), a Slack message, a
//! mail, a log line, and the JSON kept in `dbopt.alert_history` / `GET /alerts`.

use serde_json::{json, Value};

use super::engine::{Notification, Status};
use crate::log::utc_ms;

/// Alertmanager's zero time, what it sends as `endsAt` for firing alerts.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// One alert as Alertmanager's webhook (and its API) shows it.
pub fn alert_json(n: &Notification, generator_url: &str) -> Value {
    json!({
        "status": n.status.name(),
        "labels": n.labels,
        "annotations": annotations(n),
        "startsAt": utc_ms(n.starts_at_ms),
        "endsAt": n.ends_at_ms.map_or_else(|| ZERO_TIME.to_string(), utc_ms),
        "generatorURL": generator_url,
        "fingerprint": n.fingerprint,
    })
}

pub fn annotations(n: &Notification) -> Value {
    json!({
        "summary": n.summary,
        "value": format_value(n.value),
    })
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// The body Alertmanager POSTs to a webhook receiver (`version: "4"`), for one alert: existing
/// receivers (alertmanager-webhook-logger, PagerDuty/Opsgenie bridges...) take it as it is.
pub fn alertmanager_webhook(n: &Notification, receiver: &str, external_url: &str) -> Value {
    let group_labels = json!({ "alertname": n.labels.get("alertname") });
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{}\"}}", n.kind.alertname()),
        "truncatedAlerts": 0,
        "status": n.status.name(),
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": n.labels,
        "commonAnnotations": annotations(n),
        "externalURL": external_url,
        "alerts": [alert_json(n, external_url)],
    })
}

fn headline(n: &Notification) -> String {
    let tag = match n.status {
        Status::Firing if n.repeat => "FIRING, still",
        Status::Firing => "FIRING",
        Status::Resolved => "RESOLVED",
    };
    format!(
        "[{tag}] {} ({}, {}): {}",
        n.kind.alertname(),
        n.severity.name(),
        n.labels.get("cluster").map_or("", String::as_str),
        n.summary
    )
}

/// A Slack incoming-webhook body.
pub fn slack(n: &Notification) -> Value {
    json!({ "text": headline(n) })
}

/// The subject and plain-text body of a mail.
pub fn mail(n: &Notification, external_url: &str) -> (String, String) {
    let subject = format!(
        "[dbopt {}] {} {}",
        match n.status {
            Status::Firing => "FIRING",
            Status::Resolved => "RESOLVED",
        },
        n.kind.alertname(),
        n.labels
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "alertname" | "severity" | "cluster"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut body = format!("{}\n\n", headline(n));
    body.push_str(&format!("Started: {}\n", utc_ms(n.starts_at_ms)));
    if let Some(e) = n.ends_at_ms {
        body.push_str(&format!("Ended:   {}\n", utc_ms(e)));
    }
    body.push_str("Labels:\n");
    for (k, v) in &n.labels {
        body.push_str(&format!("  {k} = {v}\n"));
    }
    body.push_str(&format!(
        "Fingerprint: {}\nMore: {external_url}\n",
        n.fingerprint
    ));
    (subject, body)
}

/// The structured log line (key=value, values quoted; the logger escapes control characters).
pub fn log_line(n: &Notification) -> String {
    let mut s = format!(
        "alert status={} alertname={} severity={} fingerprint={}",
        n.status.name(),
        n.kind.alertname(),
        n.severity.name(),
        n.fingerprint
    );
    for (k, v) in n
        .labels
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "alertname" | "severity"))
    {
        s.push_str(&format!(" {k}={}", quoted(v)));
    }
    s.push_str(&format!(" summary={}", quoted(&n.summary)));
    if n.repeat {
        s.push_str(" repeat=true");
    }
    s
}

fn quoted(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A notification as `GET /alerts` lists it (Alertmanager's fields plus when it was sent).
pub fn history_json(n: &Notification, external_url: &str) -> Value {
    let mut v = alert_json(n, external_url);
    v["sentAt"] = json!(utc_ms(n.sent_at_ms));
    v["repeat"] = json!(n.repeat);
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::alerts::settings::{AlertKind, Severity};

    fn n(status: Status) -> Notification {
        Notification {
            fingerprint: "0123456789abcdef".into(),
            kind: AlertKind::ReplicaLag,
            status,
            severity: Severity::Warning,
            labels: [
                ("alertname", "ReplicaLag"),
                ("cluster", "c1"),
                ("node", "node2"),
                ("severity", "warning"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            summary: "replica node2 replays 7.5 s behind (threshold 5 s)".into(),
            value: 7.5,
            starts_at_ms: 1_764_201_845_123,
            ends_at_ms: (status == Status::Resolved).then_some(1_764_201_900_000),
            sent_at_ms: 1_764_201_900_000,
            repeat: false,
        }
    }

    #[test]
    fn webhook_has_alertmanagers_v4_shape() {
        let v = alertmanager_webhook(&n(Status::Firing), "ops", "http://r:1/alerts");
        assert_eq!(v["version"], "4");
        assert_eq!(v["status"], "firing");
        assert_eq!(v["receiver"], "ops");
        assert_eq!(v["groupLabels"]["alertname"], "ReplicaLag");
        assert_eq!(v["commonLabels"]["node"], "node2");
        assert_eq!(v["groupKey"], "{}:{alertname=\"ReplicaLag\"}");
        let a = &v["alerts"][0];
        assert_eq!(a["startsAt"], "2025-11-27T00:04:05.123Z");
        assert_eq!(a["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(a["fingerprint"], "0123456789abcdef");
        assert_eq!(a["annotations"]["value"], "7.500");
        let r = alertmanager_webhook(&n(Status::Resolved), "ops", "x");
        assert_eq!(r["alerts"][0]["endsAt"], "2025-11-27T00:05:00.000Z");
        assert_eq!(r["status"], "resolved");
    }

    #[test]
    fn slack_mail_and_log_name_the_alert() {
        assert_eq!(
            slack(&n(Status::Firing))["text"],
            "[FIRING] ReplicaLag (warning, c1): replica node2 replays 7.5 s behind (threshold 5 s)"
        );
        let (subject, body) = mail(&n(Status::Resolved), "http://r/alerts");
        assert_eq!(subject, "[dbopt RESOLVED] ReplicaLag node=node2");
        assert!(body.contains("Ended:   2025-11-27T00:05:00.000Z"), "{body}");
        let mut hostile = n(Status::Firing);
        hostile.summary = "a \"quoted\" \\ summary".into();
        let line = log_line(&hostile);
        assert!(line.starts_with("alert status=firing alertname=ReplicaLag severity=warning fingerprint=0123456789abcdef cluster=\"c1\" node=\"node2\""), "{line}");
        assert!(
            line.ends_with("summary=\"a \\\"quoted\\\" \\\\ summary\""),
            "{line}"
        );
    }
}
