//! Logs (`tracing`, filtered by `RUST_LOG`) and the Prometheus recorder.

use std::io::IsTerminal;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Installs the global metrics recorder; `/metrics` renders from the
/// handle. Must run within the Tokio runtime: histogram samples are
/// folded into their buckets every 5 s, so memory stays flat whether or
/// not anyone scrapes.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        // Acknowledgement waits run up to --ack-timeout (60 s by default).
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("ferry_migrate_ack_wait_seconds".into()),
            &[
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
            ],
        )?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "ferry_xds_connected_clients",
        "Open ADS streams, by variant (sotw, delta)."
    );
    describe_counter!("ferry_xds_streams_total", "ADS streams opened, by variant.");
    describe_counter!(
        "ferry_xds_pushes_total",
        "xDS responses sent, by type and variant."
    );
    describe_histogram!(
        "ferry_xds_push_latency_seconds",
        "Time from a catalog change to a client's xDS response carrying it."
    );
    describe_counter!(
        "ferry_xds_nacks_total",
        "Updates rejected (NACKed) by xDS clients, by type."
    );
    describe_counter!(
        "ferry_xds_stale_requests_total",
        "Requests answering an old nonce, by type."
    );
    describe_gauge!(
        "ferry_xds_snapshot_version",
        "Version of the xDS snapshot being served."
    );
    describe_gauge!(
        "ferry_xds_resources",
        "xDS resources in the current snapshot, by type."
    );
    describe_histogram!(
        "ferry_xds_translate_duration_seconds",
        "Time to translate a catalog change."
    );
    describe_counter!(
        "ferry_xds_services_translated_total",
        "Services (re)translated."
    );
    describe_gauge!(
        "ferry_discovery_catalog_version",
        "Version of the catalog being served."
    );
    describe_gauge!("ferry_discovery_services", "Services in the catalog.");
    describe_gauge!(
        "ferry_discovery_endpoints",
        "Endpoints in the catalog, all clusters."
    );
    describe_counter!(
        "ferry_discovery_catalog_errors_total",
        "Catalog file loads refused."
    );
    describe_gauge!(
        "ferry_discovery_cluster_up",
        "1 while a cluster is listed and watched, 0 while stale or unauthorized."
    );
    describe_gauge!(
        "ferry_discovery_last_sync_age_seconds",
        "Seconds since a cluster's watchers last heard from its API server."
    );
    describe_gauge!(
        "ferry_discovery_cluster_endpoints",
        "Endpoints known in a cluster (exported services' slices)."
    );
    describe_counter!(
        "ferry_discovery_watch_errors_total",
        "Watch failures per cluster (each rebuilds its watchers)."
    );
    describe_gauge!(
        "ferry_discovery_catalog_file_valid",
        "1 if the catalog file's latest content was accepted, 0 if it was refused."
    );
}
