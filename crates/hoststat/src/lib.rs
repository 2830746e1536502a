//! Host CPU utilisation from `/proc/stat`.
//!
//! # Layout
//! - [`CpuTimes`]: one parsed sample of the aggregate `cpu` line (jiffies per state).
//! - [`utilisation_percent`]: busy share between two samples, the number `dbopt.node_status()` reports.
//!
//! Reading the file and deciding *when* to sample is the caller's business (the extension's
//! background worker samples once a second); this crate is pure so the math is tested without a host.

use std::fmt;

/// Cumulative CPU time of the whole host, in clock ticks, as the first line of `/proc/stat` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// Ticks spent not doing work: `idle + iowait` (iowait is idle time waiting on disk).
    pub idle: u64,
    /// Every tick counted: busy and idle (guest time is already inside user/nice, so not added).
    pub total: u64,
}

/// Why a `/proc/stat` text could not be read as a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// No line starts with `cpu ` (the aggregate line).
    NoAggregateLine,
    /// A field of the aggregate line is not an unsigned integer.
    BadField { index: usize, text: String },
    /// Fewer than the four fields every kernel since 2.5 prints (user nice system idle).
    TooFewFields(usize),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NoAggregateLine => write!(f, "no aggregate \"cpu\" line in /proc/stat"),
            ParseError::BadField { index, text } => {
                write!(
                    f,
                    "field {index} of the \"cpu\" line is not a number: {text:?}"
                )
            }
            ParseError::TooFewFields(n) => {
                write!(f, "the \"cpu\" line has {n} fields, at least 4 expected")
            }
        }
    }
}

impl std::error::Error for ParseError {}

impl CpuTimes {
    /// Parses the aggregate `cpu` line out of the whole text of `/proc/stat`.
    ///
    /// Fields: user nice system idle iowait irq softirq steal guest guest_nice. `guest` and
    /// `guest_nice` are already included in `user`/`nice` by the kernel, so they are not summed
    /// again (that would count virtualised time twice).
    pub fn parse(proc_stat: &str) -> Result<CpuTimes, ParseError> {
        let line = proc_stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .ok_or(ParseError::NoAggregateLine)?;
        let mut fields = Vec::with_capacity(10);
        for (index, text) in line.split_whitespace().skip(1).enumerate() {
            let v = text.parse::<u64>().map_err(|_| ParseError::BadField {
                index,
                text: text.to_string(),
            })?;
            fields.push(v);
        }
        if fields.len() < 4 {
            return Err(ParseError::TooFewFields(fields.len()));
        }
        let counted = &fields[..fields.len().min(8)];
        let total = counted.iter().fold(0u64, |a, v| a.saturating_add(*v));
        let idle = fields[3].saturating_add(fields.get(4).copied().unwrap_or(0));
        Ok(CpuTimes { idle, total })
    }
}

/// Busy share of all CPUs between `before` and `after`, in percent (0.0..=100.0).
///
/// Returns `None` when no time passed between the samples or the counters went backwards (a
/// counter reset or samples given in the wrong order): there is no honest number then.
pub fn utilisation_percent(before: CpuTimes, after: CpuTimes) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let idle = after.idle.checked_sub(before.idle)?;
    if total == 0 || idle > total {
        return None;
    }
    Some((total - idle) as f64 * 100.0 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "cpu  4705 356 584 3699176 23060 0 277 0 0 0\n\
                          cpu0 1393 280 255 1849588 11530 0 138 0 0 0\n\
                          intr 12345\n";

    #[test]
    fn parses_the_aggregate_line_only() {
        let t = CpuTimes::parse(SAMPLE).expect("valid sample");
        assert_eq!(t.idle, 3_699_176 + 23_060);
        assert_eq!(t.total, 4705 + 356 + 584 + 3_699_176 + 23_060 + 277);
    }

    #[test]
    fn old_kernels_with_four_fields_parse() {
        let t = CpuTimes::parse("cpu 10 0 10 80\n").expect("four fields");
        assert_eq!((t.idle, t.total), (80, 100));
    }

    #[test]
    fn guest_time_is_not_counted_twice() {
        let t = CpuTimes::parse("cpu 10 0 0 90 0 0 0 0 10 0\n").expect("ten fields");
        assert_eq!(t.total, 100);
    }

    #[test]
    fn rejects_malformed_text() {
        assert_eq!(
            CpuTimes::parse("intr 1\n"),
            Err(ParseError::NoAggregateLine)
        );
        assert_eq!(
            CpuTimes::parse("cpu 1 2 3\n"),
            Err(ParseError::TooFewFields(3))
        );
        assert_eq!(
            CpuTimes::parse("cpu 1 x 3 4\n"),
            Err(ParseError::BadField {
                index: 1,
                text: "x".into()
            })
        );
        assert_eq!(
            CpuTimes::parse("cpu 1 -2 3 4\n"),
            Err(ParseError::BadField {
                index: 1,
                text: "-2".into()
            })
        );
    }

    #[test]
    fn utilisation_table() {
        let s = |idle, total| CpuTimes { idle, total };
        let cases = [
            (s(0, 0), s(50, 100), Some(50.0)),
            (s(0, 0), s(100, 100), Some(0.0)),
            (s(0, 0), s(0, 100), Some(100.0)),
            (s(10, 100), s(10, 100), None), // no time passed
            (s(10, 100), s(5, 200), None),  // idle went backwards
            (s(10, 200), s(20, 100), None), // total went backwards
            (s(0, 0), s(150, 100), None),   // impossible: more idle than total
        ];
        for (before, after, want) in cases {
            assert_eq!(
                utilisation_percent(before, after),
                want,
                "{before:?} -> {after:?}"
            );
        }
    }

    #[test]
    fn reads_this_hosts_proc_stat() {
        // The real file parses on the machine the tests run on (Linux only).
        if let Ok(text) = std::fs::read_to_string("/proc/stat") {
            let t = CpuTimes::parse(&text).expect("/proc/stat parses");
            assert!(t.total >= t.idle);
        }
    }
}
