//! A small instance of the `campaign_scale` load test (ferry-loadtests), so
//! the load-test logic keeps working: one campaign over 40 services at
//! concurrency 10 with two simulated proxies against this build's `ferry`.
//! It checks that the campaign completes and the report carries its
//! figures; speed is measured, not asserted.

use std::time::Duration;

use ferry_loadtests::campaign_scale::{self, Config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_of_forty_services_completes_and_is_measured() {
    let results = tempfile::tempdir().unwrap();
    let out = results.path().join("campaign_scale.md");
    let config = Config {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
        services: 40,
        concurrency: 10,
        proxies: 2,
        bake: Duration::from_millis(200),
        campaign_timeout: Duration::from_secs(180),
        out: Some(out.clone()),
        smoke: true,
        ..Config::default()
    };
    let report = campaign_scale::run(config).await.unwrap();
    println!("{}", report.markdown());

    let o = &report.outcome;
    assert!(!o.timed_out, "{o:?}");
    assert_eq!(o.state, "DONE", "{o:?}");
    assert_eq!((o.services, o.done), (40, 40), "{o:?}");
    assert_eq!((o.rolled_back, o.skipped), (0, 0), "{o:?}");
    assert!(o.completed());
    assert!(o.wall_s > 0.0 && o.services_per_minute > 0.0, "{o:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    let m = &report.migrations;
    assert_eq!((m.listed, m.done, m.duration.samples), (40, 40, 40));
    assert!(m.duration.p50_ms > 0.0 && m.duration.p99_ms >= m.duration.p50_ms);
    let e = &report.engine;
    assert!(e.ticks > 0, "{e:?}");
    assert!(e.mean_ms.is_some_and(|ms| ms > 0.0), "{e:?}");
    assert!(e.p99_bound_ms.is_some(), "{e:?}");
    assert!(report.ferry.cpu_campaign_s > 0.0);
    assert!(report.ferry.peak_rss_bytes > 0);
    // Every step's routes reached both proxies, and load kept flowing.
    assert!(report.fleet.route_updates >= 2, "{:?}", report.fleet);
    assert!(report.fleet.load_reports > 0, "{:?}", report.fleet);

    let md = std::fs::read_to_string(&out).unwrap();
    assert_eq!(md, report.markdown());
    for figure in [
        "DONE: 40/40 done",
        "services per minute",
        "time per migration",
        "engine tick",
        "ferry CPU during the campaign",
        "Commit `",
    ] {
        assert!(md.contains(figure), "{figure:?} missing from:\n{md}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json["test"], "campaign_scale");
    assert_eq!(json["outcome"]["done"], 40);
    assert_eq!(json["migrations"]["duration"]["samples"], 40);
}
