//! Just enough HTTP for Patroni's REST API and the router's admin endpoint: `GET` and `POST` over
//! HTTP/1.0, status and body.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Sends one request to `127.0.0.1:{port}` → (status code, body); `None` when nothing answers.
fn exchange(port: u16, request: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// `GET http://127.0.0.1:{port}{path}` → (status code, body); `None` when nothing answers.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    get_with(port, path, None)
}

/// A `GET` with an optional `Authorization` header.
pub fn get_with(port: u16, path: &str, authorization: Option<&str>) -> Option<(u16, String)> {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    exchange(
        port,
        &format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n"),
    )
}

/// `POST http://127.0.0.1:{port}{path}` with a form body and an optional `Authorization` header.
pub fn post(
    port: u16,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    exchange(
        port,
        &format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{auth}\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}
