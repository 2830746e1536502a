//! Argument parsing with precise errors. Pure functions over bytes so they are unit-tested without
//! Redis; the command handlers pass `RedisString::as_slice()`.

use redis_module::RedisError;

/// An `ERR …` reply.
pub fn err(message: impl Into<String>) -> RedisError {
    RedisError::String(format!("ERR {}", message.into()))
}

/// A `WRONGTYPE …` reply for a key that holds something other than what the command works on.
pub fn wrong_type(what: &str) -> RedisError {
    RedisError::String(format!(
        "WRONGTYPE Operation against a key holding a value that is not a {what}"
    ))
}

/// An unsigned decimal integer within `min..=max`; anything else (sign, spaces, overflow, empty)
/// is `ERR <name> must be an integer between <min> and <max>`.
pub fn uint(bytes: &[u8], name: &str, min: u64, max: u64) -> Result<u64, RedisError> {
    digits(bytes)
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| err(format!("{name} must be an integer between {min} and {max}")))
}

/// The value of one or more ASCII digits (leading zeros allowed), `None` for anything else or
/// past `u64::MAX`. A byte loop: every limiter call parses two of these.
fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    if bytes.len() <= 19 {
        // At most 19 digits cannot overflow: no checked arithmetic per digit.
        let mut v = 0u64;
        for &b in bytes {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                return None;
            }
            v = v * 10 + u64::from(d);
        }
        return Some(v);
    }
    bytes.iter().try_fold(0u64, |v, &b| {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Case-insensitive keyword match (Redis options are case-insensitive).
pub fn is_keyword(bytes: &[u8], keyword: &str) -> bool {
    bytes.eq_ignore_ascii_case(keyword.as_bytes())
}

/// An argument as printable ASCII for error messages (other bytes as `\xNN`, like redis-cli
/// shows them), cut to 64 input bytes. ASCII only: redis-module writes error text byte per char,
/// so anything else would put invalid UTF-8 on the wire.
pub fn shown(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in &bytes[..bytes.len().min(64)] {
        if b.is_ascii_graphic() || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    if bytes.len() > 64 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(e: RedisError) -> String {
        e.to_string()
    }

    #[test]
    fn integers_in_range() {
        assert_eq!(uint(b"0", "n", 0, 10).ok(), Some(0));
        assert_eq!(uint(b"10", "n", 0, 10).ok(), Some(10));
        assert_eq!(uint(b"007", "n", 0, 10).ok(), Some(7));
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"11",
            b"1.5",
            b"x",
            b"99999999999999999999999",
            b"18446744073709551616",
            b"1\x00",
            b"\xd9\xa1",
        ] {
            let e = uint(bad, "limit", 1, 10).expect_err("rejected");
            assert_eq!(
                msg(e),
                "ERR limit must be an integer between 1 and 10",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn digits_match_the_standard_parser() {
        for text in [
            "0",
            "9",
            "10",
            "0000",
            "9999999999999999999",
            "00000000000000000001",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "1a",
        ] {
            assert_eq!(digits(text.as_bytes()), text.parse::<u64>().ok(), "{text}");
        }
        assert_eq!(
            uint(b"18446744073709551615", "n", 0, u64::MAX).ok(),
            Some(u64::MAX)
        );
    }

    #[test]
    fn keywords_and_display() {
        assert!(is_keyword(b"cost", "COST"));
        assert!(is_keyword(b"CoSt", "COST"));
        assert!(!is_keyword(b"costs", "COST"));
        assert_eq!(shown(&[b'a'; 100]), format!("{}...", "a".repeat(64)));
        assert_eq!(shown(b"a\xff\r\n\0b"), "a\\xff\\x0d\\x0a\\x00b");
        assert!(shown(&(0..=255u8).collect::<Vec<_>>()).is_ascii());
    }
}
