//! Criterion benchmarks of the proxy's hot structures.
//!
//! The routing snapshot is built the way the proxy builds it: a catalog of
//! 1,000 services, each with two cluster backends ("old", "new", split by
//! their endpoints, so two weighted clusters per route) of 10 endpoints,
//! translated by [`Translator`] into xDS resources, then
//! [`ferry_proxy::config::build`]. Benchmarks:
//!
//! - `route_and_pick`: one request's routing: the virtual host for its
//!   authority, the route, the weighted cluster and the endpoint (power of
//!   two choices); `route_and_pick_sticky` with a hash key instead;
//! - `snapshot_load_full`: what every request pays to read the current
//!   snapshot; `snapshot_store`: swapping a new snapshot in;
//! - `config_build_1000x2x10`: rebuilding the snapshot from the resources,
//!   what each accepted xDS update costs.
//!
//! Run with `cargo bench --bench proxy`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use ferry_discovery::Catalog;
use ferry_discovery::file::parse_catalog;
use ferry_proxy::config::{self, Routing, Upstream};
use ferry_proxy::{balance, pick};
use ferry_xds::client::Resources;
use ferry_xds::{TranslateOptions, Translator};

const SERVICES: usize = 1_000;
const CLUSTERS: [&str; 2] = ["old", "new"];
const ENDPOINTS_PER_BACKEND: usize = 10;

/// The catalog file: every endpoint on its own loopback address (data
/// only, never connected to).
fn catalog_yaml() -> String {
    let mut yaml = String::from("services:\n");
    let mut next = 0usize;
    for s in 0..SERVICES {
        let _ = write!(
            yaml,
            "  - name: svc-{s:04}\n    namespace: bench\n    ports: [{{name: http, port: 8080}}]\n    backends:\n"
        );
        for cluster in CLUSTERS {
            let endpoints: Vec<String> = (0..ENDPOINTS_PER_BACKEND)
                .map(|_| {
                    next += 1;
                    format!(
                        "\"127.{}.{}.{}:8080\"",
                        next >> 16,
                        (next >> 8) & 255,
                        next & 255
                    )
                })
                .collect();
            let _ = writeln!(
                yaml,
                "      {cluster}: {{endpoints: [{}]}}",
                endpoints.join(", ")
            );
        }
    }
    yaml
}

/// The xDS resources a proxy holds for the catalog, as its client keeps
/// them: per type, name → (version, body).
fn resources() -> Resources {
    let services = parse_catalog(Path::new("bench.yaml"), &catalog_yaml())
        .expect("the generated catalog is valid");
    let catalog = Catalog::new();
    catalog.replace(services);
    let maps = Translator::new(TranslateOptions::default()).translate(&catalog.current());
    maps.map(|by_name| {
        by_name
            .into_iter()
            .map(|(name, r)| (name, (r.version.clone(), r.body.clone())))
            .collect()
    })
}

fn routing(resources: &Resources) -> Routing {
    config::build(resources, &Routing::default()).expect("the translated resources are valid")
}

/// The endpoint pick of the request path (nothing ejected, no retry).
fn endpoint(upstream: &Upstream) -> Option<std::net::SocketAddr> {
    balance::pick(upstream, Instant::now(), 0, None).map(|e| e.addr)
}

/// One request's routing decision; the endpoint's address.
fn route(routing: &Routing, authority: &str, key: Option<&[u8]>) -> Option<std::net::SocketAddr> {
    let host = routing.virtual_host(authority)?;
    let route = host.routes.iter().find(|r| "/".starts_with(&r.prefix))?;
    let target = pick::cluster(&route.targets, key)?;
    endpoint(routing.upstreams.get(&target.cluster)?)
}

fn route_and_pick(c: &mut Criterion) {
    let routing = routing(&resources());
    let authority = format!("svc-{:04}.bench:8080", SERVICES / 2);
    assert!(route(&routing, &authority, None).is_some());
    c.bench_function("route_and_pick", |b| {
        b.iter(|| route(&routing, black_box(&authority), None));
    });
    c.bench_function("route_and_pick_sticky", |b| {
        b.iter(|| route(&routing, black_box(&authority), Some(black_box(b"user-42"))));
    });
}

fn snapshot_swap(c: &mut Criterion) {
    let resources = resources();
    let snapshots = [Arc::new(routing(&resources)), Arc::new(routing(&resources))];
    let current = ArcSwap::new(snapshots[0].clone());
    c.bench_function("snapshot_load_full", |b| {
        b.iter(|| black_box(current.load_full()));
    });
    let mut next = 0;
    c.bench_function("snapshot_store", |b| {
        b.iter(|| {
            next ^= 1;
            current.store(snapshots[next].clone());
        });
    });
    c.bench_function("config_build_1000x2x10", |b| {
        b.iter(|| routing(black_box(&resources)));
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = route_and_pick, snapshot_swap
}
criterion_main!(benches);
