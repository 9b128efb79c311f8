//! `ferry proxy` end to end: config from a real Ferry control plane (or an
//! in-test ADS server for refused config), real sockets, in-test backends.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{ClusterWeight, SetWeightsRequest};
use ferry_xds::status::ClientRegistry;
use ferry_xds::{AdsServer, Resource, ResourceType, SnapshotCache, TranslateOptions, Translator};
use prost::Message;
use support::{Backends, Ferry, FerryProxy, eventually, http_get, share, split};
use tokio_util::sync::CancellationToken;

const HOST: &str = "checkout.shop";

fn catalog(backends: &Backends, old: u32, new: u32) -> String {
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new: {{endpoints: [\"{}\"]}}\n    weights: {{old: {old}, new: {new}}}\n",
        backends.addr("old/a"),
        backends.addr("new/a")
    )
}

async fn set_weights(ferry: &Ferry, old: u32, new: u32) {
    let mut api = TrafficClient::connect(format!("http://127.0.0.1:{}", ferry.api_port))
        .await
        .expect("api");
    api.set_weights(SetWeightsRequest {
        service: HOST.into(),
        weights: vec![
            ClusterWeight {
                cluster: "old".into(),
                basis_points: old,
            },
            ClusterWeight {
                cluster: "new".into(),
                basis_points: new,
            },
        ],
        reason: "proxy test".into(),
        ..Default::default()
    })
    .await
    .expect("set weights");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_splits_by_weight_and_follows_changes_within_two_seconds() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends, 9_000, 1_000)).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let counts = split(proxy.listen_port, HOST, 2_000).await;
    let new = share(&counts, "new/");
    assert!(
        (new - 0.10).abs() <= 0.03,
        "new got {new:.3}: {counts:?}\n{}",
        proxy.log()
    );
    assert_eq!(
        counts.values().sum::<usize>(),
        counts.get("old/a").unwrap_or(&0) + counts.get("new/a").unwrap_or(&0),
        "{counts:?}"
    );

    // The control plane sees the proxy as an xDS client that ACKed.
    let status = ferry.status().await;
    let client = status["xds"]["clients"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["node_id"] == proxy.node_id.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("proxy not among clients: {status}"));
    assert_eq!(client["variant"], "delta");
    assert!(
        client["types"]["rds"]["acked_version"].is_string(),
        "{client}"
    );

    // A weight change reaches the proxy within 2 s.
    set_weights(&ferry, 0, 10_000).await;
    let changed = Instant::now();
    eventually(Duration::from_secs(2), "all traffic on new", || async {
        share(&split(proxy.listen_port, HOST, 20).await, "new/") == 1.0
    })
    .await;
    assert!(changed.elapsed() < Duration::from_secs(2));

    // Unknown hosts get a clear local reply.
    let (code, body) = http_get(proxy.listen_port, "nope.example", "/")
        .await
        .expect("get");
    assert_eq!(code, 404);
    assert!(body.contains("nope.example"), "{body}");
    let metrics = proxy.admin("/metrics").await;
    assert!(
        metrics.contains(
            "ferry_proxy_requests_total{service=\"checkout.shop\",cluster=\"new\",class=\"2xx\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferry_proxy_request_duration_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_keeps_serving_without_its_control_plane_and_converges_on_return() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let mut ferry = Ferry::start(&catalog(&backends, 10_000, 0)).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    assert_eq!(
        share(&split(proxy.listen_port, HOST, 50).await, "old/"),
        1.0
    );

    ferry.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = split(proxy.listen_port, HOST, 200).await;
    assert_eq!(
        counts.get("old/a"),
        Some(&200),
        "served from the last config: {counts:?}"
    );
    let (code, _) = http_get(proxy.admin_port, "localhost", "/ready")
        .await
        .expect("ready");
    assert_eq!(code, 200, "still ready without a control plane");

    // The catalog changes while the proxy is cut off; on return it converges.
    ferry.write_catalog(&catalog(&backends, 0, 10_000));
    ferry.restart().await;
    eventually(
        Duration::from_secs(15),
        "converged after the restart",
        || async { share(&split(proxy.listen_port, HOST, 20).await, "new/") == 1.0 },
    )
    .await;
}

/// An in-test ADS server (Ferry's own, fed by hand) for config Ferry's
/// control plane would never send.
struct HandServer {
    port: u16,
    cache: Arc<SnapshotCache>,
    clients: Arc<ClientRegistry>,
    cancel: CancellationToken,
}

impl HandServer {
    async fn start() -> Self {
        let cache = Arc::new(SnapshotCache::new());
        let clients = Arc::new(ClientRegistry::default());
        let cancel = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let ads = AdsServer::new(cache.clone(), clients.clone(), cancel.clone());
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let shutdown = cancel.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ads.into_service())
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await;
        });
        Self {
            port,
            cache,
            clients,
            cancel,
        }
    }

    /// Publishes the catalog's translation, with `edit` applied to the
    /// route configuration.
    fn publish(&self, yaml: &str, edit: impl FnOnce(&mut RouteConfiguration)) {
        let catalog = ferry_discovery::Catalog::new();
        catalog.replace(
            ferry_discovery::file::parse_catalog(Path::new("hand.yaml"), yaml).expect("catalog"),
        );
        let snapshot = catalog.current();
        let mut maps = Translator::new(TranslateOptions::default()).translate(&snapshot);
        let routes = &mut maps[ResourceType::Route.index()];
        let (name, resource) = routes
            .iter()
            .next()
            .map(|(n, r)| (n.clone(), r.clone()))
            .expect("route");
        let mut config =
            RouteConfiguration::decode(resource.body.value.as_slice()).expect("decode");
        edit(&mut config);
        routes.insert(name.clone(), Arc::new(Resource::new(name, &config)));
        self.cache.publish(maps, &snapshot);
    }
}

impl Drop for HandServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_config_is_nacked_with_a_reason_and_the_old_config_keeps_serving() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let server = HandServer::start().await;
    server.publish(&catalog(&backends, 10_000, 0), |_| {});
    let proxy = FerryProxy::start(server.port).await;
    assert_eq!(
        share(&split(proxy.listen_port, HOST, 20).await, "old/"),
        1.0
    );

    // Every weight zero: the proxy must refuse the route configuration.
    server.publish(&catalog(&backends, 0, 10_000), |config| {
        for vh in &mut config.virtual_hosts {
            for r in &mut vh.routes {
                if let Some(route::Action::Route(action)) = &mut r.action
                    && let Some(route_action::ClusterSpecifier::WeightedClusters(w)) =
                        &mut action.cluster_specifier
                {
                    for c in &mut w.clusters {
                        c.weight = Some(ferry_proto::google::protobuf::UInt32Value { value: 0 });
                    }
                }
            }
        }
    });
    let clients = server.clients.clone();
    eventually(Duration::from_secs(5), "route NACKed", || {
        let clients = clients.clone();
        async move {
            clients
                .snapshot()
                .iter()
                .any(|c| c.types.get("rds").is_some_and(|t| t.nacks > 0))
        }
    })
    .await;
    let nack = server.clients.snapshot()[0].types["rds"]
        .last_nack
        .clone()
        .expect("nack");
    assert!(
        nack.message.contains("weighted_clusters")
            && nack.message.contains("sum to 0")
            && nack.message.contains("checkout.shop"),
        "the reason names the resource and field: {}",
        nack.message
    );
    // The old routes keep serving.
    let counts: BTreeMap<String, usize> = split(proxy.listen_port, HOST, 100).await;
    assert_eq!(counts.get("old/a"), Some(&100), "{counts:?}");
    let dump: serde_json::Value =
        serde_json::from_str(&proxy.admin("/config_dump").await).expect("json");
    assert_eq!(dump["route_config"], "ferry_http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_without_losing_an_in_flight_request() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    backends.set_delay("old/a", 1_500);
    let ferry = Ferry::start(&catalog(&backends, 10_000, 0)).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let port = proxy.listen_port;
    // Ten slow requests in flight, each on its own connection.
    let in_flight: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { http_get(port, HOST, "/").await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pid = proxy.pid().expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No new connections once draining.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the listener still accepts while draining\n{}",
        proxy.log()
    );
    for request in in_flight {
        let answer = request.await.expect("task");
        assert!(
            matches!(&answer, Ok((200, body)) if body == "old/a"),
            "{answer:?}\n{}",
            proxy.log()
        );
    }
    eventually(Duration::from_secs(10), "proxy exited", || async {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    })
    .await;
    assert!(
        proxy.log().contains("all connections finished"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_gates_read_the_proxys_load_reports() {
    use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
    use ferry_proto::ferry::v1::{CreateMigrationRequest, GetMigrationRequest};
    let backends = Backends::start(&["old/a", "new/a"]).await;
    backends.set_status("new/a", 503);
    let ferry = Ferry::start(&catalog(&backends, 10_000, 0)).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let steady = support::Steady::start_for(proxy.listen_port, HOST, Duration::from_secs(45));
    let mut api = MigrationsClient::connect(format!("http://127.0.0.1:{}", ferry.api_port))
        .await
        .expect("api");
    let created = api
        .create_migration(CreateMigrationRequest {
            reason: "proxy load reports".into(),
            ..support::migration_plan(&[20.0, 100.0], "20s")
        })
        .await
        .expect("create")
        .into_inner();
    let mut last = None;
    for _ in 0..300 {
        let m = api
            .get_migration(GetMigrationRequest {
                id: created.id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        if matches!(m.stage.as_str(), "ROLLED_BACK" | "DONE" | "FAILED") {
            last = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = steady.stop().await;
    let last = last.unwrap_or_else(|| panic!("never ended\n{}", ferry.log()));
    assert_eq!(last.stage, "ROLLED_BACK", "{last:?}");
    let gate = last.gates.last().expect("gate");
    assert!(
        gate.target_errors >= 20 && gate.source_requests >= 20,
        "{gate:?}"
    );
    assert!(
        proxy
            .admin("/metrics")
            .await
            .contains("ferry_proxy_load_reports_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unready_endpoints_get_no_traffic() {
    let backends = Backends::start_at(&[
        ("old/a", "127.0.0.1"),
        ("old/b", "127.0.0.2"),
        ("new/a", "127.0.0.3"),
    ])
    .await;
    let yaml = |b_ready: bool| {
        format!(
            "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\", {{address: \"{}\", ready: {b_ready}}}]}}\n      new: {{endpoints: [\"{}\"]}}\n    weights: {{old: 10000, new: 0}}\n",
            backends.addr("old/a"),
            backends.addr("old/b"),
            backends.addr("new/a")
        )
    };
    let ferry = Ferry::start(&yaml(true)).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    eventually(
        Duration::from_secs(5),
        "both old endpoints used",
        || async {
            let c = split(proxy.listen_port, HOST, 40).await;
            c.contains_key("old/a") && c.contains_key("old/b")
        },
    )
    .await;
    ferry.write_catalog(&yaml(false));
    // The update is seen in the proxy's config (traffic alone could miss
    // b just because the balancer prefers a for a while).
    eventually(
        Duration::from_secs(2),
        "old/b out of the proxy's config",
        || async {
            let dump: serde_json::Value =
                serde_json::from_str(&proxy.admin("/config_dump").await).unwrap_or_default();
            dump["upstreams"]["checkout.shop:8080@old"]
                .as_array()
                .is_some_and(|e| e.len() == 1)
        },
    )
    .await;
    let counts = split(proxy.listen_port, HOST, 200).await;
    assert_eq!(counts.get("old/a"), Some(&200), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_keys_move_to_the_target_once_and_never_back() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let yaml = format!(
        "{}    sticky: {{header: x-user}}\n",
        catalog(&backends, 10_000, 0)
    );
    let ferry = Ferry::start(&yaml).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let client = support::client();
    let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let mut previous: BTreeMap<String, String> = BTreeMap::new();
    let route_version = |dump: String| -> String {
        serde_json::from_str::<serde_json::Value>(&dump)
            .map(|d| d["versions"]["rds"]["ferry_http"].to_string())
            .unwrap_or_default()
    };
    for new_bp in [0u32, 1_000, 3_000, 6_000, 10_000] {
        let before = route_version(proxy.admin("/config_dump").await);
        set_weights(&ferry, 10_000 - new_bp, new_bp).await;
        if new_bp > 0 {
            // Measure only once the proxy holds the routes of this step.
            let admin = proxy.admin_port;
            eventually(
                Duration::from_secs(3),
                "the proxy holds the new routes",
                || {
                    let before = before.clone();
                    async move {
                        let dump = http_get(admin, "localhost", "/config_dump")
                            .await
                            .map(|(_, b)| b)
                            .unwrap_or_default();
                        route_version(dump) != before
                    }
                },
            )
            .await;
        }
        let mut now = BTreeMap::new();
        for user in &users {
            // The same key lands on the same cluster every time.
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (_, body) = support::http_get_headers(
                    &client,
                    proxy.listen_port,
                    HOST,
                    "/",
                    &[("x-user", user)],
                )
                .await
                .expect("get");
                seen.push(body);
            }
            assert_eq!(
                seen[0], seen[1],
                "{user} moved between two requests at {new_bp} bp"
            );
            now.insert(user.clone(), seen[0].clone());
        }
        for (user, was) in &previous {
            assert!(
                !(was == "new/a" && now[user] == "old/a"),
                "{user} went back to old at {new_bp} bp"
            );
        }
        let share_new = now.values().filter(|b| *b == "new/a").count() as f64 / users.len() as f64;
        assert!(
            (share_new - f64::from(new_bp) / 10_000.0).abs() <= 0.08,
            "{share_new:.3} of keys on new at {new_bp} bp"
        );
        previous = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_keeps_each_user_on_one_cluster() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let yaml = format!(
        "{}    sticky: {{cookie: session}}\n",
        catalog(&backends, 5_000, 5_000)
    );
    let ferry = Ferry::start(&yaml).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let client = support::client();
    let port = proxy.listen_port;
    eventually(Duration::from_secs(10), "routes in the proxy", || async {
        matches!(http_get(port, HOST, "/").await, Ok((200, _)))
    })
    .await;
    let mut on_new = 0;
    for user in 0..100 {
        let cookie = format!("theme=dark; session=user-{user}");
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..5 {
            let (status, body) =
                support::http_get_headers(&client, port, HOST, "/", &[("cookie", &cookie)])
                    .await
                    .expect("request");
            assert_eq!(status, 200);
            seen.insert(body);
        }
        assert_eq!(
            seen.len(),
            1,
            "user {user} moved between clusters: {seen:?}"
        );
        if seen.contains("new/a") {
            on_new += 1;
        }
    }
    assert!((30..=70).contains(&on_new), "{on_new} of 100 users on new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_sees_who_asked_and_no_hop_by_hop_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let ferry = Ferry::start(&catalog(&backends, 10_000, 0)).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    eventually(Duration::from_secs(10), "routes in the proxy", || async {
        matches!(http_get(proxy.listen_port, HOST, "/").await, Ok((200, _)))
    })
    .await;
    // Written by hand, so the client library adds nothing of its own.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.listen_port))
        .await
        .unwrap();
    tcp.write_all(
        format!(
            "GET /cart HTTP/1.1\r\nhost: {HOST}\r\nconnection: close, x-secret\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\nte: gzip\r\nx-forwarded-for: 203.0.113.9\r\nforwarded: for=203.0.113.9;proto=https\r\nx-end-to-end: kept\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = backends.last_headers("old/a");
    for gone in ["x-secret", "keep-alive", "te"] {
        assert!(
            !seen.contains_key(gone),
            "{gone} reached the service: {seen:?}"
        );
    }
    assert_eq!(seen["host"], HOST);
    assert_eq!(seen["x-end-to-end"], "kept");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(
        seen["forwarded"],
        "for=203.0.113.9;proto=https, for=127.0.0.1;proto=http"
    );
    assert_eq!(seen["x-forwarded-proto"], "http");
    let id = seen["x-request-id"].to_str().unwrap();
    assert!(
        id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
}

#[test]
fn the_proxy_is_ready_only_with_its_routes_and_their_clusters() {
    let yaml = "services:\n  - name: checkout\n    namespace: shop\n    ports: [{name: http, port: 8080}]\n    backends:\n      old: {endpoints: [\"127.0.0.1:1\"]}\n      new: {endpoints: [\"127.0.0.1:2\"]}\n";
    let catalog = ferry_discovery::Catalog::new();
    catalog.replace(ferry_discovery::file::parse_catalog(Path::new("c.yaml"), yaml).unwrap());
    let maps = Translator::new(TranslateOptions::default()).translate(&catalog.current());
    // The resources of `types` only, as a proxy holds them mid-update.
    let only = |types: &[ResourceType]| -> ferry_xds::client::Resources {
        let mut held: ferry_xds::client::Resources = Default::default();
        for t in types {
            held[t.index()] = maps[t.index()]
                .iter()
                .map(|(n, r)| (n.clone(), (r.version.clone(), r.body.clone())))
                .collect();
        }
        held
    };
    let warm = |types: &[ResourceType]| {
        ferry_proxy::config::build(&only(types), &Default::default())
            .unwrap()
            .warm()
    };
    use ResourceType::{Cluster, Endpoint, Listener, Route};
    assert!(warm(&[Cluster, Endpoint, Listener, Route]));
    assert!(!warm(&[Cluster, Endpoint, Listener]), "no routes yet");
    assert!(!warm(&[Listener, Route]), "routes to clusters not in yet");
    assert!(!warm(&[]));
}
