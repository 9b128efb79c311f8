//! `proxy_compare`: Ferry's proxy against Envoy 1.40 on the same pinned
//! core, behind the same control plane, in front of the same backend:
//! requests per second (HTTP/1.1 with `wrk`, h2c with `h2load`), latency
//! at a fixed rate, resident memory and CPU.
//!
//! ```sh
//! apt-get install wrk nghttp2-client
//! cargo build --release -p ferry -p ferry-loadtests
//! FERRY_ENVOY=.venv/bin/envoy target/release/proxy_compare
//! ```
//!
//! Prints a Markdown table and writes
//! `loadtests/results/proxy_compare-<label>.{json,md}`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ferry_loadtests::proxy_compare::{self, Config};

#[derive(Debug, Parser)]
#[command(
    name = "proxy_compare",
    about = "Runs a backend, a real `ferry control`, `ferry proxy` and Envoy (each proxy pinned to one core) and measures requests/s (HTTP/1.1, h2c), latency at a fixed rate, RSS and CPU of each, and of the backend reached directly."
)]
struct Args {
    /// The ferry binary to start.
    #[arg(long, value_name = "PATH", default_value = "target/release/ferry")]
    ferry: PathBuf,

    /// The Envoy binary.
    #[arg(long, value_name = "PATH", env = "FERRY_ENVOY")]
    envoy: PathBuf,

    /// The short preset (1 s per measurement) CI runs; flags below still
    /// override it.
    #[arg(long)]
    smoke: bool,

    /// In the result file names [default: full, or smoke with --smoke].
    #[arg(long)]
    label: Option<String>,

    /// The core both proxies are pinned to.
    #[arg(long, default_value_t = 0)]
    proxy_core: usize,

    /// Cores of the backend and the load generators, as taskset takes them
    /// (`1`, `1-3`) [default: every other core].
    #[arg(long, value_name = "LIST")]
    load_cores: Option<String>,

    /// Each saturation run, in whole seconds [default: 10s; smoke 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,

    /// Unrecorded HTTP/1.1 run before each peer [default: 2s; smoke 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,

    /// wrk connections (HTTP/1.1).
    #[arg(long)]
    h1_connections: Option<usize>,

    /// h2load connections (h2c).
    #[arg(long)]
    h2_connections: Option<usize>,

    /// h2load concurrent streams per connection.
    #[arg(long)]
    h2_streams: Option<usize>,

    /// The fixed rate as a share of Envoy's HTTP/1.1 maximum.
    #[arg(long)]
    fixed_rate_share: Option<f64>,

    /// The fixed-rate run [default: 10s; smoke 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    fixed_rate_duration: Option<Duration>,

    /// Connections of the fixed-rate generator.
    #[arg(long)]
    fixed_rate_connections: Option<usize>,

    /// Copy the proxies' and the control plane's logs into this directory.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,

    /// Where to write the JSON and Markdown results.
    #[arg(long, value_name = "DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results_dir: PathBuf,
}

impl Args {
    fn config(self) -> Config {
        let base = if self.smoke {
            Config::smoke()
        } else {
            Config::default()
        };
        Config {
            ferry: self.ferry,
            envoy: self.envoy,
            label: self.label.unwrap_or(base.label),
            proxy_core: self.proxy_core,
            load_cores: self.load_cores,
            duration: self.duration.unwrap_or(base.duration),
            warmup: self.warmup.unwrap_or(base.warmup),
            h1_connections: self.h1_connections.unwrap_or(base.h1_connections),
            h2_connections: self.h2_connections.unwrap_or(base.h2_connections),
            h2_streams: self.h2_streams.unwrap_or(base.h2_streams),
            fixed_rate_share: self.fixed_rate_share.unwrap_or(base.fixed_rate_share),
            fixed_rate_duration: self.fixed_rate_duration.unwrap_or(base.fixed_rate_duration),
            fixed_rate_connections: self
                .fixed_rate_connections
                .unwrap_or(base.fixed_rate_connections),
            keep_logs: self.keep_logs,
            results_dir: Some(self.results_dir),
            progress: true,
            ..base
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match proxy_compare::run(Args::parse().config()).await {
        Ok(report) => {
            println!("{}", report.markdown());
            for file in &report.files {
                println!("wrote {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("proxy_compare: {e:#}");
            ExitCode::FAILURE
        }
    }
}
