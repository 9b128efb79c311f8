//! The xDS and LRS port behind TLS, client certificates, bearer tokens and
//! node authorization: real Envoy and `ferry proxy` over mutual TLS get
//! their config, plaintext ones get nothing, a client cannot claim a node
//! its identity does not cover, forged load reports never reach a gate,
//! and the port's certificate rotates without dropping streams.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::envoy::config::core::v3::Node;
use ferry_proto::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
use ferry_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ferry_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ferry_proto::envoy::service::load_stats::v3::LoadStatsRequest;
use ferry_proto::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use support::{
    Backends, Ca, Envoy, Ferry, FerryProxy, ca, eventually, free_port, leaf, leaf_with_uris, split,
    tls_channel, write,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const HOST: &str = "checkout.shop";
const WAIT: Duration = Duration::from_secs(20);
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENVOY_ID: &str = "spiffe://ferry.test/edge/envoy-1";
const TOKEN: &str = "s3cret-xds-token";

const AUTH: &str = r#"
clients:
  - identity: spiffe://ferry.test/edge/envoy-1
    nodes: [envoy-1]
  - identity: proxy-1
    nodes: [proxy-1]
  - identity: edge-1
    nodes: [edge-1]
    clusters: [edge]
tokens:
  - identity: token-proxy
    token: s3cret-xds-token
    nodes: [token-proxy]
"#;

fn catalog(backends: &Backends) -> String {
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new: {{endpoints: [\"{}\"]}}\n    weights: {{old: 10000, new: 0}}\n",
        backends.addr("old/a"),
        backends.addr("new/a")
    )
}

/// The port's PKI: a CA for the server, a CA for the fleet's clients, and
/// the files a control plane and its clients read.
struct Pki {
    dir: tempfile::TempDir,
    server_ca: Ca,
    fleet_ca: Ca,
    server_ca_file: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let server_ca = ca("ferry-xds-ca");
        let fleet_ca = ca("fleet-ca");
        let (cert, key) = leaf(&server_ca, "ferry-control");
        Self {
            server_ca_file: write(dir.path(), "xds-ca.pem", &server_ca.pem),
            server_cert: write(dir.path(), "xds.pem", &cert),
            server_key: write(dir.path(), "xds.key", &key),
            dir,
            server_ca,
            fleet_ca,
        }
    }

    /// A fleet client certificate, written as `<name>.pem` / `<name>.key`.
    fn client(&self, name: &str, cn: &str, uris: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = leaf_with_uris(&self.fleet_ca, cn, uris);
        (
            write(self.dir.path(), &format!("{name}.pem"), &cert),
            write(self.dir.path(), &format!("{name}.key"), &key),
        )
    }

    /// `ferry control` flags: TLS, and with `auth` mutual TLS with the
    /// fleet CA and the auth file.
    fn flags(&self, auth: bool) -> Vec<String> {
        let mut flags = vec![
            "--xds-tls-cert".to_owned(),
            self.server_cert.display().to_string(),
            "--xds-tls-key".to_owned(),
            self.server_key.display().to_string(),
            "--xds-tls-reload-interval".to_owned(),
            "200ms".to_owned(),
        ];
        if auth {
            let ca = write(self.dir.path(), "fleet-ca.pem", &self.fleet_ca.pem);
            let file = write(self.dir.path(), "xds-auth.yaml", AUTH);
            flags.extend([
                "--xds-client-ca".to_owned(),
                ca.display().to_string(),
                "--xds-auth".to_owned(),
                file.display().to_string(),
            ]);
        }
        flags
    }
}

async fn secured_ferry(backends: &Backends, pki: &Pki, auth: bool) -> Ferry {
    let flags = pki.flags(auth);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Ferry::start_with(&catalog(backends), &flags).await
}

fn denied(metrics: &str, reason: &str) -> f64 {
    support::metric_sum(
        metrics,
        "ferry_xds_auth_denied_total",
        &format!("reason=\"{reason}\""),
    )
}

/// Waits until Ferry has refused `more` further handshakes or streams
/// for `reason`, counting from `before`.
async fn wait_denied(ferry: &Ferry, reason: &str, before: f64, more: f64) {
    eventually(WAIT, &format!("{reason} refusals counted"), || async {
        denied(&ferry.metrics().await, reason) >= before + more
    })
    .await;
}

/// The identity `/status` shows for the stream of `node`, once it has one.
async fn status_identity(ferry: &Ferry, node: &str) -> Option<String> {
    let status = ferry.status().await;
    status["xds"]["clients"]
        .as_array()?
        .iter()
        .find(|c| c["node_id"] == node)
        .map(|c| c["identity"].as_str().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_envoy_over_mutual_tls_routes_and_a_plaintext_one_gets_nothing() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let pki = Pki::new();
    let ferry = secured_ferry(&backends, &pki, true).await;
    let (cert, key) = pki.client("envoy-1", "envoy-1", &[ENVOY_ID]);

    // The shipped example, pointed at this control plane.
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy-bootstrap-mtls.yaml"),
    )
    .expect("example bootstrap");
    let admin_port = free_port();
    let bootstrap = example
        .replace(
            "address: ferry-control.ferry-system.svc",
            "address: 127.0.0.1",
        )
        .replace("ferry-control.ferry-system.svc", "localhost")
        .replace(
            "port_value: 18000",
            &format!("port_value: {}", ferry.xds_port),
        )
        .replace("port_value: 9901", &format!("port_value: {admin_port}"))
        .replace("/etc/envoy/xds/tls.crt", &cert.display().to_string())
        .replace("/etc/envoy/xds/tls.key", &key.display().to_string())
        .replace(
            "/etc/envoy/xds/ca.crt",
            &pki.server_ca_file.display().to_string(),
        );
    let dir = tempfile::tempdir().expect("tempdir");
    let envoy = Envoy::spawn(&ferry, dir, &bootstrap, "envoy-1".into(), admin_port);
    envoy.wait_routing().await;
    let port = envoy.listener_port;
    eventually(WAIT, "envoy routes over mTLS", || async move {
        split(port, HOST, 10).await.get("old/a") == Some(&10)
    })
    .await;
    assert_eq!(
        status_identity(&ferry, "envoy-1").await.as_deref(),
        Some(ENVOY_ID)
    );

    // The same Envoy without TLS: every handshake fails, nothing is sent.
    let before = denied(&ferry.metrics().await, "tls_handshake");
    let plain_admin = free_port();
    let plain_bootstrap = ferry_loadtests::envoy_bootstrap_split(
        "envoy-plain",
        "ferry-test",
        "DELTA_GRPC",
        std::net::SocketAddr::from(([127, 0, 0, 1], ferry.xds_port)),
        std::net::SocketAddr::from(([127, 0, 0, 1], ferry.xds_port)),
        std::net::SocketAddr::from(([127, 0, 0, 1], plain_admin)),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = Envoy::spawn(
        &ferry,
        dir,
        &plain_bootstrap,
        "envoy-plain".into(),
        plain_admin,
    );
    wait_denied(&ferry, "tls_handshake", before, 2.0).await;
    let clusters = plain
        .admin("/config_dump?resource=dynamic_active_clusters")
        .await;
    assert!(!clusters.contains("checkout.shop"), "{clusters}");
    let listeners = plain.admin("/listeners").await;
    assert!(listeners.trim().is_empty(), "{listeners}");
    assert_eq!(status_identity(&ferry, "envoy-plain").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_proxies_with_a_certificate_or_a_token_route_and_a_plaintext_one_gets_nothing() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let pki = Pki::new();
    let ferry = secured_ferry(&backends, &pki, true).await;
    let url = format!("https://127.0.0.1:{}", ferry.xds_port);
    let ca_file = pki.server_ca_file.display().to_string();

    let (cert, key) = pki.client("proxy-1", "proxy-1", &[]);
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let mtls = FerryProxy::spawn(
        &url,
        Some("proxy-1"),
        &["--xds-ca", &ca_file, "--xds-cert", &cert, "--xds-key", &key],
    );
    let token_file = write(pki.dir.path(), "token", &format!("{TOKEN}\n"));
    let token = FerryProxy::spawn(
        &url,
        Some("token-proxy"),
        &[
            "--xds-ca",
            &ca_file,
            "--xds-token-file",
            &token_file.display().to_string(),
        ],
    );
    for proxy in [&mtls, &token] {
        proxy.wait_ready().await;
        let port = proxy.listen_port;
        eventually(WAIT, "the proxy routes", || async move {
            split(port, HOST, 10).await.get("old/a") == Some(&10)
        })
        .await;
    }
    assert_eq!(
        status_identity(&ferry, "proxy-1").await.as_deref(),
        Some("proxy-1")
    );
    assert_eq!(
        status_identity(&ferry, "token-proxy").await.as_deref(),
        Some("token-proxy")
    );
    // The web console shows who each client is.
    let browser = support::Browser::start().await;
    browser
        .client
        .goto(&format!("http://127.0.0.1:{}/", ferry.admin_port))
        .await
        .expect("open the console");
    eventually(WAIT, "identities in the console's client table", || async {
        let cells = browser
            .eval(
                r#"return ["proxy-1", "token-proxy"].map(n => {
                    const row = document.querySelector(`#clients tr[data-node="${n}"]`);
                    return row ? row.cells[1].textContent : null;
                });"#,
            )
            .await;
        cells == serde_json::json!(["proxy-1", "token-proxy"])
    })
    .await;
    browser.close().await;

    // Plaintext to a TLS port: refused at the handshake, again and again.
    let before = denied(&ferry.metrics().await, "tls_handshake");
    let plain = FerryProxy::spawn(
        &format!("http://127.0.0.1:{}", ferry.xds_port),
        Some("proxy-plain"),
        &[],
    );
    wait_denied(&ferry, "tls_handshake", before, 2.0).await;
    // A token the file does not list: UNAUTHENTICATED, nothing served.
    let before = denied(&ferry.metrics().await, "unknown_token");
    let wrong_token = write(pki.dir.path(), "wrong-token", "guessed");
    let guessed = FerryProxy::spawn(
        &url,
        Some("token-proxy"),
        &[
            "--xds-ca",
            &ca_file,
            "--xds-token-file",
            &wrong_token.display().to_string(),
        ],
    );
    wait_denied(&ferry, "unknown_token", before, 1.0).await;
    for proxy in [&plain, &guessed] {
        let (code, _) = support::http_get(proxy.admin_port, "localhost", "/ready")
            .await
            .expect("admin answers");
        assert_ne!(
            code, 200,
            "a proxy refused by the control plane is not ready"
        );
        let dump = proxy.admin("/config_dump").await;
        assert!(!dump.contains("checkout.shop"), "{dump}");
    }
}

fn node(id: &str, cluster: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        cluster: cluster.to_owned(),
        ..Default::default()
    })
}

/// Opens a delta stream claiming `node_id` and returns its first
/// message: the first response, or the status that ended the stream.
async fn first_delta(
    channel: Channel,
    node_id: &str,
    cluster: &str,
) -> (
    Result<DeltaDiscoveryResponse, tonic::Status>,
    mpsc::Sender<DeltaDiscoveryRequest>,
    Option<tonic::Streaming<DeltaDiscoveryResponse>>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: node(node_id, cluster),
        type_url: CLUSTER_TYPE.to_owned(),
        ..Default::default()
    })
    .await
    .expect("queue");
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut stream = match client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return (Err(status), tx, None),
    };
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an answer in time");
    let first = match first {
        Ok(Some(response)) => Ok(response),
        Ok(None) => Err(tonic::Status::unknown("the stream ended without a status")),
        Err(status) => Err(status),
    };
    (first, tx, Some(stream))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_may_claim_only_the_nodes_its_identity_covers() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let pki = Pki::new();
    let ferry = secured_ferry(&backends, &pki, true).await;
    let port = ferry.xds_port;
    let edge_1 = || Some(leaf(&pki.fleet_ca, "edge-1"));

    // Claims its own node: served.
    let channel = tls_channel(port, &pki.server_ca, edge_1())
        .await
        .expect("connect");
    let (first, _tx, _stream) = first_delta(channel, "edge-1", "edge").await;
    let first = first.expect("edge-1 is served");
    assert!(!first.resources.is_empty(), "{first:?}");

    // Claims another node, or its node in another cluster: refused before
    // anything is sent.
    for (node_id, cluster, reason) in [
        ("edge-2", "edge", "node_not_allowed"),
        ("edge-1", "core", "cluster_not_allowed"),
    ] {
        let channel = tls_channel(port, &pki.server_ca, edge_1())
            .await
            .expect("connect");
        let (first, _tx, _stream) = first_delta(channel, node_id, cluster).await;
        let status = first.expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(node_id) || status.message().contains(cluster),
            "{status:?}"
        );
        assert!(denied(&ferry.metrics().await, reason) >= 1.0);
    }

    // A certificate of the fleet CA that the file does not list.
    let channel = tls_channel(port, &pki.server_ca, Some(leaf(&pki.fleet_ca, "stranger")))
        .await
        .expect("connect");
    let (first, _tx, _stream) = first_delta(channel, "edge-1", "edge").await;
    assert_eq!(first.expect_err("refused").code(), Code::PermissionDenied);

    // TLS without any credential.
    let channel = tls_channel(port, &pki.server_ca, None)
        .await
        .expect("connect");
    let (first, _tx, _stream) = first_delta(channel, "edge-1", "edge").await;
    assert_eq!(first.expect_err("refused").code(), Code::Unauthenticated);

    // A certificate from another CA does not get through the handshake.
    let rogue = ca("rogue");
    let refused = match tls_channel(port, &pki.server_ca, Some(leaf(&rogue, "edge-1"))).await {
        Err(_) => true,
        Ok(channel) => first_delta(channel, "edge-1", "edge").await.0.is_err(),
    };
    assert!(refused, "a certificate of another CA got in");

    let metrics = ferry.metrics().await;
    assert!(denied(&metrics, "unknown_certificate") >= 1.0, "{metrics}");
    assert!(denied(&metrics, "no_credentials") >= 1.0, "{metrics}");
    // Only edge-1's own stream is a client.
    let status = ferry.status().await;
    let clients = status["xds"]["clients"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        clients.iter().all(|c| c["node_id"] == "edge-1"),
        "{clients:?}"
    );

    // A new identity is added to the file: it gets in without a restart.
    let edge_3 = || Some(leaf(&pki.fleet_ca, "edge-3"));
    let auth_file = pki.dir.path().join("xds-auth.yaml");
    support::replace(
        &auth_file,
        &AUTH.replace(
            "tokens:",
            "  - identity: edge-3\n    nodes: [edge-3]\ntokens:",
        ),
    );
    eventually(
        WAIT,
        "edge-3 served after the auth file changed",
        || async {
            let channel = tls_channel(port, &pki.server_ca, edge_3())
                .await
                .expect("connect");
            first_delta(channel, "edge-3", "edge").await.0.is_ok()
        },
    )
    .await;
    // An edit that does not parse keeps the identities in force.
    support::replace(&auth_file, "clients: [{identity: edge-3}]\n");
    eventually(WAIT, "the broken auth file refused", || async {
        support::metric_sum(
            &ferry.metrics().await,
            "ferry_xds_auth_reloads_total",
            "result=\"error\"",
        ) >= 1.0
    })
    .await;
    let channel = tls_channel(port, &pki.server_ca, edge_3())
        .await
        .expect("connect");
    let (first, _tx, _stream) = first_delta(channel, "edge-3", "edge").await;
    first.expect("edge-3 still served");
}

fn report(node_id: &str, cluster: &str, errors: u64) -> LoadStatsRequest {
    LoadStatsRequest {
        node: node(node_id, "edge"),
        cluster_stats: vec![ClusterStats {
            cluster_name: cluster.to_owned(),
            upstream_locality_stats: vec![UpstreamLocalityStats {
                total_successful_requests: 0,
                total_error_requests: errors,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Sends one load report on a new LRS stream over `channel`; the status
/// the stream ended with, if it was refused.
async fn send_report(channel: Channel, report: LoadStatsRequest) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(2);
    tx.send(report).await.expect("queue");
    let mut client = LoadReportingServiceClient::new(channel);
    let mut stream = client
        .stream_load_stats(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_load_reports_cannot_move_a_migration_gate() {
    use ferry_proto::ferry::v1::GetMigrationRequest;
    use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let pki = Pki::new();
    let ferry = secured_ferry(&backends, &pki, true).await;
    let port = ferry.xds_port;
    let (cert, key) = pki.client("proxy-1", "proxy-1", &[]);
    let ca_file = pki.server_ca_file.display().to_string();
    let proxy = FerryProxy::spawn(
        &format!("https://127.0.0.1:{port}"),
        Some("proxy-1"),
        &[
            "--xds-ca",
            &ca_file,
            "--xds-cert",
            &cert.display().to_string(),
            "--xds-key",
            &key.display().to_string(),
        ],
    );
    proxy.wait_ready().await;
    let steady = support::Steady::start_for(proxy.listen_port, HOST, Duration::from_secs(60));
    let mut api = MigrationsClient::connect(format!("http://127.0.0.1:{}", ferry.api_port))
        .await
        .expect("api");
    let created = api
        .create_migration(support::migration_plan(&[50.0, 100.0], "3s"))
        .await
        .expect("create")
        .into_inner();

    // Forgers: every new-side request an error, for the proxy's node.
    let target = "checkout.shop:8080@new";
    let edge_1 = leaf(&pki.fleet_ca, "edge-1");
    let mut last = None;
    let mut forged = 0;
    for _ in 0..600 {
        // edge-1's certificate posing as proxy-1.
        let channel = tls_channel(port, &pki.server_ca, Some(edge_1.clone()))
            .await
            .expect("connect");
        let refused = send_report(channel, report("proxy-1", target, 1_000)).await;
        assert_eq!(
            refused.expect_err("posing is refused").code(),
            Code::PermissionDenied
        );
        // No credential at all.
        let channel = tls_channel(port, &pki.server_ca, None)
            .await
            .expect("connect");
        let refused = send_report(channel, report("proxy-1", target, 1_000)).await;
        assert_eq!(
            refused.expect_err("anonymous is refused").code(),
            Code::Unauthenticated
        );
        forged += 2;
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
    let outcomes = steady.stop().await;
    let last = last.unwrap_or_else(|| panic!("never ended\n{}", ferry.log()));
    assert_eq!(last.stage, "DONE", "{last:?}");
    assert!(forged >= 4, "{forged}");
    // The gates saw the proxy's real traffic, and none of the forged errors.
    assert!(!last.gates.is_empty(), "{last:?}");
    for gate in &last.gates {
        assert_eq!(gate.target_errors, 0, "{gate:?}");
    }
    assert!(
        last.gates.iter().any(|g| g.target_requests >= 20),
        "{last:?}"
    );
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| o != "old/a" && o != "new/a")
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let metrics = ferry.metrics().await;
    assert!(
        support::metric_sum(
            &metrics,
            "ferry_lrs_refused_total",
            "reason=\"node_not_allowed\""
        ) >= 1.0,
        "{metrics}"
    );

    // The control: the same report, from the identity that may send it
    // and with an ADS stream of its own, counts.
    let before = support::metric_sum(&metrics, "ferry_lrs_requests_total", "outcome=\"error\"");
    let channel = tls_channel(port, &pki.server_ca, Some(edge_1.clone()))
        .await
        .expect("connect");
    let (first, _tx, _stream) = first_delta(channel, "edge-1", "edge").await;
    first.expect("edge-1 is served");
    let channel = tls_channel(port, &pki.server_ca, Some(edge_1))
        .await
        .expect("connect");
    send_report(channel, report("edge-1", target, 7))
        .await
        .expect("edge-1 may report");
    eventually(WAIT, "edge-1's report counted", || async {
        support::metric_sum(
            &ferry.metrics().await,
            "ferry_lrs_requests_total",
            "outcome=\"error\"",
        ) >= before + 7.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_serves_new_connections_and_keeps_open_streams() {
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let pki = Pki::new();
    let ferry = secured_ferry(&backends, &pki, false).await;
    let port = ferry.xds_port;

    // A stream opened on the first certificate.
    let channel = tls_channel(port, &pki.server_ca, None)
        .await
        .expect("connect");
    let (first, _tx, stream) = first_delta(channel, "watcher", "edge").await;
    first.expect("served over TLS");
    let mut stream = stream.expect("open stream");

    // The certificate is replaced by one from another CA.
    let next_ca = ca("ferry-xds-ca-2");
    let (cert, key) = leaf(&next_ca, "ferry-control");
    support::replace(&pki.server_key, &key);
    support::replace(&pki.server_cert, &cert);
    eventually(WAIT, "new connections get the new certificate", || async {
        tls_channel(port, &next_ca, None).await.is_ok()
    })
    .await;
    assert!(
        tls_channel(port, &pki.server_ca, None).await.is_err(),
        "a new connection still got the old certificate"
    );
    let metrics = ferry.metrics().await;
    assert!(
        support::metric_sum(&metrics, "ferry_xds_tls_reloads_total", "result=\"ok\"") >= 1.0,
        "{metrics}"
    );

    // The open stream still gets updates.
    let mut next = catalog(&backends);
    next = next.replace(
        "weights: {old: 10000, new: 0}",
        "weights: {old: 5000, new: 5000}",
    );
    next.push_str(&format!(
        "  - name: payments\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n",
        backends.addr("old/a")
    ));
    ferry.write_catalog(&next);
    let update = tokio::time::timeout(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(response))
                    if response
                        .resources
                        .iter()
                        .any(|r| r.name.starts_with("payments.shop")) =>
                {
                    return Ok(response);
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Err("the stream ended".to_owned()),
                Err(status) => return Err(format!("{status:?}")),
            }
        }
    })
    .await
    .expect("an update in time");
    update.expect("the stream opened before the rotation carries on");
}
