//! PostgreSQL v3 wire protocol: framing, the messages the router looks inside, and the ones it
//! writes itself. Pure functions over byte slices — no I/O — so the fuzz test can drive them.
//!
//! Everything read from a peer is untrusted: lengths are checked against the bytes present and
//! against [`MAX_MESSAGE_LEN`], strings must be NUL-terminated inside their message, and every
//! failure is a [`ProtocolError`] (SQLSTATE 08P01) the caller turns into an ErrorResponse.

use std::fmt;

/// Largest message accepted from a client or server (PostgreSQL's own limit is 1 GiB; a router has
/// no business buffering that much for one message).
pub const MAX_MESSAGE_LEN: usize = 64 << 20;
/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
pub const MAX_STARTUP_LEN: usize = 10_000;

pub const PROTOCOL_V3: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// A malformed message. The text is shown to the client in an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// The first packet of a connection (it has no type byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Params(Vec<(String, String)>),
}

/// Length of the startup packet whose first 4 bytes are `head`, checked.
pub fn startup_len(head: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = i32::from_be_bytes(head);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return err(format!(
            "invalid startup packet length {len} (must be 8..{MAX_STARTUP_LEN})"
        ));
    }
    Ok(len as usize)
}

/// Parses a startup packet body (everything after the length word).
pub fn parse_startup(body: &[u8]) -> Result<Startup, ProtocolError> {
    let Some(code) = body.get(..4) else {
        return err("startup packet shorter than its protocol code");
    };
    let code = i32::from_be_bytes([code[0], code[1], code[2], code[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST if rest.is_empty() => Ok(Startup::Ssl),
        GSSENC_REQUEST if rest.is_empty() => Ok(Startup::GssEnc),
        CANCEL_REQUEST if rest.len() == 8 => Ok(Startup::Cancel {
            pid: i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
            secret: i32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => err("malformed request packet length"),
        PROTOCOL_V3 => {
            let mut params = Vec::new();
            let mut r = Reader::new(rest);
            loop {
                let key = r.cstr("startup parameter name")?;
                if key.is_empty() {
                    break;
                }
                let value = r.cstr("startup parameter value")?;
                params.push((
                    utf8(key, "startup parameter")?,
                    utf8(value, "startup parameter")?,
                ));
            }
            if !r.rest().is_empty() {
                return err("trailing bytes after the startup parameters");
            }
            Ok(Startup::Params(params))
        }
        other => err(format!(
            "unsupported frontend protocol {}.{}: this router speaks 3.0",
            other >> 16,
            other & 0xffff
        )),
    }
}

/// Splits one typed message off the front of `buf`: `Ok(Some((tag, total_len)))` when a whole
/// message is present, `Ok(None)` when more bytes are needed.
pub fn frame(buf: &[u8]) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return err(format!(
            "invalid length {len} in message of type '{}'",
            shown_tag(buf[0])
        ));
    }
    let total = len as usize + 1;
    if total > MAX_MESSAGE_LEN {
        return err(format!(
            "message of type '{}' is {total} bytes, more than the limit of {MAX_MESSAGE_LEN}",
            shown_tag(buf[0])
        ));
    }
    Ok((buf.len() >= total).then_some((buf[0], total)))
}

/// A tag byte fit for an error message.
pub fn shown_tag(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        (tag as char).to_string()
    } else {
        format!("\\x{tag:02x}")
    }
}

/// Where the first NUL is. Many strings in a message are empty names (the unnamed statement and
/// portal), found without memchr's setup.
#[inline]
fn nul_at(buf: &[u8]) -> Option<usize> {
    match buf.first() {
        Some(0) => Some(0),
        _ => memchr::memchr(0, buf),
    }
}

#[cold]
fn not_terminated(what: &str) -> ProtocolError {
    ProtocolError(format!("{what} is not NUL-terminated"))
}

/// A cursor over a message body.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    #[inline]
    pub fn cstr(&mut self, what: &str) -> Result<&'a [u8], ProtocolError> {
        match nul_at(self.buf) {
            Some(i) => {
                let s = &self.buf[..i];
                self.buf = &self.buf[i + 1..];
                Ok(s)
            }
            None => Err(not_terminated(what)),
        }
    }

    pub fn byte(&mut self, what: &str) -> Result<u8, ProtocolError> {
        match self.buf.split_first() {
            Some((&b, rest)) => {
                self.buf = rest;
                Ok(b)
            }
            None => err(format!("message ends before {what}")),
        }
    }

    pub fn i32(&mut self, what: &str) -> Result<i32, ProtocolError> {
        if self.buf.len() < 4 {
            return err(format!("message ends before {what}"));
        }
        let v = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        self.buf = &self.buf[4..];
        Ok(v)
    }

    pub fn i16(&mut self, what: &str) -> Result<i16, ProtocolError> {
        if self.buf.len() < 2 {
            return err(format!("message ends before {what}"));
        }
        let v = i16::from_be_bytes([self.buf[0], self.buf[1]]);
        self.buf = &self.buf[2..];
        Ok(v)
    }

    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return err(format!("message ends inside {what}"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

fn utf8(b: &[u8], what: &str) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError(format!("{what} is not valid UTF-8")))
}

/// Body of a typed message (after tag and length) inside a framed slice.
pub fn body(msg: &[u8]) -> &[u8] {
    &msg[5..]
}

/// Parse ('P'): statement name, query text, and the parameter-type section kept raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseMsg<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub param_types: &'a [u8],
}

pub fn parse_parse(body: &[u8]) -> Result<ParseMsg<'_>, ProtocolError> {
    let mut r = Reader::new(body);
    let name = r.cstr("Parse statement name")?;
    let query = r.cstr("Parse query")?;
    let param_types = r.rest();
    let mut t = Reader::new(param_types);
    let n = t.i16("Parse parameter count")?;
    if n < 0 {
        return err(format!("Parse has a negative parameter count {n}"));
    }
    t.take(n as usize * 4, "Parse parameter types")?;
    if !t.rest().is_empty() {
        return err("trailing bytes after Parse parameter types");
    }
    Ok(ParseMsg {
        name,
        query,
        param_types,
    })
}

/// Bind ('B'): portal and statement names; the rest (formats, values) is kept raw and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindMsg<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub rest: &'a [u8],
}

/// A Bind's names and its raw rest, without walking the parameters: for a message
/// [`check_frontend`] (through [`parse_bind`]) has accepted already.
pub fn bind_names(body: &[u8]) -> Result<BindMsg<'_>, ProtocolError> {
    let mut r = Reader::new(body);
    let portal = r.cstr("Bind portal name")?;
    let statement = r.cstr("Bind statement name")?;
    Ok(BindMsg {
        portal,
        statement,
        rest: r.rest(),
    })
}

pub fn parse_bind(body: &[u8]) -> Result<BindMsg<'_>, ProtocolError> {
    let names = bind_names(body)?;
    let rest = names.rest;
    // Walk the rest so a malformed Bind is refused here rather than by the server mid-batch.
    let mut t = Reader::new(rest);
    let formats = t.i16("Bind parameter format count")?;
    if formats < 0 {
        return err("Bind has a negative parameter format count");
    }
    t.take(formats as usize * 2, "Bind parameter formats")?;
    let values = t.i16("Bind parameter count")?;
    if values < 0 {
        return err("Bind has a negative parameter count");
    }
    for _ in 0..values {
        let len = t.i32("Bind parameter length")?;
        if len < -1 {
            return err(format!("Bind parameter length {len} is invalid"));
        }
        if len > 0 {
            t.take(len as usize, "Bind parameter value")?;
        }
    }
    let results = t.i16("Bind result format count")?;
    if results < 0 {
        return err("Bind has a negative result format count");
    }
    t.take(results as usize * 2, "Bind result formats")?;
    if !t.rest().is_empty() {
        return err("trailing bytes after Bind result formats");
    }
    Ok(names)
}

/// Describe ('D') and Close ('C'): 'S' (statement) or 'P' (portal) and a name.
pub fn parse_target<'a>(body: &'a [u8], what: &str) -> Result<(u8, &'a [u8]), ProtocolError> {
    let mut r = Reader::new(body);
    let kind = r.byte(what)?;
    if kind != b'S' && kind != b'P' {
        return err(format!(
            "{what} target must be 'S' or 'P', not '{}'",
            shown_tag(kind)
        ));
    }
    let name = r.cstr(what)?;
    if !r.rest().is_empty() {
        return err(format!("trailing bytes after {what}"));
    }
    Ok((kind, name))
}

/// Query ('Q'): the SQL text.
pub fn parse_query(body: &[u8]) -> Result<&[u8], ProtocolError> {
    let mut r = Reader::new(body);
    let q = r.cstr("Query text")?;
    if !r.rest().is_empty() {
        return err("trailing bytes after the Query text");
    }
    Ok(q)
}

/// Execute ('E'): portal name and row limit.
pub fn parse_execute(body: &[u8]) -> Result<(&[u8], i32), ProtocolError> {
    let mut r = Reader::new(body);
    let portal = r.cstr("Execute portal name")?;
    let limit = r.i32("Execute row limit")?;
    if !r.rest().is_empty() {
        return err("trailing bytes after Execute");
    }
    Ok((portal, limit))
}

/// Checks a client message the router forwards without looking inside: the tag must be one a
/// client may send, and fixed-size messages must have their size.
pub fn check_frontend(tag: u8, body: &[u8]) -> Result<(), ProtocolError> {
    match tag {
        b'Q' => parse_query(body).map(|_| ()),
        b'P' => parse_parse(body).map(|_| ()),
        b'B' => parse_bind(body).map(|_| ()),
        b'D' => parse_target(body, "Describe").map(|_| ()),
        b'C' => parse_target(body, "Close").map(|_| ()),
        b'E' => parse_execute(body).map(|_| ()),
        b'S' | b'H' | b'c' | b'X' if body.is_empty() => Ok(()),
        b'S' | b'H' | b'c' | b'X' => err(format!("message '{}' must have no body", shown_tag(tag))),
        b'd' => Ok(()),
        b'f' => Reader::new(body).cstr("CopyFail message").map(|_| ()),
        b'F' => err("the function call protocol is not supported through dbopt-router"),
        b'p' => err("unexpected password message"),
        other => err(format!(
            "unknown frontend message type '{}'",
            shown_tag(other)
        )),
    }
}

// ---- messages the router writes ----

/// Appends a typed message built by `fill` to `out`, fixing up the length.
pub fn put_msg(out: &mut Vec<u8>, tag: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    out.push(tag);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    fill(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// ErrorResponse (or NoticeResponse with `tag = b'N'`) with severity, SQLSTATE and message.
pub fn put_error(out: &mut Vec<u8>, severity: &str, code: &str, message: &str) {
    put_msg(out, b'E', |b| {
        b.push(b'S');
        put_cstr(b, severity.as_bytes());
        b.push(b'V');
        put_cstr(b, severity.as_bytes());
        b.push(b'C');
        put_cstr(b, code.as_bytes());
        b.push(b'M');
        put_cstr(b, message.replace('\0', " ").as_bytes());
        b.push(0);
    });
}

/// An ErrorResponse (`tag = b'E'`) or NoticeResponse (`b'N'`) with DETAIL and HINT fields.
pub fn put_report(
    out: &mut Vec<u8>,
    tag: u8,
    severity: &str,
    code: &str,
    message: &str,
    detail: &str,
    hint: &str,
) {
    put_msg(out, tag, |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
            (b'D', detail),
            (b'H', hint),
        ] {
            if !value.is_empty() {
                b.push(field);
                put_cstr(b, value.replace('\0', " ").as_bytes());
            }
        }
        b.push(0);
    });
}

pub fn put_ready(out: &mut Vec<u8>, status: u8) {
    put_msg(out, b'Z', |b| b.push(status));
}

pub fn put_parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    put_msg(out, b'S', |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

pub fn put_auth(out: &mut Vec<u8>, code: i32, data: &[u8]) {
    put_msg(out, b'R', |b| {
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(data);
    });
}

pub fn put_backend_key(out: &mut Vec<u8>, pid: i32, secret: i32) {
    put_msg(out, b'K', |b| {
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(&secret.to_be_bytes());
    });
}

pub fn put_parse(out: &mut Vec<u8>, name: &[u8], query: &[u8], param_types: &[u8]) {
    put_msg(out, b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, query);
        b.extend_from_slice(param_types);
    });
}

pub fn put_bind(out: &mut Vec<u8>, portal: &[u8], statement: &[u8], rest: &[u8]) {
    put_msg(out, b'B', |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.extend_from_slice(rest);
    });
}

pub fn put_target(out: &mut Vec<u8>, tag: u8, kind: u8, name: &[u8]) {
    put_msg(out, tag, |b| {
        b.push(kind);
        put_cstr(b, name);
    });
}

pub fn put_query(out: &mut Vec<u8>, sql: &str) {
    put_msg(out, b'Q', |b| put_cstr(b, sql.as_bytes()));
}

/// Startup packet (no tag) with the given parameters.
pub fn put_startup(out: &mut Vec<u8>, params: &[(&str, &str)]) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&PROTOCOL_V3.to_be_bytes());
    for (k, v) in params {
        put_cstr(out, k.as_bytes());
        put_cstr(out, v.as_bytes());
    }
    out.push(0);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Fields of an ErrorResponse/NoticeResponse body: (SQLSTATE, message).
pub fn error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut r = Reader::new(body);
    while let Ok(field) = r.byte("field") {
        if field == 0 {
            break;
        }
        let Ok(v) = r.cstr("field value") else { break };
        let v = String::from_utf8_lossy(v).into_owned();
        match field {
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    (code, message)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_msg(&mut v, tag, |b| b.extend_from_slice(body));
        v
    }

    #[test]
    fn frames_whole_messages_only() {
        let m = msg(b'Q', b"select 1\0");
        assert_eq!(frame(&m[..4]).unwrap(), None);
        assert_eq!(frame(&m[..m.len() - 1]).unwrap(), None);
        assert_eq!(frame(&m).unwrap(), Some((b'Q', m.len())));
        let mut two = m.clone();
        two.extend_from_slice(&msg(b'S', b""));
        assert_eq!(frame(&two).unwrap(), Some((b'Q', m.len())));
    }

    #[test]
    fn finds_the_first_nul_of_empty_short_and_long_strings() {
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 100] {
            let mut b = vec![b'x'; len];
            assert_eq!(nul_at(&b), None, "no NUL in {len} bytes");
            b.push(0);
            b.extend_from_slice(b"y\0");
            assert_eq!(nul_at(&b), Some(len), "NUL after {len} bytes");
            let mut r = Reader::new(&b);
            assert_eq!(r.cstr("s").unwrap(), &b[..len]);
            assert_eq!(r.cstr("s").unwrap(), b"y");
            assert!(r
                .cstr("s")
                .unwrap_err()
                .0
                .contains("s is not NUL-terminated"));
        }
    }

    #[test]
    fn the_nul_search_agrees_with_a_byte_search_on_mixed_bytes() {
        // NULs among other bytes (0x01, 0x7f, 0x80, 0xff, letters) at every length up to past
        // memchr's short-input paths: the empty-name check and memchr give the first one.
        let alphabet = [0x00u8, 0x01, 0x7f, 0x80, 0xff, b'a'];
        let mut seed = 0x2545_f491_u32;
        for len in 0..48 {
            for _ in 0..64 {
                let b: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                        alphabet[(seed >> 16) as usize % alphabet.len()]
                    })
                    .collect();
                assert_eq!(nul_at(&b), b.iter().position(|&x| x == 0), "{b:02x?}");
            }
        }
    }

    #[test]
    fn refuses_bad_lengths() {
        assert!(frame(&[b'Q', 0, 0, 0, 3]).is_err());
        assert!(frame(&[b'Q', 0xff, 0xff, 0xff, 0xff]).is_err());
        let e = frame(&[b'd', 0x7f, 0, 0, 0]).unwrap_err();
        assert!(e.0.contains("more than the limit"), "{e}");
        assert!(startup_len([0, 0, 0, 7]).is_err());
        assert!(startup_len([0, 1, 0, 0]).is_err());
        assert_eq!(startup_len([0, 0, 0, 8]).unwrap(), 8);
    }

    #[test]
    fn startup_variants() {
        let mut v = Vec::new();
        put_startup(&mut v, &[("user", "app"), ("database", "db")]);
        let len = startup_len([v[0], v[1], v[2], v[3]]).unwrap();
        assert_eq!(len, v.len());
        assert_eq!(
            parse_startup(&v[4..]).unwrap(),
            Startup::Params(vec![
                ("user".into(), "app".into()),
                ("database".into(), "db".into())
            ])
        );
        assert_eq!(
            parse_startup(&SSL_REQUEST.to_be_bytes()).unwrap(),
            Startup::Ssl
        );
        let mut c = CANCEL_REQUEST.to_be_bytes().to_vec();
        c.extend_from_slice(&7i32.to_be_bytes());
        c.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_startup(&c).unwrap(),
            Startup::Cancel { pid: 7, secret: -9 }
        );
        let e = parse_startup(&(2i32 << 16).to_be_bytes()).unwrap_err();
        assert!(e.0.contains("protocol 2.0"), "{e}");
        let mut unterminated = PROTOCOL_V3.to_be_bytes().to_vec();
        unterminated.extend_from_slice(b"user\0app");
        assert!(parse_startup(&unterminated).is_err());
    }

    #[test]
    fn parse_bind_round_trip() {
        let mut v = Vec::new();
        put_parse(&mut v, b"s1", b"select $1", &[0, 1, 0, 0, 0, 23]);
        let p = parse_parse(body(&v)).unwrap();
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"select $1");
        let mut b = Vec::new();
        let rest = [0u8, 0, 0, 1, 0, 0, 0, 1, b'5', 0, 0];
        put_bind(&mut b, b"", b"s1", &rest);
        let m = parse_bind(body(&b)).unwrap();
        assert_eq!(
            (m.portal, m.statement, m.rest),
            (&b""[..], &b"s1"[..], &rest[..])
        );
        // A value longer than the message is refused.
        let bad = [0u8, 0, 0, 1, 0, 0, 0, 9, b'5', 0, 0];
        let mut b2 = Vec::new();
        put_bind(&mut b2, b"", b"s1", &bad);
        assert!(parse_bind(body(&b2)).is_err());
        // Parse with a negative parameter count.
        let mut v2 = Vec::new();
        put_parse(&mut v2, b"", b"x", &[0xff, 0xff]);
        assert!(parse_parse(body(&v2)).is_err());
    }

    #[test]
    fn frontend_checks() {
        assert!(check_frontend(b'S', b"").is_ok());
        assert!(check_frontend(b'S', b"x").is_err());
        assert!(check_frontend(b'D', b"Xname\0").is_err());
        assert!(check_frontend(b'D', b"Sname\0").is_ok());
        assert!(check_frontend(b'E', b"\0\0\0\0\0").is_ok());
        assert!(check_frontend(b'E', b"\0\0\0").is_err());
        assert!(check_frontend(b'Z', b"I").is_err());
        assert!(check_frontend(0, b"").is_err());
    }

    /// Random bytes and random message sequences never panic the parsers; every message that
    /// `check_frontend` accepts is fully parsed by its own parser too.
    #[test]
    fn fuzz_frontend_parsers() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let tags = b"QPBDCESHXcdfFpZ!\0";
        for round in 0..200_000u32 {
            let len = (next() % 48) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && !bytes.is_empty() {
                // Well-framed messages with random bodies reach the per-type parsers.
                bytes[0] = tags[(next() % tags.len() as u64) as usize];
                let body_len = bytes.len().saturating_sub(5) + 4;
                if bytes.len() >= 5 {
                    bytes[1..5].copy_from_slice(&(body_len as i32).to_be_bytes());
                }
            }
            let _ = startup_len([
                *bytes.first().unwrap_or(&0),
                *bytes.get(1).unwrap_or(&0),
                *bytes.get(2).unwrap_or(&0),
                *bytes.get(3).unwrap_or(&0),
            ]);
            let _ = parse_startup(&bytes);
            let mut rest = &bytes[..];
            while let Ok(Some((tag, total))) = frame(rest) {
                let b = &rest[5..total];
                if check_frontend(tag, b).is_ok() {
                    match tag {
                        b'P' => assert!(parse_parse(b).is_ok()),
                        b'B' => assert!(parse_bind(b).is_ok()),
                        b'E' => assert!(parse_execute(b).is_ok()),
                        _ => {}
                    }
                }
                let _ = error_fields(b);
                rest = &rest[total..];
            }
        }
    }

    #[test]
    fn error_response_fields() {
        let mut v = Vec::new();
        put_error(&mut v, "FATAL", "53300", "too many");
        assert_eq!(frame(&v).unwrap(), Some((b'E', v.len())));
        assert_eq!(
            error_fields(body(&v)),
            ("53300".to_string(), "too many".to_string())
        );
    }
}
