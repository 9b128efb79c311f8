//! A short instance of the `proxy_compare` load test (ferry-loadtests),
//! so the load-test logic keeps working: this build's `ferry control` and
//! `ferry proxy`, the real Envoy (FERRY_ENVOY), `wrk` and `h2load`, one
//! second per measurement. It fails, never skips, when a tool is missing.
//! The bounds are sanity checks, not performance targets (a debug build
//! of the proxy is measured).

use ferry_loadtests::proxy_compare::{self, Config, MAX_ERROR_SHARE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_peer_serves_load_without_errors() {
    let results = tempfile::tempdir().unwrap();
    let envoy = std::env::var("FERRY_ENVOY")
        .expect("FERRY_ENVOY must name the Envoy binary (scripts/test.sh sets it)");
    let config = Config {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
        envoy: envoy.into(),
        results_dir: Some(results.path().to_owned()),
        ..Config::smoke()
    };
    let report = proxy_compare::run(config).await.unwrap();
    println!("{}", report.markdown());

    let names: Vec<&str> = report.peers.iter().map(|p| p.peer).collect();
    assert_eq!(names, ["direct", "ferry", "envoy"]);
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
        if peer.peer != "direct" {
            assert!(peer.rss_idle_bytes.is_some_and(|b| b > 0), "{peer:?}");
            assert!(peer.rss_load_bytes.is_some_and(|b| b > 0), "{peer:?}");
            assert!(peer.h1.cpu.is_some_and(|c| c.seconds > 0.0), "{peer:?}");
        }
    }
    // Every peer got the same fixed rate: half Envoy's HTTP/1.1 maximum.
    let envoy_h1 = report.peer("envoy").unwrap().h1.measured.rps;
    assert!((report.comparison.fixed_rate_rps - envoy_h1 / 2.0).abs() < 1.0);
    assert!(report.setup.envoy_version.starts_with("1.40"));

    let json = results.path().join("proxy_compare-smoke.json");
    let md = results.path().join("proxy_compare-smoke.md");
    assert_eq!(report.files, [json.clone(), md.clone()]);
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(parsed["test"], "proxy_compare");
    assert_eq!(parsed["peers"][1]["peer"], "ferry");
    assert!(parsed["peers"][2]["h2"]["rps"].as_f64() > Some(0.0));
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(
        text.contains("| ferry |") && text.contains("| envoy |"),
        "{text}"
    );
}
