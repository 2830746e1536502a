//! A throwaway copy of the local stack, started with `scripts/stack up` on its own ports and in its
//! own directory, stopped and wiped on drop (set `DBOPT_E2E_KEEP=1` to keep it for a post-mortem).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{http, repo_root, wait_for};

pub use dbopt_stackconf::{NodeInfo, StackInfo};

/// A running stack. Dropping it runs `scripts/stack down --wipe`.
pub struct Stack {
    dir: PathBuf,
    port_base: u16,
    pub info: StackInfo,
}

impl Stack {
    /// Starts a stack whose ports start at `DBOPT_E2E_PORT_BASE` (default 26400) + `slot * 100`, so
    /// test binaries running at the same time use different slots. Panics (after tearing down) when
    /// the stack does not come up healthy.
    pub fn start(slot: u16) -> Stack {
        let base = crate::e2e_port(slot * 100);
        let dir = std::env::temp_dir().join(format!("dbopt-e2e-{base}"));
        // The guard exists before `up` runs: a failed start is still torn down.
        let mut stack = Stack {
            dir: dir.clone(),
            port_base: base,
            info: StackInfo {
                dir: String::new(),
                port_base: base,
                pg_password: String::new(),
                nodes: Vec::new(),
                etcd_port: 0,
                redis_port: 0,
                router_port: 0,
                router_admin_port: 0,
                app_password: String::new(),
            },
        };
        // A previous run that was killed (no Drop) may have left processes or data behind.
        let _ = stack.script(&["down", "--wipe"]);
        let out = stack.script(&["up"]);
        assert!(
            out.status.success(),
            "scripts/stack up failed:\n{}",
            describe(&out)
        );
        let text =
            std::fs::read_to_string(dir.join("stack.json")).expect("stack.json written by up");
        stack.info = serde_json::from_str(&text).expect("stack.json parses");
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        stack
    }

    /// Runs `scripts/stack ARGS` against this stack's ports and directory.
    pub fn script(&self, args: &[&str]) -> std::process::Output {
        Command::new(repo_root().join("scripts/stack"))
            .args(args)
            .env("DBOPT_DIR", &self.dir)
            .env("DBOPT_PORT_BASE", self.port_base.to_string())
            .env("DBOPT_NO_BUILD", "1")
            .output()
            .expect("scripts/stack runs")
    }

    pub fn node(&self, name: &str) -> &NodeInfo {
        self.info
            .nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// libpq-style connection string for a node, as the superuser.
    pub fn dsn(&self, name: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={} dbname=postgres connect_timeout=5",
            self.node(name).port,
            self.info.pg_password
        )
    }

    pub fn connect(&self, name: &str) -> Result<postgres::Client, postgres::Error> {
        postgres::Client::connect(&self.dsn(name), postgres::NoTls)
    }

    /// libpq-style connection string for dbopt-router as router user `user`.
    pub fn router_dsn(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={} dbname=postgres connect_timeout=5",
            self.info.router_port, self.info.app_password
        )
    }

    pub fn router(&self, user: &str) -> Result<postgres::Client, postgres::Error> {
        postgres::Client::connect(&self.router_dsn(user), postgres::NoTls)
    }

    /// The router's `/status` document.
    pub fn router_status(&self) -> serde_json::Value {
        let (code, body) =
            http::get(self.info.router_admin_port, "/status").unwrap_or((0, String::new()));
        assert_eq!(code, 200, "router /status: {body}");
        serde_json::from_str(&body).expect("router /status is JSON")
    }

    /// The node whose Patroni answers 200 on `/primary`, if exactly one does.
    pub fn primary(&self) -> Option<String> {
        let leaders: Vec<_> = self
            .info
            .nodes
            .iter()
            .filter(|n| matches!(http::get(n.rest_port, "/primary"), Some((200, _))))
            .map(|n| n.name.clone())
            .collect();
        (leaders.len() == 1).then(|| leaders[0].clone())
    }

    /// Waits until `scripts/stack wait-healthy` succeeds (one primary, all running nodes streaming).
    pub fn wait_healthy(&self, limit: Duration) {
        let out = self.script(&["wait-healthy", &limit.as_secs().to_string()]);
        assert!(
            out.status.success(),
            "stack not healthy:\n{}",
            describe(&out)
        );
    }

    /// `scripts/stack status` output.
    pub fn status(&self) -> String {
        let out = self.script(&["status"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn redis(&self) -> redis::Connection {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.info.redis_port))
            .expect("redis url");
        wait_for(Duration::from_secs(10), "a Redis connection", || {
            client.get_connection().ok()
        })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::env::var("DBOPT_E2E_KEEP").as_deref() == Ok("1") {
            eprintln!(
                "DBOPT_E2E_KEEP=1: leaving the stack in {} running",
                self.dir.display()
            );
            return;
        }
        let out = self.script(&["down", "--wipe"]);
        if !out.status.success() {
            eprintln!("scripts/stack down failed:\n{}", describe(&out));
        }
    }
}

fn describe(out: &std::process::Output) -> String {
    format!(
        "exit: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
