//! A small instance of the `xds_fanout` load test (ferry-loadtests), so the
//! load-test logic keeps working: 50 delta-xDS clients, 1,000 endpoints,
//! two change rounds against this build's `ferry`. The latency bound is a
//! loose sanity check, not a performance target.

use std::time::Duration;

use ferry_loadtests::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_gets_every_change() {
    let results = tempfile::tempdir().unwrap();
    let config = Config {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
        clients: 50,
        endpoints: 1_000,
        rounds: 2,
        sync_timeout: Duration::from_secs(60),
        results_dir: Some(results.path().to_owned()),
        ..Config::default()
    };
    let report = ferry_loadtests::run(config).await.unwrap();
    println!("{}", report.markdown());

    assert_eq!(report.initial_sync.synced_clients, 50);
    assert_eq!(report.initial_sync.incomplete_config, 0);
    assert_eq!(report.setup.endpoints, 1_000);
    assert_eq!(report.change.expected, 100);
    assert_eq!(report.change.received, 100, "{:?}", report.change.rounds);
    assert_eq!(report.change.missed, 0);
    assert_eq!(report.change.wrong_content, 0);
    assert!(
        report.change.latency.p99_ms < 10_000.0,
        "p99 {} ms",
        report.change.latency.p99_ms
    );
    // Ferry's debounce is part of every measured latency.
    assert!(report.change.latency.min_ms >= 100.0);

    let json = results.path().join("xds_fanout-50c-1000e.json");
    assert_eq!(report.files[0], json);
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(parsed["change"]["received"], 100);
    assert_eq!(parsed["setup"]["clients"], 50);
    assert!(results.path().join("xds_fanout-50c-1000e.md").is_file());
}
