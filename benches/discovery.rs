//! Criterion benchmarks of the Kubernetes source at scale: one
//! EndpointSlice watch event on a cluster holding 100,000 endpoints.
//!
//! One cluster ("east") mirrors 1,000 exported Services, each with one
//! EndpointSlice of 100 endpoints (100,000 endpoints), built through
//! [`ClusterState::apply`] and published into a [`Catalog`] as the
//! cluster's source, exactly as the watcher loop does. Then, per
//! iteration, one `Apply` event of one slice whose first endpoint flips
//! readiness:
//!
//! - `apply_one_slice_event`: [`ClusterState::apply`], then
//!   [`ClusterState::contributions`] of the touched service, then
//!   [`Catalog::update_source`] (which publishes a new catalog snapshot);
//! - `apply_one_slice_event_and_translate`: the same, then the incremental
//!   [`Translator::translate`] of the new snapshot (warm translator);
//! - `apply_one_slice_event_translate_publish`: the same, then
//!   [`SnapshotCache::publish`] (the diff that feeds every xDS stream).
//!
//! Run with `cargo bench --bench discovery`.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ferry_discovery::kubernetes::{self, Change, ClusterState, EXPORT_LABEL};
use ferry_discovery::{Catalog, ClusterName};
use ferry_xds::{SnapshotCache, TranslateOptions, Translator};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use kube::api::ObjectMeta;
use kube::runtime::watcher::Event;

const SERVICES: usize = 1_000;
const ENDPOINTS_PER_SLICE: usize = 100;
const NAMESPACE: &str = "bench";
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

fn service(index: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{index:04}")),
            namespace: Some(NAMESPACE.to_owned()),
            labels: Some(BTreeMap::from([(
                EXPORT_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Service `index`'s slice; `not_ready` endpoints are unready. Addresses
/// are in 10.0.0.0/8: data only, never connected to.
fn slice(index: usize, not_ready: &[usize]) -> EndpointSlice {
    let endpoints = (0..ENDPOINTS_PER_SLICE)
        .map(|e| {
            let n = (index * ENDPOINTS_PER_SLICE + e + 1) as u32;
            let ready = !not_ready.contains(&e);
            Endpoint {
                addresses: vec![format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255)],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(ready),
                    terminating: Some(false),
                }),
                zone: Some(ZONES[e % ZONES.len()].to_owned()),
                ..Default::default()
            }
        })
        .collect();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{index:04}-abcde")),
            namespace: Some(NAMESPACE.to_owned()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_owned(),
                format!("svc-{index:04}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: Some(endpoints),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_owned()),
            port: Some(8080),
            ..Default::default()
        }]),
    }
}

/// Applies one change and publishes what it touched, as the watcher does.
fn apply(state: &mut ClusterState, catalog: &Catalog, source: &str, change: Change) -> bool {
    let touched = state.apply(change);
    let (upserts, removals) = state.contributions(&touched);
    catalog.update_source(source, upserts, removals)
}

/// A cluster of 100,000 endpoints, listed and published.
fn cluster() -> (ClusterState, Catalog, String) {
    let name = ClusterName::new("east").expect("valid cluster name");
    let source = kubernetes::source_id(&name);
    let mut state = ClusterState::new(name);
    state.begin_generation(&[]);
    let catalog = Catalog::new();
    // The (empty) catalog file loads first, as in `ferry control`.
    catalog.replace(Vec::new());
    let mut touched = BTreeSet::new();
    for s in 0..SERVICES {
        touched.extend(state.apply(Change::Service(0, Box::new(Event::Apply(service(s))))));
        touched.extend(state.apply(Change::Slice(0, Box::new(Event::Apply(slice(s, &[]))))));
    }
    let (upserts, removals) = state.contributions(&touched);
    assert_eq!(upserts.len(), SERVICES);
    catalog.update_source(&source, upserts, removals);
    assert_eq!(
        catalog.current().endpoint_count(),
        SERVICES * ENDPOINTS_PER_SLICE
    );
    (state, catalog, source)
}

/// The changed slice of each iteration: the slice of a service in the
/// middle of the catalog, its first endpoint alternately unready and
/// ready, so every iteration is a real change.
struct Flipper {
    slices: [EndpointSlice; 2],
    next: usize,
}

impl Flipper {
    fn new() -> Self {
        let target = SERVICES / 2;
        Self {
            slices: [slice(target, &[0]), slice(target, &[])],
            next: 0,
        }
    }

    fn change(&mut self) -> Change {
        let slice = self.slices[self.next].clone();
        self.next = 1 - self.next;
        Change::Slice(0, Box::new(Event::Apply(slice)))
    }
}

fn slice_event(c: &mut Criterion) {
    let mut group = c.benchmark_group("discovery_100k_endpoints");

    let (mut state, catalog, source) = cluster();
    let mut flipper = Flipper::new();
    group.bench_function("apply_one_slice_event", |b| {
        b.iter_batched(
            || flipper.change(),
            |change| assert!(apply(&mut state, &catalog, &source, change)),
            BatchSize::SmallInput,
        );
    });
    drop((state, catalog));

    let (mut state, catalog, source) = cluster();
    let mut translator = Translator::new(TranslateOptions::default());
    translator.translate(&catalog.current());
    let mut flipper = Flipper::new();
    group.bench_function("apply_one_slice_event_and_translate", |b| {
        b.iter_batched(
            || flipper.change(),
            |change| {
                assert!(apply(&mut state, &catalog, &source, change));
                let maps = translator.translate(&catalog.current());
                assert_eq!(translator.last_translated(), 1);
                maps
            },
            BatchSize::SmallInput,
        );
    });
    drop((state, catalog, translator));

    let (mut state, catalog, source) = cluster();
    let mut translator = Translator::new(TranslateOptions::default());
    let cache = SnapshotCache::new();
    let snapshot = catalog.current();
    cache.publish(translator.translate(&snapshot), &snapshot);
    let mut flipper = Flipper::new();
    group.bench_function("apply_one_slice_event_translate_publish", |b| {
        b.iter_batched(
            || flipper.change(),
            |change| {
                assert!(apply(&mut state, &catalog, &source, change));
                let snapshot = catalog.current();
                assert!(cache.publish(translator.translate(&snapshot), &snapshot));
                black_box(cache.current().version)
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = slice_event
}
criterion_main!(benches);
