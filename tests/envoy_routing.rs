//! The real Envoy, configured only by `ferry control` over ADS, routes each
//! service's traffic across cluster backends by the catalog's weights.
//! Every scenario runs with state-of-the-world and with delta xDS.

mod support;

use std::time::{Duration, Instant};

use support::{Ads, Backends, Envoy, Ferry, Steady, eventually, share, split};

const HOST: &str = "checkout.shop";

/// A catalog with one service, `checkout.shop`, over clusters old and new.
fn catalog(old: &[String], new: &[String], weights: Option<(u32, u32)>) -> String {
    let list = |eps: &[String]| {
        eps.iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let weights = weights
        .map(|(o, n)| format!("    weights: {{old: {o}, new: {n}}}\n"))
        .unwrap_or_default();
    format!(
        "services:\n  - name: checkout\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [{}]}}\n      new: {{endpoints: [{}]}}\n{weights}",
        list(old),
        list(new)
    )
}

async fn setup(ads: Ads, weights: (u32, u32)) -> (Backends, Ferry, Envoy) {
    let backends = Backends::start(&["old/a", "old/b", "new/a"]).await;
    let yaml = catalog(
        &[backends.addr("old/a"), backends.addr("old/b")],
        &[backends.addr("new/a")],
        Some(weights),
    );
    let ferry = Ferry::start(&yaml).await;
    let envoy = Envoy::start(&ferry, ads).await;
    (backends, ferry, envoy)
}

/// Waits until `n` consecutive requests all land on `prefix`.
async fn converge(envoy: &Envoy, prefix: &str, within: Duration) -> Duration {
    let started = Instant::now();
    let port = envoy.listener_port;
    eventually(within, &format!("all traffic on {prefix}"), || async move {
        share(&split(port, HOST, 20).await, prefix) == 1.0
    })
    .await;
    started.elapsed()
}

async fn weights_split_traffic(ads: Ads) {
    let (_backends, _ferry, envoy) = setup(ads, (9000, 1000)).await;
    let counts = split(envoy.listener_port, HOST, 2000).await;
    let new = share(&counts, "new/");
    let old = share(&counts, "old/");
    assert!(
        (old + new - 1.0).abs() < f64::EPSILON,
        "failed requests: {counts:?}"
    );
    assert!(
        (new - 0.10).abs() <= 0.03,
        "new share {new:.3} not within 10% ± 3%: {counts:?}"
    );
    // Within old, both endpoints serve.
    assert!(
        counts.get("old/a").copied().unwrap_or(0) > 300,
        "{counts:?}"
    );
    assert!(
        counts.get("old/b").copied().unwrap_or(0) > 300,
        "{counts:?}"
    );
}

async fn shifting_moves_all_traffic_without_dropping_a_request(ads: Ads) {
    let (backends, ferry, envoy) = setup(ads, (9000, 1000)).await;
    let steady = Steady::start(envoy.listener_port, HOST);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let edited = Instant::now();
    ferry.write_catalog(&catalog(
        &[backends.addr("old/a"), backends.addr("old/b")],
        &[backends.addr("new/a")],
        Some((0, 10000)),
    ));
    let took = converge(&envoy, "new/", Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answers = steady.stop().await;
    let failed: Vec<_> = answers
        .iter()
        .filter(|(_, k)| !k.starts_with("old/") && !k.starts_with("new/"))
        .collect();
    assert!(
        answers.len() > 50,
        "steady stream too thin: {}",
        answers.len()
    );
    assert!(
        failed.is_empty(),
        "dropped requests during the shift: {failed:?}"
    );
    let late_old = answers
        .iter()
        .filter(|(t, k)| *t > edited + took && k.starts_with("old/"))
        .count();
    assert_eq!(late_old, 0, "old still served after convergence");
}

async fn unready_and_removed_endpoints_get_no_traffic(ads: Ads) {
    let (backends, ferry, envoy) = setup(ads, (10000, 0)).await;
    let (a, b) = (backends.addr("old/a"), backends.addr("old/b"));
    // old/b turns not ready.
    let yaml = catalog(
        &[a.clone(), b.clone()],
        &[backends.addr("new/a")],
        Some((10000, 0)),
    )
    .replace(
        &format!("\"{b}\""),
        &format!("{{address: \"{b}\", ready: false}}"),
    );
    ferry.write_catalog(&yaml);
    converge(&envoy, "old/a", Duration::from_secs(2)).await;
    let counts = split(envoy.listener_port, HOST, 200).await;
    assert_eq!(counts.get("old/a"), Some(&200), "{counts:?}");

    // old/a is removed; old/b is ready again.
    ferry.write_catalog(&catalog(&[b], &[backends.addr("new/a")], Some((10000, 0))));
    converge(&envoy, "old/b", Duration::from_secs(2)).await;
    let counts = split(envoy.listener_port, HOST, 200).await;
    assert_eq!(counts.get("old/b"), Some(&200), "{counts:?}");
}

async fn invalid_edit_keeps_routing_and_surfaces_the_error(ads: Ads) {
    let (backends, ferry, envoy) = setup(ads, (10000, 0)).await;
    let version = ferry.status().await["xds"]["snapshot_version"].clone();
    // Weights that do not sum to 10000, moving traffic to new: refused.
    ferry.write_catalog(&catalog(
        &[backends.addr("old/a"), backends.addr("old/b")],
        &[backends.addr("new/a")],
        Some((0, 9999)),
    ));
    eventually(
        Duration::from_secs(5),
        "catalog error on /status",
        || async { ferry.status().await["catalog"]["source"]["last_error"].is_string() },
    )
    .await;
    let status = ferry.status().await;
    let error = status["catalog"]["source"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("catalog.yaml"), "{error}");
    assert!(
        error.contains("checkout.shop") && error.contains("weights"),
        "{error}"
    );
    assert_eq!(
        status["xds"]["snapshot_version"], version,
        "a refused edit must not change what is served"
    );
    assert!(
        ferry
            .metrics()
            .await
            .contains("ferry_discovery_catalog_file_valid 0")
    );
    let log = ferry.log();
    assert!(log.contains("catalog file refused"), "{log}");

    let counts = split(envoy.listener_port, HOST, 200).await;
    assert_eq!(share(&counts, "old/"), 1.0, "{counts:?}");

    // A valid edit afterwards applies and clears the error.
    ferry.write_catalog(&catalog(
        &[backends.addr("old/a"), backends.addr("old/b")],
        &[backends.addr("new/a")],
        Some((0, 10000)),
    ));
    converge(&envoy, "new/", Duration::from_secs(2)).await;
    assert!(ferry.status().await["catalog"]["source"]["last_error"].is_null());
}

async fn restart_keeps_envoy_routing_and_converges(ads: Ads) {
    let (backends, mut ferry, envoy) = setup(ads, (5000, 5000)).await;
    let node = envoy.node_id.clone();
    ferry.kill();
    // Envoy keeps its last config while the control plane is away.
    let counts = split(envoy.listener_port, HOST, 400).await;
    assert!((share(&counts, "new/") - 0.5).abs() < 0.1, "{counts:?}");
    assert!(
        (share(&counts, "old/") + share(&counts, "new/") - 1.0).abs() < f64::EPSILON,
        "{counts:?}"
    );

    ferry.restart().await;
    let variant = ads.status_name();
    eventually(
        Duration::from_secs(15),
        "envoy reconnected and ACKed routes",
        || {
            let (ferry, node) = (&ferry, node.clone());
            async move {
                let status = ferry.status().await;
                status["xds"]["clients"].as_array().is_some_and(|clients| {
                    clients.iter().any(|c| {
                        c["node_id"] == node.as_str()
                            && c["variant"] == variant
                            && c["types"]["rds"]["acked_version"].is_string()
                            && c["types"]["cds"]["acked_version"].is_string()
                    })
                })
            }
        },
    )
    .await;
    let counts = split(envoy.listener_port, HOST, 400).await;
    assert!((share(&counts, "new/") - 0.5).abs() < 0.1, "{counts:?}");
    // And it follows the restarted control plane's changes.
    ferry.write_catalog(&catalog(
        &[backends.addr("old/a"), backends.addr("old/b")],
        &[backends.addr("new/a")],
        Some((0, 10000)),
    ));
    converge(&envoy, "new/", Duration::from_secs(3)).await;
}

macro_rules! both_variants {
    ($($scenario:ident),* $(,)?) => {
        mod sotw {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Ads::Sotw).await;
                }
            )*
        }
        mod delta {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Ads::Delta).await;
                }
            )*
        }
    };
}

both_variants!(
    weights_split_traffic,
    shifting_moves_all_traffic_without_dropping_a_request,
    unready_and_removed_endpoints_get_no_traffic,
    invalid_edit_keeps_routing_and_surfaces_the_error,
    restart_keeps_envoy_routing_and_converges,
);

/// The catalog's request policies reach Envoy as its own fields (route
/// timeout and retry policy; outlier detection, health checks and HTTP/2
/// upstream options on clusters), and Envoy accepts and applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_policies_are_accepted_and_applied_by_envoy() {
    let backends = Backends::start(&["old/a", "old/b", "new/a"]).await;
    let mut yaml = catalog(
        &[backends.addr("old/a"), backends.addr("old/b")],
        &[backends.addr("new/a")],
        Some((5000, 5000)),
    );
    yaml.push_str(
        "    timeout: 3s\n    retries: {attempts: 2, on: [5xx, connect-failure], per_try_timeout: 1s}\n    outlier_detection: {consecutive_5xx: 4, base_ejection_time: 10s}\n    health_check: {path: /healthz, interval: 1s}\n",
    );
    // TLS to the endpoints, with a CA file Envoy can read.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&ca_file, params.self_signed(&key).unwrap().pem()).unwrap();
    // And a client certificate (mutual TLS), which Envoy loads at once.
    let (cert_file, key_file) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client = rcgen::CertificateParams::new(vec!["proxy.ferry".to_owned()])
        .unwrap()
        .self_signed(&client_key)
        .unwrap();
    std::fs::write(&cert_file, client.pem()).unwrap();
    std::fs::write(&key_file, client_key.serialize_pem()).unwrap();
    yaml.push_str(&format!(
        "  - name: ledger\n    namespace: shop\n    ports: [{{name: grpc, port: 9090}}]\n    protocol: grpc\n    health_check: {{path: /healthz, interval: 1s}}\n    tls: {{server_name: ledger.internal, ca_file: {}, cert_file: {}, key_file: {}}}\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n",
        ca_file.display(),
        cert_file.display(),
        key_file.display(),
        backends.addr("old/a")
    ));
    let ferry = Ferry::start(&yaml).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    // Measured once Envoy routes (its routes and clusters warmed).
    let port = envoy.listener_port;
    eventually(Duration::from_secs(15), "envoy routes", || async move {
        split(port, HOST, 20)
            .await
            .keys()
            .all(|k| k.starts_with("old/") || k.starts_with("new/"))
    })
    .await;
    let counts = split(envoy.listener_port, HOST, 200).await;
    assert!(
        (share(&counts, "old/") + share(&counts, "new/") - 1.0).abs() < f64::EPSILON,
        "{counts:?}"
    );
    let clusters = envoy
        .admin("/config_dump?resource=dynamic_active_clusters")
        .await;
    for field in [
        "outlier_detection",
        "health_checks",
        "http2_protocol_options",
        "/healthz",
        // The TLS material comes as SDS secrets, not as paths.
        "tls_certificate_sds_secret_configs",
        "validation_context_sds_secret_config",
        "\"codec_client_type\": \"HTTP2\"",
    ] {
        assert!(
            clusters.contains(field),
            "Envoy holds no {field}: {clusters}"
        );
    }
    assert!(!clusters.contains("client.pem"), "{clusters}");
    let secrets = envoy
        .admin("/config_dump?resource=dynamic_active_secrets")
        .await;
    for field in [
        "ferry-ca-",
        "ferry-cert-",
        "trusted_ca",
        "certificate_chain",
    ] {
        assert!(secrets.contains(field), "Envoy holds no {field}: {secrets}");
    }
    let routes = envoy
        .admin("/config_dump?resource=dynamic_route_configs")
        .await;
    for field in [
        "retry_policy",
        "connect-failure,5xx",
        "retriable_request_headers",
    ] {
        assert!(routes.contains(field), "Envoy holds no {field}: {routes}");
    }
    let upgrades = envoy.admin("/config_dump?resource=dynamic_listeners").await;
    assert!(upgrades.contains("websocket"), "{upgrades}");
}
