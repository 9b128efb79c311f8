//! Criterion benchmarks of the catalog → xDS path at fleet scale.
//!
//! The catalog is built in memory (no YAML): 1,000 services, each with three
//! cluster backends of 30 endpoints (90,000 endpoints, 3,000 clusters and
//! load assignments, 1,000 virtual hosts). Two benchmarks:
//!
//! - `build_and_translate_1000x3x30`: what a cold start costs: publish every
//!   service into a fresh [`Catalog`], translate it with a fresh
//!   [`Translator`] and publish the result into a fresh [`SnapshotCache`];
//! - `one_endpoint_change`: what one readiness flip costs on a warm control
//!   plane: [`Catalog::replace`] with the source's whole service list, the
//!   incremental translation and the snapshot publish. As a source hands
//!   them, unchanged backends share their endpoint lists with the catalog
//!   and the changed backend is a new list;
//! - `one_endpoint_change_translation`: the same flip, with the catalog
//!   update left out of the timing: the incremental translation and the
//!   snapshot publish alone;
//! - `one_endpoint_change_reread`: the same flip from a source that reads
//!   everything again (the catalog file after an edit): every endpoint list
//!   is new and compared in full.
//!
//! Run with `cargo bench --bench translate`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ferry_discovery::{
    Backend, Catalog, ClusterName, Endpoint, EndpointState, Service, ServiceName, ServicePort,
};
use ferry_xds::{SnapshotCache, TranslateOptions, Translator};

const SERVICES: usize = 1_000;
const CLUSTERS: [&str; 3] = ["old", "new", "canary"];
const ENDPOINTS_PER_BACKEND: usize = 30;

/// A loopback address per endpoint index: data only, never connected to.
fn endpoint_ip(index: usize) -> IpAddr {
    let n = index + 1;
    IpAddr::V4(Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8))
}

fn catalog_services() -> Vec<Service> {
    let mut next_endpoint = 0;
    (0..SERVICES)
        .map(|s| {
            let backends = CLUSTERS
                .iter()
                .enumerate()
                .map(|(c, cluster)| {
                    let endpoints = (0..ENDPOINTS_PER_BACKEND)
                        .map(|_| {
                            next_endpoint += 1;
                            Endpoint {
                                ip: endpoint_ip(next_endpoint),
                                ports: BTreeMap::from([("http".to_owned(), 8080)]),
                                state: EndpointState::Ready,
                                zone: Some(format!("zone-{}", c % 2)),
                            }
                        })
                        .collect::<Vec<_>>();
                    let name = ClusterName::new(cluster).expect("valid cluster name");
                    (name, Backend::from(endpoints))
                })
                .collect();
            Service {
                name: ServiceName::new(&format!("svc-{s:04}"), "bench").expect("valid name"),
                ports: vec![ServicePort {
                    name: "http".to_owned(),
                    port: 8080,
                }],
                hosts: Vec::new(),
                backends,
                weights: None,
                sticky: None,
                requests: Default::default(),
            }
        })
        .collect()
}

/// Flips the readiness of the first endpoint of `service`'s `cluster`
/// backend. The backend gets a new list, as a source makes one for a
/// changed backend; the others keep theirs.
fn flip(service: &mut Service, cluster: &ClusterName) {
    let backend = service
        .backends
        .get_mut(cluster)
        .expect("the service has the backend");
    let mut endpoints = backend.endpoints.to_vec();
    endpoints[0].state = match endpoints[0].state {
        EndpointState::Ready => EndpointState::NotReady,
        _ => EndpointState::Ready,
    };
    *backend = Backend::from(endpoints);
}

/// `services` as a source that reads everything again makes them: every
/// endpoint list new.
fn reread(services: &[Service]) -> Vec<Service> {
    services
        .iter()
        .map(|s| {
            let mut s = s.clone();
            for backend in s.backends.values_mut() {
                *backend = Backend::from(backend.endpoints.to_vec());
            }
            s
        })
        .collect()
}

fn build_and_translate(c: &mut Criterion) {
    let services = catalog_services();
    c.bench_function("build_and_translate_1000x3x30", |b| {
        b.iter_batched(
            || services.clone(),
            |services| {
                let catalog = Catalog::new();
                catalog.replace(services);
                let snapshot = catalog.current();
                let mut translator = Translator::new(TranslateOptions::default());
                let cache = SnapshotCache::new();
                assert!(cache.publish(translator.translate(&snapshot), &snapshot));
                // Returned so that dropping them is not timed.
                (catalog, translator, cache)
            },
            BatchSize::PerIteration,
        );
    });
}

fn one_endpoint_change(c: &mut Criterion) {
    let mut services = catalog_services();
    let catalog = Catalog::new();
    let cache = SnapshotCache::new();
    let mut translator = Translator::new(TranslateOptions::default());
    catalog.replace(services.clone());
    let snapshot = catalog.current();
    cache.publish(translator.translate(&snapshot), &snapshot);

    // Flips the readiness of one endpoint of a service in the middle of the
    // catalog, back and forth, so every iteration is a real change.
    let target = SERVICES / 2;
    let old = ClusterName::new("old").expect("valid cluster name");
    c.bench_function("one_endpoint_change", |b| {
        b.iter_batched(
            || {
                flip(&mut services[target], &old);
                services.clone()
            },
            |services| {
                assert!(catalog.replace(services));
                let snapshot = catalog.current();
                let maps = translator.translate(&snapshot);
                assert!(cache.publish(maps, &snapshot));
                black_box(translator.last_translated())
            },
            BatchSize::PerIteration,
        );
    });
}

fn one_endpoint_change_translation(c: &mut Criterion) {
    let mut services = catalog_services();
    let catalog = Catalog::new();
    let cache = SnapshotCache::new();
    let mut translator = Translator::new(TranslateOptions::default());
    catalog.replace(services.clone());
    let snapshot = catalog.current();
    cache.publish(translator.translate(&snapshot), &snapshot);

    let target = SERVICES / 2;
    let old = ClusterName::new("old").expect("valid cluster name");
    c.bench_function("one_endpoint_change_translation", |b| {
        b.iter_batched(
            || {
                flip(&mut services[target], &old);
                assert!(catalog.replace(services.clone()));
                catalog.current()
            },
            |snapshot| {
                let maps = translator.translate(&snapshot);
                assert!(cache.publish(maps, &snapshot));
                black_box(translator.last_translated())
            },
            BatchSize::PerIteration,
        );
    });
}

fn one_endpoint_change_reread(c: &mut Criterion) {
    let mut services = catalog_services();
    let catalog = Catalog::new();
    let cache = SnapshotCache::new();
    let mut translator = Translator::new(TranslateOptions::default());
    catalog.replace(services.clone());
    let snapshot = catalog.current();
    cache.publish(translator.translate(&snapshot), &snapshot);

    let target = SERVICES / 2;
    let old = ClusterName::new("old").expect("valid cluster name");
    c.bench_function("one_endpoint_change_reread", |b| {
        b.iter_batched(
            || {
                flip(&mut services[target], &old);
                reread(&services)
            },
            |services| {
                assert!(catalog.replace(services));
                let snapshot = catalog.current();
                let maps = translator.translate(&snapshot);
                assert!(cache.publish(maps, &snapshot));
                black_box(translator.last_translated())
            },
            BatchSize::PerIteration,
        );
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = build_and_translate, one_endpoint_change, one_endpoint_change_translation,
        one_endpoint_change_reread
}
criterion_main!(benches);
