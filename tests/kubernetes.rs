//! Discovery from real-protocol Kubernetes API servers (one per fake
//! cluster, HTTPS with bearer tokens or client certificates, driven through
//! the real kube-rs client), served to the real Envoy by `ferry control`.

mod support;

use std::time::Duration;

use ferry_testkube::{ClientCert, Credentials, TestKube};
use serde_json::Value;
use support::{Ads, Backends, Envoy, Ferry, eventually, share, split};

const TOKEN: &str = "s3cret-token";
const EXPORT: &[(&str, &str)] = &[("ferry.io/export", "true")];

/// Starts an Envoy and waits until it routes `checkout.shop` (its routes
/// and clusters warmed), so a measured split counts routed requests only.
async fn routing_envoy(ferry: &Ferry) -> Envoy {
    let envoy = Envoy::start(ferry, Ads::Delta).await;
    let port = envoy.listener_port;
    eventually(
        Duration::from_secs(15),
        "envoy routes checkout.shop",
        || async move {
            split(port, "checkout.shop", 20)
                .await
                .keys()
                .all(|k| !k.starts_with("status:") && !k.starts_with("error:"))
        },
    )
    .await;
    envoy
}

struct Cluster {
    name: &'static str,
    kube: TestKube,
}

async fn clusters(names: &[&'static str]) -> Vec<Cluster> {
    ferry_testkube::install_crypto_provider();
    let mut out = Vec::new();
    for name in names {
        out.push(Cluster {
            name,
            kube: TestKube::start(TOKEN).await,
        });
    }
    out
}

/// A catalog file section listing `clusters`, with kubeconfigs written
/// into `dir` (`bad_token` gives that cluster the wrong token).
fn kube_section(dir: &std::path::Path, clusters: &[&Cluster], bad_token: Option<&str>) -> String {
    let with: Vec<(&Cluster, Credentials<'_>)> = clusters
        .iter()
        .map(|c| {
            let token = if bad_token == Some(c.name) {
                "wrong-token"
            } else {
                TOKEN
            };
            (*c, Credentials::Token(token))
        })
        .collect();
    kube_section_with(dir, &with)
}

/// [`kube_section`] with each cluster's kubeconfig user given explicitly.
fn kube_section_with(dir: &std::path::Path, clusters: &[(&Cluster, Credentials<'_>)]) -> String {
    let mut yaml = String::from("kubernetes:\n  clusters:\n");
    for (c, credentials) in clusters {
        let path = dir.join(format!("{}.kubeconfig", c.name));
        c.kube
            .kubeconfig_with(&path, c.name, *credentials)
            .expect("write kubeconfig");
        yaml.push_str(&format!(
            "    - {{name: {}, kubeconfig: {}}}\n",
            c.name,
            path.display()
        ));
    }
    yaml
}

fn addr_parts(addr: &str) -> (String, i32) {
    let sa: std::net::SocketAddr = addr.parse().expect("socket address");
    (sa.ip().to_string(), i32::from(sa.port()))
}

/// Exports `checkout.shop` in `cluster` with one slice per backend address.
fn export_checkout(kube: &TestKube, addrs: &[String]) {
    kube.apply_service("shop", "checkout", EXPORT, &[("http", 8080)]);
    for (i, addr) in addrs.iter().enumerate() {
        set_slice(kube, &format!("checkout-{i}"), addr, true);
    }
}

fn set_slice(kube: &TestKube, slice: &str, addr: &str, ready: bool) {
    let (ip, port) = addr_parts(addr);
    kube.apply_endpoint_slice(
        "shop",
        slice,
        "checkout",
        &[(ip.as_str(), ready, ready, false, Some("z1"))],
        &[("http", port)],
    );
}

fn service<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["catalog"]["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

fn ready_in(status: &Value, service_name: &str, cluster: &str) -> Option<u64> {
    service(status, service_name)?["clusters"][cluster]["ready"].as_u64()
}

/// The xDS snapshot reflects the current catalog.
fn settled(status: &Value) -> bool {
    status["xds"]["catalog_version"] == status["catalog"]["version"]
}

/// The cluster's entry in `/status` (`catalog.kubernetes[]`).
fn cluster_status<'a>(status: &'a Value, cluster: &str) -> Option<&'a Value> {
    status["catalog"]["kubernetes"]
        .as_array()?
        .iter()
        .find(|c| c["cluster"] == cluster)
}

fn health(status: &Value, cluster: &str) -> Option<String> {
    cluster_status(status, cluster).and_then(|c| c["health"].as_str().map(str::to_owned))
}

async fn wait_status(ferry: &Ferry, what: &str, within: Duration, check: impl Fn(&Value) -> bool) {
    eventually(within, what, || async { check(&ferry.status().await) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_in_two_clusters_is_one_service_with_two_backends() {
    let cs = clusters(&["east", "west", "north"]).await;
    let backends = Backends::start_at(&[("east/a", "127.0.0.11"), ("west/a", "127.0.0.12")]).await;
    export_checkout(&cs[0].kube, &[backends.addr("east/a")]);
    export_checkout(&cs[1].kube, &[backends.addr("west/a")]);
    // North runs the service without exporting it, and another exported one.
    cs[2]
        .kube
        .apply_service("shop", "checkout", &[], &[("http", 8080)]);
    cs[2]
        .kube
        .apply_service("shop", "cart", EXPORT, &[("http", 80)]);

    let dir = tempfile::tempdir().expect("tempdir");
    let ferry = Ferry::start(&kube_section(dir.path(), &[&cs[0], &cs[1], &cs[2]], None)).await;
    wait_status(
        &ferry,
        "checkout in east and west",
        Duration::from_secs(15),
        |s| {
            ready_in(s, "checkout.shop", "east") == Some(1)
                && ready_in(s, "checkout.shop", "west") == Some(1)
                && ["east", "west", "north"]
                    .iter()
                    .all(|c| health(s, c).as_deref() == Some("connected"))
        },
    )
    .await;
    let status = ferry.status().await;
    let checkout = service(&status, "checkout.shop").expect("checkout");
    assert_eq!(
        checkout["clusters"].as_object().map(|m| m.len()),
        Some(2),
        "{checkout}"
    );
    assert!(
        service(&status, "cart.shop").is_some(),
        "cart exported from north"
    );
    for c in ["east", "west", "north"] {
        assert_eq!(health(&status, c).as_deref(), Some("connected"), "{c}");
    }
    assert!(
        ferry
            .metrics()
            .await
            .contains("ferry_discovery_cluster_up{cluster=\"east\"} 1")
    );

    let envoy = routing_envoy(&ferry).await;
    let counts = split(envoy.listener_port, "checkout.shop", 400).await;
    assert!((share(&counts, "east/") - 0.5).abs() < 0.1, "{counts:?}");
    assert!((share(&counts, "west/") - 0.5).abs() < 0.1, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_turning_unready_stops_its_traffic_within_two_seconds() {
    let cs = clusters(&["east", "west"]).await;
    let backends = Backends::start_at(&[
        ("east/a", "127.0.0.21"),
        ("east/b", "127.0.0.22"),
        ("west/a", "127.0.0.23"),
    ])
    .await;
    export_checkout(
        &cs[0].kube,
        &[backends.addr("east/a"), backends.addr("east/b")],
    );
    export_checkout(&cs[1].kube, &[backends.addr("west/a")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let ferry = Ferry::start(&kube_section(dir.path(), &[&cs[0], &cs[1]], None)).await;
    wait_status(
        &ferry,
        "both clusters listed",
        Duration::from_secs(15),
        |s| {
            ready_in(s, "checkout.shop", "east") == Some(2)
                && ready_in(s, "checkout.shop", "west") == Some(1)
        },
    )
    .await;
    let envoy = routing_envoy(&ferry).await;
    let before = split(envoy.listener_port, "checkout.shop", 300).await;
    assert!(
        before.get("east/b").copied().unwrap_or(0) > 20,
        "{before:?}"
    );

    set_slice(&cs[0].kube, "checkout-1", &backends.addr("east/b"), false);
    let port = envoy.listener_port;
    eventually(
        Duration::from_secs(2),
        "no traffic to east/b",
        || async move {
            !split(port, "checkout.shop", 30)
                .await
                .contains_key("east/b")
        },
    )
    .await;
    let after = split(port, "checkout.shop", 300).await;
    assert!(!after.contains_key("east/b"), "{after:?}");
    assert_eq!(
        share(&after, "east/") + share(&after, "west/"),
        1.0,
        "{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_api_server_leaves_its_endpoints_serving_and_stale() {
    let cs = clusters(&["east", "west"]).await;
    let east = ["127.0.0.31:8080", "127.0.0.32:8080"].map(String::from);
    export_checkout(&cs[0].kube, &east[..1]);
    export_checkout(&cs[1].kube, &["127.0.0.33:8080".to_owned()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let ferry = Ferry::start(&kube_section(dir.path(), &[&cs[0], &cs[1]], None)).await;
    wait_status(&ferry, "east listed", Duration::from_secs(15), |s| {
        ready_in(s, "checkout.shop", "east") == Some(1)
            && health(s, "east").as_deref() == Some("connected")
            && health(s, "west").as_deref() == Some("connected")
    })
    .await;

    cs[0].kube.stop().await;
    wait_status(
        &ferry,
        "east stale, still serving",
        Duration::from_secs(15),
        |s| health(s, "east").as_deref() == Some("stale"),
    )
    .await;
    let status = ferry.status().await;
    assert_eq!(
        ready_in(&status, "checkout.shop", "east"),
        Some(1),
        "endpoints kept while stale"
    );
    assert_eq!(
        service(&status, "checkout.shop").expect("svc")["clusters"]["east"]["stale"],
        true
    );
    assert_eq!(
        health(&status, "west").as_deref(),
        Some("connected"),
        "west unaffected"
    );
    assert!(
        ferry
            .metrics()
            .await
            .contains("ferry_discovery_cluster_up{cluster=\"east\"} 0")
    );
    // `ferry status` (the traffic API) flags it too.
    let (ok, out, err) = support::ferry_cli(&ferry, &["status", "-o", "json"]);
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    let backends = &listed["services"][0]["backends"];
    let stale_of = |cluster: &str| {
        backends
            .as_array()
            .and_then(|b| b.iter().find(|b| b["cluster"] == cluster))
            .map(|b| b["stale"].clone())
    };
    assert_eq!(stale_of("east"), Some(serde_json::json!(true)), "{listed}");
    assert_eq!(stale_of("west"), Some(serde_json::json!(false)), "{listed}");

    // Changes made while Ferry could not see them converge on return.
    set_slice(&cs[0].kube, "checkout-1", &east[1], true);
    cs[0].kube.delete_endpoint_slice("shop", "checkout-0");
    cs[0].kube.restart().await;
    wait_status(
        &ferry,
        "east back and converged",
        Duration::from_secs(40),
        |s| {
            health(s, "east").as_deref() == Some("connected")
                && ready_in(s, "checkout.shop", "east") == Some(1)
        },
    )
    .await;
    let status = ferry.status().await;
    assert_eq!(
        service(&status, "checkout.shop").expect("svc")["clusters"]["east"]["stale"],
        false
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_relists_without_lost_or_phantom_endpoints() {
    let cs = clusters(&["east"]).await;
    let addrs: Vec<String> = (1..=3).map(|i| format!("127.0.0.4{i}:8080")).collect();
    export_checkout(&cs[0].kube, &addrs);
    let dir = tempfile::tempdir().expect("tempdir");
    let ferry = Ferry::start(&kube_section(dir.path(), &[&cs[0]], None)).await;
    wait_status(&ferry, "three endpoints", Duration::from_secs(15), |s| {
        ready_in(s, "checkout.shop", "east") == Some(3)
    })
    .await;
    let lists_before = cs[0].kube.list_requests();

    // Changes the watch will only see through a re-list: history expired,
    // watch connections dropped. Two slices go, one comes: only a watcher
    // that saw both sides ends at two endpoints.
    cs[0].kube.expire_history();
    cs[0].kube.delete_endpoint_slice("shop", "checkout-0");
    cs[0].kube.delete_endpoint_slice("shop", "checkout-1");
    set_slice(&cs[0].kube, "checkout-9", "127.0.0.49:8080", true);
    cs[0].kube.drop_watches();

    wait_status(
        &ferry,
        "re-listed and converged",
        Duration::from_secs(20),
        |s| ready_in(s, "checkout.shop", "east") == Some(2),
    )
    .await;
    assert!(
        cs[0].kube.list_requests() > lists_before,
        "no re-list happened"
    );
    // And it stays there: nothing phantom arrives later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = ferry.status().await;
    assert_eq!(
        service(&status, "checkout.shop").expect("svc")["clusters"]["east"]["endpoints"],
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_marks_only_that_cluster_unauthorized() {
    let cs = clusters(&["east", "west"]).await;
    export_checkout(&cs[0].kube, &["127.0.0.51:8080".to_owned()]);
    export_checkout(&cs[1].kube, &["127.0.0.52:8080".to_owned()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let ferry = Ferry::start(&kube_section(dir.path(), &[&cs[0], &cs[1]], Some("west"))).await;
    wait_status(
        &ferry,
        "west unauthorized, east connected",
        Duration::from_secs(15),
        |s| {
            health(s, "west").as_deref() == Some("unauthorized")
                && ready_in(s, "checkout.shop", "east") == Some(1)
        },
    )
    .await;
    let status = ferry.status().await;
    let west = status["catalog"]["kubernetes"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["cluster"] == "west"))
        .cloned()
        .unwrap_or_default();
    assert!(
        west["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("401"),
        "{west}"
    );
    assert!(
        !ferry.log().contains("wrong-token"),
        "a credential was logged"
    );
    assert!(!ferry.log().contains(TOKEN), "a credential was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_endpoints_list_through_continue_tokens() {
    let cs = clusters(&["east"]).await;
    let kube = &cs[0].kube;
    kube.apply_service("shop", "big", EXPORT, &[("http", 8080)]);
    // 200 slices of 100 endpoints: the watcher lists them 500 at a time.
    let mut ips: Vec<String> = Vec::with_capacity(100);
    for s in 0..200u32 {
        ips.clear();
        for e in 0..100u32 {
            let n = s * 100 + e;
            ips.push(format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255));
        }
        let endpoints: Vec<_> = ips
            .iter()
            .map(|ip| (ip.as_str(), true, true, false, None))
            .collect();
        kube.apply_endpoint_slice(
            "shop",
            &format!("big-{s}"),
            "big",
            &endpoints,
            &[("http", 8080)],
        );
    }
    // Unrelated slices page through too.
    for s in 0..600u32 {
        kube.apply_endpoint_slice(
            "other",
            &format!("noise-{s}"),
            "noise",
            &[("10.200.0.1", true, true, false, None)],
            &[("http", 80)],
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ferry = Ferry::start(&kube_section(dir.path(), &[&cs[0]], None)).await;
    wait_status(&ferry, "20,000 endpoints", Duration::from_secs(60), |s| {
        ready_in(s, "big.shop", "east") == Some(20_000)
    })
    .await;
    assert!(
        kube.list_requests() >= 3,
        "800 slices at 500 a page need several list requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_added_and_removed_in_config_are_watched_and_withdrawn() {
    let cs = clusters(&["east", "west"]).await;
    export_checkout(&cs[0].kube, &["127.0.0.61:8080".to_owned()]);
    export_checkout(&cs[1].kube, &["127.0.0.62:8080".to_owned()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let ferry = Ferry::start(&kube_section(dir.path(), &[&cs[0]], None)).await;
    wait_status(&ferry, "east only", Duration::from_secs(15), |s| {
        ready_in(s, "checkout.shop", "east") == Some(1)
    })
    .await;

    ferry.write_catalog(&kube_section(dir.path(), &[&cs[0], &cs[1]], None));
    wait_status(&ferry, "west added", Duration::from_secs(15), |s| {
        ready_in(s, "checkout.shop", "west") == Some(1)
            && ready_in(s, "checkout.shop", "east") == Some(1)
    })
    .await;
    wait_status(&ferry, "xds caught up", Duration::from_secs(5), settled).await;
    let version = ferry.status().await["xds"]["snapshot_version"]
        .as_u64()
        .unwrap_or(0);

    ferry.write_catalog(&kube_section(dir.path(), &[&cs[1]], None));
    wait_status(&ferry, "east withdrawn", Duration::from_secs(15), |s| {
        service(s, "checkout.shop").is_some_and(|svc| svc["clusters"].get("east").is_none())
            && health(s, "east").is_none()
    })
    .await;
    let status = ferry.status().await;
    wait_status(&ferry, "withdrawal pushed", Duration::from_secs(5), |s| {
        settled(s) && s["xds"]["snapshot_version"].as_u64().unwrap_or(0) > version
    })
    .await;
    assert_eq!(ready_in(&status, "checkout.shop", "west"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_export_exports_a_service_and_a_cluster_without_its_crd_uses_labels() {
    let cs = clusters(&["east", "west"]).await;
    let backends = Backends::start_at(&[("east/a", "127.0.0.71"), ("west/a", "127.0.0.72")]).await;
    // East exports checkout by a ServiceExport alone (no label), and runs
    // cart without exporting it.
    let east = &cs[0].kube;
    east.apply_service("shop", "checkout", &[], &[("http", 8080)]);
    set_slice(east, "checkout-0", &backends.addr("east/a"), true);
    east.apply_service_export("shop", "checkout");
    east.apply_service("shop", "cart", &[], &[("http", 80)]);
    // West has no ServiceExport CRD: its label exports.
    cs[1].kube.set_service_export_crd(false);
    export_checkout(&cs[1].kube, &[backends.addr("west/a")]);

    let dir = tempfile::tempdir().expect("tempdir");
    let ferry = Ferry::start(&kube_section(dir.path(), &[&cs[0], &cs[1]], None)).await;
    wait_status(
        &ferry,
        "checkout in east (ServiceExport) and west (label)",
        Duration::from_secs(15),
        |s| {
            ready_in(s, "checkout.shop", "east") == Some(1)
                && ready_in(s, "checkout.shop", "west") == Some(1)
                && health(s, "west").as_deref() == Some("connected")
        },
    )
    .await;
    let status = ferry.status().await;
    assert!(
        service(&status, "cart.shop").is_none(),
        "cart is not exported"
    );
    let (east_status, west_status) = (
        cluster_status(&status, "east").expect("east"),
        cluster_status(&status, "west").expect("west"),
    );
    assert_eq!(east_status["service_exports"], "watched", "{east_status}");
    assert_eq!(
        west_status["service_exports"], "not_installed",
        "{west_status}"
    );
    assert_eq!(west_status["last_error"], Value::Null, "{west_status}");
    assert_eq!(east_status["services"], 1, "{east_status}");
    let metrics = ferry.metrics().await;
    assert!(metrics.contains("ferry_discovery_cluster_up{cluster=\"west\"} 1"));
    assert!(metrics.contains("ferry_discovery_service_exports_watched{cluster=\"east\"} 1"));
    assert!(metrics.contains("ferry_discovery_service_exports_watched{cluster=\"west\"} 0"));

    let envoy = routing_envoy(&ferry).await;
    let counts = split(envoy.listener_port, "checkout.shop", 200).await;
    assert!((share(&counts, "east/") - 0.5).abs() < 0.15, "{counts:?}");
    assert!((share(&counts, "west/") - 0.5).abs() < 0.15, "{counts:?}");

    // Deleting the ServiceExport withdraws east's backend, and its traffic.
    assert!(east.delete_service_export("shop", "checkout"));
    wait_status(&ferry, "east withdrawn", Duration::from_secs(10), |s| {
        service(s, "checkout.shop").is_some_and(|svc| svc["clusters"].get("east").is_none())
    })
    .await;
    let port = envoy.listener_port;
    eventually(
        Duration::from_secs(5),
        "no traffic to east",
        || async move { share(&split(port, "checkout.shop", 30).await, "east/") == 0.0 },
    )
    .await;
    let after = split(port, "checkout.shop", 100).await;
    assert_eq!(share(&after, "west/"), 1.0, "{after:?}");

    // West never looked unhealthy: its missing CRD is an info line, not a
    // warning or an error.
    let log = ferry.log();
    assert!(
        log.lines().any(|l| l.contains("INFO")
            && l.contains("no ServiceExport CRD")
            && l.contains("west")),
        "{log}"
    );
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains("west"))
        .collect();
    assert!(loud.is_empty(), "{loud:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_kubeconfig_connects_and_a_foreign_one_is_unauthorized() {
    let cs = clusters(&["east", "west", "north"]).await;
    let backends = Backends::start_at(&[("east/a", "127.0.0.81"), ("north/a", "127.0.0.83")]).await;
    export_checkout(&cs[0].kube, &[backends.addr("east/a")]);
    export_checkout(&cs[1].kube, &["127.0.0.82:8080".to_owned()]);
    export_checkout(&cs[2].kube, &[backends.addr("north/a")]);
    // East: a certificate its CA signed. West: one from a CA it does not
    // trust. North: a bearer token.
    let east_cert = cs[0].kube.client_cert("ferry-east");
    let foreign = ClientCert::foreign("ferry-west");
    let dir = tempfile::tempdir().expect("tempdir");
    let ferry = Ferry::start(&kube_section_with(
        dir.path(),
        &[
            (&cs[0], Credentials::ClientCert(&east_cert)),
            (&cs[1], Credentials::ClientCert(&foreign)),
            (&cs[2], Credentials::Token(TOKEN)),
        ],
    ))
    .await;
    wait_status(
        &ferry,
        "east and north serving, west unauthorized",
        Duration::from_secs(15),
        |s| {
            ready_in(s, "checkout.shop", "east") == Some(1)
                && ready_in(s, "checkout.shop", "north") == Some(1)
                && health(s, "west").as_deref() == Some("unauthorized")
                && health(s, "east").as_deref() == Some("connected")
                && health(s, "north").as_deref() == Some("connected")
        },
    )
    .await;
    let status = ferry.status().await;
    assert_eq!(health(&status, "east").as_deref(), Some("connected"));
    assert_eq!(health(&status, "north").as_deref(), Some("connected"));
    let west = cluster_status(&status, "west").expect("west");
    let error = west["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("client certificate") && error.contains("UnknownCA"),
        "{west}"
    );
    let checkout = service(&status, "checkout.shop").expect("checkout");
    assert!(checkout["clusters"].get("west").is_none(), "{checkout}");
    // East's API server saw Ferry as the certificate's user.
    let by_user = cs[0].kube.client_cert_requests();
    assert!(
        by_user.get("ferry-east").is_some_and(|n| *n >= 2),
        "{by_user:?}"
    );
    assert!(
        ferry
            .metrics()
            .await
            .contains("ferry_discovery_cluster_up{cluster=\"west\"} 0")
    );

    let envoy = routing_envoy(&ferry).await;
    let counts = split(envoy.listener_port, "checkout.shop", 200).await;
    assert!((share(&counts, "east/") - 0.5).abs() < 0.15, "{counts:?}");
    assert!((share(&counts, "north/") - 0.5).abs() < 0.15, "{counts:?}");

    // No key material in the log.
    let log = ferry.log();
    assert!(!log.contains("PRIVATE KEY"), "a key was logged");
    for cert in [&east_cert, &foreign] {
        for line in cert.key_pem().lines().filter(|l| !l.starts_with("-----")) {
            assert!(!log.contains(line), "a key was logged");
        }
    }
}
