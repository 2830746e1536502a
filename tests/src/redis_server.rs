//! A throwaway `redis-server` with the dbopt module, on a port and in a directory of its own.
//! Stopped (and its directory removed) on drop; [`RedisServer::restart`] keeps the data.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{repo_root, wait_for};

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// The module built by `scripts/stack build` (release).
pub fn module_path() -> PathBuf {
    let p = repo_root().join("target/release/libdbopt_redis.so");
    assert!(
        p.exists(),
        "{} is missing: run scripts/stack build first",
        p.display()
    );
    p
}

impl RedisServer {
    /// Starts `redis-server --port <port> --loadmodule <dbopt>` plus `extra` arguments
    /// (e.g. `["--appendonly", "yes"]`).
    pub fn start(port: u16, extra: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("dbopt-redis-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut server = RedisServer {
            port,
            dir,
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(["--logfile", &self.dir.join("redis.log").to_string_lossy()])
            .args(["--save", ""])
            .arg("--loadmodule")
            .arg(module_path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let client = self.client();
        wait_for(
            Duration::from_secs(20),
            "redis-server to answer PING",
            || {
                let mut c = client.get_connection().ok()?;
                redis::cmd("PING").query::<String>(&mut c).ok()
            },
        );
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).expect("url")
    }

    pub fn conn(&self) -> redis::Connection {
        self.client()
            .get_connection()
            .expect("connect to redis-server")
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// `SHUTDOWN` (saving when configured to) and start again on the same directory and arguments.
    pub fn restart(&mut self, shutdown_mode: &str) {
        let mut c = self.conn();
        let _ = redis::cmd("SHUTDOWN")
            .arg(shutdown_mode)
            .query::<()>(&mut c);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        self.spawn();
    }

    /// Whether the server process is still alive (a module panic would kill it).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .map(|c| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false)
    }

    /// The server's log (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A command from its words (`["DBOPT.RL.HIT", "k", "10", "1000"]`).
pub fn command(words: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(words[0]);
    for w in &words[1..] {
        cmd.arg(*w);
    }
    cmd
}

/// The error a command must fail with (panics when it succeeds).
pub fn error_of(c: &mut redis::Connection, words: &[&str]) -> String {
    match command(words).query::<redis::Value>(c) {
        Err(e) => e.to_string(),
        Ok(v) => panic!("{words:?} should fail, got {v:?}"),
    }
}
