//! `--deploy kube` against two in-process API servers: Ferry copies a
//! service's workload from `old` to `new`, stripped and labelled, never
//! touching what `new` already had; a rollback deletes only what it made;
//! cleanup scales the source to 0 after the drain; and without a write
//! credential the migration is refused.

mod support;

use std::time::Duration;

use ferry_proto::ferry::v1::migrations_client::MigrationsClient;
use ferry_proto::ferry::v1::{CreateMigrationRequest, GetMigrationRequest, Migration};
use ferry_testkube::{ResourceKind, TestKube};
use serde_json::{Value, json};
use support::{Backends, Ferry, FerryProxy, Steady};
use tonic::transport::Channel;

struct Clusters {
    old: TestKube,
    new: TestKube,
    dir: tempfile::TempDir,
    backends: Backends,
}

const OLD_CLUSTER_IP: &str = "10.96.0.50";

/// `old` runs web.shop: a Deployment with its ConfigMap, Secret,
/// ServiceAccount, HPA and PDB, behind an exported Service with one ready
/// endpoint. `new` is empty but for a ConfigMap of the same name as the
/// workload's, which is someone else's.
async fn clusters() -> Clusters {
    ferry_testkube::install_crypto_provider();
    let backends = Backends::start(&["old/web", "new/web"]).await;
    let old = TestKube::start("old-admin").await;
    let new = TestKube::start("new-admin").await;
    let apply = |kube: &TestKube, kind: ResourceKind, object: Value| {
        kube.apply(kind, object).expect("valid object");
    };
    apply(
        &old,
        ResourceKind::Service,
        json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": {"ferry.io/export": "true"}},
            "spec": {"selector": {"app": "web"}, "clusterIP": OLD_CLUSTER_IP, "clusterIPs": [OLD_CLUSTER_IP],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }),
    );
    apply(
        &old,
        ResourceKind::ConfigMap,
        json!({
            "metadata": {"name": "web-config", "namespace": "shop"}, "data": {"mode": "fast"},
        }),
    );
    apply(
        &old,
        ResourceKind::Secret,
        json!({
            "metadata": {"name": "web-secret", "namespace": "shop"}, "data": {"key": "c2VjcmV0"},
        }),
    );
    apply(
        &old,
        ResourceKind::ServiceAccount,
        json!({"metadata": {"name": "web-sa", "namespace": "shop"}}),
    );
    apply(
        &old,
        ResourceKind::Deployment,
        json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "serviceAccountName": "web-sa",
                        "containers": [{"name": "web", "image": "registry.example/web:1",
                                        "envFrom": [{"configMapRef": {"name": "web-config"}}]}],
                        "volumes": [{"name": "s", "secret": {"secretName": "web-secret"}}],
                    },
                },
            },
        }),
    );
    apply(
        &old,
        ResourceKind::HorizontalPodAutoscaler,
        json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                     "minReplicas": 2, "maxReplicas": 10},
        }),
    );
    apply(
        &old,
        ResourceKind::PodDisruptionBudget,
        json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}},
        }),
    );
    old.apply_endpoint_slice(
        "shop",
        "web-old",
        "web",
        &[("127.0.0.1", true, true, false, None)],
        &[("http", port(&backends, "old/web"))],
    );
    apply(
        &new,
        ResourceKind::ConfigMap,
        json!({
            "metadata": {"name": "web-config", "namespace": "shop"}, "data": {"owner": "new-team"},
        }),
    );
    Clusters {
        old,
        new,
        dir: tempfile::tempdir().expect("tempdir"),
        backends,
    }
}

fn port(backends: &Backends, label: &str) -> i32 {
    backends
        .addr(label)
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("backend port")
}

/// The catalog: both clusters, each with a write credential unless
/// `without` names it.
fn catalog(c: &Clusters, without: Option<&str>) -> String {
    let mut yaml = String::from("kubernetes:\n  clusters:\n");
    for (name, kube) in [("old", &c.old), ("new", &c.new)] {
        let path = c.dir.path().join(format!("{name}.kubeconfig"));
        kube.kubeconfig(&path, name, None).expect("kubeconfig");
        yaml.push_str(&format!(
            "    - name: {name}\n      kubeconfig: {}\n",
            path.display()
        ));
        if without != Some(name) {
            yaml.push_str(&format!("      deploy_kubeconfig: {}\n", path.display()));
        }
    }
    yaml.push_str("services: []\n");
    yaml
}

fn plan() -> CreateMigrationRequest {
    CreateMigrationRequest {
        service: "web.shop".into(),
        deploy: "kube".into(),
        retain: "2s".into(),
        delete_source: true,
        double_deploy_timeout: "30s".into(),
        ..support::migration_plan(&[50.0, 100.0], "2s")
    }
}

async fn get(api: &MigrationsClient<Channel>, id: &str) -> Migration {
    api.clone()
        .get_migration(GetMigrationRequest { id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

/// Polls a migration until it ends, handing each reading to `each`.
async fn until_ended(
    api: &MigrationsClient<Channel>,
    id: &str,
    limit: Duration,
    mut each: impl FnMut(&Migration),
) -> Migration {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = get(api, id).await;
        each(&m);
        if matches!(m.stage.as_str(), "DONE" | "ROLLED_BACK" | "FAILED") {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "migration {id} did not end within {limit:?}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What `new` holds of the kind, if anything.
fn in_new(c: &Clusters, kind: ResourceKind, name: &str) -> Option<Value> {
    c.new.get(kind, "shop", name)
}

fn replicas(kube: &TestKube) -> i64 {
    kube.get(ResourceKind::Deployment, "shop", "web")
        .and_then(|d| d["spec"]["replicas"].as_i64())
        .unwrap_or(0)
}

async fn discovered(ferry: &Ferry) {
    support::eventually(
        Duration::from_secs(20),
        "web.shop discovered in old",
        || async {
            ferry.status().await["catalog"]["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "web.shop"))
        },
    )
    .await;
}

/// A control plane with both clusters' write credentials, a proxy routing
/// web.shop to `old` under steady load, and the kube-deployed migration
/// started.
struct Running {
    ferry: Ferry,
    _proxy: FerryProxy,
    steady: Steady,
    api: MigrationsClient<Channel>,
    m: Migration,
}

async fn start(c: &Clusters) -> Running {
    let ferry = Ferry::start(&catalog(c, None)).await;
    discovered(&ferry).await;
    let proxy = FerryProxy::start(ferry.xds_port).await;
    support::eventually(
        Duration::from_secs(20),
        "the proxy routes to old",
        || async {
            support::share(
                &support::split(proxy.listen_port, "web.shop", 5).await,
                "old/",
            ) == 1.0
        },
    )
    .await;
    let steady = Steady::start_paced(
        proxy.listen_port,
        "web.shop",
        Duration::from_millis(5),
        Duration::from_secs(120),
    );
    let api = MigrationsClient::new(support::api_channel(&ferry).await);
    let m = api
        .clone()
        .create_migration(plan())
        .await
        .expect("create")
        .into_inner();
    Running {
        ferry,
        _proxy: proxy,
        steady,
        api,
        m,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ferry_copies_the_workload_moves_traffic_and_scales_the_source_down_after_the_drain() {
    let c = clusters().await;
    let Running {
        ferry,
        _proxy,
        steady,
        api,
        m,
    } = start(&c).await;
    assert_eq!(m.deploy, "kube");

    // The workload appears in `new`, stripped and labelled.
    support::eventually(Duration::from_secs(20), "the Deployment copied", || async {
        in_new(&c, ResourceKind::Deployment, "web").is_some()
    })
    .await;
    let deployment = in_new(&c, ResourceKind::Deployment, "web").expect("deployment");
    let source = c
        .old
        .get(ResourceKind::Deployment, "shop", "web")
        .expect("source");
    assert_eq!(
        deployment["metadata"]["labels"]["ferry.io/migration"],
        m.id.as_str()
    );
    assert_ne!(deployment["metadata"]["uid"], source["metadata"]["uid"]);
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "web-sa"
    );
    let managers: Vec<&str> = deployment["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["manager"].as_str())
        .collect();
    assert!(managers.contains(&"ferry"), "{managers:?}");
    let service = in_new(&c, ResourceKind::Service, "web").expect("service");
    assert_eq!(
        service["metadata"]["labels"]["ferry.io/migration"],
        m.id.as_str()
    );
    assert_ne!(
        service["spec"]["clusterIP"], OLD_CLUSTER_IP,
        "the target allocates its own"
    );
    for (kind, name) in [
        (ResourceKind::ServiceAccount, "web-sa"),
        (ResourceKind::HorizontalPodAutoscaler, "web"),
        (ResourceKind::PodDisruptionBudget, "web"),
    ] {
        let copy = in_new(&c, kind, name).unwrap_or_else(|| panic!("{kind:?} {name} copied"));
        assert_eq!(
            copy["metadata"]["labels"]["ferry.io/migration"],
            m.id.as_str()
        );
    }
    assert!(
        in_new(&c, ResourceKind::Secret, "web-secret").is_none(),
        "secrets only on request"
    );
    // Someone else's ConfigMap is left as it was.
    let theirs = in_new(&c, ResourceKind::ConfigMap, "web-config").expect("configmap");
    assert_eq!(theirs["data"], json!({"owner": "new-team"}));
    assert!(
        theirs["metadata"]["labels"]
            .get("ferry.io/migration")
            .is_none()
    );

    // The new pods come up (the test plays the endpoint controller).
    c.new.apply_endpoint_slice(
        "shop",
        "web-new",
        "web",
        &[("127.0.0.1", true, true, false, None)],
        &[("http", port(&c.backends, "new/web"))],
    );
    // While traffic shifts the source keeps its replicas…
    support::eventually(Duration::from_secs(30), "shifting", || async {
        get(&api, &m.id).await.stage == "SHIFT"
    })
    .await;
    assert_eq!(replicas(&c.old), 2);
    let done = until_ended(&api, &m.id, Duration::from_secs(60), |now| {
        if now.stage == "CLEANUP" {
            // …and during the drain too.
            assert_eq!(replicas(&c.old), 2, "scaled down before the drain ended");
        }
    })
    .await;
    let answers = steady.stop().await;
    assert_eq!(done.stage, "DONE", "{done:?}\n{}", ferry.log());
    // …and is scaled to 0 after it, its objects kept for the retention…
    assert_eq!(replicas(&c.old), 0);
    assert!(
        c.old
            .get(ResourceKind::ConfigMap, "shop", "web-config")
            .is_some()
    );
    // …then deleted (--delete-source), and recorded.
    let source_objects = [
        (ResourceKind::Deployment, "web"),
        (ResourceKind::Service, "web"),
        (ResourceKind::ConfigMap, "web-config"),
        (ResourceKind::HorizontalPodAutoscaler, "web"),
        (ResourceKind::PodDisruptionBudget, "web"),
        (ResourceKind::ServiceAccount, "web-sa"),
    ];
    support::eventually(Duration::from_secs(20), "the source deleted", || async {
        source_objects
            .iter()
            .all(|(kind, name)| c.old.get(*kind, "shop", name).is_none())
    })
    .await;
    assert!(
        c.old
            .get(ResourceKind::Secret, "shop", "web-secret")
            .is_some(),
        "Secrets were not copied, so they are not deleted either"
    );
    support::eventually(Duration::from_secs(10), "the deletion recorded", || async {
        support::ferry_cli(&ferry, &["audit", "--service", "web.shop"])
            .1
            .contains("migration_source_deleted")
    })
    .await;
    let failed: Vec<&String> = answers
        .iter()
        .map(|(_, k)| k)
        .filter(|k| *k != "old/web" && *k != "new/web")
        .collect();
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:?}",
        failed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollback_deletes_only_what_ferry_created_in_the_target() {
    let c = clusters().await;
    // The new side fails every request: the gate rolls the migration back.
    c.backends.set_status("new/web", 503);
    let Running {
        ferry,
        _proxy,
        steady,
        api,
        m,
    } = start(&c).await;
    support::eventually(Duration::from_secs(20), "the Deployment copied", || async {
        in_new(&c, ResourceKind::Deployment, "web").is_some()
    })
    .await;
    c.new.apply_endpoint_slice(
        "shop",
        "web-new",
        "web",
        &[("127.0.0.1", true, true, false, None)],
        &[("http", port(&c.backends, "new/web"))],
    );
    let ended = until_ended(&api, &m.id, Duration::from_secs(60), |_| {}).await;
    steady.stop().await;
    assert_eq!(ended.stage, "ROLLED_BACK", "{ended:?}\n{}", ferry.log());
    for (kind, name) in [
        (ResourceKind::Deployment, "web"),
        (ResourceKind::Service, "web"),
        (ResourceKind::ServiceAccount, "web-sa"),
        (ResourceKind::HorizontalPodAutoscaler, "web"),
        (ResourceKind::PodDisruptionBudget, "web"),
    ] {
        assert!(
            in_new(&c, kind, name).is_none(),
            "{kind:?} {name} left behind"
        );
    }
    let theirs = in_new(&c, ResourceKind::ConfigMap, "web-config").expect("untouched");
    assert_eq!(theirs["data"], json!({"owner": "new-team"}));
    // The source was never scaled down.
    assert_eq!(replicas(&c.old), 2);
    let audit = support::ferry_cli(&ferry, &["audit", "--service", "web.shop"]).1;
    assert!(audit.contains("the deploy was undone"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_write_credential_kube_deploys_are_refused() {
    let c = clusters().await;
    let ferry = Ferry::start(&catalog(&c, Some("new"))).await;
    discovered(&ferry).await;
    let err = MigrationsClient::new(support::api_channel(&ferry).await)
        .create_migration(plan())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("new has no deploy_kubeconfig"),
        "{}",
        err.message()
    );
    assert!(in_new(&c, ResourceKind::Deployment, "web").is_none());
}
