//! `kube_scale`: Ferry's Kubernetes source at fleet scale: how long three
//! clusters holding 100,000 endpoints take to sync, how fast one
//! EndpointSlice change reaches a delta-xDS client, and Ferry's memory.
//!
//! ```sh
//! cargo build --release -p ferry -p ferry-loadtests
//! target/release/kube_scale --endpoints 100000
//! ```
//!
//! Prints a Markdown table and writes `loadtests/results/kube_scale-<endpoints>e.{json,md}`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ferry_loadtests::kube_scale::{self, Config};

#[derive(Debug, Parser)]
#[command(
    name = "kube_scale",
    about = "Starts three fake Kubernetes API servers holding N endpoints, points a real `ferry control` at them and measures initial sync, EndpointSlice change → xDS push latency and Ferry's RSS."
)]
struct Args {
    /// The ferry binary to start.
    #[arg(long, value_name = "PATH", default_value = "target/release/ferry")]
    ferry: PathBuf,

    /// Endpoints over the three clusters (rounded up to whole slices).
    #[arg(long, default_value_t = 100_000)]
    endpoints: usize,

    /// Endpoints per EndpointSlice.
    #[arg(long, default_value_t = 100)]
    endpoints_per_slice: usize,

    /// EndpointSlices of one service in one cluster.
    #[arg(long, default_value_t = 1)]
    slices_per_service: usize,

    /// Change rounds per Ferry run; each flips the readiness of one endpoint.
    #[arg(long, default_value_t = 20)]
    rounds: usize,

    /// Ferry's --debounce; repeat it for one Ferry run per value
    /// [default: 100ms and 0s].
    #[arg(long, value_parser = humantime::parse_duration)]
    debounce: Vec<Duration>,

    /// Longest wait for one change to reach the xDS client.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    round_timeout: Duration,

    /// Longest wait for the initial sync, from Ferry's start.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    sync_timeout: Duration,

    /// RUST_LOG for Ferry (its log goes to a temporary file).
    #[arg(long, default_value = "info")]
    ferry_log: String,

    /// Copy each run's Ferry log into this directory.
    #[arg(long, value_name = "DIR")]
    keep_ferry_logs: Option<PathBuf>,

    /// Where to write the JSON and Markdown results.
    #[arg(long, value_name = "DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results_dir: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let defaults = Config::default();
    let config = Config {
        ferry: args.ferry,
        endpoints: args.endpoints,
        endpoints_per_slice: args.endpoints_per_slice,
        slices_per_backend: args.slices_per_service,
        rounds: args.rounds,
        debounces: if args.debounce.is_empty() {
            defaults.debounces.clone()
        } else {
            args.debounce
        },
        round_timeout: args.round_timeout,
        sync_timeout: args.sync_timeout,
        ferry_log: args.ferry_log,
        keep_ferry_logs: args.keep_ferry_logs,
        results_dir: Some(args.results_dir),
        progress: true,
        ..defaults
    };
    match kube_scale::run(config).await {
        Ok(report) => {
            println!("{}", report.markdown());
            for file in &report.files {
                println!("wrote {}", file.display());
            }
            if !report.all_received() {
                eprintln!("kube_scale: some updates never arrived");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kube_scale: {e:#}");
            ExitCode::FAILURE
        }
    }
}
