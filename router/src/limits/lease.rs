//! Leases: admissions a router takes from the shared windows ahead of time and hands out itself,
//! so a busy client does not pay a Redis round trip per statement (pure; the clock is an input).
//!
//! # Why the limits still hold
//! A lease granted at Redis time `t_r` is used only until `t_sent + life` (router clock, from before
//! the request left, so before `t_r`): a unit counted at `t_r` runs within `life` after it. Redis
//! counts leased units in windows `life` longer than the rule's ([`redis_window`]), so any rule
//! window `[t, t + W)` of *use* holds only units counted in `[t - life, t + W)`, which Redis keeps
//! within the limit. The price: up to `life` (W/32) of utilisation, and leased units that expire
//! unused are lost to everyone for the rest of their window.
//!
//! # Sizing
//! A lease starts at one statement (no lease at all), doubles each time one is used up before it
//! expires and halves each time one expires unused, up to [`cap`]: 1/32 of the limit (so a small
//! limit such as 20/s is never leased: every statement asks Redis), at most [`MAX_LEASE`].

use std::collections::HashMap;

use super::rules::Applied;

/// Most units one lease holds.
pub const MAX_LEASE: u64 = 64;
/// Leases kept before expired ones are dropped.
const MAX_LEASES: usize = 10_000;

/// How long a lease lives for a window: the window's sub-bucket width (W/32).
pub fn life_ms(window_ms: u64) -> u64 {
    dbopt_ratelimit::bucket_ms(window_ms)
}

/// The window Redis counts a rule in: the rule's, plus a lease's life.
pub fn redis_window(window_ms: u64) -> u64 {
    window_ms + life_ms(window_ms)
}

/// The largest lease for a set of windows.
pub fn cap(set: &[Applied]) -> u64 {
    set.iter()
        .map(|a| (a.limit / 32).clamp(1, MAX_LEASE))
        .min()
        .unwrap_or(1)
}

/// The life of a lease on a set of windows: the shortest of theirs.
pub fn set_life_ms(set: &[Applied]) -> u64 {
    set.iter().map(|a| life_ms(a.window_ms)).min().unwrap_or(1)
}

/// One key for a set of windows (length-prefixed, so distinct sets never collide).
pub fn set_key(set: &[Applied]) -> Vec<u8> {
    let mut k = Vec::with_capacity(set.iter().map(|a| a.key.len() + 4).sum());
    for a in set {
        k.extend_from_slice(&(a.key.len() as u32).to_be_bytes());
        k.extend_from_slice(&a.key);
    }
    k
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    left: u64,
    until_ms: u64,
    /// The size of the next lease.
    size: u64,
    /// Asked for more than it had while valid: the next lease is bigger.
    ran_out: bool,
}

#[derive(Debug, Default)]
pub struct Leases {
    map: HashMap<Vec<u8>, Lease>,
}

impl Leases {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Takes `cost` units from the set's lease if it is valid at `now_ms` and holds them.
    pub fn take(&mut self, key: &[u8], cost: u64, now_ms: u64) -> bool {
        match self.map.get_mut(key) {
            Some(l) if now_ms < l.until_ms && l.left >= cost => {
                l.left -= cost;
                true
            }
            Some(l) if now_ms < l.until_ms => {
                l.ran_out = true;
                false
            }
            _ => false,
        }
    }

    /// How many units to ask Redis for (at least `cost`), given how the last lease went.
    pub fn ask(&mut self, key: &[u8], cost: u64, cap: u64, now_ms: u64) -> u64 {
        let size = match self.map.get_mut(key) {
            None => 1,
            Some(l) => {
                if l.ran_out {
                    l.size = (l.size * 2).min(cap);
                } else if now_ms >= l.until_ms && l.left > 0 {
                    l.size = (l.size / 2).max(1);
                }
                l.ran_out = false;
                l.size.min(cap)
            }
        };
        size.max(cost)
    }

    /// Redis granted `granted` units for a request sent at `sent_ms`; `cost` of them are used now.
    pub fn granted(&mut self, key: &[u8], cost: u64, granted: u64, sent_ms: u64, life_ms: u64) {
        if self.map.len() >= MAX_LEASES && !self.map.contains_key(key) {
            let now = sent_ms;
            self.map.retain(|_, l| now < l.until_ms);
            if self.map.len() >= MAX_LEASES {
                self.map.clear();
            }
        }
        let l = self.map.entry(key.to_vec()).or_insert(Lease {
            left: 0,
            until_ms: 0,
            size: 1,
            ran_out: false,
        });
        // A lease still valid keeps its units (a concurrent request may have renewed first).
        let carried = if sent_ms < l.until_ms { l.left } else { 0 };
        l.left = carried + granted.saturating_sub(cost);
        l.until_ms = sent_ms + life_ms;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn small_limits_are_never_leased() {
        let mut a = Applied {
            rule: 0,
            name: "u".into(),
            key: b"k".to_vec(),
            limit: 20,
            window_ms: 1000,
            warn: false,
            counts: String::new(),
        };
        assert_eq!(cap(std::slice::from_ref(&a)), 1);
        a.limit = 100_000;
        assert_eq!(cap(std::slice::from_ref(&a)), MAX_LEASE);
        a.limit = 320;
        assert_eq!(cap(&[a]), 10);
        assert_eq!(redis_window(1000), 1032);
    }

    #[test]
    fn leases_grow_when_used_up_and_shrink_when_wasted() {
        let mut l = Leases::default();
        let k = b"set";
        assert_eq!(l.ask(k, 1, 64, 0), 1);
        l.granted(k, 1, 1, 0, 32);
        // Used up while valid: the next is twice as big.
        assert!(!l.take(k, 1, 1));
        assert_eq!(l.ask(k, 1, 64, 1), 2);
        l.granted(k, 1, 2, 1, 32);
        assert!(l.take(k, 1, 2));
        assert!(!l.take(k, 1, 3));
        assert_eq!(l.ask(k, 1, 64, 3), 4);
        l.granted(k, 1, 4, 3, 32);
        // Expired with units left: halved, and the old units are gone.
        assert!(!l.take(k, 1, 40));
        assert_eq!(l.ask(k, 1, 64, 40), 2);
        l.granted(k, 1, 2, 40, 32);
        assert!(l.take(k, 1, 41));
        assert!(!l.take(k, 1, 42));
        // Never above the cap, never below the cost.
        for _ in 0..10 {
            let n = l.ask(k, 1, 8, 50);
            l.granted(k, 1, n, 50, 32);
            while l.take(k, 1, 51) {}
        }
        assert_eq!(l.ask(k, 1, 8, 52), 8);
        assert_eq!(l.ask(k, 20, 8, 52), 20);
    }

    #[test]
    fn an_expired_lease_hands_out_nothing() {
        let mut l = Leases::default();
        l.granted(b"k", 1, 10, 100, 32);
        assert!(l.take(b"k", 9, 131));
        assert!(!l.take(b"k", 1, 132));
    }
}
