//! Circuit breaker per node, on a clock the caller passes in (milliseconds), so tests use a fake one.
//!
//! Closed: every attempt allowed; outcomes go into a sliding window of one-second buckets. When the
//! window holds at least `min_attempts` and more than `failure_ratio` of them failed, the breaker
//! opens. Open: attempts are rejected at once until `open_ms` has passed; then one trial attempt
//! is let through (half-open) while the others are still rejected. The trial's success closes the
//! breaker (with a fresh window); its failure opens it again for another `open_ms`.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    pub failure_ratio: f64,
    pub window_ms: u64,
    pub min_attempts: u32,
    pub open_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { since_ms: u64 },
    HalfOpen,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// The one attempt let through while half-open; report its outcome.
    Trial,
    Rejected {
        retry_in_ms: u64,
    },
}

/// A state change worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened { failures: u32, attempts: u32 },
    HalfOpened,
    Closed,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: State,
    /// (second, attempts, failures), oldest first.
    buckets: VecDeque<(u64, u32, u32)>,
    trial_in_flight: bool,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Breaker {
            policy,
            state: State::Closed,
            buckets: VecDeque::new(),
            trial_in_flight: false,
        }
    }

    pub fn set_policy(&mut self, policy: BreakerPolicy) {
        self.policy = policy;
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Does the breaker turn attempts away at `now_ms`? (Open and not yet due for a trial, or a
    /// trial in flight.) Routing skips such nodes; once a trial is due the next attempt is it.
    pub fn blocks(&self, now_ms: u64) -> bool {
        match self.state {
            State::Closed => false,
            State::Open { since_ms } => now_ms < since_ms.saturating_add(self.policy.open_ms),
            State::HalfOpen => self.trial_in_flight,
        }
    }

    /// Attempts and failures in the window ending at `now_ms`.
    pub fn window(&mut self, now_ms: u64) -> (u32, u32) {
        self.expire(now_ms);
        self.buckets
            .iter()
            .fold((0, 0), |(a, f), &(_, ba, bf)| (a + ba, f + bf))
    }

    fn expire(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.policy.window_ms) / 1000;
        while self.buckets.front().is_some_and(|b| b.0 < oldest) {
            self.buckets.pop_front();
        }
    }

    /// May an attempt start now? A [`Transition::HalfOpened`] is returned with a trial.
    pub fn admit(&mut self, now_ms: u64) -> (Admission, Option<Transition>) {
        match self.state {
            State::Closed => (Admission::Allowed, None),
            State::Open { since_ms } => {
                let reopen_at = since_ms.saturating_add(self.policy.open_ms);
                if now_ms >= reopen_at {
                    self.state = State::HalfOpen;
                    self.trial_in_flight = true;
                    (Admission::Trial, Some(Transition::HalfOpened))
                } else {
                    (
                        Admission::Rejected {
                            retry_in_ms: reopen_at - now_ms,
                        },
                        None,
                    )
                }
            }
            State::HalfOpen if !self.trial_in_flight => {
                self.trial_in_flight = true;
                (Admission::Trial, None)
            }
            State::HalfOpen => (Admission::Rejected { retry_in_ms: 0 }, None),
        }
    }

    /// Reports how an attempt ended.
    pub fn record(&mut self, now_ms: u64, success: bool) -> Option<Transition> {
        match self.state {
            State::HalfOpen => {
                self.trial_in_flight = false;
                if success {
                    self.state = State::Closed;
                    self.buckets.clear();
                    Some(Transition::Closed)
                } else {
                    self.state = State::Open { since_ms: now_ms };
                    Some(Transition::Opened {
                        failures: 1,
                        attempts: 1,
                    })
                }
            }
            // Outcomes of attempts that started before the breaker opened change nothing.
            State::Open { .. } => None,
            State::Closed => {
                let second = now_ms / 1000;
                match self.buckets.back_mut() {
                    Some(b) if b.0 == second => {
                        b.1 += 1;
                        b.2 += u32::from(!success);
                    }
                    _ => self.buckets.push_back((second, 1, u32::from(!success))),
                }
                let (attempts, failures) = self.window(now_ms);
                if !success
                    && attempts >= self.policy.min_attempts
                    && f64::from(failures) > self.policy.failure_ratio * f64::from(attempts)
                {
                    self.state = State::Open { since_ms: now_ms };
                    self.buckets.clear();
                    Some(Transition::Opened { failures, attempts })
                } else {
                    None
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_ratio: 0.5,
            window_ms: 60_000,
            min_attempts: 10,
            open_ms: 30_000,
        }
    }

    #[test]
    fn stays_closed_below_the_minimum_volume() {
        let mut b = Breaker::new(policy());
        for t in 0..9 {
            assert_eq!(b.record(t * 100, false), None);
        }
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(1000).0, Admission::Allowed);
    }

    #[test]
    fn opens_over_the_ratio_and_rejects_until_the_trial() {
        let mut b = Breaker::new(policy());
        for t in 0..5 {
            b.record(t, true);
        }
        for t in 5..10 {
            assert_eq!(
                b.record(t, false),
                None,
                "exactly 50 % is not more than 50 %"
            );
        }
        assert_eq!(
            b.record(10, false),
            Some(Transition::Opened {
                failures: 6,
                attempts: 11
            })
        );
        assert!(b.blocks(1_010));
        assert!(!b.blocks(30_010), "a trial is due");
        assert_eq!(
            b.admit(1_010).0,
            Admission::Rejected {
                retry_in_ms: 29_000
            }
        );
        // After open_ms: one trial; the others are still rejected.
        assert_eq!(
            b.admit(30_010),
            (Admission::Trial, Some(Transition::HalfOpened))
        );
        assert_eq!(b.admit(30_011).0, Admission::Rejected { retry_in_ms: 0 });
        assert_eq!(b.record(30_050, true), Some(Transition::Closed));
        assert_eq!(b.admit(30_060).0, Admission::Allowed);
        assert_eq!(b.window(30_060), (0, 0));
    }

    #[test]
    fn failed_trial_reopens() {
        let mut b = Breaker::new(policy());
        for t in 0..10 {
            b.record(t, false);
        }
        assert!(matches!(b.state(), State::Open { .. }));
        assert_eq!(b.admit(31_000).0, Admission::Trial);
        assert!(matches!(
            b.record(31_500, false),
            Some(Transition::Opened { .. })
        ));
        assert_eq!(
            b.admit(32_000).0,
            Admission::Rejected {
                retry_in_ms: 29_500
            }
        );
        assert_eq!(b.admit(61_500).0, Admission::Trial);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut b = Breaker::new(policy());
        for t in 0..8 {
            b.record(t, false);
        }
        // 61 s later the early failures are gone: 3 new failures out of 3 is under min volume.
        for t in 0..3 {
            assert_eq!(b.record(61_000 + t, false), None);
        }
        assert_eq!(b.window(61_010), (3, 3));
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn successes_keep_it_closed() {
        let mut b = Breaker::new(policy());
        for t in 0..1000u64 {
            b.record(t * 50, t % 3 != 0);
        }
        assert_eq!(b.state(), State::Closed);
    }
}
