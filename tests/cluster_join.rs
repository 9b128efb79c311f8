//! `ferry cluster join` / `leave` against two in-process API servers (home
//! and member), with a real `ferry control` reading cluster Secrets from
//! the home one.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use base64::Engine as _;
use ferry_testkube::{ResourceKind, TestKube};
use serde_json::json;

const READER: &str = "system:serviceaccount:ferry-system:ferry-reader";

fn run_ferry(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn join(member: &Path, home: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "cluster",
        "join",
        "east",
        "--kubeconfig",
        member.to_str().expect("utf-8 path"),
        "--apply",
        "--home-kubeconfig",
        home.to_str().expect("utf-8 path"),
        "--token-timeout",
        "10s",
    ];
    args.extend_from_slice(extra);
    run_ferry(&args)
}

/// Every member object `join` makes, as (kind, namespace, name).
const MEMBER_OBJECTS: [(ResourceKind, &str, &str); 5] = [
    (ResourceKind::Namespace, "", "ferry-system"),
    (ResourceKind::ServiceAccount, "ferry-system", "ferry-reader"),
    (ResourceKind::ClusterRole, "", "ferry-discovery"),
    (ResourceKind::ClusterRoleBinding, "", "ferry-discovery"),
    (ResourceKind::Secret, "ferry-system", "ferry-reader-token"),
];

fn present(kube: &TestKube) -> Vec<String> {
    MEMBER_OBJECTS
        .iter()
        .filter(|(kind, ns, name)| kube.get(*kind, ns, name).is_some())
        .map(|(kind, ns, name)| format!("{} {ns}/{name}", kind.kind()))
        .collect()
}

fn home_secret(home: &TestKube) -> Option<serde_json::Value> {
    home.get(ResourceKind::Secret, "ferry-system", "ferry-cluster-east")
}

struct Clusters {
    home: TestKube,
    member: TestKube,
    _dir: tempfile::TempDir,
    home_config: std::path::PathBuf,
    member_config: std::path::PathBuf,
}

/// A home cluster (empty) and a member `east` exporting web.shop, with
/// admin kubeconfigs for both.
async fn clusters() -> Clusters {
    let (member, dir, member_config) = support::web_cluster("member-admin").await;
    let home = TestKube::start("home-admin").await;
    let home_config = dir.path().join("home-admin.kubeconfig");
    home.kubeconfig(&home_config, "home", None)
        .expect("kubeconfig");
    Clusters {
        home,
        member,
        _dir: dir,
        home_config,
        member_config,
    }
}

async fn ferry_reading_secrets(c: &Clusters) -> support::Ferry {
    support::Ferry::start(&format!(
        "kubernetes:\n  cluster_secrets:\n    namespace: ferry-system\n    kubeconfig: {}\nservices: []\n",
        c.home_config.display()
    ))
    .await
}

/// The endpoints Ferry serves for web.shop in `east`.
async fn east_endpoints(ferry: &support::Ferry) -> Option<u64> {
    let status = ferry.status().await;
    status["catalog"]["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "web.shop")?["clusters"]["east"]["endpoints"]
        .as_u64()
}

fn east_status(status: &serde_json::Value) -> Option<serde_json::Value> {
    status["catalog"]["kubernetes"]
        .as_array()?
        .iter()
        .find(|c| c["cluster"] == "east")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_links_a_member_rotation_reconnects_and_leave_withdraws_it() {
    let c = clusters().await;
    let ferry = ferry_reading_secrets(&c).await;
    support::eventually(
        Duration::from_secs(20),
        "cluster Secrets listed",
        || async { ferry.status().await["catalog"]["cluster_secrets"]["health"] == "connected" },
    )
    .await;
    assert_eq!(east_endpoints(&ferry).await, None);

    // Join: the member's objects, then the home Secret, then Ferry
    // watches the member with the member's own read-only token.
    let out = join(&c.member_config, &c.home_config, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("created ServiceAccount ferry-system/ferry-reader"),
        "{stderr}"
    );
    assert_eq!(
        present(&c.member).len(),
        MEMBER_OBJECTS.len(),
        "{:?}",
        present(&c.member)
    );
    let secret = home_secret(&c.home).expect("home Secret applied");
    assert_eq!(secret["metadata"]["labels"]["ferry.io/cluster"], "east");
    let first_token = c
        .member
        .token_for("ferry-system", "ferry-reader")
        .expect("token minted");
    support::eventually(
        Duration::from_secs(20),
        "east discovered through its Secret",
        || async { east_endpoints(&ferry).await == Some(1) },
    )
    .await;
    let east = east_status(&ferry.status().await).expect("east in /status");
    assert_eq!(
        east["credentials"],
        "secret ferry-system/ferry-cluster-east"
    );
    assert_eq!(east["health"], "connected");
    let read = c.member.access_by(READER);
    for wanted in [
        ("list", "", "services"),
        ("watch", "discovery.k8s.io", "endpointslices"),
    ] {
        let wanted = (
            wanted.0.to_owned(),
            wanted.1.to_owned(),
            wanted.2.to_owned(),
        );
        assert!(
            read.contains(&wanted),
            "Ferry reads the member as ferry-reader: {read:?}"
        );
    }

    // Joining again changes nothing: same objects, same token.
    let out = join(&c.member_config, &c.home_config, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kept ServiceAccount"),
        "{}",
        text(&out)
    );
    assert_eq!(
        c.member.token_for("ferry-system", "ferry-reader").as_ref(),
        Some(&first_token)
    );

    // Rotation: a new token; the old one stops working at once, and Ferry
    // follows the updated Secret without a restart.
    let pid = ferry.pid();
    let out = join(&c.member_config, &c.home_config, &["--rotate"]);
    assert!(out.status.success(), "{}", text(&out));
    let second_token = c
        .member
        .token_for("ferry-system", "ferry-reader")
        .expect("new token");
    assert_ne!(second_token, first_token);
    support::eventually(
        Duration::from_secs(20),
        "Ferry reconnects with the new token",
        || async {
            ferry.metrics().await.lines().any(|l| {
                l.starts_with("ferry_discovery_credential_reloads_total{cluster=\"east\"}")
                    && !l.ends_with(" 0")
            })
        },
    )
    .await;
    // Only the new token can see this endpoint appear.
    c.member.apply_endpoint_slice(
        "shop",
        "web-b",
        "web",
        &[("10.0.0.2", true, true, false, None)],
        &[("http", 8080)],
    );
    support::eventually(
        Duration::from_secs(20),
        "a change after rotation",
        || async { east_endpoints(&ferry).await == Some(2) },
    )
    .await;
    assert_eq!(ferry.pid(), pid, "no restart");
    assert_eq!(
        east_status(&ferry.status().await).expect("east")["health"],
        "connected"
    );

    // Leave: the home Secret first (Ferry withdraws east on purpose), then
    // the member's objects, its namespace too since join created it.
    let out = run_ferry(&[
        "cluster",
        "leave",
        "east",
        "--kubeconfig",
        c.member_config.to_str().expect("utf-8"),
        "--home-kubeconfig",
        c.home_config.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(home_secret(&c.home).is_none());
    assert!(present(&c.member).is_empty(), "{:?}", present(&c.member));
    support::eventually(Duration::from_secs(20), "east withdrawn", || async {
        let status = ferry.status().await;
        east_status(&status).is_none() && east_endpoints(&ferry).await.is_none()
    })
    .await;
    assert!(
        ferry.log().contains("withdrawing the cluster"),
        "{}",
        ferry.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_half_done_join_leaves_nothing_behind() {
    let c = clusters().await;

    // The member refuses the admin's credentials: a clear error, and not
    // one object written on either side.
    let wrong = c._dir.path().join("wrong.kubeconfig");
    c.member
        .kubeconfig(&wrong, "east", Some("not-the-token"))
        .expect("kubeconfig");
    let out = join(&wrong, &c.home_config, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the member cluster refused the admin's credentials (401"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was created"), "{stderr}");
    assert!(present(&c.member).is_empty(), "{:?}", present(&c.member));
    assert!(home_secret(&c.home).is_none());

    // The admin may not bind roles: the join stops there and deletes what
    // it had created.
    c.member.deny("patch", ResourceKind::ClusterRoleBinding);
    let out = join(&c.member_config, &c.home_config, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("creating ClusterRoleBinding ferry-discovery in the member cluster failed"),
        "{stderr}"
    );
    assert!(stderr.contains("403"), "{stderr}");
    assert!(
        stderr.contains(
            "removed what this join had created: ClusterRole ferry-discovery, \
             ServiceAccount ferry-system/ferry-reader, Namespace ferry-system"
        ),
        "{stderr}"
    );
    assert!(present(&c.member).is_empty(), "{:?}", present(&c.member));
    assert!(home_secret(&c.home).is_none());

    // Allowed again, the same command succeeds.
    c.member.allow("patch", ResourceKind::ClusterRoleBinding);
    let out = join(&c.member_config, &c.home_config, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(home_secret(&c.home).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_would_run_a_command_is_refused_and_reported() {
    let c = clusters().await;
    let ferry = ferry_reading_secrets(&c).await;
    let kubeconfig = c.member.kubeconfig_yaml("east", None).replace(
        "    token: ",
        "    exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/sh}\n    x-token: ",
    );
    c.home
        .apply(
            ResourceKind::Secret,
            json!({
                "metadata": {
                    "name": "ferry-cluster-east",
                    "namespace": "ferry-system",
                    "labels": {"ferry.io/cluster": "east"},
                },
                "type": "Opaque",
                "data": {"kubeconfig": base64::engine::general_purpose::STANDARD.encode(kubeconfig)},
            }),
        )
        .expect("Secret");
    support::eventually(
        Duration::from_secs(20),
        "the Secret reported as unused",
        || async {
            let status = ferry.status().await;
            status["catalog"]["cluster_secrets"]["secrets"]
                .as_array()
                .and_then(|s| s.first())
                .and_then(|s| s["error"].as_str())
                .is_some_and(|e| e.contains("runs a command (exec)"))
        },
    )
    .await;
    assert!(east_status(&ferry.status().await).is_none());
}
