//! The latency buckets a proxy reports load in.
//!
//! Ferry's proxy reports, per cluster and in each load report, one
//! `load_metric_stats` entry per non-empty latency bucket: the entry named
//! [`latency_metric_name`] (`ferry.latency_ms.le_50` for requests that took
//! more than the previous bound and at most 50 ms, `ferry.latency_ms.le_inf`
//! past the last bound) whose `num_requests_finished_with_metric` is the
//! number of such requests.

/// Upper bounds, in milliseconds, of the latency histogram's buckets; one
/// more bucket holds everything slower than the last.
pub const LATENCY_BOUNDS_MS: [u32; 20] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2500, 5000,
];

/// Number of latency buckets, the unbounded last one included.
pub const LATENCY_SLOTS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// Requests per latency bucket.
pub type LatencyCounts = [u64; LATENCY_SLOTS];

const LATENCY_METRIC_PREFIX: &str = "ferry.latency_ms.le_";

/// The LRS named-metric name of latency bucket `slot`.
pub fn latency_metric_name(slot: usize) -> String {
    match LATENCY_BOUNDS_MS.get(slot) {
        Some(bound) => format!("{LATENCY_METRIC_PREFIX}{bound}"),
        None => format!("{LATENCY_METRIC_PREFIX}inf"),
    }
}

/// The latency bucket a named metric stands for: the first whose bound
/// is at least the metric's (so a reporter with coarser bounds still
/// lands in a bucket holding its requests); `None` for other metrics.
pub fn latency_slot(metric_name: &str) -> Option<usize> {
    let bound = metric_name.strip_prefix(LATENCY_METRIC_PREFIX)?;
    if bound == "inf" {
        return Some(LATENCY_SLOTS - 1);
    }
    let bound: f64 = bound.parse().ok().filter(|b: &f64| b.is_finite())?;
    Some(slot_of_ms(bound))
}

/// The latency bucket of a request that took `ms` milliseconds.
pub fn slot_of_ms(ms: f64) -> usize {
    LATENCY_BOUNDS_MS.partition_point(|&bound| f64::from(bound) < ms)
}
