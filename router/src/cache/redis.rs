//! A small Redis client for the cache's few commands: RESP2 over TCP, a handful of pooled
//! connections, every call bounded by a timeout. Any failure (refused, closed, timed out, an
//! `-ERR` reply where data was expected) is an error the cache treats as "Redis unavailable":
//! bypass and resynchronise, never serve what cannot be checked.

use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisError(pub String);

impl std::fmt::Display for RedisError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest bulk reply accepted (a cache entry is bounded far below this).
const MAX_BULK: usize = 512 << 20;
/// Connections kept for reuse.
const IDLE_MAX: usize = 16;

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn line<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Vec<u8>, RedisError> {
    let mut out = Vec::new();
    loop {
        let b = r
            .read_u8()
            .await
            .map_err(|e| RedisError(format!("reading: {e}")))?;
        if b == b'\n' && out.last() == Some(&b'\r') {
            out.pop();
            return Ok(out);
        }
        out.push(b);
        if out.len() > 64 * 1024 {
            return Err(RedisError("reply line too long".into()));
        }
    }
}

fn number(b: &[u8]) -> Result<i64, RedisError> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RedisError("malformed number in reply".into()))
}

/// Reads one reply.
pub async fn read_reply<R: AsyncReadExt + Unpin + Send>(r: &mut R) -> Result<Reply, RedisError> {
    // Iterative for arrays one level deep plus recursion through Box::pin for nesting.
    let l = line(r).await?;
    let (&kind, rest) = l
        .split_first()
        .ok_or_else(|| RedisError("empty reply line".into()))?;
    match kind {
        b'+' => Ok(Reply::Status(String::from_utf8_lossy(rest).into_owned())),
        b'-' => Ok(Reply::Error(String::from_utf8_lossy(rest).into_owned())),
        b':' => Ok(Reply::Int(number(rest)?)),
        b'$' => {
            let n = number(rest)?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            let n = n as usize;
            if n > MAX_BULK {
                return Err(RedisError(format!("bulk reply of {n} bytes")));
            }
            let mut data = vec![0u8; n + 2];
            r.read_exact(&mut data)
                .await
                .map_err(|e| RedisError(format!("reading: {e}")))?;
            data.truncate(n);
            Ok(Reply::Bulk(Some(data)))
        }
        b'*' => {
            let n = number(rest)?;
            if n < 0 {
                return Ok(Reply::Array(Vec::new()));
            }
            let mut items = Vec::with_capacity((n as usize).min(1024));
            for _ in 0..n {
                items.push(Box::pin(read_reply(r)).await?);
            }
            Ok(Reply::Array(items))
        }
        other => Err(RedisError(format!(
            "unknown reply type {:?}",
            other as char
        ))),
    }
}

type Conn = BufReader<TcpStream>;

/// A Redis server: address, optional AUTH, pooled connections.
pub struct Redis {
    address: String,
    auth: Option<(Option<String>, String)>,
    timeout: Duration,
    idle: Mutex<Vec<Conn>>,
}

impl Redis {
    pub fn new(
        address: &str,
        user: Option<String>,
        password: Option<String>,
        timeout_ms: u64,
    ) -> Redis {
        Redis {
            address: address.to_string(),
            auth: password.map(|p| (user, p)),
            timeout: Duration::from_millis(timeout_ms),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Option<Conn> {
        crate::locks::lock(&self.idle).pop()
    }

    fn put(&self, c: Conn) {
        let mut idle = crate::locks::lock(&self.idle);
        if idle.len() < IDLE_MAX {
            idle.push(c);
        }
    }

    /// Drops every pooled connection (after a failure: they may all be dead).
    pub fn reset(&self) {
        crate::locks::lock(&self.idle).clear();
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        let s = TcpStream::connect(&self.address)
            .await
            .map_err(|e| RedisError(format!("connecting to {}: {e}", self.address)))?;
        let _ = s.set_nodelay(true);
        let mut c = BufReader::new(s);
        if let Some((user, password)) = &self.auth {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(u) = user {
                args.push(u.as_bytes());
            }
            args.push(password.as_bytes());
            if let Reply::Error(e) = exchange(&mut c, &encode(&args)).await? {
                return Err(RedisError(format!("AUTH: {e}")));
            }
        }
        Ok(c)
    }

    /// Runs one command; an `-ERR` reply is returned as [`Reply::Error`] (the connection is fine).
    pub async fn call(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        self.pipeline(&[encode(args)])
            .await?
            .pop()
            .ok_or_else(|| RedisError("no reply".into()))
    }

    /// Sends several commands in one write and reads their replies, in order (one round trip).
    pub async fn pipeline(&self, commands: &[Vec<u8>]) -> Result<Vec<Reply>, RedisError> {
        let request = commands.concat();
        let work = async {
            let mut c = match self.take() {
                Some(c) => c,
                None => self.connect().await?,
            };
            c.get_mut()
                .write_all(&request)
                .await
                .map_err(|e| RedisError(format!("writing: {e}")))?;
            let mut replies = Vec::with_capacity(commands.len());
            for _ in commands {
                replies.push(read_reply(&mut c).await?);
            }
            self.put(c);
            Ok(replies)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(RedisError(format!(
                "no answer from {} within {} ms",
                self.address,
                self.timeout.as_millis()
            ))),
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }
}

async fn exchange(c: &mut Conn, request: &[u8]) -> Result<Reply, RedisError> {
    c.get_mut()
        .write_all(request)
        .await
        .map_err(|e| RedisError(format!("writing: {e}")))?;
    read_reply(c).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Reply, RedisError> {
        let mut r = bytes;
        read_reply(&mut r).await
    }

    #[tokio::test]
    async fn replies() {
        assert_eq!(parse(b"+OK\r\n").await, Ok(Reply::Status("OK".into())));
        assert_eq!(parse(b":42\r\n").await, Ok(Reply::Int(42)));
        assert_eq!(parse(b"$-1\r\n").await, Ok(Reply::Bulk(None)));
        assert_eq!(
            parse(b"$3\r\na\r\n\r\n").await,
            Ok(Reply::Bulk(Some(b"a\r\n".to_vec())))
        );
        assert_eq!(
            parse(b"*2\r\n:1\r\n$1\r\nx\r\n").await,
            Ok(Reply::Array(vec![
                Reply::Int(1),
                Reply::Bulk(Some(b"x".to_vec()))
            ]))
        );
        assert_eq!(
            parse(b"-ERR nope\r\n").await,
            Ok(Reply::Error("ERR nope".into()))
        );
    }

    #[tokio::test]
    async fn malformed_replies_are_errors() {
        assert!(parse(b"").await.is_err());
        assert!(parse(b"?x\r\n").await.is_err());
        assert!(parse(b":abc\r\n").await.is_err());
        assert!(parse(b"$5\r\nab").await.is_err());
        assert!(parse(b"$999999999999\r\n").await.is_err());
    }

    #[test]
    fn commands_are_bulk_arrays() {
        assert_eq!(
            encode(&[b"GET", b"k y"]),
            b"*2\r\n$3\r\nGET\r\n$3\r\nk y\r\n".to_vec()
        );
    }
}
