//! Latency histogram with fixed buckets (so it fits, unchanged, in a shared-memory entry) and
//! running mean/variance (Welford), as pg_stat_statements keeps them.

/// Upper bounds of the buckets, in milliseconds; a last bucket catches everything above.
/// Log-spaced 1-2.5-5 steps from 10 µs to 30 s: the Prometheus `le` labels of `dbopt.metrics()`.
pub const BOUNDS_MS: [f64; 20] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];
/// Buckets: one per bound plus the overflow bucket.
pub const BUCKETS: usize = BOUNDS_MS.len() + 1;

/// Counts per bucket plus the exact extremes and moments.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[repr(C)]
pub struct Histogram {
    pub counts: [u64; BUCKETS],
    pub n: u64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Sum of squared differences from the mean (Welford's M2).
    pub m2: f64,
    pub total_ms: f64,
}

impl Histogram {
    pub fn record(&mut self, ms: f64) {
        // Two comparisons (a range check is false for NaN) instead of classifying the float.
        let ms = if (0.0..f64::INFINITY).contains(&ms) {
            ms
        } else {
            0.0
        };
        let idx = BOUNDS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(BUCKETS - 1);
        self.counts[idx] += 1;
        self.n += 1;
        if self.n == 1 {
            self.min_ms = ms;
            self.max_ms = ms;
        } else {
            self.min_ms = self.min_ms.min(ms);
            self.max_ms = self.max_ms.max(ms);
        }
        self.total_ms += ms;
        let delta = ms - self.mean_ms;
        self.mean_ms += delta / self.n as f64;
        self.m2 += delta * (ms - self.mean_ms);
    }

    /// Population standard deviation (as pg_stat_statements reports it).
    pub fn stddev_ms(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            (self.m2 / self.n as f64).sqrt()
        }
    }

    /// Estimated quantile `q` in 0..=1: linear interpolation inside the bucket that holds it,
    /// clamped to the observed min/max (so a single sample reports itself exactly).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.n as f64).max(1.0);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { BOUNDS_MS[i - 1] };
                let upper = if i < BOUNDS_MS.len() {
                    BOUNDS_MS[i]
                } else {
                    self.max_ms
                };
                let within = (rank - seen as f64) / c as f64;
                let v = lower + (upper - lower) * within;
                return Some(v.clamp(self.min_ms, self.max_ms));
            }
            seen += c;
        }
        Some(self.max_ms)
    }

    /// Cumulative counts per bound (Prometheus `_bucket` series), the last being `+Inf`.
    pub fn cumulative(&self) -> [u64; BUCKETS] {
        let mut out = [0; BUCKETS];
        let mut acc = 0;
        for (o, c) in out.iter_mut().zip(self.counts) {
            acc += c;
            *o = acc;
        }
        out
    }

    /// Adds another histogram (for totals across entries).
    pub fn merge(&mut self, other: &Histogram) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *other;
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        let n = self.n + other.n;
        let delta = other.mean_ms - self.mean_ms;
        let mean = self.mean_ms + delta * other.n as f64 / n as f64;
        self.m2 += other.m2 + delta * delta * (self.n as f64) * (other.n as f64) / n as f64;
        self.mean_ms = mean;
        self.n = n;
        self.total_ms += other.total_ms;
        self.min_ms = self.min_ms.min(other.min_ms);
        self.max_ms = self.max_ms.max(other.max_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_match_a_direct_computation() {
        let samples = [1.0, 2.0, 3.0, 4.0, 100.0];
        let mut h = Histogram::default();
        samples.iter().for_each(|&s| h.record(s));
        let mean = samples.iter().sum::<f64>() / 5.0;
        let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / 5.0;
        assert!((h.mean_ms - mean).abs() < 1e-9);
        assert!((h.stddev_ms() - var.sqrt()).abs() < 1e-9);
        assert_eq!(
            (h.min_ms, h.max_ms, h.n, h.total_ms),
            (1.0, 100.0, 5, 110.0)
        );
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let mut h = Histogram::default();
        for _ in 0..90 {
            h.record(0.3); // bucket (0.25, 0.5]
        }
        for _ in 0..9 {
            h.record(40.0); // (25, 50]
        }
        h.record(2000.0); // (1000, 2500]
        let p50 = h.quantile_ms(0.5).expect("p50");
        assert!((0.25..=0.5).contains(&p50), "{p50}");
        let p95 = h.quantile_ms(0.95).expect("p95");
        assert!((25.0..=50.0).contains(&p95), "{p95}");
        let p99 = h.quantile_ms(0.99).expect("p99");
        assert!((25.0..=50.0).contains(&p99), "{p99}");
        assert_eq!(h.quantile_ms(1.0), Some(2000.0));
        assert_eq!(Histogram::default().quantile_ms(0.5), None);
    }

    #[test]
    fn single_sample_and_extremes() {
        let mut h = Histogram::default();
        h.record(7.0);
        assert_eq!(h.quantile_ms(0.5), Some(7.0));
        h.record(f64::NAN);
        h.record(-1.0);
        h.record(1e9);
        h.record(f64::INFINITY);
        h.record(f64::NEG_INFINITY);
        assert_eq!(h.counts[0], 4, "NaN, infinities and negatives count as 0");
        assert_eq!(h.counts[BUCKETS - 1], 1);
        assert_eq!(h.cumulative()[BUCKETS - 1], 6);
        assert!(h.total_ms.is_finite() && h.mean_ms.is_finite());
    }

    #[test]
    fn merge_equals_recording_everything_once() {
        let (mut a, mut b, mut all) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        for i in 0..50 {
            let v = (i * 7 % 13) as f64;
            if i % 3 == 0 {
                a.record(v)
            } else {
                b.record(v)
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a.counts, all.counts);
        assert!((a.mean_ms - all.mean_ms).abs() < 1e-9);
        assert!((a.stddev_ms() - all.stddev_ms()).abs() < 1e-9);
    }
}
