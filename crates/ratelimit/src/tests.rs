use super::*;

/// A small deterministic generator (xorshift64*), so traces are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Units admitted at times in `[from, to]`, from an exact log of (time, cost).
fn exact(log: &[(u64, u64)], from: u64, to: u64) -> u64 {
    log.iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|(_, c)| c)
        .sum()
}

#[test]
fn validation_names_the_bad_parameter() {
    assert_eq!(validate(10, 1000, 1), Ok(()));
    assert_eq!(validate(0, 1000, 1), Err(Error::Limit(0)));
    assert_eq!(
        validate(MAX_LIMIT + 1, 1000, 1),
        Err(Error::Limit(MAX_LIMIT + 1))
    );
    assert_eq!(validate(10, 0, 1), Err(Error::Window(0)));
    assert_eq!(
        validate(10, MAX_WINDOW_MS + 1, 1),
        Err(Error::Window(MAX_WINDOW_MS + 1))
    );
    assert_eq!(
        validate(10, 1000, 0),
        Err(Error::Cost { cost: 0, limit: 10 })
    );
    assert_eq!(
        validate(10, 1000, 11),
        Err(Error::Cost {
            cost: 11,
            limit: 10
        })
    );
    assert!(Error::Cost {
        cost: 11,
        limit: 10
    }
    .to_string()
    .contains("COST"));
}

#[test]
fn table_of_decisions() {
    // window 1000 ms → sub-buckets of 32 ms (ceil(1000/32)).
    assert_eq!(bucket_ms(1000), 32);
    let mut w = Window::new(1000, 0);
    let d = w.hit(0, 3, 1);
    assert_eq!(
        d,
        Decision {
            allowed: true,
            limit: 3,
            remaining: 2,
            retry_after_ms: -1,
            reset_after_ms: 1031
        }
    );
    assert!(w.hit(10, 3, 1).allowed);
    let d = w.hit(40, 3, 1);
    assert_eq!((d.allowed, d.remaining), (true, 0));
    // Full: denied; the first two units (sub-bucket 0) stop counting at 32 + 1000 - 1 = 1031.
    let d = w.hit(100, 3, 1);
    assert_eq!((d.allowed, d.remaining, d.retry_after_ms), (false, 0, 931));
    // Denials do not consume anything.
    assert_eq!(w.peek(100, 3, 1), d);
    assert!(!w.hit(1030, 3, 1).allowed);
    let d = w.hit(1031, 3, 2);
    assert_eq!((d.allowed, d.remaining), (true, 0));
    // Counted at 1032: sub-bucket 1 (1 unit, free at 2*32+999) and 32 (2 units, free at
    // 33*32+999). A cost of 2 needs both to go, so it waits for the later one.
    let d = w.peek(1032, 3, 2);
    assert!(!d.allowed);
    assert_eq!(d.retry_after_ms, (33 * 32 + 999) - 1032);
    assert_eq!(w.peek(1032, 3, 1).retry_after_ms, (2 * 32 + 999) - 1032);
}

#[test]
fn retry_after_is_exactly_when_peek_turns_to_allowed() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..300 {
        let window = 1 + rng.below(500);
        let limit = 1 + rng.below(20);
        let mut w = Window::new(window, 0);
        let mut t = 0;
        for _ in 0..40 {
            t += rng.below(window / 4 + 2);
            let cost = 1 + rng.below(limit);
            let d = w.hit(t, limit, cost);
            if !d.allowed {
                let r = d.retry_after_ms as u64;
                assert!(w.peek(t + r, limit, cost).allowed, "allowed at retry_after");
                if r > 0 {
                    assert!(!w.peek(t + r - 1, limit, cost).allowed, "not earlier");
                }
            }
            // At reset_after nothing is counted any more.
            let reset = w.peek(t, limit, 1).reset_after_ms;
            assert_eq!(
                w.peek(t + reset, limit, 1).remaining,
                limit,
                "empty at reset_after"
            );
        }
    }
}

/// The test: long random traces with bursts, checked against an exact sliding log.
#[test]
fn never_more_than_limit_in_any_window_and_early_denial_is_bounded() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let (mut denials, mut early) = (0u64, 0u64);
    for round in 0..200 {
        let window = 1 + rng.below(if round % 2 == 0 { 100 } else { 10_000 });
        let limit = 1 + rng.below(if round % 3 == 0 { 5 } else { 200 });
        let b = bucket_ms(window);
        let mut w = Window::new(window, 0);
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        // The admissions young enough to matter for the checks below (a window plus a sub-bucket).
        let mut recent: std::collections::VecDeque<(u64, u64)> = Default::default();
        let mut t = rng.below(1000);
        for _ in 0..3000 {
            // Bursts: many requests at the same or adjacent ms, then quiet gaps.
            t += match rng.below(10) {
                0..=5 => 0,
                6 | 7 => rng.below(3),
                8 => rng.below(window / 8 + 1),
                _ => rng.below(2 * window + 1),
            };
            let cost = if rng.below(4) == 0 {
                1 + rng.below(limit)
            } else {
                1
            };
            let d = w.hit(t, limit, cost);
            while recent.front().is_some_and(|(at, _)| at + window + b < t) {
                recent.pop_front();
            }
            let in_window = exact(recent.make_contiguous(), (t + 1).saturating_sub(window), t);
            if d.allowed {
                assert!(in_window + cost <= limit, "admitted over the limit at {t}");
                admitted.push((t, cost));
                recent.push_back((t, cost));
            } else {
                denials += 1;
                // Bounded earliness: the denial is justified by a window at most b - 1 ms longer.
                let longer = exact(
                    recent.make_contiguous(),
                    (t + 1).saturating_sub(window + b - 1),
                    t,
                );
                assert!(
                    longer + cost > limit,
                    "denied at {t} though {longer}+{cost} <= {limit}"
                );
                if in_window + cost <= limit {
                    early += 1;
                }
            }
        }
        // Post-hoc: every interval [s, s + window - 1] holds at most `limit` units.
        let mut j = 0;
        let mut sum = 0;
        for i in 0..admitted.len() {
            sum += admitted[i].1;
            while admitted[i].0 - admitted[j].0 >= window {
                sum -= admitted[j].1;
                j += 1;
            }
            assert!(
                sum <= limit,
                "window ending {} holds {sum} > {limit}",
                admitted[i].0
            );
        }
    }
    // Measured, and printed for the record (`cargo test -p dbopt-ratelimit -- --nocapture`).
    println!("denials: {denials}, of which an exact sliding log would have admitted {early}");
    assert!(denials > 10_000, "the traces exercise denials");
}

#[test]
fn clock_going_backwards_never_undercounts() {
    let mut w = Window::new(1000, 5000);
    assert!(w.hit(5000, 2, 2).allowed);
    // An earlier time (another server's clock after a failover) is treated as 5000.
    assert!(!w.hit(3000, 2, 1).allowed);
    assert!(!w.hit(0, 2, 1).allowed);
    assert!(w.hit(5000 + 32 + 999, 2, 1).allowed);
}

#[test]
fn long_idle_gaps_clear_the_ring() {
    let mut w = Window::new(100, 0);
    for t in 0..100 {
        w.hit(t, 1000, 1);
    }
    assert_eq!(w.peek(99, 1000, 1).remaining, 900);
    assert_eq!(w.peek(1_000_000, 1000, 1).remaining, 1000);
    let d = w.hit(1_000_000, 1000, 1000);
    assert!(d.allowed);
}

#[test]
fn encoding_round_trips_and_rejects_foreign_bytes() {
    let mut w = Window::new(60_000, 1_700_000_000_000);
    w.hit(1_700_000_000_000, 100, 7);
    w.hit(1_700_000_001_000, 100, 3);
    let bytes = w.encode();
    assert_eq!(bytes.len(), ENCODED_LEN);
    assert_eq!(ENCODED_LEN, 152, "constant size, whatever the limit");
    assert_eq!(Window::decode(&bytes), Ok(w));
    assert_eq!(Window::decode(b"hello"), Err(Error::NotALimiter));
    let mut bad = bytes;
    bad[0] = b'X';
    assert_eq!(Window::decode(&bad), Err(Error::NotALimiter));
    let mut zero_window = bytes;
    zero_window[4..12].copy_from_slice(&0u64.to_le_bytes());
    assert_eq!(Window::decode(&zero_window), Err(Error::NotALimiter));
    assert_eq!(Window::decode(&bytes[..151]), Err(Error::NotALimiter));
}

#[test]
fn huge_limits_and_windows_do_not_overflow() {
    let mut w = Window::new(MAX_WINDOW_MS, u64::MAX / 2);
    let d = w.hit(u64::MAX / 2, MAX_LIMIT, MAX_LIMIT);
    assert!(d.allowed);
    assert_eq!(d.remaining, 0);
    let d = w.hit(u64::MAX / 2 + 1, MAX_LIMIT, 1);
    assert!(!d.allowed);
    assert!(d.retry_after_ms > 0);
}

#[test]
fn the_reset_time_only_moves_when_a_new_sub_bucket_starts() {
    let mut rng = Rng(0xA5A5_5A5A_1234_5678);
    for _ in 0..200 {
        let window = 1 + rng.below(5000);
        let limit = 1 + rng.below(50);
        let mut w = Window::new(window, 0);
        let mut t = 0;
        let mut reset_at: Option<u64> = None;
        for _ in 0..200 {
            t += rng.below(window / 8 + 2);
            let keeps = w.admission_keeps_reset_time(t);
            let d = w.hit(t, limit, 1);
            if d.allowed {
                let now_reset = t + d.reset_after_ms;
                if keeps {
                    assert_eq!(Some(now_reset), reset_at, "predicted unchanged at {t}");
                }
                reset_at = Some(now_reset);
            }
        }
    }
}

#[test]
fn used_in_equals_the_sum_over_the_counted_sub_buckets() {
    // The ring-sum shortcut against the plain per-sub-bucket sum, on random traces: windows
    // narrower than SUB_BUCKETS ms (fewer sub-buckets than slots), times from 0 (sub-buckets
    // before the first one), gaps that wrap the ring.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..300 {
        let window = 1 + rng.below(200);
        let limit = 1 + rng.below(50);
        let mut now = rng.below(3);
        let mut w = Window::new(window, now);
        for _ in 0..200 {
            now += rng.below(window / 4 + 2);
            w.hit(now, limit, 1 + rng.below(limit));
            let (lo, hi) = w.range(now);
            let plain: u64 = (lo..=hi).map(|i| w.count_at(i)).sum();
            assert_eq!(w.used_in(lo, hi), plain, "window {window} at {now}");
        }
    }
}
