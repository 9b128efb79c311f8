//! A short instance of the `proxy_compare` load test (ferry-loadtests),
//! so the load-test logic keeps working: this build's `ferry control` and
//! `ferry proxy`, the real Envoy (FERRY_ENVOY), Debian's nginx and HAProxy
//! (FERRY_NGINX, FERRY_HAPROXY, else found on PATH or in /usr/sbin),
//! `wrk` and `h2load`, one second per measurement. It fails, never skips,
//! when a tool is missing, and fails when a peer does not route. The
//! bounds are sanity checks, not performance targets (a debug build of the
//! proxy is measured). A second run gives every peer two workers on two
//! cores and a 64 KiB answer. The runs take turns: each pins its peers.

use ferry_loadtests::proxy_compare::peers::PeerKind;
use ferry_loadtests::proxy_compare::report::Report;
use ferry_loadtests::proxy_compare::{self, Config, MAX_ERROR_SHARE};

/// One run at a time: both would pin their peers to core 0.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The smoke preset with this build's `ferry` and the binaries the
/// environment names, writing its results into `results`.
fn smoke(results: &std::path::Path) -> Config {
    let envoy = std::env::var("FERRY_ENVOY")
        .expect("FERRY_ENVOY must name the Envoy binary (scripts/test.sh sets it)");
    let mut config = Config {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
        envoy: envoy.into(),
        results_dir: Some(results.to_owned()),
        ..Config::smoke()
    };
    if let Some(nginx) = std::env::var_os("FERRY_NGINX") {
        config.nginx = nginx.into();
    }
    if let Some(haproxy) = std::env::var_os("FERRY_HAPROXY") {
        config.haproxy = haproxy.into();
    }
    config
}

/// Every peer of `report` served load, without errors.
fn served_without_errors(report: &Report) {
    for peer in &report.peers {
        for run in [&peer.h1, &peer.h2] {
            assert!(run.measured.rps > 0.0, "{}: {run:?}", peer.peer);
            assert!(run.measured.requests > 0, "{}: {run:?}", peer.peer);
            assert!(run.error_share < MAX_ERROR_SHARE, "{}: {run:?}", peer.peer);
        }
        let fixed = &peer.fixed_rate;
        assert!(fixed.run.ok > 0, "{}: {fixed:?}", peer.peer);
        assert!(
            fixed.error_share < MAX_ERROR_SHARE,
            "{}: {fixed:?}",
            peer.peer
        );
        assert!(fixed.run.latency.p99_ms > 0.0, "{}: {fixed:?}", peer.peer);
        let opened = peer.upstream_connections.saturation;
        assert!(
            opened.backend_accepted.is_some_and(|n| n > 0),
            "{}: {opened:?}",
            peer.peer
        );
        if peer.peer.is_proxy() {
            assert!(peer.rss_idle_bytes.is_some_and(|b| b > 0), "{peer:?}");
            assert!(peer.rss_load_bytes.is_some_and(|b| b > 0), "{peer:?}");
            assert!(peer.h1.cpu.is_some_and(|c| c.seconds > 0.0), "{peer:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_peer_routes_and_serves_load_without_errors() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let results = tempfile::tempdir().unwrap();
    let report = proxy_compare::run(smoke(results.path())).await.unwrap();
    println!("{}", report.markdown());

    let names: Vec<PeerKind> = report.peers.iter().map(|p| p.peer).collect();
    assert_eq!(names, PeerKind::ALL);
    served_without_errors(&report);
    // Ferry, Envoy and HAProxy report their own upstream connections.
    for kind in [
        PeerKind::Ferry,
        PeerKind::Envoy,
        PeerKind::EnvoyStatic,
        PeerKind::Haproxy,
    ] {
        let opened = report.peer(kind).unwrap().upstream_connections.saturation;
        assert!(
            opened.peer_reported.is_some_and(|n| n > 0),
            "{kind}: {opened:?}"
        );
    }
    // Every peer got the same fixed rate: half the slowest proxy's maximum.
    let slowest = report
        .peers
        .iter()
        .filter(|p| p.peer.is_proxy())
        .map(|p| p.h1.measured.rps)
        .fold(f64::INFINITY, f64::min);
    assert!((report.comparison.fixed_rate_rps - slowest / 2.0).abs() < 1.0);

    let setup = &report.setup;
    assert_eq!((setup.workers, setup.proxy_cores.as_str()), (1, "0"));
    assert_eq!((setup.body_bytes, setup.load_threads), (37, 1));
    assert_eq!(setup.load_shares_proxy_cores, setup.machine.cores == 1);
    let binaries: Vec<&str> = setup.binaries.iter().map(|b| b.name).collect();
    assert_eq!(binaries, ["ferry", "envoy", "nginx", "haproxy"]);
    for b in &setup.binaries {
        assert_eq!(b.sha256.len(), 64, "{b:?}");
        assert!(!b.version.is_empty(), "{b:?}");
    }
    assert!(
        setup.binaries[1].version.starts_with("1.40"),
        "{:?}",
        setup.binaries[1]
    );

    let json = results.path().join("proxy_compare-smoke.json");
    let md = results.path().join("proxy_compare-smoke.md");
    assert_eq!(report.files, [json.clone(), md.clone()]);
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(parsed["test"], "proxy_compare");
    assert_eq!(parsed["peers"][1]["peer"], "ferry");
    assert_eq!(parsed["peers"][3]["peer"], "envoy-static");
    assert!(parsed["peers"][5]["h2"]["rps"].as_f64() > Some(0.0));
    assert_eq!(parsed["setup"]["backend"], "nginx");
    let text = std::fs::read_to_string(&md).unwrap();
    for peer in PeerKind::ALL {
        assert!(text.contains(&format!("| {peer} |")), "{text}");
    }
}

/// Two workers of every peer on cores 0-1, the backend answering 64 KiB:
/// each peer must route (its answer is compared whole) and serve load, and
/// the results must say how the run was set up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_and_a_large_body_are_run_and_recorded() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let results = tempfile::tempdir().unwrap();
    let peers = vec![
        PeerKind::Direct,
        PeerKind::Ferry,
        PeerKind::EnvoyStatic,
        PeerKind::Nginx,
        PeerKind::Haproxy,
    ];
    let config = Config {
        workers: 2,
        body_bytes: 65_536,
        label: "smoke-w2".to_owned(),
        peers: peers.clone(),
        ..smoke(results.path())
    };
    let report = proxy_compare::run(config).await.unwrap();
    println!("{}", report.markdown());

    let names: Vec<PeerKind> = report.peers.iter().map(|p| p.peer).collect();
    assert_eq!(names, peers);
    served_without_errors(&report);

    let setup = &report.setup;
    assert_eq!((setup.workers, setup.proxy_cores.as_str()), (2, "0-1"));
    assert_eq!((setup.backend_workers, setup.load_threads), (2, 2));
    assert_eq!(setup.body_bytes, 65_536);
    // On two cores the peers take both: the load shares them.
    assert_eq!(setup.load_shares_proxy_cores, setup.machine.cores == 2);

    let json = results.path().join("proxy_compare-smoke-w2.json");
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(parsed["setup"]["workers"], 2);
    assert_eq!(parsed["setup"]["proxy_cores"], "0-1");
    assert_eq!(parsed["setup"]["body_bytes"], 65_536);
    let text = report.markdown();
    for said in [
        "`ferry proxy --workers 2`",
        "`envoy --concurrency 2`",
        "`worker_processes 2`",
        "`nbthread 2`",
        "`wrk -t2",
        "Body 65536 bytes",
    ] {
        assert!(text.contains(said), "{said} in {text}");
    }
}
