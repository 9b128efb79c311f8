//! The last 15 minutes of reported load per (service, Kubernetes cluster),
//! in memory, for the web console's charts: requests, errors and a latency
//! histogram per 5-second bucket.
//!
//! Bounded by construction: a series holds at most [`BUCKETS`] buckets of
//! fixed size, older ones are dropped as new ones open, and a series with
//! no report inside the window is removed. Memory is flat however long the
//! control plane runs. Buckets sum whatever reports arrive in them, so a
//! proxy that disconnects just stops adding to them.
//!
//! Latency comes from Ferry's proxy only. It reports, per cluster and in
//! each load report, one `load_metric_stats` entry per non-empty latency
//! bucket: the entry named [`latency_metric_name`] (`ferry.latency_ms.le_50`
//! for requests that took more than the previous bound and at most 50 ms,
//! `ferry.latency_ms.le_inf` past the last bound) whose
//! `num_requests_finished_with_metric` is the number of such requests (and
//! `total_metric_value` the same number: each request counts 1). Envoy
//! reports counts only, so its clusters have rates and error rates but no
//! percentiles.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use serde::Serialize;

use crate::lrs::Load;

/// Width of one bucket.
pub const BUCKET_MS: i64 = 5_000;

/// Buckets kept per series: 15 minutes.
pub const BUCKETS: usize = 180;

pub use ferry_xds_core::latency::{
    LATENCY_BOUNDS_MS, LATENCY_SLOTS, LatencyCounts, latency_metric_name, latency_slot, slot_of_ms,
};

/// The `q` quantile (0..=1) of a latency histogram, in milliseconds,
/// interpolated within its bucket; `None` when it is empty. A quantile in
/// the unbounded bucket reads as the last bound.
pub fn quantile(counts: &[u32; LATENCY_SLOTS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (slot, &count) in counts.iter().enumerate() {
        let count = u64::from(count);
        if count > 0 && (below + count) as f64 >= rank {
            let low = slot
                .checked_sub(1)
                .map_or(0.0, |s| f64::from(LATENCY_BOUNDS_MS[s]));
            let Some(&high) = LATENCY_BOUNDS_MS.get(slot) else {
                return Some(low);
            };
            let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
            return Some(low + (f64::from(high) - low) * within);
        }
        below += count;
    }
    LATENCY_BOUNDS_MS.last().map(|&b| f64::from(b))
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// `at_ms / BUCKET_MS` of the reports it sums.
    index: i64,
    requests: u64,
    errors: u64,
    latency: [u32; LATENCY_SLOTS],
}

impl Bucket {
    fn new(index: i64) -> Self {
        Self {
            index,
            requests: 0,
            errors: 0,
            latency: [0; LATENCY_SLOTS],
        }
    }
}

/// One series over the window, oldest first, one entry per bucket: what
/// the console draws.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chart {
    /// Start of the first bucket, in Unix milliseconds.
    pub start_ms: i64,
    pub step_ms: i64,
    pub requests_per_s: Vec<f64>,
    /// Errors per request; `None` for a bucket without requests.
    pub error_rate: Vec<Option<f64>>,
    /// Latency percentiles in milliseconds; `None` for a bucket without
    /// latency reports.
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
    /// Whether any report in the window carried latency (Ferry's proxy
    /// does, Envoy does not).
    pub latency_reported: bool,
}

/// The history of every (service, cluster) reported in the last 15 minutes.
#[derive(Debug, Default)]
pub struct History {
    series: Mutex<BTreeMap<(String, String), VecDeque<Bucket>>>,
    /// Bucket index of the last sweep of idle series.
    swept: AtomicI64,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), VecDeque<Bucket>>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one report's counts (and latency histogram, when it carried
    /// one) for `service` in `cluster`, received at `at_ms`.
    pub fn record(
        &self,
        service: &str,
        cluster: &str,
        at_ms: i64,
        load: Load,
        latency: Option<&LatencyCounts>,
    ) {
        let index = at_ms.div_euclid(BUCKET_MS);
        self.sweep(index);
        let mut series = self.lock();
        let buckets = series
            .entry((service.to_owned(), cluster.to_owned()))
            .or_insert_with(|| VecDeque::with_capacity(BUCKETS + 1));
        let Some(bucket) = bucket_at(buckets, index) else {
            return;
        };
        bucket.requests = bucket.requests.saturating_add(load.requests);
        bucket.errors = bucket.errors.saturating_add(load.errors);
        if let Some(latency) = latency {
            for (sum, &n) in bucket.latency.iter_mut().zip(latency) {
                *sum = sum.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
            }
        }
    }

    /// Drops series with no bucket inside the window, at most once per
    /// bucket.
    fn sweep(&self, index: i64) {
        let last = self.swept.load(Ordering::Relaxed);
        if index <= last
            || self
                .swept
                .compare_exchange(last, index, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let oldest = index - BUCKETS as i64;
        self.lock()
            .retain(|_, buckets| buckets.back().is_some_and(|b| b.index > oldest));
    }

    /// The complete buckets of the window ending at `now_ms` (the one
    /// still filling is left out: its rate would read low), per
    /// (service, cluster) with at least one report in it.
    pub fn charts(&self, now_ms: i64) -> BTreeMap<(String, String), Chart> {
        let end = now_ms.div_euclid(BUCKET_MS);
        let first = end - BUCKETS as i64;
        self.lock()
            .iter()
            .filter(|(_, buckets)| buckets.iter().any(|b| b.index >= first && b.index < end))
            .map(|(key, buckets)| (key.clone(), chart(buckets, first, end)))
            .collect()
    }

    /// Series kept now.
    pub fn series_count(&self) -> usize {
        self.lock().len()
    }

    /// Buckets kept now, over all series.
    pub fn bucket_count(&self) -> usize {
        self.lock().values().map(VecDeque::len).sum()
    }

    /// Heap bytes the buckets take (capacity, not just length).
    pub fn bucket_bytes(&self) -> usize {
        self.lock()
            .values()
            .map(|b| b.capacity() * std::mem::size_of::<Bucket>())
            .sum()
    }
}

/// The bucket of `index` in `buckets` (kept in index order, at most
/// [`BUCKETS`] wide), opened if needed; `None` when it is already older
/// than the window.
fn bucket_at(buckets: &mut VecDeque<Bucket>, index: i64) -> Option<&mut Bucket> {
    let newest = buckets.back().map_or(index, |b| b.index.max(index));
    let oldest = newest - BUCKETS as i64;
    while buckets.front().is_some_and(|b| b.index <= oldest) {
        buckets.pop_front();
    }
    if index <= oldest {
        return None;
    }
    // Reports arrive in time order, so the bucket is almost always the
    // newest one or a new one.
    let at = buckets.partition_point(|b| b.index < index);
    if buckets.get(at).is_none_or(|b| b.index != index) {
        buckets.insert(at, Bucket::new(index));
    }
    buckets.get_mut(at)
}

fn chart(buckets: &VecDeque<Bucket>, first: i64, end: i64) -> Chart {
    let width = usize::try_from(end - first).unwrap_or(0);
    let mut chart = Chart {
        start_ms: first * BUCKET_MS,
        step_ms: BUCKET_MS,
        requests_per_s: vec![0.0; width],
        error_rate: vec![None; width],
        p50_ms: vec![None; width],
        p99_ms: vec![None; width],
        latency_reported: false,
    };
    let seconds = BUCKET_MS as f64 / 1000.0;
    for b in buckets.iter().filter(|b| b.index >= first && b.index < end) {
        let Ok(i) = usize::try_from(b.index - first) else {
            continue;
        };
        chart.requests_per_s[i] = b.requests as f64 / seconds;
        chart.error_rate[i] = (b.requests > 0).then(|| b.errors as f64 / b.requests as f64);
        chart.p50_ms[i] = quantile(&b.latency, 0.50);
        chart.p99_ms[i] = quantile(&b.latency, 0.99);
        chart.latency_reported |= chart.p50_ms[i].is_some();
    }
    chart
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(requests: u64, errors: u64) -> Load {
        Load { requests, errors }
    }

    /// A histogram with `n` requests in the bucket bounded by `bound_ms`.
    fn latency(bound_ms: f64, n: u64) -> LatencyCounts {
        let mut counts = [0; LATENCY_SLOTS];
        counts[slot_of_ms(bound_ms)] = n;
        counts
    }

    #[test]
    fn metric_names_round_trip_to_their_bucket() {
        for slot in 0..LATENCY_SLOTS {
            assert_eq!(latency_slot(&latency_metric_name(slot)), Some(slot));
        }
        assert_eq!(latency_metric_name(0), "ferry.latency_ms.le_1");
        assert_eq!(
            latency_metric_name(LATENCY_SLOTS - 1),
            "ferry.latency_ms.le_inf"
        );
        // A coarser reporter's bound lands in the first bucket holding it.
        assert_eq!(latency_slot("ferry.latency_ms.le_4"), Some(slot_of_ms(5.0)));
        assert_eq!(latency_slot("ferry.latency_ms.le_NaN"), None);
        assert_eq!(latency_slot("ferry.other"), None);
        assert_eq!(slot_of_ms(0.2), 0);
        assert_eq!(slot_of_ms(1.0), 0);
        assert_eq!(slot_of_ms(1.5), 1);
        assert_eq!(slot_of_ms(1e9), LATENCY_SLOTS - 1);
    }

    #[test]
    fn percentiles_interpolate_within_a_bucket() {
        let mut counts = [0u32; LATENCY_SLOTS];
        assert_eq!(quantile(&counts, 0.5), None);
        // 98 requests in (7, 10] ms, 2 in (200, 300] ms.
        counts[slot_of_ms(10.0)] = 98;
        counts[slot_of_ms(300.0)] = 2;
        let p50 = quantile(&counts, 0.5).expect("p50");
        assert!((7.0..=10.0).contains(&p50), "{p50}");
        let p99 = quantile(&counts, 0.99).expect("p99");
        assert!((200.0..=300.0).contains(&p99), "{p99}");
        counts[LATENCY_SLOTS - 1] = 1000;
        assert_eq!(quantile(&counts, 0.99), Some(5000.0));
    }

    #[test]
    fn charts_show_rates_errors_and_percentiles_per_bucket() {
        let history = History::default();
        // Five 1-second reports into the bucket starting at 100 s.
        for s in 100..105 {
            let at = s * 1000;
            history.record("web.shop", "new", at, load(20, 2), Some(&latency(10.0, 20)));
            history.record("web.shop", "old", at, load(10, 0), None);
        }
        let charts = history.charts(106_000);
        let new = &charts[&("web.shop".to_owned(), "new".to_owned())];
        assert_eq!(new.requests_per_s.len(), BUCKETS);
        assert_eq!(new.start_ms + BUCKETS as i64 * BUCKET_MS, 105_000);
        let last = BUCKETS - 1;
        assert_eq!(new.requests_per_s[last], 20.0);
        assert_eq!(new.error_rate[last], Some(0.1));
        assert!(new.p99_ms[last].is_some_and(|p| (7.0..=10.0).contains(&p)));
        assert_eq!(new.requests_per_s[last - 1], 0.0);
        assert_eq!(new.error_rate[last - 1], None);
        assert!(new.latency_reported);
        let old = &charts[&("web.shop".to_owned(), "old".to_owned())];
        assert_eq!(old.requests_per_s[last], 10.0);
        assert_eq!(old.p50_ms[last], None);
        assert!(!old.latency_reported, "counts-only reports have no latency");
        // The bucket still filling is not drawn.
        history.record("web.shop", "new", 106_000, load(999, 0), None);
        assert_eq!(history.charts(107_000), charts);
    }

    #[test]
    fn memory_stays_flat_over_ten_hours_of_reports() {
        let history = History::default();
        let per_second = |history: &History, s: i64| {
            for service in ["a.shop", "b.shop"] {
                for cluster in ["old", "new"] {
                    history.record(
                        service,
                        cluster,
                        s * 1000,
                        load(100, 1),
                        Some(&latency(20.0, 100)),
                    );
                }
            }
        };
        let window_s = BUCKETS as i64 * BUCKET_MS / 1000;
        for s in 0..window_s {
            per_second(&history, s);
        }
        let (buckets, bytes) = (history.bucket_count(), history.bucket_bytes());
        assert_eq!(buckets, 4 * BUCKETS);
        for s in window_s..10 * 3600 {
            per_second(&history, s);
            if s % 3600 == 0 {
                assert_eq!(history.bucket_count(), buckets, "at {s} s");
                assert_eq!(history.bucket_bytes(), bytes, "at {s} s");
            }
        }
        assert_eq!(history.series_count(), 4);
        assert_eq!(history.bucket_count(), buckets);
        assert_eq!(history.bucket_bytes(), bytes);
        // About 20 KiB per series.
        assert!(bytes / 4 < 24 * 1024, "{bytes} bytes for 4 series");
    }

    #[test]
    fn a_proxy_that_disconnects_stops_contributing() {
        let history = History::default();
        let key = ("web.shop".to_owned(), "new".to_owned());
        // Two proxies report 10 requests/s each for a minute; then one
        // disconnects and the other reports on for a minute.
        for s in 0..120 {
            let at = s * 1000;
            history.record("web.shop", "new", at, load(10, 0), None);
            if s < 60 {
                history.record("web.shop", "new", at, load(10, 0), None);
            }
        }
        let chart = &history.charts(120_000)[&key];
        let last = BUCKETS - 1;
        assert_eq!(chart.requests_per_s[last], 10.0);
        assert_eq!(chart.requests_per_s[last - 12], 20.0);
        // Then the last one goes too: the series drains out of the window
        // and is dropped, while other series go on.
        for s in 120..(120 + 16 * 60) {
            history.record("api.shop", "old", s * 1000, load(1, 0), None);
        }
        let now = (120 + 16 * 60) * 1000;
        assert!(!history.charts(now).contains_key(&key));
        assert_eq!(history.series_count(), 1);
    }

    #[test]
    fn late_and_out_of_order_reports_land_in_their_bucket_or_nowhere() {
        let history = History::default();
        history.record("web.shop", "new", 50_000, load(5, 0), None);
        history.record("web.shop", "new", 40_000, load(5, 5), None);
        history.record(
            "web.shop",
            "new",
            50_000 - BUCKETS as i64 * BUCKET_MS,
            load(5, 0),
            None,
        );
        let chart = &history.charts(60_000)[&("web.shop".to_owned(), "new".to_owned())];
        let last = BUCKETS - 1;
        assert_eq!(chart.requests_per_s[last - 1], 1.0);
        assert_eq!(chart.error_rate[last - 3], Some(1.0));
        assert_eq!(history.bucket_count(), 2);
    }
}
