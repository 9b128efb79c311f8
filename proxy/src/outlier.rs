//! Passive outlier detection: an endpoint that answers with 5xx, or cannot
//! be reached, `consecutive_5xx` times in a row is ejected: it gets no new
//! requests until its ejection ends. Each further ejection doubles the time
//! (up to `max_ejection_time`); an endpoint that stays healthy for a base
//! ejection time after coming back starts over from the base time. No more
//! than `max_ejection_percent` of a cluster's endpoints is ejected at once,
//! though one may always be (as Envoy does); when every endpoint is ejected
//! the balancer uses them all rather than refuse requests.
//!
//! The state lives in each endpoint and survives config swaps; ejections
//! end lazily, when a pick finds the time has passed.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::Endpoint;

/// A cluster's outlier detection, from its xDS `outlier_detection`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_5xx: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    /// Envoy's defaults for the fields Ferry reads.
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// One endpoint's record. Times are milliseconds since the proxy's epoch.
#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    /// 0 when never ejected.
    ejected_until_ms: AtomicU64,
    /// Ejections in a row, for the backoff.
    ejections: AtomicU32,
}

/// The clock outlier detection counts in: milliseconds since `epoch`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub epoch: Instant,
}

impl Clock {
    pub fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }
}

impl Health {
    /// Whether the endpoint is ejected at `now_ms`.
    pub fn ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Ejections in a row so far (for status pages).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Forgets every failure and ejection: the cluster no longer has
    /// outlier detection, so nothing may keep the endpoint out.
    pub fn clear(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejected_until_ms.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
    }
}

/// What an attempt at an endpoint came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx answer, a connect failure or a broken connection.
    Failure,
}

/// Records `outcome` for `endpoint` of a cluster with `endpoints`; returns
/// the ejection time when this outcome ejected it.
pub fn record(
    config: &OutlierConfig,
    endpoints: &[std::sync::Arc<Endpoint>],
    endpoint: &Endpoint,
    outcome: Outcome,
    now_ms: u64,
) -> Option<Duration> {
    let health = &endpoint.health;
    match outcome {
        Outcome::Success => {
            health.consecutive_failures.store(0, Ordering::Relaxed);
            let until = health.ejected_until_ms.load(Ordering::Relaxed);
            let base = u64::try_from(config.base_ejection_time.as_millis()).unwrap_or(u64::MAX);
            if health.ejections.load(Ordering::Relaxed) > 0 && now_ms >= until.saturating_add(base)
            {
                health.ejections.store(0, Ordering::Relaxed);
            }
            None
        }
        Outcome::Failure => {
            let failures = health.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures < config.consecutive_5xx || health.ejected(now_ms) {
                return None;
            }
            let ejected = endpoints
                .iter()
                .filter(|e| e.health.ejected(now_ms))
                .count();
            let allowed = (endpoints.len() * config.max_ejection_percent as usize / 100).max(1);
            if ejected + 1 > allowed {
                return None;
            }
            let n = health.ejections.fetch_add(1, Ordering::Relaxed);
            let time = config
                .base_ejection_time
                .saturating_mul(1u32 << n.min(16))
                .min(config.max_ejection_time.max(config.base_ejection_time));
            let until = now_ms.saturating_add(u64::try_from(time.as_millis()).unwrap_or(u64::MAX));
            health.ejected_until_ms.store(until, Ordering::Relaxed);
            health.consecutive_failures.store(0, Ordering::Relaxed);
            Some(time)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        Endpoint::loopback(n)
    }

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(35),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_and_the_time_doubles_up_to_the_cap() {
        let (c, e) = (config(), endpoints(4));
        let fail = |now| record(&c, &e, &e[0], Outcome::Failure, now);
        assert_eq!(fail(0), None);
        assert_eq!(fail(0), None);
        assert_eq!(fail(0), Some(Duration::from_secs(10)));
        assert!(e[0].health.ejected(9_999) && !e[0].health.ejected(10_000));
        // Back, fails again at once: twice as long, then capped at 35 s.
        for _ in 0..2 {
            assert_eq!(fail(10_000), None);
        }
        assert_eq!(fail(10_000), Some(Duration::from_secs(20)));
        for _ in 0..2 {
            assert_eq!(fail(30_000), None);
        }
        assert_eq!(fail(30_000), Some(Duration::from_secs(35)));
    }

    #[test]
    fn a_success_resets_the_count_and_a_healthy_spell_the_backoff() {
        let (c, e) = (config(), endpoints(4));
        let at = |outcome, now| record(&c, &e, &e[0], outcome, now);
        at(Outcome::Failure, 0);
        at(Outcome::Failure, 0);
        at(Outcome::Success, 0);
        assert_eq!(at(Outcome::Failure, 0), None, "the count restarted");
        at(Outcome::Failure, 0);
        assert!(at(Outcome::Failure, 0).is_some());
        // Healthy for a base time after the ejection ended: back to base.
        at(Outcome::Success, 20_000);
        assert_eq!(e[0].health.ejections(), 0);
        for _ in 0..2 {
            at(Outcome::Failure, 20_000);
        }
        assert_eq!(at(Outcome::Failure, 20_000), Some(Duration::from_secs(10)));
    }

    #[test]
    fn the_ejected_share_is_bounded_but_one_may_always_go() {
        let c = config();
        let e = endpoints(4);
        let eject = |i: usize| {
            (0..3)
                .filter_map(|_| record(&c, &e, &e[i], Outcome::Failure, 0))
                .count()
        };
        assert_eq!(eject(0), 1);
        assert_eq!(eject(1), 1);
        assert_eq!(eject(2), 0, "50 % of 4 endpoints are out already");
        let single = endpoints(1);
        let ejected = (0..3)
            .filter_map(|_| record(&c, &single, &single[0], Outcome::Failure, 0))
            .count();
        assert_eq!(ejected, 1);
    }
}
