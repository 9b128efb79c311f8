//! Upstream TLS material served as SDS secrets over ADS: real Envoy and
//! `ferry proxy` present a renewed client certificate to a mutual-TLS
//! backend once its files change, with no catalog or cluster change; a
//! broken file keeps the last good secret and says so on `/status`; and
//! the file-path mode still sends paths.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::{
    Ads, Ca, Envoy, Ferry, FerryProxy, MtlsBackend, ca, eventually, http_get, leaf, write,
};

const HOST: &str = "checkout.shop";
const NAME: &str = "ledger.internal";
const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    dir: tempfile::TempDir,
    backend_ca: Ca,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    trust_file: PathBuf,
    backend: MtlsBackend,
    /// The client certificate first written (PEM cert, key).
    first: (String, String),
}

/// A backend requiring a client certificate from `clients-1`, and the
/// proxies' certificate (CN `proxy-gen-1`) from it in files.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend_ca = ca("backend-ca");
    let clients = ca("clients-1");
    let first = leaf(&clients, "proxy-gen-1");
    let ca_file = write(dir.path(), "ca.pem", &backend_ca.pem);
    let cert_file = write(dir.path(), "client.pem", &first.0);
    let key_file = write(dir.path(), "client.key", &first.1);
    let trust_file = write(dir.path(), "backend-trusts.pem", &clients.pem);
    let backend = MtlsBackend::start(&backend_ca, NAME, &trust_file).await;
    Setup {
        dir,
        backend_ca,
        ca_file,
        cert_file,
        key_file,
        trust_file,
        backend,
        first,
    }
}

fn catalog(s: &Setup) -> String {
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    tls: {{server_name: {NAME}, ca_file: {}, cert_file: {}, key_file: {}}}\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n",
        s.ca_file.display(),
        s.cert_file.display(),
        s.key_file.display(),
        s.backend.addr
    )
}

async fn answers(port: u16, expected: &str) {
    let expected = expected.to_owned();
    eventually(WAIT, &format!("{expected:?} through port {port}"), || {
        let expected = expected.clone();
        async move { http_get(port, HOST, "/").await == Ok((200, expected)) }
    })
    .await;
}

/// The `version_info` Envoy holds for its one dynamic cluster.
async fn envoy_cluster_version(envoy: &Envoy) -> String {
    let dump: serde_json::Value = serde_json::from_str(
        &envoy
            .admin("/config_dump?resource=dynamic_active_clusters")
            .await,
    )
    .expect("config dump");
    dump["configs"][0]["version_info"]
        .as_str()
        .unwrap_or_else(|| panic!("no cluster version: {dump}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_client_certificates_reach_envoy_and_ferry_proxy_as_secrets() {
    let s = setup().await;
    let ferry = Ferry::start_with(&catalog(&s), &["--upstream-tls-reload-interval", "200ms"]).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    answers(envoy.listener_port, "mtls-backend proxy-gen-1").await;
    answers(proxy.listen_port, "mtls-backend proxy-gen-1").await;
    let cluster_version = envoy_cluster_version(&envoy).await;
    let catalog_version = ferry.status().await["catalog"]["version"].clone();
    let clusters = envoy
        .admin("/config_dump?resource=dynamic_active_clusters")
        .await;
    assert!(
        !clusters.contains("client.pem"),
        "paths were sent: {clusters}"
    );

    // Renewal: a certificate from another CA, which the backend now trusts
    // instead of the first.
    let clients_2 = ca("clients-2");
    let (cert, key) = leaf(&clients_2, "proxy-gen-2");
    support::replace(&s.key_file, &key);
    support::replace(&s.cert_file, &cert);
    support::replace(&s.trust_file, &clients_2.pem);
    s.backend.reload_clients();
    answers(envoy.listener_port, "mtls-backend proxy-gen-2").await;
    answers(proxy.listen_port, "mtls-backend proxy-gen-2").await;
    // Neither the catalog nor Envoy's cluster changed: only the secret.
    assert_eq!(ferry.status().await["catalog"]["version"], catalog_version);
    assert_eq!(envoy_cluster_version(&envoy).await, cluster_version);
    // The old certificate is refused by the backend now.
    let old = s
        .backend
        .get_with(&s.backend_ca, NAME, &s.first.0, &s.first.1)
        .await;
    assert!(old.is_err(), "the old certificate still got in: {old:?}");
    let new = s.backend.get_with(&s.backend_ca, NAME, &cert, &key).await;
    assert_eq!(new.as_deref(), Ok("mtls-backend proxy-gen-2"));

    // A broken certificate file: the last good secret keeps serving, and
    // /status says why.
    support::replace(&s.cert_file, "not a certificate");
    eventually(WAIT, "the broken file on /status", || async {
        let status = ferry.status().await;
        status["xds"]["secrets"].as_array().is_some_and(|secrets| {
            secrets.iter().any(|secret| {
                secret["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("client.pem"))
                    && secret["version"].is_string()
            })
        })
    })
    .await;
    for port in [envoy.listener_port, proxy.listen_port] {
        assert_eq!(
            http_get(port, HOST, "/").await,
            Ok((200, "mtls-backend proxy-gen-2".to_owned()))
        );
    }
    let metrics = ferry.metrics().await;
    assert!(
        support::metric_sum(
            &metrics,
            "ferry_xds_secret_reloads_total",
            "result=\"error\""
        ) >= 1.0,
        "{metrics}"
    );
    drop(s.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_mode_sends_paths_and_serves_no_secrets() {
    let s = setup().await;
    let ferry = Ferry::start_with(&catalog(&s), &["--upstream-tls", "files"]).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    answers(envoy.listener_port, "mtls-backend proxy-gen-1").await;
    let clusters = envoy
        .admin("/config_dump?resource=dynamic_active_clusters")
        .await;
    assert!(clusters.contains("client.pem"), "{clusters}");
    let secrets = envoy
        .admin("/config_dump?resource=dynamic_active_secrets")
        .await;
    assert!(!secrets.contains("ferry-cert-"), "{secrets}");
    let status = ferry.status().await;
    assert_eq!(status["xds"]["secrets"], serde_json::json!([]), "{status}");
}
