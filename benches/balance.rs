//! Criterion benchmarks of the proxy's picks, at 3 and 100 endpoints (or
//! clusters):
//!
//! - `p2c/all_usable`: the endpoint pick of a first attempt when no
//!   endpoint is ejected or failing health checks (the request path's
//!   common case: power of two choices over peak-EWMA cost, no copy);
//! - `p2c/some_ejected`: the same with a third of the endpoints ejected
//!   by outlier detection (the usable ones are gathered first);
//! - `p2c/retry`: a retry's pick, which skips the endpoint the first
//!   attempt went to;
//! - `cluster/weighted` and `cluster/sticky`: a route's cluster, drawn by
//!   weight or by weighted rendezvous hashing of a key.
//!
//! Run with `cargo bench --bench balance`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ferry_proxy::call::Tried;
use ferry_proxy::config::{Endpoint, Target, Upstream};
use ferry_proxy::outlier::{self, Clock, Outcome, OutlierConfig};
use ferry_proxy::{balance, pick};

const SIZES: [u16; 2] = [3, 100];

/// A cluster of `n` endpoints whose latency estimates differ, as after
/// some traffic.
fn upstream(n: u16) -> Upstream {
    let now = Instant::now();
    let endpoints = Endpoint::loopback(n);
    for (i, e) in endpoints.iter().enumerate() {
        e.ewma
            .observe(Duration::from_micros(200 + 37 * i as u64), now);
    }
    Upstream::for_tests("bench", endpoints)
}

/// Ejects every third endpoint of `upstream` through outlier detection,
/// as consecutive failures would.
fn eject_a_third(upstream: &Upstream, clock: Clock) -> usize {
    let config = OutlierConfig {
        max_ejection_percent: 100,
        base_ejection_time: Duration::from_secs(3600),
        max_ejection_time: Duration::from_secs(3600),
        ..OutlierConfig::default()
    };
    let now_ms = clock.ms(Instant::now());
    for e in upstream.endpoints.iter().step_by(3) {
        for _ in 0..config.consecutive_5xx {
            outlier::record(&config, &upstream.endpoints, e, Outcome::Failure, now_ms);
        }
    }
    upstream
        .endpoints
        .iter()
        .filter(|e| e.health.ejected(now_ms))
        .count()
}

fn endpoint_picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("p2c");
    for n in SIZES {
        let plain = upstream(n);
        group.bench_with_input(BenchmarkId::new("all_usable", n), &plain, |b, u| {
            b.iter(|| balance::pick(u, Instant::now(), 0, None));
        });

        let clock = Clock {
            epoch: Instant::now(),
        };
        let ejecting = upstream(n);
        let ejected = eject_a_third(&ejecting, clock);
        assert!(ejected > 0 && ejected < usize::from(n));
        group.bench_with_input(BenchmarkId::new("some_ejected", n), &ejecting, |b, u| {
            b.iter(|| {
                let now = Instant::now();
                let picked = balance::pick(u, now, clock.ms(now), None);
                assert!(picked.is_some_and(|e| !e.health.ejected(clock.ms(now))));
            });
        });

        let tried = Tried::default();
        tried.add(plain.endpoints[0].addr);
        group.bench_with_input(BenchmarkId::new("retry", n), &plain, |b, u| {
            b.iter(|| {
                let picked = balance::pick(u, Instant::now(), 0, Some(black_box(&tried)));
                assert!(picked.is_some_and(|e| e.addr != u.endpoints[0].addr));
            });
        });
    }
    group.finish();
}

fn targets(n: u16) -> Vec<Target> {
    (0..n)
        .map(|i| Target {
            cluster: format!("checkout.shop:8080@cluster-{i}"),
            weight: 10_000 / u32::from(n),
        })
        .collect()
}

fn cluster_picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("cluster");
    for n in SIZES {
        let targets = targets(n);
        group.bench_with_input(BenchmarkId::new("weighted", n), &targets, |b, t| {
            b.iter(|| pick::cluster(t, None).map(|t| t.weight));
        });
        group.bench_with_input(BenchmarkId::new("sticky", n), &targets, |b, t| {
            b.iter(|| pick::cluster(t, Some(black_box(b"user-42"))).map(|t| t.weight));
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = endpoint_picks, cluster_picks
}
criterion_main!(benches);
