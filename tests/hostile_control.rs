//! Hostile and broken input against the real `ferry control`: catalog
//! files (alias bombs, deep nesting, truncated writes, ConfigMap symlink
//! swaps), xDS clients (oversized and garbage requests, subscription and
//! stream floods), load reports (overflowing counts, unknown clusters,
//! reports from nodes without an ADS stream) and API callers (control
//! characters, oversized strings).
//!
//! Each attack checks the refusal, that the process's memory stays
//! bounded (VmRSS from /proc before and after), that /healthz keeps
//! answering while it runs, and that the served config is unchanged.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Ferry, HealthProbe, eventually};

const WAIT: Duration = Duration::from_secs(15);
/// Memory an attack may add to the control plane, in KiB.
const RSS_BUDGET_KIB: u64 = 64 * 1024;
/// Slowest /healthz answer accepted while an attack runs.
const HEALTHZ_BUDGET: Duration = Duration::from_millis(1500);

fn service(name: &str, port: u16) -> String {
    format!(
        "  - name: {name}\n    namespace: shop\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      old: {{endpoints: [\"127.0.0.1:{port}\"]}}\n      new: {{endpoints: [\"127.0.0.1:{}\"]}}\n    weights: {{old: 9000, new: 1000}}\n",
        port + 100
    )
}

/// Four services, so one load may remove up to two of them.
fn catalog() -> String {
    let mut text = String::from("services:\n");
    for (i, name) in ["checkout", "cart", "search", "payments"]
        .iter()
        .enumerate()
    {
        text.push_str(&service(name, 9001 + i as u16));
    }
    text
}

fn service_names(status: &Value) -> Vec<String> {
    status["catalog"]["services"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What the control plane serves: the catalog's services and the xDS
/// snapshot version.
async fn served(ferry: &Ferry) -> (Vec<String>, Value) {
    let status = ferry.status().await;
    (
        service_names(&status),
        status["xds"]["snapshot_version"].clone(),
    )
}

fn last_error(status: &Value) -> String {
    status["catalog"]["source"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Writes `text` as the catalog and waits until the control plane has
/// refused it with an error containing `expected`; returns that error.
async fn refused(ferry: &Ferry, text: &str, expected: &str) -> String {
    let errors_before = ferry.status().await["catalog"]["source"]["errors"]
        .as_u64()
        .unwrap_or(0);
    ferry.write_catalog(text);
    eventually(
        WAIT,
        &format!("catalog refused with {expected:?}"),
        || async {
            let status = ferry.status().await;
            status["catalog"]["source"]["errors"].as_u64().unwrap_or(0) > errors_before
                && last_error(&status).contains(expected)
        },
    )
    .await;
    last_error(&ferry.status().await)
}

/// `ferry check` on `text`: (success, stdout + stderr, how long it took).
fn check(dir: &Path, text: &str) -> (bool, String, Duration) {
    let path = dir.join("check.yaml");
    std::fs::write(&path, text).expect("write catalog to check");
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("check")
        .arg("--catalog")
        .arg(&path)
        .output()
        .expect("run ferry check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, started.elapsed())
}

/// A 128 KiB YAML "billion laughs": each anchor is a list of two of the
/// previous one, so the last expands to 2^levels endpoints.
fn alias_bomb() -> String {
    let mut text = String::from("a0: &a0 [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n");
    for i in 1..40 {
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}]\n",
            p = i - 1
        ));
    }
    text.push_str("services:\n  - name: bomb\n    ports: [{name: http, port: 80}]\n    backends: {old: {endpoints: *a39}}\n");
    while text.len() < 128 * 1024 {
        text.push_str("# padding\n");
    }
    text
}

#[tokio::test]
async fn catalog_alias_bomb_is_refused_in_bounded_memory() {
    let ferry = Ferry::start(&catalog()).await;
    let before = served(&ferry).await;
    let rss_before = ferry.rss_kib();
    let probe = HealthProbe::start(ferry.admin_port);

    let error = refused(&ferry, &alias_bomb(), "anchors and aliases").await;

    let (slowest, answers) = probe.stop().await;
    let rss_after = ferry.rss_kib();
    assert!(error.contains("line 1"), "{error}");
    assert!(
        answers > 0 && slowest < HEALTHZ_BUDGET,
        "/healthz: {slowest:?}"
    );
    assert!(
        rss_after < rss_before + RSS_BUDGET_KIB,
        "VmRSS {rss_before} → {rss_after} KiB"
    );
    assert_eq!(served(&ferry).await, before, "served config changed");
    let metrics = ferry.metrics().await;
    assert!(
        metrics.contains("ferry_discovery_catalog_refused_total{reason=\"bounds\"}"),
        "{metrics}"
    );
    println!("alias bomb: VmRSS {rss_before} → {rss_after} KiB, /healthz slowest {slowest:?}");

    let (ok, out, took) = check(ferry.dir.path(), &alias_bomb());
    assert!(!ok && out.contains("anchors and aliases"), "{out}");
    assert!(took < Duration::from_secs(5), "ferry check took {took:?}");
}

#[tokio::test]
async fn catalog_deep_nesting_is_refused_without_stalling() {
    let ferry = Ferry::start(&catalog()).await;
    let before = served(&ferry).await;
    let rss_before = ferry.rss_kib();
    let probe = HealthProbe::start(ferry.admin_port);

    let mut deep = format!("services: {}", "[".repeat(100_000));
    deep.push_str(&" ".repeat(100_000));
    let error = refused(&ferry, &deep, "nested deeper than 64").await;

    let (slowest, answers) = probe.stop().await;
    let rss_after = ferry.rss_kib();
    assert!(!error.is_empty());
    assert!(
        answers > 0 && slowest < HEALTHZ_BUDGET,
        "/healthz: {slowest:?}"
    );
    assert!(
        rss_after < rss_before + RSS_BUDGET_KIB,
        "VmRSS {rss_before} → {rss_after} KiB"
    );
    assert_eq!(served(&ferry).await, before, "served config changed");
    println!("deep nesting: VmRSS {rss_before} → {rss_after} KiB, /healthz slowest {slowest:?}");

    let (ok, out, took) = check(ferry.dir.path(), &deep);
    assert!(!ok && out.contains("nested deeper than 64"), "{out}");
    assert!(took < Duration::from_secs(5), "ferry check took {took:?}");
    // Over 16 MiB is refused unread.
    let huge = format!("services: []\n{}", "#".repeat(17 * 1024 * 1024));
    let (ok, out, _) = check(ferry.dir.path(), &huge);
    assert!(!ok && out.contains("larger than"), "{out}");
}

#[tokio::test]
async fn catalog_emptied_or_truncated_keeps_serving_the_last_good_one() {
    let ferry = Ferry::start(&catalog()).await;
    let before = served(&ferry).await;
    assert_eq!(before.0.len(), 4);

    for text in ["", "# comments only\n", "services:\n"] {
        let error = refused(&ferry, text, "no services").await;
        assert!(error.contains("--allow-mass-removal"), "{error}");
        assert_eq!(served(&ferry).await, before, "served config changed");
    }
    // A write cut short: one service of four left.
    let mut truncated = String::from("services:\n");
    truncated.push_str(&service("checkout", 9001));
    let error = refused(&ferry, &truncated, "would remove 3 of 4 services").await;
    assert!(error.contains("75 %"), "{error}");
    assert_eq!(served(&ferry).await, before, "served config changed");
    let metrics = ferry.metrics().await;
    assert!(
        metrics.contains("ferry_discovery_catalog_refused_total{reason=\"mass_removal\"}"),
        "{metrics}"
    );
    assert!(
        ferry
            .log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("would remove 3 of 4")),
        "no warning in the log"
    );

    // Removing two of four is within the default 50 %.
    let mut half = String::from("services:\n");
    half.push_str(&service("checkout", 9001));
    half.push_str(&service("cart", 9002));
    ferry.write_catalog(&half);
    eventually(WAIT, "half the catalog applied", || async {
        served(&ferry).await.0.len() == 2
    })
    .await;

    for text in ["", "# comments only\n", "services:\n"] {
        let (ok, out, _) = check(ferry.dir.path(), text);
        assert!(!ok, "ferry check accepted {text:?}: {out}");
        assert!(out.contains("no services"), "{out}");
    }
}

#[tokio::test]
async fn catalog_emptied_is_applied_when_mass_removal_is_allowed() {
    let ferry = Ferry::start_with(&catalog(), &["--allow-mass-removal"]).await;
    ferry.write_catalog("services: []\n");
    eventually(WAIT, "the empty catalog applied", || async {
        served(&ferry).await.0.is_empty()
    })
    .await;
}

/// Lays out `dir` as the kubelet mounts a ConfigMap: `catalog.yaml ->
/// ..data/catalog.yaml`, `..data -> ..<stamp>`.
fn configmap_version(dir: &Path, stamp: &str, text: &str) {
    let version = dir.join(format!("..{stamp}"));
    std::fs::create_dir(&version).expect("version dir");
    std::fs::write(version.join("catalog.yaml"), text).expect("write catalog");
    // The kubelet swaps `..data` atomically: a new symlink, renamed over.
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
}

#[tokio::test]
async fn catalog_configmap_data_swap_reaches_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    configmap_version(dir.path(), "2026_01_01_00_00_00.1", &catalog());
    let path = dir.path().join("catalog.yaml");
    std::os::unix::fs::symlink("..data/catalog.yaml", &path).expect("symlink");
    let ferry = Ferry::start_in(dir, path, &[]).await;
    assert_eq!(served(&ferry).await.0.len(), 4);

    let mut next = catalog();
    next.push_str(&service("reviews", 9011));
    configmap_version(ferry.dir.path(), "2026_01_01_00_01_00.2", &next);
    std::fs::remove_dir_all(ferry.dir.path().join("..2026_01_01_00_00_00.1")).expect("rm old");
    eventually(WAIT, "the swapped ConfigMap on /status", || async {
        served(&ferry).await.0.contains(&"reviews.shop".to_owned())
    })
    .await;

    // And again, from the new version directory.
    let mut third = next.clone();
    third.push_str(&service("ratings", 9012));
    configmap_version(ferry.dir.path(), "2026_01_01_00_02_00.3", &third);
    eventually(WAIT, "the second swap on /status", || async {
        served(&ferry).await.0.contains(&"ratings.shop".to_owned())
    })
    .await;
}

#[tokio::test]
async fn catalog_symlinked_from_another_directory_follows_edits_in_place() {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let target = elsewhere.path().join("real.yaml");
    std::fs::write(&target, catalog()).expect("write catalog");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.yaml");
    std::os::unix::fs::symlink(&target, &path).expect("symlink");
    let ferry = Ferry::start_in(dir, path, &[]).await;

    let mut next = catalog();
    next.push_str(&service("reviews", 9011));
    // Written in place, in the target's own directory.
    std::fs::write(&target, next).expect("edit target");
    eventually(WAIT, "the edited target on /status", || async {
        served(&ferry).await.0.contains(&"reviews.shop".to_owned())
    })
    .await;
}
