//! xDS protocol conformance of the real `ferry` binary, driven over a real
//! socket by a tonic ADS client (state of the world and delta): NACKs, stale
//! nonces, unknown names, unsubscription, reconnects with
//! `initial_resource_versions`, full-state clusters, and readiness.
//!
//! Each test starts its own `ferry control` on free loopback ports with a
//! catalog file in a temporary directory, and edits that file to make the
//! control plane push. Every await is bounded, so a hang fails the test.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ferry_proto::envoy::config::cluster::v3::Cluster;
use ferry_proto::envoy::config::core::v3::Node;
use ferry_proto::envoy::config::core::v3::address::Address as AddressKind;
use ferry_proto::envoy::config::core::v3::socket_address::PortSpecifier;
use ferry_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use ferry_proto::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use ferry_proto::envoy::config::route::v3::RouteConfiguration;
use ferry_proto::envoy::config::route::v3::route::Action;
use ferry_proto::envoy::config::route::v3::route_action::ClusterSpecifier;
use ferry_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ferry_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use ferry_proto::google::rpc::Status as RpcStatus;
use ferry_proto::{Any, type_url};
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Longest any single expected event may take.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(1500);

const CATALOG: &str = r#"services:
  - name: checkout
    namespace: shop
    ports: [{name: http, port: 8080}]
    hosts: [checkout.example.com]
    backends:
      old: {endpoints: ["127.0.0.1:9001", {address: "127.0.0.1:9002", ready: false, zone: a}]}
      new: {endpoints: ["127.0.0.1:9101"]}
    weights: {old: 9000, new: 1000}
  - name: cart
    namespace: shop
    ports: [{name: http, port: 8080}]
    backends:
      old: {endpoints: ["127.0.0.1:9201", "127.0.0.1:9202"]}
      new: {endpoints: ["127.0.0.1:9301"]}
"#;

const CHECKOUT_OLD: &str = "checkout.shop:8080@old";
const CHECKOUT_NEW: &str = "checkout.shop:8080@new";
const CART_OLD: &str = "cart.shop:8080@old";
const CART_NEW: &str = "cart.shop:8080@new";
const CART_EXTRA: &str = "cart.shop:8080@extra";

/// `text` with `from` replaced by `to`; `from` must occur.
fn edited(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "catalog edit: {from:?} not found");
    text.replace(from, to)
}

/// The catalog with a third backend cluster, `extra`, for cart.
fn with_cart_extra(text: &str) -> String {
    edited(
        text,
        "      new: {endpoints: [\"127.0.0.1:9301\"]}\n",
        "      new: {endpoints: [\"127.0.0.1:9301\"]}\n      extra: {endpoints: [\"127.0.0.1:9401\"]}\n",
    )
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------
// The ferry process and its admin endpoint.

/// A running `ferry control`; killed (and reaped) on drop.
struct Ferry {
    child: Child,
    dir: tempfile::TempDir,
    catalog: PathBuf,
    log: PathBuf,
    xds_port: u16,
    admin_port: u16,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

impl Ferry {
    /// Starts ferry on `catalog` and waits until `/readyz` is 200.
    async fn start(catalog: &str) -> Self {
        Self::launch(catalog, "/readyz").await
    }

    /// Starts ferry on `catalog` and waits only until `/healthz` is 200.
    async fn start_unready(catalog: &str) -> Self {
        Self::launch(catalog, "/healthz").await
    }

    async fn launch(catalog_text: &str, wait_path: &str) -> Self {
        // A port picked free can be taken before ferry binds it: retry.
        for attempt in 1..=3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let catalog = dir.path().join("catalog.yaml");
            std::fs::write(&catalog, catalog_text).expect("write catalog");
            let (xds_port, admin_port, listener_port) = (free_port(), free_port(), free_port());
            let log = dir.path().join("ferry.log");
            let out = File::create(&log).expect("create log file");
            let err = out.try_clone().expect("clone log file");
            let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
                .arg("control")
                .arg("--catalog")
                .arg(&catalog)
                .arg("--xds-addr")
                .arg(format!("127.0.0.1:{xds_port}"))
                .arg("--admin-addr")
                .arg(format!("127.0.0.1:{admin_port}"))
                .arg("--listener-addr")
                .arg(format!("127.0.0.1:{listener_port}"))
                .arg("--api-addr")
                .arg("127.0.0.1:0")
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .env("RUST_LOG", "ferry_xds=debug,info")
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn ferry");
            let mut ferry = Ferry {
                child,
                dir,
                catalog,
                log,
                xds_port,
                admin_port,
            };
            if ferry.wait_up(wait_path, attempt == 3).await {
                return ferry;
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Waits until `path` answers 200. Returns false if ferry exited
    /// (e.g. a port was taken) and `last` is false.
    async fn wait_up(&mut self, path: &str, last: bool) -> bool {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(code) = self.child.try_wait().expect("try_wait") {
                assert!(!last, "ferry exited early ({code}):\n{}", self.log_text());
                return false;
            }
            if let Ok((200, _)) = try_http_get(self.admin_port, path).await {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "ferry: {path} not 200 within {WAIT:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the catalog file atomically (write, then rename), as
    /// editors and config management do.
    fn write_catalog(&self, text: &str) {
        let tmp = self.dir.path().join(".catalog.yaml.tmp");
        std::fs::write(&tmp, text).expect("write catalog");
        std::fs::rename(&tmp, &self.catalog).expect("rename catalog");
    }

    async fn get(&self, path: &str) -> (u16, String) {
        try_http_get(self.admin_port, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    async fn status(&self) -> Value {
        let (code, body) = self.get("/status").await;
        assert_eq!(code, 200, "GET /status: {body}");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    async fn snapshot_version(&self) -> u64 {
        self.status().await["xds"]["snapshot_version"]
            .as_u64()
            .expect("xds.snapshot_version")
    }

    /// Waits until a snapshot newer than `after` is published.
    async fn wait_snapshot_after(&self, after: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.snapshot_version().await;
            if v > after {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no snapshot after version {after} within {WAIT:?}; status: {}",
                self.status().await
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Writes the catalog and waits until ferry has published it.
    async fn edit_catalog(&self, text: &str) {
        let before = self.snapshot_version().await;
        self.write_catalog(text);
        self.wait_snapshot_after(before).await;
    }

    /// `/status` of one resource type of the client with this node id.
    async fn client_type(&self, node_id: &str, short: &str) -> Value {
        let status = self.status().await;
        let clients = status["xds"]["clients"]
            .as_array()
            .expect("xds.clients is an array");
        let client = clients
            .iter()
            .find(|c| c["node_id"] == node_id)
            .unwrap_or_else(|| panic!("no client {node_id:?} on /status: {status}"));
        client["types"][short].clone()
    }

    /// Polls `/status` until `check` holds for the client's `short` type.
    async fn wait_client_type(
        &self,
        node_id: &str,
        short: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let t = self.client_type(node_id, short).await;
            if check(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "/status never showed {what} for {node_id}/{short}; last: {t}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- ferry log ----\n{}---- end ----", self.log_text());
        }
    }
}

/// A minimal HTTP/1.0 GET: status code and body.
async fn try_http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = timeout(WAIT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP GET timed out"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {head:?}")))?;
    Ok((code, body.to_owned()))
}

// ---------------------------------------------------------------------------
// ADS streams.

/// A one-line description of a response, for failure messages.
trait Describe {
    fn describe(&self) -> String;
}

fn short(url: &str) -> &str {
    url.rsplit('.').next().unwrap_or(url)
}

impl Describe for DiscoveryResponse {
    fn describe(&self) -> String {
        format!(
            "SotW {} version={} nonce={} resources={}",
            short(&self.type_url),
            self.version_info,
            self.nonce,
            self.resources.len()
        )
    }
}

impl Describe for DeltaDiscoveryResponse {
    fn describe(&self) -> String {
        let upserts: Vec<&str> = self.resources.iter().map(|r| r.name.as_str()).collect();
        format!(
            "delta {} nonce={} resources={upserts:?} removed={:?}",
            short(&self.type_url),
            self.nonce,
            self.removed_resources
        )
    }
}

/// One ADS stream: requests go in through a channel, responses come out.
struct Ads<Req, Resp> {
    _client: AggregatedDiscoveryServiceClient<Channel>,
    tx: mpsc::Sender<Req>,
    rx: tonic::Streaming<Resp>,
}

type Sotw = Ads<DiscoveryRequest, DiscoveryResponse>;
type Delta = Ads<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

async fn connect(port: u16) -> AggregatedDiscoveryServiceClient<Channel> {
    timeout(
        WAIT,
        AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{port}")),
    )
    .await
    .expect("connect timed out")
    .expect("connect to ferry's xDS port")
}

impl Sotw {
    async fn open(ferry: &Ferry) -> Self {
        let mut client = connect(ferry.xds_port).await;
        let (tx, rx) = mpsc::channel(16);
        let response = timeout(
            WAIT,
            client.stream_aggregated_resources(ReceiverStream::new(rx)),
        )
        .await
        .expect("StreamAggregatedResources timed out")
        .expect("StreamAggregatedResources");
        Self {
            _client: client,
            tx,
            rx: response.into_inner(),
        }
    }
}

impl Delta {
    async fn open(ferry: &Ferry) -> Self {
        let mut client = connect(ferry.xds_port).await;
        let (tx, rx) = mpsc::channel(16);
        let response = timeout(
            WAIT,
            client.delta_aggregated_resources(ReceiverStream::new(rx)),
        )
        .await
        .expect("DeltaAggregatedResources timed out")
        .expect("DeltaAggregatedResources");
        Self {
            _client: client,
            tx,
            rx: response.into_inner(),
        }
    }
}

impl<Req, Resp: Describe> Ads<Req, Resp> {
    async fn send(&self, request: Req) {
        timeout(WAIT, self.tx.send(request))
            .await
            .expect("sending a request timed out")
            .map_err(|_| "request channel closed")
            .expect("send request");
    }

    /// The next response; fails after [`WAIT`].
    async fn recv(&mut self, what: &str) -> Resp {
        match timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(response))) => response,
            Ok(Ok(None)) => panic!("stream ended while waiting for {what}"),
            Ok(Err(status)) => panic!("stream failed while waiting for {what}: {status}"),
            Err(_) => panic!("no response within {WAIT:?} while waiting for {what}"),
        }
    }

    /// Asserts that nothing arrives for `period`.
    async fn expect_quiet(&mut self, period: Duration, why: &str) {
        match timeout(period, self.rx.message()).await {
            Err(_) => {}
            Ok(Ok(Some(response))) => {
                panic!("{why}: unexpected response {}", response.describe())
            }
            Ok(Ok(None)) => panic!("{why}: stream ended"),
            Ok(Err(status)) => panic!("{why}: stream failed: {status}"),
        }
    }
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        cluster: "xds-protocol-test".to_owned(),
        ..Default::default()
    })
}

fn sotw_request(
    node_id: Option<&str>,
    type_url: &str,
    resource_names: &[&str],
    answering: Option<&DiscoveryResponse>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node_id.and_then(node),
        type_url: type_url.to_owned(),
        resource_names: resource_names.iter().map(|s| (*s).to_owned()).collect(),
        version_info: answering
            .map(|r| r.version_info.clone())
            .unwrap_or_default(),
        response_nonce: answering.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

fn delta_subscribe(
    node_id: Option<&str>,
    type_url: &str,
    subscribe: &[&str],
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node_id.and_then(node),
        type_url: type_url.to_owned(),
        resource_names_subscribe: subscribe.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn delta_ack(response: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        ..Default::default()
    }
}

fn bad() -> Option<RpcStatus> {
    Some(RpcStatus {
        code: 3,
        message: "bad".to_owned(),
        details: Vec::new(),
    })
}

fn decode<M: Message + Default>(any: &Any, expected_type: &str) -> M {
    assert_eq!(any.type_url, expected_type, "resource type");
    M::decode(any.value.as_slice()).expect("resource decodes")
}

fn sotw_cluster_names(response: &DiscoveryResponse) -> BTreeSet<String> {
    assert_eq!(
        response.type_url,
        type_url::CLUSTER,
        "{}",
        response.describe()
    );
    response
        .resources
        .iter()
        .map(|a| decode::<Cluster>(a, type_url::CLUSTER).name)
        .collect()
}

fn delta_names(response: &DeltaDiscoveryResponse) -> BTreeSet<String> {
    response
        .resources
        .iter()
        .map(|r| {
            let any = r.resource.as_ref().expect("delta resource has a body");
            let decoded = match response.type_url.as_str() {
                type_url::CLUSTER => decode::<Cluster>(any, type_url::CLUSTER).name,
                type_url::ENDPOINT => {
                    decode::<ClusterLoadAssignment>(any, type_url::ENDPOINT).cluster_name
                }
                other => panic!("unexpected type {other}"),
            };
            assert_eq!(decoded, r.name, "resource name matches its body");
            r.name.clone()
        })
        .collect()
}

/// Every endpoint port of a ClusterLoadAssignment.
fn cla_ports(cla: &ClusterLoadAssignment) -> BTreeSet<u32> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(AddressKind::SocketAddress(sa)) => match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => Some(p),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Every cluster a RouteConfiguration routes to.
fn route_clusters(rc: &RouteConfiguration) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for route in rc.virtual_hosts.iter().flat_map(|v| &v.routes) {
        if let Some(Action::Route(action)) = &route.action {
            match &action.cluster_specifier {
                Some(ClusterSpecifier::Cluster(c)) => {
                    out.insert(c.clone());
                }
                Some(ClusterSpecifier::WeightedClusters(w)) => {
                    out.extend(w.clusters.iter().map(|c| c.name.clone()));
                }
                _ => {}
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn sotw_nack_is_recorded_and_not_resent() {
    let ferry = Ferry::start(CATALOG).await;
    let id = "sotw-nack";
    let mut ads = Sotw::open(&ferry).await;

    ads.send(sotw_request(Some(id), type_url::CLUSTER, &[], None))
        .await;
    let first = ads.recv("the first CDS response").await;
    assert_eq!(
        sotw_cluster_names(&first),
        names(&[CHECKOUT_OLD, CHECKOUT_NEW, CART_OLD, CART_NEW])
    );

    // NACK: the nonce of the response, the last accepted version (none).
    let mut nack = sotw_request(None, type_url::CLUSTER, &[], Some(&first));
    nack.version_info = String::new();
    nack.error_detail = bad();
    ads.send(nack).await;
    ads.expect_quiet(QUIET, "a NACKed CDS update must not be resent")
        .await;

    let cds = ferry
        .wait_client_type(id, "cds", "nacks == 1", |t| t["nacks"] == 1)
        .await;
    assert_eq!(cds["last_nack"]["message"], "bad", "{cds}");
    assert_eq!(
        cds["last_nack"]["rejected_version"], first.version_info,
        "the rejected version is the one sent: {cds}"
    );
    assert!(cds["acked_version"].is_null(), "a NACK is no ACK: {cds}");
    let (code, metrics) = ferry.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("ferry_xds_nacks_total"),
        "/metrics lacks ferry_xds_nacks_total:\n{metrics}"
    );

    // The catalog changes: a new cluster set is pushed.
    ferry.write_catalog(&with_cart_extra(CATALOG));
    let next = ads.recv("CDS after the catalog changed").await;
    assert_eq!(
        sotw_cluster_names(&next),
        names(&[CHECKOUT_OLD, CHECKOUT_NEW, CART_OLD, CART_NEW, CART_EXTRA]),
        "full state after the edit"
    );
    assert_ne!(next.nonce, first.nonce);
    assert_ne!(next.version_info, first.version_info);
}

#[tokio::test]
async fn delta_nack_is_not_resent() {
    let ferry = Ferry::start(CATALOG).await;
    let id = "delta-nack";
    let mut ads = Delta::open(&ferry).await;

    ads.send(delta_subscribe(Some(id), type_url::CLUSTER, &[]))
        .await;
    let first = ads.recv("the first delta CDS response").await;
    assert_eq!(first.type_url, type_url::CLUSTER, "{}", first.describe());
    assert_eq!(
        delta_names(&first),
        names(&[CHECKOUT_OLD, CHECKOUT_NEW, CART_OLD, CART_NEW])
    );

    let mut nack = delta_ack(&first);
    nack.error_detail = bad();
    ads.send(nack).await;
    ads.expect_quiet(QUIET, "a NACKed delta CDS update must not be resent")
        .await;

    let cds = ferry
        .wait_client_type(id, "cds", "nacks == 1", |t| t["nacks"] == 1)
        .await;
    assert_eq!(cds["last_nack"]["message"], "bad", "{cds}");
    let (_, metrics) = ferry.get("/metrics").await;
    assert!(
        metrics.contains("ferry_xds_nacks_total"),
        "/metrics lacks ferry_xds_nacks_total:\n{metrics}"
    );

    ferry.write_catalog(&with_cart_extra(CATALOG));
    let next = ads.recv("delta CDS after the catalog changed").await;
    assert_eq!(next.type_url, type_url::CLUSTER, "{}", next.describe());
    assert_eq!(delta_names(&next), names(&[CART_EXTRA]), "only the change");
    assert!(next.removed_resources.is_empty(), "{}", next.describe());
}

#[tokio::test]
async fn sotw_stale_nonce_is_not_an_ack() {
    let ferry = Ferry::start(CATALOG).await;
    let id = "sotw-stale";
    let mut ads = Sotw::open(&ferry).await;

    ads.send(sotw_request(Some(id), type_url::CLUSTER, &[], None))
        .await;
    let first = ads.recv("the first CDS response").await;
    assert_eq!(first.type_url, type_url::CLUSTER);
    assert_ne!(first.nonce, "999", "the made-up nonce must differ");

    let mut stale = sotw_request(None, type_url::CLUSTER, &[], Some(&first));
    stale.response_nonce = "999".to_owned();
    ads.send(stale).await;
    // Requests on a stream are handled in order: once the RDS response is
    // here, the stale ACK has been processed.
    ads.send(sotw_request(None, type_url::ROUTE, &["ferry_http"], None))
        .await;
    let routes = ads.recv("RDS (barrier after the stale ACK)").await;
    assert_eq!(
        routes.type_url,
        type_url::ROUTE,
        "the stale ACK must not trigger a response: got {}",
        routes.describe()
    );

    let cds = ferry.client_type(id, "cds").await;
    assert!(
        cds["acked_version"].is_null(),
        "a stale nonce was taken as an ACK: {cds}"
    );
    assert_eq!(cds["awaiting_ack"], true, "{cds}");
    assert_eq!(cds["sent_version"], first.version_info, "{cds}");

    ads.send(sotw_request(None, type_url::CLUSTER, &[], Some(&first)))
        .await;
    let version = first.version_info.clone();
    let cds = ferry
        .wait_client_type(id, "cds", "the ACKed version", |t| {
            t["acked_version"] == version.as_str()
        })
        .await;
    assert_eq!(cds["awaiting_ack"], false, "{cds}");
    ads.expect_quiet(Duration::from_millis(300), "an ACK needs no answer")
        .await;
}

#[tokio::test]
async fn delta_unknown_names_are_answered_as_removed() {
    let ferry = Ferry::start(CATALOG).await;
    let mut ads = Delta::open(&ferry).await;

    ads.send(delta_subscribe(
        Some("delta-unknown"),
        type_url::ENDPOINT,
        &["nope.ns:80@x", CHECKOUT_OLD],
    ))
    .await;
    let response = ads.recv("the EDS response").await;
    assert_eq!(
        response.type_url,
        type_url::ENDPOINT,
        "{}",
        response.describe()
    );
    assert_eq!(delta_names(&response), names(&[CHECKOUT_OLD]));
    assert_eq!(
        response.removed_resources,
        vec!["nope.ns:80@x".to_owned()],
        "{}",
        response.describe()
    );
    let cla: ClusterLoadAssignment = decode(
        response.resources[0].resource.as_ref().expect("body"),
        type_url::ENDPOINT,
    );
    assert_eq!(cla_ports(&cla), BTreeSet::from([9001, 9002]));
}

#[tokio::test]
async fn delta_unsubscribe_stops_updates() {
    let ferry = Ferry::start(CATALOG).await;
    let mut ads = Delta::open(&ferry).await;

    ads.send(delta_subscribe(
        Some("delta-unsubscribe"),
        type_url::ENDPOINT,
        &[CHECKOUT_OLD],
    ))
    .await;
    let first = ads.recv("EDS for checkout").await;
    assert_eq!(delta_names(&first), names(&[CHECKOUT_OLD]));
    ads.send(delta_ack(&first)).await;

    ads.send(DeltaDiscoveryRequest {
        type_url: type_url::ENDPOINT.to_owned(),
        resource_names_unsubscribe: vec![CHECKOUT_OLD.to_owned()],
        ..Default::default()
    })
    .await;
    let catalog = edited(CATALOG, "127.0.0.1:9001", "127.0.0.1:9005");
    ferry.edit_catalog(&catalog).await;
    ads.expect_quiet(QUIET, "an unsubscribed CLA must not be pushed")
        .await;

    ads.send(delta_subscribe(None, type_url::ENDPOINT, &[CART_OLD]))
        .await;
    let cart = ads.recv("EDS for cart after subscribing").await;
    assert_eq!(
        delta_names(&cart),
        names(&[CART_OLD]),
        "{}",
        cart.describe()
    );
    assert!(cart.removed_resources.is_empty(), "{}", cart.describe());
    ads.send(delta_ack(&cart)).await;

    let catalog = edited(&catalog, "127.0.0.1:9201", "127.0.0.1:9205");
    ferry.write_catalog(&catalog);
    let update = ads.recv("EDS update for cart").await;
    assert_eq!(update.type_url, type_url::ENDPOINT, "{}", update.describe());
    assert_eq!(
        delta_names(&update),
        names(&[CART_OLD]),
        "{}",
        update.describe()
    );
    let cla: ClusterLoadAssignment = decode(
        update.resources[0].resource.as_ref().expect("body"),
        type_url::ENDPOINT,
    );
    assert_eq!(cla_ports(&cla), BTreeSet::from([9205, 9202]));
}

#[tokio::test]
async fn delta_reconnect_with_initial_versions_gets_only_changes() {
    let ferry = Ferry::start(CATALOG).await;
    let id = "delta-reconnect";

    let held: HashMap<String, String> = {
        let mut ads = Delta::open(&ferry).await;
        ads.send(delta_subscribe(Some(id), type_url::CLUSTER, &[]))
            .await;
        let first = ads.recv("the first delta CDS response").await;
        assert_eq!(
            delta_names(&first),
            names(&[CHECKOUT_OLD, CHECKOUT_NEW, CART_OLD, CART_NEW])
        );
        ads.send(delta_ack(&first)).await;
        first
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    };
    assert!(held.values().all(|v| !v.is_empty()), "versions: {held:?}");

    // While disconnected: cart gains a cluster, checkout loses one.
    let catalog = edited(
        &edited(
            &with_cart_extra(CATALOG),
            "      new: {endpoints: [\"127.0.0.1:9101\"]}\n",
            "",
        ),
        "weights: {old: 9000, new: 1000}",
        "weights: {old: 10000}",
    );
    ferry.edit_catalog(&catalog).await;

    let mut ads = Delta::open(&ferry).await;
    let mut request = delta_subscribe(Some(id), type_url::CLUSTER, &[]);
    request.initial_resource_versions = held;
    ads.send(request).await;
    let response = ads.recv("delta CDS after reconnecting").await;
    assert_eq!(
        response.type_url,
        type_url::CLUSTER,
        "{}",
        response.describe()
    );
    assert_eq!(
        response.resources.len(),
        1,
        "only the added cluster: {}",
        response.describe()
    );
    assert_eq!(delta_names(&response), names(&[CART_EXTRA]));
    assert_eq!(
        response.removed_resources,
        vec![CHECKOUT_NEW.to_owned()],
        "{}",
        response.describe()
    );
}

#[tokio::test]
async fn sotw_named_routes_and_full_state_clusters() {
    let ferry = Ferry::start(CATALOG).await;
    let mut ads = Sotw::open(&ferry).await;

    ads.send(sotw_request(
        Some("sotw-full-state"),
        type_url::CLUSTER,
        &[],
        None,
    ))
    .await;
    let cds = ads.recv("the first CDS response").await;
    assert_eq!(
        sotw_cluster_names(&cds),
        names(&[CHECKOUT_OLD, CHECKOUT_NEW, CART_OLD, CART_NEW])
    );
    ads.send(sotw_request(None, type_url::CLUSTER, &[], Some(&cds)))
        .await;

    ads.send(sotw_request(None, type_url::ROUTE, &["ferry_http"], None))
        .await;
    let rds = ads.recv("the RDS response").await;
    assert_eq!(rds.type_url, type_url::ROUTE, "{}", rds.describe());
    assert_eq!(rds.resources.len(), 1, "{}", rds.describe());
    let rc: RouteConfiguration = decode(&rds.resources[0], type_url::ROUTE);
    assert_eq!(rc.name, "ferry_http");
    assert_eq!(
        route_clusters(&rc),
        names(&[CHECKOUT_OLD, CHECKOUT_NEW, CART_OLD, CART_NEW])
    );
    ads.send(sotw_request(
        None,
        type_url::ROUTE,
        &["ferry_http"],
        Some(&rds),
    ))
    .await;

    // Remove cart: routes move away from its clusters first, then (after
    // the routes are ACKed) clusters come without them.
    let (without_cart, _) = CATALOG
        .split_once("  - name: cart\n")
        .expect("cart in the catalog");
    ferry.write_catalog(without_cart);
    let rds = ads.recv("RDS after removing cart").await;
    assert_eq!(
        rds.type_url,
        type_url::ROUTE,
        "make before break: routes first, got {}",
        rds.describe()
    );
    assert_eq!(rds.resources.len(), 1, "{}", rds.describe());
    let rc: RouteConfiguration = decode(&rds.resources[0], type_url::ROUTE);
    assert_eq!(route_clusters(&rc), names(&[CHECKOUT_OLD, CHECKOUT_NEW]));
    ads.send(sotw_request(
        None,
        type_url::ROUTE,
        &["ferry_http"],
        Some(&rds),
    ))
    .await;

    let cds = ads.recv("CDS after the routes were ACKed").await;
    assert_eq!(
        sotw_cluster_names(&cds),
        names(&[CHECKOUT_OLD, CHECKOUT_NEW]),
        "full state without cart's clusters"
    );
    ads.send(sotw_request(None, type_url::CLUSTER, &[], Some(&cds)))
        .await;
    ads.expect_quiet(Duration::from_millis(500), "everything is ACKed")
        .await;
}

#[tokio::test]
async fn no_response_before_first_catalog() {
    let ferry = Ferry::start_unready("services: [ {name: x").await;
    let (code, body) = ferry.get("/readyz").await;
    assert_eq!(code, 503, "/readyz with an invalid catalog: {body}");

    let mut ads = Delta::open(&ferry).await;
    ads.send(delta_subscribe(
        Some("delta-unready"),
        type_url::CLUSTER,
        &[],
    ))
    .await;
    ads.expect_quiet(
        Duration::from_secs(1),
        "no xDS response before a catalog is loaded",
    )
    .await;
    let (code, _) = ferry.get("/readyz").await;
    assert_eq!(code, 503);

    ferry.write_catalog(CATALOG);
    let response = ads.recv("CDS once the catalog is valid").await;
    assert_eq!(
        response.type_url,
        type_url::CLUSTER,
        "{}",
        response.describe()
    );
    assert_eq!(
        delta_names(&response),
        names(&[CHECKOUT_OLD, CHECKOUT_NEW, CART_OLD, CART_NEW])
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, _) = ferry.get("/readyz").await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {code}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
