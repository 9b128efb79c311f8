//! The web console in a real browser (headless Chromium over WebDriver):
//! a control plane on two Kubernetes clusters (real-protocol test API
//! servers), `ferry proxy` carrying traffic, a weight change, a migration
//! and a lost API server, each seen on the page without a reload.

mod support;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::traffic_client::TrafficClient;
use ferry_proto::ferry::v1::{ClusterWeight, SetWeightsRequest};
use ferry_testkube::{Credentials, TestKube};
use serde_json::Value;
use support::{Backends, Browser, Ferry, FerryProxy, Steady, eventually};
use tonic::transport::Channel;

const TOKEN: &str = "console-test-token";
const HOST: &str = "checkout.shop";

/// Every service row on the page: service → cluster → (bp, stale).
const ROWS: &str = r#"
const out = {};
document.querySelectorAll("tr[data-service]").forEach(function (tr) {
  const s = tr.getAttribute("data-service");
  out[s] = out[s] || {};
  out[s][tr.getAttribute("data-cluster")] = {
    bp: Number(tr.getAttribute("data-weight-bp")),
    stale: tr.getAttribute("data-stale") === "true",
  };
});
return out;
"#;

/// Where the page shows the migration: stage, step, timeline, verdicts.
const MIGRATION: &str = r#"
const card = document.querySelector("[data-migration]");
if (!card) return null;
return {
  stage: card.getAttribute("data-stage"),
  step: Number(card.getAttribute("data-step")),
  timeline: Array.from(card.querySelectorAll(".timeline span")).map(s => s.getAttribute("data-stage") + ":" + s.getAttribute("data-state")),
  verdicts: Array.from(card.querySelectorAll("tr[data-outcome]")).map(r => r.getAttribute("data-outcome")),
  pin: document.querySelector(".pin") ? document.querySelector(".pin").textContent : null,
};
"#;

/// A kubeconfig for `kube` in `dir`, and its catalog line.
fn kube_entry(dir: &std::path::Path, name: &str, kube: &TestKube) -> String {
    let path = dir.join(format!("{name}.kubeconfig"));
    kube.kubeconfig_with(&path, name, Credentials::Token(TOKEN))
        .expect("write kubeconfig");
    format!("    - {{name: {name}, kubeconfig: {}}}\n", path.display())
}

/// Exports `checkout.shop` in `kube` with one endpoint at `addr`.
fn export_checkout(kube: &TestKube, addr: &str) {
    let sa: std::net::SocketAddr = addr.parse().expect("backend address");
    kube.apply_service(
        "shop",
        "checkout",
        &[("ferry.io/export", "true")],
        &[("http", 8080)],
    );
    kube.apply_endpoint_slice(
        "shop",
        "checkout-0",
        "checkout",
        &[(&sa.ip().to_string(), true, true, false, Some("z1"))],
        &[("http", i32::from(sa.port()))],
    );
}

async fn api_channel(ferry: &Ferry) -> Channel {
    let url = format!("http://127.0.0.1:{}", ferry.api_port);
    Channel::from_shared(url)
        .expect("API URL")
        .connect()
        .await
        .expect("traffic API")
}

/// The weights `/status` reports for `checkout.shop`: cluster → bp.
fn status_weights(status: &Value) -> Value {
    let service = status["catalog"]["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == HOST))
        .expect("checkout.shop in /status");
    let mut out = serde_json::Map::new();
    for (cluster, c) in service["clusters"].as_object().expect("clusters") {
        out.insert(cluster.clone(), c["weight_bp"].clone());
    }
    Value::Object(out)
}

fn page_weights(rows: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (cluster, c) in rows[HOST].as_object().into_iter().flatten() {
        out.insert(cluster.clone(), c["bp"].clone());
    }
    Value::Object(out)
}

async fn page_errors(browser: &Browser) -> Vec<String> {
    let errors = browser
        .eval(r##"return Array.from(document.querySelectorAll("#errors li")).map(li => li.textContent);"##)
        .await;
    serde_json::from_value(errors).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_weights_migrations_and_stale_clusters_live() {
    ferry_testkube::install_crypto_provider();
    let backends = Backends::start(&["old/a", "new/a"]).await;
    let (old, new) = (TestKube::start(TOKEN).await, TestKube::start(TOKEN).await);
    export_checkout(&old, &backends.addr("old/a"));
    export_checkout(&new, &backends.addr("new/a"));
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth.yaml");
    std::fs::write(
        &auth,
        format!("tokens:\n  - {{identity: sre, role: write, token: {TOKEN}}}\n"),
    )
    .expect("auth file");
    let catalog = format!(
        "kubernetes:\n  clusters:\n{}{}",
        kube_entry(dir.path(), "old", &old),
        kube_entry(dir.path(), "new", &new)
    );
    let ferry = Ferry::start_with(&catalog, &["--api-auth", &auth.to_string_lossy()]).await;
    eventually(
        Duration::from_secs(20),
        "checkout.shop in both clusters",
        || async {
            let status = ferry.status().await;
            status_weights(&status)
                .as_object()
                .is_some_and(|w| w.len() == 2)
        },
    )
    .await;

    // Without the token the console is refused; with it, served.
    let base = format!("http://127.0.0.1:{}", ferry.admin_port);
    let (code, _) = support::http_get(ferry.admin_port, "localhost", "/")
        .await
        .expect("GET /");
    assert_eq!(code, 401, "the console needs the --api-auth token");
    let (code, page) =
        support::http_get(ferry.admin_port, "localhost", &format!("/?token={TOKEN}"))
            .await
            .expect("GET /?token");
    assert_eq!(code, 200);
    println!("console page: {} bytes of HTML", page.len());

    let proxy = FerryProxy::start(ferry.xds_port).await;
    let steady = Steady::start_paced(
        proxy.listen_port,
        HOST,
        Duration::from_millis(5),
        Duration::from_secs(150),
    );

    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{base}/?token={TOKEN}"))
        .await
        .expect("open the console");
    browser.eval("window.ferryMarker = 42; return null;").await;

    // (1) The rows and weights match /status.
    eventually(
        Duration::from_secs(10),
        "service rows on the page",
        || async {
            let rows = browser.eval(ROWS).await;
            page_weights(&rows) == status_weights(&ferry.status().await)
        },
    )
    .await;

    // (2) A weight set through the traffic API shows within 3 s.
    let mut traffic = TrafficClient::new(api_channel(&ferry).await);
    let mut request = tonic::Request::new(SetWeightsRequest {
        service: HOST.into(),
        weights: vec![
            ClusterWeight {
                cluster: "old".into(),
                basis_points: 9000,
            },
            ClusterWeight {
                cluster: "new".into(),
                basis_points: 1000,
            },
        ],
        reason: "canary from the console test".into(),
        ..Default::default()
    });
    let bearer = format!("Bearer {TOKEN}").parse().expect("header value");
    request.metadata_mut().insert("authorization", bearer);
    let set_at = Instant::now();
    traffic.set_weights(request).await.expect("set weights");
    eventually(
        Duration::from_secs(3),
        "the new weights on the page",
        || async {
            let rows = browser.eval(ROWS).await;
            rows[HOST]["new"]["bp"] == 1000 && rows[HOST]["old"]["bp"] == 9000
        },
    )
    .await;
    println!("weights shown {:?} after the API call", set_at.elapsed());
    assert_eq!(
        browser.eval("return window.ferryMarker;").await,
        42,
        "the page was not reloaded"
    );

    // (3) A migration's stage and step advance on the page.
    let mut migrations = MigrationsClient::new(api_channel(&ferry).await);
    let mut create = tonic::Request::new(support::migration_plan(&[50.0, 100.0], "2s"));
    let bearer = format!("Bearer {TOKEN}").parse().expect("header value");
    create.metadata_mut().insert("authorization", bearer);
    let created = migrations
        .create_migration(create)
        .await
        .expect("create migration")
        .into_inner();
    let seen = RefCell::new(BTreeSet::new());
    let pin_seen = RefCell::new(None);
    eventually(
        Duration::from_secs(60),
        "the migration DONE on the page",
        || async {
            let m = browser.eval(MIGRATION).await;
            if m.is_null() {
                return false;
            }
            seen.borrow_mut().insert((
                m["stage"].as_str().unwrap_or("").to_owned(),
                m["step"].as_u64(),
            ));
            if let Some(pin) = m["pin"].as_str() {
                pin_seen.borrow_mut().get_or_insert_with(|| pin.to_owned());
            }
            m["stage"] == "DONE"
        },
    )
    .await;
    let (seen, pin_seen) = (seen.into_inner(), pin_seen.into_inner());
    println!("migration {} as seen on the page: {seen:?}", created.id);
    for step in [1, 2] {
        assert!(
            seen.contains(&("SHIFT".to_owned(), Some(step))),
            "step {step} of SHIFT never shown: {seen:?}"
        );
    }
    let pin = pin_seen.expect("the migration's pin was shown on the service");
    assert!(pin.contains(&created.id), "pin owner shown: {pin}");
    let done = browser.eval(MIGRATION).await;
    let timeline: Vec<&str> = done["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(timeline.first(), Some(&"VALIDATE:done"), "{timeline:?}");
    assert_eq!(timeline.last(), Some(&"DONE:done"), "{timeline:?}");
    assert!(
        done["verdicts"]
            .as_array()
            .is_some_and(|v| v.iter().any(|o| o == "pass")),
        "gate verdicts shown: {done}"
    );

    // Charts drawn from Ferry's proxy reports, latency included.
    eventually(Duration::from_secs(15), "charts with latency", || async {
        let charts = browser
            .eval(r#"return {
                canvases: document.querySelectorAll(".uplot canvas").length,
                notes: Array.from(document.querySelectorAll(".chart .note")).map(n => n.textContent).join(""),
                summary: Array.from(document.querySelectorAll("tr[data-service] td.muted")).map(t => t.textContent),
            };"#)
            .await;
        charts["canvases"].as_u64().unwrap_or(0) >= 3
            && charts["notes"] == ""
            && charts["summary"]
                .as_array()
                .is_some_and(|s| s.iter().any(|t| t.as_str().is_some_and(|t| t.contains("p99"))))
    })
    .await;

    // (4) A lost API server shows its cluster as stale.
    old.stop().await;
    eventually(Duration::from_secs(20), "old shown stale", || async {
        let rows = browser.eval(ROWS).await;
        let health = browser
            .eval(r#"const r = document.querySelector('[data-kube-cluster="old"]'); return r && r.getAttribute("data-health");"#)
            .await;
        rows[HOST]["old"]["stale"] == true && rows[HOST]["new"]["stale"] == false && health == "stale"
    })
    .await;

    // The state pushed each second, and the page's screenshot.
    let (_, state) = support::http_get(
        ferry.admin_port,
        "localhost",
        &format!("/console/state?token={TOKEN}"),
    )
    .await
    .expect("GET /console/state");
    println!("console state: {} bytes of JSON", state.len());
    let png = browser.client.screenshot().await.expect("screenshot");
    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshot.png");
    std::fs::write(&artifact, &png).expect("write the screenshot");
    println!("screenshot: {}", artifact.display());

    // (5) Nothing went wrong in the page.
    let errors = page_errors(&browser).await;
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
    assert_eq!(
        browser.eval("return window.ferryMarker;").await,
        42,
        "the page was not reloaded"
    );
    browser.close().await;
    let answers = steady.stop().await;
    assert!(!answers.is_empty());
}
