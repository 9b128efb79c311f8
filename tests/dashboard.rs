//! The dashboard and the rules as an SRE meets them: a real Prometheus
//! scrapes a real `ferry control`, `ferry proxy` and Envoy carrying traffic
//! through a migration that completes and one that rolls back; every
//! panel query of `deploy/grafana/ferry.json` and every recording rule of
//! `deploy/prometheus/rules.yaml` must return data (so a typo in a metric
//! name fails), and the rolled-back alert must fire.

mod support;

use std::path::Path;
use std::time::Duration;

use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::{CreateMigrationRequest, GetMigrationRequest};
use support::{Ads, Backends, Envoy, Ferry, FerryProxy, Prometheus, Steady};

/// Two static services, and a watched Kubernetes cluster (for the
/// discovery panels).
fn catalog(backends: &Backends, kubeconfig: &Path) -> String {
    let service = |name: &str, label: &str| {
        format!(
            "  - name: {name}\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"{}\"]}}\n      new: {{endpoints: [\"{}\"]}}\n    weights: {{old: 10000, new: 0}}\n",
            backends.addr(&format!("old/{label}")),
            backends.addr(&format!("new/{label}"))
        )
    };
    format!(
        "kubernetes:\n  clusters:\n    - {{name: home, kubeconfig: {}}}\nservices:\n{}{}",
        kubeconfig.display(),
        service("checkout", "a"),
        service("cart", "b")
    )
}

/// The result of an instant query (an empty list when there is none).
async fn query(prometheus: &Prometheus, expr: &str) -> Vec<serde_json::Value> {
    let path: String = form_urlencoded::Serializer::new("/api/v1/query?".to_owned())
        .append_pair("query", expr)
        .finish();
    let Ok((200, body)) = support::http_get(prometheus.port, "localhost", &path).await else {
        return Vec::new();
    };
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["data"]["result"].as_array().cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_panel_and_rule_returns_data_and_a_rollback_fires_its_alert() {
    let backends = Backends::start(&["old/a", "new/a", "old/b", "new/b"]).await;
    backends.set_status("new/b", 503);
    let (_kube, _dir, kubeconfig) = support::web_cluster("dashboard-token").await;
    let ferry = Ferry::start(&catalog(&backends, &kubeconfig)).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    let envoy = Envoy::start(&ferry, Ads::Delta).await;
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let targets = [
        format!("127.0.0.1:{}", ferry.admin_port),
        format!("127.0.0.1:{}", proxy.admin_port),
        format!("127.0.0.1:{}", envoy.admin_port),
    ];
    let prometheus = Prometheus::start_scraping(
        &[
            ("ferry-control", &targets[0], "/metrics"),
            ("ferry-proxy", &targets[1], "/metrics"),
            ("envoy", &targets[2], "/stats/prometheus"),
        ],
        Some(&deploy.join("prometheus/rules.yaml")),
    )
    .await;
    let load: Vec<Steady> = [proxy.listen_port, envoy.listener_port]
        .into_iter()
        .flat_map(|port| {
            ["checkout.shop", "cart.shop"]
                .map(|host| Steady::start_for(port, host, Duration::from_secs(120)))
        })
        .collect();

    // Prometheus has seen every target before anything moves (as it has
    // in production long before a migration starts).
    for job in ["ferry-control", "ferry-proxy", "envoy"] {
        let expr = format!("up{{job=\"{job}\"}} == 1");
        let seen = tokio::time::timeout(Duration::from_secs(30), async {
            while query(&prometheus, &expr).await.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
        .await;
        assert!(seen.is_ok(), "Prometheus never scraped {job}");
    }
    let mut api = MigrationsClient::connect(format!("http://127.0.0.1:{}", ferry.api_port))
        .await
        .expect("API");
    let mut ids = Vec::new();
    for service in ["checkout.shop", "cart.shop"] {
        let created = api
            .create_migration(CreateMigrationRequest {
                service: service.into(),
                ..support::migration_plan(&[50.0, 100.0], "3s")
            })
            .await
            .expect("create")
            .into_inner();
        ids.push(created.id);
    }
    let mut outcomes = Vec::new();
    for id in &ids {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let stage = loop {
            let stage = api
                .get_migration(GetMigrationRequest { id: id.clone() })
                .await
                .map(|m| m.into_inner().stage)
                .unwrap_or_default();
            if matches!(stage.as_str(), "DONE" | "ROLLED_BACK" | "FAILED")
                || std::time::Instant::now() > deadline
            {
                break stage;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        outcomes.push(stage);
    }
    assert_eq!(outcomes, ["DONE", "ROLLED_BACK"], "{}", ferry.log());

    // Every panel's every query returns data.
    let text = std::fs::read_to_string(deploy.join("grafana/ferry.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let mut exprs: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push((
                    panel["title"].as_str().unwrap_or_default().to_owned(),
                    expr.replace("$service", ".*"),
                ));
            }
        }
    }
    // And every recording rule.
    let rules = std::fs::read_to_string(deploy.join("prometheus/rules.yaml")).expect("rules");
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- record: ") {
            exprs.push(("recording rule".to_owned(), name.to_owned()));
        }
    }
    for (title, expr) in &exprs {
        let mut last = Vec::new();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                last = query(&prometheus, expr).await;
                if !last.is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
        if found.is_err() {
            let metrics = ferry.metrics().await;
            let discovery: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("ferry_discovery"))
                .collect();
            panic!(
                "{title}: `{expr}` returns no data\n{discovery:?}\n{}",
                ferry.status().await["catalog"]["kubernetes"]
            );
        }
    }
    // The rollback fires its alert.
    let firing = tokio::time::timeout(Duration::from_secs(30), async {
        while query(
            &prometheus,
            "ALERTS{alertname=\"FerryMigrationRolledBack\",alertstate=\"firing\"}",
        )
        .await
        .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    if firing.is_err() {
        let rules = support::http_get(prometheus.port, "localhost", "/api/v1/rules").await;
        panic!(
            "FerryMigrationRolledBack never fired: {:?}\n{rules:?}",
            query(
                &prometheus,
                "increase(ferry_migrate_transitions_total{action=\"migration_rolled_back\"}[15m])"
            )
            .await,
        );
    }
    for steady in load {
        drop(steady.stop().await);
    }
}
