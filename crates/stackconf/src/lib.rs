//! The local stack's generated files, from typed values: the router's configuration (a
//! `dbopt_routerconf::Config`, validated before it is written), the `[alerts]` file Patroni's
//! role-change callback reads, and `stack.json` (the [`StackInfo`] the end-to-end tests read back).
//! `scripts/stack` calls the `dbopt-stackconf` binary; nothing is assembled with printf.

use std::collections::BTreeMap;

use dbopt_routerconf::alerts::{AlertSettings, Channel, ChannelKind};
use dbopt_routerconf::cache::CacheSettings;
use dbopt_routerconf::limits::{Fallback, LimitSettings, Rule, Scope};
use dbopt_routerconf::{Config, Listen, Node, ServerLogin, Tls, User};
use serde::{Deserialize, Serialize};

/// What `scripts/stack up` writes to `$DBOPT_DIR/stack.json`: the one description of the layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackInfo {
    pub dir: String,
    pub port_base: u16,
    pub pg_password: String,
    pub nodes: Vec<NodeInfo>,
    pub etcd_port: u16,
    pub redis_port: u16,
    pub router_port: u16,
    pub router_admin_port: u16,
    pub app_password: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub port: u16,
    pub rest_port: u16,
    /// The node this one streams from when it is a cascading replica ("" otherwise).
    pub replicate_from: String,
}

/// Everything the generated files depend on (what `scripts/stack` computed from its environment).
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub info: StackInfo,
    /// Patroni's scope, also the alerts' `cluster` label.
    pub scope: String,
    pub admin_token: String,
    pub pool_min: u32,
    pub pool_max: u32,
    pub health_interval_s: u64,
    pub reclone_after_s: u64,
    pub cache_local_bytes: u64,
    pub limits_fallback: Fallback,
    pub limits_routers: u32,
    pub alerts_interval_ms: u64,
    /// TOML added to `[alerts]` (channels, rules) and to the whole configuration.
    pub alerts_extra: String,
    pub router_extra: String,
}

/// The demo users: (name, md5 auth, session pooling, critical, admin, runs as the superuser).
const USERS: &[(&str, bool, bool, bool, bool, bool)] = &[
    ("app", false, false, false, false, false),
    ("app_md5", true, false, false, false, false),
    ("app_session", false, true, false, false, false),
    ("app_limited", false, false, false, false, false),
    // An operator: critical pool, never rate-limited (admin), yet a least-privileged role.
    ("ops", false, false, true, true, false),
    // The one user that may run as the superuser, explicitly.
    ("dba", false, false, false, true, true),
];

fn user(l: &Layout, u: &(&str, bool, bool, bool, bool, bool)) -> Result<User, String> {
    let (name, md5, session, critical, admin, superuser) = *u;
    let mut t = toml::Table::new();
    t.insert("name".into(), name.into());
    t.insert("password".into(), l.info.app_password.clone().into());
    if md5 {
        t.insert("auth".into(), "md5".into());
    }
    if session {
        t.insert("pool_mode".into(), "session".into());
    }
    if critical {
        t.insert("critical".into(), true.into());
    }
    if admin {
        t.insert("admin".into(), true.into());
    }
    if superuser {
        t.insert("server_user".into(), "postgres".into());
        t.insert("server_password".into(), l.info.pg_password.clone().into());
    }
    toml::Value::Table(t)
        .try_into()
        .map_err(|e| format!("user {name}: {e}"))
}

/// The `[alerts]` section: every kind to the router's log and to `dbopt.alert_history`, plus the
/// extra channels and rules.
pub fn alerts(l: &Layout) -> Result<AlertSettings, String> {
    let mut a = AlertSettings {
        cluster: l.scope.clone(),
        interval_ms: l.alerts_interval_ms,
        ..AlertSettings::default()
    };
    for (name, kind) in [("log", ChannelKind::Log), ("history", ChannelKind::Notify)] {
        a.channels.push(channel(name, kind));
    }
    if !l.alerts_extra.trim().is_empty() {
        let extra: toml::Table =
            toml::from_str(&l.alerts_extra).map_err(|e| format!("DBOPT_ALERTS_EXTRA: {e}"))?;
        let mut base = toml::Table::new();
        base.insert(
            "alerts".into(),
            toml::Value::try_from(&a).map_err(|e| e.to_string())?,
        );
        merge(&mut base, extra);
        a = base
            .remove("alerts")
            .ok_or("no [alerts]")?
            .try_into()
            .map_err(|e| format!("DBOPT_ALERTS_EXTRA: {e}"))?;
    }
    a.validate().map_err(|e| e.to_string())?;
    Ok(a)
}

fn channel(name: &str, kind: ChannelKind) -> Channel {
    let mut t = toml::Table::new();
    t.insert("name".into(), name.into());
    t.insert(
        "kind".into(),
        dbopt_routerconf::alerts::kind_name(kind).into(),
    );
    toml::Value::Table(t)
        .try_into()
        .unwrap_or_else(|e| panic!("built-in channel {name}: {e}"))
}

/// The router's configuration for the stack, validated.
pub fn router_config(l: &Layout) -> Result<Config, String> {
    let i = &l.info;
    let listen = Listen {
        address: format!("127.0.0.1:{}", i.router_port),
        admin_address: Some(format!("127.0.0.1:{}", i.router_admin_port)),
        admin_token: Some(l.admin_token.clone()),
        tls: Some(Tls {
            cert_file: format!("{}/tls/router.crt", i.dir),
            key_file: format!("{}/tls/router.key", i.dir),
            ..tls_defaults()?
        }),
        ..listen_defaults()?
    };
    let mut c = Config {
        databases: vec!["postgres".into()],
        listen,
        pool: Default::default(),
        health: Default::default(),
        breaker: Default::default(),
        server: ServerLogin {
            user: "postgres".into(),
            password: Some(i.pg_password.clone()),
            database: "postgres".into(),
        },
        nodes: i
            .nodes
            .iter()
            .map(|n| Node {
                name: n.name.clone(),
                host: "127.0.0.1".into(),
                port: n.port,
                weight: 1,
                patroni: Some(format!("http://127.0.0.1:{}", n.rest_port)),
            })
            .collect(),
        users: USERS.iter().map(|u| user(l, u)).collect::<Result<_, _>>()?,
        // The result cache: Redis with the module, invalidated by the extension's announcements.
        cache: CacheSettings {
            enabled: true,
            redis: Some(format!("127.0.0.1:{}", i.redis_port)),
            local_max_bytes: l.cache_local_bytes,
            ..CacheSettings::default()
        },
        // Rate limits, shared through the same Redis: the demo user app_limited may run 20
        // statements per second (ops, an admin, is never limited).
        limits: LimitSettings {
            on_redis_error: l.limits_fallback,
            routers: l.limits_routers,
            rules: vec![Rule {
                name: "app_limited".into(),
                scope: Scope::User,
                users: vec!["app_limited".into()],
                limit: 20,
                window_ms: 1000,
                ..rule_defaults()?
            }],
            ..LimitSettings::default()
        },
        alerts: alerts(l)?,
    };
    c.pool.min_size = l.pool_min;
    c.pool.max_size = l.pool_max;
    c.health.interval_s = l.health_interval_s;
    // A replica that cannot catch up (the WAL it needs is gone) is re-cloned through its Patroni.
    c.health.reclone_lost_replicas = true;
    c.health.reclone_after_s = l.reclone_after_s;
    // Quicker to open and to retry than the defaults (5 failures, 10 s), so a stopped node's
    // breaker visibly opens and closes within a test.
    c.breaker.min_attempts = 5;
    c.breaker.open_s = 10;
    let c = with_extra(c, &l.router_extra, "DBOPT_ROUTER_EXTRA")?;
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

/// `c` with the TOML `extra` merged in ([`merge`]); `what` names the extra in errors.
fn with_extra(c: Config, extra: &str, what: &str) -> Result<Config, String> {
    if extra.trim().is_empty() {
        return Ok(c);
    }
    let extra: toml::Table = toml::from_str(extra).map_err(|e| format!("{what}: {e}"))?;
    let mut table = toml::Table::try_from(&c).map_err(|e| e.to_string())?;
    merge(&mut table, extra);
    toml::Value::Table(table)
        .try_into()
        .map_err(|e| format!("{what}: {e}"))
}

/// Deserialises a type's defaults from an almost empty table (their serde defaults are the one
/// source of truth).
fn from_table<T: serde::de::DeserializeOwned>(pairs: &[(&str, toml::Value)]) -> Result<T, String> {
    let t: toml::Table = pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect();
    toml::Value::Table(t).try_into().map_err(|e| e.to_string())
}

fn listen_defaults() -> Result<Listen, String> {
    from_table(&[("address", "127.0.0.1:1".into())])
}

fn tls_defaults() -> Result<Tls, String> {
    from_table(&[("cert_file", "x".into()), ("key_file", "x".into())])
}

fn rule_defaults() -> Result<Rule, String> {
    from_table(&[
        ("name", "x".into()),
        ("scope", "global".into()),
        ("limit", 1.into()),
        ("window_ms", 1000.into()),
    ])
}

/// Merges `extra` into `base`: tables recursively, arrays of tables appended, values replaced.
pub fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (Some(toml::Value::Array(b)), toml::Value::Array(e)) => b.extend(e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A section a derived configuration leaves out (it then has the section's defaults: off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Cache,
    Alerts,
    Limits,
}

/// A router configuration derived from another — the stack's, for a benchmark's own router
/// process, so that a benchmark never edits or signals the router a user has running: clients
/// on `127.0.0.1:port`, the admin endpoint on `port + 1`, the sections in `without` off, and
/// `extra` merged as `DBOPT_ROUTER_EXTRA` is (`[pool]` keys replace, `[[cache.rules]]` append —
/// also to a file that says `rules = []`). Validated.
pub fn derive(
    base: &Config,
    port: u16,
    without: &[Section],
    extra: &str,
) -> Result<Config, String> {
    let admin = port
        .checked_add(1)
        .ok_or("--port: no room for the admin port above it")?;
    let mut c = base.clone();
    c.listen.address = format!("127.0.0.1:{port}");
    c.listen.admin_address = Some(format!("127.0.0.1:{admin}"));
    for s in without {
        match s {
            Section::Cache => c.cache = CacheSettings::default(),
            Section::Alerts => c.alerts = AlertSettings::default(),
            Section::Limits => c.limits = LimitSettings::default(),
        }
    }
    let c = with_extra(c, extra, "--extra")?;
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

/// What Patroni's callback reads: `[listen]` (where a router would answer) and `[alerts]`.
pub fn patroni_alerts(l: &Layout) -> Result<String, String> {
    #[derive(Serialize)]
    struct CallbackFile<'a> {
        listen: BTreeMap<&'a str, String>,
        alerts: AlertSettings,
    }
    let file = CallbackFile {
        listen: [
            ("address", format!("127.0.0.1:{}", l.info.router_port)),
            (
                "admin_address",
                format!("127.0.0.1:{}", l.info.router_admin_port),
            ),
        ]
        .into(),
        alerts: alerts(l)?,
    };
    toml::to_string_pretty(&file).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            info: StackInfo {
                dir: "/tmp/s".into(),
                port_base: 25400,
                pg_password: "pg".into(),
                nodes: (0..4)
                    .map(|i| NodeInfo {
                        name: format!("node{i}"),
                        port: 25400 + i,
                        rest_port: 25410 + i,
                        replicate_from: if i == 3 {
                            "node1".into()
                        } else {
                            String::new()
                        },
                    })
                    .collect(),
                etcd_port: 25420,
                redis_port: 25430,
                router_port: 25450,
                router_admin_port: 25451,
                app_password: "app-secret".into(),
            },
            scope: "dbopt-25400".into(),
            admin_token: "dbopt-admin-token".into(),
            pool_min: 4,
            pool_max: 50,
            health_interval_s: 2,
            reclone_after_s: 30,
            cache_local_bytes: 1 << 26,
            limits_fallback: Fallback::Local,
            limits_routers: 1,
            alerts_interval_ms: 1000,
            alerts_extra: String::new(),
            router_extra: String::new(),
        }
    }

    #[test]
    fn the_router_config_round_trips_through_its_own_parser() {
        let c = router_config(&layout()).unwrap();
        let text = toml::to_string_pretty(&c).unwrap();
        let back = Config::parse(&text).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            back.nodes[3].patroni.as_deref(),
            Some("http://127.0.0.1:25413")
        );
        assert_eq!(back.users.len(), 6);
        assert!(back.users.iter().any(|u| u.name == "dba" && u.admin));
        assert_eq!(back.alerts.channels.len(), 2);
        assert_eq!(back.limits.rules[0].limit, 20);
    }

    #[test]
    fn a_derived_config_has_its_own_ports_and_leaves_the_base_alone() {
        let base = router_config(&layout()).unwrap();
        let before = base.clone();
        let d = derive(
            &base,
            25466,
            &[Section::Alerts, Section::Limits],
            "[pool]\nmax_size = 20\nread_balance = \"pack\"\n\
             [[cache.rules]]\ntable = \"public.pgbench_accounts\"\nttl_s = 300\n",
        )
        .unwrap();
        assert_eq!(base, before);
        assert_eq!(d.listen.address, "127.0.0.1:25466");
        assert_eq!(d.listen.admin_address.as_deref(), Some("127.0.0.1:25467"));
        assert!(d.alerts.channels.is_empty() && d.limits.rules.is_empty());
        assert!(d.cache.enabled, "the cache stays as the base has it");
        assert_eq!(d.pool.max_size, 20);
        assert_eq!(d.pool.read_balance, dbopt_routerconf::ReadBalance::Pack);
        assert_eq!(d.pool.min_size, base.pool.min_size);
        // A rule added to a file whose [cache] says `rules = []` (the base as printed): appended,
        // not a duplicate key.
        let printed = toml::to_string_pretty(&base).unwrap();
        assert!(printed.contains("rules = []"), "{printed}");
        let reread = Config::parse(&printed).unwrap();
        let d = derive(
            &reread,
            25466,
            &[],
            "[[cache.rules]]\ntable = \"public.t\"\n",
        )
        .unwrap();
        assert_eq!(d.cache.rules.len(), 1);
        assert_eq!(d.cache.rules[0].table.as_deref(), Some("public.t"));
        // Round trip: what it prints, the router reads.
        assert_eq!(
            Config::parse(&toml::to_string_pretty(&d).unwrap()).unwrap(),
            d
        );
        let off = derive(&base, 25466, &[Section::Cache], "").unwrap();
        assert!(!off.cache.enabled);
    }

    #[test]
    fn a_bad_derivation_names_what_is_wrong() {
        let base = router_config(&layout()).unwrap();
        assert!(derive(&base, u16::MAX, &[], "")
            .unwrap_err()
            .contains("--port"));
        assert!(derive(&base, 25466, &[], "[pool\n")
            .unwrap_err()
            .contains("--extra"));
        assert!(derive(&base, 25466, &[], "[pool]\nmax_size = 0\n")
            .unwrap_err()
            .contains("pool.max_size"));
        assert!(derive(&base, 25466, &[], "[pool]\nnope = 1\n")
            .unwrap_err()
            .contains("--extra"));
    }

    #[test]
    fn extras_merge_and_bad_extras_are_refused() {
        let mut l = layout();
        l.alerts_extra = "[[alerts.channels]]\nname = \"am\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/x\"\n[[alerts.rules]]\nalert = \"replica_lag\"\nthreshold = 2.0\n".into();
        l.router_extra = "[[limits.rules]]\nname = \"g\"\nscope = \"global\"\nlimit = 5\nwindow_ms = 1000\n[pool]\nmax_size = 60\n".into();
        let c = router_config(&l).unwrap();
        assert_eq!(c.alerts.channels.len(), 3);
        assert_eq!(c.alerts.rules[0].threshold, Some(2.0));
        assert_eq!(c.limits.rules.len(), 2);
        assert_eq!(c.pool.max_size, 60);
        assert_eq!(c.pool.min_size, 4, "only what the extra names changes");
        let p = patroni_alerts(&l).unwrap();
        assert!(p.contains("admin_address = \"127.0.0.1:25451\""), "{p}");
        assert!(p.contains("name = \"am\""), "{p}");

        l.router_extra = "[pool]\nmax_size = 0\n".into();
        assert!(router_config(&l).unwrap_err().contains("pool.max_size"));
        l.router_extra = "[pool\n".into();
        assert!(router_config(&l)
            .unwrap_err()
            .contains("DBOPT_ROUTER_EXTRA"));
        l.router_extra = String::new();
        l.alerts_extra = "[[alerts.channels]]\nname = \"log\"\nkind = \"log\"\n".into();
        assert!(router_config(&l).unwrap_err().contains("defined twice"));
    }
}
