//! A sliding-window rate limiter that never admits more than `limit` units in any `window_ms`
//! consecutive milliseconds, in constant memory, with a bounded and documented early denial.
//!
//! # Layout
//! - [`Window`]: the state of one limiter key (152 bytes encoded, whatever the limit) and its
//!   [`Window::hit`] / [`Window::peek`] decisions.
//! - [`Decision`]: everything a caller needs to answer an HTTP 429 or a PostgreSQL error.
//! - Encoding: [`Window::encode`] / [`Window::decode`], the bytes the Redis module stores.
//!
//! # The guarantee, and why it holds
//! Time is cut into sub-buckets of `b = ceil(window_ms / 32)` ms; the state keeps the units admitted
//! per sub-bucket for the last 33 of them. A request at time `t` counts every sub-bucket that
//! intersects the window `[t - window_ms + 1, t]` — *whole*, including the oldest one that is only
//! partly inside. Units admitted in that window all lie in those sub-buckets, so the count is never
//! below the exact sliding-log count, and a request is admitted only if `count + cost <= limit`.
//! Hence, for the last admission `t` of any interval of `window_ms` ms, everything admitted in that
//! interval was counted: **no interval of `window_ms` ms ever holds more than `limit` units**.
//!
//! # How early it may deny
//! The oldest sub-bucket can hold units up to `b - 1` ms older than the window, so a unit keeps
//! counting for at most `window_ms + b - 1` ms instead of `window_ms`: a denial happens only when the
//! exact count over the last `window_ms + b - 1` ms (≤ 1/32 longer) is already too high, and
//! `retry_after_ms` is at most `b - 1` ms later than an exact sliding log would say.
//!
//! # Time
//! The clock is an input (`now_ms`), never read here. A clock that goes backwards is treated as not
//! moving (the state remembers the latest time it saw): going back could only undercount.

use std::fmt;

/// Sub-buckets per window: the early-denial bound is `window_ms / SUB_BUCKETS`.
pub const SUB_BUCKETS: u64 = 32;
/// Ring slots: a window spans at most `SUB_BUCKETS + 1` sub-buckets (the oldest partly).
const SLOTS: usize = SUB_BUCKETS as usize + 1;
/// Largest accepted limit (counts are stored as `u32`).
pub const MAX_LIMIT: u64 = u32::MAX as u64;
/// Largest accepted window: one year.
pub const MAX_WINDOW_MS: u64 = 365 * 24 * 3600 * 1000;
/// Magic prefix of an encoded state; `1` is the format version.
pub const MAGIC: &[u8; 4] = b"DRL1";
/// Length of an encoded state: magic, window, last time, counts.
pub const ENCODED_LEN: usize = 4 + 8 + 8 + 4 * SLOTS;

/// The state of one limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    window_ms: u64,
    /// The latest time this state has seen; the newest sub-bucket is `last_ms / bucket_ms`.
    last_ms: u64,
    /// Units admitted in sub-bucket `i`, at `counts[i % SLOTS]`, for the `SLOTS` newest sub-buckets.
    counts: [u32; SLOTS],
}

/// The answer to one request, in the order the Redis command replies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    /// Units still admissible now (after this request's cost when it was admitted).
    pub remaining: u64,
    /// When denied: ms until the same request would be admitted if nothing else arrives; -1 when
    /// admitted.
    pub retry_after_ms: i64,
    /// ms until the limiter has nothing counted (and its key may expire).
    pub reset_after_ms: u64,
}

/// Invalid parameters or bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    Limit(u64),
    Window(u64),
    Cost {
        cost: u64,
        limit: u64,
    },
    /// Stored bytes that are not a limiter state of this format.
    NotALimiter,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Limit(v) => write!(f, "limit must be between 1 and {MAX_LIMIT}, got {v}"),
            Error::Window(v) => write!(
                f,
                "window_ms must be between 1 and {MAX_WINDOW_MS}, got {v}"
            ),
            Error::Cost { cost, limit } => {
                write!(
                    f,
                    "COST must be between 1 and the limit ({limit}), got {cost}"
                )
            }
            Error::NotALimiter => f.write_str("value is not a dbopt rate limiter state"),
        }
    }
}

impl std::error::Error for Error {}

/// Checks a request's parameters; every command validates with this before touching state.
pub fn validate(limit: u64, window_ms: u64, cost: u64) -> Result<(), Error> {
    if limit == 0 || limit > MAX_LIMIT {
        return Err(Error::Limit(limit));
    }
    if window_ms == 0 || window_ms > MAX_WINDOW_MS {
        return Err(Error::Window(window_ms));
    }
    if cost == 0 || cost > limit {
        return Err(Error::Cost { cost, limit });
    }
    Ok(())
}

/// Sub-bucket width for a window: `ceil(window_ms / SUB_BUCKETS)`, at least 1 ms.
pub fn bucket_ms(window_ms: u64) -> u64 {
    window_ms.div_ceil(SUB_BUCKETS).max(1)
}

impl Window {
    /// An empty limiter for `window_ms` (validated by [`validate`]) as of `now_ms`.
    pub fn new(window_ms: u64, now_ms: u64) -> Window {
        Window {
            window_ms,
            last_ms: now_ms,
            counts: [0; SLOTS],
        }
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    fn bucket(&self) -> u64 {
        bucket_ms(self.window_ms)
    }

    /// The time decisions are made at: `now_ms`, or the latest time seen if the clock went back.
    fn effective(&self, now_ms: u64) -> u64 {
        now_ms.max(self.last_ms)
    }

    /// Sub-bucket range `[lo, hi]` counted at time `t`.
    fn range(&self, t: u64) -> (u64, u64) {
        let b = self.bucket();
        ((t + 1).saturating_sub(self.window_ms) / b, t / b)
    }

    /// Count of sub-bucket `idx`. Only valid once the state was advanced to the time asked about:
    /// then the ring holds exactly the `SLOTS` newest sub-buckets, and a window spans at most that
    /// many. (The hot path: no division by the runtime bucket width here — `SLOTS` is a constant.)
    fn count_at(&self, idx: u64) -> u64 {
        u64::from(self.counts[(idx % SLOTS as u64) as usize])
    }

    /// Units counted in sub-buckets `lo..=hi` (`hi` the newest; the state advanced to it). The
    /// ring holds sub-buckets `hi + 1 - SLOTS ..= hi` (slots of sub-buckets never counted are 0),
    /// so this is the whole ring minus the few oldest sub-buckets before `lo`: one pass over the
    /// slots the compiler vectorises, no division per sub-bucket.
    fn used_in(&self, lo: u64, hi: u64) -> u64 {
        let all: u64 = self.counts.iter().map(|&c| u64::from(c)).sum();
        let oldest = (hi + 1).saturating_sub(SLOTS as u64);
        let before: u64 = (oldest..lo.min(hi + 1)).map(|i| self.count_at(i)).sum();
        all - before
    }

    /// Moves the state's clock to `t`, zeroing the slots of sub-buckets that start in between.
    fn advance(&mut self, t: u64) {
        let b = self.bucket();
        let (old, new) = (self.last_ms / b, t / b);
        if new >= old + SLOTS as u64 {
            self.counts = [0; SLOTS];
        } else {
            for idx in old + 1..=new {
                self.counts[(idx % SLOTS as u64) as usize] = 0;
            }
        }
        self.last_ms = t;
    }

    /// Admits `cost` units at `now_ms` if that keeps every window within `limit`.
    /// Parameters must have passed [`validate`].
    pub fn hit(&mut self, now_ms: u64, limit: u64, cost: u64) -> Decision {
        let t = self.effective(now_ms);
        self.advance(t);
        let (lo, hi) = self.range(t);
        let mut used = self.used_in(lo, hi);
        let allowed = used + cost <= limit;
        if allowed {
            let slot = (hi % SLOTS as u64) as usize;
            // cost <= limit <= u32::MAX and the slot's units are within one window's count.
            let before = self.counts[slot];
            self.counts[slot] = before.saturating_add(cost as u32);
            used += u64::from(self.counts[slot] - before);
        }
        self.decide(t, limit, cost, allowed, used)
    }

    /// Whether admitting units at `now_ms` leaves the reset time (and so the key's expiry) as it
    /// is: the current sub-bucket already holds units, so the newest counted sub-bucket — which
    /// sets the reset time — does not change. The Redis module then skips re-setting the expiry.
    pub fn admission_keeps_reset_time(&self, now_ms: u64) -> bool {
        let b = self.bucket();
        let t = self.effective(now_ms);
        self.last_ms / b == t / b && self.counts[((t / b) % SLOTS as u64) as usize] > 0
    }

    /// What [`Window::hit`] would answer, without admitting anything.
    pub fn peek(&self, now_ms: u64, limit: u64, cost: u64) -> Decision {
        let t = self.effective(now_ms);
        let mut probe = self.clone();
        probe.advance(t);
        let (lo, hi) = probe.range(t);
        let used = probe.used_in(lo, hi);
        probe.decide(t, limit, cost, used + cost <= limit, used)
    }

    /// The reply at `t`, with `used` units counted in the window; the state must have been
    /// advanced to `t`.
    fn decide(&self, t: u64, limit: u64, cost: u64, allowed: bool, used: u64) -> Decision {
        let (lo, hi) = self.range(t);
        let b = self.bucket();
        // Sub-bucket idx stops counting at (idx + 1) * b + window_ms - 1.
        let expiry = |idx: u64| (idx + 1) * b + self.window_ms - 1;
        let retry_after_ms = if allowed {
            -1
        } else {
            let need = used + cost - limit;
            let mut freed = 0;
            let mut at = t;
            for idx in lo..=hi {
                freed += self.count_at(idx);
                if freed >= need {
                    at = expiry(idx);
                    break;
                }
            }
            i64::try_from(at - t).unwrap_or(i64::MAX)
        };
        let reset_after_ms = (lo..=hi)
            .rev()
            .find(|&i| self.count_at(i) > 0)
            .map_or(0, |i| expiry(i) - t);
        Decision {
            allowed,
            limit,
            remaining: limit.saturating_sub(used),
            retry_after_ms,
            reset_after_ms,
        }
    }

    /// The bytes stored for this state ([`ENCODED_LEN`] of them).
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut out = [0u8; ENCODED_LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4..12].copy_from_slice(&self.window_ms.to_le_bytes());
        out[12..20].copy_from_slice(&self.last_ms.to_le_bytes());
        for (i, c) in self.counts.iter().enumerate() {
            out[20 + 4 * i..24 + 4 * i].copy_from_slice(&c.to_le_bytes());
        }
        out
    }

    /// Reads stored bytes; anything but a state of this exact format is [`Error::NotALimiter`].
    pub fn decode(bytes: &[u8]) -> Result<Window, Error> {
        if bytes.len() != ENCODED_LEN || &bytes[..4] != MAGIC {
            return Err(Error::NotALimiter);
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let window_ms = u64_at(4);
        if window_ms == 0 || window_ms > MAX_WINDOW_MS {
            return Err(Error::NotALimiter);
        }
        let mut counts = [0u32; SLOTS];
        for (i, c) in counts.iter_mut().enumerate() {
            let mut a = [0u8; 4];
            a.copy_from_slice(&bytes[20 + 4 * i..24 + 4 * i]);
            *c = u32::from_le_bytes(a);
        }
        Ok(Window {
            window_ms,
            last_ms: u64_at(12),
            counts,
        })
    }
}

/// Several windows deciding one request together (all admit, or none is charged): the refusing
/// window with the longest wait, if any — the one a client must wait for.
pub fn longest_refusal(decisions: &[Decision]) -> Option<(usize, Decision)> {
    decisions
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, d)| !d.allowed)
        .max_by_key(|(_, d)| d.retry_after_ms)
}

/// Of the decisions of admitted windows, the one with the least room left (what a reply shows).
pub fn tightest(decisions: impl IntoIterator<Item = Decision>) -> Option<Decision> {
    decisions.into_iter().min_by_key(|d| d.remaining)
}

#[cfg(test)]
mod tests;
