//! `campaign_scale`: one campaign moving many services from `old` to `new`
//! through a real `ferry control`, with simulated proxies that ACK routes
//! and report load following the weights.
//!
//! ```sh
//! cargo build --release -p ferry -p ferry-loadtests
//! target/release/campaign_scale --services 1000 --concurrency 50 --bake 200ms
//! ```
//!
//! Prints a Markdown table and writes it to `--out`
//! (`loadtests/results/campaign_scale.md` by default; with `--smoke`, only
//! when `--out` is given), with the JSON beside it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ferry_loadtests::campaign_scale::{self, Config};

#[derive(Debug, Parser)]
#[command(
    name = "campaign_scale",
    about = "Runs one campaign over N services against a real `ferry control` with simulated proxies (delta ADS + LRS) and measures wall time, time per migration, the engine's cost per pass and Ferry's CPU and memory."
)]
struct Args {
    /// The ferry binary to start.
    #[arg(long, value_name = "PATH", default_value = "target/release/ferry")]
    ferry: PathBuf,

    /// Services in the catalog, all moved by the campaign [default: 1000;
    /// 40 with --smoke].
    #[arg(long)]
    services: Option<usize>,

    /// Migrations in flight at once (the campaign's concurrency and
    /// ferry's --max-concurrent-migrations) [default: 50; 10 with --smoke].
    #[arg(long)]
    concurrency: Option<usize>,

    /// Bake time of each step.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    bake: Duration,

    /// Simulated proxies.
    #[arg(long, default_value_t = 2)]
    proxies: usize,

    /// Target share of each step, in percent (repeat; the last is 100)
    /// [default: 50 and 100].
    #[arg(long = "step")]
    steps: Vec<f64>,

    /// Requests each side needs in a step's window for its gate.
    #[arg(long, default_value_t = 5)]
    min_requests: u64,

    /// Drain time of the sources once out of the routes.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    drain: Duration,

    /// How often each proxy reports load.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    report_interval: Duration,

    /// Requests per service in each load report, split by the weights.
    #[arg(long, default_value_t = 20)]
    requests_per_report: u64,

    /// Longest wait for the campaign to end [default: 30m; 3m with --smoke].
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,

    /// RUST_LOG for Ferry (its log goes to a temporary file).
    #[arg(long, default_value = "info")]
    ferry_log: String,

    /// Copy Ferry's log here at the end.
    #[arg(long, value_name = "FILE")]
    keep_ferry_log: Option<PathBuf>,

    /// Where to write the Markdown report (the JSON goes beside it).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,

    /// A small, quick instance: 40 services at concurrency 10 unless given,
    /// no report file unless --out.
    #[arg(long)]
    smoke: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let defaults = Config::default();
    let (services, concurrency, timeout) = if args.smoke {
        (40, 10, Duration::from_secs(180))
    } else {
        (
            defaults.services,
            defaults.concurrency,
            defaults.campaign_timeout,
        )
    };
    let out = args.out.or_else(|| {
        (!args.smoke).then(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/results/campaign_scale.md"
            ))
        })
    });
    let command = std::env::args()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 {
                "campaign_scale".to_owned()
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let config = Config {
        ferry: args.ferry,
        services: args.services.unwrap_or(services),
        concurrency: args.concurrency.unwrap_or(concurrency),
        bake: args.bake,
        proxies: args.proxies,
        steps: if args.steps.is_empty() {
            defaults.steps.clone()
        } else {
            args.steps
        },
        min_requests: args.min_requests,
        drain: args.drain,
        report_interval: args.report_interval,
        requests_per_report: args.requests_per_report,
        campaign_timeout: args.timeout.unwrap_or(timeout),
        ferry_log: args.ferry_log,
        keep_ferry_log: args.keep_ferry_log,
        out,
        command: Some(command),
        smoke: args.smoke,
        progress: true,
        ..defaults
    };
    match campaign_scale::run(config).await {
        Ok(report) => {
            println!("{}", report.markdown());
            for file in &report.files {
                println!("wrote {}", file.display());
            }
            if !report.outcome.completed() {
                eprintln!("campaign_scale: the campaign did not complete with every service done");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("campaign_scale: {e:#}");
            ExitCode::FAILURE
        }
    }
}
