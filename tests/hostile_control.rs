//! Hostile and broken input against the real `ferry control`: catalog
//! files (alias bombs, deep nesting, truncated writes, ConfigMap symlink
//! swaps), xDS clients (oversized and garbage requests, subscription and
//! stream floods), load reports (overflowing counts, unknown clusters,
//! reports from nodes without an ADS stream) and API callers (control
//! characters, oversized strings).
//!
//! Each attack checks the refusal, that the process's memory stays
//! bounded (VmRSS from /proc before and after), that /healthz keeps
//! answering while it runs, and that the served config is unchanged.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Ferry, HealthProbe, eventually};

const WAIT: Duration = Duration::from_secs(15);
/// Memory an attack may add to the control plane, in KiB.
const RSS_BUDGET_KIB: u64 = 64 * 1024;
/// Slowest /healthz answer accepted while an attack runs.
const HEALTHZ_BUDGET: Duration = Duration::from_millis(1500);

fn service(name: &str, port: u16) -> String {
    format!(
        "  - name: {name}\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"127.0.0.1:{port}\"]}}\n      new: {{endpoints: [\"127.0.0.1:{}\"]}}\n    weights: {{old: 9000, new: 1000}}\n",
        port + 100
    )
}

/// Four services, so one load may remove up to two of them.
fn catalog() -> String {
    let mut text = String::from("services:\n");
    for (i, name) in ["checkout", "cart", "search", "payments"]
        .iter()
        .enumerate()
    {
        text.push_str(&service(name, 9001 + i as u16));
    }
    text
}

fn service_names(status: &Value) -> Vec<String> {
    status["catalog"]["services"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What the control plane serves: the catalog's services and the xDS
/// snapshot version.
async fn served(ferry: &Ferry) -> (Vec<String>, Value) {
    let status = ferry.status().await;
    (
        service_names(&status),
        status["xds"]["snapshot_version"].clone(),
    )
}

fn last_error(status: &Value) -> String {
    status["catalog"]["source"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Writes `text` as the catalog and waits until the control plane has
/// refused it with an error containing `expected`; returns that error.
async fn refused(ferry: &Ferry, text: &str, expected: &str) -> String {
    let errors_before = ferry.status().await["catalog"]["source"]["errors"]
        .as_u64()
        .unwrap_or(0);
    ferry.write_catalog(text);
    eventually(
        WAIT,
        &format!("catalog refused with {expected:?}"),
        || async {
            let status = ferry.status().await;
            status["catalog"]["source"]["errors"].as_u64().unwrap_or(0) > errors_before
                && last_error(&status).contains(expected)
        },
    )
    .await;
    last_error(&ferry.status().await)
}

/// `ferry check` on `text`: (success, stdout + stderr, how long it took).
fn check(dir: &Path, text: &str) -> (bool, String, Duration) {
    let path = dir.join("check.yaml");
    std::fs::write(&path, text).expect("write catalog to check");
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("check")
        .arg("--catalog")
        .arg(&path)
        .output()
        .expect("run ferry check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, started.elapsed())
}

/// A 128 KiB YAML "billion laughs": each anchor is a list of two of the
/// previous one, so the last expands to 2^levels endpoints.
fn alias_bomb() -> String {
    let mut text = String::from("a0: &a0 [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n");
    for i in 1..40 {
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}]\n",
            p = i - 1
        ));
    }
    text.push_str("services:\n  - name: bomb\n    ports: [{name: http, port: 80}]\n    backends: {old: {endpoints: *a39}}\n");
    while text.len() < 128 * 1024 {
        text.push_str("# padding\n");
    }
    text
}

#[tokio::test]
async fn catalog_alias_bomb_is_refused_in_bounded_memory() {
    let ferry = Ferry::start(&catalog()).await;
    let before = served(&ferry).await;
    let rss_before = ferry.rss_kib();
    let probe = HealthProbe::start(ferry.admin_port);

    let error = refused(&ferry, &alias_bomb(), "anchors and aliases").await;

    let (slowest, answers) = probe.stop().await;
    let rss_after = ferry.rss_kib();
    assert!(error.contains("line 1"), "{error}");
    assert!(
        answers > 0 && slowest < HEALTHZ_BUDGET,
        "/healthz: {slowest:?}"
    );
    assert!(
        rss_after < rss_before + RSS_BUDGET_KIB,
        "VmRSS {rss_before} → {rss_after} KiB"
    );
    assert_eq!(served(&ferry).await, before, "served config changed");
    let metrics = ferry.metrics().await;
    assert!(
        metrics.contains("ferry_discovery_catalog_refused_total{reason=\"bounds\"}"),
        "{metrics}"
    );
    println!("alias bomb: VmRSS {rss_before} → {rss_after} KiB, /healthz slowest {slowest:?}");

    let (ok, out, took) = check(ferry.dir.path(), &alias_bomb());
    assert!(!ok && out.contains("anchors and aliases"), "{out}");
    assert!(took < Duration::from_secs(5), "ferry check took {took:?}");
}

#[tokio::test]
async fn catalog_deep_nesting_is_refused_without_stalling() {
    let ferry = Ferry::start(&catalog()).await;
    let before = served(&ferry).await;
    let rss_before = ferry.rss_kib();
    let probe = HealthProbe::start(ferry.admin_port);

    let mut deep = format!("services: {}", "[".repeat(100_000));
    deep.push_str(&" ".repeat(100_000));
    let error = refused(&ferry, &deep, "nested deeper than 64").await;

    let (slowest, answers) = probe.stop().await;
    let rss_after = ferry.rss_kib();
    assert!(!error.is_empty());
    assert!(
        answers > 0 && slowest < HEALTHZ_BUDGET,
        "/healthz: {slowest:?}"
    );
    assert!(
        rss_after < rss_before + RSS_BUDGET_KIB,
        "VmRSS {rss_before} → {rss_after} KiB"
    );
    assert_eq!(served(&ferry).await, before, "served config changed");
    println!("deep nesting: VmRSS {rss_before} → {rss_after} KiB, /healthz slowest {slowest:?}");

    let (ok, out, took) = check(ferry.dir.path(), &deep);
    assert!(!ok && out.contains("nested deeper than 64"), "{out}");
    assert!(took < Duration::from_secs(5), "ferry check took {took:?}");
    // Over 16 MiB is refused unread.
    let huge = format!("services: []\n{}", "#".repeat(17 * 1024 * 1024));
    let (ok, out, _) = check(ferry.dir.path(), &huge);
    assert!(!ok && out.contains("larger than"), "{out}");
}

#[tokio::test]
async fn catalog_emptied_or_truncated_keeps_serving_the_last_good_one() {
    let ferry = Ferry::start(&catalog()).await;
    let before = served(&ferry).await;
    assert_eq!(before.0.len(), 4);

    for text in ["", "# comments only\n", "services:\n"] {
        let error = refused(&ferry, text, "no services").await;
        assert!(error.contains("--allow-mass-removal"), "{error}");
        assert_eq!(served(&ferry).await, before, "served config changed");
    }
    // A write cut short: one service of four left.
    let mut truncated = String::from("services:\n");
    truncated.push_str(&service("checkout", 9001));
    let error = refused(&ferry, &truncated, "would remove 3 of 4 services").await;
    assert!(error.contains("75 %"), "{error}");
    assert_eq!(served(&ferry).await, before, "served config changed");
    let metrics = ferry.metrics().await;
    assert!(
        metrics.contains("ferry_discovery_catalog_refused_total{reason=\"mass_removal\"}"),
        "{metrics}"
    );
    assert!(
        ferry
            .log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("would remove 3 of 4")),
        "no warning in the log"
    );

    // Removing two of four is within the default 50 %.
    let mut half = String::from("services:\n");
    half.push_str(&service("checkout", 9001));
    half.push_str(&service("cart", 9002));
    ferry.write_catalog(&half);
    eventually(WAIT, "half the catalog applied", || async {
        served(&ferry).await.0.len() == 2
    })
    .await;

    for text in ["", "# comments only\n", "services:\n"] {
        let (ok, out, _) = check(ferry.dir.path(), text);
        assert!(!ok, "ferry check accepted {text:?}: {out}");
        assert!(out.contains("no services"), "{out}");
    }
}

#[tokio::test]
async fn catalog_emptied_is_applied_when_mass_removal_is_allowed() {
    let ferry = Ferry::start_with(&catalog(), &["--allow-mass-removal"]).await;
    ferry.write_catalog("services: []\n");
    eventually(WAIT, "the empty catalog applied", || async {
        served(&ferry).await.0.is_empty()
    })
    .await;
}

/// Lays out `dir` as the kubelet mounts a ConfigMap: `catalog.yaml ->
/// ..data/catalog.yaml`, `..data -> ..<stamp>`.
fn configmap_version(dir: &Path, stamp: &str, text: &str) {
    let version = dir.join(format!("..{stamp}"));
    std::fs::create_dir(&version).expect("version dir");
    std::fs::write(version.join("catalog.yaml"), text).expect("write catalog");
    // The kubelet swaps `..data` atomically: a new symlink, renamed over.
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
}

#[tokio::test]
async fn catalog_configmap_data_swap_reaches_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    configmap_version(dir.path(), "2026_01_01_00_00_00.1", &catalog());
    let path = dir.path().join("catalog.yaml");
    std::os::unix::fs::symlink("..data/catalog.yaml", &path).expect("symlink");
    let ferry = Ferry::start_in(dir, path, &[]).await;
    assert_eq!(served(&ferry).await.0.len(), 4);

    let mut next = catalog();
    next.push_str(&service("reviews", 9011));
    configmap_version(ferry.dir.path(), "2026_01_01_00_01_00.2", &next);
    std::fs::remove_dir_all(ferry.dir.path().join("..2026_01_01_00_00_00.1")).expect("rm old");
    eventually(WAIT, "the swapped ConfigMap on /status", || async {
        served(&ferry).await.0.contains(&"reviews.shop".to_owned())
    })
    .await;

    // And again, from the new version directory.
    let mut third = next.clone();
    third.push_str(&service("ratings", 9012));
    configmap_version(ferry.dir.path(), "2026_01_01_00_02_00.3", &third);
    eventually(WAIT, "the second swap on /status", || async {
        served(&ferry).await.0.contains(&"ratings.shop".to_owned())
    })
    .await;
}

#[tokio::test]
async fn catalog_symlinked_from_another_directory_follows_edits_in_place() {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let target = elsewhere.path().join("real.yaml");
    std::fs::write(&target, catalog()).expect("write catalog");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.yaml");
    std::os::unix::fs::symlink(&target, &path).expect("symlink");
    let ferry = Ferry::start_in(dir, path, &[]).await;

    let mut next = catalog();
    next.push_str(&service("reviews", 9011));
    // Written in place, in the target's own directory.
    std::fs::write(&target, next).expect("edit target");
    eventually(WAIT, "the edited target on /status", || async {
        served(&ferry).await.0.contains(&"reviews.shop".to_owned())
    })
    .await;
}

// ---- xDS and load reports -------------------------------------------------

use ferry_proto::envoy::config::core::v3::Node;
use ferry_proto::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
use ferry_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ferry_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use ferry_proto::envoy::service::load_stats::v3::LoadStatsRequest;
use ferry_proto::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use ferry_proto::type_url;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const CLUSTER_TYPE: &str = type_url::CLUSTER;

async fn ads_client(ferry: &Ferry) -> AggregatedDiscoveryServiceClient<Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{}", ferry.xds_port))
        .await
        .expect("connect to the xDS port")
        .max_encoding_message_size(64 * 1024 * 1024)
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        cluster: "hostile".to_owned(),
        ..Default::default()
    })
}

/// A delta ADS stream that has received its first response.
struct DeltaStream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl DeltaStream {
    async fn open(client: &mut AggregatedDiscoveryServiceClient<Channel>, node_id: &str) -> Self {
        let (tx, rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: node(node_id),
            type_url: CLUSTER_TYPE.to_owned(),
            ..Default::default()
        })
        .await
        .expect("queue the first request");
        let mut rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("DeltaAggregatedResources")
            .into_inner();
        tokio::time::timeout(WAIT, rx.message())
            .await
            .expect("first response in time")
            .expect("first response")
            .expect("a response");
        Self { tx, rx }
    }

    /// The status that ended the stream, skipping responses before it.
    async fn ended(&mut self) -> tonic::Status {
        loop {
            match tokio::time::timeout(WAIT, self.rx.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => panic!("the stream ended with grpc-status 0"),
                Ok(Err(status)) => return status,
                Err(_) => panic!("the stream did not end"),
            }
        }
    }
}

/// Runs an attack with the checks every attack shares: /healthz keeps
/// answering, memory stays bounded, the served config is unchanged.
async fn under_attack<F: std::future::Future<Output = ()>>(ferry: &Ferry, what: &str, attack: F) {
    let before = served(ferry).await;
    let rss_before = ferry.rss_kib();
    let probe = HealthProbe::start(ferry.admin_port);
    attack.await;
    let (slowest, answers) = probe.stop().await;
    let rss_after = ferry.rss_kib();
    println!("{what}: VmRSS {rss_before} → {rss_after} KiB, /healthz slowest {slowest:?}");
    assert!(
        answers > 0 && slowest < HEALTHZ_BUDGET,
        "{what}: /healthz {slowest:?}"
    );
    assert!(
        rss_after < rss_before + RSS_BUDGET_KIB,
        "{what}: VmRSS {rss_before} → {rss_after} KiB"
    );
    assert_eq!(served(ferry).await, before, "{what}: served config changed");
}

#[tokio::test]
async fn xds_oversized_request_ends_the_stream_with_resource_exhausted() {
    let ferry = Ferry::start(&catalog()).await;
    under_attack(&ferry, "5 MiB DiscoveryRequest", async {
        let mut client = ads_client(&ferry).await;
        let names: Vec<String> = (0..60_000).map(|i| format!("{i:0>80}")).collect();
        let request = DiscoveryRequest {
            node: node("big"),
            type_url: type_url::ENDPOINT.to_owned(),
            resource_names: names,
            ..Default::default()
        };
        let outcome = client
            .stream_aggregated_resources(futures::stream::iter([request]))
            .await;
        let status = match outcome {
            Err(status) => status,
            Ok(response) => {
                let mut rx = response.into_inner();
                loop {
                    match tokio::time::timeout(WAIT, rx.message()).await {
                        Ok(Ok(Some(_))) => continue,
                        Ok(Ok(None)) => panic!("ended with grpc-status 0"),
                        Ok(Err(status)) => break status,
                        Err(_) => panic!("the stream did not end"),
                    }
                }
            }
        };
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    })
    .await;
    let metrics = ferry.metrics().await;
    assert!(
        metrics.contains("ferry_xds_refused_total{reason=\"message_too_large\"}"),
        "{metrics}"
    );
    assert!(
        ferry
            .log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("xds client refused"))
    );
}

/// Sends one raw gRPC message (`body`) on a StreamAggregatedResources
/// call over HTTP/2 and returns the grpc-status it ended with.
async fn raw_grpc_status(port: u16, body: Vec<u8>) -> String {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    let request = hyper::Request::post(format!(
        "http://127.0.0.1:{port}/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(Full::new(Bytes::from(framed)))
    .expect("request");
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("answer");
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().unwrap_or_default().to_owned();
    }
    let collected = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body");
    collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned()
}

#[tokio::test]
async fn xds_garbage_request_ends_the_stream_with_invalid_argument() {
    let ferry = Ferry::start(&catalog()).await;
    under_attack(&ferry, "garbage DiscoveryRequest", async {
        let garbage = vec![0xff; 64];
        let status = raw_grpc_status(ferry.xds_port, garbage).await;
        assert_eq!(status, "3", "grpc-status (3 = INVALID_ARGUMENT)");
    })
    .await;
    let metrics = ferry.metrics().await;
    assert!(
        metrics.contains("ferry_xds_refused_total{reason=\"malformed\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn xds_subscription_flood_is_cut_at_the_name_limit() {
    let ferry = Ferry::start_with(&catalog(), &["--xds-max-names", "20000"]).await;
    under_attack(&ferry, "delta subscription flood", async {
        let mut client = ads_client(&ferry).await;
        let mut stream = DeltaStream::open(&mut client, "flood").await;
        let mut sent = 0;
        for batch in 0..50 {
            let names = (0..1000)
                .map(|i| format!("flood-{batch}-{i:0>64}"))
                .collect();
            let request = DeltaDiscoveryRequest {
                type_url: type_url::ENDPOINT.to_owned(),
                resource_names_subscribe: names,
                ..Default::default()
            };
            if stream.tx.send(request).await.is_err() {
                break;
            }
            sent += 1000;
        }
        let status = stream.ended().await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("20000"), "{status:?}");
        assert!(sent > 20_000);
    })
    .await;
}

#[tokio::test]
async fn xds_stream_flood_is_cut_per_peer_address() {
    let ferry = Ferry::start_with(&catalog(), &["--xds-max-streams-per-peer", "24"]).await;
    let mut kept = Vec::new();
    under_attack(&ferry, "stream flood", async {
        let (mut refused, mut open) = (0, 0);
        for connection in 0..4 {
            let mut client = ads_client(&ferry).await;
            for i in 0..10 {
                let (tx, rx) = mpsc::channel(1);
                let request = DeltaDiscoveryRequest {
                    node: node(&format!("flood-{connection}-{i}")),
                    type_url: CLUSTER_TYPE.to_owned(),
                    ..Default::default()
                };
                let _ = tx.send(request).await;
                match client
                    .delta_aggregated_resources(ReceiverStream::new(rx))
                    .await
                {
                    Ok(response) => {
                        open += 1;
                        kept.push((tx, response.into_inner()));
                    }
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                        refused += 1;
                    }
                }
            }
        }
        assert_eq!((open, refused), (24, 16));
    })
    .await;
    let status = ferry.status().await;
    assert_eq!(status["xds"]["clients"].as_array().map(Vec::len), Some(24));
}

fn report(node_id: &str, clusters: &[(&str, u64, u64)]) -> LoadStatsRequest {
    LoadStatsRequest {
        node: node(node_id),
        cluster_stats: clusters
            .iter()
            .map(|(name, ok, err)| ClusterStats {
                cluster_name: (*name).to_owned(),
                upstream_locality_stats: vec![UpstreamLocalityStats {
                    total_successful_requests: *ok,
                    total_error_requests: *err,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// Sends load reports on one LRS stream and waits until the control
/// plane has taken them all (`ferry_lrs_reports_total` grew).
async fn send_reports(ferry: &Ferry, reports: Vec<LoadStatsRequest>) {
    let counted = |m: &str| support::metric_sum(m, "ferry_lrs_reports_total", "");
    let before = counted(&ferry.metrics().await);
    let n = reports.len() as f64;
    let mut client =
        LoadReportingServiceClient::connect(format!("http://127.0.0.1:{}", ferry.xds_port))
            .await
            .expect("connect LRS");
    let (tx, rx) = mpsc::channel(reports.len().max(1));
    for r in reports {
        tx.send(r).await.expect("queue report");
    }
    let _response = client
        .stream_load_stats(ReceiverStream::new(rx))
        .await
        .expect("StreamLoadStats");
    eventually(WAIT, "reports taken", || async {
        counted(&ferry.metrics().await) >= before + n
    })
    .await;
}

fn lrs_requests(metrics: &str) -> f64 {
    support::metric_sum(metrics, "ferry_lrs_requests_total", "outcome=\"total\"")
}

#[tokio::test]
async fn lrs_overflowing_and_unknown_clusters_are_refused() {
    let ferry = Ferry::start(&catalog()).await;
    let mut client = ads_client(&ferry).await;
    let _ads = DeltaStream::open(&mut client, "reporter").await;
    let known = "checkout.shop:8080@old";
    under_attack(&ferry, "LRS overflow and unknown clusters", async {
        let unknown: Vec<String> = (0..20_000)
            .map(|i| format!("made-up-{i}.shop:80@x"))
            .collect();
        let mut flood: Vec<(&str, u64, u64)> = unknown.iter().map(|n| (n.as_str(), 1, 0)).collect();
        flood.push((known, 10, 1));
        send_reports(
            &ferry,
            vec![
                report("reporter", &[(known, u64::MAX, 1)]),
                report("reporter", &[(known, u64::MAX / 2, u64::MAX / 2 + 2)]),
                report("reporter", &flood),
            ],
        )
        .await;
    })
    .await;
    let metrics = ferry.metrics().await;
    // Only the one sane report of a served cluster counts.
    assert_eq!(lrs_requests(&metrics), 11.0, "{metrics}");
    assert_eq!(
        support::metric_sum(
            &metrics,
            "ferry_lrs_refused_total",
            "reason=\"absurd_count\""
        ),
        2.0
    );
    assert_eq!(
        support::metric_sum(
            &metrics,
            "ferry_lrs_refused_total",
            "reason=\"unknown_cluster\""
        ),
        20_000.0
    );
}

#[tokio::test]
async fn lrs_reports_from_a_node_without_an_ads_stream_are_refused() {
    let ferry = Ferry::start(&catalog()).await;
    let known = "checkout.shop:8080@old";
    under_attack(&ferry, "LRS from a stranger", async {
        send_reports(&ferry, vec![report("stranger", &[(known, 100, 100)])]).await;
    })
    .await;
    let metrics = ferry.metrics().await;
    assert_eq!(lrs_requests(&metrics), 0.0, "{metrics}");
    assert_eq!(
        support::metric_sum(
            &metrics,
            "ferry_lrs_refused_total",
            "reason=\"no_ads_stream\""
        ),
        1.0
    );
    // The same node with an ADS stream counts.
    let mut client = ads_client(&ferry).await;
    let _ads = DeltaStream::open(&mut client, "stranger").await;
    send_reports(&ferry, vec![report("stranger", &[(known, 100, 1)])]).await;
    assert_eq!(lrs_requests(&ferry.metrics().await), 101.0);
}

/// Runs the `ferry` CLI against `ferry`'s API; (success, stdout, stderr).
fn cli(ferry: &Ferry, args: &[&str]) -> (bool, String, String) {
    support::ferry_cli(ferry, args)
}

#[tokio::test]
async fn api_strings_are_bounded_and_shown_escaped() {
    use ferry_proto::ferry::v1::traffic_client::TrafficClient;
    use ferry_proto::ferry::v1::{ClusterWeight, GetWeightsRequest, PinRequest, SetWeightsRequest};
    let ferry = Ferry::start(&catalog()).await;
    let pid = ferry.pid().expect("pid");
    let before_rss = support::vm_rss_kib(pid).unwrap_or(0);
    let mut api = TrafficClient::connect(format!("http://127.0.0.1:{}", ferry.api_port))
        .await
        .expect("connect");
    let weights = |old, new| {
        vec![
            ClusterWeight {
                cluster: "old".into(),
                basis_points: old,
            },
            ClusterWeight {
                cluster: "new".into(),
                basis_points: new,
            },
        ]
    };
    let reader = api.clone();
    let get = || {
        let mut api = reader.clone();
        async move {
            api.get_weights(GetWeightsRequest {
                service: "checkout.shop".into(),
            })
            .await
            .expect("get")
            .into_inner()
        }
    };
    let before = get().await;
    // A 3 MiB reason: refused, naming the field; nothing changes.
    let refused = api
        .set_weights(SetWeightsRequest {
            service: "checkout.shop".into(),
            weights: weights(5000, 5000),
            reason: "r".repeat(3 << 20),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("reason:"),
        "{}",
        refused.message()
    );
    assert_eq!(get().await, before);
    // An owner is an identifier: no control characters.
    let refused = api
        .pin(PinRequest {
            service: "checkout.shop".into(),
            owner: "deploy\nbot".into(),
            reason: "x".into(),
            ttl_seconds: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("owner:"),
        "{}",
        refused.message()
    );

    // A reason that tries to forge a log line and drive the terminal is
    // accepted (it is within bounds), and shown escaped everywhere.
    let forged = "ok\n2026-11-30T06:00:00Z  INFO policy change accepted reason=FORGED\u{1b}[2J\r\0";
    api.set_weights(SetWeightsRequest {
        service: "checkout.shop".into(),
        weights: weights(6000, 4000),
        reason: forged.into(),
        ..Default::default()
    })
    .await
    .expect("a bounded reason is accepted");
    // The largest reason allowed: `ferry audit` still pages fine.
    api.set_weights(SetWeightsRequest {
        service: "checkout.shop".into(),
        weights: weights(7000, 3000),
        reason: "m".repeat(1024),
        ..Default::default()
    })
    .await
    .expect("1 KiB is allowed");
    let (ok, out, err) = cli(&ferry, &["audit"]);
    assert!(ok, "{err}");
    assert!(
        !out.contains('\u{1b}') && !out.contains('\r') && !out.contains('\0'),
        "{out:?}"
    );
    assert!(
        out.lines().all(
            |l| !l.contains("INFO policy change accepted reason=FORGED") || l.contains("ok\\n")
        ),
        "the forged line stays inside its entry: {out}"
    );
    assert!(out.contains("ok\\n2026-11-30T06:00:00Z"), "{out}");
    let log = ferry.log();
    assert!(
        !log.lines().any(|l| l.starts_with("2026-11-30T06:00:00Z")),
        "no forged line in the log"
    );
    let after_rss = support::vm_rss_kib(pid).unwrap_or(0);
    assert!(
        after_rss < before_rss + RSS_BUDGET_KIB,
        "{before_rss} → {after_rss} KiB"
    );
}
