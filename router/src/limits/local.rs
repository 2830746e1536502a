//! Windows kept in this router's memory: when no Redis is configured, and the fallback while it
//! is unreachable. Same decisions as the module's `DBOPT.RL.HITALL` (all admit or none is charged),
//! the clock an argument (pure).

use std::collections::HashMap;

use dbopt_ratelimit::{Decision, Window};

/// Windows kept before idle ones are dropped.
pub const MAX_WINDOWS: usize = 100_000;

/// One limit of a check: key, limit, window.
pub type Limit<'a> = (&'a [u8], u64, u64);

/// The answer to a check: the refusing limit with the longest wait (or `None`: all admitted) and
/// its decision (when admitted: the decision of the limit with the least room left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub refused: Option<usize>,
    pub decision: Decision,
}

#[derive(Debug, Default)]
pub struct LocalWindows {
    windows: HashMap<Vec<u8>, Window>,
}

impl LocalWindows {
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Admits `cost` on every limit or on none. `limits` is not empty; limits are validated.
    pub fn hit_all(&mut self, now_ms: u64, cost: u64, limits: &[Limit<'_>]) -> Outcome {
        if self.windows.len() >= MAX_WINDOWS {
            self.prune(now_ms);
        }
        let decisions: Vec<Decision> = limits
            .iter()
            .map(|&(key, limit, window_ms)| match self.windows.get(key) {
                Some(w) if w.window_ms() == window_ms => w.peek(now_ms, limit, cost),
                _ => Window::new(window_ms, now_ms).peek(now_ms, limit, cost),
            })
            .collect();
        if let Some((i, d)) = dbopt_ratelimit::longest_refusal(&decisions) {
            return Outcome {
                refused: Some(i),
                decision: d,
            };
        }
        let mut admitted = Vec::with_capacity(limits.len());
        for &(key, limit, window_ms) in limits {
            let w = self
                .windows
                .entry(key.to_vec())
                .and_modify(|w| {
                    if w.window_ms() != window_ms {
                        *w = Window::new(window_ms, now_ms);
                    }
                })
                .or_insert_with(|| Window::new(window_ms, now_ms));
            admitted.push(w.hit(now_ms, limit, cost));
        }
        Outcome {
            refused: None,
            decision: dbopt_ratelimit::tightest(admitted).unwrap_or(decisions[0]),
        }
    }

    /// Drops windows with nothing counted any more; if all are busy, drops them all (the
    /// documented price of a flood of distinct end users: counting starts over).
    fn prune(&mut self, now_ms: u64) {
        self.windows
            .retain(|_, w| w.peek(now_ms, u64::from(u32::MAX), 1).reset_after_ms > 0);
        if self.windows.len() >= MAX_WINDOWS {
            self.windows.clear();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn all_admit_or_none_is_charged() {
        let mut l = LocalWindows::default();
        let limits: [Limit; 2] = [(b"user", 3, 1000), (b"global", 10, 1000)];
        for _ in 0..3 {
            assert_eq!(l.hit_all(0, 1, &limits).refused, None);
        }
        let o = l.hit_all(10, 1, &limits);
        assert_eq!(o.refused, Some(0));
        assert!(o.decision.retry_after_ms > 0);
        // The refusal charged nothing to the global window: 7 of 10 left.
        let o = l.hit_all(20, 7, &[(b"global", 10, 1000)]);
        assert_eq!((o.refused, o.decision.remaining), (None, 0));
        // After the window the user is admitted again.
        assert_eq!(l.hit_all(1100, 1, &[limits[0]]).refused, None);
    }

    #[test]
    fn no_window_ever_holds_more_than_the_limit() {
        let mut l = LocalWindows::default();
        let mut admitted = Vec::new();
        let mut t = 0u64;
        let mut seed = 7u64;
        while t < 5000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            t += (seed >> 60) % 4;
            if l.hit_all(t, 1, &[(b"k", 20, 1000)]).refused.is_none() {
                admitted.push(t);
            }
        }
        for (i, &a) in admitted.iter().enumerate() {
            let inside = admitted[i..].iter().take_while(|&&b| b < a + 1000).count();
            assert!(inside <= 20, "{inside} admitted in [{a}, {})", a + 1000);
        }
        // And the limit is used: at least 4 of the 5 seconds' worth.
        assert!(admitted.len() >= 80, "{}", admitted.len());
    }

    #[test]
    fn a_flood_of_keys_stays_bounded() {
        let mut l = LocalWindows::default();
        for i in 0..(MAX_WINDOWS + 10) {
            let key = format!("e{i}");
            l.hit_all(i as u64 / 1000, 1, &[(key.as_bytes(), 5, 1000)]);
        }
        assert!(l.len() <= MAX_WINDOWS);
    }
}
