//! The one definition of what a commit announces and which cache tags that invalidates, used by
//! the extension (which writes announcements) and the router (which reads them and keys its cache).
//!
//! # Layout
//! - [`Announcement`]: what one committed transaction changed — the database, the tables (by OID),
//!   application tags, whether the schema changed, or "everything" — and the WAL position the
//!   extension read just before the commit record (a lower bound of the commit's own position; the
//!   router turns it into an upper bound with its own sample of the primary, see the router's
//!   `cache` docs).
//! - [`encode`] / [`decode`]: the NOTIFY payload on [`CHANNEL`] (JSON, always under NOTIFY's
//!   8,000-byte limit: what does not fit becomes a whole-database announcement, never a drop).
//! - [`Tag`]: the cache tag names (Redis keys) an announcement invalidates, and entries carry.
//! - [`check_user_tag`]: what an application tag may be.
//!
//! # Why OIDs
//! A table's OID does not change when it is renamed or when its schema moves on the search_path,
//! it is the same on every physical replica, and readers learn the OIDs a statement reads from
//! PostgreSQL's own planner (`dbopt.cache_analysis`), so no name resolution is repeated here.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The NOTIFY channel the extension announces commits on.
pub const CHANNEL: &str = "dbopt_invalidate";
/// NOTIFY refuses payloads of 8,000 bytes or more.
pub const MAX_PAYLOAD: usize = 7_999;
/// Longest application tag, in bytes.
pub const MAX_USER_TAG: usize = 256;
/// Format version written in every payload.
pub const VERSION: u32 = 1;

/// What one committed transaction changed in one database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// Format version ([`VERSION`]).
    pub v: u32,
    /// Database name.
    pub db: String,
    /// WAL insert position read just before the commit record, as PostgreSQL prints it (`0/16B3F28`).
    pub lsn: String,
    /// OIDs of the tables written (sorted, unique).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<u32>,
    /// Application tags (`dbopt.invalidate_tags`), sorted and unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Objects were created, altered or dropped: what statements read may have changed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ddl: bool,
    /// When the transaction announced itself (unix microseconds): the start of the invalidation
    /// delay the router measures.
    #[serde(default)]
    pub at_us: i64,
    /// Everything cached for this database is invalid (overflow, `dbopt.invalidate_all()`,
    /// a prepared transaction committed).
    #[serde(default, skip_serializing_if = "is_false")]
    pub all: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Announcement {
    /// An announcement for `db` at `lsn` with nothing in it yet.
    pub fn new(db: &str, lsn: u64) -> Announcement {
        Announcement {
            v: VERSION,
            db: db.to_string(),
            lsn: format_lsn(lsn),
            ..Default::default()
        }
    }

    /// The WAL position as a number (0 when unparsable).
    pub fn lsn_value(&self) -> u64 {
        parse_lsn(&self.lsn).unwrap_or(0)
    }

    /// The tags this announcement invalidates.
    pub fn invalidated(&self) -> Vec<Tag> {
        if self.all {
            return vec![Tag::Database(self.db.clone())];
        }
        let tables = self.tables.iter().map(|&t| Tag::Table(self.db.clone(), t));
        let users = self
            .tags
            .iter()
            .map(|t| Tag::User(self.db.clone(), t.clone()));
        tables.chain(users).collect()
    }
}

/// The payload for an announcement: JSON; when that is too long for NOTIFY, a whole-database
/// announcement instead (same database, WAL position and `ddl`).
pub fn encode(a: &Announcement) -> String {
    let mut a = a.clone();
    a.tables.sort_unstable();
    a.tables.dedup();
    a.tags.sort_unstable();
    a.tags.dedup();
    let text = serde_json::to_string(&a).unwrap_or_default();
    if !text.is_empty() && text.len() <= MAX_PAYLOAD {
        return text;
    }
    let overflow = Announcement {
        tables: Vec::new(),
        tags: Vec::new(),
        all: true,
        ..a
    };
    // A database name is at most 63 bytes: this always fits.
    serde_json::to_string(&overflow).unwrap_or_default()
}

/// Why a payload was not an announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadError {
    NotJson(String),
    Version(u32),
    EmptyDatabase,
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::NotJson(e) => write!(f, "payload is not an announcement: {e}"),
            PayloadError::Version(v) => write!(f, "announcement format version {v} is not 1"),
            PayloadError::EmptyDatabase => f.write_str("announcement names no database"),
        }
    }
}

impl std::error::Error for PayloadError {}

/// Reads a payload written by [`encode`].
pub fn decode(payload: &str) -> Result<Announcement, PayloadError> {
    let a: Announcement =
        serde_json::from_str(payload).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    if a.v != VERSION {
        return Err(PayloadError::Version(a.v));
    }
    if a.db.is_empty() {
        return Err(PayloadError::EmptyDatabase);
    }
    Ok(a)
}

/// A cache tag: a Redis key of the module's tag kind, and a key of the router's local layer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tag {
    /// Every entry of a database carries it: dropping it drops them all.
    Database(String),
    /// A table, by OID.
    Table(String, u32),
    /// An application tag.
    User(String, String),
}

impl Tag {
    /// The Redis key. The database name is length-prefixed, so no name can imitate another tag.
    pub fn key(&self) -> String {
        match self {
            Tag::Database(db) => format!("dbopt:tag:{}:{db}:all", db.len()),
            Tag::Table(db, oid) => format!("dbopt:tag:{}:{db}:t:{oid}", db.len()),
            Tag::User(db, t) => format!("dbopt:tag:{}:{db}:u:{t}", db.len()),
        }
    }
}

/// Why an application tag is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagError {
    Empty,
    TooLong(usize),
    Control,
}

impl fmt::Display for TagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagError::Empty => f.write_str("a tag may not be empty"),
            TagError::TooLong(n) => write!(f, "a tag is {n} bytes, at most {MAX_USER_TAG} allowed"),
            TagError::Control => f.write_str("a tag may not contain control characters"),
        }
    }
}

impl std::error::Error for TagError {}

/// An application tag is 1–256 bytes without control characters.
pub fn check_user_tag(tag: &str) -> Result<(), TagError> {
    if tag.is_empty() {
        return Err(TagError::Empty);
    }
    if tag.len() > MAX_USER_TAG {
        return Err(TagError::TooLong(tag.len()));
    }
    if tag.chars().any(char::is_control) {
        return Err(TagError::Control);
    }
    Ok(())
}

/// Microseconds from the unix epoch to PostgreSQL's (2000-01-01).
pub const POSTGRES_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

/// A PostgreSQL timestamp (microseconds since 2000-01-01) as unix microseconds.
pub fn unix_micros(postgres_timestamp: i64) -> i64 {
    postgres_timestamp.saturating_add(POSTGRES_EPOCH_UNIX_US)
}

/// `X/Y` as PostgreSQL prints an LSN.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `X/Y`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= 0xFFFF_FFFF && lo <= 0xFFFF_FFFF).then_some((hi << 32) | lo)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_sorted_and_unique() {
        let mut a = Announcement::new("shop", 0x1_0000_0010);
        a.tables = vec![20, 10, 20];
        a.tags = vec!["user:42".into(), "user:1".into(), "user:42".into()];
        let text = encode(&a);
        assert_eq!(
            text,
            r#"{"v":1,"db":"shop","lsn":"1/10","tables":[10,20],"tags":["user:1","user:42"],"at_us":0}"#
        );
        let b = decode(&text).unwrap();
        assert_eq!(b.tables, vec![10, 20]);
        assert_eq!(b.lsn_value(), 0x1_0000_0010);
        assert!(!b.all && !b.ddl);
    }

    #[test]
    fn overflow_becomes_whole_database_never_a_drop() {
        let mut a = Announcement::new("shop", 7);
        a.tables = (0..5000).collect();
        a.ddl = true;
        let text = encode(&a);
        assert!(text.len() <= MAX_PAYLOAD);
        let b = decode(&text).unwrap();
        assert!(b.all && b.ddl && b.tables.is_empty());
        assert_eq!(b.invalidated(), vec![Tag::Database("shop".into())]);
        // Just under the limit stays exact.
        let mut c = Announcement::new("shop", 7);
        c.tables = (1_000_000..1_000_000 + 900).collect();
        let t = encode(&c);
        assert!(t.len() < MAX_PAYLOAD, "{}", t.len());
        assert_eq!(decode(&t).unwrap().tables.len(), 900);
    }

    #[test]
    fn bad_payloads_are_errors() {
        assert!(matches!(decode("hello"), Err(PayloadError::NotJson(_))));
        assert_eq!(
            decode(r#"{"v":2,"db":"x","lsn":"0/1"}"#),
            Err(PayloadError::Version(2))
        );
        assert_eq!(
            decode(r#"{"v":1,"db":"","lsn":"0/1"}"#),
            Err(PayloadError::EmptyDatabase)
        );
        assert!(decode(r#"{"v":1,"db":"x","lsn":"0/1","tables":[-1]}"#).is_err());
    }

    #[test]
    fn tag_keys_cannot_imitate_each_other() {
        let a = Tag::Table("a:t".into(), 1).key();
        let b = Tag::Table("a".into(), 1).key();
        assert_ne!(a, b);
        assert_eq!(
            Tag::User("db".into(), "user:42".into()).key(),
            "dbopt:tag:2:db:u:user:42"
        );
        assert_ne!(
            Tag::User("x".into(), "t:1".into()).key(),
            Tag::Table("x".into(), 1).key()
        );
    }

    #[test]
    fn user_tags_are_checked() {
        assert_eq!(check_user_tag(""), Err(TagError::Empty));
        assert_eq!(check_user_tag("a\nb"), Err(TagError::Control));
        assert_eq!(
            check_user_tag(&"x".repeat(257)),
            Err(TagError::TooLong(257))
        );
        assert!(check_user_tag("user:42").is_ok());
    }

    #[test]
    fn lsn_text() {
        assert_eq!(format_lsn(0x16B3F28), "0/16B3F28");
        assert_eq!(parse_lsn("0/16B3F28"), Some(0x16B3F28));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x"), None);
        assert_eq!(parse_lsn("100000000/0"), None);
    }
}
