//! A small HTTP/1.1 client for webhook channels: one POST per connection, `http://` or `https://`
//! (certificates checked against the Mozilla roots), a hard time limit, 2xx = delivered.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

pub use dbopt_routerconf::url::Target;

/// A TLS client configuration trusting the Mozilla roots (webpki-roots).
pub fn tls_client() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    match config {
        Ok(c) => Arc::new(c),
        // The ring provider always supports the default versions; keep a working fallback anyway.
        Err(_) => Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
    }
}

/// Opens a TLS session to `host` over `tcp`.
pub async fn tls_connect<S>(
    tcp: S,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("bad TLS server name {host:?}: {e}"))?;
    tokio_rustls::TlsConnector::from(tls_client())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))
}

/// POSTs `body` as JSON; Ok(status) for a 2xx answer, Err(reason) otherwise.
pub async fn post_json(
    target: &Target,
    body: &[u8],
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<u16, String> {
    tokio::time::timeout(timeout, post(target, body, bearer))
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

async fn post(target: &Target, body: &[u8], bearer: Option<&str>) -> Result<u16, String> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("connect {}:{}: {e}", target.host, target.port))?;
    let _ = tcp.set_nodelay(true);
    if target.tls {
        let s = tls_connect(tcp, &target.host).await?;
        exchange(s, target, body, bearer).await
    } else {
        exchange(tcp, target, body, bearer).await
    }
}

async fn exchange<S>(
    mut s: S,
    target: &Target,
    body: &[u8],
    bearer: Option<&str>,
) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: dbopt-router/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        target.path,
        target.host_header(),
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    if let Some(t) = bearer {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body);
    s.write_all(&msg).await.map_err(|e| format!("send: {e}"))?;
    s.flush().await.map_err(|e| format!("send: {e}"))?;
    // The status line is all that matters; read at most 1 KiB of the answer.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or_default();
    let code = status_code(line)
        .ok_or_else(|| format!("not an HTTP answer: {:?}", crate::log::escape(line)))?;
    if (200..300).contains(&code) {
        Ok(code)
    } else {
        Err(format!("answered {}", crate::log::escape(line.trim())))
    }
}

fn status_code(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_code("HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(status_code("HTTP/1.0 500 Oops"), Some(500));
        assert_eq!(status_code("SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(""), None);
    }
}
