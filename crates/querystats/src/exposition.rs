//! Prometheus text exposition (format 0.0.4) for `dbopt.metrics()`: one `# HELP` and `# TYPE`
//! per family, samples after them, label values escaped, histograms with cumulative `le` buckets.

use std::fmt::Write;

use crate::histogram::{Histogram, BOUNDS_MS};

#[derive(Default)]
pub struct Exposition {
    out: String,
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A float as Prometheus writes it (`+Inf`, `-Inf`, `NaN`, shortest round-trip otherwise).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(v));
    }

    pub fn counter(&mut self, name: &str, help: &str, v: f64) -> &mut Self {
        self.family(name, "counter", help);
        self.sample(name, &[], v);
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: f64) -> &mut Self {
        self.family(name, "gauge", help);
        self.sample(name, &[], v);
        self
    }

    /// A counter family with one sample per label set.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Vec<(&str, &str)>, f64)],
    ) -> &mut Self {
        self.family(name, "counter", help);
        for (labels, v) in samples {
            self.sample(name, labels, *v);
        }
        self
    }

    /// A gauge family with one sample per label set.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Vec<(&str, &str)>, f64)],
    ) -> &mut Self {
        self.family(name, "gauge", help);
        for (labels, v) in samples {
            self.sample(name, labels, *v);
        }
        self
    }

    /// A latency histogram in seconds.
    pub fn histogram_seconds(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Self {
        self.family(name, "histogram", help);
        let cumulative = h.cumulative();
        let bucket = format!("{name}_bucket");
        for (bound_ms, count) in BOUNDS_MS.iter().zip(cumulative) {
            let le = number(bound_ms / 1000.0);
            self.sample(&bucket, &[("le", &le)], count as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.n as f64);
        self.sample(&format!("{name}_sum"), &[], h.total_ms / 1000.0);
        self.sample(&format!("{name}_count"), &[], h.n as f64);
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_histograms() {
        let mut h = Histogram::default();
        h.record(0.3);
        h.record(120.0);
        let mut e = Exposition::default();
        e.counter("dbopt_queries_total", "Executions.", 2.0)
            .gauges(
                "dbopt_lag",
                "Lag \\ with\nnewline.",
                &[(vec![("node", "a\"b")], 1.5)],
            )
            .histogram_seconds("dbopt_query_duration_seconds", "Latency.", &h);
        let text = e.finish();
        assert!(
            text.contains("# TYPE dbopt_queries_total counter\ndbopt_queries_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP dbopt_lag Lag \\\\ with\\nnewline.\n"),
            "{text}"
        );
        assert!(text.contains("dbopt_lag{node=\"a\\\"b\"} 1.5\n"), "{text}");
        assert!(
            text.contains("dbopt_query_duration_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("dbopt_query_duration_seconds_bucket{le=\"0.25\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("dbopt_query_duration_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("dbopt_query_duration_seconds_count 2\n"),
            "{text}"
        );
        assert!(text.ends_with('\n'));
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
    }
}
