//! Pool bookkeeping, without I/O and on a caller-supplied clock (milliseconds), so the policy is
//! tested with a fake clock: which connection a client gets, when a new one may be opened, which
//! idle ones are closed, when to warn about utilisation, and how long to back off after a failed
//! connect. The async pool in `pools.rs` wraps this in a mutex.

/// Sizes and timings of one pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolLimits {
    pub min: u32,
    pub max: u32,
    /// Connections only critical work may use (applied while the node is the primary).
    pub critical_reserve: u32,
    pub idle_timeout_ms: u64,
    pub warn_percent: u8,
}

/// What `take` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Take<C> {
    /// Use this idle connection.
    Idle(C),
    /// A slot is reserved: open a new connection, then `opened` or `failed`.
    Open,
    /// Nothing free: wait for a `give_back` (or time out).
    Wait,
}

/// Interval between two utilisation warnings of one pool.
pub const WARN_EVERY_MS: u64 = 60_000;

#[derive(Debug)]
pub struct PoolState<C> {
    pub limits: PoolLimits,
    /// Idle connections with the time they became idle; most recently used last.
    idle: Vec<(C, u64)>,
    /// Connections that exist or are being opened.
    open: u32,
    in_use: u32,
    last_warning_ms: Option<u64>,
}

impl<C> PoolState<C> {
    pub fn new(limits: PoolLimits) -> Self {
        PoolState {
            limits,
            idle: Vec::new(),
            open: 0,
            in_use: 0,
            last_warning_ms: None,
        }
    }

    pub fn open(&self) -> u32 {
        self.open
    }

    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    pub fn idle(&self) -> u32 {
        self.idle.len() as u32
    }

    /// Could a client get a connection without waiting (an idle one, or room to open one)?
    pub fn has_room(&self) -> bool {
        self.idle() > 0 || self.open < self.limits.max
    }

    /// A connection for a client. Ordinary work may use `max - critical_reserve` connections
    /// when `reserve_applies` (the node is the primary); critical work may use all `max`.
    pub fn take(&mut self, critical: bool, reserve_applies: bool) -> Take<C> {
        let limit = if critical || !reserve_applies {
            self.limits.max
        } else {
            self.limits.max.saturating_sub(self.limits.critical_reserve)
        };
        if self.in_use >= limit {
            return Take::Wait;
        }
        if let Some((c, _)) = self.idle.pop() {
            self.in_use += 1;
            return Take::Idle(c);
        }
        if self.open < self.limits.max {
            self.open += 1;
            self.in_use += 1;
            return Take::Open;
        }
        Take::Wait
    }

    /// A connection goes back to the pool after use.
    pub fn give_back(&mut self, c: C, now_ms: u64) {
        self.in_use = self.in_use.saturating_sub(1);
        self.idle.push((c, now_ms));
    }

    /// A connection in use is gone (broken, or its opening failed).
    pub fn discard(&mut self) {
        self.in_use = self.in_use.saturating_sub(1);
        self.open = self.open.saturating_sub(1);
    }

    /// Reserves slots to bring the pool up to `min` (pre-warming); returns how many to open.
    /// Each must end with `add_warm` or `warm_failed`.
    pub fn reserve_warm(&mut self) -> u32 {
        let n = self.limits.min.saturating_sub(self.open);
        self.open += n;
        n
    }

    pub fn add_warm(&mut self, c: C, now_ms: u64) {
        self.idle.insert(0, (c, now_ms));
    }

    pub fn warm_failed(&mut self) {
        self.open = self.open.saturating_sub(1);
    }

    /// Idle connections above `min` idle for longer than the timeout, oldest first: close them.
    pub fn reap(&mut self, now_ms: u64) -> Vec<C> {
        let mut closed = Vec::new();
        while self.open > self.limits.min {
            match self.idle.first() {
                Some(&(_, since))
                    if now_ms.saturating_sub(since) >= self.limits.idle_timeout_ms =>
                {
                    closed.push(self.idle.remove(0).0);
                    self.open -= 1;
                }
                _ => break,
            }
        }
        closed
    }

    /// Every idle connection (for a topology change or shutdown).
    pub fn drain_idle(&mut self) -> Vec<C> {
        let n = self.idle.len() as u32;
        self.open = self.open.saturating_sub(n);
        self.idle.drain(..).map(|(c, _)| c).collect()
    }

    /// Removes the idle connections `stale` picks (e.g. opened before a role change).
    pub fn remove_idle_where(&mut self, mut stale: impl FnMut(&C) -> bool) -> Vec<C> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.idle.len() {
            if stale(&self.idle[i].0) {
                out.push(self.idle.remove(i).0);
                self.open = self.open.saturating_sub(1);
            } else {
                i += 1;
            }
        }
        out
    }

    /// Utilisation in percent when a (rate-limited) warning is due now.
    pub fn utilisation_warning(&mut self, now_ms: u64) -> Option<u32> {
        let pct = self.in_use * 100 / self.limits.max.max(1);
        if pct < u32::from(self.limits.warn_percent) {
            return None;
        }
        if self
            .last_warning_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < WARN_EVERY_MS)
        {
            return None;
        }
        self.last_warning_ms = Some(now_ms);
        Some(pct)
    }
}

/// Delay before connect attempt `attempt` (0-based): exponential from `base_ms`, capped at
/// `max_ms`, with "equal jitter" — half fixed, half random (`jitter` in 0..1) — so a crowd of
/// clients that failed together does not retry together.
pub fn backoff_ms(attempt: u32, base_ms: u64, max_ms: u64, jitter: f64) -> u64 {
    let exp = base_ms.saturating_mul(1u64 << attempt.min(30)).min(max_ms);
    let half = exp / 2;
    half + (half as f64 * jitter.clamp(0.0, 1.0)) as u64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits() -> PoolLimits {
        PoolLimits {
            min: 2,
            max: 5,
            critical_reserve: 2,
            idle_timeout_ms: 300_000,
            warn_percent: 80,
        }
    }

    #[test]
    fn opens_up_to_the_limit_then_waits() {
        let mut p: PoolState<u32> = PoolState::new(limits());
        for _ in 0..3 {
            assert_eq!(p.take(false, true), Take::Open);
        }
        // Two are kept for critical work.
        assert_eq!(p.take(false, true), Take::Wait);
        assert_eq!(p.take(true, true), Take::Open);
        assert_eq!(p.take(true, true), Take::Open);
        assert_eq!(p.take(true, true), Take::Wait);
        assert_eq!((p.open(), p.in_use()), (5, 5));
        // On a replica the reserve does not apply.
        let mut r: PoolState<u32> = PoolState::new(limits());
        for _ in 0..5 {
            assert_eq!(r.take(false, false), Take::Open);
        }
        assert_eq!(r.take(false, false), Take::Wait);
    }

    #[test]
    fn reuses_the_most_recent_idle_connection() {
        let mut p: PoolState<u32> = PoolState::new(limits());
        assert_eq!(p.take(false, true), Take::Open);
        assert_eq!(p.take(false, true), Take::Open);
        p.give_back(1, 10);
        p.give_back(2, 20);
        assert_eq!(p.take(false, true), Take::Idle(2));
        assert_eq!((p.open(), p.in_use(), p.idle()), (2, 1, 1));
        p.discard();
        assert_eq!((p.open(), p.in_use(), p.idle()), (1, 0, 1));
    }

    #[test]
    fn critical_work_is_never_starved_by_idle_connections_in_use() {
        let mut p: PoolState<u32> = PoolState::new(limits());
        let _ = (0..3).map(|_| p.take(false, true)).count();
        assert_eq!(p.take(false, true), Take::Wait);
        assert_eq!(p.take(true, true), Take::Open);
    }

    #[test]
    fn warms_to_min_and_reaps_above_min_after_the_idle_timeout() {
        let mut p: PoolState<u32> = PoolState::new(limits());
        assert_eq!(p.reserve_warm(), 2);
        p.add_warm(1, 0);
        p.warm_failed();
        assert_eq!(p.open(), 1);
        assert_eq!(p.reserve_warm(), 1);
        p.add_warm(2, 0);
        // Burst to 5, then all back at t=1000.
        for _ in 0..5 {
            let _ = p.take(true, true);
        }
        for c in 10..15 {
            p.give_back(c, 1000);
        }
        assert_eq!(p.reap(200_000), Vec::<u32>::new());
        let closed = p.reap(301_000);
        assert_eq!(closed.len(), 3);
        assert_eq!((p.open(), p.idle()), (2, 2));
        assert_eq!(p.reap(10_000_000), Vec::<u32>::new(), "never below min");
    }

    #[test]
    fn utilisation_warning_is_rate_limited() {
        let mut p: PoolState<u32> = PoolState::new(limits());
        for _ in 0..3 {
            let _ = p.take(false, true);
        }
        assert_eq!(p.utilisation_warning(0), None, "60 % is below 80 %");
        let _ = p.take(true, true);
        assert_eq!(p.utilisation_warning(1_000), Some(80));
        assert_eq!(p.utilisation_warning(30_000), None);
        assert_eq!(p.utilisation_warning(61_000), Some(80));
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff_ms(0, 100, 5000, 0.0), 50);
        assert_eq!(backoff_ms(0, 100, 5000, 1.0), 100);
        assert_eq!(backoff_ms(3, 100, 5000, 0.0), 400);
        assert_eq!(backoff_ms(10, 100, 5000, 1.0), 5000);
        assert_eq!(backoff_ms(63, 100, 5000, 0.5), 3750);
    }
}
