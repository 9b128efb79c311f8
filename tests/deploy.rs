//! `deploy/` as a platform team applies it: every overlay rendered by the
//! real `kubectl kustomize`, each object read back and checked against
//! the real binary (its flags, ports and probe paths), the RBAC against
//! what discovery actually asks of an API server (and, applied to one, as
//! enough for `ferry control` with the ServiceAccount's own token), and the
//! Prometheus rules by the real `promtool`.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_testkube::ResourceKind;
use serde_yaml_ng::Value;

const OVERLAYS: [&str; 6] = [
    "base",
    "overlays/single",
    "overlays/ha",
    "overlays/envoy",
    "overlays/monitoring",
    "member",
];

fn deploy_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The objects `kubectl kustomize` renders for `overlay`.
fn render(overlay: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir().join(overlay))
        .output()
        .expect("run kubectl (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

/// The flags `ferry <command> --help` lists.
fn flags(command: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([command, "--help"])
        .output()
        .expect("ferry --help");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches([',', '.']).to_owned())
        .collect()
}

/// Every pod template of the rendered objects, with its owner's name.
fn pod_templates(objects: &[Value]) -> Vec<(String, Value)> {
    objects
        .iter()
        .filter(|o| matches!(kind(o), "Deployment" | "StatefulSet"))
        .map(|o| (name(o).to_owned(), o["spec"]["template"]["spec"].clone()))
        .collect()
}

#[test]
fn every_overlay_renders_and_its_ferry_containers_take_flags_the_binary_accepts() {
    let known = [("control", flags("control")), ("proxy", flags("proxy"))];
    for overlay in OVERLAYS {
        let objects = render(overlay);
        assert!(!objects.is_empty(), "{overlay} renders nothing");
        for (owner, spec) in pod_templates(&objects) {
            for c in spec["containers"].as_sequence().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or_default();
                if !image.contains("ferry") {
                    continue;
                }
                let args: Vec<&str> = c["args"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let command = args.first().copied().unwrap_or_default();
                let accepted = &known
                    .iter()
                    .find(|(k, _)| *k == command)
                    .unwrap_or_else(|| panic!("{overlay} {owner}: unknown command {command:?}"))
                    .1;
                for arg in &args[1..] {
                    let flag = arg.split('=').next().unwrap_or_default();
                    assert!(
                        accepted.contains(flag),
                        "{overlay} {owner}: ferry {command} has no flag {flag}"
                    );
                }
            }
        }
    }
}

/// The port a `--flag=host:port` argument of `c` names.
fn port_of(c: &Value, flag: &str) -> Option<u64> {
    c["args"]
        .as_sequence()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        .and_then(|addr| addr.rsplit(':').next()?.parse().ok())
}

fn container_port(c: &Value, port_name: &str) -> Option<u64> {
    c["ports"]
        .as_sequence()?
        .iter()
        .find(|p| p["name"].as_str() == Some(port_name))
        .and_then(|p| p["containerPort"].as_u64())
}

#[test]
fn ports_probes_and_services_agree_with_the_binary() {
    for overlay in ["overlays/single", "overlays/ha"] {
        let objects = render(overlay);
        let templates = pod_templates(&objects);
        let (_, control) = templates
            .iter()
            .find(|(n, _)| n == "ferry-control")
            .expect("ferry-control");
        let c = &control["containers"][0];
        for (flag, port) in [
            ("--xds-addr", "xds"),
            ("--api-addr", "api"),
            ("--admin-addr", "admin"),
        ] {
            assert_eq!(
                port_of(c, flag),
                container_port(c, port),
                "{overlay}: {flag}"
            );
        }
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/readyz")
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"].as_str(),
            Some("/healthz")
        );
        let (_, proxy) = templates
            .iter()
            .find(|(n, _)| n == "ferry-proxy")
            .expect("ferry-proxy");
        let p = &proxy["containers"][0];
        assert_eq!(port_of(p, "--listen"), container_port(p, "http"));
        assert_eq!(port_of(p, "--admin-addr"), container_port(p, "admin"));
        assert_eq!(
            p["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/ready")
        );
        assert_eq!(
            p["lifecycle"]["preStop"]["httpGet"]["path"].as_str(),
            Some("/drain")
        );
        // The pod outlives the drain.
        let drain: u64 = p["args"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find_map(|a| a.strip_prefix("--drain-grace="))
            .and_then(|d| d.trim_end_matches('s').parse().ok())
            .expect("--drain-grace");
        let grace = proxy["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace");
        assert!(grace > drain, "{grace}s ≤ drain {drain}s");
        // Every Service's target port is a port its pods declare.
        for svc in objects.iter().filter(|o| kind(o) == "Service") {
            let selector = &svc["spec"]["selector"]["app.kubernetes.io/name"];
            let Some((_, spec)) = templates
                .iter()
                .find(|(n, _)| Some(n.as_str()) == selector.as_str())
            else {
                continue;
            };
            for port in svc["spec"]["ports"].as_sequence().into_iter().flatten() {
                let target = port["targetPort"].as_str().unwrap_or_default();
                assert!(
                    container_port(&spec["containers"][0], target).is_some(),
                    "{overlay}: Service {} targets {target:?}, which its pods lack",
                    name(svc)
                );
            }
        }
    }
}

#[test]
fn every_container_runs_locked_down() {
    for overlay in OVERLAYS {
        for (owner, spec) in pod_templates(&render(overlay)) {
            let pod = &spec["securityContext"];
            assert_eq!(
                pod["runAsNonRoot"].as_bool(),
                Some(true),
                "{overlay} {owner}"
            );
            assert_eq!(
                pod["seccompProfile"]["type"].as_str(),
                Some("RuntimeDefault"),
                "{overlay} {owner}"
            );
            for c in spec["containers"].as_sequence().into_iter().flatten() {
                let s = &c["securityContext"];
                assert_eq!(
                    s["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{overlay} {owner}"
                );
                assert_eq!(
                    s["readOnlyRootFilesystem"].as_bool(),
                    Some(true),
                    "{overlay} {owner}"
                );
                assert_eq!(
                    s["capabilities"]["drop"][0].as_str(),
                    Some("ALL"),
                    "{overlay} {owner}"
                );
            }
        }
    }
}

/// (verb, group, resource) of every rule of the `role_kind` named `role`.
fn granted(objects: &[Value], role_kind: &str, role: &str) -> BTreeSet<(String, String, String)> {
    let role = objects
        .iter()
        .find(|o| kind(o) == role_kind && name(o) == role)
        .unwrap_or_else(|| panic!("{role_kind} {role}"));
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().into_iter().flatten() {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        for g in list("apiGroups") {
            for r in list("resources") {
                for v in list("verbs") {
                    out.insert((v.clone(), g.clone(), r.clone()));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_role_grants_exactly_what_discovery_asks_for() {
    // What discovery asks of a real list/watch API server…
    let (kube, _dir, kubeconfig) = support::web_cluster("deploy-token").await;
    kube.apply_service_export("shop", "web");
    let catalog = format!(
        "kubernetes:\n  clusters:\n    - {{name: home, kubeconfig: {0}}}\n  \
         cluster_secrets: {{namespace: ferry-system, kubeconfig: {0}}}\nservices: []\n",
        kubeconfig.display()
    );
    let ferry = support::Ferry::start(&catalog).await;
    support::eventually(Duration::from_secs(20), "web.shop discovered", || async {
        let status = ferry.status().await;
        status["catalog"]["cluster_secrets"]["health"] == "connected"
            && status["catalog"]["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "web.shop"))
    })
    .await;
    let (secrets, asked): (BTreeSet<_>, BTreeSet<_>) = kube
        .access()
        .into_iter()
        .partition(|(_, _, resource)| resource == "secrets");
    // …is exactly what the roles grant: the ClusterRole in the home cluster
    // and in every member, the Role on cluster Secrets in ferry-system.
    let checks = [
        ("base", "ClusterRole", "ferry-discovery", &asked),
        ("member", "ClusterRole", "ferry-discovery", &asked),
        ("base", "Role", "ferry-cluster-secrets", &secrets),
    ];
    for (overlay, role_kind, role, asked) in checks {
        let granted = granted(&render(overlay), role_kind, role);
        for access in asked {
            assert!(
                granted.contains(access),
                "{overlay}: discovery uses {access:?}, not granted by {role_kind} {role}"
            );
        }
        for grant in &granted {
            // `get` is granted for kubectl-style reads; list and watch must
            // each be used.
            assert!(
                grant.0 == "get" || asked.contains(grant),
                "{overlay}: {role_kind} {role} grants {grant:?}, which discovery never uses"
            );
        }
    }
    let role = render("base")
        .into_iter()
        .find(|o| kind(o) == "Role" && name(o) == "ferry-cluster-secrets")
        .expect("Role");
    assert_eq!(role["metadata"]["namespace"].as_str(), Some("ferry-system"));
}

/// The user `ferry`'s token authenticates as.
const FERRY_USER: &str = "system:serviceaccount:ferry-system:ferry";

/// deploy/base's RBAC objects, as JSON: the ServiceAccount `ferry`, the
/// ClusterRole and ClusterRoleBinding `ferry-discovery` and, with
/// `secrets_role`, the Role and RoleBinding `ferry-cluster-secrets`.
fn base_rbac(secrets_role: bool) -> Vec<(ResourceKind, serde_json::Value)> {
    let mut wanted = vec![
        ("ServiceAccount", "ferry"),
        ("ClusterRole", "ferry-discovery"),
        ("ClusterRoleBinding", "ferry-discovery"),
    ];
    if secrets_role {
        wanted.extend([
            ("Role", "ferry-cluster-secrets"),
            ("RoleBinding", "ferry-cluster-secrets"),
        ]);
    }
    let objects = render("base");
    wanted
        .into_iter()
        .map(|(k, n)| {
            let object = objects
                .iter()
                .find(|o| kind(o) == k && name(o) == n)
                .unwrap_or_else(|| panic!("base renders no {k} {n}"));
            let kind = ResourceKind::from_kind(k).unwrap_or_else(|| panic!("testkube serves {k}"));
            (kind, serde_json::to_value(object).expect("JSON"))
        })
        .collect()
}

/// The home cluster (`web.shop` exported) with deploy/base's RBAC applied
/// (the Role on cluster Secrets only with `secrets_role`), and `ferry
/// control` watching it and its cluster Secrets with `ferry`'s token.
async fn ferry_with_base_rbac(
    secrets_role: bool,
) -> (ferry_testkube::TestKube, tempfile::TempDir, support::Ferry) {
    let (kube, dir, _) = support::web_cluster("deploy-rbac-token").await;
    for (kind, object) in base_rbac(secrets_role) {
        kube.apply(kind, object).expect("apply deploy/base RBAC");
    }
    let token_secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "ferry-token",
            "namespace": "ferry-system",
            "annotations": {"kubernetes.io/service-account.name": "ferry"},
        },
        "type": "kubernetes.io/service-account-token",
    });
    kube.apply(ResourceKind::Secret, token_secret)
        .expect("token Secret");
    support::eventually(Duration::from_secs(10), "ferry's token", || async {
        kube.token_for("ferry-system", "ferry").is_some()
    })
    .await;
    let token = kube.token_for("ferry-system", "ferry").expect("token");
    let kubeconfig = dir.path().join("ferry.kubeconfig");
    kube.kubeconfig(&kubeconfig, "home", Some(&token))
        .expect("kubeconfig");
    let catalog = format!(
        "kubernetes:\n  clusters:\n    - {{name: home, kubeconfig: {0}}}\n  \
         cluster_secrets: {{namespace: ferry-system, kubeconfig: {0}}}\nservices: []\n",
        kubeconfig.display()
    );
    let ferry = support::Ferry::start(&catalog).await;
    (kube, dir, ferry)
}

/// `/status` shows the home cluster connected and `web.shop` discovered,
/// and the cluster Secrets watch with `secrets_health`.
async fn discovers_web_shop(ferry: &support::Ferry, secrets_health: &str) {
    let what = format!("web.shop discovered, cluster Secrets {secrets_health}");
    support::eventually(Duration::from_secs(20), &what, || async {
        let status = ferry.status().await;
        let catalog = &status["catalog"];
        let home_connected = catalog["kubernetes"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["cluster"] == "home" && c["health"] == "connected")
        });
        home_connected
            && catalog["cluster_secrets"]["health"] == secrets_health
            && catalog["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "web.shop"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_rbac_is_enough_for_discovery_and_cluster_secrets() {
    // With all of deploy/base's RBAC, ferry's token is enough for both.
    let (kube, _dir, ferry) = ferry_with_base_rbac(true).await;
    discovers_web_shop(&ferry, "connected").await;
    let needed = [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "secrets"),
    ];
    support::eventually(
        Duration::from_secs(20),
        "list and watch of services, endpointslices and secrets as ferry",
        || async {
            let used = kube.access_by(FERRY_USER);
            needed.iter().all(|(group, resource)| {
                ["list", "watch"].iter().all(|verb| {
                    used.contains(&(verb.to_string(), group.to_string(), resource.to_string()))
                })
            })
        },
    )
    .await;
    // Only ferry's token was used.
    assert_eq!(kube.users_seen(), BTreeSet::from([FERRY_USER.to_owned()]));
    drop(ferry);

    // Without the Role, the cluster Secrets are refused (403) while
    // discovery of the home cluster still works: the Role is what grants
    // them.
    let (kube, _dir, ferry) = ferry_with_base_rbac(false).await;
    discovers_web_shop(&ferry, "unauthorized").await;
    let status = ferry.status().await;
    let error = status["catalog"]["cluster_secrets"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains(&format!(
            "(403): secrets is forbidden: User \"{FERRY_USER}\" cannot list resource \"secrets\" \
             in API group \"\" in the namespace \"ferry-system\""
        )),
        "{error}"
    );
    let used = kube.access_by(FERRY_USER);
    assert!(
        !used.iter().any(|(_, _, resource)| resource == "secrets"),
        "{used:?}"
    );
    assert!(
        used.contains(&("list".to_owned(), "".to_owned(), "services".to_owned())),
        "{used:?}"
    );
}

#[test]
fn the_alerting_and_recording_rules_pass_promtool() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy_dir().join("prometheus/rules.yaml"))
        .output()
        .expect("run promtool (Debian's prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dashboard_is_grafana_json_with_a_proxy_or_envoy_view() {
    let text = std::fs::read_to_string(deploy_dir().join("grafana/ferry.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    for needle in [
        "ferry_migrate_weight_basis_points",
        "ferry_proxy_request_duration_seconds_bucket",
        "envoy_cluster_upstream_rq_time_bucket",
        "ferry_migrate_migrations",
        "ferry_migrate_gate_evaluations_total",
        "ferry_xds_nacks_total",
        "ferry_migrate_ack_wait_seconds_bucket",
        "ferry_discovery_last_sync_age_seconds",
        "ferry_proxy_ejections_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(needle)),
            "no panel reads {needle}"
        );
    }
}
