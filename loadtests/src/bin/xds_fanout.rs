//! `xds_fanout`: how fast one catalog change reaches thousands of delta-xDS
//! clients, and what that costs Ferry.
//!
//! ```sh
//! cargo build --release -p ferry -p ferry-loadtests
//! ulimit -n 65536   # for --clients 10000 and more
//! target/release/xds_fanout --clients 1000 --endpoints 10000
//! ```
//!
//! Prints a Markdown table and writes `loadtests/results/xds_fanout-<clients>c-<endpoints>e.{json,md}`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ferry_loadtests::Config;

#[derive(Debug, Parser)]
#[command(
    name = "xds_fanout",
    about = "Connects N simulated delta-xDS clients to a real `ferry control`, flips one endpoint in its catalog file and measures change → receipt latency, Ferry's RSS and CPU."
)]
struct Args {
    /// The ferry binary to start.
    #[arg(long, value_name = "PATH", default_value = "target/release/ferry")]
    ferry: PathBuf,

    /// Simulated delta-xDS clients (wildcard CDS + EDS, ACK every response).
    #[arg(long, default_value_t = 1_000)]
    clients: usize,

    /// Endpoints in the generated catalog (rounded up to whole services).
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,

    /// Endpoints per cluster backend; each service has two ("old", "new").
    #[arg(long, default_value_t = 50)]
    endpoints_per_backend: usize,

    /// Change rounds; each flips the readiness of one endpoint.
    #[arg(long, default_value_t = 5)]
    rounds: usize,

    /// Client streams multiplexed over one HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    clients_per_connection: usize,

    /// Clients fetching their initial config at once (0: all at once).
    #[arg(long, default_value_t = 1_000)]
    sync_concurrency: usize,

    /// Ferry's --debounce (included in the measured latency).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    debounce: Duration,

    /// Longest wait for every client to receive one change.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    round_timeout: Duration,

    /// Longest wait for every client's initial config.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    sync_timeout: Duration,

    /// RUST_LOG for Ferry (its log goes to a temporary file).
    #[arg(long, default_value = "info")]
    ferry_log: String,

    /// Kill Ferry and stop if its and this process's resident memory
    /// together pass this many MiB (a load that does not fit the machine).
    #[arg(long, default_value_t = 14 * 1024)]
    max_rss_mib: u64,

    /// Copy Ferry's log here at the end (it is discarded otherwise).
    #[arg(long, value_name = "FILE")]
    keep_ferry_log: Option<PathBuf>,

    /// Where to write the JSON and Markdown results.
    #[arg(long, value_name = "DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results_dir: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = Config {
        ferry: args.ferry,
        clients: args.clients,
        endpoints: args.endpoints,
        endpoints_per_backend: args.endpoints_per_backend,
        rounds: args.rounds,
        clients_per_connection: args.clients_per_connection,
        sync_concurrency: args.sync_concurrency,
        debounce: args.debounce,
        round_timeout: args.round_timeout,
        sync_timeout: args.sync_timeout,
        ferry_log: args.ferry_log,
        results_dir: Some(args.results_dir),
        keep_ferry_log: args.keep_ferry_log,
        max_rss_bytes: args.max_rss_mib << 20,
        progress: true,
        ..Config::default()
    };
    match ferry_loadtests::run(config).await {
        Ok(report) => {
            println!("{}", report.markdown());
            for file in &report.files {
                println!("wrote {}", file.display());
            }
            if let Some(reason) = &report.aborted {
                eprintln!("xds_fanout: aborted: {reason}");
                return ExitCode::FAILURE;
            }
            if report.change.missed > 0 || report.initial_sync.failed_clients > 0 {
                eprintln!(
                    "xds_fanout: {} updates missed, {} clients never synced",
                    report.change.missed, report.initial_sync.failed_clients
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xds_fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}
