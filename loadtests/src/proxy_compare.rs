//! The `proxy_compare` load test: Ferry's proxy against Envoy on the same
//! core, the same control plane and the same backend.
//!
//! [`run`] starts a minimal HTTP backend ([`backend`]) and a real
//! `ferry control` whose catalog holds one service on it, then `ferry proxy
//! --workers 1` and Envoy `--concurrency 1` ([`peers`]), each under
//! `taskset` on the proxy core while the backend and the load generators
//! run on the other cores ([`machine`]). Once each proxy routes (a request
//! through it gets the backend's body), it measures, one peer after the
//! other, for the backend reached directly (the ceiling), Ferry and Envoy:
//!
//! - **saturation**: requests per second with `wrk` (HTTP/1.1 keep-alive)
//!   and `h2load` (HTTP/2 cleartext, prior knowledge) at a fixed number of
//!   connections and streams ([`saturation`]);
//! - **latency at a fixed rate**: p50/p99/p99.9 with an open-loop
//!   HTTP/1.1 generator ([`fixed_rate`]) at a share (50 %) of Envoy's
//!   HTTP/1.1 maximum, the same rate for every peer;
//! - each proxy's resident memory idle (config applied) and the largest
//!   sampled during load, and its CPU time per run.
//!
//! Non-2xx answers and errors are counted in every run; a run where they
//! pass 1 % is flagged in the report. Everything stays on loopback, every
//! run is bounded in time, and every process is killed when the test ends,
//! however it ends. The binary `proxy_compare` is the command line;
//! `tests/proxy_compare_smoke.rs` runs the [`Config::smoke`] preset.

pub mod backend;
pub mod fixed_rate;
pub mod machine;
pub mod peers;
pub mod saturation;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;

use crate::ferry::{self, FerryOptions, FerryProcess};
use crate::stats::{fmt_mib, fmt_ms};
use backend::Backend;
use fixed_rate::{FixedRate, Plan};
use machine::{CoreTime, Machine};
use peers::ProxyProcess;
use saturation::{Load, Measured, Protocol};

/// Name of the test, in result file names.
pub const TEST_NAME: &str = "proxy_compare";
/// The `Host` every request carries: the catalog's one service.
pub const HOST: &str = "echo.bench";
/// A run whose failed requests pass this share is flagged.
pub const MAX_ERROR_SHARE: f64 = 0.01;
/// Cores other processes may keep busy before and after the runs without
/// a flag: more means the machine was not quiet and the figures are low.
pub const MAX_BUSY_CORES: f64 = 0.25;
/// What the backend answers.
const BODY: &[u8] = b"hello from the proxy_compare backend\n";

/// The targets Ferry's proxy is held to.
pub mod targets {
    /// Requests per second, as a multiple of Envoy's.
    pub const RPS_VS_ENVOY: f64 = 1.2;
    /// Resident memory, as a share of Envoy's.
    pub const RSS_VS_ENVOY: f64 = 1.0 / 3.0;
    /// Requests per second, as a share of the backend reached directly.
    pub const OF_DIRECT: f64 = 0.7;
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// The Envoy binary.
    pub envoy: PathBuf,
    /// In result file names: `proxy_compare-<label>.{json,md}`.
    pub label: String,
    /// The core both proxies are pinned to.
    pub proxy_core: usize,
    /// The cores of the backend and the load generators (a `taskset` list);
    /// `None`: every other core.
    pub load_cores: Option<String>,
    /// Each saturation run (whole seconds).
    pub duration: Duration,
    /// An unrecorded HTTP/1.1 run before each peer's measurements.
    pub warmup: Duration,
    pub h1_connections: usize,
    pub h2_connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_streams: usize,
    /// The fixed rate, as a share of Envoy's HTTP/1.1 maximum.
    pub fixed_rate_share: f64,
    pub fixed_rate_duration: Duration,
    pub fixed_rate_connections: usize,
    /// Longest wait for a proxy to route.
    pub ready_timeout: Duration,
    /// Where to write the JSON and Markdown results; `None`: not written.
    pub results_dir: Option<PathBuf>,
    /// Where to copy the proxies' and control plane's logs.
    pub keep_logs: Option<PathBuf>,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for Config {
    /// The full run: 10 s per measurement.
    fn default() -> Self {
        Self {
            ferry: PathBuf::from("target/release/ferry"),
            envoy: PathBuf::from("envoy"),
            label: "full".to_owned(),
            proxy_core: 0,
            load_cores: None,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            h1_connections: 64,
            h2_connections: 16,
            h2_streams: 16,
            fixed_rate_share: 0.5,
            fixed_rate_duration: Duration::from_secs(10),
            fixed_rate_connections: 32,
            ready_timeout: Duration::from_secs(30),
            results_dir: None,
            keep_logs: None,
            progress: false,
        }
    }
}

impl Config {
    /// A short run for CI: 1 s per measurement.
    pub fn smoke() -> Self {
        Self {
            label: "smoke".to_owned(),
            duration: Duration::from_secs(1),
            warmup: Duration::from_secs(1),
            fixed_rate_duration: Duration::from_secs(1),
            ..Self::default()
        }
    }
}

/// What was run.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub machine: Machine,
    /// Cores the machine kept busy in the second before the test started
    /// and in the second after the runs (nothing under test running then
    /// but the idle proxies).
    pub busy_cores_before: Option<f64>,
    pub busy_cores_after: Option<f64>,
    pub envoy_version: String,
    pub ferry_binary: PathBuf,
    pub envoy_binary: PathBuf,
    pub proxy_core: usize,
    pub load_cores: String,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub h1_connections: usize,
    pub h2_connections: usize,
    pub h2_streams: usize,
    pub fixed_rate_share: f64,
    pub fixed_rate_duration_s: f64,
    pub fixed_rate_connections: usize,
    pub body_bytes: usize,
}

/// CPU a proxy spent in one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cpu {
    pub seconds: f64,
    /// `seconds` over the run's wall time: 1.0 is one core saturated.
    pub cores: f64,
    pub us_per_request: f64,
}

/// Where the proxy core's time went during a run, and how much of it
/// went to processes other than the proxy under test.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProxyCore {
    #[serde(flatten)]
    pub time: CoreTime,
    /// `processes` minus the proxy's own CPU.
    pub other_processes: f64,
}

/// A saturation run of one peer.
#[derive(Debug, Clone, Serialize)]
pub struct Saturation {
    pub protocol: Protocol,
    pub connections: usize,
    pub streams_per_connection: usize,
    pub wall_s: f64,
    #[serde(flatten)]
    pub measured: Measured,
    pub error_share: f64,
    /// The proxy's; `None` for the backend reached directly.
    pub cpu: Option<Cpu>,
    pub proxy_core: Option<ProxyCore>,
}

/// The fixed-rate run of one peer.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    #[serde(flatten)]
    pub run: FixedRate,
    pub error_share: f64,
    pub cpu: Option<Cpu>,
    pub proxy_core: Option<ProxyCore>,
}

/// Everything measured for one peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerResult {
    /// `direct`, `ferry` or `envoy`.
    pub peer: &'static str,
    /// From start to the first request routed to the backend.
    pub routed_after_s: Option<f64>,
    pub h1: Saturation,
    pub h2: Saturation,
    pub fixed_rate: Latency,
    /// VmRSS once configured and routing, before any load.
    pub rss_idle_bytes: Option<u64>,
    /// The largest VmRSS sampled (every 100 ms) during the runs.
    pub rss_load_bytes: Option<u64>,
    /// VmHWM at the end.
    pub rss_peak_bytes: Option<u64>,
    /// Runs to read with care: errors over 1 %, a proxy not saturated.
    pub flags: Vec<String>,
}

/// Ferry's proxy against Envoy and against the ceiling.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub h1_rps_vs_envoy: f64,
    pub h2_rps_vs_envoy: f64,
    pub h1_of_direct: f64,
    pub h2_of_direct: f64,
    pub envoy_h1_of_direct: f64,
    pub envoy_h2_of_direct: f64,
    /// The fixed rate every peer got (a share of Envoy's HTTP/1.1 maximum).
    pub fixed_rate_rps: f64,
    pub p99_ms: f64,
    pub envoy_p99_ms: f64,
    pub rss_idle_vs_envoy: f64,
    pub rss_load_vs_envoy: f64,
}

/// Which targets Ferry's proxy met.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Both protocols at least [`targets::RPS_VS_ENVOY`] × Envoy's.
    pub rps_vs_envoy: bool,
    /// p99 at the fixed rate no higher than Envoy's.
    pub p99_vs_envoy: bool,
    /// Idle and under load at most [`targets::RSS_VS_ENVOY`] of Envoy's.
    pub rss_vs_envoy: bool,
    /// Both protocols at least [`targets::OF_DIRECT`] of direct.
    pub of_direct: bool,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub test: &'static str,
    pub label: String,
    pub setup: Setup,
    pub peers: Vec<PeerResult>,
    pub comparison: Comparison,
    pub verdict: Verdict,
    /// Every peer's flags, prefixed with the peer.
    pub flags: Vec<String>,
    /// The result files written.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
}

impl Report {
    pub fn peer(&self, name: &str) -> Option<&PeerResult> {
        self.peers.iter().find(|p| p.peer == name)
    }
}

/// A peer under load: where to send requests, and the process to sample.
struct Target<'a> {
    name: &'static str,
    addr: std::net::SocketAddr,
    process: Option<&'a ProxyProcess>,
}

/// How a proxy process fared during one run.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    wall_s: f64,
    cpu_s: Option<f64>,
    max_rss: Option<u64>,
    core: Option<CoreTime>,
}

impl Usage {
    /// `None` without a proxy process (the backend reached directly).
    fn proxy_core(&self) -> Option<ProxyCore> {
        let time = self.core?;
        let own = self.cpu_s? / self.wall_s.max(1e-9);
        Some(ProxyCore {
            time,
            other_processes: (time.processes - own).max(0.0),
        })
    }

    fn cpu(&self, requests: u64) -> Option<Cpu> {
        let seconds = self.cpu_s?;
        Some(Cpu {
            seconds,
            cores: seconds / self.wall_s.max(1e-9),
            us_per_request: seconds * 1e6 / requests.max(1) as f64,
        })
    }
}

/// Runs `work` while sampling `pid`'s RSS every 100 ms and its CPU time
/// before and after.
async fn sampled<T>(
    pid: Option<u32>,
    core: usize,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Usage)> {
    let sample = || pid.and_then(|p| ferry::sample_process(p).ok());
    let core_before = machine::core_jiffies(core);
    let before = sample();
    let started = Instant::now();
    let mut max_rss = before.map(|s| s.rss_bytes);
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(work);
    let value = loop {
        tokio::select! {
            value = &mut work => break value?,
            _ = ticks.tick() => {
                if let Some(s) = sample() {
                    max_rss = Some(max_rss.unwrap_or(0).max(s.rss_bytes));
                }
            }
        }
    };
    let wall_s = started.elapsed().as_secs_f64();
    let after = sample();
    if let Some(s) = after {
        max_rss = Some(max_rss.unwrap_or(0).max(s.rss_bytes));
    }
    let cpu_s = before
        .zip(after)
        .map(|(b, a)| a.cpu_seconds - b.cpu_seconds);
    let core = core_before
        .zip(machine::core_jiffies(core))
        .map(|(b, a)| CoreTime::between(b, a));
    Ok((
        value,
        Usage {
            wall_s,
            cpu_s,
            max_rss,
            core,
        },
    ))
}

/// The catalog: one service whose one backend is the test's server.
fn catalog_yaml(backend: std::net::SocketAddr) -> String {
    let (name, namespace) = HOST.split_once('.').unwrap_or((HOST, "default"));
    format!(
        "services:\n  - name: {name}\n    namespace: {namespace}\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      local: {{endpoints: [\"{backend}\"]}}\n"
    )
}

/// Everything running during a test, killed when dropped.
struct Bench {
    config: Config,
    load_cores: String,
    backend: Backend,
    _control: FerryProcess,
    ferry: ProxyProcess,
    envoy: ProxyProcess,
    /// How long Ferry's proxy and Envoy took to route, from their start.
    routed: [Duration; 2],
    /// Their VmRSS once routing, before any load.
    idle: [u64; 2],
    started: Instant,
}

impl Bench {
    fn progress(&self, msg: &str) {
        if self.config.progress && !msg.is_empty() {
            eprintln!(
                "[{TEST_NAME} {:6.1}s] {msg}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn targets(&self) -> [Target<'_>; 3] {
        [
            Target {
                name: "direct",
                addr: self.backend.addr,
                process: None,
            },
            Target {
                name: "ferry",
                addr: self.ferry.listen,
                process: Some(&self.ferry),
            },
            Target {
                name: "envoy",
                addr: self.envoy.listen,
                process: Some(&self.envoy),
            },
        ]
    }

    async fn saturate(
        &self,
        target: &Target<'_>,
        protocol: Protocol,
        duration: Duration,
    ) -> anyhow::Result<(Saturation, Usage)> {
        let (connections, streams) = match protocol {
            Protocol::Http1 => (self.config.h1_connections, 1),
            Protocol::Http2 => (self.config.h2_connections, self.config.h2_streams),
        };
        let load = Load {
            protocol,
            addr: target.addr,
            host: HOST.to_owned(),
            duration,
            connections,
            streams,
        };
        let (measured, usage) = sampled(
            target.process.map(|p| p.pid),
            self.config.proxy_core,
            saturation::run(&load, &self.load_cores),
        )
        .await
        .with_context(|| format!("{} {protocol:?}", target.name))?;
        let result = Saturation {
            protocol,
            connections,
            streams_per_connection: streams,
            wall_s: usage.wall_s,
            error_share: measured.error_share(),
            cpu: usage.cpu(measured.requests),
            proxy_core: usage.proxy_core(),
            measured,
        };
        Ok((result, usage))
    }

    async fn fixed_rate(&self, target: &Target<'_>, rate: f64) -> anyhow::Result<(Latency, Usage)> {
        let plan = Plan {
            addr: target.addr,
            host: HOST.to_owned(),
            rate,
            duration: self.config.fixed_rate_duration,
            connections: self.config.fixed_rate_connections,
            grace: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        };
        let (run, usage) = sampled(
            target.process.map(|p| p.pid),
            self.config.proxy_core,
            fixed_rate::run(plan, &self.load_cores),
        )
        .await
        .with_context(|| format!("{} at a fixed rate", target.name))?;
        let latency = Latency {
            error_share: run.error_share(),
            cpu: usage.cpu((run.ok + run.non_2xx) as u64),
            proxy_core: usage.proxy_core(),
            run,
        };
        Ok((latency, usage))
    }
}

/// Saturation results of one peer, before the fixed-rate run.
struct Saturated {
    h1: Saturation,
    h2: Saturation,
    max_rss: Option<u64>,
}

/// Runs the `proxy_compare` load test and writes its results.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    let started = Instant::now();
    let machine = Machine::describe();
    check_prerequisites(&config, &machine)?;
    let busy_cores_before = machine::busy_cores(Duration::from_secs(1)).await;
    let envoy_version = peers::envoy_version(&config.envoy)?;
    let load_cores = config
        .load_cores
        .clone()
        .unwrap_or_else(|| machine::other_cores(config.proxy_core, machine.cores));
    if config.progress {
        eprintln!(
            "[{TEST_NAME}] {} ({} cores), kernel {}, envoy {envoy_version}; proxies on core {}, load on {load_cores}",
            machine.cpu_model, machine.cores, machine.kernel, config.proxy_core
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("ferry-proxy-compare-")
        .tempdir()
        .context("creating a temporary directory")?;
    let mut bench = Bench::start(&config, &load_cores, dir.path(), started).await?;
    let (peers, rate) = bench.measure().await?;
    bench.check_running()?;
    let busy_cores_after = machine::busy_cores(Duration::from_secs(1)).await;
    if let Some(keep) = &config.keep_logs {
        keep_logs(keep, &config.label, dir.path())?;
    }
    drop(bench);

    let comparison = compare(&peers, rate);
    let verdict = verdict(&comparison);
    let mut flags: Vec<String> = peers
        .iter()
        .flat_map(|p| p.flags.iter().map(move |f| format!("{}: {f}", p.peer)))
        .collect();
    for (when, busy) in [("before", busy_cores_before), ("after", busy_cores_after)] {
        if let Some(cores) = busy.filter(|b| *b > MAX_BUSY_CORES) {
            flags.push(format!(
                "the machine was not quiet: {cores:.2} cores busy in the second {when} the runs"
            ));
        }
    }
    let setup = Setup {
        machine,
        busy_cores_before,
        busy_cores_after,
        envoy_version,
        ferry_binary: config.ferry.clone(),
        envoy_binary: config.envoy.clone(),
        proxy_core: config.proxy_core,
        load_cores,
        duration_s: config.duration.as_secs_f64().ceil().max(1.0),
        warmup_s: config.warmup.as_secs_f64(),
        h1_connections: config.h1_connections,
        h2_connections: config.h2_connections,
        h2_streams: config.h2_streams,
        fixed_rate_share: config.fixed_rate_share,
        fixed_rate_duration_s: config.fixed_rate_duration.as_secs_f64(),
        fixed_rate_connections: config.fixed_rate_connections,
        body_bytes: BODY.len(),
    };
    let report = Report {
        test: TEST_NAME,
        label: config.label.clone(),
        setup,
        peers,
        comparison,
        verdict,
        flags,
        files: Vec::new(),
    };
    write_results(report, config.results_dir.as_deref())
}

impl Bench {
    /// Starts the backend, the control plane and both proxies, and waits
    /// until each proxy routes to the backend.
    async fn start(
        config: &Config,
        load_cores: &str,
        dir: &Path,
        started: Instant,
    ) -> anyhow::Result<Self> {
        let body = Bytes::from_static(BODY);
        let backend = Backend::start(load_cores, body.clone())?;
        let (status, answer) =
            fixed_rate::get_once(backend.addr, HOST, Duration::from_secs(5)).await?;
        anyhow::ensure!(
            status == 200 && answer == body,
            "the backend answered {status} {answer:?}"
        );
        let catalog = dir.join("catalog.yaml");
        std::fs::write(&catalog, catalog_yaml(backend.addr))
            .with_context(|| format!("writing {}", catalog.display()))?;
        let [envoy_listen] = peers::free_addrs()?;
        let mut control = FerryProcess::spawn(&FerryOptions {
            binary: config.ferry.clone(),
            catalog,
            debounce: Duration::from_millis(10),
            listener_addr: envoy_listen,
            log_filter: "info".to_owned(),
            log_file: dir.join("ferry-control.log"),
            extra_args: Vec::new(),
        })?;
        control.wait_ready(config.ready_timeout).await?;
        // The control plane idles during the runs; keep it off the proxy core.
        pin_process(control.pid, load_cores)?;
        let xds = control.xds_addr;
        let core = config.proxy_core;
        let mut ferry = ProxyProcess::ferry(&config.ferry, xds, core, dir)?;
        let mut envoy = ProxyProcess::envoy(&config.envoy, xds, envoy_listen, core, dir)?;
        let routed = [
            ferry
                .wait_routing(HOST, &body, config.ready_timeout)
                .await?,
            envoy
                .wait_routing(HOST, &body, config.ready_timeout)
                .await?,
        ];
        // Let start-up work (stats flushes, xDS ACKs) settle before idle RSS.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = [ferry.sample()?.rss_bytes, envoy.sample()?.rss_bytes];
        let bench = Self {
            config: config.clone(),
            load_cores: load_cores.to_owned(),
            backend,
            _control: control,
            ferry,
            envoy,
            routed,
            idle,
            started,
        };
        bench.progress(&format!(
            "backend {}, ferry proxy (pid {}) routes after {:.2} s, envoy (pid {}) after {:.2} s",
            bench.backend.addr,
            bench.ferry.pid,
            routed[0].as_secs_f64(),
            bench.envoy.pid,
            routed[1].as_secs_f64()
        ));
        Ok(bench)
    }

    /// Saturation of every peer, then every peer at the fixed rate; the
    /// results and the fixed rate.
    async fn measure(&self) -> anyhow::Result<(Vec<PeerResult>, f64)> {
        let mut saturated = Vec::with_capacity(3);
        for target in &self.targets() {
            saturated.push(saturate_peer(self, target).await?);
        }
        let envoy_h1 = saturated[2].h1.measured.rps;
        anyhow::ensure!(
            envoy_h1 > 0.0,
            "envoy served no HTTP/1.1 requests: no fixed rate to run at"
        );
        let rate = (envoy_h1 * self.config.fixed_rate_share).max(1.0);
        self.progress(&format!(
            "fixed rate: {rate:.0} requests/s ({:.0} % of envoy's HTTP/1.1 maximum), {} connections",
            self.config.fixed_rate_share * 100.0,
            self.config.fixed_rate_connections
        ));
        let mut peers = Vec::with_capacity(3);
        for (i, (target, sat)) in self.targets().iter().zip(saturated).enumerate() {
            let (latency, usage) = self.fixed_rate(target, rate).await?;
            let l = &latency.run.latency;
            self.progress(&format!(
                "{:6} fixed rate: {:.0}/s achieved, p50 {} p99 {} p99.9 {}, {} failed{}",
                target.name,
                latency.run.achieved_rps,
                fmt_ms(l.p50_ms),
                fmt_ms(l.p99_ms),
                fmt_ms(l.p999_ms),
                latency.run.non_2xx + latency.run.errors + latency.run.unsent,
                cpu_note(latency.cpu)
            ));
            // Index 0 is the backend reached directly: no process of its own.
            let proxy = i.checked_sub(1);
            let mut result = PeerResult {
                peer: target.name,
                routed_after_s: proxy.map(|p| self.routed[p].as_secs_f64()),
                h1: sat.h1,
                h2: sat.h2,
                fixed_rate: latency,
                rss_idle_bytes: proxy.map(|p| self.idle[p]),
                rss_load_bytes: max_of(sat.max_rss, usage.max_rss),
                rss_peak_bytes: target
                    .process
                    .and_then(|p| p.sample().ok())
                    .map(|s| s.peak_rss_bytes),
                flags: Vec::new(),
            };
            result.flags = flags(&result);
            peers.push(result);
        }
        Ok((peers, rate))
    }

    /// Fails, with its log, if a proxy died during the runs.
    fn check_running(&mut self) -> anyhow::Result<()> {
        for proxy in [&mut self.ferry, &mut self.envoy] {
            anyhow::ensure!(
                proxy.is_running(),
                "{} died during the runs; its log ends with:\n{}",
                proxy.name,
                proxy.log_tail(20)
            );
        }
        Ok(())
    }
}

fn max_of(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Warm-up, then HTTP/1.1 and HTTP/2 saturation of one peer.
async fn saturate_peer(bench: &Bench, target: &Target<'_>) -> anyhow::Result<Saturated> {
    if !bench.config.warmup.is_zero() {
        bench.progress(&format!("{:6} warm-up", target.name));
        bench
            .saturate(target, Protocol::Http1, bench.config.warmup)
            .await?;
    }
    let duration = bench.config.duration;
    let (h1, u1) = bench.saturate(target, Protocol::Http1, duration).await?;
    bench.progress(&saturation_line(target.name, &h1));
    bench.progress(&core_note(h1.proxy_core));
    let (h2, u2) = bench.saturate(target, Protocol::Http2, duration).await?;
    bench.progress(&saturation_line(target.name, &h2));
    bench.progress(&core_note(h2.proxy_core));
    Ok(Saturated {
        h1,
        h2,
        max_rss: max_of(u1.max_rss, u2.max_rss),
    })
}

fn saturation_line(peer: &str, s: &Saturation) -> String {
    format!(
        "{peer:6} {:8}: {:>9.0} requests/s, {} non-2xx, {} errors{}",
        match s.protocol {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2c",
        },
        s.measured.rps,
        s.measured.non_2xx,
        s.measured.errors,
        cpu_note(s.cpu)
    )
}

fn core_note(core: Option<ProxyCore>) -> String {
    core.map_or(String::new(), |c| {
        format!(
            "       proxy core: {:.0} % processes ({:.0} % not the proxy), {:.0} % interrupts, {:.0} % steal, {:.0} % idle",
            c.time.processes * 100.0,
            c.other_processes * 100.0,
            c.time.interrupts * 100.0,
            c.time.steal * 100.0,
            c.time.idle * 100.0
        )
    })
}

fn cpu_note(cpu: Option<Cpu>) -> String {
    cpu.map_or(String::new(), |c| {
        format!(
            ", proxy CPU {:.2} cores ({:.1} µs/request)",
            c.cores, c.us_per_request
        )
    })
}

/// What to read with care in a peer's runs.
fn flags(peer: &PeerResult) -> Vec<String> {
    let mut out = Vec::new();
    for s in [&peer.h1, &peer.h2] {
        let name = match s.protocol {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2c",
        };
        if s.error_share > MAX_ERROR_SHARE {
            out.push(format!(
                "{name} saturation: {:.2} % of requests failed ({} non-2xx, {} errors)",
                s.error_share * 100.0,
                s.measured.non_2xx,
                s.measured.errors
            ));
        }
        if let Some(core) = s.proxy_core.filter(|c| c.other_processes > MAX_BUSY_CORES) {
            out.push(format!(
                "{name} saturation: other processes took {:.0} % of the proxy core",
                core.other_processes * 100.0
            ));
        }
        if let Some(cpu) = s.cpu.filter(|c| c.cores < 0.9) {
            out.push(format!(
                "{name} saturation: the proxy used {:.2} of its core: something else (the load side, or another process on its core) set this rate",
                cpu.cores
            ));
        }
    }
    let f = &peer.fixed_rate;
    if let Some(core) = f.proxy_core.filter(|c| c.other_processes > MAX_BUSY_CORES) {
        out.push(format!(
            "fixed rate: other processes took {:.0} % of the proxy core",
            core.other_processes * 100.0
        ));
    }
    if f.error_share > MAX_ERROR_SHARE {
        out.push(format!(
            "fixed rate: {:.2} % of requests failed ({} non-2xx, {} errors, {} unsent)",
            f.error_share * 100.0,
            f.run.non_2xx,
            f.run.errors,
            f.run.unsent
        ));
    }
    if f.run.achieved_rps < 0.95 * f.run.target_rps {
        out.push(format!(
            "fixed rate: achieved {:.0} of {:.0} requests/s",
            f.run.achieved_rps, f.run.target_rps
        ));
    }
    out
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn compare(peers: &[PeerResult], rate: f64) -> Comparison {
    let by = |name: &str| peers.iter().find(|p| p.peer == name);
    let rps = |name: &str, protocol: Protocol| {
        by(name).map_or(0.0, |p| match protocol {
            Protocol::Http1 => p.h1.measured.rps,
            Protocol::Http2 => p.h2.measured.rps,
        })
    };
    let p99 = |name: &str| by(name).map_or(0.0, |p| p.fixed_rate.run.latency.p99_ms);
    let rss = |name: &str, idle: bool| {
        by(name)
            .and_then(|p| {
                if idle {
                    p.rss_idle_bytes
                } else {
                    p.rss_load_bytes
                }
            })
            .unwrap_or(0) as f64
    };
    let (h1, h2) = (Protocol::Http1, Protocol::Http2);
    Comparison {
        h1_rps_vs_envoy: ratio(rps("ferry", h1), rps("envoy", h1)),
        h2_rps_vs_envoy: ratio(rps("ferry", h2), rps("envoy", h2)),
        h1_of_direct: ratio(rps("ferry", h1), rps("direct", h1)),
        h2_of_direct: ratio(rps("ferry", h2), rps("direct", h2)),
        envoy_h1_of_direct: ratio(rps("envoy", h1), rps("direct", h1)),
        envoy_h2_of_direct: ratio(rps("envoy", h2), rps("direct", h2)),
        fixed_rate_rps: rate,
        p99_ms: p99("ferry"),
        envoy_p99_ms: p99("envoy"),
        rss_idle_vs_envoy: ratio(rss("ferry", true), rss("envoy", true)),
        rss_load_vs_envoy: ratio(rss("ferry", false), rss("envoy", false)),
    }
}

fn verdict(c: &Comparison) -> Verdict {
    Verdict {
        rps_vs_envoy: c.h1_rps_vs_envoy >= targets::RPS_VS_ENVOY
            && c.h2_rps_vs_envoy >= targets::RPS_VS_ENVOY,
        p99_vs_envoy: c.p99_ms > 0.0 && c.p99_ms <= c.envoy_p99_ms,
        rss_vs_envoy: c.rss_idle_vs_envoy > 0.0
            && c.rss_idle_vs_envoy <= targets::RSS_VS_ENVOY
            && c.rss_load_vs_envoy <= targets::RSS_VS_ENVOY,
        of_direct: c.h1_of_direct >= targets::OF_DIRECT && c.h2_of_direct >= targets::OF_DIRECT,
    }
}

fn check_prerequisites(config: &Config, machine: &Machine) -> anyhow::Result<()> {
    ferry::check_binary(&config.ferry)?;
    machine::require_tool("taskset", "util-linux")?;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let (tool, package) = protocol.tool();
        machine::require_tool(tool, package)?;
    }
    anyhow::ensure!(
        config.proxy_core < machine.cores,
        "--proxy-core {} does not exist: this machine has {} cores",
        config.proxy_core,
        machine.cores
    );
    anyhow::ensure!(
        config.h1_connections > 0 && config.h2_connections > 0 && config.h2_streams > 0,
        "connections and streams must be at least 1"
    );
    anyhow::ensure!(
        config.fixed_rate_share > 0.0,
        "the fixed rate share must be above 0"
    );
    Ok(())
}

/// Moves every thread of `pid` to `cores`.
fn pin_process(pid: u32, cores: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cores, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset")?;
    anyhow::ensure!(status.success(), "taskset -a -p -c {cores} {pid}: {status}");
    Ok(())
}

fn keep_logs(keep: &Path, label: &str, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(keep).with_context(|| format!("creating {}", keep.display()))?;
    for name in ["ferry-control.log", "ferry-proxy.log", "envoy.log"] {
        let to = keep.join(format!("{TEST_NAME}-{label}-{name}"));
        std::fs::copy(dir.join(name), &to).with_context(|| format!("copying {name}"))?;
    }
    Ok(())
}

fn write_results(mut report: Report, dir: Option<&Path>) -> anyhow::Result<Report> {
    let Some(dir) = dir else {
        return Ok(report);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = format!("{TEST_NAME}-{}", report.label);
    let json = dir.join(format!("{stem}.json"));
    let md = dir.join(format!("{stem}.md"));
    let mut text = serde_json::to_string_pretty(&report)?;
    text.push('\n');
    std::fs::write(&json, text).with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    report.files = vec![json, md];
    Ok(report)
}

fn rss(bytes: Option<u64>) -> String {
    bytes.map_or("—".to_owned(), fmt_mib)
}

fn times(x: f64) -> String {
    format!("{x:.2}×")
}

fn percent(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

fn check(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

impl Report {
    /// The results as Markdown: the figures, the targets, the machine.
    pub fn markdown(&self) -> String {
        let s = &self.setup;
        let c = &self.comparison;
        let envoy = self.peer("envoy");
        let direct = self.peer("direct");
        let mut out = format!(
            "### {}: Ferry's proxy vs Envoy {} ({})\n\n",
            self.test,
            s.envoy_version
                .split('/')
                .next()
                .unwrap_or(&s.envoy_version),
            self.label
        );
        out.push_str(&format!(
            "| peer | HTTP/1.1 rps | h2c rps | vs Envoy (h1 / h2) | % of direct (h1 / h2) | p50 / p99 / p99.9 at {:.0} rps | RSS idle / load | CPU µs per request (h1 / h2) | failed |\n|---|---|---|---|---|---|---|---|---|\n",
            c.fixed_rate_rps
        ));
        for p in &self.peers {
            let vs = |other: Option<&PeerResult>| {
                other.map_or("—".to_owned(), |o| {
                    format!(
                        "{} / {}",
                        times(ratio(p.h1.measured.rps, o.h1.measured.rps)),
                        times(ratio(p.h2.measured.rps, o.h2.measured.rps))
                    )
                })
            };
            let of_direct = direct.map_or("—".to_owned(), |d| {
                format!(
                    "{} / {}",
                    percent(ratio(p.h1.measured.rps, d.h1.measured.rps)),
                    percent(ratio(p.h2.measured.rps, d.h2.measured.rps))
                )
            });
            let l = &p.fixed_rate.run.latency;
            let cpu = match (p.h1.cpu, p.h2.cpu) {
                (Some(a), Some(b)) => format!("{:.1} / {:.1}", a.us_per_request, b.us_per_request),
                _ => "—".to_owned(),
            };
            let failed = p.h1.measured.non_2xx
                + p.h1.measured.errors
                + p.h2.measured.non_2xx
                + p.h2.measured.errors
                + (p.fixed_rate.run.non_2xx + p.fixed_rate.run.errors + p.fixed_rate.run.unsent)
                    as u64;
            out.push_str(&format!(
                "| {} | {:.0} | {:.0} | {} | {} | {} / {} / {} | {} / {} | {} | {}{} |\n",
                p.peer,
                p.h1.measured.rps,
                p.h2.measured.rps,
                if p.peer == "direct" {
                    "—".to_owned()
                } else {
                    vs(envoy)
                },
                of_direct,
                fmt_ms(l.p50_ms),
                fmt_ms(l.p99_ms),
                fmt_ms(l.p999_ms),
                rss(p.rss_idle_bytes),
                rss(p.rss_load_bytes),
                cpu,
                failed,
                if p.flags.is_empty() { "" } else { " ⚑" }
            ));
        }
        out.push_str("\n| target (Ferry's proxy) | measured | |\n|---|---|---|\n");
        out.push_str(&format!(
            "| ≥ {:.1}× Envoy's requests/s | {} HTTP/1.1, {} h2c | {} |\n",
            targets::RPS_VS_ENVOY,
            times(c.h1_rps_vs_envoy),
            times(c.h2_rps_vs_envoy),
            check(self.verdict.rps_vs_envoy)
        ));
        out.push_str(&format!(
            "| p99 ≤ Envoy's at {:.0} % of Envoy's HTTP/1.1 maximum ({:.0} rps) | {} vs {} | {} |\n",
            s.fixed_rate_share * 100.0,
            c.fixed_rate_rps,
            fmt_ms(c.p99_ms),
            fmt_ms(c.envoy_p99_ms),
            check(self.verdict.p99_vs_envoy)
        ));
        out.push_str(&format!(
            "| RSS ≤ ⅓ of Envoy's | {} idle, {} under load | {} |\n",
            times(c.rss_idle_vs_envoy),
            times(c.rss_load_vs_envoy),
            check(self.verdict.rss_vs_envoy)
        ));
        out.push_str(&format!(
            "| ≥ {:.0} % of direct | {} HTTP/1.1, {} h2c (Envoy: {}, {}) | {} |\n",
            targets::OF_DIRECT * 100.0,
            percent(c.h1_of_direct),
            percent(c.h2_of_direct),
            percent(c.envoy_h1_of_direct),
            percent(c.envoy_h2_of_direct),
            check(self.verdict.of_direct)
        ));
        out.push_str(&format!(
            "\nMachine: {}, {} cores, {} RAM, Linux {}. Envoy {}. Both proxies pinned to core {} \
             (`ferry proxy --workers 1`, `envoy --concurrency 1`), configured by the same \
             `ferry control` over delta ADS; backend (hyper, one thread) and load generators on \
             cores {}. Saturation: {} s per run after a {} s warm-up, `wrk -t1 -c{}` \
             (HTTP/1.1 keep-alive) and `h2load -t1 -c{} -m{}` (h2c); fixed rate: open-loop \
             HTTP/1.1 generator, {} connections, {} s, latency from each request's due time \
             when its connection was busy. Body {} bytes. RSS: VmRSS, idle after the config \
             arrived, load = largest sample (every 100 ms) during the runs.\n",
            s.machine.cpu_model,
            s.machine.cores,
            fmt_mib(s.machine.memory_bytes),
            s.machine.kernel,
            s.envoy_version,
            s.proxy_core,
            s.load_cores,
            s.duration_s,
            s.warmup_s,
            s.h1_connections,
            s.h2_connections,
            s.h2_streams,
            s.fixed_rate_connections,
            s.fixed_rate_duration_s,
            s.body_bytes
        ));
        if !self.flags.is_empty() {
            out.push_str("\nFlagged (⚑):\n\n");
            for f in &self.flags {
                out.push_str(&format!("- {f}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_serves_the_host_on_the_backend() {
        let yaml = catalog_yaml("127.0.0.1:4242".parse().unwrap());
        assert!(yaml.contains("name: echo\n"), "{yaml}");
        assert!(yaml.contains("namespace: bench\n"), "{yaml}");
        assert!(yaml.contains("\"127.0.0.1:4242\""), "{yaml}");
    }

    #[test]
    fn verdicts_follow_the_targets() {
        let c = Comparison {
            h1_rps_vs_envoy: 1.3,
            h2_rps_vs_envoy: 1.1,
            h1_of_direct: 0.8,
            h2_of_direct: 0.75,
            envoy_h1_of_direct: 0.6,
            envoy_h2_of_direct: 0.6,
            fixed_rate_rps: 1000.0,
            p99_ms: 0.9,
            envoy_p99_ms: 1.0,
            rss_idle_vs_envoy: 0.2,
            rss_load_vs_envoy: 0.4,
        };
        let v = verdict(&c);
        assert!(!v.rps_vs_envoy && v.p99_vs_envoy && !v.rss_vs_envoy && v.of_direct);
    }
}
