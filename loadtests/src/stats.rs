//! Latency summaries (exact percentiles over every sample) and the
//! formatting helpers of the result tables.

use std::time::Duration;

use serde::Serialize;

/// Summary of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    pub samples: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    /// Nearest-rank percentiles of `samples`; all zero when empty.
    pub fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let rank = |p: f64| {
            let r = (p / 100.0 * sorted.len() as f64).ceil() as usize;
            ms(sorted[r.clamp(1, sorted.len()) - 1])
        };
        let total: Duration = sorted.iter().sum();
        Self {
            samples: sorted.len(),
            min_ms: ms(sorted[0]),
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
            p999_ms: rank(99.9),
            max_ms: ms(sorted[sorted.len() - 1]),
            mean_ms: ms(total) / sorted.len() as f64,
        }
    }
}

/// Milliseconds, to a readable precision.
pub fn fmt_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1e3)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// Bytes as MiB.
pub fn fmt_mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = Summary::of(&samples);
        assert_eq!(s.samples, 100);
        assert_eq!((s.min_ms, s.p50_ms, s.p90_ms), (1.0, 50.0, 90.0));
        assert_eq!((s.p99_ms, s.max_ms, s.mean_ms), (99.0, 100.0, 50.5));
        assert_eq!(s.p999_ms, 100.0);
        let one = Summary::of(&[Duration::from_millis(7)]);
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
        assert_eq!(Summary::of(&[]), Summary::default());
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_ms(1.234), "1.2 ms");
        assert_eq!(fmt_ms(123.4), "123 ms");
        assert_eq!(fmt_ms(12_345.0), "12.3 s");
        assert_eq!(fmt_mib(3 * 1024 * 1024), "3 MiB");
    }
}
