//! `proxy_compare`: Ferry's proxy against Envoy 1.40 (configured by
//! Ferry, and static), nginx and HAProxy, each alone on the same pinned
//! cores with the same number of workers, in front of the same backend:
//! requests per second (HTTP/1.1 with `wrk`, h2c with `h2load`), latency
//! at a fixed rate, resident memory, CPU and upstream connections.
//!
//! ```sh
//! apt-get install wrk nghttp2-client nginx haproxy
//! cargo build --release -p ferry -p ferry-loadtests
//! FERRY_ENVOY=.venv/bin/envoy target/release/proxy_compare
//! # two workers on cores 0-1 (the load then shares them), 64 KiB answers
//! FERRY_ENVOY=.venv/bin/envoy target/release/proxy_compare --workers 2 --body-bytes 65536 --label w2-64k
//! ```
//!
//! Prints a Markdown table and writes
//! `loadtests/results/proxy_compare-<label>.{json,md}`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ferry_loadtests::proxy_compare::backend::BackendKind;
use ferry_loadtests::proxy_compare::machine::CoreList;
use ferry_loadtests::proxy_compare::peers::PeerKind;
use ferry_loadtests::proxy_compare::{self, Config};

#[derive(Debug, Parser)]
#[command(
    name = "proxy_compare",
    about = "Runs a backend, a real `ferry control`, then `ferry proxy`, Envoy (configured by Ferry, and static), nginx and HAProxy one at a time, each alone on the same pinned cores with the same number of workers, and measures requests/s (HTTP/1.1, h2c), latency at a fixed rate, RSS, CPU and upstream connections of each, and of the backend reached directly."
)]
struct Args {
    /// The ferry binary to start.
    #[arg(long, value_name = "PATH", default_value = "target/release/ferry")]
    ferry: PathBuf,

    /// The Envoy binary.
    #[arg(long, value_name = "PATH", env = "FERRY_ENVOY")]
    envoy: PathBuf,

    /// nginx, for the nginx peer and the nginx backend (a path, or a name
    /// looked up on PATH and in /usr/sbin).
    #[arg(
        long,
        value_name = "PATH",
        env = "FERRY_NGINX",
        default_value = "nginx"
    )]
    nginx: PathBuf,

    /// HAProxy (a path, or a name looked up on PATH and in /usr/sbin).
    #[arg(
        long,
        value_name = "PATH",
        env = "FERRY_HAPROXY",
        default_value = "haproxy"
    )]
    haproxy: PathBuf,

    /// The backend behind every peer: nginx (its own instance, one
    /// process) or hyper (in this process, one thread).
    #[arg(long, default_value_t = BackendKind::Nginx)]
    backend: BackendKind,

    /// The peers to run, in order (direct, ferry, envoy, envoy-static,
    /// nginx, haproxy) [default: all].
    #[arg(long, value_delimiter = ',')]
    peers: Vec<PeerKind>,

    /// The short preset (1 s per measurement) CI runs; flags below still
    /// override it.
    #[arg(long)]
    smoke: bool,

    /// In the result file names [default: full, or smoke with --smoke].
    #[arg(long)]
    label: Option<String>,

    /// Workers of every peer that has the setting (`ferry proxy
    /// --workers`, Envoy `--concurrency`, nginx `worker_processes`,
    /// HAProxy `nbthread`), of the backend, and `wrk`/`h2load` threads.
    #[arg(long, default_value_t = 1, value_name = "N")]
    workers: usize,

    /// The cores every peer is pinned to, one peer at a time, as taskset
    /// takes them (`0`, `0-1`) [default: the first N for --workers N].
    #[arg(long, visible_alias = "proxy-core", value_name = "LIST")]
    proxy_cores: Option<CoreList>,

    /// Cores of the backend and the load generators, as taskset takes them
    /// (`1`, `1-3`) [default: every other core; every core when the peers
    /// take them all, and the results say the load shared them].
    #[arg(long, value_name = "LIST")]
    load_cores: Option<CoreList>,

    /// The size of the backend's answer, in bytes [default: 37].
    #[arg(long, value_name = "N")]
    body_bytes: Option<usize>,

    /// Each saturation run, in whole seconds [default: 10s; smoke 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,

    /// Unrecorded HTTP/1.1 run before each peer [default: 2s; smoke none].
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

    /// The fixed rate as a share of the slowest proxy's HTTP/1.1 maximum.
    #[arg(long)]
    fixed_rate_share: Option<f64>,

    /// The fixed-rate run [default: 10s; smoke 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    fixed_rate_duration: Option<Duration>,

    /// Connections of the fixed-rate generator.
    #[arg(long)]
    fixed_rate_connections: Option<usize>,

    /// Copy the peers', the backend's and the control plane's logs into
    /// this directory.
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
            nginx: self.nginx,
            haproxy: self.haproxy,
            backend: self.backend,
            peers: if self.peers.is_empty() {
                base.peers
            } else {
                self.peers
            },
            label: self.label.unwrap_or(base.label),
            workers: self.workers,
            proxy_cores: self.proxy_cores,
            load_cores: self.load_cores,
            body_bytes: self.body_bytes.unwrap_or(base.body_bytes),
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
