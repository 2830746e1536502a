//! End-to-end: alerts of a real stack reach every configured channel — an Alertmanager-style
//! webhook, a Slack-style webhook, mail through a local SMTP sink (aiosmtpd), the router's log, and
//! `dbopt.alert_history` + NOTIFY on the primary — once when they fire and once when they resolve;
//! a webhook that never answers and one that fails delay nothing else; a failover while no router
//! runs is reported by Patroni's callback.
//!
//! One stack (slot 3), steps in order: replica lag, pool saturation, a stopped replica (node down
//! and breaker), the primary node killed (failover), then a switchover with the router stopped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dbopt_e2e::receivers::{DeadWebhook, Received, SmtpSink, WebhookReceiver};
use dbopt_e2e::stack::Stack;
use dbopt_e2e::{http, wait_for};

struct Sinks {
    hook: WebhookReceiver,
    smtp: SmtpSink,
    _dead: DeadWebhook,
}

fn labels_match(v: &serde_json::Value, want: &[(&str, &str)]) -> bool {
    want.iter().all(|(k, val)| v[*k].as_str() == Some(*val))
}

/// Webhook notifications (Alertmanager v4 payloads) on `path` for `alertname` with `labels`, as
/// (status, payload).
fn webhook(
    s: &Sinks,
    path: &str,
    alertname: &str,
    labels: &[(&str, &str)],
) -> Vec<(String, Received)> {
    s.hook
        .on(path)
        .into_iter()
        .filter_map(|r| {
            let v = r.json();
            let a = &v["alerts"][0];
            (a["labels"]["alertname"] == alertname && labels_match(&a["labels"], labels))
                .then(|| (a["status"].as_str().unwrap_or("").to_string(), r.clone()))
        })
        .collect()
}

fn count(v: &[(String, Received)], status: &str) -> usize {
    v.iter().filter(|(s, _)| s == status).count()
}

/// Slack messages naming `alertname` and containing `needle`, as (FIRING|RESOLVED, text).
fn slack(s: &Sinks, alertname: &str, needle: &str) -> Vec<String> {
    s.hook
        .on("/slack")
        .into_iter()
        .filter_map(|r| r.json()["text"].as_str().map(str::to_string))
        .filter(|t| t.contains(&format!(" {alertname} (")) && t.contains(needle))
        .collect()
}

/// Mails whose subject starts `[dbopt STATUS] ALERTNAME`, containing `needle` in the subject.
fn mails(s: &Sinks, status: &str, alertname: &str, needle: &str) -> usize {
    s.smtp
        .messages()
        .iter()
        .filter(|m| {
            m.lines().any(|l| {
                l.starts_with(&format!("Subject: [dbopt {status}] {alertname}"))
                    && l.contains(needle)
            })
        })
        .count()
}

/// Rows of dbopt.alert_history on the current primary: status → count.
fn history(stack: &Stack, alertname: &str, label: (&str, &str)) -> BTreeMap<String, i64> {
    let Some(primary) = stack.primary() else {
        return BTreeMap::new();
    };
    let Ok(mut c) = stack.connect(&primary) else {
        return BTreeMap::new();
    };
    c.query(
        "SELECT status, count(*) FROM dbopt.alert_history
         WHERE alertname = $1 AND labels ->> $2 = $3 GROUP BY status",
        &[&alertname, &label.0, &label.1],
    )
    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    .unwrap_or_default()
}

fn alerts_doc(stack: &Stack) -> serde_json::Value {
    let (code, body) = http::get(stack.info.router_admin_port, "/alerts").expect("GET /alerts");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("/alerts is JSON")
}

/// Waits until the alert has fired and resolved on every channel, exactly once each.
fn fired_and_resolved_everywhere(
    stack: &Stack,
    s: &Sinks,
    alertname: &str,
    label: (&str, &str),
    limit: Duration,
) {
    let what = format!(
        "{alertname} {}={} fired and resolved on every channel",
        label.0, label.1
    );
    wait_for(limit, &what, || {
        let w = webhook(s, "/am", alertname, &[label]);
        let sl = slack(s, alertname, label.1);
        let h = history(stack, alertname, label);
        let done = count(&w, "firing") >= 1
            && count(&w, "resolved") >= 1
            && sl.iter().any(|t| t.starts_with("[FIRING]"))
            && sl.iter().any(|t| t.starts_with("[RESOLVED]"))
            && mails(s, "FIRING", alertname, label.1) >= 1
            && mails(s, "RESOLVED", alertname, label.1) >= 1
            && h.get("firing").copied().unwrap_or(0) >= 1
            && h.get("resolved").copied().unwrap_or(0) >= 1;
        done.then_some(())
    });
    // Deduplicated: once each (re-notification is an hour away).
    let w = webhook(s, "/am", alertname, &[label]);
    assert_eq!(
        (count(&w, "firing"), count(&w, "resolved")),
        (1, 1),
        "{what}: webhook"
    );
    let fp: Vec<_> = w
        .iter()
        .map(|(_, r)| {
            r.json()["alerts"][0]["fingerprint"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        fp[0].len() == 16 && fp[0] == fp[1],
        "one fingerprint for firing and resolved: {fp:?}"
    );
    assert_eq!(slack(s, alertname, label.1).len(), 2, "{what}: slack");
    assert_eq!(mails(s, "FIRING", alertname, label.1), 1, "{what}: mail");
    assert_eq!(mails(s, "RESOLVED", alertname, label.1), 1, "{what}: mail");
    let h = history(stack, alertname, label);
    assert_eq!(
        (h.get("firing"), h.get("resolved")),
        (Some(&1), Some(&1)),
        "{what}: history"
    );
}

#[test]
fn alerts_reach_every_channel() {
    let base = dbopt_e2e::e2e_port(300);
    let (hook_port, dead_port, smtp_port) = (base + 70, base + 71, base + 72);
    let sinks = Sinks {
        hook: WebhookReceiver::start(hook_port),
        smtp: SmtpSink::start(smtp_port),
        _dead: DeadWebhook::start(dead_port),
    };
    std::env::set_var(
        "DBOPT_ALERTS_EXTRA",
        format!(
            r#"[[alerts.channels]]
name = "am"
kind = "webhook"
url = "http://127.0.0.1:{hook_port}/am"
bearer_token = "receiver-secret"

[[alerts.channels]]
name = "chat"
kind = "slack"
url = "http://127.0.0.1:{hook_port}/slack"

[[alerts.channels]]
name = "mail"
kind = "smtp"
smtp_server = "127.0.0.1:{smtp_port}"
smtp_tls = "none"
from = "dbopt@alerts.test"
to = ["oncall@alerts.test", "dba@alerts.test"]

[[alerts.channels]]
name = "dead"
kind = "webhook"
url = "http://127.0.0.1:{dead_port}/hook"
timeout_ms = 2000
retries = 3

[[alerts.channels]]
name = "broken"
kind = "webhook"
url = "http://127.0.0.1:{hook_port}/fail"
retries = 1

[[alerts.rules]]
alert = "primary_changed"
resolve_after_s = 10
"#
        ),
    );
    std::env::set_var("DBOPT_ALERTS_INTERVAL_MS", "500");
    std::env::set_var("DBOPT_ROUTER_MIN", "2");
    std::env::set_var("DBOPT_ROUTER_MAX", "10");
    let stack = Stack::start(3);

    let doc = alerts_doc(&stack);
    assert_eq!(
        doc["firing"],
        serde_json::json!([]),
        "a healthy stack: {doc}"
    );
    let names: Vec<_> = doc["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        names,
        ["log", "history", "am", "chat", "mail", "dead", "broken"]
    );

    dashboard_renders_in_chromium(&stack);
    replica_lag_fires_and_resolves(&stack, &sinks);
    dead_and_failing_channels_delay_nothing(&stack, &sinks);
    pool_saturation_fires_and_resolves(&stack, &sinks);
    a_stopped_replica_is_down_and_its_breaker_opens(&stack, &sinks);
    let new_primary = failover_alerts_once_per_channel(&stack, &sinks);
    without_a_router_patroni_reports_the_switchover(&stack, &sinks, &new_primary);
}

/// The dashboard in Debian's headless Chromium: after its scripts ran, the DOM shows every node
/// (role, lag sparkline), the pools, and the top statements; the browser logged no error.
fn dashboard_renders_in_chromium(stack: &Stack) {
    let mut c = stack.router("app").expect("router");
    // Heavy enough to top the statements by total time (the router's and Patroni's own checks
    // run on every node too).
    for _ in 0..10 {
        c.batch_execute("SELECT count(*) FROM generate_series(1, 300000)")
            .expect("select");
    }
    c.batch_execute("SELECT pg_sleep(0.2)")
        .expect("a slow statement");
    // A transaction runs on the primary: app gets a pool there too.
    c.batch_execute("BEGIN; SELECT 1; COMMIT")
        .expect("a transaction");
    let (code, page) =
        http::get(stack.info.router_admin_port, "/dashboard").expect("GET /dashboard");
    assert_eq!(code, 200);
    // Self-contained: nothing loaded from anywhere else (the SVG namespace URI is a name, not a load).
    for outside in ["src=", "href=", "@import", "url(", "<link"] {
        assert!(
            !page.contains(outside),
            "the page loads something ({outside})"
        );
    }
    let (code, st) =
        http::get(stack.info.router_admin_port, "/statements").expect("GET /statements");
    assert_eq!(code, 200, "{st}");
    assert!(st.contains("generate_series"), "{st}");

    let profile = std::env::temp_dir().join(format!("dbopt-e2e-chromium-{}", std::process::id()));
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!(
            "http://127.0.0.1:{}/dashboard",
            stack.info.router_admin_port
        ))
        .output()
        .expect("chromium (Debian's package; scripts/setup installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {log}");
    for n in ["node0", "node1", "node2", "node3"] {
        assert!(
            dom.contains(&format!("data-node=\"{n}\"")),
            "node {n} rendered:\n{dom}"
        );
    }
    assert!(dom.contains("primary ✎"), "the primary is marked:\n{dom}");
    assert!(
        dom.matches("class=\"spark\"").count() >= 4,
        "lag sparklines:\n{dom}"
    );
    assert!(
        dom.contains("data-pool=\"node0/app/postgres\""),
        "the app pool on the primary:\n{dom}"
    );
    assert!(dom.contains("class=\"line80\""), "the 80 % line:\n{dom}");
    assert!(dom.contains("generate_series"), "top statements:\n{dom}");
    assert!(dom.contains("pg_sleep"), "slow statements:\n{dom}");
    assert!(
        dom.contains("<div id=\"error\"></div>"),
        "no fetch failed:\n{dom}"
    );
    let console_errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect();
    assert!(
        console_errors.is_empty(),
        "console errors: {console_errors:?}"
    );
    eprintln!(
        "dashboard: rendered in headless Chromium ({} bytes of DOM)",
        dom.len()
    );
}

fn replica_lag_fires_and_resolves(stack: &Stack, s: &Sinks) {
    // Replay stops: the startup process (which replays WAL) is stopped with SIGSTOP.
    // (pg_wal_replay_pause() would not do: Patroni resumes a paused replay at its next loop.)
    let mut replica = stack.connect("node2").expect("connect node2");
    let startup: i32 = replica
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'startup'",
            &[],
        )
        .expect("the startup process of node2")
        .get(0);
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &startup.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {startup}");
    };
    signal("-STOP");
    let started = Instant::now();
    let mut primary = stack.connect("node0").expect("connect node0");
    primary
        .batch_execute("CREATE TABLE alert_ticks (at timestamptz DEFAULT clock_timestamp())")
        .expect("create");
    // Replay stays stopped for 8 s while the primary writes.
    while started.elapsed() < Duration::from_secs(8) {
        primary
            .batch_execute("INSERT INTO alert_ticks DEFAULT VALUES")
            .expect("insert");
        std::thread::sleep(Duration::from_millis(200));
    }
    let firing = webhook(s, "/am", "ReplicaLag", &[("node", "node2")]);
    signal("-CONT");
    drop(replica);
    assert_eq!(
        count(&firing, "firing"),
        1,
        "the lag alert fired while replay was stopped"
    );
    let (_, r) = &firing[0];
    let v = r.json();
    assert_eq!(v["version"], "4");
    assert_eq!(v["receiver"], "am");
    assert_eq!(v["alerts"][0]["labels"]["severity"], "warning");
    assert_eq!(v["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    assert!(
        r.headers
            .contains(&("authorization".into(), "Bearer receiver-secret".into())),
        "{:?}",
        r.headers
    );
    eprintln!(
        "replica lag: fired {:.1} s after replay stopped: {}",
        r.at.duration_since(started).as_secs_f64(),
        v["alerts"][0]["annotations"]["summary"]
    );
    fired_and_resolved_everywhere(
        stack,
        s,
        "ReplicaLag",
        ("node", "node2"),
        Duration::from_secs(60),
    );
    let recent = alerts_doc(stack)["recent"].clone();
    let lag: Vec<_> = recent
        .as_array()
        .expect("recent")
        .iter()
        .filter(|a| a["labels"]["alertname"] == "ReplicaLag")
        .map(|a| a["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(lag, ["resolved", "firing"], "GET /alerts, newest first");
}

fn dead_and_failing_channels_delay_nothing(stack: &Stack, s: &Sinks) {
    // The dead webhook is still retrying the lag alerts (2 s per attempt, backoff 1-2-4 s) while
    // every other channel delivered them: channels do not wait for each other.
    let doc = alerts_doc(stack);
    let ch = |name: &str| {
        doc["channels"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name).cloned())
            .unwrap_or_default()
    };
    assert_eq!(ch("am")["failed"], 0, "{doc}");
    assert!(ch("dead")["failed"].as_u64().unwrap_or(0) >= 1, "{doc}");
    assert!(ch("broken")["failed"].as_u64().unwrap_or(0) >= 2, "{doc}");
    assert!(
        ch("dead")["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("no answer within 2000 ms"),
        "{doc}"
    );
    assert!(
        ch("broken")["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("500"),
        "{doc}"
    );
    // The broken receiver was asked (and answered 500) and each notification was retried once.
    assert!(s.hook.on("/fail").len() >= 2);
    let (code, metrics) = http::get(stack.info.router_admin_port, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics
            .contains("dbopt_router_alert_deliveries_total{channel=\"dead\",outcome=\"failed\"}"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "dbopt_router_alert_notifications_total{alertname=\"ReplicaLag\",status=\"resolved\"} 1"
    ));

    // Statements through the router while the dead channel keeps failing: all answered, and
    // what they took is printed next to the same statements straight to the primary.
    let mut via = stack.router("app").expect("router");
    let mut direct = stack.connect("node0").expect("node0");
    let time = |c: &mut postgres::Client| {
        let t = Instant::now();
        for _ in 0..200 {
            c.batch_execute("SELECT 1").expect("select");
        }
        t.elapsed().as_secs_f64() * 1000.0 / 200.0
    };
    let (r, d) = (time(&mut via), time(&mut direct));
    eprintln!("while a webhook hangs: {r:.3} ms per statement through the router, {d:.3} ms straight to the primary");
}

fn pool_saturation_fires_and_resolves(stack: &Stack, s: &Sinks) {
    // ops is a critical user: its primary pool may use all 10 connections. 9 open transactions
    // hold 9 of them (90 % > 80 %).
    let mut held = Vec::new();
    for _ in 0..9 {
        let mut c = stack.router("ops").expect("router as ops");
        c.batch_execute("BEGIN; SELECT txid_current()")
            .expect("begin");
        held.push(c);
    }
    let primary = stack.primary().expect("primary");
    wait_for(Duration::from_secs(30), "the pool alert", || {
        (count(
            &webhook(
                s,
                "/am",
                "PoolSaturation",
                &[("role", "ops"), ("node", &primary)],
            ),
            "firing",
        ) == 1)
            .then_some(())
    });
    for mut c in held {
        c.batch_execute("COMMIT").expect("commit");
    }
    fired_and_resolved_everywhere(
        stack,
        s,
        "PoolSaturation",
        ("role", "ops"),
        Duration::from_secs(60),
    );
}

fn a_stopped_replica_is_down_and_its_breaker_opens(stack: &Stack, s: &Sinks) {
    assert!(stack.script(&["kill", "node3"]).status.success());
    wait_for(
        Duration::from_secs(60),
        "node down and breaker open for node3",
        || {
            let down = count(
                &webhook(s, "/am", "NodeDown", &[("node", "node3")]),
                "firing",
            );
            let open = count(
                &webhook(s, "/am", "BreakerOpen", &[("node", "node3")]),
                "firing",
            );
            (down == 1 && open == 1).then_some(())
        },
    );
    let (_, r) = webhook(s, "/am", "NodeDown", &[("node", "node3")]).remove(0);
    assert_eq!(r.json()["alerts"][0]["labels"]["severity"], "critical");
    assert!(stack.script(&["start", "node3"]).status.success());
    fired_and_resolved_everywhere(
        stack,
        s,
        "NodeDown",
        ("node", "node3"),
        Duration::from_secs(120),
    );
    fired_and_resolved_everywhere(
        stack,
        s,
        "BreakerOpen",
        ("node", "node3"),
        Duration::from_secs(120),
    );
}

/// Kills the primary node; returns the new primary.
fn failover_alerts_once_per_channel(stack: &Stack, s: &Sinks) -> String {
    stack.wait_healthy(Duration::from_secs(120));
    let killed = Instant::now();
    assert!(stack.script(&["kill", "node0"]).status.success());
    // When Patroni's REST API first names another primary (polled every 100 ms).
    let (new_primary, promoted) = wait_for(Duration::from_secs(60), "a new primary", || {
        stack
            .primary()
            .filter(|p| p != "node0")
            .map(|p| (p, Instant::now()))
    });
    let label = ("new_primary", new_primary.as_str());
    let fired = wait_for(
        Duration::from_secs(60),
        "the failover alert on the webhook",
        || {
            webhook(s, "/am", "PrimaryChanged", &[label])
                .first()
                .map(|(_, r)| r.at)
        },
    );
    eprintln!(
        "failover: {new_primary} promoted {:.1} s after node0 was killed; the alert reached the webhook {:.1} s after the promotion was seen",
        promoted.duration_since(killed).as_secs_f64(),
        fired.saturating_duration_since(promoted).as_secs_f64()
    );
    let w = webhook(s, "/am", "PrimaryChanged", &[label]);
    let a = &w[0].1.json()["alerts"][0];
    assert_eq!(a["labels"]["old_primary"], "node0");
    assert_eq!(a["labels"]["severity"], "critical");
    assert!(
        a["annotations"]["summary"]
            .as_str()
            .unwrap_or("")
            .contains("primary moved from node0"),
        "{a}"
    );
    // Resolved once the new primary held the role for resolve_after_s (10 s); exactly once each.
    fired_and_resolved_everywhere(stack, s, "PrimaryChanged", label, Duration::from_secs(90));
    // Patroni's callback ran on the promoted node, saw the router answering, and sent nothing.
    let callback = webhook(s, "/am", "PrimaryChanged", &[label])
        .iter()
        .filter(|(_, r)| r.body.contains("Patroni's callback"))
        .count();
    assert_eq!(callback, 0, "the callback defers to a running router");
    // What fired while there was no primary (node0 down) reached the history all the same: the
    // history channel held it until the new primary answered, and dropped nothing.
    wait_for(
        Duration::from_secs(60),
        "NodeDown node0 in the history",
        || {
            let h = history(stack, "NodeDown", ("node", "node0"));
            (h.get("firing").copied().unwrap_or(0) >= 1).then_some(())
        },
    );
    let doc = alerts_doc(stack);
    let channel = doc["channels"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "history"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(channel["dropped"], 0, "history channel: {channel}");
    assert!(stack.script(&["start", "node0"]).status.success());
    stack.wait_healthy(Duration::from_secs(120));
    new_primary
}

fn without_a_router_patroni_reports_the_switchover(stack: &Stack, s: &Sinks, leader: &str) {
    assert!(stack.script(&["stop-router"]).status.success());
    // In synchronous mode Patroni switches over to the synchronous standby only.
    let rest = stack.node(leader).rest_port;
    let candidate = wait_for(Duration::from_secs(60), "a synchronous standby", || {
        let (_, body) = http::get(rest, "/cluster")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["members"].as_array()?.iter().find_map(|m| {
            (m["role"] == "sync_standby" && (m["state"] == "streaming" || m["state"] == "running"))
                .then(|| m["name"].as_str().map(str::to_string))
                .flatten()
        })
    });
    let body = format!("{{\"leader\": \"{leader}\", \"candidate\": \"{candidate}\"}}");
    let (code, text) = post_json(rest, "/switchover", &body).expect("POST /switchover");
    assert_eq!(code, 200, "switchover: {text}");
    let label = ("new_primary", candidate.as_str());
    wait_for(
        Duration::from_secs(60),
        "the callback's alert on the webhook, mail and history",
        || {
            let w = webhook(s, "/am", "PrimaryChanged", &[label]);
            let by_callback = w
                .iter()
                .filter(|(_, r)| r.body.contains("Patroni's callback"))
                .count();
            let h = history(stack, "PrimaryChanged", label);
            (by_callback == 1
                && mails(
                    s,
                    "FIRING",
                    "PrimaryChanged",
                    &format!("new_primary={candidate}"),
                ) >= 1
                && h.get("firing").copied().unwrap_or(0) >= 1)
                .then_some(())
        },
    );
    let mut c = stack.connect(&candidate).expect("connect the new primary");
    let source: String = c
        .query_one(
            "SELECT source FROM dbopt.alert_history WHERE alertname = 'PrimaryChanged'
             AND labels ->> 'new_primary' = $1 ORDER BY id DESC LIMIT 1",
            &[&candidate],
        )
        .expect("history row")
        .get(0);
    assert_eq!(source, format!("patroni {candidate}"));
    assert!(stack.script(&["start-router"]).status.success());
}

fn post_json(port: u16, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let code = raw.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        raw.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    ))
}
