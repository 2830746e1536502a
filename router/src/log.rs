//! Log lines on stderr: `2026-11-26T21:04:05.123Z LEVEL message`. Warnings and errors always;
//! info unless `DBOPT_ROUTER_QUIET` is set.
//!
//! Messages carry client-chosen text (user and database names, addresses, server errors), so
//! every control character is escaped when the line is written: one call is one line, and a
//! user name with a newline cannot forge another.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static QUIET: AtomicBool = AtomicBool::new(false);

pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

/// UTC timestamp with milliseconds, from the system clock.
pub fn timestamp() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    utc_ms(d.as_millis() as u64)
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds
/// (`2026-11-26T21:04:05.123Z`).
pub fn utc_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// `msg` with control characters (and backslashes) escaped, so it stays on one line.
pub fn escape(msg: &str) -> std::borrow::Cow<'_, str> {
    if !msg.chars().any(|c| c.is_control() || c == '\\') {
        return std::borrow::Cow::Borrowed(msg);
    }
    let mut out = String::with_capacity(msg.len() + 8);
    for c in msg.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn line(level: &str, msg: &str) {
    eprintln!("{} {level} {}", timestamp(), escape(msg));
}

pub fn info(msg: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        line("INFO", msg);
    }
}

pub fn warn(msg: &str) {
    line("WARN", msg);
}

pub fn error(msg: &str) {
    line("ERROR", msg);
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_cannot_start_a_new_line() {
        assert_eq!(escape("plain user"), "plain user");
        assert_eq!(
            escape("x\n2026-01-01T00:00:00.000Z ERROR forged\r\t\u{1b}[31m\\"),
            "x\\n2026-01-01T00:00:00.000Z ERROR forged\\r\\t\\u{1b}[31m\\\\"
        );
    }
}
