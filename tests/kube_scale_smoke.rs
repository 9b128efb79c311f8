//! A small instance of the `kube_scale` load test (ferry-loadtests), so the
//! load-test logic keeps working: three fake API servers holding 3,000
//! endpoints, three change rounds per Ferry run (debounce 100 ms and 0 s)
//! against this build's `ferry`. The bounds are loose sanity checks, not
//! performance targets.

use std::time::Duration;

use ferry_loadtests::kube_scale::{self, Config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_slice_change_reaches_the_xds_client() {
    let results = tempfile::tempdir().unwrap();
    let config = Config {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
        endpoints: 3_000,
        rounds: 3,
        sync_timeout: Duration::from_secs(60),
        results_dir: Some(results.path().to_owned()),
        ..Config::default()
    };
    let report = kube_scale::run(config).await.unwrap();
    println!("{}", report.markdown());

    assert_eq!(report.setup.endpoints, 3_000);
    assert_eq!(report.setup.slices, 30);
    assert_eq!(report.setup.load_assignments, 30);
    assert_eq!(report.runs.len(), 2);
    for run in &report.runs {
        let sync = &run.initial_sync;
        assert!(sync.status_synced_s.is_some(), "{sync:?}");
        assert!(sync.xds_synced_s.is_some_and(|s| s < 60.0), "{sync:?}");
        assert_eq!(sync.xds_endpoints, 3_000);
        assert_eq!(sync.xds_load_assignments, 30);
        assert_eq!(run.change.received, 3, "{:?}", run.change.rounds);
        assert_eq!(run.change.missed, 0);
        assert!(
            run.change.rounds.iter().all(|r| r.latency_ms.is_some()),
            "{:?}",
            run.change.rounds
        );
        // The debounce is part of every measured latency.
        assert!(run.change.latency.min_ms >= run.debounce_ms);
        assert!(run.change.latency.max_ms < 10_000.0);
        assert!(run.ferry.after_rounds.rss_bytes > 0);
        assert!(run.errors.is_empty(), "{:?}", run.errors);
    }
    // Rounds of both runs visit all three clusters.
    let clusters: std::collections::BTreeSet<_> = report
        .runs
        .iter()
        .flat_map(|r| r.change.rounds.iter().map(|x| x.cluster))
        .collect();
    assert_eq!(clusters.len(), 3);

    let json = results.path().join("kube_scale-3000e.json");
    assert_eq!(report.files[0], json);
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(parsed["test"], "kube_scale");
    assert_eq!(parsed["setup"]["endpoints"], 3_000);
    assert_eq!(parsed["runs"][0]["change"]["received"], 3);
    assert_eq!(parsed["runs"][1]["debounce_ms"], 0.0);
    assert!(parsed["runs"][0]["ferry"]["after_sync"]["rss_bytes"].as_u64() > Some(0));
    assert!(results.path().join("kube_scale-3000e.md").is_file());
}
