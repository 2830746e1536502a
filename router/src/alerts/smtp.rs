//! Mail for the `smtp` channel: a minimal SMTP client (RFC 5321) — EHLO, STARTTLS or implicit TLS,
//! AUTH PLAIN, one message to every recipient, QUIT — and the message text (RFC 5322), with the
//! subject encoded (RFC 2047) and the body dot-stuffed.

use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::settings::{Channel, SmtpTls};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads one reply (all its lines); returns the code and the text of the last line.
    async fn reply(&mut self) -> Result<(u16, String), String> {
        loop {
            let line = self.line().await?;
            if line.len() < 3 {
                return Err(format!("bad SMTP reply {:?}", crate::log::escape(&line)));
            }
            let code: u16 = line[..3]
                .parse()
                .map_err(|_| format!("bad SMTP reply {:?}", crate::log::escape(&line)))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, line.get(4..).unwrap_or_default().to_string()));
            }
        }
    }

    async fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&raw).trim_end().to_string());
            }
            if self.buf.len() > 8192 {
                return Err("SMTP reply line too long".into());
            }
            let mut chunk = [0u8; 1024];
            let n = self
                .io
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("the SMTP server closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, data: &[u8]) -> Result<(), String> {
        self.io
            .write_all(data)
            .await
            .map_err(|e| format!("send: {e}"))?;
        self.io.flush().await.map_err(|e| format!("send: {e}"))
    }

    /// Sends a command and expects one of `ok` codes.
    async fn command(&mut self, cmd: &str, ok: &[u16], what: &str) -> Result<String, String> {
        self.send(format!("{cmd}\r\n").as_bytes()).await?;
        let (code, text) = self.reply().await?;
        if ok.contains(&code) {
            Ok(text)
        } else {
            Err(format!(
                "{what}: the SMTP server answered {code} {}",
                crate::log::escape(&text)
            ))
        }
    }
}

/// Sends one mail through `c` (an smtp channel, validated) within `timeout`.
pub async fn send(c: &Channel, subject: &str, body: &str, now_ms: u64) -> Result<(), String> {
    let timeout = Duration::from_millis(c.timeout_ms);
    tokio::time::timeout(timeout, deliver(c, subject, body, now_ms))
        .await
        .map_err(|_| format!("no answer within {} ms", c.timeout_ms))?
}

async fn deliver(c: &Channel, subject: &str, body: &str, now_ms: u64) -> Result<(), String> {
    let server = c.smtp_server.as_deref().unwrap_or_default();
    let (host, port) = server
        .rsplit_once(':')
        .ok_or_else(|| format!("bad smtp_server {server:?}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host, port.parse::<u16>().unwrap_or(25)))
        .await
        .map_err(|e| format!("connect {server}: {e}"))?;
    let io: Box<dyn Io> = if c.smtp_tls == SmtpTls::Tls {
        Box::new(super::http_post::tls_connect(tcp, host).await?)
    } else {
        Box::new(tcp)
    };
    let mut conn = Conn {
        io,
        buf: Vec::new(),
    };
    let (code, text) = conn.reply().await?;
    if code != 220 {
        return Err(format!("greeting: {code} {}", crate::log::escape(&text)));
    }
    conn.command("EHLO dbopt-router", &[250], "EHLO").await?;
    if c.smtp_tls == SmtpTls::Starttls {
        conn.command("STARTTLS", &[220], "STARTTLS").await?;
        if !conn.buf.is_empty() {
            return Err("the SMTP server sent data before the TLS handshake".into());
        }
        let plain = conn.io;
        conn = Conn {
            io: Box::new(super::http_post::tls_connect(plain, host).await?),
            buf: Vec::new(),
        };
        conn.command("EHLO dbopt-router", &[250], "EHLO after STARTTLS")
            .await?;
    }
    if let (Some(u), Some(p)) = (&c.smtp_username, &c.smtp_password) {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{u}\0{p}"));
        conn.command(&format!("AUTH PLAIN {token}"), &[235], "AUTH PLAIN")
            .await?;
    }
    let from = c.from.as_deref().unwrap_or_default();
    conn.command(&format!("MAIL FROM:<{from}>"), &[250], "MAIL FROM")
        .await?;
    for to in &c.to {
        conn.command(&format!("RCPT TO:<{to}>"), &[250, 251], "RCPT TO")
            .await?;
    }
    conn.command("DATA", &[354], "DATA").await?;
    let msg = message(from, &c.to, subject, body, now_ms);
    conn.send(&msg).await?;
    let (code, text) = conn.reply().await?;
    if code != 250 {
        return Err(format!(
            "message refused: {code} {}",
            crate::log::escape(&text)
        ));
    }
    let _ = conn.command("QUIT", &[221], "QUIT").await;
    Ok(())
}

/// The message as sent after DATA, terminator included.
pub fn message(from: &str, to: &[String], subject: &str, body: &str, now_ms: u64) -> Vec<u8> {
    let mut m = String::new();
    m.push_str(&format!("From: {from}\r\n"));
    m.push_str(&format!("To: {}\r\n", to.join(", ")));
    m.push_str(&format!("Subject: {}\r\n", header_text(subject)));
    m.push_str(&format!("Date: {}\r\n", rfc5322_date(now_ms)));
    m.push_str(&format!(
        "Message-ID: <{now_ms}.{:08x}@dbopt-router>\r\n",
        rand::random::<u32>()
    ));
    m.push_str("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nAuto-Submitted: auto-generated\r\n\r\n");
    for line in body.lines() {
        // Dot-stuffing: a line starting with "." gets another, so none can end the DATA early.
        if line.starts_with('.') {
            m.push('.');
        }
        m.push_str(&line.replace('\r', ""));
        m.push_str("\r\n");
    }
    m.push_str(".\r\n");
    m.into_bytes()
}

/// A header value: control characters dropped; non-ASCII as an RFC 2047 encoded word.
fn header_text(s: &str) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control()).collect();
    if clean.is_ascii() {
        clean
    } else {
        format!(
            "=?UTF-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(clean.as_bytes())
        )
    }
}

/// `Fri, 27 Nov 2026 19:40:00 +0000`.
fn rfc5322_date(ms: u64) -> String {
    let iso = crate::log::utc_ms(ms); // 2026-11-27T19:40:00.123Z
    let days = ms / 86_400_000;
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m: usize = iso.get(5..7).and_then(|m| m.parse().ok()).unwrap_or(1);
    format!(
        "{weekday}, {} {} {} {} +0000",
        iso.get(8..10).unwrap_or("01"),
        month[(m.clamp(1, 12)) - 1],
        iso.get(0..4).unwrap_or("1970"),
        iso.get(11..19).unwrap_or("00:00:00")
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn message_is_dot_stuffed_with_an_encoded_subject() {
        let m = message(
            "dbopt@example.org",
            &["a@example.org".into(), "b@example.org".into()],
            "[dbopt FIRING] NodeDown node=nœud\r\nBcc: evil@x",
            "line one\n.\n.hidden\nend",
            1_795_801_200_000,
        );
        let m = String::from_utf8(m).unwrap();
        assert!(m.starts_with("From: dbopt@example.org\r\nTo: a@example.org, b@example.org\r\nSubject: =?UTF-8?B?"), "{m}");
        assert!(!m.contains("\r\nBcc:"), "{m}");
        assert!(
            m.contains("Date: Fri, 27 Nov 2026 17:40:00 +0000\r\n"),
            "{m}"
        );
        assert!(
            m.ends_with("\r\n\r\nline one\r\n..\r\n..hidden\r\nend\r\n.\r\n"),
            "{m}"
        );
        assert_eq!(header_text("plain"), "plain");
    }
}
