//! A short instance of the `proxy_compare` load test (ferry-loadtests),
//! so the load-test logic keeps working: this build's `ferry control` and
//! `ferry proxy`, the real Envoy (FERRY_ENVOY), Debian's nginx and HAProxy
//! (FERRY_NGINX, FERRY_HAPROXY, else found on PATH or in /usr/sbin),
//! `wrk` and `h2load`, one second per measurement. It fails, never skips,
//! when a tool is missing, and fails when a peer does not route. The
//! bounds are sanity checks, not performance targets (a debug build of the
//! proxy is measured).

use ferry_loadtests::proxy_compare::peers::PeerKind;
use ferry_loadtests::proxy_compare::{self, Config, MAX_ERROR_SHARE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_peer_routes_and_serves_load_without_errors() {
    let results = tempfile::tempdir().unwrap();
    let envoy = std::env::var("FERRY_ENVOY")
        .expect("FERRY_ENVOY must name the Envoy binary (scripts/test.sh sets it)");
    let mut config = Config {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
        envoy: envoy.into(),
        results_dir: Some(results.path().to_owned()),
        ..Config::smoke()
    };
    if let Some(nginx) = std::env::var_os("FERRY_NGINX") {
        config.nginx = nginx.into();
    }
    if let Some(haproxy) = std::env::var_os("FERRY_HAPROXY") {
        config.haproxy = haproxy.into();
    }
    let report = proxy_compare::run(config).await.unwrap();
    println!("{}", report.markdown());

    let names: Vec<PeerKind> = report.peers.iter().map(|p| p.peer).collect();
    assert_eq!(names, PeerKind::ALL);
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
