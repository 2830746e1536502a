//! The in-process layer: a least-recently-used map bounded in bytes, with the same validity rule
//! as the Redis module — an entry records its tags' versions when its fill started and is valid
//! only while every tag still has that version (pure; the clock is an argument).
//!
//! Invalidating a tag bumps its version to a new value of one process-wide counter, so every
//! entry filled before is invalid at once, including fills still running (they are refused when
//! they try to store). A tag never seen has the "floor" version; when the version map grows past
//! its bound it is emptied, the floor moves up, and every entry is dropped — fail safe.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A cached reply.
#[derive(Debug)]
pub struct Entry {
    /// The wire messages PostgreSQL sent for the batch, without its ReadyForQuery.
    pub reply: Vec<u8>,
    pub tags: Vec<String>,
    /// The tags' versions when the fill started (same order as `tags`).
    pub versions: Vec<u64>,
    pub expires_ms: u64,
    /// An LSN at least as new as the state the fill read (what a client has seen after a hit).
    pub fill_lsn: u64,
}

impl Entry {
    fn cost(&self, key: &str) -> usize {
        self.reply.len() + key.len() + 96 + self.tags.len() * 48
    }
}

/// Counters of the local layer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LocalStats {
    pub hits: u64,
    pub misses: u64,
    pub fills: u64,
    pub refused: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub entries: u64,
}

struct Slot {
    entry: Arc<Entry>,
    tick: u64,
    cost: usize,
}

/// Most tags whose version is remembered before the map is emptied (and every entry with it).
pub const MAX_TAG_VERSIONS: usize = 1 << 20;

pub struct Local {
    max_bytes: usize,
    bytes: usize,
    tick: u64,
    slots: HashMap<String, Slot>,
    order: BTreeMap<u64, String>,
    versions: HashMap<String, u64>,
    counter: u64,
    floor: u64,
    pub stats: LocalStats,
}

impl Local {
    pub fn new(max_bytes: usize) -> Local {
        Local {
            max_bytes,
            bytes: 0,
            tick: 0,
            slots: HashMap::new(),
            order: BTreeMap::new(),
            versions: HashMap::new(),
            counter: 0,
            floor: 0,
            stats: LocalStats::default(),
        }
    }

    pub fn set_max_bytes(&mut self, max_bytes: usize) {
        self.max_bytes = max_bytes;
        self.evict_to(max_bytes);
    }

    /// The tags' versions now: taken before a fill, checked when it stores.
    pub fn versions(&self, tags: &[String]) -> Vec<u64> {
        tags.iter()
            .map(|t| self.versions.get(t).copied().unwrap_or(self.floor))
            .collect()
    }

    fn valid(&self, e: &Entry, now_ms: u64) -> bool {
        e.expires_ms > now_ms && self.versions(&e.tags) == e.versions
    }

    pub fn get(&mut self, key: &str, now_ms: u64) -> Option<Arc<Entry>> {
        let Some(slot) = self.slots.get(key) else {
            self.stats.misses += 1;
            return None;
        };
        if !self.valid(&slot.entry, now_ms) {
            self.remove(key);
            self.stats.misses += 1;
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        let slot = self.slots.get_mut(key)?;
        self.order.remove(&slot.tick);
        slot.tick = tick;
        self.order.insert(tick, key.to_string());
        self.stats.hits += 1;
        Some(slot.entry.clone())
    }

    /// Stores an entry unless a tag changed since its versions were taken, it expired, or it is
    /// larger than the whole layer. True when stored.
    pub fn insert(&mut self, key: &str, entry: Arc<Entry>, now_ms: u64) -> bool {
        let cost = entry.cost(key);
        if !self.valid(&entry, now_ms) || cost > self.max_bytes {
            self.stats.refused += 1;
            return false;
        }
        self.remove(key);
        self.evict_to(self.max_bytes.saturating_sub(cost));
        self.tick += 1;
        self.order.insert(self.tick, key.to_string());
        self.slots.insert(
            key.to_string(),
            Slot {
                entry,
                tick: self.tick,
                cost,
            },
        );
        self.bytes += cost;
        self.stats.fills += 1;
        self.sync_gauges();
        true
    }

    /// Every entry carrying one of the tags becomes invalid (and fills running now are refused).
    pub fn invalidate(&mut self, tags: &[String]) {
        if self.versions.len() + tags.len() > MAX_TAG_VERSIONS {
            self.counter += 1;
            self.floor = self.counter;
            self.versions.clear();
            self.clear();
        }
        for t in tags {
            self.counter += 1;
            self.versions.insert(t.clone(), self.counter);
        }
    }

    /// Invalidates every tag of a stored entry that `matches` (a manual invalidation by pattern);
    /// returns how many tags were invalidated.
    pub fn invalidate_matching(&mut self, matches: impl Fn(&str) -> bool) -> usize {
        let mut tags: Vec<String> = self
            .slots
            .values()
            .flat_map(|s| s.entry.tags.iter())
            .filter(|t| matches(t))
            .cloned()
            .collect();
        tags.sort_unstable();
        tags.dedup();
        self.invalidate(&tags);
        tags.len()
    }

    /// Drops every entry (versions stay: fills running now are still checked against them).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.order.clear();
        self.bytes = 0;
        self.sync_gauges();
    }

    fn remove(&mut self, key: &str) {
        if let Some(slot) = self.slots.remove(key) {
            self.order.remove(&slot.tick);
            self.bytes -= slot.cost;
            self.sync_gauges();
        }
    }

    fn evict_to(&mut self, limit: usize) {
        while self.bytes > limit {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some(slot) = self.slots.remove(&key) {
                self.bytes -= slot.cost;
                self.stats.evictions += 1;
            }
        }
        self.sync_gauges();
    }

    fn sync_gauges(&mut self) {
        self.stats.bytes = self.bytes as u64;
        self.stats.entries = self.slots.len() as u64;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(oid: u32) -> String {
        format!("t:{oid}")
    }

    fn entry(l: &Local, tags: Vec<String>, size: usize, expires_ms: u64) -> Arc<Entry> {
        Arc::new(Entry {
            reply: vec![b'x'; size],
            versions: l.versions(&tags),
            tags,
            expires_ms,
            fill_lsn: 0,
        })
    }

    #[test]
    fn hit_until_a_tag_is_invalidated() {
        let mut l = Local::new(1 << 20);
        let e = entry(&l, vec![t(1), t(2)], 10, 1000);
        assert!(l.insert("k", e, 0));
        assert!(l.get("k", 1).is_some());
        l.invalidate(&[t(3)]);
        assert!(l.get("k", 2).is_some(), "another table");
        l.invalidate(&[t(2)]);
        assert!(l.get("k", 3).is_none());
        assert_eq!((l.stats.hits, l.stats.misses), (2, 1));
        assert_eq!(l.stats.entries, 0);
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_refused() {
        let mut l = Local::new(1 << 20);
        let e = entry(&l, vec![t(1)], 10, 1000);
        l.invalidate(&[t(1)]);
        assert!(!l.insert("k", e, 0));
        assert_eq!(l.stats.refused, 1);
        assert!(l.get("k", 0).is_none());
    }

    #[test]
    fn expiry_and_byte_bound_with_lru_order() {
        let mut l = Local::new(1000);
        assert!(l.insert("a", entry(&l, vec![t(1)], 300, 100), 0));
        assert!(l.insert("b", entry(&l, vec![t(1)], 300, 100), 0));
        assert!(l.get("a", 1).is_some()); // a is now the most recent
        assert!(l.insert("c", entry(&l, vec![t(1)], 300, 100), 0));
        assert!(l.stats.bytes <= 1000, "{}", l.stats.bytes);
        assert!(l.get("b", 1).is_none(), "least recently used went first");
        assert!(l.get("a", 1).is_some());
        assert_eq!(l.stats.evictions, 1);
        assert!(l.get("a", 100).is_none(), "expired");
        assert!(!l.insert("huge", entry(&l, vec![], 5000, 100), 0));
    }

    #[test]
    fn invalidation_by_pattern() {
        let mut l = Local::new(1 << 20);
        assert!(l.insert("a", entry(&l, vec!["u:user:1".into()], 1, 100), 0));
        assert!(l.insert("b", entry(&l, vec!["u:user:2".into()], 1, 100), 0));
        assert!(l.insert("c", entry(&l, vec!["u:team:1".into()], 1, 100), 0));
        assert_eq!(l.invalidate_matching(|t| t.starts_with("u:user:")), 2);
        assert!(l.get("a", 1).is_none() && l.get("b", 1).is_none());
        assert!(l.get("c", 1).is_some());
    }

    #[test]
    fn version_map_overflow_drops_everything() {
        let mut l = Local::new(1 << 20);
        assert!(l.insert("a", entry(&l, vec![t(1)], 1, 100), 0));
        let many: Vec<String> = (0..MAX_TAG_VERSIONS as u32 + 1).map(t).collect();
        l.invalidate(&many);
        assert!(l.get("a", 1).is_none());
        // An entry filled with the old floor is refused.
        let stale = Arc::new(Entry {
            reply: vec![],
            tags: vec!["other".into()],
            versions: vec![0],
            expires_ms: 100,
            fill_lsn: 0,
        });
        assert!(!l.insert("b", stale, 0));
    }
}
