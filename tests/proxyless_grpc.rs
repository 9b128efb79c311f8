//! Proxyless gRPC end to end: the real Python gRPC client (PyPI's
//! `grpcio`, C-core's xDS resolver) resolving `xds:///checkout.shop:8080`
//! through a real `ferry control`, calling in-test tonic servers directly.
//!
//! grpcio speaks state-of-the-world ADS only (C-core has no delta xDS
//! client), so the splits are measured over SotW; delta is checked with a
//! delta ADS stream that subscribes as a gRPC client does and must get the
//! same resources, and follow a weight change as fast.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_proto::envoy::config::core::v3::Node;
use ferry_proto::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use ferry_proto::envoy::config::listener::v3::Listener;
use ferry_proto::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use ferry_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use ferry_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ferry_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{ClusterWeight, GetMigrationRequest, SetWeightsRequest};
use ferry_proto::type_url;
use futures::StreamExt;
use prost::Message;
use support::{Ads, CallOutcome, Calls, Envoy, Ferry, GrpcBackends, GrpcClient, eventually, tally};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const TARGET: &str = "checkout.shop:8080";

/// `checkout.shop`, a gRPC service on port 8080, with `old` and `new`
/// clusters holding the given backends, split by `weights`.
fn catalog(backends: &GrpcBackends, old: &[&str], new: &[&str], weights: (u32, u32)) -> String {
    let list = |labels: &[&str]| {
        labels
            .iter()
            .map(|l| format!("\"{}\"", backends.addr(l)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: grpc, port: 8080}}]\n    protocol: grpc\n    backends:\n      old: {{endpoints: [{}]}}\n      new: {{endpoints: [{}]}}\n    weights: {{old: {}, new: {}}}\n",
        list(old),
        list(new),
        weights.0,
        weights.1
    )
}

fn set_weights(old: u32, new: u32) -> SetWeightsRequest {
    SetWeightsRequest {
        service: "checkout.shop".into(),
        weights: [("old", old), ("new", new)]
            .into_iter()
            .map(|(c, bp)| ClusterWeight {
                cluster: c.into(),
                basis_points: bp,
            })
            .collect(),
        reason: "proxyless gRPC test".into(),
        ..Default::default()
    }
}

fn failures(calls: &[(Instant, CallOutcome)]) -> Vec<String> {
    calls
        .iter()
        .filter_map(|(_, c)| match c {
            CallOutcome::Failed(e) => Some(e.clone()),
            CallOutcome::Ok(_) => None,
        })
        .collect()
}

/// The client entries of Ferry's /status for `node`.
async fn client_status(ferry: &Ferry, node: &str) -> Vec<serde_json::Value> {
    let status = ferry.status().await;
    status["xds"]["clients"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["node_id"] == node).cloned().collect())
        .unwrap_or_default()
}

#[test]
fn grpc_bootstrap_prints_the_bootstrap_or_names_the_bad_flag() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("grpc-bootstrap")
            .args(args)
            .output()
            .expect("run ferry grpc-bootstrap")
    };
    let out = run(&[
        "--xds-addr",
        "ferry.ferry-system:18000",
        "--node-id",
        "n-1",
        "--zone",
        "a",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        json["xds_servers"][0]["server_uri"],
        "ferry.ferry-system:18000"
    );
    assert_eq!(
        json["xds_servers"][0]["channel_creds"],
        serde_json::json!([{"type": "insecure"}])
    );
    assert_eq!(
        json["xds_servers"][0]["server_features"],
        serde_json::json!(["xds_v3"])
    );
    assert_eq!(json["node"]["id"], "n-1");
    assert_eq!(json["node"]["locality"]["zone"], "a");
    for (args, needle) in [
        (
            &["--xds-addr", "ferry", "--node-id", "n"][..],
            "--xds-addr \"ferry\"",
        ),
        (
            &["--xds-addr", "ferry:18000", "--node-id", ""][..],
            "--node-id is empty",
        ),
        (&["--node-id", "n"][..], "--xds-addr"),
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(out.stdout.is_empty(), "{args:?} printed a bootstrap");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_clients_split_calls_80_20_over_sotw() {
    let backends = GrpcBackends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends, &["old/a"], &["new/a"], (8000, 2000))).await;

    // Every name the service answers to resolves.
    for (i, target) in [
        "checkout.shop",
        "checkout.shop.svc.cluster.local:8080",
        "checkout:8080",
    ]
    .into_iter()
    .enumerate()
    {
        let client = GrpcClient::proxyless(&ferry, &format!("names-{i}"), target, Calls::Count(5));
        let calls = client.finish(Duration::from_secs(60)).await;
        assert_eq!(calls.len(), 5, "{target}");
        assert!(failures(&calls).is_empty(), "{target}: {:?}", tally(&calls));
    }
    backends.reset_hits();

    let client = GrpcClient::proxyless(&ferry, "split-1", TARGET, Calls::Count(1000));
    // While it calls, Ferry shows it as a gRPC client, named subscriptions
    // and all, with nothing refused.
    let node = client.node_id.clone();
    let ferry_ref = &ferry;
    eventually(
        Duration::from_secs(30),
        "the gRPC client on /status",
        || {
            let node = node.clone();
            async move {
                client_status(ferry_ref, &node).await.iter().any(|c| {
                    c["client"] == "grpc"
                        && c["types"]["lds"]["names"] == serde_json::json!([TARGET])
                        && c["types"]["lds"]["wildcard"] == false
                        && c["types"]["cds"]["acked_version"].is_string()
                })
            }
        },
    )
    .await;
    let calls = client.finish(Duration::from_secs(120)).await;
    assert_eq!(calls.len(), 1000);
    assert!(failures(&calls).is_empty(), "{:?}", tally(&calls));
    let (old, new) = (backends.hits("old/a"), backends.hits("new/a"));
    assert_eq!(old + new, 1000, "each call reached one backend once");
    let share = new as f64 / 1000.0;
    assert!(
        (share - 0.20).abs() <= 0.05,
        "new got {new} of 1000 calls, not 20 % ± 5"
    );
    // What the client says it reached is what the servers counted.
    let said = tally(&calls);
    assert_eq!(said.get("new/a").copied().unwrap_or(0) as u64, new);
    for c in client_status(&ferry, "split-1").await {
        for kind in ["lds", "rds", "cds", "eds"] {
            assert_eq!(c["types"][kind]["nacks"], 0, "{kind}: {c}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_weight_change_through_the_api_is_followed_within_3s() {
    let backends = GrpcBackends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends, &["old/a"], &["new/a"], (10000, 0))).await;
    let client = GrpcClient::proxyless(
        &ferry,
        "follow-1",
        TARGET,
        Calls::For {
            duration: Duration::from_secs(40),
            interval: Duration::from_millis(10),
        },
    );
    eventually(Duration::from_secs(30), "calls on old", || async {
        client.calls().len() >= 50
    })
    .await;
    let mut api = TrafficClient::new(support::api_channel(&ferry).await);
    for (old, new, to) in [(0, 10_000, "new/a"), (10_000, 0, "old/a")] {
        let from = if to == "new/a" { "old/a" } else { "new/a" };
        api.set_weights(set_weights(old, new))
            .await
            .expect("set weights");
        let set_at = Instant::now();
        // Followed: every call after some moment goes to `to`, and that
        // moment comes within 3 s of the change.
        eventually(
            Duration::from_secs(3),
            "calls follow the new weights",
            || {
                let calls = client.calls();
                async move {
                    let after: Vec<&CallOutcome> = calls
                        .iter()
                        .filter(|(at, _)| *at > set_at)
                        .map(|(_, c)| c)
                        .collect();
                    after.len() >= 20
                        && after[after.len() - 20..]
                            .iter()
                            .all(|c| c.label() == Some(to))
                }
            },
        )
        .await;
        let followed_in = set_at.elapsed();
        let calls = client.calls();
        let last_on_old = calls
            .iter()
            .filter(|(_, c)| c.label() == Some(from))
            .map(|(at, _)| *at)
            .max()
            .expect("calls before the change");
        assert!(
            last_on_old.saturating_duration_since(set_at) <= Duration::from_secs(3),
            "calls to {from} went on {:?} after the change",
            last_on_old.saturating_duration_since(set_at)
        );
        eprintln!("weights to {to}: followed within {followed_in:?}");
    }
    let calls = client.calls();
    assert!(failures(&calls).is_empty(), "{:?}", tally(&calls));
    // The client reports its load to Ferry (its clusters name Ferry as
    // their LRS server), so gates count gRPC calls; it is the only client.
    let made = calls.len() as f64;
    let ferry_ref = &ferry;
    eventually(
        Duration::from_secs(15),
        "gRPC load reports",
        || async move {
            let metrics = ferry_ref.metrics().await;
            support::metric_sum(&metrics, "ferry_lrs_requests_total", "outcome=\"total\"")
                >= made * 0.5
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_endpoint_gets_no_calls() {
    let backends = GrpcBackends::start(&["old/a", "old/b", "new/a"]).await;
    let ferry = Ferry::start(&catalog(
        &backends,
        &["old/a", "old/b"],
        &["new/a"],
        (10000, 0),
    ))
    .await;
    let client = GrpcClient::proxyless(
        &ferry,
        "removal-1",
        TARGET,
        Calls::For {
            duration: Duration::from_secs(40),
            interval: Duration::from_millis(10),
        },
    );
    eventually(
        Duration::from_secs(30),
        "both old endpoints called",
        || async { backends.hits("old/a") > 10 && backends.hits("old/b") > 10 },
    )
    .await;
    ferry.write_catalog(&catalog(&backends, &["old/a"], &["new/a"], (10000, 0)));
    let removed_at = Instant::now();
    eventually(
        Duration::from_secs(5),
        "old/b out of the client's calls",
        || async {
            let after: Vec<_> = client
                .calls()
                .into_iter()
                .filter(|(at, _)| *at > removed_at)
                .collect();
            after.len() >= 30
                && after[after.len() - 30..]
                    .iter()
                    .all(|(_, c)| c.label() == Some("old/a"))
        },
    )
    .await;
    let settled = backends.hits("old/b");
    let seen = client.calls().len();
    eventually(Duration::from_secs(20), "200 more calls", || async {
        client.calls().len() >= seen + 200
    })
    .await;
    assert_eq!(
        backends.hits("old/b"),
        settled,
        "the removed endpoint was called"
    );
    let calls = client.calls();
    assert!(
        calls[seen..]
            .iter()
            .all(|(_, c)| c.label() == Some("old/a"))
    );
    assert!(failures(&calls).is_empty(), "{:?}", tally(&calls));
}

/// A raw ADS stream, to subscribe as a gRPC client does.
struct Stream<Req, Resp> {
    _client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    tx: mpsc::Sender<Req>,
    rx: tonic::Streaming<Resp>,
}

const WAIT: Duration = Duration::from_secs(10);

async fn ads_client(ferry: &Ferry) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{}", ferry.xds_port))
        .await
        .expect("connect to ferry's xDS port")
}

impl Stream<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
    async fn delta(ferry: &Ferry) -> Self {
        let mut client = ads_client(ferry).await;
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("DeltaAggregatedResources")
            .into_inner();
        Self {
            _client: client,
            tx,
            rx,
        }
    }
}

impl Stream<DiscoveryRequest, DiscoveryResponse> {
    async fn sotw(ferry: &Ferry) -> Self {
        let mut client = ads_client(ferry).await;
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("StreamAggregatedResources")
            .into_inner();
        Self {
            _client: client,
            tx,
            rx,
        }
    }
}

impl<Req, Resp> Stream<Req, Resp> {
    async fn send(&self, request: Req) {
        self.tx.send(request).await.expect("send request");
    }

    async fn recv(&mut self, what: &str) -> Resp {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("the stream ended while waiting for {what}"),
            Ok(Err(status)) => panic!("the stream failed while waiting for {what}: {status}"),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }
}

fn delta_request(
    node: Option<Node>,
    url: &str,
    names: &[String],
    nonce: &str,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: url.to_owned(),
        resource_names_subscribe: names.to_vec(),
        response_nonce: nonce.to_owned(),
        ..Default::default()
    }
}

fn route_config_name(listener: &Listener) -> String {
    let api = listener
        .api_listener
        .as_ref()
        .and_then(|a| a.api_listener.as_ref())
        .expect("api_listener");
    let hcm = HttpConnectionManager::decode(api.value.as_slice()).expect("HCM");
    match hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => rds.route_config_name,
        other => panic!("routes not by RDS: {other:?}"),
    }
}

fn split_of(rc: &RouteConfiguration) -> BTreeMap<String, u32> {
    let Some(route::Action::Route(action)) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("no route action")
    };
    let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) = &action.cluster_specifier
    else {
        panic!("no weighted clusters")
    };
    wc.clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
        .collect()
}

fn endpoints_of(cla: &ClusterLoadAssignment) -> Vec<String> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(e)) => {
                e.address.as_ref().map(|a| format!("{a:?}"))
            }
            _ => None,
        })
        .collect()
}

/// Resolves `TARGET` over SotW as grpcio does (named LDS, then RDS, CDS,
/// EDS by the names each response gives), as a node that says it is gRPC;
/// every resource it got, by type URL then name.
async fn sotw_resolve(ferry: &Ferry) -> BTreeMap<(String, String), Vec<u8>> {
    let mut ads = Stream::sotw(ferry).await;
    let mut got = BTreeMap::new();
    let mut names = vec![TARGET.to_owned()];
    let node = Some(Node {
        id: "sotw-grpc".into(),
        user_agent_name: "gRPC C-core linux Python".into(),
        ..Default::default()
    });
    for url in [
        type_url::LISTENER,
        type_url::ROUTE,
        type_url::CLUSTER,
        type_url::ENDPOINT,
    ] {
        ads.send(DiscoveryRequest {
            node: (url == type_url::LISTENER).then(|| node.clone()).flatten(),
            type_url: url.into(),
            resource_names: names.clone(),
            ..Default::default()
        })
        .await;
        let r = ads.recv(url).await;
        assert_eq!(r.type_url, url);
        let mut next = Vec::new();
        for any in &r.resources {
            let name = match url {
                type_url::LISTENER => {
                    let l = Listener::decode(any.value.as_slice()).unwrap();
                    next.push(route_config_name(&l));
                    l.name
                }
                type_url::ROUTE => {
                    let rc = RouteConfiguration::decode(any.value.as_slice()).unwrap();
                    next.extend(split_of(&rc).into_keys());
                    rc.name
                }
                type_url::CLUSTER => {
                    let c = ferry_proto::envoy::config::cluster::v3::Cluster::decode(
                        any.value.as_slice(),
                    )
                    .unwrap();
                    next.push(c.name.clone());
                    c.name
                }
                _ => {
                    ClusterLoadAssignment::decode(any.value.as_slice())
                        .unwrap()
                        .cluster_name
                }
            };
            got.insert((url.to_owned(), name), any.value.clone());
        }
        names = next;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_serves_a_grpc_subscription_the_same_resources_and_follows_changes() {
    let backends = GrpcBackends::start(&["old/a", "old/b", "new/a"]).await;
    let ferry = Ferry::start(&catalog(
        &backends,
        &["old/a", "old/b"],
        &["new/a"],
        (8000, 2000),
    ))
    .await;
    let sotw = sotw_resolve(&ferry).await;

    // A delta client that names no user agent: its named Listener
    // subscription is what makes it a gRPC client.
    let mut ads = Stream::delta(&ferry).await;
    let mut got: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    let mut names = vec![TARGET.to_owned()];
    let node = Some(Node {
        id: "delta-grpc".into(),
        ..Default::default()
    });
    for url in [
        type_url::LISTENER,
        type_url::ROUTE,
        type_url::CLUSTER,
        type_url::ENDPOINT,
    ] {
        let first = url == type_url::LISTENER;
        ads.send(delta_request(
            first.then(|| node.clone()).flatten(),
            url,
            &names,
            "",
        ))
        .await;
        let r = ads.recv(url).await;
        assert_eq!(r.type_url, url);
        assert!(r.removed_resources.is_empty(), "{:?}", r.removed_resources);
        ads.send(delta_request(None, url, &[], &r.nonce)).await;
        let mut next = Vec::new();
        for res in &r.resources {
            let body = res.resource.as_ref().expect("body").value.clone();
            match url {
                type_url::LISTENER => next.push(route_config_name(
                    &Listener::decode(body.as_slice()).unwrap(),
                )),
                type_url::ROUTE => next.extend(
                    split_of(&RouteConfiguration::decode(body.as_slice()).unwrap()).into_keys(),
                ),
                type_url::CLUSTER => next.push(res.name.clone()),
                _ => {}
            }
            got.insert((url.to_owned(), res.name.clone()), body);
        }
        names = next;
    }
    assert_eq!(got, sotw, "delta and SotW serve gRPC clients the same");
    let route_key = (type_url::ROUTE.to_owned(), TARGET.to_owned());
    let rc = RouteConfiguration::decode(got[&route_key].as_slice()).unwrap();
    assert_eq!(
        split_of(&rc),
        BTreeMap::from([
            ("checkout.shop:8080@new".to_owned(), 2000),
            ("checkout.shop:8080@old".to_owned(), 8000),
        ])
    );
    let status = client_status(&ferry, "delta-grpc").await;
    assert_eq!(status.len(), 1);
    assert_eq!(status[0]["client"], "grpc");
    assert_eq!(status[0]["variant"], "delta");

    // A weight change through the API arrives within 3 s, as the route
    // alone.
    let mut api = TrafficClient::new(support::api_channel(&ferry).await);
    api.set_weights(set_weights(0, 10_000))
        .await
        .expect("set weights");
    let set_at = Instant::now();
    let update = ads.recv("the new route").await;
    assert!(
        set_at.elapsed() <= Duration::from_secs(3),
        "{:?}",
        set_at.elapsed()
    );
    assert_eq!(update.type_url, type_url::ROUTE);
    assert_eq!(update.resources.len(), 1);
    let rc = RouteConfiguration::decode(
        update.resources[0]
            .resource
            .as_ref()
            .expect("body")
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!(
        split_of(&rc),
        BTreeMap::from([("checkout.shop:8080@new".to_owned(), 10_000)])
    );
    ads.send(delta_request(None, type_url::ROUTE, &[], &update.nonce))
        .await;

    // A removed endpoint leaves its load assignment.
    ferry.write_catalog(&catalog(&backends, &["old/a"], &["new/a"], (0, 10000)));
    let update = ads.recv("endpoints without old/b").await;
    assert_eq!(update.type_url, type_url::ENDPOINT);
    let cla = ClusterLoadAssignment::decode(
        update.resources[0]
            .resource
            .as_ref()
            .expect("body")
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!(cla.cluster_name, "checkout.shop:8080@old");
    let left = endpoints_of(&cla);
    let port_b = backends.addrs["old/b"].port().to_string();
    let port_a = backends.addrs["old/a"].port().to_string();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].contains(&port_a) && !left[0].contains(&port_b),
        "{left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_moves_grpc_clients_and_envoy_together_without_a_failed_call() {
    let backends = GrpcBackends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends, &["old/a"], &["new/a"], (10000, 0))).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    let steady = |node: &str| {
        GrpcClient::proxyless(
            &ferry,
            node,
            TARGET,
            Calls::For {
                duration: Duration::from_secs(90),
                interval: Duration::from_millis(10),
            },
        )
    };
    let proxyless = [steady("migrate-1"), steady("migrate-2")];
    // The same service through Envoy, called by the same gRPC client.
    let via_envoy = GrpcClient::through_proxy(
        envoy.listener_port,
        TARGET,
        Calls::For {
            duration: Duration::from_secs(90),
            interval: Duration::from_millis(10),
        },
    );
    eventually(
        Duration::from_secs(30),
        "every client calling old",
        || async {
            proxyless.iter().chain([&via_envoy]).all(|c| {
                c.calls()
                    .iter()
                    .filter(|(_, c)| c.label() == Some("old/a"))
                    .count()
                    >= 20
            })
        },
    )
    .await;
    // Ferry tells them apart: the gRPC clients by their user agent, Envoy
    // as a proxy.
    for node in ["migrate-1", "migrate-2"] {
        let s = client_status(&ferry, node).await;
        assert!(
            !s.is_empty() && s.iter().all(|c| c["client"] == "grpc"),
            "{s:?}"
        );
    }
    let s = client_status(&ferry, &envoy.node_id).await;
    assert!(
        !s.is_empty() && s.iter().all(|c| c["client"] == "proxy"),
        "{s:?}"
    );

    let mut api = MigrationsClient::new(support::api_channel(&ferry).await);
    let created = api
        .create_migration(support::migration_plan(&[10.0, 50.0, 100.0], "3s"))
        .await
        .expect("create migration")
        .into_inner();
    let mut watch = api
        .watch_migration(GetMigrationRequest {
            id: created.id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(75);
    let mut updates = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, watch.next()).await {
        let ended = matches!(m.stage.as_str(), "DONE" | "ROLLED_BACK" | "FAILED");
        updates.push((Instant::now(), m));
        if ended {
            break;
        }
    }
    let last = &updates.last().expect("migration updates").1;
    assert_eq!(last.stage, "DONE", "{last:?}\n{}", ferry.log());
    let done_at = updates.last().map(|(at, _)| *at).expect("updates");
    // After it ends, every client's calls go to new.
    eventually(Duration::from_secs(5), "every client on new", || async {
        proxyless.iter().chain([&via_envoy]).all(|c| {
            let calls = c.calls();
            let after: Vec<_> = calls.iter().filter(|(at, _)| *at > done_at).collect();
            after.len() >= 20
                && after[after.len() - 20..]
                    .iter()
                    .all(|(_, c)| c.label() == Some("new/a"))
        })
    })
    .await;

    // Each step's share shows in the proxyless clients' calls while it
    // bakes.
    let mut windows = BTreeMap::new();
    for (i, (at, m)) in updates.iter().enumerate() {
        if m.stage == "SHIFT" && m.phase == "BAKING" && !windows.contains_key(&m.step) {
            let end = updates[i + 1..]
                .iter()
                .find(|(_, n)| n.step != m.step || n.phase != "BAKING" || n.stage != "SHIFT")
                .map(|(t, _)| *t)
                .unwrap_or(*at);
            windows.insert(m.step, (*at, end));
        }
    }
    assert_eq!(windows.len(), 3, "three steps baked: {windows:?}");
    let all: Vec<(Instant, CallOutcome)> = proxyless.iter().flat_map(|c| c.calls()).collect();
    for (step, expected) in [(0u32, 0.10), (1, 0.50), (2, 1.0)] {
        let (from, to) = windows[&step];
        let window: Vec<_> = all
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .collect();
        let on_new = window
            .iter()
            .filter(|(_, c)| c.label() == Some("new/a"))
            .count();
        let measured = on_new as f64 / window.len().max(1) as f64;
        assert!(window.len() >= 200, "step {step}: {} calls", window.len());
        assert!(
            (measured - expected).abs() <= 0.06,
            "step {step}: new got {measured:.3} of {} calls, expected {expected}",
            window.len()
        );
    }
    // The gates judged real load, gRPC clients' reports among it.
    for g in &last.gates {
        assert_eq!(g.outcome, "pass", "{g:?}");
    }

    // Not one failed call, proxyless or through Envoy.
    for client in proxyless.into_iter().chain([via_envoy]) {
        let calls = client.stop().await;
        assert!(calls.len() > 500, "{} calls", calls.len());
        let failed = failures(&calls);
        assert!(
            failed.is_empty(),
            "{} of {} calls failed: {:?}",
            failed.len(),
            calls.len(),
            &failed[..failed.len().min(5)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_resolves_over_mutual_tls_only_as_its_own_node() {
    let backends = GrpcBackends::start(&["old/a", "new/a"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server_ca = support::ca("ferry-xds-ca");
    let (cert, key) = support::leaf(&server_ca, "ferry-control");
    let fleet = support::ca("fleet-ca");
    let (client_cert, client_key) = support::leaf(&fleet, "grpc-1");
    let path =
        |name: &str, text: &str| support::write(dir.path(), name, text).display().to_string();
    let flags = [
        "--xds-tls-cert".to_owned(),
        path("xds.pem", &cert),
        "--xds-tls-key".to_owned(),
        path("xds.key", &key),
        "--xds-client-ca".to_owned(),
        path("fleet-ca.pem", &fleet.pem),
        "--xds-auth".to_owned(),
        path(
            "xds-auth.yaml",
            "clients:\n  - {identity: grpc-1, nodes: [grpc-1]}\n",
        ),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ferry = Ferry::start_with(
        &catalog(&backends, &["old/a"], &["new/a"], (10_000, 0)),
        &flags,
    )
    .await;
    let tls = [
        "--xds-ca".to_owned(),
        path("xds-ca.pem", &server_ca.pem),
        "--xds-cert".to_owned(),
        path("grpc-1.pem", &client_cert),
        "--xds-key".to_owned(),
        path("grpc-1.key", &client_key),
    ];
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();

    // Its own node, over mutual TLS: every call reaches the service, and
    // /status shows who the stream authenticated as.
    let client = GrpcClient::proxyless_with(
        &ferry,
        "grpc-1",
        TARGET,
        Calls::For {
            duration: Duration::from_secs(30),
            interval: Duration::from_millis(20),
        },
        &[],
        &tls,
    );
    eventually(
        Duration::from_secs(20),
        "grpc-1's calls and identity",
        || async {
            let status = client_status(&ferry, "grpc-1").await;
            client.calls().len() >= 20 && status.iter().any(|c| c["identity"] == "grpc-1")
        },
    )
    .await;
    let calls = client.stop().await;
    assert!(failures(&calls).is_empty(), "{:?}", tally(&calls));
    assert_eq!(
        tally(&calls).get("old/a"),
        Some(&calls.len()),
        "{:?}",
        tally(&calls)
    );

    // The same certificate claiming another node: refused, nothing served.
    let denied = |m: &str| {
        support::metric_sum(
            m,
            "ferry_xds_auth_denied_total",
            "reason=\"node_not_allowed\"",
        )
    };
    let before = denied(&ferry.metrics().await);
    let client = GrpcClient::proxyless_with(&ferry, "grpc-2", TARGET, Calls::Count(1), &[], &tls);
    eventually(Duration::from_secs(20), "grpc-2 refused", || async {
        denied(&ferry.metrics().await) > before
    })
    .await;
    let calls = client.stop().await;
    assert!(
        calls
            .iter()
            .all(|(_, c)| matches!(c, CallOutcome::Failed(_))),
        "{calls:?}"
    );
    assert!(client_status(&ferry, "grpc-2").await.is_empty());
}
