//! Local alert receivers for the alerting tests: an HTTP webhook receiver (records every POST;
//! paths under `/fail` answer 500), a "dead" webhook (accepts TCP connections and never answers),
//! and an SMTP sink (Python's aiosmtpd writing a maildir).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// An HTTP receiver on 127.0.0.1:port, for the life of the test process.
pub struct WebhookReceiver {
    got: Arc<Mutex<Vec<Received>>>,
}

impl WebhookReceiver {
    pub fn start(port: u16) -> WebhookReceiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the webhook receiver");
        let got = Arc::new(Mutex::new(Vec::new()));
        let store = got.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let store = store.clone();
                std::thread::spawn(move || {
                    let _ = serve(s, &store);
                });
            }
        });
        WebhookReceiver { got }
    }

    pub fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn on(&self, path: &str) -> Vec<Received> {
        self.all().into_iter().filter(|r| r.path == path).collect()
    }
}

fn serve(s: TcpStream, store: &Mutex<Vec<Received>>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut body = vec![0u8; len.min(1 << 20)];
    r.read_exact(&mut body)?;
    let failing = path.starts_with("/fail");
    store
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Received {
            path,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            at: Instant::now(),
        });
    let mut s = s;
    let answer = if failing {
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops\n"
    } else {
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    };
    s.write_all(answer.as_bytes())
}

/// A webhook that never answers: the kernel completes TCP handshakes (backlog), nobody accepts.
pub struct DeadWebhook {
    _listener: TcpListener,
}

impl DeadWebhook {
    pub fn start(port: u16) -> DeadWebhook {
        DeadWebhook {
            _listener: TcpListener::bind(("127.0.0.1", port)).expect("bind the dead webhook"),
        }
    }
}

/// aiosmtpd on 127.0.0.1:port delivering into a maildir; stopped on drop.
pub struct SmtpSink {
    child: Child,
    dir: PathBuf,
}

impl SmtpSink {
    pub fn start(port: u16) -> SmtpSink {
        let dir = std::env::temp_dir().join(format!("dbopt-e2e-maildir-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        // Debian's Python, where python3-aiosmtpd is installed (not a pyenv or venv one on PATH).
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd (Debian's python3-aiosmtpd; scripts/setup installs it)");
        crate::wait_for(Duration::from_secs(20), "the SMTP sink", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        SmtpSink { child, dir }
    }

    /// Every message delivered so far (raw RFC 5322 text).
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(self.dir.join(sub)) {
                for e in entries.flatten() {
                    if let Ok(t) = std::fs::read_to_string(e.path()) {
                        out.push(t);
                    }
                }
            }
        }
        out
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
