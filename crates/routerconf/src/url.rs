//! Where an `http://` or `https://` URL points (webhook channels, Patroni's REST API): parsed and
//! checked once, when the configuration is read.

/// Where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Target {
    /// Parses `http[s]://host[:port][/path]`. No user info, no fragment, nothing that could split
    /// the request line or a header (spaces, control characters).
    pub fn parse(url: &str) -> Result<Target, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("must start with http:// or https://, got {url:?}"));
        };
        if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("must not contain spaces or control characters".into());
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not supported (use bearer_token)".into());
        }
        if path.contains('#') {
            return Err("a URL fragment is not sent to a server: remove it".into());
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, after) = h.split_once(']').ok_or("unclosed [ in the host")?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(format!("unexpected {after:?} after the host")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("bad port {p:?}"))?,
            None if tls => 443,
            None => 80,
        };
        Ok(Target {
            tls,
            host,
            port,
            path: path.to_string(),
        })
    }

    /// The `Host` header for a request to this target (the port only when not the default).
    pub fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.tls, self.port) {
            (true, 443) | (false, 80) => h,
            _ => format!("{h}:{}", self.port),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("https://hooks.slack.com/services/T0/B0/x?y=1").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "hooks.slack.com", 443, "/services/T0/B0/x?y=1")
        );
        assert_eq!(t.host_header(), "hooks.slack.com");
        let t = Target::parse("http://127.0.0.1:9093").unwrap();
        assert_eq!(
            (t.port, t.path.as_str(), t.host_header().as_str()),
            (9093, "/", "127.0.0.1:9093")
        );
        let t = Target::parse("http://[::1]:8080/a").unwrap();
        assert_eq!(
            (t.host.as_str(), t.host_header().as_str()),
            ("::1", "[::1]:8080")
        );
        for bad in [
            "ftp://x/",
            "http://",
            "http://a:0/",
            "http://a:99999/",
            "http://u:p@a/",
            "http://a/b c",
            "http://a/b\r\nX-Injected: 1",
            "http://a/#frag",
            "http://[::1/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
